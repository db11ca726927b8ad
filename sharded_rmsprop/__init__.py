"""sharded_rmsprop: torch's RMSprop with its state sharded across data-parallel ranks."""

from __future__ import annotations

from .optimizer import ShardedRMSprop

__all__ = ["ShardedRMSprop"]

__version__ = "0.1.0"
