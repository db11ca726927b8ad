"""Small values shared across ranks (losses, byte counts) and the per-rank memory report.

The collectives move tensors, never Python objects: ``all_gather_object`` needs numpy, which
may be absent. Tensors live on the rank's device (NCCL moves only CUDA tensors).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sharded_rmsprop.shards import state_keys_for

__all__ = [
    "MemoryFigures",
    "all_ranks_true",
    "broadcast_ints",
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


def gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (the same length on every rank), in rank order. Collective."""
    world_size = dist.get_world_size()
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    return [t.tolist() for t in everyone]


def broadcast_ints(values: list[int], device: torch.device) -> list[int]:
    """Rank 0's ``values`` (any number of them) on every rank. Collective."""
    count = torch.tensor([len(values)], dtype=torch.int64, device=device)
    dist.broadcast(count, src=0)
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    if dist.get_rank() != 0:
        tensor = torch.empty(int(count.item()), dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank. Collective."""
    tensor = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state (ShardedRMSprop's state views are its shard,
    master weights included).

    0-d tensors (the ``step`` counters) are bookkeeping and left out, here and below.
    """
    return sum(
        value.numel() * value.element_size()
        for p_state in opt.state.values()
        for value in p_state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )


def _trained(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def replicated_rmsprop_bytes(model: nn.Module, *, momentum: float, centered: bool) -> int:
    """What ``torch.optim.RMSprop`` holds on every rank when the model trains in float32.

    ``square_avg`` always, ``momentum_buffer`` with momentum, ``grad_avg`` when centered;
    4 bytes an element (or the parameters' own size if wider), whatever dtype the model
    has here: the baseline is plain float32 training.
    """
    buffers = state_keys_for({"momentum": momentum, "centered": centered})
    return _fp32_bytes(_trained(model)) * len(buffers)


def _fp32_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * max(t.element_size(), 4) for t in tensors)


@dataclass(frozen=True)
class MemoryFigures:
    """One rank's bytes beside replicated float32 RMSprop's.

    Left out on both sides: activations and DDP's gradient buckets; and ShardedRMSprop's
    gradient staging buffer (where it copies the owned gradient slices for the update),
    whose size the library does not expose.
    """

    params: int
    grads: int
    state: int  # this rank's optimizer state: RMSprop buffers and master weights, 1/N each
    replicated_params: int
    replicated_grads: int
    replicated_state: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.state

    @property
    def replicated_total(self) -> int:
        return self.replicated_params + self.replicated_grads + self.replicated_state

    def line(self, rank: int) -> str:
        return (
            f"memory rank {rank}: params {self.params / MIB:.4f} + grads {self.grads / MIB:.4f}"
            f" + sharded state {self.state / MIB:.4f} = {self.total / MIB:.4f} MiB vs "
            f"{self.replicated_total / MIB:.4f} MiB replicated float32 RMSprop (params "
            f"{self.replicated_params / MIB:.4f} + grads {self.replicated_grads / MIB:.4f} + "
            f"state {self.replicated_state / MIB:.4f}) "
            f"({100 * self.total / max(self.replicated_total, 1):.1f}%)"
        )


def report_memory(
    opt: torch.optim.Optimizer, model: nn.Module, *, momentum: float, centered: bool,
    device: torch.device,
) -> MemoryFigures:
    """Log every rank's memory beside replicated float32 ``torch.optim.RMSprop``'s; rank 0's.

    Two lines per rank: the optimizer state alone (RMSprop buffers plus, for 16-bit
    parameters, the float32 master weights, all sharded) against replicated float32 state;
    and params + grads (in the model's dtype, whole on every rank) + that sharded state
    against replicated float32 params + grads + state (see :class:`MemoryFigures` for what
    is left out). Call it after a step: the state is created by the first one. Collective.
    """
    params = _trained(model)
    local = [
        sum(p.numel() * p.element_size() for p in params),
        sum(p.numel() * p.element_size() for p in params),  # a gradient has its parameter's dtype
        optimizer_state_bytes(opt),
    ]
    everyone = gather_ints(local, device)
    replicated_state = replicated_rmsprop_bytes(model, momentum=momentum, centered=centered)
    figures = [
        MemoryFigures(*mine, _fp32_bytes(params), _fp32_bytes(params), replicated_state)
        for mine in everyone
    ]
    for rank, mine in enumerate(figures):
        log.info(
            "optimizer state rank %d: %.4f MiB sharded vs %.4f MiB replicated "
            "torch.optim.RMSprop in float32 (%.1f%%)",
            rank, mine.state / MIB, replicated_state / MIB,
            100 * mine.state / max(replicated_state, 1),
        )
        log.info("%s", mine.line(rank))
    log.info(
        "optimizer state all %d ranks: %.4f MiB sharded vs %.4f MiB replicated",
        len(figures), sum(f.state for f in figures) / MIB, replicated_state * len(figures) / MIB,
    )
    return figures[0]
