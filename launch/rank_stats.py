"""Small values shared across ranks (losses, byte counts) and the optimizer-memory report.

The collectives move tensors, never Python objects: ``all_gather_object`` needs numpy, which
may be absent. Tensors live on the rank's device (NCCL moves only CUDA tensors).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "broadcast_int",
    "gather_ints",
    "mean_over_ranks",
    "optimizer_state_bytes",
    "replicated_rmsprop_bytes",
    "report_memory",
]

log = logging.getLogger("train")

MIB = 1024**2


def mean_over_ranks(values: torch.Tensor) -> list[float]:
    """The element-wise mean of ``values`` over the ranks. Collective."""
    summed = values.detach().to(torch.float64)
    dist.all_reduce(summed)
    return (summed / dist.get_world_size()).tolist()


def gather_ints(value: int, device: torch.device) -> list[int]:
    """Every rank's ``value``, in rank order. Collective."""
    world_size = dist.get_world_size()
    everyone = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(everyone, torch.tensor([value], dtype=torch.int64, device=device))
    return [int(t.item()) for t in everyone]


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank. Collective."""
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state (ShardedRMSprop's state views are its shard).

    0-d tensors (the ``step`` counters) are bookkeeping and left out, here and below.
    """
    return sum(
        value.numel() * value.element_size()
        for p_state in opt.state.values()
        for value in p_state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )


def replicated_rmsprop_bytes(model: nn.Module, *, momentum: float, centered: bool) -> int:
    """What ``torch.optim.RMSprop`` with these options holds on every rank.

    ``square_avg`` always, ``momentum_buffer`` with momentum, ``grad_avg`` when centered.
    """
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return param_bytes * (1 + int(momentum > 0) + int(centered))


def report_memory(
    opt: torch.optim.Optimizer, model: nn.Module, *, momentum: float, centered: bool,
    device: torch.device,
) -> tuple[int, int]:
    """Log every rank's optimizer bytes beside the replicated figure; return rank 0's and it.

    Call it after a step: the state is created by the first one. Collective.
    """
    per_rank = gather_ints(optimizer_state_bytes(opt), device)
    replicated = replicated_rmsprop_bytes(model, momentum=momentum, centered=centered)
    for rank, nbytes in enumerate(per_rank):
        log.info(
            "optimizer state rank %d: %.4f MiB sharded vs %.4f MiB replicated "
            "torch.optim.RMSprop (%.1f%%)",
            rank, nbytes / MIB, replicated / MIB, 100 * nbytes / max(replicated, 1),
        )
    log.info(
        "optimizer state all %d ranks: %.4f MiB sharded vs %.4f MiB replicated",
        len(per_rank), sum(per_rank) / MIB, replicated * len(per_rank) / MIB,
    )
    return per_rank[0], replicated
