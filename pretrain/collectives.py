"""The few small collectives the stages use, each a no-op without a process group (one process)."""
from __future__ import annotations

import torch


def any_rank(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True on every rank when `flag` (a bool, or a one-element tensor on `device`) is true on any rank
    (itself a barrier); the flag alone without a group."""
    value = flag.float().reshape(1) if isinstance(flag, torch.Tensor) else torch.tensor([float(flag)], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over every rank, in float64 (sums of token counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.tolist()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather_objects(value, world_size: int | None = None) -> list:
    """`value` (picklable) of every rank, in rank order; [value] without a process group."""
    if not torch.distributed.is_initialized() or world_size == 1:
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def context_group(rank: int, world_size: int, size: int):
    """This rank's ContextParallel (models.context_parallel) when sequences are split over `size` > 1 ranks, else
    None. Groups are consecutive ranks (0..K-1, K..2K-1, ...); every rank creates every group, as
    torch.distributed requires."""
    if size == 1:
        return None
    from ssmforge.models.context_parallel import ContextParallel

    groups = [torch.distributed.new_group(list(range(start, start + size))) for start in range(0, world_size, size)]
    return ContextParallel(groups[rank // size], rank % size, size)
