"""ShardedRMSprop inside the frameworks people train with: checkpoints that hold the whole state.

Each rank of a ShardedRMSprop holds only its shard of the optimizer state, and its
``state_dict()`` is that shard (the sharded format, for ``torch.distributed.checkpoint``).
Trainers save ``optimizer.state_dict()`` from rank 0 alone; what makes that file whole is one
collective call on every rank before the save, :meth:`ShardedRMSprop.consolidate_state_dict`,
after which rank 0's ``state_dict()`` is the whole state in torch's format. Each framework
gets that call its own way:

- **Lightning**: nothing to do. Lightning calls ``optimizer.consolidate_state_dict()`` on every
  rank before saving when the optimizer has it (torch's ZeroRedundancyOptimizer protocol).
- **HF Trainer**: ``Trainer(..., callbacks=[ShardedRMSpropCallback()])``
  (:class:`~sharded_rmsprop.integrations.huggingface.ShardedRMSpropCallback`, importable from
  here too; it imports ``transformers``).
- **accelerate**: ``accelerator.register_save_state_pre_hook(consolidate_before_save(optimizer))``
  (:func:`consolidate_before_save`).

Without that call, pickling one rank's shard of a multi-rank optimizer warns once
(:class:`~sharded_rmsprop.shard_view.IncompleteStateWarning`). Nothing here imports a framework
until it is asked for: the package's one hard dependency stays torch.
"""

from __future__ import annotations

from typing import Any, Callable

from ..shard_view import IncompleteStateWarning

__all__ = [
    "IncompleteStateWarning",
    "ShardedRMSpropCallback",
    "consolidate_before_save",
    "sharded_optimizer_in",
]


def sharded_optimizer_in(optimizer: Any) -> Any | None:
    """The ShardedRMSprop that ``optimizer`` is or wraps (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer`` keep it as ``.optimizer`` / ``._optimizer``), or None."""
    from .. import ShardedRMSprop

    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, ShardedRMSprop):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
    return None


def consolidate_before_save(optimizer: Any, to: int | None = 0) -> Callable[..., None]:
    """A hook for ``accelerator.register_save_state_pre_hook``: it gathers ``optimizer``'s whole
    state on rank ``to`` (accelerate's main process is rank 0) before ``save_state()`` writes
    ``optimizer.bin``. accelerate runs the hook on every process, as the gathering needs.

    ``optimizer``: the ShardedRMSprop, or what ``accelerator.prepare`` made of it. With
    ``ProjectConfiguration(save_on_each_node=True)`` each node's first process writes: pass
    ``to=None`` so that every rank gets the whole state.
    """
    sharded = sharded_optimizer_in(optimizer)
    if sharded is None:
        raise TypeError(f"consolidate_before_save() needs a ShardedRMSprop, got {optimizer!r}")

    def consolidate(*_: Any) -> None:
        sharded.consolidate_state_dict(to)

    return consolidate


def __getattr__(name: str) -> Any:
    if name == "ShardedRMSpropCallback":  # imports transformers, only when asked for
        from .huggingface import ShardedRMSpropCallback

        return ShardedRMSpropCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
