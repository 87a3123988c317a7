"""GlobalBatchNorm on 2 gloo processes computes what BatchNorm computes on the whole batch in one.

The oracle is plain ``nn.BatchNorm2d`` in one process on the concatenated shards, in float64: the
output, the gradients (input and parameters), the forward-mode JVP, the running statistics and,
end to end, two exact MPL steps of a teacher and a student with BatchNorm (tangent tape and
gradient averaging) must all agree to rounding.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.distributed as dist
import torch.multiprocessing as mp
from mpl_helpers import TEST_DEVICE
from torch import nn
from torch.func import functional_call

from metapl import MetaPseudoLabels
from metapl.distributed import GradientAverager
from metapl.errors import ConfigError
from metapl.sync_batchnorm import GlobalBatchNorm, convert_global_batchnorm

WORLD = 2
SHARD = 3  # examples per process
CPU = torch.device("cpu")


def data(device: torch.device = CPU) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = WORLD * SHARD
    made = {
        # a large mean, so that a one-pass variance would lose digits
        "x": 3.0 + torch.randn(n, 4, 5, 5, generator=g, dtype=torch.float64),
        "dx": torch.randn(n, 4, 5, 5, generator=g, dtype=torch.float64),
        "dgamma": torch.randn(4, generator=g, dtype=torch.float64),
        "cotangent": torch.randn(n, 4, 5, 5, generator=g, dtype=torch.float64),
        "x_l": torch.randn(2, n, 1, 5, 5, generator=g, dtype=torch.float64),
        "y_l": torch.randint(0, 3, (2, n), generator=g),
        "x_u": torch.randn(2, 2 * n, 1, 5, 5, generator=g, dtype=torch.float64),
    }
    return {k: v.to(device) for k, v in made.items()}


def bn(cls=nn.BatchNorm2d, device: torch.device = CPU) -> nn.Module:
    m = cls(4, momentum=0.3).double().to(device)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2.0, 4, dtype=torch.float64))
        m.bias.copy_(torch.linspace(-1.0, 1.0, 4, dtype=torch.float64))
    return m


def net(seed: int, device: torch.device = CPU) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).double()
    return model.to(device)


def mpl_pair(global_bn: bool, world: int, device: torch.device):
    teacher, student = net(1, device), net(2, device)
    if global_bn:
        convert_global_batchnorm(teacher)
        convert_global_batchnorm(student)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.2, momentum=0.9),
        torch.optim.SGD(
            student.parameters(), lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-3
        ),
        temperature=0.7,
        jvp="tape",
        grad_sync=GradientAverager() if world > 1 else None,
    )
    return teacher, student, mpl


def layer_results(m: nn.Module, x, dx, dgamma, cotangent) -> dict[str, torch.Tensor]:
    """Output, input and parameter gradients, JVP along (dx, dgamma), running statistics."""
    x = x.clone().requires_grad_(True)
    y = m(x)
    grads = torch.autograd.grad((y * cotangent).sum(), [x, m.weight, m.bias])
    with fwad.dual_level():
        state = {n: b.clone() for n, b in m.named_buffers()}  # the JVP pass leaves them alone
        state["weight"] = fwad.make_dual(m.weight.detach(), dgamma)
        out = functional_call(m, state, (fwad.make_dual(x.detach(), dx),))
        jvp = fwad.unpack_dual(out).tangent
    return {
        "y": y.detach(),
        "dx": grads[0],
        "dweight": grads[1],
        "dbias": grads[2],
        "jvp": jvp,
        "running_mean": m.running_mean.clone(),
        "running_var": m.running_var.clone(),
    }


def mpl_results(
    world: int, rank: int, global_bn: bool, device: torch.device = CPU
) -> dict[str, torch.Tensor]:
    d = data(device)
    teacher, student, mpl = mpl_pair(global_bn, world, device)
    n_l, n_u = d["x_l"].shape[1] // world, d["x_u"].shape[1] // world
    for step in range(2):
        mpl.step(
            d["x_l"][step, rank * n_l : (rank + 1) * n_l],
            d["y_l"][step, rank * n_l : (rank + 1) * n_l],
            d["x_u"][step, rank * n_u : (rank + 1) * n_u],
        )
    out = {f"teacher.{k}": v.cpu() for k, v in teacher.state_dict().items()}
    out.update({f"student.{k}": v.cpu() for k, v in student.state_dict().items()})
    out["jvp_path_is_tape"] = torch.tensor(mpl.last_jvp_path == "tape")
    return out


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        d = data(TEST_DEVICE)  # gloo all-reduces CUDA tensors too (METAPL_TEST_DEVICE=cuda)
        part = slice(rank * SHARD, (rank + 1) * SHARD)
        m = bn(GlobalBatchNorm, TEST_DEVICE)
        results = layer_results(m, d["x"][part], d["dx"][part], d["dgamma"], d["cotangent"][part])
        # Eval mode uses the running statistics and no collective: rank 0 alone runs it.
        m.eval()
        if rank == 0:
            results["eval_y"] = m(d["x"]).detach()
        results = {k: v.cpu() for k, v in results.items()}
        results.update(mpl_results(WORLD, rank, global_bn=True, device=TEST_DEVICE))
        torch.save(results, Path(out) / f"rank{rank}.pt")  # before the teardown (below)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    for attempt in (1, 2):
        tmp = tmp_path_factory.mktemp("sync_bn")
        try:
            mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
            return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
        except mp.ProcessExitedException as exc:
            # Rarely a gloo process aborts in C++ as it tears down, after every rank wrote its
            # results ("terminate called without an active exception", SIGABRT: gloo's
            # teardown, docs/multi-gpu.md; session 32's CI run). Not what these tests check:
            # spawned once more from scratch, as tests/test_distributed.py does; any other
            # failure, or a second one, fails them.
            written = all((tmp / f"rank{r}.pt").exists() for r in range(WORLD))
            if attempt == 2 or exc.signal_name != "SIGABRT" or not written:
                raise
    raise AssertionError("unreachable")


def test_two_processes_normalize_like_batchnorm_on_the_whole_batch(ranks):
    d = data()
    ref = layer_results(bn(), d["x"], d["dx"], d["dgamma"], d["cotangent"])
    for name in ("y", "dx", "jvp"):  # per example: each rank holds its shard's rows
        got = torch.cat([r[name] for r in ranks])
        torch.testing.assert_close(got, ref[name], rtol=1e-10, atol=1e-12, msg=name)
    for name in ("dweight", "dbias"):  # each rank's share of the whole batch's sum
        got = sum(r[name] for r in ranks)
        torch.testing.assert_close(got, ref[name], rtol=1e-10, atol=1e-12, msg=name)
    for name in ("running_mean", "running_var"):  # the same on every rank: the global batch's
        for r in ranks:
            torch.testing.assert_close(r[name], ref[name], rtol=1e-12, atol=1e-14, msg=name)
    m = bn()
    m(d["x"])
    torch.testing.assert_close(ranks[0]["eval_y"], m.eval()(d["x"]).detach())


def test_exact_mpl_steps_on_two_processes_equal_one_process(ranks):
    """Teacher and student with BatchNorm, the exact meta-gradient by the tangent tape: 2 steps
    on 2 processes with GlobalBatchNorm = 2 steps in one process with BatchNorm."""
    want = mpl_results(1, 0, global_bn=False)
    for r in ranks:
        assert bool(r["jvp_path_is_tape"])
        for key, value in want.items():
            if key == "jvp_path_is_tape":
                continue
            torch.testing.assert_close(r[key], value, rtol=1e-9, atol=1e-12, msg=key)
    # and the teacher did move (the comparison is not between two untouched models)
    assert not torch.equal(want["teacher.0.weight"], net(1).state_dict()["0.weight"])


def test_one_process_is_plain_batchnorm():
    d = data()
    ref, got = bn(), convert_global_batchnorm(nn.Sequential(bn()))[0]
    assert isinstance(got, GlobalBatchNorm)
    for a, b in zip(
        layer_results(ref, d["x"], d["dx"], d["dgamma"], d["cotangent"]).values(),
        layer_results(got, d["x"], d["dx"], d["dgamma"], d["cotangent"]).values(),
    ):
        assert torch.equal(a, b)


def test_conversion_keeps_the_parameters_and_buffers():
    model = net(3)
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert convert_global_batchnorm(model) is model
    assert isinstance(model[1], GlobalBatchNorm) and model[1].momentum == 0.1
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert optimizer.param_groups[0]["params"][2] is model[1].weight
    with pytest.raises(ConfigError, match="BatchNorm children"):
        convert_global_batchnorm(nn.BatchNorm1d(3))
