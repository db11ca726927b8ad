"""Collectives: who the ranks are, whether they agree, and the parameter sync.

The optimizer never calls ``torch.distributed`` itself; it goes through :class:`DataParallelGroup`,
which also stands in for "no process group at all" (one rank, every collective skipped).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DataParallelGroup"]

# gloo implements all-gather as a ring of point-to-point sends; one broadcast per owning rank
# measured about 4x faster on 2 CPU ranks at 100 MB (DESIGN.md), so gloo syncs by broadcasts.
_BROADCAST_BACKENDS = frozenset({"gloo"})


def _all_gather_into(output: Tensor, shard: Tensor, group: dist.ProcessGroup | None):
    """``all_gather_single`` where torch has it (2.13+), else ``all_gather_into_tensor``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, shard, group=group, async_op=True)


@dataclass(frozen=True)
class DataParallelGroup:
    """The ranks that share one optimizer's work: a process group, or a lone process."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    backend: str | None

    @classmethod
    def resolve(cls, process_group: dist.ProcessGroup | None) -> DataParallelGroup:
        """``process_group``, the default group if None, or a lone process if none exists."""
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise RuntimeError(
                    "a process_group was given but torch.distributed is not initialized"
                )
            return cls(group=None, rank=0, world_size=1, backend=None)
        group = process_group if process_group is not None else dist.group.WORLD
        rank = dist.get_rank(group)
        if rank < 0:
            raise RuntimeError(
                "this process is not a member of the process_group given to ShardedRMSprop"
            )
        return cls(
            group=group,
            rank=rank,
            world_size=dist.get_world_size(group),
            backend=str(dist.get_backend(group)).lower(),
        )

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def _control_device(self) -> torch.device:
        """Where small bookkeeping tensors must live for this backend's collectives."""
        if self.backend is not None and "nccl" in self.backend and "gloo" not in self.backend:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def check_same_layout(self, what: str, description: Sequence[object] | None) -> None:
        """Raise on every rank unless all ranks passed an identical ``description``.

        Collective. Each rank contributes the item count and a digest of ``description``, so
        a mismatch is found by every rank at once instead of leaving some rank waiting in a
        later collective. A rank that already failed on its own input passes ``None``: it
        takes part, so the others learn of it and raise too, and returns for its caller to
        raise its own, more precise error.
        """
        if not self.is_distributed:
            return
        if description is None:
            count, digest = -1, b"\0" * 28
        else:
            count, digest = len(description), hashlib.sha256(repr(list(description)).encode()).digest()
        words = [int.from_bytes(digest[i : i + 7], "little") for i in range(0, 28, 7)]
        mine = torch.tensor([count, *words], dtype=torch.int64, device=self._control_device())
        everyone = torch.empty(self.world_size * mine.numel(), dtype=torch.int64, device=mine.device)
        _all_gather_into(everyone, mine, self.group).wait()
        rows = everyone.view(self.world_size, -1).tolist()
        if description is None or all(row == rows[0] for row in rows):
            return
        summary = "; ".join(
            f"rank {r}: rejected its arguments" if row[0] < 0
            else f"rank {r}: {row[0]} {what}, digest {row[1]:014x}"
            for r, row in enumerate(rows)
        )
        raise RuntimeError(
            f"ShardedRMSprop: the ranks of the process group disagree on the {what} "
            f"({summary}). Every rank must pass the same parameters in the same order, with "
            f"the same shapes, dtypes and param-group options."
        )

    # -- small agreements (collective) ----------------------------------------------------------

    def _all_reduce_int(self, value: int, op: dist.ReduceOp) -> int:
        if not self.is_distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self._control_device())
        dist.all_reduce(tensor, op=op, group=self.group)
        return int(tensor.item())

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return bool(self._all_reduce_int(int(flag), dist.ReduceOp.MIN))

    def all_equal(self, value: int) -> bool:
        """Whether every rank passed the same ``value``."""
        return self._all_reduce_int(value, dist.ReduceOp.MIN) == self._all_reduce_int(
            value, dist.ReduceOp.MAX
        )

    def all_reduce_scalar(self, value: Tensor, op: str) -> Tensor:
        """``value`` (a 0-d tensor) reduced over the ranks with ``op``: "sum", "max" or "min".

        The result is a new tensor on ``value``'s device; no host synchronisation on a GPU.
        """
        if not self.is_distributed:
            return value.clone()
        tensor = value.to(self._control_device(), copy=True)
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=reduce_op[op], group=self.group)
        return tensor.to(value.device)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.is_distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self._control_device())
        dist.broadcast(tensor, dist.get_global_rank(self.group, 0), group=self.group)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier(group=self.group)

    # -- the parameter sync --------------------------------------------------------------------

    def sync_shards(
        self, flats: Sequence[Tensor], shard_numels: Sequence[int], host_shared: Sequence[bool]
    ) -> None:
        """Give every rank the whole of each flat buffer, each rank contributing its shard.

        Collective. ``flats[i]`` is split into ``world_size`` shards of ``shard_numels[i]``
        elements; rank ``r``'s shard is authoritative for that range. Buffers that all ranks
        map (``host_shared[i]``) need no transfer: a barrier says every shard is written.
        """
        if not self.is_distributed:
            return
        works = []
        for flat, shard_numel, shared in zip(flats, shard_numels, host_shared):
            if shard_numel == 0 or shared:
                continue
            shards = flat.split(shard_numel)
            if self.backend in _BROADCAST_BACKENDS:
                for owner, shard in enumerate(shards):
                    src = dist.get_global_rank(self.group, owner)
                    works.append(dist.broadcast(shard, src, group=self.group, async_op=True))
            else:
                works.append(_all_gather_into(flat, shards[self.rank], self.group))
        for work in works:
            work.wait()
        if any(host_shared):
            self.barrier()

    def stream_shards(
        self, shard: Tensor, to: int | None, chunk_numel: int
    ) -> Iterator[tuple[int, Tensor]]:
        """Every rank's ``shard``, chunk by chunk, at rank ``to`` (every rank if None).

        Collective: every rank must exhaust the iterator. On receiving ranks it yields
        ``(flat_start, chunk)``, where ``flat_start`` is the chunk's position in the flat
        buffer that the shards split (owner ``r``'s shard starts at ``r * shard.numel()``);
        a chunk is only valid until the next one is yielded. Other ranks yield nothing.
        """
        numel = shard.numel()
        buffer = torch.empty(min(chunk_numel, numel), dtype=shard.dtype, device=shard.device)
        for owner in range(self.world_size):
            src = owner if self.group is None else dist.get_global_rank(self.group, owner)
            for start in range(0, numel, chunk_numel):
                mine = shard[start : start + chunk_numel]
                flat_start = owner * numel + start
                if not self.is_distributed:
                    yield flat_start, mine
                elif to is None:
                    chunk = mine if owner == self.rank else buffer[: mine.numel()]
                    dist.broadcast(chunk, src, group=self.group)
                    yield flat_start, chunk
                elif self.rank == to:
                    if owner == to:
                        yield flat_start, mine
                    else:
                        dist.recv(buffer[: mine.numel()], src, group=self.group)
                        yield flat_start, buffer[: mine.numel()]
                elif self.rank == owner:
                    dst = to if self.group is None else dist.get_global_rank(self.group, to)
                    dist.send(mine, dst, group=self.group)
