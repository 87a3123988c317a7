"""The exact step's labeled pass, replayed from a CUDA graph.

Why: the labeled pass at theta_{t+1} (the student's forward on the labeled batch, then v = grad R)
launches some 350 kernels, which cost the host 6-7 ms for about 1 ms of GPU work
(``benchmarks/results/gpu/profile``). From one step to the next it runs the same kernels on the same
tensors: the student's parameters and buffers, which its optimizer and BatchNorm update in place,
and a batch of a fixed shape. Captured once, it is replayed with one launch. Where the host holds
the step up, that is time saved. On an H200 (session 36) a real training step went from 66.1 to
59.8 ms, because there the thread that makes the next batch competes for the host. The step alone
kept the GPU busy and saved nothing (60.8 and 60.5 ms).

What a replay reads: the batch (copied into the graph's own input tensors), the parameters and
buffers at the addresses they had at the capture, the random stream (dropout draws from the CUDA
generator's state at the replay, as the eager pass would). What it cannot see: anything the
capture turned into a constant, a Python branch on a value, a new shape or a module switched to
eval mode. So a graph is kept per *key* (:func:`pass_key`: the batch's shapes, strides and dtypes,
the addresses of the student's tensors, which of them take a gradient, the modules' train/eval
modes, the precision flags); a step with a key not seen before runs eagerly, the second step with
it captures. A pass that cannot be captured (a host sync in the model's forward, a CPU tensor)
runs eagerly from then on, with one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metapl.errors import ConfigError
from metapl.mpl.inputs import ModelInput
from metapl.mpl.replay import RngState, module_device

# (the per-member labeled loss, v: one gradient per parameter, None where none is taken)
LabeledResult = tuple[Tensor, list[Tensor | None]]
LabeledPass = Callable[[ModelInput, Tensor], LabeledResult]

# Graphs kept per LabeledGraph: each holds the pass's memory (a private pool, shared among them);
# a run whose batch shape keeps changing should not capture without end.
MAX_GRAPHS = 4

# The warm-up passes before a capture (on a side stream, as torch's CUDA-graph notes ask): cuDNN's
# and cuBLAS's lazy set-up and autotuning happen there, not in the capture.
WARMUP_PASSES = 2


def check_cuda_student(student: nn.Module) -> None:
    """A ConfigError unless the student is on a CUDA device: CUDA graphs are CUDA's."""
    device = module_device(student)
    if device.type != "cuda":
        raise ConfigError(
            "labeled_cuda_graph needs the student on a CUDA device (CUDA graphs), it is on "
            f"{device}: set labeled_cuda_graph=False there"
        )


def leaf_aliases(module: nn.Module) -> dict[str, Tensor]:
    """Each parameter of ``module`` as a new leaf on the same memory (name -> tensor): what the
    labeled pass runs with and differentiates when it is captured.

    Why: a parameter's AccumulateGrad node (autograd's end of its graph) lives as long as a graph
    that used it, and remembers the stream it was made on. The update pass's, made on the default
    stream and kept alive by the step's tape, made the backward inside the capture (on the
    capture's own stream) wait on the default stream, which invalidated the capture (H200,
    session 36). An alias gets its own node, on the stream the pass runs on, and reads the
    parameter's memory, which the optimizer updates in place: a replay sees theta_{t+1}."""
    return {
        name: p.detach().requires_grad_(p.requires_grad) for name, p in module.named_parameters()
    }


def _tensor_key(t: Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad)


def pass_key(
    student: nn.Module,
    params: list[Tensor],
    x_l: ModelInput,
    y_l: Tensor,
    autocast_dtype: torch.dtype | None,
) -> tuple:
    """What a captured labeled pass depends on beyond the values of its tensors: a graph replayed
    with a different key would compute another function (or read freed memory)."""
    return (
        x_l.structure,
        tuple(_tensor_key(leaf) for leaf in x_l.leaves),
        _tensor_key(y_l),
        tuple((p.data_ptr(), p.requires_grad, p.dtype) for p in params),
        tuple(b.data_ptr() for b in student.buffers()),
        tuple(m.training for m in student.modules()),
        autocast_dtype,
        torch.is_autocast_enabled("cuda"),  # a caller's autocast around the step
        torch.get_autocast_dtype("cuda"),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )


@dataclass
class CapturedPass:
    """One captured labeled pass: its input tensors (the batch is copied into them), the graph,
    and its outputs (overwritten by each replay: read them before the next)."""

    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]
    labels: Tensor
    result: LabeledResult

    def replay(self, x_l: ModelInput, y_l: Tensor) -> LabeledResult:
        with torch.no_grad():
            for own, leaf in zip(self.inputs, x_l.leaves):
                own.copy_(leaf, non_blocking=True)
            self.labels.copy_(y_l, non_blocking=True)
        self.graph.replay()
        return self.result


def capture(run: LabeledPass, x_l: ModelInput, y_l: Tensor, pool) -> CapturedPass:
    """Capture ``run`` on copies of the batch (warmed up first, on a side stream); the random
    stream is given back as it was, so that the capture draws nothing from it."""
    inputs = [leaf.detach().clone() for leaf in x_l.leaves]  # (clone keeps the strides)
    labels = y_l.detach().clone()
    own_x = x_l.with_leaves(inputs, x_l.batch_shape)
    device = labels.device
    rng = RngState(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    clean = generator.clone_state()  # a copy of its state that no capture has touched
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                run(own_x, labels)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the thread that makes the next batch (BatchesAhead) keeps launching on its
        # own stream meanwhile, which the default ("global") mode would count as an error.
        # autocast's cache off: casts cached outside the capture must not be read inside it (the
        # pass's own autocast inherits the setting; a caller's autocast stays as it is)
        with (
            torch.autocast(
                device.type,
                enabled=torch.is_autocast_enabled(device.type),
                dtype=torch.get_autocast_dtype(device.type),
                cache_enabled=False,
            ),
            torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"),
        ):
            result = run(own_x, labels)
    except BaseException:
        # A failed capture leaves the generator's state marked as capturing (torch 2.11): every
        # later dropout failed "Offset increment outside graph capture encountered unexpectedly".
        generator.graphsafe_set_state(clean)
        raise
    finally:
        rng.restore()
    return CapturedPass(graph, inputs, labels, result)


class LabeledGraph:
    """The exact step's labeled pass, run through CUDA graphs kept per :func:`pass_key`.

    The first step with a key runs the pass eagerly (its errors are the model's own, with the
    step's messages); the second captures it and replays; later ones replay. ``capturer`` is
    :func:`capture` (tests pass a stand-in on the CPU)."""

    def __init__(self, capturer: Callable[..., CapturedPass] = capture):
        self._capture = capturer
        self._graphs: dict[tuple, CapturedPass | None] = {}  # None: could not be captured
        self._seen: set[tuple] = set()
        self._pool: object = None  # one memory pool for the graphs (made at the first capture)
        self._warned = False
        self.last_path: str | None = None  # "eager" or "graph": what the last step did

    def __call__(self, run: LabeledPass, key: tuple, x_l: ModelInput, y_l: Tensor) -> LabeledResult:
        if key in self._graphs:
            captured = self._graphs[key]
        elif key not in self._seen or len(self._graphs) >= MAX_GRAPHS:
            if key not in self._seen:
                self._seen.add(key)
            else:
                self._warn(
                    f"{MAX_GRAPHS} graphs are kept already (the labeled batch's shape keeps "
                    "changing?); this one runs eagerly"
                )
            captured = None
        else:
            captured = self._graphs[key] = self._try_capture(run, x_l, y_l)
        if captured is None:
            self.last_path = "eager"
            return run(x_l, y_l)
        self.last_path = "graph"
        return captured.replay(x_l, y_l)

    def _try_capture(self, run: LabeledPass, x_l: ModelInput, y_l: Tensor) -> CapturedPass | None:
        if self._pool is None and torch.cuda.is_available():
            self._pool = torch.cuda.graph_pool_handle()
        try:
            return self._capture(run, x_l, y_l, self._pool)
        except Exception as err:  # noqa: BLE001  (any failure to capture: run it eagerly)
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            self._warn(f"the labeled pass could not be captured ({first_line}); it runs eagerly")
            return None

    def _warn(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"labeled_cuda_graph: {what}", RuntimeWarning, stacklevel=4)
