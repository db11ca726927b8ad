"""``ShardView``: one rank's range of an optimizer buffer, as DCP sees it.

In the sharded state dict every buffer of a parameter is a 1-D tensor of the parameter's
``numel`` elements of which this rank holds only the range it owns. :class:`ShardView` is
that tensor: it tells ``torch.distributed.checkpoint`` where its range lies
(``__create_write_items__``, ``__create_chunk_list__``, ``__get_tensor_shard__``), so each
rank writes only its ranges and a load at another world size reads whatever saved ranges
overlap the ranges it now owns. Its data is ``local``.

It also survives what users do with a state dict: ``copy.deepcopy``, ``clone()``,
``detach()`` and ``to()`` give ShardViews; ``torch.save`` pickles it as itself, and
``torch.load`` reads it back as a ShardView, ``weights_only=True`` included (the class is
registered with ``torch.serialization.add_safe_globals`` when this module is imported, as
torch registers ``DTensor``; its constructor checks what it is given). Files from earlier
versions hold it as plain data (an ``OrderedDict`` of its numel under :data:`PLAIN_MARK`, its
offset and its local tensor), which :meth:`ShardedRMSprop.load_state_dict` still accepts
(:func:`from_plain`). Pickling a range
short of the whole buffer warns once per state dict (:class:`IncompleteStateWarning`): that
is how a trainer saving rank 0's state dict alone would silently lose the other ranks' state.

It compares as its range together with its place: element-wise operations (``==``, ``isclose``,
``abs`` of a difference) between ShardViews of the same place (offset and whole length), or
with numbers, give a ShardView of that place (in place: the same ShardView); ``all()`` and
``any()`` of a boolean ShardView, ``torch.equal`` between ShardViews, and ``bool()`` or
``item()`` of one that holds its whole tensor answer for the range. So ``torch.equal``,
``torch.testing.assert_close`` and torch's ``TestCase.assertEqual`` compare two state dicts of
the same rank. Anything else, such as a reduction over the numbers, or the arithmetic of
``torch.optim.RMSprop`` given this state dict (whose gradients are whole tensors), is a
``RuntimeError`` that says what it is: a rank's range is not the tensor.
"""

from __future__ import annotations

import itertools
import numbers
import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

__all__ = [
    "IncompleteStateWarning",
    "ShardView",
    "from_plain",
    "new_origin",
    "warn_incomplete",
]

#: The key that marks a ShardView written as plain data (by earlier versions); its value is
#: the buffer's numel.
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
#: Reductions that answer for a boolean range: "every element here", "some element here".
_BOOLEAN_REDUCTIONS = {_aten.all.default, _aten.any.default}
#: Reading the one value of a tensor: only a ShardView that holds its whole tensor answers.
_SCALAR_READS = {_aten._local_scalar_dense.default, _aten.is_nonzero.default}


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
        # (also what unpickling calls, with what a file says: checked)
        if not (isinstance(local, Tensor) and local.dim() == 1 and not isinstance(local, cls)):
            raise ValueError(f"a ShardView's local range must be a 1-D tensor, got {local!r}")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (offset, numel)):
            raise ValueError(
                f"a ShardView's offset and numel must be integers: {offset!r}, {numel!r}"
            )
        if not 0 <= offset <= offset + local.numel() <= numel:
            raise ValueError(
                f"a ShardView's range [{offset}, {offset + local.numel()}) is not within "
                f"[0, {numel})"
            )
        view = torch.Tensor._make_wrapper_subclass(
            cls, (numel,), dtype=local.dtype, device=local.device
        )
        view.local = local
        view.offset = offset
        view.origin = origin
        return view

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        view = args[0] if args else None
        if func in _SAME_RANGE and isinstance(view, ShardView):
            local = func(view.local, *args[1:], **kwargs)
            return ShardView(local, view.offset, view.numel(), view.origin)
        if func is _aten.equal.default and all(isinstance(a, ShardView) for a in args):
            return _place(args[0]) == _place(args[1]) and torch.equal(args[0].local, args[1].local)
        if func in _BOOLEAN_REDUCTIONS and view.dtype == torch.bool and not args[1:] and not kwargs:
            return func(view.local)
        if func in _SCALAR_READS and view.local.numel() == view.numel():
            return func(view.local)
        if torch.Tag.pointwise in func.tags and "out" not in kwargs:
            place = _common_place(args, kwargs)
            in_place = func.overloadpacket.__name__.endswith("_")  # add_, the form that writes self
            if place is not None and (isinstance(view, ShardView) or not in_place):
                unwrap = lambda a: a.local if isinstance(a, ShardView) else a  # noqa: E731
                result = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
                if in_place:
                    return view
                return tree_map(
                    lambda t: ShardView(t, *place) if isinstance(t, Tensor) else t, result
                )
        raise RuntimeError(
            f"{func} was called on a ShardView: it is one rank's range of an optimizer buffer, "
            "from ShardedRMSprop.state_dict() (the sharded format for "
            "torch.distributed.checkpoint). It compares with ShardViews of the same range; "
            "torch.optim.RMSprop and arithmetic need whole tensors: use "
            "ShardedRMSprop.full_state_dict()"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardView:
        return ShardView(self.local.clone(), self.offset, self.numel(), self.origin)

    def __reduce_ex__(self, protocol: int) -> Any:
        """Pickled as itself (the constructor and its arguments), which ``torch.load`` reads
        back with ``weights_only=True`` too; a range short of the whole buffer warns, once per
        state dict (:func:`warn_incomplete`)."""
        if self.local.numel() < self.numel():
            warn_incomplete(self.origin)
        return (ShardView, (self.local, self.offset, self.numel()))

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


def _place(view: ShardView) -> tuple[int, int]:
    return view.offset, view.numel()


def _common_place(args: Any, kwargs: Any) -> tuple[int, int] | None:
    """The place (offset, numel) that every tensor among the arguments shares, None if they
    do not: each is a ShardView of that place, or a number (a 0-d tensor, a Python scalar)."""
    places = set()
    for value in tree_flatten((args, kwargs))[0]:
        if isinstance(value, ShardView):
            places.add(_place(value))
        elif isinstance(value, Tensor) and value.dim() > 0:
            return None
        elif not isinstance(value, (Tensor, numbers.Number, type(None), torch.dtype, str)):
            return None
    return places.pop() if len(places) == 1 else None


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


def from_plain(value: Any) -> Any:
    """A ShardView again from the plain data earlier versions pickled it as; anything else
    as it is."""
    if isinstance(value, OrderedDict) and PLAIN_MARK in value:
        local = value.get("local")
        numel, offset = value[PLAIN_MARK], value.get("offset")
        if not (isinstance(local, Tensor) and isinstance(numel, int) and isinstance(offset, int)):
            raise ValueError("a shard of a sharded state dict is damaged: it lacks local or offset")
        return ShardView(local.reshape(-1), offset, numel)
    return value


torch.serialization.add_safe_globals([ShardView])
