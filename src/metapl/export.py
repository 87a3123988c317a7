"""`metapl export`: save a trained run's model as TorchScript or ONNX, ready to use without metapl.

What is exported is :class:`metapl.train.run_model.Classifier` around the run's reported model (its
EMA if it kept one, else the student), in eval mode: uint8 pixels in, class probabilities out. The
preprocessing (scaling to ``[0, 1]``, NHWC to NCHW) and the softmax travel inside the file, because
a user who has to re-implement them gets them subtly wrong; `metapl predict` runs the same module,
so both agree on the same pixels. Only resizing stays outside: the file takes images already at the
run's resolution (``metapl predict`` resizes and centre-crops for you).

- Input ``images``: uint8 ``[N, R, R, C]``, values 0..255; R and C as ``metapl export`` prints
  (digits runs: 8x8 grayscale, C = 1; others RGB, C = 3). N is free.
- Output ``probabilities``: float32 ``[N, num_classes]``, rows summing to 1.

TorchScript files carry ``metapl.json`` (input, output, classes, model, finished) as an extra file;
ONNX files carry the same keys as metadata properties. The file is written to a temporary name beside the target and
renamed onto it (``os.replace``), so a crash or an error never leaves half a model behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from metapl.atomic import replace_atomically

HELP = "save a trained run's model (EMA or student) as TorchScript or ONNX"
DESCRIPTION = (
    "Export the model a `metapl train` run reports (its EMA if it kept one, else its student) with "
    "its preprocessing and softmax: the file takes uint8 images [N, R, R, C] (0..255, at the run's "
    "resolution; C=1 for digits, else RGB) and returns float32 class probabilities [N, classes]. "
    "TorchScript: torch.jit.load(FILE). ONNX needs `pip install onnx onnxscript`."
)
FORMATS = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
ONNX_PACKAGES = ("onnx", "onnxscript")  # what torch.onnx.export needs beyond torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `metapl export`."""
    parser.add_argument("--run", required=True, help="the --out folder of a `metapl train` run")
    parser.add_argument("--format", required=True, help="torchscript or onnx")
    parser.add_argument(
        "--output",
        help="file to write (default: RUN/model.torchscript.pt or RUN/model.onnx)",
    )
    parser.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="export the last checkpoint of a run that has not reached its last step",
    )


def _missing_onnx_packages() -> list[str]:
    import importlib.util

    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def _trace(classifier, example):
    """TorchScript by tracing: the models are plain tensor code, and tracing needs no annotations.
    Checked on a batch of another size, so a shape frozen into the trace cannot pass silently."""
    import torch

    with torch.no_grad():
        traced = torch.jit.trace(classifier, example, check_trace=False)
        shape = (example.shape[0] + 1, *example.shape[1:])
        gen = torch.Generator().manual_seed(0)  # leaves the global random state alone
        other = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        if not torch.allclose(traced(other), classifier(other), rtol=1e-4, atol=1e-6):
            raise RuntimeError("the traced model differs from the model on another batch size")
    return traced


def _save_torchscript(classifier, example, info: dict, path: Path) -> None:
    import json
    import warnings

    extra = {"metapl.json": json.dumps(info, indent=1)}
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream (torch 2.13 warns on every call with a
        # DeprecationWarning, 2.14 with a FutureWarning, which Python shows) but still what
        # torch.jit.load and libtorch (C++) read; the warning is not the user's to act on.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.")
        traced = _trace(classifier, example)
        replace_atomically(path, lambda tmp: _jit_save(traced, tmp, extra))


def _jit_save(traced, path: Path, extra: dict) -> None:
    """Through a Python file: a failed write (a full disk) then raises its OSError, under torch's
    RuntimeError; given a path, torch's C++ writer names no cause."""
    import torch

    with open(path, "wb") as f:
        torch.jit.save(traced, f, _extra_files=extra)


def _save_onnx(classifier, example, info: dict, path: Path) -> None:
    import json
    import logging
    import warnings

    import torch

    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs a warning per torchvision op it cannot register
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.onnx.export(
                classifier,
                (example,),
                input_names=["images"],
                output_names=["probabilities"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    assert program is not None  # dynamo=True, export's default, returns the program
    program.model.metadata_props.update(
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}
    )
    # One self-contained file (our models are far below ONNX's 2 GB limit): a side file of weights
    # would be named after the temporary file.
    replace_atomically(path, lambda tmp: program.save(str(tmp), external_data=False))


def run(args: argparse.Namespace) -> None:
    import torch

    from metapl.errors import ConfigError
    from metapl.report import check_not_a_folder_name
    from metapl.train.run_model import (
        Classifier,
        check_not_a_run_file,
        check_run_folder,
        class_names,
        load_run_model,
    )

    check_run_folder(args.run)  # the most basic mistake first, as in `metapl predict`
    args.format = args.format.lower()  # --format ONNX, TorchScript: the same formats
    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format!r}: expected one of {', '.join(FORMATS)}")
    if args.output is not None and not args.output.strip():  # not the default: a name left out
        raise ConfigError("--output is empty; give a file name, or leave --output out")
    output = Path(args.output) if args.output else Path(args.run) / FORMATS[args.format]
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name")
    if args.output:
        check_not_a_folder_name(args.output, "--output")
    check_not_a_run_file(output, args.run, "--output")
    # A name that says the other format: a TorchScript file named .onnx was written without a word
    suffix = output.suffix.lower()
    other = (
        "onnx" if suffix == ".onnx" else "torchscript" if suffix in TORCHSCRIPT_SUFFIXES else None
    )
    if other is not None and other != args.format:
        raise ConfigError(
            f"--output {output} names a{'n' if other == 'onnx' else ''} {other} file, but --format "
            f"is {args.format}: use --format {other}, or a name like {FORMATS[args.format]}"
        )
    if args.output and not output.resolve().parent.is_dir():
        if output.resolve().parent.exists():
            raise ConfigError(f"--output {output}: {output.parent} is a file, not a folder")
        raise ConfigError(f"--output {output}: folder {output.parent} does not exist")
    # checked now, not after the model is traced (a run folder shared read-only, say)
    folder = output.resolve().parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--output {output}: folder {output.parent} is not writable; choose another --output"
        )
    if args.format == "onnx" and (missing := _missing_onnx_packages()):
        raise ConfigError(
            f"ONNX export needs {' and '.join(missing)}: pip install 'metapl[onnx]' "
            "(or pip install onnx onnxscript)"
        )
    loaded = load_run_model(
        args.run,
        "cpu",  # a CPU export loads anywhere; move it with .to() or map_location after loading
        allow_unfinished=args.allow_unfinished,
        unfinished_hint=", or pass --allow-unfinished to export its last checkpoint",
    )
    spec = loaded.spec
    classifier = Classifier(loaded.model).eval()
    example = torch.zeros((2, spec.resolution, spec.resolution, spec.channels), dtype=torch.uint8)
    info = {
        "input": f"images: {spec.describe()}",
        "output": f"probabilities: float32 [N, {loaded.num_classes}] (softmax)",
        "classes": class_names(args.run, loaded.num_classes),
        "model": loaded.describe(),
        "finished": loaded.finished,
    }
    save = _save_torchscript if args.format == "torchscript" else _save_onnx
    save(classifier, example, info, output)
    if not loaded.finished:
        print(
            f"metapl export: warning: {args.run} is unfinished (step {loaded.step} of "
            f"{loaded.total_steps}); exported its last checkpoint",
            file=sys.stderr,
        )
    print(f"wrote {output} ({args.format}): {loaded.describe()}")
    print(f"  input  {info['input']}")
    print(f"  output {info['output']}")
