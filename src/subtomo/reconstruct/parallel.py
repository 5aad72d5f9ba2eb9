"""Batch parallelism on CPU: one single-threaded torch worker per core instead of OpenMP teams.

Extraction and insertion work on batches of a few hundred tilt images; PyTorch runs
``index_add_`` (the scatter of insertion) on one thread, and its OpenMP teams spin at every
barrier, which collapses when other processes share the cores. Running whole batches on
``n`` Python threads (torch releases the GIL inside its kernels), each with torch limited to
one thread, keeps every core busy on independent work. Accumulating workers write into their
own sums, added up at the end, so results do not depend on scheduling.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

__all__ = ["MAX_WORKERS", "cpu_workers", "map_batches"]

T = TypeVar("T")

#: Upper bound on worker threads (each may hold private accumulators).
MAX_WORKERS = 8


def cpu_workers(device: torch.device | str, n_items: int) -> int:
    """Worker threads for ``n_items`` batches on ``device``: torch's intra-op thread count on
    CPU (at most :data:`MAX_WORKERS` and ``n_items``), 1 on a GPU."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), MAX_WORKERS, n_items))


def map_batches(fn: Callable[[int, T], None], items: Sequence[T], workers: int) -> None:
    """Call ``fn(worker, item)`` for every item, item ``i`` on worker ``i % workers``.

    With ``workers > 1`` the workers are threads (the caller's thread is worker 0) and torch
    runs single-threaded while they work (restored afterwards); ``fn`` must only write to
    state private to its ``worker`` index. The first exception raised is re-raised here.
    """
    if workers <= 1 or len(items) <= 1:
        for item in items:
            fn(0, item)
        return
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            for item in items[worker::workers]:
                if errors:
                    return
                fn(worker, item)
        except BaseException as exc:
            errors.append(exc)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # new threads start with the global count: 1
    try:
        threads = [threading.Thread(target=run, args=(k,)) for k in range(1, workers)]
        for t in threads:
            t.start()
        run(0)
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(threads_before)
    if errors:
        raise errors[0]
