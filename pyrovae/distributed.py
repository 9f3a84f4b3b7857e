"""Data-parallel runs: the device of ``--device`` and this process's place among ``torchrun``'s processes.

Without ``torchrun`` a run is one process (world size 1) and every collective below returns
its argument. Under ``torchrun`` each process joins the default process group (gloo on CPU, nccl
on GPU); training sums gradients and metrics over it, and ``evaluate`` gives each process a
share of the examples. The command line and :class:`~pyrovae.training.Trainer` both use it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist

__all__ = ["ProcessGroup", "resolve_device", "world_size", "rank"]


def world_size() -> int:
    """How many processes ``torchrun`` started (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 without ``torchrun``): rank 0 alone writes and prints."""
    return int(os.environ.get("RANK", "0"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of ``--device name`` (``auto``, ``cpu`` or ``cuda``; ``auto`` picks CUDA where there is one),
    the GPU of ``local_rank`` for CUDA; ``ValueError`` for ``cuda`` without a visible device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device must be auto, cpu or cuda (got {name!r})")


class ProcessGroup:
    """This process's place in a data-parallel run (world size 1 without ``torchrun``), on the
    device of ``--device device_name``; joins the default process group when ``torchrun``
    started more than one process and none is joined yet (and leaves it in :meth:`close`)."""

    def __init__(self, device_name: str):
        self.world = world_size()
        self.rank = rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device_name, self.local_rank)
        self.owns_group = False
        if self.world > 1 and not tdist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            tdist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes and prints."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (a collective: all must call it)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        """``[obj of rank 0, obj of rank 1, ...]`` on every process (a collective)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def raise_any(self, error: str | None) -> None:
        """Raise ``ValueError`` on every process if any process passes an error message
        (a collective: all processes must call it)."""
        errors = [e for e in self.gather(error) if e]
        if errors:
            raise ValueError(errors[0])

    def close(self, finished: bool = True):
        """Leave the process group. After a finished run every rank first waits for the others:
        a rank that tears gloo down while rank 0 is still evaluating the test split could
        abort ("terminate called without an active exception", seen in 1 of 7 benchmark runs).
        After an error no barrier: the other ranks may never reach it."""
        if self.owns_group and tdist.is_initialized():
            if finished:
                tdist.barrier()
            tdist.destroy_process_group()
