"""`metapl predict`: the class and its probability for each image, with a trained run's model.

The model is the one the run reports (its EMA if it kept one, else the student), loaded by
:func:`metapl.train.run_model.load_run_model`, the same loader ReducedMPL uses for its large teacher.
Each image file is decoded as the run's data was (:func:`metapl.data.imagenet.decode_image`: shorter
side resized to the run's resolution, centre crop; grayscale for digits runs) and turned into model
input by :func:`metapl.train.data.model_input`, the function training and evaluation use. So the
probabilities are the ones the run's evaluation would compute, and the ones the model exported by
`metapl export` returns for the same pixels.

Output: one tab-separated line per image, ``path<TAB>class<TAB>probability`` followed by the next
``--top K - 1`` classes and probabilities, most likely first; ``--json FILE`` writes the same with
full precision. Images are read in batches, so a folder of any size fits in memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "class and probability per image with a trained run's model (EMA or student)"
DESCRIPTION = (
    "Classify image files with the model a `metapl train` run reports (its EMA if it kept one, "
    "else its student). Each image is resized and centre-cropped to the run's resolution "
    "(grayscale 8x8 for digits) and scaled to [0, 1] exactly as the run's evaluation did. A "
    "file argument may be any image Pillow reads (PNG, JPEG, BMP, ...); a folder argument means "
    "every PNG/JPEG under it, sorted. Prints one tab-separated line per "
    "image: path, then --top K pairs of class and probability, most likely first. Class names come "
    "from RUN/classes.json when the run has one, else class indices."
)
BATCH = 64  # images decoded and classified at once


def _bar_disabled(n_images: int) -> bool | None:
    """tqdm's ``disable``: None shows the bar only on a terminal; one batch needs no bar."""
    return None if n_images > BATCH else True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `metapl predict`."""
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files, or folders of PNG/JPEG files"
    )
    parser.add_argument("--run", required=True, help="the --out folder of a `metapl train` run")
    parser.add_argument("--top", type=int, default=1, help="classes shown per image (default: 1)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the predictions here")
    parser.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="use the last checkpoint of a run that has not reached its last step",
    )


def image_paths(arguments: list[str]) -> list[str]:
    """Files as given; folders expanded to their PNG/JPEG files (any depth, sorted)."""
    from metapl.data.folder import list_images
    from metapl.errors import DataError

    paths: list[str] = []
    for argument in arguments:
        if not argument.strip():  # Path("") is the current folder: every image under it
            raise DataError("an IMAGE argument is empty; give image files or folders")
        path = Path(argument)
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise DataError(
                    f"folder {path} has no images (.png, .jpg or .jpeg files, at any depth; "
                    "names starting with '.' are skipped)"
                )
            paths += [str(path / name) for name in found]
        elif path.is_file():
            paths.append(str(path))
        else:
            raise DataError(f"image {path} does not exist")
    return paths


def image_files(paths: list[str], spec):
    """``paths`` as a :class:`~metapl.data.imagenet.LazyImages` that decodes each file as the
    run's data was decoded (its resolution; gray for a 1-channel run), with a DataError naming an
    unreadable file."""
    import numpy as np
    from PIL import Image

    from metapl.data.arrays import describe
    from metapl.data.imagenet import LazyImages, decode_image
    from metapl.errors import DataError

    class Files(LazyImages):
        @property
        def shape(self) -> tuple[int, int, int, int]:
            return (len(self.paths), spec.resolution, spec.resolution, spec.channels)

        def __getitem__(self, index):
            if not isinstance(index, (int, np.integer)):
                return super().__getitem__(index)  # rows on the decoding threads, in order
            path = self.paths[index]
            try:
                rgb = decode_image(path, spec.resolution)
            except DataError as exc:
                cause = exc.__context__  # decode_image raises "from None", keeping PIL's error
                detail = describe(cause) if cause is not None else "unreadable"
                raise DataError(
                    f"{path} is not a readable image ({detail}); expected a PNG or JPEG file"
                ) from None
            if spec.channels == 1:  # PIL's luma: exact on gray RGB, so grayscale files round-trip
                rgb = np.asarray(Image.fromarray(rgb).convert("L"))[..., None]
            return rgb

    return Files(paths, spec.resolution)


def read_images(paths: list[str], spec):
    """uint8 ``[N, R, R, C]`` pixels of ``paths`` as the run's data was decoded, on
    metapl.data.decoding's threads; DataError naming the first unreadable file in order."""
    import numpy as np

    return image_files(paths, spec)[np.arange(len(paths))]


def run(args: argparse.Namespace) -> None:
    import torch

    from metapl.data import decoding
    from metapl.errors import ConfigError
    from metapl.progress import progress_bar
    from metapl.report import check_output_file, write_json_atomic
    from metapl.train.data import model_input
    from metapl.train.engine import resolve_device
    from metapl.train.run_model import (
        Classifier,
        check_not_a_run_file,
        check_run_folder,
        class_names,
        load_run_model,
    )

    check_run_folder(args.run)  # the most basic mistake first: a mistyped --run
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    check_output_file(args.json, "--json")
    if args.json:
        check_not_a_run_file(args.json, args.run, "--json")
    paths = image_paths(args.images)  # cheap checks first: a missing file fails before the model
    if args.json and Path(args.json).resolve() in {Path(p).resolve() for p in paths}:
        # the predictions would replace the very image they are about
        raise ConfigError(f"--json {args.json} is one of the images to classify; give another name")
    device = resolve_device(args.device)
    loaded = load_run_model(
        args.run,
        device,
        allow_unfinished=args.allow_unfinished,
        unfinished_hint=", or pass --allow-unfinished to use its last checkpoint",
    )
    if not loaded.finished:
        print(
            f"metapl predict: warning: {args.run} is unfinished (step {loaded.step} of "
            f"{loaded.total_steps}); using its last checkpoint",
            file=sys.stderr,
        )
    names = class_names(args.run, loaded.num_classes)
    classifier = Classifier(loaded.model)
    top = min(args.top, loaded.num_classes)
    records = []
    # A bar with ETA on stderr when it is a terminal and there is more than one batch; the lines
    # go through bar.write, which prints them above the bar (to stdout, a pipe or a terminal).
    bar = progress_bar(
        total=len(paths),
        unit="image",
        desc="metapl predict",
        disable=_bar_disabled(len(paths)),
        dynamic_ncols=True,
    )
    files = image_files(paths, loaded.spec)
    starts = range(0, len(paths), BATCH)
    # each batch's files decode while the model classifies the batch before
    ahead = decoding.submit(files, range(0, min(BATCH, len(paths))))
    try:
        for start in starts:
            batch = paths[start : start + BATCH]
            pixels = ahead.result()  # the first unreadable file raises here, at its batch
            if start + BATCH < len(paths):
                ahead = decoding.submit(
                    files, range(start + BATCH, min(start + 2 * BATCH, len(paths)))
                )
            with torch.no_grad():
                probs = classifier.probabilities(model_input(pixels, device)).cpu()
            values, indices = probs.topk(top, dim=-1)
            lines = []
            for path, p, k in zip(batch, values.tolist(), indices.tolist()):
                cells = [f"{names[c]}\t{q:.4f}" for c, q in zip(k, p)]
                lines.append("\t".join([path, *cells]))
                top_k = [{"class": names[c], "index": c, "probability": q} for c, q in zip(k, p)]
                records.append({"image": path, "top": top_k})
            bar.write("\n".join(lines), file=sys.stdout)
            bar.update(len(batch))
    finally:
        ahead.cancel()  # an error or Ctrl-C: the batch being decoded is not needed
    bar.close()
    if args.json:
        payload = {
            "run": str(args.run),
            "model": loaded.weights,
            "step": loaded.step,
            "finished": loaded.finished,
            "input": loaded.spec.describe(),
            "predictions": records,
        }
        write_json_atomic(Path(args.json), payload)
