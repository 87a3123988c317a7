"""NonFiniteWatch: every step's metrics checked for NaN/Inf without a host read, reported at the
steps that log, evaluate or checkpoint with the metric and the first step it went wrong."""

from __future__ import annotations

import math

import pytest
import torch
from test_host_syncs import HostReads

from metapl.errors import NonFiniteLossError
from metapl.train.guards import NonFiniteWatch

NAN, INF = float("nan"), float("inf")


def check_once(metrics: dict, step: int) -> None:
    """One step's metrics through the engine's watch, checked at that step (as a run that logs
    every step checks them)."""
    watch = NonFiniteWatch(step - 1)
    watch.observe(metrics)
    watch.check(metrics, step)


def _observed(since: int, *steps: dict) -> NonFiniteWatch:
    watch = NonFiniteWatch(since)
    for metrics in steps:
        watch.observe(metrics)
    return watch


def test_a_clean_stretch_passes_and_the_next_one_counts_from_its_check():
    ok = {"loss": torch.tensor(1.0), "lr": 0.1}
    watch = _observed(10, ok, ok, ok)
    watch.check(ok, 13)
    watch.observe(ok)
    watch.observe({"loss": torch.tensor(NAN), "lr": 0.1})
    with pytest.raises(NonFiniteLossError, match=r"^step 15: loss is nan; the run stopped"):
        watch.check({"loss": torch.tensor(NAN)}, 15)


def test_the_earliest_bad_step_is_named_with_what_the_metric_is_now():
    watch = _observed(
        20,
        {"a_loss": torch.tensor(1.0), "b_loss": torch.tensor(1.0)},
        {"a_loss": torch.tensor(1.0), "b_loss": torch.tensor(-INF)},  # step 22
        {"a_loss": torch.tensor(NAN), "b_loss": torch.tensor(NAN)},
    )
    now = {"a_loss": torch.tensor(NAN), "b_loss": torch.tensor(2.0)}
    with pytest.raises(
        NonFiniteLossError,
        match=r"^step 22: b_loss was not finite \(found at step 23, where it is finite again\);",
    ):
        watch.check(now, 23)
    with pytest.raises(NonFiniteLossError, match=r"^step 22: b was not finite .* it is nan\)"):
        _observed(
            20, {"b": torch.tensor(0.0)}, {"b": torch.tensor(INF)}, {"b": torch.tensor(NAN)}
        ).check({"b": torch.tensor(NAN)}, 23)


def test_a_check_after_an_error_starts_afresh():
    watch = _observed(0, {"loss": torch.tensor(NAN)})
    with pytest.raises(NonFiniteLossError):
        watch.check({}, 1)
    watch.check({}, 1)  # what was reported is not reported again
    watch.observe({"loss": torch.tensor(INF)})
    with pytest.raises(NonFiniteLossError, match=r"^step 2: loss is inf;"):
        watch.check({"loss": torch.tensor(INF)}, 2)


def test_ties_go_to_the_first_name_and_any_element_of_a_vector_counts():
    watch = _observed(0, {"z": torch.tensor(NAN), "m": torch.tensor([1.0, INF]), "y": 1.0})
    with pytest.raises(NonFiniteLossError, match=r"^step 1: m contains inf;"):
        watch.check({"m": torch.tensor([1.0, INF])}, 1)


def test_metrics_that_change_names_and_plain_numbers_are_watched_too():
    """Fine-tuning's metrics follow the method's (a new set of names); a learning rate or a
    fraction may be a Python number."""
    watch = _observed(
        100,
        {"student_loss": torch.tensor(1.0), "mask": 0.5},
        {"finetune_loss": torch.tensor(1.0), "mask": NAN},  # step 102, a plain number
        {"finetune_loss": torch.tensor(NAN), "mask": 0.5},
    )
    with pytest.raises(
        NonFiniteLossError,
        match=r"^step 102: mask was not finite \(found at step 103, where it is finite",
    ):
        watch.check({"mask": 0.5}, 103)
    watch = _observed(
        100, {"a": torch.tensor(1.0)}, {"b": torch.tensor(1.0)}, {"a": torch.tensor(NAN)}
    )
    with pytest.raises(NonFiniteLossError, match=r"^step 103: a is nan"):
        watch.check({"a": torch.tensor(NAN)}, 103)


def test_the_earliest_step_over_ranks_decides():
    """Another rank saw b_loss go bad at its first step, this one at its second: both report the
    other rank's step (every rank passes its values in the same order: the names sorted)."""
    seen = []

    def earliest_over_ranks(values: list[int]) -> list[int]:
        seen.append(list(values))
        other = [math.inf, 1]  # a_loss always finite there, b_loss bad at its first step
        return [int(min(v, o)) for v, o in zip(values, other)]

    watch = _observed(
        50,
        {"b_loss": torch.tensor(1.0), "a_loss": torch.tensor(1.0)},
        {"b_loss": torch.tensor(NAN), "a_loss": torch.tensor(1.0)},
    )
    with pytest.raises(
        NonFiniteLossError, match=r"^step 51: b_loss was not finite \(found at step 52"
    ):
        watch.check({"b_loss": torch.tensor(NAN)}, 52, earliest_over_ranks)
    assert seen[0][1] == 2 and seen[0][0] > 10**18  # [a_loss: never, b_loss: 2nd observation]
    clean = _observed(50, {"a_loss": torch.tensor(1.0)})
    clean.check({}, 51, lambda values: values)  # all ranks clean: no error


def test_observing_reads_nothing_on_the_host():
    """On a GPU a read would make the CPU wait every step: observe keeps its flags on the device."""
    watch = NonFiniteWatch(0)
    metrics = {"loss": torch.tensor(NAN), "acc": torch.tensor([1.0, 2.0]), "lr": 0.1}
    with HostReads() as reads:
        for _ in range(3):
            watch.observe(metrics)
    assert not reads.seen, reads.seen
    with pytest.raises(NonFiniteLossError, match="^step 1: loss was not finite"):
        watch.check(metrics, 3)


def test_a_new_set_of_names_is_watched_under_its_own_names():
    """After the names change (pre-training's losses, then fine-tuning's), a bad metric of the new
    set is named as itself, not as the metric that held its place in the previous set."""
    watch = _observed(
        100,
        {"student_loss": torch.tensor(1.0), "teacher_loss": torch.tensor(1.0)},
        {"finetune_loss": torch.tensor(NAN)},  # step 102
    )
    with pytest.raises(NonFiniteLossError, match=r"^step 102: finetune_loss is nan;"):
        watch.check({"finetune_loss": torch.tensor(NAN)}, 102)


def test_a_plain_number_bad_at_several_steps_is_named_at_its_first():
    watch = _observed(10, {"lr": 0.1}, {"lr": NAN}, {"lr": INF}, {"lr": NAN})  # first at step 12
    with pytest.raises(
        NonFiniteLossError, match=r"^step 12: lr was not finite \(found at step 14, where it is nan"
    ):
        watch.check({"lr": NAN}, 14)
