"""LiveTensorMemory counts the bytes of live tensor storages on a device, once per storage."""

import torch

from metapl.live_memory import LiveTensorMemory


def test_counts_new_storages_once_and_takes_off_freed_ones():
    with LiveTensorMemory("cpu") as live:
        a = torch.empty(1000)  # 4,000 bytes
        view = a[10:]  # the same storage: not counted again
        assert live.bytes == 4000
        b = a * 2
        assert live.bytes == 8000
        del b
        assert live.bytes == 4000 and live.peak_bytes == 8000
        del a
        assert live.bytes == 4000  # the view keeps the storage
        del view
        assert live.bytes == 0 and live.peak_bytes == 8000
        live.reset_peak()
        assert live.peak_bytes == 0 and live.peak_mib == 0.0


def test_sees_autograds_backward_and_in_place_ops_add_nothing():
    with LiveTensorMemory("cpu") as live:
        x = torch.ones(256, 256, requires_grad=True)  # 256 KiB
        live.reset_peak()
        y = x.sin()  # the output, saved (with x) for the backward
        z = (y * y).sum()
        after_forward = live.bytes
        z.backward()  # cos(x), the incoming gradients and x.grad: above the forward's
        assert live.peak_bytes > after_forward
        assert x.grad is not None
        grad_storage = x.grad.untyped_storage().nbytes()
        before = live.bytes
        x.grad.mul_(2)  # in place: no new storage
        assert live.bytes == before
        del y, z
        assert live.bytes == 2 * grad_storage  # x and x.grad


def test_counts_only_its_device_and_nothing_made_before_it():
    made_before = torch.zeros(10_000)
    with LiveTensorMemory("meta") as live:
        torch.zeros(10_000) + 1  # a CPU tensor: another device
        twice = made_before * 2  # noqa: F841
        assert live.peak_bytes == 0
        on_meta = torch.empty(100, device="meta")  # counted: the device asked for
        assert live.bytes == 400
        del on_meta
    with LiveTensorMemory("cpu") as live:
        del made_before  # freed, but never counted: nothing to take off
        assert live.bytes == 0
