"""The DDP side of reduce-scattered gradients: which parameters DDP reduces, and the
communication hook a DDP model keeps for its lifetime.

DDP takes one communication hook and never gives it back: ``reduce_scatter_gradients()``
registers :func:`reduce_scatter_hook` once per model, with the model's :class:`DDPHookSlot`,
which calls the gradient reduction attached now
(:class:`~sharded_rmsprop.grad_reduction.GradientReduceScatter`) and all-reduces as DDP's own
hook does while none is.
"""

from __future__ import annotations

import weakref
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from .comm import DataParallelGroup

__all__ = [
    "AttachedReduction",
    "DDPHookSlot",
    "ddp_parameters",
    "group_ranks",
    "reduce_scatter_hook",
    "reducible_parameters",
]


def reducible_parameters(
    ddp_model: DistributedDataParallel, group: dist.ProcessGroup | None
) -> list[Tensor]:
    """The parameters whose gradients ``ddp_model`` reduces, once it is checked to be a DDP
    model whose gradients can be reduce-scattered over ``group`` (``TypeError`` or
    ``ValueError`` saying why not)."""
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            "reduce_scatter_gradients() takes the DistributedDataParallel model whose "
            f"gradients the optimizer steps, got {type(ddp_model).__name__}"
        )
    ours, theirs = group_ranks(group), group_ranks(ddp_model.process_group)
    if ours != theirs:
        raise ValueError(
            f"reduce_scatter_gradients(): the DDP model averages over ranks {theirs}, the "
            f"optimizer shards over ranks {ours}: give both the same process group (a "
            "node-local optimizer group with a DDP model over all ranks needs DDP's "
            "all-reduce)"
        )
    if ddp_model.gradient_as_bucket_view:
        raise ValueError(
            "reduce_scatter_gradients() needs DDP(..., gradient_as_bucket_view=False): with "
            "gradients that are views of DDP's buckets, a gradient reset and one added to "
            "cannot be told apart"
        )
    if getattr(ddp_model, "mixed_precision", None) is not None:
        raise ValueError(
            "reduce_scatter_gradients() does not take a DDP model with mixed_precision"
        )
    params = ddp_parameters(ddp_model)
    if any(param.is_complex() for param in params):
        raise ValueError(
            "reduce_scatter_gradients() does not take complex parameters: DDP hands their "
            "gradients to a communication hook as real views of half their length"
        )
    return params


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """The global ranks of ``group`` (the default group if None)."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def ddp_parameters(ddp_model: DistributedDataParallel) -> list[Tensor]:
    """The parameters whose gradients DDP reduces: those that require a gradient and are not
    ignored (``parameters_to_ignore``), each once."""
    ignored = ddp_model.parameters_to_ignore
    found: dict[int, Tensor] = {}
    for module_name, module in ddp_model.module.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and f"{module_name}.{name}" not in ignored:
                found.setdefault(id(param), param)
    return list(found.values())


class AttachedReduction(Protocol):
    """What a slot calls: the gradient reduction of one optimizer."""

    slot: DDPHookSlot | None

    @property
    def has_optimizer(self) -> bool:
        """Whether its optimizer is still there on this rank."""

    def reduce(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """DDP's communication hook, for one of its buckets."""


class DDPHookSlot:
    """The communication hook of one DDP model, registered once for its lifetime (DDP takes
    one and never gives it back): it calls the reduction of the optimizer attached now, held
    weakly, and all-reduces as DDP's own hook does when none is (before every rank attached,
    after :meth:`ShardedRMSprop.close`, once the optimizer is gone). So a hook never outlives
    its optimizer, and another optimizer can train the model, or attach, afterwards.

    When Python frees a dropped optimizer depends on each rank's garbage collector, so the
    ranks agree at the start of each backward whether every rank's is still there (one host
    all-reduce of a flag, only while one is attached): they reduce-scatter or all-reduce
    together, never some of each."""

    def __init__(self, data_parallel: DataParallelGroup) -> None:
        self.data_parallel = data_parallel
        self._attached: weakref.ref[AttachedReduction] | None = None
        self._in_backward = False

    @classmethod
    def of(
        cls, ddp_model: DistributedDataParallel, data_parallel: DataParallelGroup
    ) -> DDPHookSlot:
        """``ddp_model``'s slot, registered as its communication hook on first use (DDP
        refuses it where another hook was registered: a RuntimeError)."""
        slot = _SLOTS.get(ddp_model)
        if slot is None:
            slot = cls(data_parallel)
            ddp_model.register_comm_hook(slot, reduce_scatter_hook)
            _SLOTS[ddp_model] = slot
        return slot

    @property
    def attached(self) -> AttachedReduction | None:
        """The reduction attached here, if its optimizer is still there on this rank."""
        reduction = None if self._attached is None else self._attached()
        if reduction is not None and not reduction.has_optimizer:
            return None  # (its optimizer is gone; the reduction lingers in a reference cycle)
        return reduction

    def attach(self, reduction: AttachedReduction) -> None:
        self._attached = weakref.ref(reduction)
        reduction.slot = self

    def detach(self, reduction: AttachedReduction) -> None:
        if self.attached is reduction:
            self._attached = None
        reduction.slot = None

    def reduce(self, bucket: dist.GradBucket) -> torch.futures.Future:
        try:
            if not self._in_backward:
                self._in_backward = True
                self._agree_on_the_attached()
            if bucket.is_last():
                self._in_backward = False
            reduction = self.attached
            if reduction is None:
                return default_hooks.allreduce_hook(self.data_parallel.group, bucket)
            return reduction.reduce(bucket)
        except BaseException:
            self._in_backward = False
            raise

    def _agree_on_the_attached(self) -> None:
        """Detach, on every rank, a reduction whose optimizer is gone on some rank. (Attaching
        and :meth:`ShardedRMSprop.close` are collective: ``_attached`` is set alike.)"""
        if self._attached is not None:
            if not self.data_parallel.all_true(self.attached is not None):
                self._attached = None


#: Each DDP model's slot, for as long as the model lives.
_SLOTS: weakref.WeakKeyDictionary[DistributedDataParallel, DDPHookSlot] = (
    weakref.WeakKeyDictionary()
)


def reduce_scatter_hook(
    state: DDPHookSlot, bucket: dist.GradBucket
) -> torch.futures.Future[Tensor]:
    """The communication hook ``reduce_scatter_gradients()`` gives DDP (``state``: the DDP
    model's :class:`DDPHookSlot`)."""
    return state.reduce(bucket)


# DDP compares the hook's annotations with the classes themselves, not their names.
reduce_scatter_hook.__annotations__.update(
    bucket=dist.GradBucket, state=DDPHookSlot, **{"return": torch.futures.Future[Tensor]}
)
