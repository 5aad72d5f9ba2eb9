"""Batch parallelism on CPU worker threads (subtomo.reconstruct.parallel)."""

from __future__ import annotations

import threading

import pytest
import torch

from subtomo.reconstruct import FourierAccumulator
from subtomo.reconstruct.parallel import map_batches
from subtomo.reconstruct.particles import _merge_private, _private_accumulators


def test_map_batches_runs_each_item_once_on_its_worker_and_restores_threads():
    """Every item runs exactly once, item i on worker i % workers, on as many distinct
    threads, with torch single-threaded inside and its thread count restored afterwards;
    otherwise private accumulators would be shared between threads (races) or the caller's
    torch would be left single-threaded."""
    threads_before = torch.get_num_threads()
    seen: dict[int, tuple[int, threading.Thread, int]] = {}

    def fn(worker: int, item: int) -> None:
        seen[item] = (worker, threading.current_thread(), torch.get_num_threads())

    map_batches(fn, list(range(7)), 3)
    assert sorted(seen) == list(range(7))
    assert all(seen[i][0] == i % 3 for i in seen)
    assert len({id(seen[i][1]) for i in seen}) == 3  # the Thread objects are kept alive
    assert {seen[i][2] for i in seen} == {1}
    assert torch.get_num_threads() == threads_before


def test_map_batches_reraises_a_worker_error():
    """An exception in a worker thread reaches the caller (a job must fail, not write a
    partial map) and the thread count is still restored."""
    threads_before = torch.get_num_threads()

    def fn(worker: int, item: int) -> None:
        if item == 3:
            raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        map_batches(fn, list(range(6)), 2)
    assert torch.get_num_threads() == threads_before


def test_private_accumulators_sum_to_the_serial_insertion():
    """Slices inserted on two workers into private accumulators and merged equal the same
    slices inserted serially into one (sums are order-independent up to rounding); a lost
    or doubled private sum would change the totals."""
    gen = torch.Generator().manual_seed(0)
    box, b = 16, 40
    slices = torch.randn(b, box, box // 2 + 1, dtype=torch.complex64, generator=gen)
    weights = slices.real.abs()
    q, _ = torch.linalg.qr(torch.randn(b, 3, 3, generator=gen))
    serial = FourierAccumulator(box, padding=2.0)
    serial.insert(slices, weights, q)
    accs = [FourierAccumulator(box, padding=2.0)]
    private = _private_accumulators(accs, 2)
    parts = torch.arange(b).tensor_split(4)

    def insert(worker: int, idx: torch.Tensor) -> None:
        private[worker][0].insert(slices[idx], weights[idx], q[idx])

    map_batches(insert, parts, 2)
    _merge_private(accs, private)
    assert torch.allclose(accs[0].data, serial.data, atol=1e-4)
    assert torch.allclose(accs[0].weight, serial.weight, atol=1e-4)
    assert float(serial.weight.sum()) > 0
