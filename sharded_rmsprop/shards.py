"""One bucket on one rank: the flat parameter buffer, the owned shard and its RMSprop state.

A :class:`ShardedBucket` turns a :class:`~sharded_rmsprop.layout.BucketPlan` into tensors:

- ``flat``: every parameter of the bucket end to end; the parameters become views of it, so
  the parameter sync writes them in place. It may be one buffer that all ranks of the host map
  (``host_shared``): then each rank's update is everyone's.
- ``shard``: the rank's range of ``flat`` (a view).
- ``grad_shard``: where the owned slices of the gradients are copied each step.
- ``state``: ``square_avg``, ``momentum_buffer`` and ``grad_avg`` for the owned range only,
  each allocated on first use.
- ``steps``: torch's per-parameter ``step`` counters (CPU, torch's dtype for them) for every parameter of
  the bucket, owned or not, so every rank can report them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .layout import BucketPlan, Piece

__all__ = ["STATE_KEYS", "ShardedBucket", "Span", "merge_spans"]

#: torch.optim.RMSprop's per-element state buffers.
STATE_KEYS = ("square_avg", "momentum_buffer", "grad_avg")


@dataclass(frozen=True)
class Span:
    """A contiguous stretch ``[start, end)`` of the shard that one param group updates."""

    group: int
    start: int
    end: int


def merge_spans(pieces: Sequence[Piece]) -> list[Span]:
    """Join shard-adjacent pieces of the same param group into spans, keeping their order."""
    spans: list[Span] = []
    for piece in pieces:
        last = spans[-1] if spans else None
        if last is not None and last.group == piece.slot.group and last.end == piece.shard_start:
            spans[-1] = Span(last.group, last.start, piece.shard_end)
        else:
            spans.append(Span(piece.slot.group, piece.shard_start, piece.shard_end))
    return spans


def _step_dtype() -> torch.dtype:
    """The dtype torch.optim.RMSprop gives its ``step`` tensors."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class ShardedBucket:
    """The tensors of one :class:`BucketPlan` on one rank (see the module docstring)."""

    def __init__(
        self,
        plan: BucketPlan,
        rank: int,
        params: Sequence[Tensor],
        host_shared_flat: Tensor | None = None,
    ) -> None:
        """``host_shared_flat``: a zero buffer that all ranks map (rank 0 fills it)."""
        if len(params) != len(plan.slots):
            raise ValueError(f"the plan has {len(plan.slots)} slots, got {len(params)} params")
        self.plan = plan
        self.params = list(params)
        self.pieces = plan.pieces(rank)
        self._owned_piece = {piece.slot.index: piece for piece in self.pieces}
        self._position = {slot.index: i for i, slot in enumerate(plan.slots)}
        self.group_indices = sorted({slot.group for slot in plan.slots})
        self.host_shared = host_shared_flat is not None
        self.flat = self._flatten_params(host_shared_flat, fill=rank == 0 or not self.host_shared)
        start, end = plan.shard_range(rank)
        self.shard = self.flat[start:end]
        self.grad_shard = torch.zeros_like(self.shard)
        self.state: dict[str, Tensor] = {}
        self.steps = torch.zeros(len(self.params), dtype=_step_dtype())

    def _flatten_params(self, flat: Tensor | None, fill: bool) -> Tensor:
        """Copy the parameters into one padded buffer (unless ``fill`` is False: another
        rank fills a shared one) and make them views of it."""
        if flat is None:
            flat = torch.zeros(self.plan.padded_numel, dtype=self.plan.dtype, device=self.plan.device)
        for slot, param in zip(self.plan.slots, self.params):
            view = flat[slot.offset : slot.end].view(slot.shape)
            if fill:
                view.copy_(param.detach())
            param.data = view
        return flat

    def ensure_state(self, key: str) -> Tensor:
        """The shard-sized state buffer ``key``, created as zeros on first use."""
        buffer = self.state.get(key)
        if buffer is None:
            buffer = self.state[key] = torch.zeros_like(self.shard)
        return buffer

    def owned_piece(self, position: int) -> Piece | None:
        """The part of the parameter at ``position`` that this rank owns, if any."""
        return self._owned_piece.get(self.plan.slots[position].index)

    def param_state(self, position: int) -> dict[str, Tensor]:
        """torch-style state of the parameter at ``position`` on this rank.

        ``step`` is a 0-d view of its counter; each allocated buffer contributes the owned
        slice (1-D, empty where this rank owns none of the parameter).
        """
        piece = self.owned_piece(position)
        start, end = (piece.shard_start, piece.shard_end) if piece else (0, 0)
        state = {"step": self.steps[position]}
        for key in STATE_KEYS:
            if key in self.state:
                state[key] = self.state[key][start:end]
        return state

    def positions_with_grad(self) -> list[int]:
        """Positions of the parameters that have a gradient this step."""
        return [i for i, param in enumerate(self.params) if param.grad is not None]

    def gather_grads(self) -> list[Span]:
        """Copy the owned slice of every available gradient into ``grad_shard``.

        Returns the spans to update: owned pieces whose parameter has a gradient, joined
        where they are adjacent and share a param group.
        """
        sources, targets, active = [], [], []
        for piece in self.pieces:
            grad = self.params[self._position[piece.slot.index]].grad
            if grad is None:
                continue
            sources.append(grad.reshape(-1)[piece.param_start : piece.param_end])
            targets.append(self.grad_shard[piece.shard_start : piece.shard_end])
            active.append(piece)
        if targets:
            torch._foreach_copy_(targets, sources)
        return merge_spans(active)
