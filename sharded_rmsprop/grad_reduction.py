"""Gradients reduce-scattered into the owned shards instead of all-reduced, through DDP.

``optimizer.reduce_scatter_gradients(ddp_model)`` makes :class:`GradientReduceScatter` the DDP
model's communication hook. DDP runs the backward as always (its buckets, ``no_sync()``,
unused parameters); for each of DDP's buckets the hook copies the gradients, divided by the
number of ranks as DDP's own all-reduce does, into a staging buffer laid out like the
optimizer's flat bucket. Once every gradient of an optimizer bucket is staged, while the rest
of the backward runs, one reduce-scatter gives each rank the sum over the ranks of the range
it owns. With the parameter sync that makes one all-reduce's bytes per step, ``2 (N-1)/N``
times the parameters' bytes, where DDP's all-reduce and the sync move ``3 (N-1)/N``.

When DDP's last bucket is in, the hook waits for the reductions and writes each rank's
averaged range into DDP's buckets, which DDP copies into ``p.grad``. So after a synchronised
backward ``p.grad`` holds

- in the elements this rank owns, the average over the ranks: at 2 ranks bit for bit what
  DDP's all-reduce gives (a sum of two is the same in any order), at more ranks the same sum
  in another order (float rounding);
- in every other element, this rank's own gradient (all it accumulated since the gradients
  were last reset), not averaged.

Everything the optimizer reads of a gradient is in the owned elements: the update,
``clip_grad_norm_()``, the GradScaler's scale. An inf or NaN check of all of a rank's
gradients (``skip_nonfinite``, the GradScaler's, which sets that rank's next loss scale) must
find one on every rank exactly when DDP's average holds one, as it would after DDP's
all-reduce. A rank's own elements alone would not tell it: an inf in one rank's gradient,
in a range that rank owns, reaches no other rank. So the ranks agree on whether some
averaged range holds an inf or NaN (one all-reduce of a flag at the end of the backward, on
the device), and where one does, every rank writes a NaN into the first element it does not
own of each gradient (its update never reads them; each gradient, since DDP leaves some out).

Refused with an error on every rank at the next ``step()`` or ``clip_grad_norm_()``, since
they would train on wrong gradients: a second synchronised backward adding to gradients that
were already reduced (accumulate under ``ddp_model.no_sync()`` instead), a gradient that was
not reduced (``no_sync()`` only, ``p.grad`` set by hand, a parameter DDP does not hold), and a
gradient changed in place after the reduction: a change computed from the gradients
(``torch.nn.utils.clip_grad_norm_``) would read each rank's unaveraged elements, and no check
after the fact tells every such change from a harmless one. Scale the loss instead, clip with
the optimizer's ``clip_grad_norm_()``, and let GradScaler unscale inside ``step()``. The check
compares version counters noted once DDP copied the gradients (a callback at the end of the
backward): on the host, without waiting for a GPU; writes through ``p.grad.data`` are not seen.

The reductions start in one order on every rank, from the last bucket to the first (the
order in which a backward completes them), whatever the order DDP hands its buckets over in.
An optimizer bucket's reduction can only start once all of its gradients are in: with one
bucket (the default) it runs after the whole backward; with ``bucket_numel`` about DDP's
bucket size, each runs behind the rest of the backward, as DDP's all-reduces do.

Memory: the staging buffers (the parameters' size, padded), the reduced shards (1/N of it)
and on gloo the other ranks' chunks ((N-1)/N) are kept from one backward to the next
(:class:`_Buffers`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .agreement import Agreement
from .ddp_hook import DDPHookSlot, reducible_parameters
from .distributed_state_dict import initializing_state
from .facts import Groups, param_labels
from .gradients import has_nonfinite

if TYPE_CHECKING:
    from .comm import Reduction
    from .sharding import Sharding

__all__ = [
    "GradientReduceScatter",
    "attach",
    "check_no_reduced_grads_held",
    "check_reduced_grads",
    "detach",
]


@dataclass
class _Reduced:
    """What this rank knows of one parameter's gradient since it was last reduced."""

    grad: weakref.ref | None  # the gradient the average was written into (None: DDP makes it)
    accumulated: bool = False  # a second synchronised backward added to that gradient


@dataclass
class _Backward:
    """One synchronised backward, from DDP's first bucket to its last."""

    remaining: list[int]  # gradients still to stage, by optimizer bucket
    reductions: list[Reduction] = field(default_factory=list)
    next_to_start: int = -1  # the highest bucket not started yet (they start last to first)
    # DDP's buckets handed over so far: their (parameter, gradient view) pairs, buffer and
    # the future DDP waits for
    handed: list[tuple[list[tuple[Tensor, Tensor]], Tensor, torch.futures.Future]] = field(
        default_factory=list
    )


@dataclass
class _Buffers:
    """One optimizer bucket's reduction buffers, kept from backward to backward (new memory
    costs more than the reduction on a CPU): the gradients / N in the bucket's flat layout,
    the reduced shard, and on gloo the other ranks' chunks as they arrive."""

    staging: Tensor
    shard: Tensor
    inbox: Tensor | None


@dataclass(frozen=True)
class _Route:
    """Where one parameter's gradient goes: its optimizer bucket, its slot in that bucket's
    staging buffer, the range this rank owns of it (``param_start``, ``param_end``, and
    where the reduction leaves that range's average), if any, and the first element this
    rank does not own (where a non-finite average elsewhere is marked), if any."""

    index: int
    staging: Tensor
    owned: tuple[int, int, Tensor] | None
    unowned_at: int | None


class GradientReduceScatter:
    """The DDP communication hook of one optimizer (see the module docstring).

    ``label`` names a parameter in errors.
    """

    def __init__(
        self, sharding: Sharding, ddp_params: Sequence[Tensor], label: Callable[[Tensor], str]
    ) -> None:
        # weakly: the optimizer owns this hook's state, not the other way round, so dropping
        # the optimizer frees it and its DDP model's hook all-reduces again (DDPHookSlot)
        self._sharding = weakref.ref(sharding)
        self.label = label
        self._ddp_params = set(ddp_params)
        self._reduced: dict[Tensor, _Reduced] = {}
        self._backward: _Backward | None = None
        #: The layout the routes and buffers below were made for: each bucket's plan and
        #: parameters (a replaced parameter or a new param group makes them anew).
        self._layout: list[Any] = []
        self._routes: dict[Tensor, _Route] = {}
        self._expected: list[int] = []  # by optimizer bucket: how many gradients DDP hands in
        #: By optimizer bucket, kept from backward to backward (see :class:`_Buffers`).
        self._buffers: dict[int, _Buffers] = {}
        #: Each DDP bucket's positions to mark with NaN, as a device index (by the positions).
        self._mark_positions: dict[tuple[int, ...], Tensor] = {}
        #: The version counter of each reduced gradient once DDP copied it into ``p.grad``.
        self._versions: dict[Tensor, int] = {}
        #: The DDP model's hook that calls this reduction while it is attached there.
        self.slot: DDPHookSlot | None = None

    @classmethod
    def for_model(
        cls, sharding: Sharding, ddp_model: Any, groups: Sequence[dict[str, Any]]
    ) -> GradientReduceScatter:
        """The hook for ``ddp_model`` over the parameters of ``groups`` (laid out in
        ``sharding``); ``TypeError`` or ``ValueError`` if it cannot be had."""
        params = reducible_parameters(ddp_model, sharding.data_parallel.group)
        if sharding.grad_reduction is not None:
            raise ValueError("reduce_scatter_gradients() was called already for this optimizer")
        labels = param_labels(groups)
        index_of = {param: i for i, param in enumerate(p for g in groups for p in g["params"])}
        foreign = [i for i, param in enumerate(params) if param not in index_of]
        if foreign:
            name = [n for n, p in ddp_model.module.named_parameters() if p is params[foreign[0]]]
            raise ValueError(
                f"reduce_scatter_gradients(): {len(foreign)} parameter(s) of the DDP model, "
                f"{name[0] if name else 'one'} the first, are not in this optimizer: their "
                "gradients would be left unaveraged. Give the optimizer every parameter of the "
                "model that requires a gradient"
            )
        return cls(sharding, params, lambda param: labels[index_of[param]])

    @property
    def has_optimizer(self) -> bool:
        """Whether the optimizer (its sharding) this reduction reduces into still lives."""
        return self._sharding() is not None

    @property
    def sharding(self) -> Sharding:
        sharding = self._sharding()
        if sharding is None:
            raise RuntimeError("the optimizer of this gradient reduction is gone")
        return sharding

    # -- the hook ------------------------------------------------------------------------------

    def reduce(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """DDP's communication hook: stage ``bucket``'s gradients and start the reductions of
        the optimizer buckets they complete; the future is done once the averaged ranges are
        written into ``bucket``'s buffer (when DDP's last bucket is in)."""
        try:
            return self._reduce(bucket)
        except BaseException:
            self._backward = None  # the error reaches every rank's backward: start afresh
            raise

    def _reduce(self, bucket: dist.GradBucket) -> torch.futures.Future:
        if self._backward is None:
            self._backward = self._begin()
        backward = self._backward
        world_size = self.sharding.data_parallel.world_size
        pairs = list(zip(bucket.parameters(), bucket.gradients()))
        for param, grad in pairs:
            route = self._routes.get(param)
            if route is None:
                raise RuntimeError(
                    "ShardedRMSprop: DDP handed over the gradient of a parameter that "
                    "reduce_scatter_gradients() did not lay out (frozen or added after it was "
                    "called?): call it again on a new optimizer for the model as it is now"
                )
            # DDP hands each gradient as a row-major view of its bucket's slice, which holds
            # the gradient in the parameter's memory layout (contiguous if it is not dense):
            # the slice, flat, is in the parameter's order (memory_order.py) as it is
            torch.div(grad.reshape(-1), world_size, out=route.staging)
            self._note_reduced(param)
            backward.remaining[route.index] -= 1
        self._start_ready()
        buffer = bucket.buffer()
        devices = [buffer.device] if buffer.device.type == "cuda" else None
        future: torch.futures.Future = torch.futures.Future(devices=devices)
        backward.handed.append((pairs, buffer, future))
        if bucket.is_last():
            self._finish()
        return future

    def _begin(self) -> _Backward:
        buckets = self.sharding.buckets
        layout = [item for bucket in buckets for item in (bucket.plan, *bucket.params)]
        if len(layout) != len(self._layout) or any(
            new is not old for new, old in zip(layout, self._layout)
        ):
            self._route(buckets)
            self._layout = layout
        return _Backward(remaining=list(self._expected), next_to_start=len(buckets) - 1)

    def _route(self, buckets: Sequence[Any]) -> None:
        """Make the buffers of ``buckets`` and every DDP parameter's route into them."""
        self._expected = [
            sum(param in self._ddp_params for param in bucket.params) for bucket in buckets
        ]
        self._buffers, self._routes = {}, {}
        for index, bucket in enumerate(buckets):
            if not self._expected[index]:
                continue  # no gradients: nothing to reduce
            plan = bucket.plan
            # zeros: padding and parameters DDP does not hold add nothing; every other
            # element is written by each synchronised backward
            staging = torch.zeros(plan.padded_numel, dtype=plan.dtype, device=plan.device)
            shard = torch.empty(plan.shard_numel, dtype=plan.dtype, device=plan.device)
            inbox = self.sharding.data_parallel.reduce_scatter_inbox(shard)
            self._buffers[index] = _Buffers(staging, shard, inbox)
            for position, param in enumerate(bucket.params):
                if param not in self._ddp_params:
                    continue
                slot, piece = plan.slots[position], bucket.owned_piece(position)
                owned = None
                unowned_at = 0 if param.numel() else None  # (this rank owns at most one range)
                if piece is not None:
                    averaged = shard[piece.shard_start : piece.shard_end]
                    owned = (piece.param_start, piece.param_end, averaged)
                    if piece.param_start == 0:
                        unowned_at = piece.param_end if piece.param_end < param.numel() else None
                staging_slot = staging[slot.offset : slot.end]
                self._routes[param] = _Route(index, staging_slot, owned, unowned_at)

    def _start_ready(self, everything: bool = False) -> None:
        """Start the reductions of the complete buckets (all, if ``everything``), from the
        last bucket down, stopping at the first one still incomplete."""
        backward = self._backward
        while backward.next_to_start >= 0:
            index = backward.next_to_start
            if self._expected[index] and backward.remaining[index] > 0 and not everything:
                return
            backward.next_to_start -= 1
            if not self._expected[index]:
                continue  # no gradients on any rank: nothing to reduce
            buffers = self._buffers[index]
            backward.reductions.append(
                self.sharding.data_parallel.reduce_scatter(
                    buffers.staging, buffers.shard, buffers.inbox
                )
            )

    def _finish(self) -> None:
        """DDP's last bucket is in: end every reduction, write the averaged ranges into
        DDP's buckets and complete their futures."""
        self._start_ready(everything=True)
        backward, self._backward = self._backward, None
        for reduction in backward.reductions:
            reduction.wait()
        mark = self._nonfinite_on_some_rank()
        for pairs, buffer, future in backward.handed:
            for param, grad in pairs:
                route = self._routes[param]
                if route.owned is not None:
                    start, end, averaged = route.owned
                    grad.reshape(-1)[start:end].copy_(averaged)
            self._mark_nonfinite(buffer, pairs, mark)
            future.set_result(buffer)
        # DDP's own callback, queued after this hook returns, copies the buckets into p.grad;
        # a callback queued by a callback runs after it: note the versions then
        engine = torch.autograd.Variable._execution_engine
        try:
            engine.queue_callback(lambda: engine.queue_callback(self._note_versions))
        except RuntimeError:  # not in a backward: DDP's Join hook matching the others' one
            self._note_versions()

    def _nonfinite_on_some_rank(self) -> Tensor:
        """Whether some rank's averaged ranges hold an inf or NaN: a 0-d bool on the device
        (one all-reduce), for :meth:`_mark_nonfinite` (see the module docstring)."""
        shards = [buffers.shard for buffers in self._buffers.values()]
        device = shards[0].device if shards else torch.device("cpu")
        mine = has_nonfinite(shards, device).to(torch.int32)
        return self.sharding.data_parallel.all_reduce_tensor(mine, "max") > 0

    def _mark_nonfinite(
        self, buffer: Tensor, pairs: list[tuple[Tensor, Tensor]], mark: Tensor
    ) -> None:
        """Where ``mark`` is set, NaN into the first element this rank does not own of each
        gradient of DDP's bucket ``buffer`` (they are views of it; see the module docstring):
        one indexed write per DDP bucket, on the device (the host never reads ``mark``)."""
        positions = tuple(
            grad.storage_offset() - buffer.storage_offset() + self._routes[param].unowned_at
            for param, grad in pairs
            if self._routes[param].unowned_at is not None
        )
        if not positions:
            return
        index = self._mark_positions.get(positions)
        if index is None or index.device != buffer.device:
            index = torch.tensor(positions, device=buffer.device)
            self._mark_positions[positions] = index
        flat = buffer.view(-1)
        flat[index] = torch.where(mark.to(buffer.device), math.nan, flat[index])

    def _note_versions(self) -> None:
        self._versions = {
            param: param.grad._version for param in self._reduced if param.grad is not None
        }

    def _note_reduced(self, param: Tensor) -> None:
        """Record that ``param``'s gradient is being reduced; a second reduction of the same
        gradient object (a synchronised backward added to it) is remembered as an error."""
        known = self._reduced.get(param)
        grad = param.grad
        again = known is not None and known.grad is not None and known.grad() is grad
        self._reduced[param] = _Reduced(
            None if grad is None else weakref.ref(grad), again and grad is not None
        )

    # -- before a step ---------------------------------------------------------------------------

    def check(self, params: Sequence[Tensor]) -> None:
        """``RuntimeError`` if the gradient of one of ``params`` is not the average DDP's
        reduce-scatter left in the owned elements."""
        if self._backward is not None:
            raise RuntimeError(
                "ShardedRMSprop: a step or clip_grad_norm_() during a backward whose "
                "gradients are still being reduce-scattered"
            )
        for param in params:
            grad = param.grad
            if grad is None:
                continue
            known = self._reduced.get(param)
            if known is not None and known.grad is None:  # DDP made it when it copied back
                known.grad = weakref.ref(grad)
            if known is None or known.grad() is not grad:
                raise RuntimeError(
                    f"ShardedRMSprop: the gradient of {self.label(param)} was not reduced by "
                    "DDP since it was last reset (reduce_scatter_gradients() is on): a backward "
                    "under no_sync() only, a gradient set by hand, or a parameter the DDP "
                    "model does not hold. Nothing was changed on any rank."
                )
            if self._versions.get(param, grad._version) != grad._version:
                raise RuntimeError(
                    f"ShardedRMSprop: the gradient of {self.label(param)} was changed in place "
                    "after DDP reduce-scattered it (reduce_scatter_gradients() is on). Outside "
                    "the range each rank owns, p.grad holds that rank's own gradient, so a "
                    "change computed from the gradients (torch.nn.utils.clip_grad_norm_, a "
                    "norm-based rescale) would differ from DDP's all-reduce. Scale the loss "
                    "instead of the gradients (e.g. divide it by the number of micro-batches), "
                    "clip with optimizer.clip_grad_norm_(), and let GradScaler unscale inside "
                    "optimizer.step(). Nothing was changed on any rank."
                )
            if known.accumulated:
                raise RuntimeError(
                    f"ShardedRMSprop: the gradient of {self.label(param)} was reduced twice "
                    "without a reset in between: a second synchronised backward added to "
                    "gradients whose owned elements already held the average "
                    "(reduce_scatter_gradients() is on), which cannot be averaged again. "
                    "Accumulate gradients under ddp_model.no_sync() and synchronise only the "
                    "last backward, or reset them with optimizer.zero_grad() (or set_to_none=True)"
                    " between. Nothing was changed on any rank."
                )

    def holds_reduced(self, params: Sequence[Tensor]) -> bool:
        """Whether the gradient of one of ``params`` is one this hook reduced."""
        for param in params:
            known = self._reduced.get(param)
            if param.grad is not None and known is not None:
                if known.grad is None or known.grad() is param.grad:
                    return True
        return False

    def buffers(self) -> list[Tensor]:
        """The staging buffers, shards and inboxes kept from backward to backward."""
        kept = [(b.staging, b.shard, b.inbox) for b in self._buffers.values()]
        return [tensor for trio in kept for tensor in trio if tensor is not None]

    def forget(self) -> None:
        """The gradients were reset (``optimizer.zero_grad()``)."""
        self._reduced.clear()


def attach(sharding: Sharding, ddp_model: DistributedDataParallel, groups: Groups) -> None:
    """Make ``ddp_model`` reduce-scatter its gradients into the shards of ``sharding`` (the
    parameters of ``groups``): ``ShardedRMSprop.reduce_scatter_gradients``; collective."""
    with Agreement(sharding.data_parallel, "reduce_scatter_gradients()"):
        hook = GradientReduceScatter.for_model(sharding, ddp_model, groups)
        # (until every rank attached, it all-reduces as DDP did)
        slot = DDPHookSlot.of(ddp_model, sharding.data_parallel)
        if slot.attached is not None:
            raise ValueError(
                "reduce_scatter_gradients(): this DDP model's gradients are reduce-"
                "scattered for another ShardedRMSprop already: call its close() first"
            )
    slot.attach(hook)
    sharding.grad_reduction = hook


def detach(sharding: Sharding) -> None:
    """Give the DDP model back its plain all-reduce (``ShardedRMSprop.close``)."""
    reduction = sharding.grad_reduction
    if reduction is not None and reduction.slot is not None:
        reduction.slot.detach(reduction)
    sharding.grad_reduction = None


def check_reduced_grads(sharding: Sharding, groups: Groups) -> None:
    """With reduce-scattered gradients: every gradient of ``groups`` is the one DDP reduced,
    unchanged since (raises, inside the caller's agreement, so every rank gets the error)."""
    reduction = sharding.grad_reduction
    if reduction is None:
        return
    try:
        reduction.check([p for group in groups for p in group["params"]])
    except RuntimeError:
        # torch's state-dict API steps once on zeros it set alike on every rank: fine.
        # (Asked only here: finding that out walks the callers' frames.)
        if not initializing_state():
            raise


def check_no_reduced_grads_held(sharding: Sharding, groups: Groups) -> None:
    """``RuntimeError`` (inside the caller's agreement) if ``p.grad`` still holds what the
    last backward reduce-scattered: a backward after ``close()`` would add all-reduced
    gradients to them, whose owned elements are averages already."""
    reduction = sharding.grad_reduction
    params = [p for group in groups for p in group["params"]]
    if reduction is not None and reduction.holds_reduced(params):
        raise RuntimeError(
            "close(): p.grad still holds the gradients the last backward reduce-scattered "
            "(averages in the elements this rank owns, its own gradient elsewhere), to which "
            "a backward after close() would add all-reduced ones: call step() and "
            "zero_grad() first. Nothing was changed on any rank."
        )
