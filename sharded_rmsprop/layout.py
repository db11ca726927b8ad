"""The sharding plan: where each parameter lives in its flat buffer and which rank owns what.

Parameters of one (dtype, device) are laid end to end in one flat buffer (or in consecutive
buffers of a bounded size, each its own bucket), each start aligned to ``ALIGNMENT`` elements
and the end padded so that the buffer splits into ``world_size`` equal, aligned shards. Rank
``r`` owns the contiguous range ``[r * S, (r + 1) * S)``: element granularity, exact balance,
whatever the parameter sizes.

Everything here is pure: no ``torch.distributed`` calls and no tensors, so the plan can be
unit-tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .memory_order import dense_strides

__all__ = ["ALIGNMENT", "BucketPlan", "ParamSlot", "ParamSpec", "Piece", "plan_buckets"]

#: Every parameter and every shard starts at a multiple of this many elements (256 bytes for
#: fp32), so vectorised kernels see aligned starts, and each rank's range of a parameter is
#: made of whole checkpoint checksum blocks (:data:`sharded_rmsprop.checksums.BLOCK_NUMEL`).
ALIGNMENT = 64


@dataclass(frozen=True)
class ParamSpec:
    """What the plan needs to know about one parameter."""

    index: int  # position in the optimizer's parameter order, across all groups
    group: int  # index of its param group
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    #: its dimensions from the outermost in memory, and the strides it keeps
    #: (:mod:`sharded_rmsprop.memory_order`); row-major and contiguous if ()
    order: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter sits in its bucket's flat buffer."""

    index: int
    group: int
    shape: tuple[int, ...]
    offset: int  # first element in the flat buffer
    numel: int
    #: the order its elements lie in and the strides of its view of them
    #: (:mod:`sharded_rmsprop.memory_order`)
    order: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Piece:
    """The part of one parameter that falls in one rank's shard."""

    slot: ParamSlot
    param_start: int  # first owned element, counted from the parameter's start
    shard_start: int  # where that element sits in the rank's shard
    numel: int

    @property
    def shard_end(self) -> int:
        return self.shard_start + self.numel

    @property
    def param_end(self) -> int:
        return self.param_start + self.numel


@dataclass(frozen=True)
class BucketPlan:
    """One flat buffer: its parameters, its padded length and its split across ranks."""

    dtype: torch.dtype
    device: torch.device
    slots: tuple[ParamSlot, ...]
    world_size: int
    shard_numel: int

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.world_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        """The flat-buffer range ``[start, end)`` that ``rank`` owns."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of size {self.world_size}")
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    def pieces(self, rank: int) -> tuple[Piece, ...]:
        """The owned part of every parameter that overlaps ``rank``'s shard, in flat order."""
        shard_start, shard_end = self.shard_range(rank)
        pieces = []
        for slot in self.slots:
            start = max(slot.offset, shard_start)
            end = min(slot.end, shard_end)
            if start < end:
                pieces.append(
                    Piece(
                        slot=slot,
                        param_start=start - slot.offset,
                        shard_start=start - shard_start,
                        numel=end - start,
                    )
                )
        return tuple(pieces)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _plan_one_bucket(specs: Sequence[ParamSpec], world_size: int, alignment: int) -> BucketPlan:
    slots = []
    offset = 0
    for spec in specs:
        offset = _round_up(offset, alignment)
        order = spec.order or tuple(range(len(spec.shape)))
        strides = spec.strides or dense_strides(spec.shape, order)
        slots.append(
            ParamSlot(spec.index, spec.group, spec.shape, offset, spec.numel, order, strides)
        )
        offset += spec.numel
    shard_numel = _round_up(offset, world_size * alignment) // world_size
    return BucketPlan(
        dtype=specs[0].dtype,
        device=specs[0].device,
        slots=tuple(slots),
        world_size=world_size,
        shard_numel=shard_numel,
    )


def plan_buckets(
    specs: Iterable[ParamSpec],
    world_size: int,
    *,
    alignment: int = ALIGNMENT,
    bucket_numel: int | None = None,
) -> tuple[BucketPlan, ...]:
    """Lay ``specs`` out in one bucket per (dtype, device), in order of first appearance, or,
    with ``bucket_numel``, in consecutive buckets of at most that many parameter elements
    each (a larger parameter gets a bucket of its own).

    Within a bucket, parameters keep their given order, so the parameters of one param group
    stay next to each other and an update can cover several of them in one operation. Each
    bucket is split evenly across the ranks on its own, so its parameters can be gathered
    apart from the others' (before the forward of the modules that hold them).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if alignment < 1:
        raise ValueError(f"alignment must be at least 1, got {alignment}")
    if bucket_numel is not None and (
        isinstance(bucket_numel, bool) or not isinstance(bucket_numel, int) or bucket_numel < 1
    ):
        raise ValueError(f"bucket_numel must be None or a positive integer, got {bucket_numel!r}")
    by_kind: dict[tuple[torch.dtype, torch.device], list[list[ParamSpec]]] = {}
    filled: dict[tuple[torch.dtype, torch.device], int] = {}  # in each kind's last bucket
    for spec in specs:
        kind = (spec.dtype, spec.device)
        buckets = by_kind.setdefault(kind, [[]])
        full = bucket_numel is not None and filled.get(kind, 0) + spec.numel > bucket_numel
        if full and buckets[-1]:
            buckets.append([])
            filled[kind] = 0
        buckets[-1].append(spec)
        filled[kind] = filled.get(kind, 0) + spec.numel
    return tuple(
        _plan_one_bucket(members, world_size, alignment)
        for buckets in by_kind.values()
        for members in buckets
    )
