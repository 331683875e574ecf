"""Training on several processes: the torchrun environment, the process group and the rules all ranks share.

``torchrun --standalone --nproc-per-node N -m ExtremeAugLogic train WORKSPACE ...`` starts N
copies of the trainer; each finds its place here (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, set by torchrun) and they form one process group: NCCL on CUDA GPUs
(one GPU per process, the one of its local rank), gloo on the CPU. The model is wrapped in
PyTorch's ``DistributedDataParallel``, which averages the gradients; nothing here reduces
gradients by hand.

The rules the trainer keeps with this module:

- **Rank 0 alone owns the workspace**: it takes ``train.lock``, plans the run, creates or
  resumes the version, and writes ``status.json``, ``log.csv``, checkpoints, the model, the
  manifest and ``version.json``, and validates. ``lead`` runs such a step on rank 0 and hands
  its result (or its refusal) to the other ranks, which only read the workspace.
- **Decisions are collective**: every iteration ``agree`` gives all ranks the same budget
  fraction (that of the rank furthest on) and the same stop flag (set when any rank got
  SIGTERM/SIGINT), so all ranks stop at the same iteration and rank 0 writes one checkpoint.
- **Batch and learning rate**: each rank draws ``batch_size`` samples per step from its own
  random stream (``recipes.base.stream_seed``), so a step trains on ``batch_size x world size``
  samples; the learning rate is the same as on one process (Adam, gradients averaged), and an
  ``--iterations`` budget counts optimiser steps.

Without torchrun (no ``WORLD_SIZE``, or a world of one) nothing starts: no process group, no
wrapper, and ``lead``/``agree`` just run locally.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ExtremeAugLogic.devices import resolve_device
from ExtremeAugLogic.errors import InputError

# How long a rank waits for the others at a collective (rank 0 validates alone meanwhile).
GROUP_TIMEOUT = timedelta(minutes=30)


class LeaderFailed(Exception):
    """Raised on the other ranks when rank 0 failed a step it leads; rank 0 reports why."""


@dataclass
class Place:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str | None = None      # set by ``start`` for a world of several processes
    started: bool = False

    @classmethod
    def from_environment(cls, environ=None) -> "Place":
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world = int(env["WORLD_SIZE"])
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", rank))
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        except ValueError:
            raise InputError("WORLD_SIZE, RANK, LOCAL_RANK: not whole numbers; start several "
                             "processes with torchrun") from None
        if world < 1 or not 0 <= rank < world or not 0 <= local_rank < local_world:
            raise InputError(f"RANK {rank} of WORLD_SIZE {world}: not a valid place; start several "
                             "processes with torchrun")
        return cls(rank, world, local_rank, local_world)

    @property
    def active(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes to the workspace."""
        return self.rank == 0

    # ------------------------------------------------------------------ the group
    def start(self, device_name: str) -> None:
        """Pick this rank's device and join the process group (only for a world of several)."""
        device = resolve_device(device_name)
        kind = torch.device(device).type
        if kind == "mps":
            raise InputError("--device mps: training on several processes needs CUDA GPUs or the CPU")
        if kind == "cuda":
            if device != "cuda":
                raise InputError(f"--device {device}: with torchrun give --device cuda (or auto); "
                                 "each process takes the GPU of its local rank")
            count = torch.cuda.device_count()
            if self.local_world_size > count:
                raise InputError(f"--nproc-per-node {self.local_world_size}: this machine has {count} CUDA GPU(s); "
                                 "start at most one process per GPU")
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=GROUP_TIMEOUT, device_id=torch.device(device))
        else:
            dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
        self.device, self.started = device, True

    def close(self) -> None:
        if self.started:
            self.started = False
            dist.destroy_process_group()

    # ------------------------------------------------------------------ shared steps
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel (its weights broadcast from rank 0); itself on one process."""
        if not self.active:
            return model
        ids = [torch.device(self.device).index] if torch.device(self.device).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def lead(self, work):
        """``work()`` run on rank 0, its result handed to every rank.

        A refusal (InputError) on rank 0 is raised on every rank with the same text; any other
        failure raises ``LeaderFailed`` on the other ranks. On one process: ``work()``.
        """
        if not self.active:
            return work()
        if self.is_main:
            try:
                result = work()
            except InputError as exc:
                self._share(("refused", str(exc)))
                raise
            except BaseException:
                self._share(("failed", None))
                raise
            self._share(("ok", result))
            return result
        outcome, value = self._share(None)
        if outcome == "refused":
            raise InputError(value)
        if outcome == "failed":
            raise LeaderFailed("rank 0 failed; its status.json says why")
        return value

    def agree(self, fraction: float, stop: bool) -> tuple[float, bool]:
        """The same (budget fraction, stop) on every rank: the largest fraction, stop if any rank stops."""
        if not self.active:
            return fraction, stop
        values = torch.tensor([float(fraction), float(bool(stop))], dtype=torch.float64, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return float(values[0]), bool(values[1] > 0)

    def mean(self, value) -> float:
        """The mean of ``value`` (a number or a one-element tensor) over the ranks."""
        if not self.active:
            return float(value)
        total = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).to(self.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return float(total[0]) / self.world_size

    def _share(self, value):
        box = [value]
        dist.broadcast_object_list(box, src=0, device=torch.device(self.device))
        return box[0]


@contextlib.contextmanager
def join(device_name: str):
    """This process's ``Place``; under torchrun with several processes, in the process group until the end."""
    place = Place.from_environment()
    if place.active:
        place.start(device_name)
    try:
        yield place
    finally:
        place.close()
