"""Distributed-data-parallel helpers so training runs alone or under ``torchrun``.

``torchrun --nproc_per_node N -m FastSAM3DLib.train.cli interactive ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`setup` reads them, picks the
backend (NCCL on CUDA, gloo on CPU) and the device. Without them everything degrades to a single
process with no process group. Only rank 0 writes checkpoints, metrics and plots
(:func:`is_main`); every rank draws its own samples (seeded with its rank).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import FastSAM3DInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size, local rank and torch device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the process group if launched by torchrun (or spawned with the env variables set).

    Arguments:
      device: "auto" (CUDA ``LOCAL_RANK`` if available, else CPU), "cpu" or "cuda".
      timeout_s: collective timeout.

    Returns:
      this process's :class:`DistInfo`.

    Raises:
      FastSAM3DInputError: "cuda" asked for where CUDA is not available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise FastSAM3DInputError("--device cuda: CUDA is not available here (use --device cpu or auto)")
    torch_device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        logger.info("rank %d/%d: process group up (%s) on %s", rank, world_size, backend, torch_device)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def cleanup() -> None:
    """Destroy the process group if one is up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, info: Optional[DistInfo] = None) -> float:
    """The mean of a float over ranks (the value itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=info.device if info and info.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def broadcast_ints(values: Sequence[int], info: Optional[DistInfo] = None) -> List[int]:
    """Rank 0's integers, on every rank (e.g. "time to stop", "stopped by signal N"); the values themselves without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [int(v) for v in values]
    tensor = torch.tensor([int(v) for v in values], dtype=torch.int64, device=info.device if info and info.device.type == "cuda" else "cpu")
    dist.broadcast(tensor, src=0)
    return [int(v) for v in tensor.tolist()]
