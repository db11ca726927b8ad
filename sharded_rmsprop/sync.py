"""How the updated shards reach every rank: the one place that knows about host-shared buffers.

After each rank updates the shard it owns, every rank needs the whole of every flat buffer.
A private buffer gets the other ranks' shards through collectives
(:meth:`DataParallelGroup.sync_shards`); a buffer that all ranks of a host map
(``host_shared=True``) already holds them once every rank has written, so a barrier does. The
optimizer calls the phases of :class:`ShardSync` and never asks which kind a buffer is.

A bucket's collectives start as soon as its shard is updated (:meth:`ShardSync.start`), while
the next bucket is updated, and ``step()`` returns once all have ended
(:meth:`ShardSync.finish`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch.distributed as dist
from torch import Tensor

from .comm import DataParallelGroup
from .host_shared import host_shared_zeros

if TYPE_CHECKING:
    from .layout import BucketPlan
    from .shards import ShardedBucket

__all__ = ["ShardSync"]


class ShardSync:
    """The sync of a list of buckets (``buckets``, the list itself: buckets added to it later
    are synced too), by collectives (``param_sync``, one of ``comm.PARAM_SYNCS``) and, for
    host-shared ones, barriers."""

    def __init__(
        self,
        data_parallel: DataParallelGroup,
        host_shared: bool,
        buckets: Sequence[ShardedBucket],
        param_sync: str = "auto",
    ) -> None:
        self.data_parallel = data_parallel
        self.buckets = buckets
        #: The collective asked for (see :attr:`collective` for what it is on this backend).
        self.param_sync = param_sync
        #: Whether buffers are to be shared by the host (``host_shared=True``, until a
        #: fallback to private buffers).
        self.host_shared = host_shared
        #: The collectives started for the buckets updated so far in this step (from
        #: :meth:`start` to :meth:`finish`).
        self.pending: list[dist.Work] = []

    def shared_buffer(self, plan: BucketPlan) -> Tensor | None:
        """A flat buffer for ``plan`` that every rank of the host maps, where that was asked
        for and can be had (CPU buckets, verified); None for a private one. Collective when
        asked for."""
        if not (self.host_shared and plan.device.type == "cpu"):
            return None
        shared = host_shared_zeros(self.data_parallel, plan.padded_numel, plan.dtype)
        self.host_shared = shared is not None  # after a fallback (one warning), no more
        return shared

    @property
    def collective(self) -> str:
        """The collective of the sync, ``param_sync`` resolved for the backend."""
        return self.data_parallel.param_sync(self.param_sync)

    def describe(self) -> str:
        """How the shards reach every rank, in words: "host_shared" (barriers),
        "broadcast" or "all_gather", both for a mixture, "none" at one rank."""
        if not self.data_parallel.is_distributed:
            return "none"
        kinds = {"host_shared" if b.host_shared else self.collective for b in self.buckets}
        return " and ".join(sorted(kinds)) or self.collective

    @property
    def shares_host_memory(self) -> bool:
        """Whether some flat buffer is mapped by every rank of the host."""
        return any(bucket.host_shared for bucket in self.buckets)

    def written_by_one(self) -> None:
        """After one rank wrote whole host-shared buffers (built, or parameters adopted):
        the others wait for it. Collective where buffers are shared."""
        if self.shares_host_memory:
            self.data_parallel.barrier()

    def before_update(self) -> None:
        """Before the update writes the shards: no rank still reads parameters there (a
        shared buffer is every rank's parameters). Collective where buffers are shared."""
        if self.shares_host_memory:
            self.data_parallel.barrier()

    def start(self, bucket: ShardedBucket) -> None:
        """Start the collectives that bring ``bucket``'s other shards, once its own shard is
        updated (they run while the next bucket is). Collective, in bucket order on every
        rank; a host-shared bucket needs none."""
        if not bucket.host_shared:
            self.pending += self.data_parallel.sync_shards(
                [bucket.flat], [bucket.plan.shard_numel], wait=False, collective=self.collective
            )

    def finish(self) -> None:
        """After every bucket was :meth:`start` ed: every rank holds the whole of each flat
        buffer when it returns. Collective."""
        for work in self.pending:
            work.wait()
        self.pending = []
        if self.shares_host_memory:
            self.data_parallel.barrier()  # every shard of the shared buffers is written

    def after_update(self) -> None:
        """Give every rank the whole of each flat buffer, each rank's shard from it, after
        all were updated. Collective."""
        for bucket in self.buckets:
            self.start(bucket)
        self.finish()
