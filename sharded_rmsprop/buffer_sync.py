"""The sync strategies: where a bucket's flat buffer lives, and how the other ranks' shards
reach it once each rank updated its own.

- :class:`CollectiveSync`: a private buffer per rank; the other ranks' shards arrive by
  collectives (an all-gather, or one broadcast per rank: ``param_sync``,
  :meth:`DataParallelGroup.sync_shards`), which may be left in flight.
- :class:`HostSharedSync` (``host_shared=True``): one buffer that all ranks of a host map;
  it holds every shard once every rank has written, so a barrier does.

Each has :class:`BufferSync`'s methods; :class:`~sharded_rmsprop.sync.ShardSync` runs them in
the step's phases and never asks which kind a bucket's is. Adding a strategy is a class here
and a place in :func:`preferred_strategies` (``docs/architecture.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import DataParallelGroup
from .host_shared import host_shared_zeros

if TYPE_CHECKING:
    from .layout import BucketPlan

__all__ = ["BufferSync", "CollectiveSync", "HostSharedSync", "preferred_strategies"]


class BufferSync(Protocol):
    """How one bucket's flat buffer gets every rank's shard: a sync strategy."""

    #: Whether its buffers are mapped by every rank of the host.
    shares_host_memory: bool
    #: Whether this rank writes the parameters' values into the buffers it makes (one rank
    #: does for a shared buffer).
    fills_flat: bool

    def new_flat(self, plan: BucketPlan) -> Tensor | None:
        """A zero flat buffer for ``plan``, or None where this strategy cannot have one
        (collective where it allocates shared memory)."""

    def start(self, flat: Tensor, plan: BucketPlan, mark_stale: bool) -> list[dist.Work]:
        """Start bringing the other ranks' shards of a bucket's ``flat`` buffer, laid out by
        ``plan`` (collective, in bucket order); the work to wait for. ``mark_stale``: first
        write NaN where other ranks own it."""

    def all_written(self) -> None:
        """Every rank has written what it writes of the buffers (its shards, or rank 0 the
        whole of new ones): after it, each rank may read them. Collective."""

    def describe(self) -> str:
        """Its name, as ``ShardedRMSprop.sync_path`` reports it."""


class CollectiveSync:
    """Private buffers; the shards arrive by ``param_sync``'s collective."""

    shares_host_memory = False
    fills_flat = True

    def __init__(self, data_parallel: DataParallelGroup, param_sync: str) -> None:
        self.data_parallel = data_parallel
        #: The collective asked for, and what it is on this backend.
        self.param_sync = param_sync
        self.collective = data_parallel.param_sync(param_sync)

    def new_flat(self, plan: BucketPlan) -> Tensor:
        return torch.zeros(plan.padded_numel, dtype=plan.dtype, device=plan.device)

    def start(self, flat: Tensor, plan: BucketPlan, mark_stale: bool) -> list[dist.Work]:
        if mark_stale and self.data_parallel.is_distributed:
            start, end = plan.shard_range(self.data_parallel.rank)
            flat[:start].fill_(float("nan"))
            flat[end:].fill_(float("nan"))
        return self.data_parallel.sync_shards(
            [flat], [plan.shard_numel], wait=False, collective=self.collective
        )

    def all_written(self) -> None:
        pass  # (waiting for the collectives is)

    def describe(self) -> str:
        return self.collective


class HostSharedSync:
    """One buffer per bucket that every rank of the host maps (CPU buckets only); after
    sharing failed once, it makes no more (rank 0 warned why)."""

    shares_host_memory = True

    def __init__(self, data_parallel: DataParallelGroup) -> None:
        self.data_parallel = data_parallel
        self.fills_flat = data_parallel.rank == 0
        self.available = True

    def new_flat(self, plan: BucketPlan) -> Tensor | None:
        if not (self.available and plan.device.type == "cpu" and plan.padded_numel):
            return None  # (an empty bucket has nothing to share)
        shared = host_shared_zeros(self.data_parallel, plan.padded_numel, plan.dtype)
        self.available = shared is not None  # (after a fallback, no more: one warning)
        return shared

    def start(self, flat: Tensor, plan: BucketPlan, mark_stale: bool) -> list[dist.Work]:
        return []  # (written in place: nothing in flight)

    def all_written(self) -> None:
        self.data_parallel.barrier()

    def describe(self) -> str:
        return "host_shared"


def preferred_strategies(
    data_parallel: DataParallelGroup, host_shared: bool, param_sync: str
) -> list[BufferSync]:
    """The strategies to try for a new bucket, in order, as the settings ask: host-shared
    buffers first where ``host_shared``, then private ones (which every bucket can have)."""
    private = CollectiveSync(data_parallel, param_sync)
    return [HostSharedSync(data_parallel), private] if host_shared else [private]
