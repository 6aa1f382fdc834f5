"""Devices and data-parallel training through `torchrun`'s environment variables.

`torchrun --nproc-per-node N -m vilbert pretrain ...` sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`MASTER_ADDR` and `MASTER_PORT`; `init_distributed` joins the process group (NCCL on GPUs, gloo on
CPUs) and pins each rank to its GPU. Each rank reads its own slice of the cache (the loader's
`rank`/`world_size`), DDP averages gradients, and only rank 0 writes files. Without those variables
everything here is a no-op for a single process. Generic: fine-tuning uses the same pieces.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vilbert.errors import UsageError

__all__ = [
    "DEVICES",
    "DistContext",
    "resolve_device",
    "init_distributed",
    "shutdown_distributed",
    "wrap_ddp",
    "all_reduce_sums",
    "any_rank",
    "all_gather_objects",
]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True, kw_only=True)
class DistContext:
    """Where this process stands: its rank among `world_size` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, metrics and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu` or `cuda` (the `local_rank`-th GPU).

    Raises:
        UsageError: An unknown choice, or `cuda` without a usable GPU.
    """
    if choice not in DEVICES:
        raise UsageError(f"--device {choice!r} is invalid; valid: {', '.join(DEVICES)}")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group when launched by `torchrun` (WORLD_SIZE > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    log.info("rank %d of %d on %s (%s)", rank, world_size, dev, backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, ctx: DistContext, *, find_unused_parameters: bool = True) -> nn.Module:
    """`module` in `DistributedDataParallel` when distributed, else itself.

    `find_unused_parameters` defaults to True: a pretraining run leaves heads unused (the classifier,
    the MIM projection when MIM is off).
    """
    if not ctx.distributed:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def all_reduce_sums(values: Mapping[str, float | torch.Tensor], ctx: DistContext) -> dict[str, float]:
    """Sum each value over all ranks (one collective for the whole dict)."""
    keys = sorted(values)
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device(ctx))
    if ctx.distributed:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return dict(zip(keys, flat.tolist(), strict=True))


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is True on any rank (a stop request, say)."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device(ctx))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects; small ones: RNG states)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _collective_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")
