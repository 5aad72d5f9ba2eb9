"""Runs over several processes with ``torch.distributed`` (``torchrun``, SLURM ``srun``).

The same code runs on every rank (SPMD). A job splits its work, particle batches, tilt
series or orientations, with :func:`shard`, sums its accumulators with ``all_reduce``
(gloo on CPU, NCCL on CUDA), gathers per-particle results with :func:`all_gather_object`,
and lets rank 0 alone touch the disk (:func:`is_main`; :func:`subtomo.io.atomic_path`
discards other ranks' writes). A single process is the same code with world size 1: every
function here is then a no-op or the identity.

Launch: ``torchrun --nproc_per_node N $(which subtomo) refine3d ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; under ``srun`` the
``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` variables stand in for the first three
and ``MASTER_ADDR`` defaults to the first host of ``SLURM_JOB_NODELIST``
(``MASTER_PORT`` to 29500).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

__all__ = [
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast_object",
    "init_from_environment",
    "is_distributed",
    "is_main",
    "local_rank",
    "own_files",
    "rank",
    "shard",
    "shard_groups",
    "world_size",
    "writes_files",
]

T = TypeVar("T")
K = TypeVar("K")

_own_files = 0  # depth of open own_files() blocks (threads of this process share it)

#: Seconds a collective waits for the other ranks before the job fails (a rank that died
#: without closing its connections).
TIMEOUT_S = float(os.environ.get("SUBTOMO_DIST_TIMEOUT", "1800"))


def _group() -> Any:
    """``torch.distributed`` when its process group runs, else ``None`` (never imports torch:
    a group exists only if a job imported it)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    dist = _group()
    return dist is not None and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    dist = _group()
    return dist.get_rank() if dist is not None else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    dist = _group()
    return dist.get_world_size() if dist is not None else 1


def is_main() -> bool:
    """Whether this process writes files and prints progress (rank 0)."""
    return rank() == 0


@contextlib.contextmanager
def own_files() -> Iterator[None]:
    """Inside this block every rank writes its files: those of the items :func:`shard` gave
    it (a tilt series' tomogram, a particle's stack, a movie's sum), distinct on every rank,
    so per-item output is written in parallel rather than sent to rank 0 (§22). Files that
    several ranks compute alike (STAR tables, maps, reports) stay rank 0's."""
    global _own_files
    _own_files += 1
    try:
        yield
    finally:
        _own_files -= 1


def writes_files() -> bool:
    """Whether this process's writes reach the disk: rank 0, or any rank in :func:`own_files`."""
    return _own_files > 0 or is_main()


def local_rank() -> int:
    """Rank on this node (``LOCAL_RANK`` or ``SLURM_LOCALID``; 0 otherwise): the GPU index."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def _environment() -> tuple[int, int] | None:
    """``(rank, world size)`` from torchrun's or SLURM's variables; ``None`` for one process."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        r, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ:
        r, n = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        os.environ.setdefault("MASTER_ADDR", _first_host(os.environ.get("SLURM_JOB_NODELIST")))
        os.environ.setdefault("MASTER_PORT", "29500")
    else:
        return None
    return (r, n) if n > 1 else None


def _first_host(nodelist: str | None) -> str:
    """First host of a SLURM node list (``node[03-05,07],gpu1`` -> ``node03``)."""
    if not nodelist:
        return "localhost"
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
    return m.group(1) + (m.group(2) or "") if m else "localhost"


def _terminate(signum: int, _frame: Any) -> None:
    """torchrun ends the other ranks with SIGTERM when one fails: fail the job cleanly."""
    raise SystemExit(f"stopped by signal {signum}: another rank failed (see its error)")


def init_from_environment(device: str = "auto") -> bool:
    """Start the process group when launched by torchrun or srun with more than one rank.

    Backend NCCL when ``device`` is CUDA (or ``auto`` with a GPU), each rank on GPU
    :func:`local_rank`; gloo otherwise, with torch's CPU threads shared out among the ranks
    of this node. Returns whether a group was started.
    """
    env = _environment()
    if env is None or is_distributed():
        return False
    import torch

    r, n = env
    cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    if cuda:
        torch.cuda.set_device(local_rank())
    else:
        per_node = int(
            os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", n))
        )
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, per_node)))
    torch.distributed.init_process_group(
        "nccl" if cuda else "gloo",
        rank=r,
        world_size=n,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    signal.signal(signal.SIGTERM, _terminate)
    return True


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's share of ``items``: every ``world_size()``-th one from ``rank()``
    (round robin, so unequal costs along the list spread evenly)."""
    return items[rank() :: world_size()]


def shard_groups(groups: Sequence[tuple[K, Sequence[T]]]) -> list[tuple[K, Sequence[T]]]:
    """This rank's share of ``(key, items)`` groups (a tomogram and its particles), balanced
    by item count while keeping groups whole where it can: the items of all groups, in order,
    are cut into ``world_size()`` runs of equal length (within one item), and a rank gets the
    pieces of the groups its run covers. So each rank reads only the tilt series of its
    particles; a group is split only where a cut falls inside it (at most
    ``world_size() - 1`` groups, e.g. the particles of a single tomogram). Empty pieces are
    left out."""
    total = sum(len(items) for _, items in groups)
    first, end = total * rank() // world_size(), total * (rank() + 1) // world_size()
    out: list[tuple[K, Sequence[T]]] = []
    start = 0  # index of the group's first item in the concatenated items
    for key, items in groups:
        lo, hi = max(first - start, 0), min(end - start, len(items))
        if lo < hi:
            out.append((key, items[lo:hi]))
        start += len(items)
    return out


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    dist = _group()
    if dist is not None:
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects; no-op for one process)."""
    dist = _group()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(tensor: Any, op: str = "sum") -> Any:
    """``tensor`` reduced in place over the ranks with ``op`` (``sum``, ``max``, ``min``) and
    returned (no-op for one process)."""
    dist = _group()
    if dist is not None:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()))
    return tensor


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    dist = _group()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
