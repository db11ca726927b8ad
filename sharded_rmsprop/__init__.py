"""sharded_rmsprop: torch's RMSprop with its state sharded across data-parallel ranks."""

from __future__ import annotations

from .dcp_reader import SafeFileSystemReader
from .distributed import (
    DistributedContext,
    destroy_distributed,
    distributed,
    init_distributed,
    node_local_group,
)
from .optimizer import ShardedRMSprop

__all__ = [
    "DistributedContext",
    "SafeFileSystemReader",
    "ShardedRMSprop",
    "destroy_distributed",
    "distributed",
    "init_distributed",
    "node_local_group",
]

__version__ = "0.2.0"
