"""What ``ShardedRMSprop`` holds on this rank, by kind, and how its buffers are synced."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .sharding import Sharding

__all__ = ["MemoryAccounting"]


class MemoryAccounting:
    """``memory()``, ``memory_bytes()``, ``shares_host_memory`` and ``sync_path`` of
    ``ShardedRMSprop``."""

    sharding: Sharding

    def memory(self) -> dict[str, list[Tensor]]:
        """This rank's own buffers by kind, the parameters and their gradients aside:
        ``state`` (the owned shard of square_avg, momentum_buffer and grad_avg), ``master``
        (float32 master weights of 16-bit shards), ``steps`` (the step counts) and
        ``grad_window`` (where the owned gradient slices are staged for the update), and
        with :meth:`reduce_scatter_gradients` on, ``grad_reduction`` (the buffers the
        gradients are reduce-scattered through, kept from backward to backward)."""
        return self.sharding.memory()

    def memory_bytes(self) -> dict[str, int]:
        """The bytes of :meth:`memory`, by kind."""
        return {
            kind: sum(t.numel() * t.element_size() for t in tensors)
            for kind, tensors in self.memory().items()
        }

    @property
    def shares_host_memory(self) -> bool:
        """Whether some flat buffer (parameters and shards) is mapped by every rank of the
        host (``host_shared=True``, where it could be had)."""
        return self.sharding.sync.shares_host_memory

    @property
    def sync_path(self) -> str:
        """How the updated shards reach every rank: "broadcast" or "all_gather" (the
        collective, ``param_sync`` resolved for the backend), "host_shared" (a barrier: the
        buffers are shared), both joined by "and" where buffers differ, or "none" (one
        rank)."""
        return self.sharding.sync.describe()
