"""The parameter sync left running behind the next forward: ``opt.overlap_param_sync(model)``.

Without it, ``step()`` returns once every rank holds every updated parameter. With it,
``step()`` returns as soon as each bucket's sync has started, and the first thing that reads a
bucket waits for it:

- the forward of a module that holds one of its parameters (a forward pre-hook on every module
  of ``model``, ahead of the module's other pre-hooks). A module whose forward has never been
  seen to run in training mode (``nn.MultiheadAttention``'s ``out_proj``, whose weights its
  parent reads directly, or a module called through ``.forward()``) counts as part of its
  parent, so the first forward after registration waits for everything at its first module.
  A module in eval mode waits for everything (torch's fast paths read children's weights);
- ``model.state_dict()`` and ``model.load_state_dict()`` on any module of ``model``;
- every method of the optimizer, its state dicts and ``copy.deepcopy``, and the construction
  of another optimizer;
- ``step()`` itself when step post-hooks are registered (they may read parameters);
- ``opt.wait_for_params()``, which user code calls before reading or changing parameters
  outside the model's forward (an EMA or SWA update, ``p.clamp_()``, logging).

Nothing else is seen. So that a read that was not waited for is not silently the previous
step's values, the elements a rank does not own read NaN until their sync arrives; a change of
a parameter before its sync arrived is an error when it is waited for
(:class:`~sharded_rmsprop.sync.ShardSync`); copying or pickling the model is refused while a
sync is in flight. Results are the blocking sync's, bit for bit: the same collectives run in
the same order, only the wait moves.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from .sharding import Sharding
    from .shards import ShardedBucket
    from .sync import ShardSync

__all__ = ["ParamSyncOverlap", "overlap"]


class ParamSyncOverlap:
    """The hooks on one model that wait for its parameters' buckets (see the module
    docstring). :meth:`remove` takes them off and makes ``step()`` blocking again. The hooks
    hold the optimizer's sync weakly: once the optimizer is gone they do nothing."""

    def __init__(self, sync: ShardSync | _NothingInFlight, model: nn.Module | None) -> None:
        """Hooks on every module of ``model`` (none if None: a copied model's)."""
        self._sync = weakref.ref(sync, self._take_hooks_off)  # (off once the optimizer is gone)
        #: Each module's own parameters and children, as they were at registration (what a
        #: module holds during ``torch.func.functional_call`` is not the optimizer's).
        self._own: dict[nn.Module, list[Any]] = {}
        self._children: dict[nn.Module, list[nn.Module]] = {}
        #: Modules whose forward has been seen to start in training mode.
        self.seen: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        #: The buckets each module's forward waits for (rebuilt when ``seen`` or the
        #: buckets change).
        self._waits: dict[nn.Module, list[ShardedBucket]] = {}
        self._laid_out: tuple[int, ...] = ()
        self._bucket_of: dict[int, ShardedBucket] = {}
        #: Buckets with parameters outside the model: waited for by every forward pre-hook.
        self._outside: list[ShardedBucket] = []
        self.handles: list[RemovableHandle] = []
        for module in model.modules() if model is not None else ():
            self._own[module] = list(module.parameters(recurse=False))
            self._children[module] = list(module.children())
            self.handles += [
                module.register_forward_pre_hook(self._before_forward, prepend=True),
                module.register_state_dict_pre_hook(self._wait_for_all),
                module.register_load_state_dict_pre_hook(self._wait_for_all),
            ]
        sync.marks_stale = True

    @property
    def sync(self) -> ShardSync | _NothingInFlight:
        return self._sync() or _NOTHING_IN_FLIGHT

    def __reduce_ex__(self, protocol: int) -> Any:
        """A copy or pickle of a hooked model (``copy.deepcopy(model)``, ``torch.save(model)``)
        gets hooks that do nothing: its parameters are not this optimizer's. Refused while
        the sync is in flight: a module's own parameters are copied before its hooks are."""
        if self.sync.pending:
            raise RuntimeError(
                "copying or pickling a model whose parameter sync is in flight "
                "(overlap_param_sync) would copy unsynced values: call "
                "optimizer.wait_for_params() first"
            )
        return (ParamSyncOverlap, (_NOTHING_IN_FLIGHT, None))

    def remove(self) -> None:
        """Wait for the sync in flight, take the hooks off, and sync in ``step()`` again."""
        self.sync.wait_all()
        self.sync.marks_stale = False
        self._take_hooks_off()

    def _take_hooks_off(self, *_: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        sync = self.sync
        if not module.training:  # (torch's fast paths read children's weights in eval mode)
            sync.wait_all()
            return
        if module not in self.seen:
            self.seen.add(module)
            self._waits.clear()
        if sync.pending:
            sync.wait(self._waits_of(module, sync))

    def _wait_for_all(self, *args: Any) -> None:
        """Before the model's state dict is read or loaded."""
        self.sync.wait_all()

    def _waits_of(self, module: nn.Module, sync: ShardSync) -> list[ShardedBucket]:
        """The buckets of ``module``'s own parameters, of every child whose forward has not
        been seen, and of the optimizer's parameters outside the model."""
        laid_out = tuple(map(id, sync.buckets))
        if laid_out != self._laid_out:
            self._laid_out = laid_out
            self._bucket_of = {id(p): b for b in sync.buckets for p in b.params}
            in_model = {id(p) for params in self._own.values() for p in params}
            self._outside = [
                b for b in sync.buckets if any(id(p) not in in_model for p in b.params)
            ]
            self._waits.clear()
        if module not in self._waits:
            params = list(self._own.get(module, ()))
            unseen = [c for c in self._children.get(module, ()) if c not in self.seen]
            while unseen:  # their whole subtrees
                child = unseen.pop()
                params += self._own.get(child, ())
                unseen += self._children.get(child, ())
            buckets = {id(b): b for b in self._outside}
            for param in params:
                bucket = self._bucket_of.get(id(param))
                if bucket is not None:
                    buckets[id(bucket)] = bucket
            self._waits[module] = list(buckets.values())
        return self._waits[module]


class _NothingInFlight:
    """The sync seen by hooks whose optimizer is gone, or by a copied model's: never anything
    in flight."""

    buckets: tuple = ()
    pending: dict = {}
    marks_stale = False

    def wait(self, buckets: Any) -> None:
        pass

    def wait_all(self) -> None:
        pass


_NOTHING_IN_FLIGHT = _NothingInFlight()


def overlap(sharding: Sharding, model: nn.Module) -> ParamSyncOverlap:
    """Leave the sync of ``sharding`` running behind ``model``'s forward
    (``ShardedRMSprop.overlap_param_sync``): the hooks, registered."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"overlap_param_sync() takes an nn.Module, got {type(model).__name__}")
    sync = sharding.sync
    if sharding.overlapping:
        raise RuntimeError(
            "overlap_param_sync() was already called on this optimizer; to hook several "
            "models, put them in one nn.ModuleList"
        )
    mine = {id(p) for bucket in sync.buckets for p in bucket.params}
    if not any(id(p) in mine for p in model.parameters()):
        raise ValueError(
            "overlap_param_sync(): the model holds none of this optimizer's parameters"
        )
    sharding.param_overlap = ParamSyncOverlap(sync, model)
    return sharding.param_overlap
