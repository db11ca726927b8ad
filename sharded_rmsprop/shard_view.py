"""``ShardView``: one rank's range of an optimizer buffer, as DCP sees it.

In the sharded state dict every buffer of a parameter is a 1-D tensor of the parameter's
``numel`` elements of which this rank holds only the range it owns. :class:`ShardView` is
that tensor: it tells ``torch.distributed.checkpoint`` where its range lies
(``__create_write_items__``, ``__create_chunk_list__``, ``__get_tensor_shard__``), so each
rank writes only its ranges and a load at another world size reads whatever saved ranges
overlap the ranges it now owns. Its data is ``local``.

It also survives what users do with a state dict: ``copy.deepcopy``, ``clone()``,
``detach()`` and ``to()`` give ShardViews; ``torch.save`` writes it as plain data
(:func:`as_plain`), which ``torch.load(..., weights_only=True)`` reads back and
:meth:`ShardedRMSprop.load_state_dict` accepts (:func:`from_plain`). Pickling a range short of
the whole buffer warns once per state dict (:class:`IncompleteStateWarning`): that is how a trainer
saving rank 0's state dict alone would silently lose the other ranks' state. Any other
operation, such as the arithmetic of ``torch.optim.RMSprop`` given this state dict, is a
``RuntimeError`` that says what it is.
"""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

__all__ = [
    "IncompleteStateWarning",
    "ShardView",
    "as_plain",
    "from_plain",
    "new_origin",
    "warn_incomplete",
]

#: The key that marks a ShardView written as plain data; its value is the buffer's numel.
PLAIN_MARK = "sharded_rmsprop_shard_of_numel"

_aten = torch.ops.aten
#: Operations whose result is the same range of a buffer (a copy, a view, another dtype or
#: device): applied to ``local``, they give a ShardView.
_SAME_RANGE = {
    _aten.clone.default,
    _aten.detach.default,
    _aten.alias.default,
    _aten._to_copy.default,
}


class ShardView(torch.Tensor):
    """The range ``[offset, offset + local.numel())`` of a 1-D tensor of ``numel`` elements.

    Only DCP's checkpointing protocol (``__create_write_items__``, ``__create_chunk_list__``,
    ``__get_tensor_shard__``) is meant to touch it; its data is ``local``.
    """

    local: Tensor
    offset: int
    #: The state dict it was made for (:func:`new_origin`; 0: none known), so that pickling
    #: a state dict warns once, not once per tensor.
    origin: int

    @staticmethod
    def __new__(cls, local: Tensor, offset: int, numel: int, origin: int = 0) -> ShardView:
        view = torch.Tensor._make_wrapper_subclass(
            cls, (numel,), dtype=local.dtype, device=local.device
        )
        view.local = local
        view.offset = offset
        view.origin = origin
        return view

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        view = args[0] if args else None
        if func in _SAME_RANGE and isinstance(view, ShardView):
            local = func(view.local, *args[1:], **(kwargs or {}))
            return ShardView(local, view.offset, view.numel(), view.origin)
        raise RuntimeError(
            f"{func} was called on a ShardView: it is one rank's range of an optimizer buffer, "
            "from ShardedRMSprop.state_dict() (the sharded format for "
            "torch.distributed.checkpoint). torch.optim.RMSprop and arithmetic need whole "
            "tensors: use ShardedRMSprop.full_state_dict()"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardView:
        return ShardView(self.local.clone(), self.offset, self.numel(), self.origin)

    def __reduce_ex__(self, protocol: int) -> Any:
        """Pickled as plain data (:func:`as_plain`), which ``weights_only`` loads read; a range
        short of the whole buffer warns, once per state dict (:func:`warn_incomplete`)."""
        if self.local.numel() < self.numel():
            warn_incomplete(self.origin)
        return (OrderedDict, (list(as_plain(self).items()),))

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(
            offsets=torch.Size([self.offset]), sizes=torch.Size([self.local.numel()])
        )

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        if self.local.numel() == 0:
            return []
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size([self.offset])),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=self._chunk(),
                    properties=TensorProperties.create_from_tensor(self.local),
                    size=self.size(),
                ),
            )
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()] if self.local.numel() else []

    def __get_tensor_shard__(self, index: MetadataIndex) -> Tensor:
        return self.local

    def __repr__(self) -> str:  # the default repr would dispatch an op
        return f"ShardView(numel={self.numel()}, offset={self.offset}, local={self.local.numel()})"


class IncompleteStateWarning(UserWarning):
    """One rank's shard of a sharded optimizer state was pickled, as if it were the whole."""


_origins = itertools.count(1)
_warned_origins: set[int] = set()


def new_origin() -> int:
    """A number for the ShardViews of one new state dict."""
    return next(_origins)


def warn_incomplete(origin: int) -> None:
    """Warn, once per state dict (``origin``), that a state dict holding one rank's ranges is
    being pickled: saved alone (``torch.save`` on rank 0, as trainers do) it lacks the other
    ranks' state. (Gathering every rank's state dict with ``all_gather_object`` warns too.)"""
    if origin in _warned_origins:
        return
    _warned_origins.add(origin)
    warnings.warn(
        "pickling ShardedRMSprop.state_dict() of one rank of several (torch.save, say): it "
        "holds only this rank's shard of the optimizer state (the sharded format, for "
        "torch.distributed.checkpoint), so a file saved from it alone lacks the other ranks' "
        "state. Call optimizer.consolidate_state_dict(to=0) on every rank first (rank 0's "
        "state_dict() then holds the whole state), or full_state_dict(), or save with "
        "torch.distributed.checkpoint; for HF Trainer, accelerate and Lightning see "
        "sharded_rmsprop.integrations",
        IncompleteStateWarning,
        stacklevel=3,
    )


def as_plain(view: ShardView) -> OrderedDict:
    """``view`` as plain data: its numel (under :data:`PLAIN_MARK`), offset and local tensor."""
    return OrderedDict([(PLAIN_MARK, view.numel()), ("offset", view.offset), ("local", view.local)])


def from_plain(value: Any) -> Any:
    """A ShardView again from what :func:`as_plain` made of it; anything else as it is."""
    if isinstance(value, OrderedDict) and PLAIN_MARK in value:
        local = value.get("local")
        numel, offset = value[PLAIN_MARK], value.get("offset")
        if not (isinstance(local, Tensor) and isinstance(numel, int) and isinstance(offset, int)):
            raise ValueError("a shard of a sharded state dict is damaged: it lacks local or offset")
        return ShardView(local.reshape(-1), offset, numel)
    return value
