"""One bucket on one rank: the flat parameter buffer, the owned shard and its RMSprop state.

A :class:`ShardedBucket` turns a :class:`~sharded_rmsprop.layout.BucketPlan` into tensors:

- ``flat``: every parameter of the bucket end to end; each parameter's tensor lies in it, so
  the parameter sync writes them in place. Its sync strategy (``sync``,
  :mod:`sharded_rmsprop.buffer_sync`) made it: private, or one buffer that all ranks of the
  host map (then each rank's update is everyone's). Each parameter's tensor has a storage
  of its own over its range of ``flat`` (:func:`own_storage_view`), not a view of ``flat``'s
  storage: what saves a parameter or a model's state dict (``torch.save``, safetensors)
  writes that parameter's bytes alone and sees no storage shared between parameters.
- ``shard``: the rank's range of ``flat`` (a view).
- ``grad_window``: where the owned slices of the gradients are staged for the update, one
  window of at most :data:`GRAD_WINDOW_NUMEL` elements of the shard at a time: the update
  reads them while they are still in cache, and no rank holds a shard-sized gradient copy.
- ``state``: ``square_avg``, ``momentum_buffer`` and ``grad_avg`` for the owned range only,
  each allocated on first use; with master weights also ``master_weight``, a float32 copy of
  the shard, taken from the parameters when it is allocated.
- With master weights (16-bit parameters), the update runs in float32 on ``master_weight``
  with float32 state and gradient window, and writes the rounded result into ``shard``.
- ``steps``: torch's per-parameter ``step`` counters (CPU, torch's dtype for them) for every
  parameter of the bucket, owned or not, so every rank can report them.
- ``kernel``: the update it runs on its shard, span by span, with each span's param-group
  options (chosen for its device and update dtype; None on the meta device).

Which state buffers exist is one rule, :meth:`ShardedBucket.keys_for`, a function of a
param group's options: allocation, ``optimizer.state[p]`` and checkpoints all follow it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .kernels import UpdateFn
from .kernels.contract import LOW_PRECISION_DTYPES  # (those that get float32 master weights)
from .layout import BucketPlan, Piece
from .memory_order import in_order, order_of
from .options import OPTION_KEYS
from .windows import Span, Window, pack, plan_windows

if TYPE_CHECKING:
    from .buffer_sync import BufferSync

__all__ = [
    "BucketScan",
    "GRAD_WINDOW_NUMEL",
    "MASTER_KEY",
    "STATE_KEYS",
    "ShardedBucket",
    "own_storage_view",
    "state_keys_for",
    "update_dtype_for",
]

#: Elements of the shard whose gradients are staged at once (16 MB in float32). Large enough
#: that a kernel launch per window costs nothing next to its memory traffic, small enough to
#: stay in a CPU's cache between the copy and the update.
GRAD_WINDOW_NUMEL = 1 << 22

#: torch.optim.RMSprop's per-element state buffers.
STATE_KEYS = ("square_avg", "momentum_buffer", "grad_avg")

#: The float32 copy of a 16-bit parameter that the update runs on, in the state beside them.
MASTER_KEY = "master_weight"


def update_dtype_for(dtype: torch.dtype, master_weights: bool) -> torch.dtype:
    """The dtype in which parameters of ``dtype`` are updated and their state is kept:
    float32 for 16-bit parameters with master weights, else their own."""
    return torch.float32 if master_weights and dtype in LOW_PRECISION_DTYPES else dtype


def state_keys_for(options: Mapping[str, Any]) -> tuple[str, ...]:
    """The buffers torch.optim.RMSprop keeps for a parameter of a group with ``options``."""
    wanted = (True, options["momentum"] > 0, bool(options["centered"]))
    return tuple(key for key, want in zip(STATE_KEYS, wanted) if want)


def _step_dtype() -> torch.dtype:
    """The dtype torch.optim.RMSprop gives its ``step`` tensors."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class ShardedBucket:
    """The tensors of one :class:`BucketPlan` on one rank (see the module docstring)."""

    def __init__(
        self,
        plan: BucketPlan,
        rank: int,
        params: Sequence[Tensor],
        sync: BufferSync,
        flat: Tensor,
        master_weights: bool = False,
        kernel: UpdateFn | None = None,
    ) -> None:
        """``sync``: how ``flat``, a zero buffer it made for ``plan``, gets the other ranks'
        shards (:mod:`sharded_rmsprop.buffer_sync`). ``master_weights``: keep float32 master
        weights (for 16-bit parameters only). ``kernel``: the update (None while on the meta
        device)."""
        if len(params) != len(plan.slots):
            raise ValueError(f"the plan has {len(plan.slots)} slots, got {len(params)} params")
        self.plan = plan
        self.kernel = kernel
        self.params = list(params)
        self.pieces = plan.pieces(rank)
        self._owned_piece = {piece.slot.index: piece for piece in self.pieces}
        self._position = {slot.index: i for i, slot in enumerate(plan.slots)}
        self.group_indices = sorted({slot.group for slot in plan.slots})
        #: How ``flat`` gets the other ranks' shards.
        self.sync = sync
        #: Positions whose master weights are to be copied from the parameters at the next
        #: step (a checkpoint without them was loaded, the parameter was replaced, or the
        #: user asked for it; the model's weights may be loaded after the optimizer's).
        self.master_pending: set[int] = set()
        self.flat = self._flatten_params(flat)
        start, end = plan.shard_range(rank)
        self.shard = self.flat[start:end]
        #: The dtype of the update's arithmetic, of the state and of ``grad_window``.
        self.compute_dtype = update_dtype_for(plan.dtype, master_weights)
        self.master_weights = self.compute_dtype != plan.dtype
        self.grad_window = torch.zeros(
            min(plan.shard_numel, GRAD_WINDOW_NUMEL), dtype=self.compute_dtype, device=plan.device
        )
        #: This rank's gradient windows, planned once (a step only looks up which are present).
        self._windows = plan_windows(self.pieces, self.position_of, self.grad_window)
        self._windows_of: dict[int, list[Window]] = {}
        self.state: dict[str, Tensor] = {}
        #: The buffers each group's parameters showed in ``optimizer.state`` when last built.
        self.viewed_keys: list[tuple[str, ...]] = []
        self.steps = torch.zeros(len(self.params), dtype=_step_dtype())

    def _flatten_params(self, flat: Tensor) -> Tensor:
        """Copy the parameters into ``flat`` (where this rank fills it) and make them views
        of it."""
        self.views = [
            own_storage_view(flat, slot.offset, slot.end, slot.shape, slot.strides)
            for slot in self.plan.slots
        ]
        self._view_layouts = [(v.data_ptr(), v.shape, v.stride()) for v in self.views]
        self._view_flat(range(len(self.params)))
        return flat

    def copy(
        self, rank: int, params: Sequence[Tensor], sync: BufferSync, flat: Tensor
    ) -> ShardedBucket:
        """A bucket of its own for ``params`` (copies of this one's parameters, with their
        values) in ``flat``, synced by ``sync``, holding copies of this one's state, step
        counts and pending reloads."""
        twin = ShardedBucket(self.plan, rank, params, sync, flat, self.master_weights, self.kernel)
        twin.state = {key: buffer.clone() for key, buffer in self.state.items()}
        twin.steps = self.steps.clone()
        twin.master_pending = set(self.master_pending)
        return twin

    def is_replaced(self, position: int) -> bool:
        """Whether the parameter at ``position`` no longer is its view of ``flat``: another
        tensor (``p.data = ...``, ``module.to_empty(...)``), or another view of the same memory
        (``p.data = p.data.t()``, a reshape)."""
        return not _is_view(self.params[position], self._view_layouts[position], self.plan.dtype)

    def scan(self, check_grad: Callable[[Tensor], None] | None = None) -> BucketScan:
        """One pass over the parameters: which have a gradient (``check_grad`` raises for one
        torch would reject), and which were replaced since the last step, those that can be
        adopted (same shape, dtype and device) and those that cannot.

        Every step runs it, so it is one loop doing the least per parameter.
        """
        found = BucketScan([], [], [])
        dtype = self.plan.dtype
        for position, (param, layout) in enumerate(zip(self.params, self._view_layouts)):
            grad = param.grad
            found.has_grad.append(grad is not None)
            if (
                check_grad is not None
                and grad is not None
                and (grad.is_sparse or grad.shape != layout[1])
            ):
                check_grad(param)  # raises torch's error (unless the parameter was reshaped)
            if not _is_view(param, layout, dtype):
                change = self._change(position)
                if change:
                    found.foreign.append((position, change))
                else:
                    found.adoptable.append(position)
        return found

    def _change(self, position: int) -> str:
        """What makes a replaced parameter impossible to adopt, in words ("" if nothing).
        Leaving the meta device is no such change: the bucket is then made anew there. A
        new memory format is one (``model.to(memory_format=...)`` after building the
        optimizer): adopting it would lay the parameter out as before, under a DDP model
        built since with the new strides, whose buckets then hold its gradients in another
        order than the optimizer reads."""
        param, slot = self.params[position], self.plan.slots[position]
        return ", ".join(
            f"{what} {now}, not {was}"
            for what, now, was in (
                ("dtype", param.dtype, self.plan.dtype),
                ("device", param.device, self.plan.device),
                ("shape", tuple(param.shape), slot.shape),
                ("memory order", order_of(param.shape, param.stride()), slot.order),
            )
            if now != was and not (what == "device" and self.on_meta)
        )

    @property
    def on_meta(self) -> bool:
        """Whether the bucket was laid out on the meta device (to be made on a real one)."""
        return self.plan.device.type == "meta"

    def materialized(
        self, rank: int, plan: BucketPlan, sync: BufferSync, flat: Tensor, kernel: UpdateFn
    ) -> ShardedBucket:
        """This meta bucket made anew by ``plan`` on the device where all its parameters now
        are, running ``kernel``: ``flat`` (synced by ``sync``) holding their values, their
        step counts and pending reloads (a meta bucket's state holds no values: buffers are
        made anew at the next step)."""
        real = ShardedBucket(plan, rank, self.params, sync, flat, self.master_weights, kernel)
        real.steps = self.steps.clone()
        real.master_pending = set(self.master_pending)
        return real

    def adopt(self, positions: Sequence[int]) -> None:
        """Make the replaced parameters at ``positions`` views of ``flat`` again, their
        values copied into it (by rank 0 alone for a shared buffer: barrier afterwards);
        their master weights are taken from them at the next step."""
        self._view_flat(positions)
        self.master_pending.update(positions)

    def _view_flat(self, positions: Iterable[int]) -> None:
        """Copy the parameters at ``positions`` into ``flat`` (unless another rank fills a
        shared one) and make them views of it."""
        for position in positions:
            param, view = self.params[position], self.views[position]
            if self.sync.fills_flat:
                values = param.detach()
                if _overlaps(values, view):
                    values = values.clone()  # another view of the same memory (a transpose)
                view.copy_(values)
            param.data = view

    def allocate_state(self, groups: Sequence[Mapping[str, Any]]) -> bool:
        """Create the shard-sized buffers that the param groups of this bucket (in
        ``groups``, the optimizer's) need and do not have yet; True if any was new."""
        new = [key for key in self.needed_keys(groups) if key not in self.state]
        for key in new:
            self.state[key] = self.new_state(key, 0, self.shard.numel())
        return bool(new)

    def new_state(self, key: str, start: int, end: int) -> Tensor:
        """What buffer ``key`` holds when it is created, for shard elements ``[start, end)``
        (a new tensor): zeros, or for ``master_weight`` the parameters' current values."""
        if key == MASTER_KEY:
            return self.shard[start:end].to(self.compute_dtype, copy=True)
        return torch.zeros(end - start, dtype=self.compute_dtype, device=self.shard.device)

    def param_values(self, piece: Piece) -> Tensor:
        """The owned elements of ``piece``'s parameter as the parameter holds them now
        (replaced or not), as a new tensor in the compute dtype."""
        param = self.params[self.position_of(piece)].detach()
        return in_order(param, piece.slot.order)[piece.param_start : piece.param_end].to(
            self.compute_dtype, copy=True
        )

    def saved_master(self) -> Tensor:
        """The master weights a checkpoint holds: the buffer, except where they are to be
        taken from the parameters at the next step (reloads asked for, parameters replaced by
        tensors it can adopt, not allocated yet), which come from the parameters as they are
        now."""
        master = self.state.get(MASTER_KEY)
        stale = []
        for piece in self.pieces:
            position = self.position_of(piece)
            replaced = self.is_replaced(position)
            if replaced and self._change(position):
                continue  # a tensor it cannot adopt (the next step says so): keep the buffer
            if master is None or replaced or position in self.master_pending:
                stale.append(piece)
        if master is not None and not stale:
            return master
        saved = (
            master.clone()
            if master is not None
            else self.new_state(MASTER_KEY, 0, self.shard.numel())
        )
        for piece in stale:
            saved[piece.shard_start : piece.shard_end] = self.param_values(piece)
        return saved

    def take_pending_master_weights(self) -> None:
        """Copy the parameters into the master weights of the positions waiting for it."""
        if self.master_weights and MASTER_KEY in self.state:
            master = self.state[MASTER_KEY]
            for position in self.master_pending:
                piece = self.owned_piece(position)
                if piece is not None:
                    owned = slice(piece.shard_start, piece.shard_end)
                    master[owned].copy_(self.shard[owned])
        self.master_pending.clear()

    @property
    def update_target(self) -> Tensor:
        """What the update kernel runs on: the master weights, or the shard itself."""
        return self.state[MASTER_KEY] if self.master_weights else self.shard

    def position_of(self, piece: Piece) -> int:
        """The position in the bucket of the parameter ``piece`` belongs to."""
        return self._position[piece.slot.index]

    def owned_piece(self, position: int) -> Piece | None:
        """The part of the parameter at ``position`` that this rank owns, if any."""
        return self._owned_piece.get(self.plan.slots[position].index)

    def keys_for(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The buffers a parameter of a group with ``options`` has here: torch's, and the
        master weights if the bucket keeps them."""
        return state_keys_for(options) + ((MASTER_KEY,) if self.master_weights else ())

    def needed_keys(self, groups: Sequence[Mapping[str, Any]]) -> list[str]:
        """The buffers that the param groups of this bucket (in ``groups``, the optimizer's)
        need, in one order on every rank."""
        needed = {key for g in self.group_indices for key in self.keys_for(groups[g])}
        return [key for key in (MASTER_KEY, *STATE_KEYS) if key in needed]

    def param_state(self, position: int, groups: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """torch-style state of the parameter at ``position`` on this rank (its group's
        options are in ``groups``, the optimizer's).

        ``step`` is a 0-d view of its counter; each buffer its group uses (and that is
        allocated) contributes the owned slice (1-D, empty where this rank owns none of the
        parameter). Buffers the bucket keeps for other groups are left out, as torch has none.
        """
        piece = self.owned_piece(position)
        start, end = (piece.shard_start, piece.shard_end) if piece else (0, 0)
        state = {"step": self.steps[position]}
        for key in self.keys_for(groups[self.plan.slots[position].group]):
            if key in self.state:
                state[key] = self.state[key][start:end]
        return state

    def begin_step(self, stepped: Sequence[int], groups: Sequence[Mapping[str, Any]]) -> bool:
        """Count the step of the parameters at positions ``stepped``, create the state their
        groups need on first use and take pending master weights; True if the buffers, or
        the groups' choice of them, changed (the ``state[p]`` views are then stale).

        Every rank sees the same gradients (DDP), so every rank allocates the same state
        buffers at the same step, whatever it owns.
        """
        if not stepped:
            return False
        self.steps[list(stepped)] += 1
        keys = [self.keys_for(groups[g]) for g in self.group_indices]
        changed = self.allocate_state(groups) or keys != self.viewed_keys
        self.viewed_keys = keys
        self.take_pending_master_weights()
        return changed

    def update(
        self,
        groups: Sequence[Mapping[str, Any]],
        grad_scale: Tensor | None,
        has_grad: Callable[[int], bool] | None = None,
        receive: Callable[[Tensor], None] | None = None,
    ) -> None:
        """Stage the owned gradients window by window and run :attr:`kernel` on each span
        with its param group's current options (from ``groups``, the optimizer's), the
        gradients multiplied by ``grad_scale`` (``has_grad`` and ``receive``: see
        :meth:`staged_grads`)."""
        assert self.kernel is not None, "a meta bucket is made on a real device before a step"
        for window_start, spans in self.staged_grads(has_grad, receive):
            for span in spans:
                self._update_span(span, window_start, groups[span.group], grad_scale)

    def _update_span(
        self, span: Span, window_start: int, options: Mapping[str, Any], grad_scale: Tensor | None
    ) -> None:
        """One kernel call: the span's state, its staged gradients, its group's ``options``."""
        owned = slice(span.start, span.end)
        momentum_buffer = self.state["momentum_buffer"][owned] if options["momentum"] > 0 else None
        grad_avg = self.state["grad_avg"][owned] if options["centered"] else None
        self.kernel(
            self.update_target[owned],
            self.grad_window[span.start - window_start : span.end - window_start],
            self.state["square_avg"][owned],
            momentum_buffer,
            grad_avg,
            **{key: options[key] for key in OPTION_KEYS if key != "lr"},  # every option
            lr=_as_float(options["lr"]),  # (a tensor lr, read on the host)
            grad_scale=grad_scale,
            low_precision_param=self.shard[owned] if self.master_weights else None,
        )

    def positions_with_grad(self) -> list[int]:
        """Positions of the parameters that have a gradient this step."""
        return [i for i, param in enumerate(self.params) if param.grad is not None]

    def owned_grads(self) -> list[tuple[Piece, Tensor]]:
        """Each owned piece whose parameter has a gradient, with its slice of that gradient."""
        owned = []
        for piece in self.pieces:
            grad = self.params[self.position_of(piece)].grad
            if grad is not None:
                flat = in_order(grad, piece.slot.order)
                owned.append((piece, flat[piece.param_start : piece.param_end]))
        return owned

    def staged_grads(
        self,
        has_grad: Callable[[int], bool] | None = None,
        receive: Callable[[Tensor], None] | None = None,
    ) -> Iterator[tuple[int, list[Span]]]:
        """Stage the owned gradients in ``grad_window``, one window of the shard at a time.

        Yields ``(window_start, spans)`` once the gradients of shard elements
        ``[window_start, window_start + grad_window.numel())`` are in ``grad_window`` (the
        element ``i`` of the shard at ``grad_window[i - window_start]``); ``spans`` are the
        stretches to update there: owned elements whose parameter has a gradient, one
        param group each, in shard coordinates. Windows without any are skipped; the
        window's contents are valid until the next one is staged.

        ``has_grad`` says by position which parameters have a gradient (default: those with
        a ``.grad``); ``receive`` fills the window instead of the gradients (a rank that ran
        out of data gets its gradients from the rank that leads it, see ``joining``).
        """
        has_grad = has_grad or (lambda position: self.params[position].grad is not None)
        for window in self._windows:
            present, spans = window.present(has_grad)
            if not present:
                continue
            if receive is None:
                pack(present, self.params)
            else:
                receive(self.grad_window[: window.length])
            yield window.start, spans

    def windows_of(self, rank: int) -> list[Window]:
        """The gradient windows of ``rank``'s shard (this rank's own are ``_windows``)."""
        if rank not in self._windows_of:
            pieces = self.plan.pieces(rank)
            self._windows_of[rank] = plan_windows(pieces, self.position_of, self.grad_window)
        return self._windows_of[rank]


def own_storage_view(
    flat: Tensor, start: int, end: int, shape: Sequence[int], strides: Sequence[int]
) -> Tensor:
    """Elements ``[start, end)`` of ``flat`` as a tensor of ``shape`` and ``strides`` (the
    parameter's own, dense: :func:`~sharded_rmsprop.memory_order.kept_strides`), whose
    storage is
    its own: a storage over that memory alone, which keeps ``flat``'s memory alive (through
    DLPack), rather than a view of ``flat``'s storage. Writes to either are seen by the
    other, as for a view; but ``torch.save`` of it writes its own bytes, not the whole
    buffer, and tools that look for tensors sharing a storage (safetensors, accelerate,
    ``save_pretrained``) see none between parameters. Meta tensors have no memory to share:
    there it is a plain view."""
    piece = flat[start:end]
    if piece.device.type != "meta":
        piece = torch.from_dlpack(piece)
    return piece.as_strided(tuple(shape), tuple(strides))


def _overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether the memory of ``a``'s storage and ``b``'s storage overlap."""
    a_start, b_start = a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()
    a_end = a_start + a.untyped_storage().nbytes()
    b_end = b_start + b.untyped_storage().nbytes()
    return a_start < b_end and b_start < a_end


def _as_float(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else value


def _is_view(
    param: Tensor, layout: tuple[int, torch.Size, tuple[int, ...]], dtype: torch.dtype
) -> bool:
    """Whether ``param`` is the view of the flat buffer whose ``(address, shape, stride)`` is
    ``layout``."""
    address, shape, stride = layout
    return (
        param.data_ptr() == address
        and param.dtype == dtype
        and param.shape == shape
        and param.stride() == stride
    )


@dataclass(frozen=True)
class BucketScan:
    """What :meth:`ShardedBucket.scan` found, by position in the bucket."""

    has_grad: list[bool]
    adoptable: list[int]  # replaced, same shape, dtype and device
    foreign: list[tuple[int, str]]  # replaced by something else, and what changed
