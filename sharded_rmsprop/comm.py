"""Collectives: who the ranks are, the small values they exchange, and the parameter sync.

The optimizer never calls ``torch.distributed`` itself; it goes through :class:`DataParallelGroup`,
which also stands in for "no process group at all" (one rank, every collective skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import check_not_launched_as_several, drain_at_exit

__all__ = ["PARAM_SYNCS", "DataParallelGroup", "Reduction"]

#: The parameter syncs one can ask for (``ShardedRMSprop(param_sync=...)``): "auto", the
#: collective measured fastest for the backend, or one by name.
PARAM_SYNCS = ("auto", "all_gather", "broadcast")

# gloo implements all-gather as a ring of point-to-point sends; one broadcast per owning rank
# is about 4x faster on 2 CPU ranks at 100 MiB (benchmarks/results/sync_gloo_2ranks.md).
_BROADCAST_BACKENDS = frozenset({"gloo"})


def _all_gather_into(output: Tensor, shard: Tensor, group: dist.ProcessGroup | None):
    """``all_gather_single`` where torch has it (2.13+), else ``all_gather_into_tensor``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, shard, group=group, async_op=True)


# gloo's reduce-scatter is slower than its all-reduce (126 ms against 83 ms for 100 MB on 2
# ranks); sending each rank its chunk point to point and adding takes 45 ms (the same run).
_POINT_TO_POINT_REDUCE_BACKENDS = frozenset({"gloo"})


def _reduce_scatter_into(shard: Tensor, flat: Tensor, group: dist.ProcessGroup | None):
    """``reduce_scatter_single`` where torch has it (2.13+), else ``reduce_scatter_tensor``."""
    reduce = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return reduce(shard, flat, op=dist.ReduceOp.SUM, group=group, async_op=True)


class Reduction:
    """A reduce-scatter under way (:meth:`DataParallelGroup.reduce_scatter`): :meth:`wait`
    ends it, after which its shard holds the sum."""

    def __init__(
        self,
        works: list[dist.Work],
        shard: Tensor,
        chunks: list[Tensor] | None = None,
    ) -> None:
        self.works, self.shard, self.chunks = works, shard, chunks

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []
        if self.chunks is not None:  # every rank's chunk, received: their sum, in rank order
            self.shard.copy_(self.chunks[0])
            for chunk in self.chunks[1:]:
                self.shard.add_(chunk)
            self.chunks = None


# Backends whose collectives take CPU tensors; any other gets a gloo twin for host-side values.
_HOST_BACKENDS = frozenset({"gloo", "mpi", "ucc"})

# One gloo twin per NCCL-only process group, shared by every optimizer on it.
_GLOO_TWINS: dict[dist.ProcessGroup, dist.ProcessGroup] = {}


def _carries_cpu_tensors(backend: str) -> bool:
    """Whether a group of ``backend`` (e.g. "gloo", "nccl", "cpu:gloo,cuda:nccl") can run
    collectives on CPU tensors."""
    return backend in _HOST_BACKENDS or "cpu:" in backend


def _host_group_for(group: dist.ProcessGroup, backend: str) -> dist.ProcessGroup:
    """``group`` if it carries CPU tensors, else its gloo twin (created once; collective among
    the group's members only)."""
    if _carries_cpu_tensors(backend):
        return group
    if group not in _GLOO_TWINS:
        _GLOO_TWINS[group] = dist.new_group(
            dist.get_process_group_ranks(group), backend="gloo", use_local_synchronization=True
        )
    return _GLOO_TWINS[group]


@dataclass(frozen=True)
class DataParallelGroup:
    """The ranks that share one optimizer's work: a process group, or a lone process.

    Values the host already knows (digests of what the ranks are about to do, flags, small
    integers) travel through ``host_group`` as CPU tensors: the group itself for gloo, a gloo
    twin of an NCCL group. So agreeing on them never waits for the GPU (no host
    synchronisation); values computed on the device (norms, inf checks) use ``group``.
    """

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    backend: str | None
    host_group: dist.ProcessGroup | None = None

    @classmethod
    def resolve(cls, process_group: dist.ProcessGroup | None) -> DataParallelGroup:
        """``process_group``, the default group if None, or a lone process if none exists
        and the launcher did not start several (else an error: see
        :func:`~sharded_rmsprop.distributed.check_not_launched_as_several`).

        Collective when the group is NCCL-only and larger than one rank (its gloo twin is
        created the first time).
        """
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise RuntimeError(
                    "a process_group was given but torch.distributed is not initialized"
                )
            check_not_launched_as_several()
            return cls(group=None, rank=0, world_size=1, backend=None)
        group = process_group if process_group is not None else dist.group.WORLD
        rank = dist.get_rank(group)
        if rank < 0:
            raise RuntimeError(
                "this process is not a member of the process_group given to ShardedRMSprop"
            )
        world_size = dist.get_world_size(group)
        if world_size > 1:
            drain_at_exit()
        backend = str(dist.get_backend(group)).lower()
        host_group = _host_group_for(group, backend) if world_size > 1 else group
        return cls(group, rank, world_size, backend, host_group)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def control_device(self) -> torch.device:
        """Where values computed on the device travel for this backend's collectives."""
        if (
            self.backend is not None
            and "nccl" in self.backend
            and not _carries_cpu_tensors(self.backend)
        ):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- values the host knows (collective, through host_group) ---------------------------------

    def host_all_reduce_max(self, values: Sequence[int]) -> list[int]:
        """The elementwise maximum over the ranks of ``values`` (int64)."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.host_group)
        return tensor.tolist()

    def host_all_gather(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's ``values`` (int64, the same count on every rank), by rank."""
        if not self.is_distributed:
            return [list(values)]
        mine = torch.tensor(values, dtype=torch.int64)
        everyone = torch.empty(self.world_size * mine.numel(), dtype=torch.int64)
        _all_gather_into(everyone, mine, self.host_group).wait()
        return everyone.view(self.world_size, -1).tolist()

    def host_all_gather_text(self, text: str) -> list[str]:
        """Every rank's ``text``, by rank."""
        data = text.encode()
        length = self.host_all_reduce_max([len(data)])[0]
        rows = self.host_all_gather(list(data.ljust(length, b"\0")))
        return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in rows]

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return -self.host_all_reduce_max([-int(flag)])[0] == 1

    def host_broadcast(self, values: Sequence[int]) -> list[int]:
        """Rank 0's ``values`` (int64) on every rank."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(tensor, dist.get_global_rank(self.host_group, 0), group=self.host_group)
        return tensor.tolist()

    # -- values computed on the device (collective, through group) ------------------------------

    def all_reduce_tensor(self, value: Tensor, op: str) -> Tensor:
        """``value`` reduced elementwise over the ranks with ``op``: "sum", "max" or "min".

        The result is a new tensor on ``value``'s device; no host synchronisation on a GPU.
        """
        if not self.is_distributed:
            return value.clone()
        tensor = value.to(self.control_device(), copy=True)
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=reduce_op[op], group=self.group)
        return tensor.to(value.device)

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier(group=self.group)

    # -- the parameter sync --------------------------------------------------------------------

    def param_sync(self, asked: str = "auto") -> str:
        """The collective of the parameter sync for ``asked`` (one of :data:`PARAM_SYNCS`):
        "broadcast" (one per owning rank) or "all_gather". "auto" is broadcasts on gloo, whose
        all-gather is a slower ring of sends, and the all-gather elsewhere (NCCL's is one
        collective at the links' bandwidth)."""
        if asked != "auto":
            return asked
        return "broadcast" if self.backend in _BROADCAST_BACKENDS else "all_gather"

    def sync_shards(
        self,
        flats: Sequence[Tensor],
        shard_numels: Sequence[int],
        wait: bool = True,
        collective: str = "auto",
    ) -> list[dist.Work]:
        """Give every rank the whole of each flat buffer, each rank contributing its shard.

        Collective. ``flats[i]`` is split into ``world_size`` shards of ``shard_numels[i]``
        elements; rank ``r``'s shard is authoritative for that range. ``collective`` is
        one of :data:`PARAM_SYNCS` (see :meth:`param_sync`). With ``wait=False`` the
        collectives are only started, and it returns the work to wait for before the flats
        are read (on a GPU, waiting orders the current stream after it).
        """
        works: list[dist.Work] = []
        if not self.is_distributed:
            return works
        by_broadcasts = self.param_sync(collective) == "broadcast"
        for flat, shard_numel in zip(flats, shard_numels):
            if shard_numel == 0:
                continue
            shards = flat.split(shard_numel)
            if by_broadcasts:
                for owner, shard in enumerate(shards):
                    src = dist.get_global_rank(self.group, owner)
                    works.append(dist.broadcast(shard, src, group=self.group, async_op=True))
            else:
                works.append(_all_gather_into(flat, shards[self.rank], self.group))
        if not wait:
            return works
        for work in works:
            work.wait()
        return []

    def reduce_scatter(
        self, flat: Tensor, shard: Tensor, received: Tensor | None = None
    ) -> Reduction:
        """Start summing ``flat`` over the ranks into ``shard``, this rank's chunk of it.

        Collective. ``flat`` splits into ``world_size`` chunks of ``shard.numel()`` elements;
        once the returned :class:`Reduction` is waited for, ``shard`` holds the sum of every
        rank's chunk ``rank`` (and ``flat`` may be reused). On gloo the chunks travel point to
        point, into ``received`` (``(world_size - 1) * shard.numel()`` elements; new memory if
        None), and are added in rank order.
        """
        if not self.is_distributed:
            shard.copy_(flat)
            return Reduction([], shard)
        if self.backend not in _POINT_TO_POINT_REDUCE_BACKENDS:
            return Reduction([_reduce_scatter_into(shard, flat, self.group)], shard)
        numel = shard.numel()
        if received is None:
            received = self.reduce_scatter_inbox(shard)
        inbox = iter(received.split(numel))
        chunks = list(flat.split(numel))
        works = []
        for peer, chunk in enumerate(chunks):
            if peer == self.rank:
                continue
            global_peer = dist.get_global_rank(self.group, peer)
            works.append(dist.isend(chunk, global_peer, group=self.group))
            chunks[peer] = next(inbox)
            works.append(dist.irecv(chunks[peer], global_peer, group=self.group))
        return Reduction(works, shard, chunks)

    def reduce_scatter_inbox(self, shard: Tensor) -> Tensor | None:
        """New memory that :meth:`reduce_scatter` into ``shard`` can receive into (None where
        the backend needs none): keep it to reduce again without allocating."""
        if not self.is_distributed or self.backend not in _POINT_TO_POINT_REDUCE_BACKENDS:
            return None
        numel = (self.world_size - 1) * shard.numel()
        return torch.empty(numel, dtype=shard.dtype, device=shard.device)

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
