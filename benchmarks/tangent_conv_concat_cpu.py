"""A convolution's tangent as one convolution instead of two, on CPU (a lever for issue 5's ratio).

The tangent tape computes a convolution's tangent as ``conv(dx, W) + conv(x, dW)``
(`metapl.mpl.tangent_ops.affine_tangent`). The same sum is one convolution over the channels
concatenated, ``conv(cat(dx, x), cat(W, dW))``: the same multiply-adds, one kernel call instead of
two and an add, at the cost of copying ``x`` and ``dx`` into one tensor. This times both, round by
round, for every convolution of WRN-28-2 past the stem at `metapl bench`'s CPU unlabeled batch (28
images, the input shapes read off the model by hooks), in channels_last, bf16 and fp32, and checks
that the two give the tangent (against forward-mode AD in float64). Median of ``--repeats`` after warm-up, the
two taking turns at going first:

    python benchmarks/tangent_conv_concat_cpu.py --json benchmarks/results/tangent_conv_concat_cpu.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from jvp_cpu import timed  # noqa: E402
from machine import parser_with_json, positive_int, save  # noqa: E402

from metapl.models import create_model  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def conv_inputs(model: torch.nn.Module, images: int) -> list[tuple[torch.nn.Conv2d, torch.Size]]:
    """Every Conv2d of WRN-28-2 ``model`` with the shape of its input on a batch of ``images``,
    but the stem: its input, the images, has no tangent, so its tangent is one convolution
    already."""
    seen: list[tuple[torch.nn.Conv2d, torch.Size]] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].shape)))
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.rand(images, 3, 32, 32))
    for h in hooks:
        h.remove()
    return [(conv, shape) for conv, shape in seen if conv is not model.stem]


def conv_args(conv: torch.nn.Conv2d) -> tuple:
    """F.conv2d's arguments after input and weight: no bias, the layer's geometry."""
    return (None, conv.stride, conv.padding, conv.dilation, conv.groups)


def two_and_one(conv: torch.nn.Conv2d, x, dx, w, dw):
    """The tangent as two convolutions and an add, and as one over concatenated channels."""
    args = conv_args(conv)

    def two():
        return F.conv2d(dx, w, *args) + F.conv2d(x, dw, *args)

    def one():
        return F.conv2d(torch.cat((dx, x), 1), torch.cat((w, dw), 1), *args)

    return two, one


def reference(conv: torch.nn.Conv2d, x, dx, w, dw) -> torch.Tensor:
    """The convolution's tangent by forward-mode AD, in float64: the oracle both forms meet."""
    args = conv_args(conv)
    return torch.func.jvp(lambda x, w: F.conv2d(x, w, *args), (x, w), (dx, dw))[1]


def measure(images: int, repeats: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    model = create_model("wrn28_2", 10).train()
    layers = conv_inputs(model, images)
    rows = []
    for name, dtype in DTYPES.items():
        for i, (conv, shape) in enumerate(layers):
            made = [
                torch.randn(shape, dtype=torch.float64),
                torch.randn(shape, dtype=torch.float64),
                conv.weight.detach().double(),
                torch.randn_like(conv.weight, dtype=torch.float64),
            ]
            exact = reference(conv, *made)
            scale = exact.abs().max().item()
            cast = [t.to(dtype).contiguous(memory_format=torch.channels_last) for t in made]
            two, one = two_and_one(conv, *cast)
            kinds = {"two": two, "one": one}
            with torch.no_grad():
                times = dict(timed(kinds, repeats, warmup))
                error = {
                    k: (fn().double() - exact).abs().max().item() / scale for k, fn in kinds.items()
                }
            row = {
                "precision": name,
                "layer": i,
                "input": list(shape),
                "weight": list(conv.weight.shape),
                "stride": list(conv.stride),
                "two_convolutions_ms": statistics.median(times["two"]),
                "one_concatenated_ms": statistics.median(times["one"]),
                "max_error_two": error["two"],
                "max_error_one": error["one"],
            }
            rows.append(row)
            print(
                f"{name} layer {i:2d} {str(list(shape)):<18} two {row['two_convolutions_ms']:6.2f} ms"
                f"  one {row['one_concatenated_ms']:6.2f} ms  error (of max |tangent|) "
                f"{error['two']:.1e} / {error['one']:.1e}"
            )
    return rows


def totals(rows: list[dict]) -> dict:
    out = {}
    for name in DTYPES:
        mine = [r for r in rows if r["precision"] == name]
        two = sum(r["two_convolutions_ms"] for r in mine)
        one = sum(r["one_concatenated_ms"] for r in mine)
        out[name] = {
            "two_convolutions_ms": two,
            "one_concatenated_ms": one,
            "one_over_two": one / two,
        }
        print(f"{name}: all layers, two {two:.1f} ms, one {one:.1f} ms ({one / two:.2f}x)")
    return out


def main() -> None:
    p = parser_with_json(__doc__)
    p.add_argument("--images", type=positive_int, default=28, help="batch (default: 28)")
    p.add_argument(
        "--repeats", type=positive_int, default=30, help="timed rounds; the median (default: 30)"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: 3)")
    args = p.parse_args()
    rows = measure(args.images, args.repeats, args.warmup)
    setup = {
        "model": "wrn28_2",
        "memory_format": "channels_last",
        "threads": torch.get_num_threads(),
    }
    setup |= {"images": args.images, "repeats": args.repeats, "warmup": args.warmup}
    save(args.json, {"setup": setup, "totals": totals(rows), "results": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
