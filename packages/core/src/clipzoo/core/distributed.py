"""World information and an exact, differentiable all-gather for global negatives.

Contrastive losses compare each sample with every sample on every rank. The gather here
keeps the autograd graph (its backward sums the incoming gradients over ranks and returns
each rank its own slice), so with DDP's gradient averaging every parameter's gradient on
W processes equals one process on the concatenated batch. Ranks may hold different
numbers of samples (an uneven last batch): rows are padded for the collective and the
padding is dropped again, so nothing needs ``drop_last``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_info() -> WorldInfo:
    """The current process's place: from torch.distributed when initialised, else torchrun's
    or SLURM's environment variables, else a single process."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return WorldInfo(dist.get_rank(), dist.get_world_size(), local)
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return WorldInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return WorldInfo()


def init_distributed(backend: str | None = None) -> WorldInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo otherwise)."""
    info = world_info()
    if info.is_distributed and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return world_info()


@dataclass
class Gathered:
    """The concatenation over ranks of one tensor, and where this rank's rows start."""

    all: torch.Tensor
    offset: int  # index of this rank's first row in ``all``
    total: int  # rows over all ranks


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, padded: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        out = padded.new_empty((world * padded.shape[0], *padded.shape[1:]))
        dist.all_gather_into_tensor(out, padded.contiguous())
        return out.view(world, *padded.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def gather_batch(x: torch.Tensor) -> Gathered:
    """All-gather ``x`` (rows = samples) over the default group, keeping gradients."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Gathered(x, 0, x.shape[0])
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes_t = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    all_sizes = sizes_t.new_empty(world)
    dist.all_gather_into_tensor(all_sizes, sizes_t)
    sizes = all_sizes.tolist()
    longest = max(sizes)
    padded = x
    if x.shape[0] < longest:
        padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    stacked = _AllGatherWithGrad.apply(padded)
    rows = [stacked[r, : sizes[r]] for r in range(world)]
    return Gathered(torch.cat(rows), sum(sizes[:rank]), sum(sizes))
