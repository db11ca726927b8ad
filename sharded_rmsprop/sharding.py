"""One optimizer's parameters as this rank holds them: its buckets, and the ranks they are
sharded over.

A :class:`Sharding` lays param groups out in flat buckets (:mod:`sharded_rmsprop.layout` plans
them, :class:`~sharded_rmsprop.shards.ShardedBucket` holds each one's tensors and update
kernel), finds at each step which parameters have a gradient and which were replaced, adopts
those, and runs the update phases the optimizer orders. It knows nothing of param-group
options beyond what the groups it is given say, and ``ShardedRMSprop`` keeps ``param_groups``
and ``state``: this module never imports it. The checkpoint, validation, agreement and Join
modules read an optimizer through :class:`ShardedOptimizer` alone.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from .comm import DataParallelGroup
from .facts import Groups, ParameterScan, param_labels
from .kernels import UpdateFn, fused_refusal, select_update
from .layout import BucketPlan, ParamSpec, plan_buckets
from .memory_order import kept_strides, layout_entry, order_of
from .shards import MASTER_KEY, ShardedBucket, update_dtype_for
from .sync import ShardSync, wait_for_every_sync

__all__ = ["GradientReduction", "ParamOverlap", "PlannedBucket", "ShardedOptimizer", "Sharding"]


class ShardedOptimizer(Protocol):
    """What the modules around the optimizer read of it: torch's public attributes and its
    :class:`Sharding`."""

    param_groups: list[dict[str, Any]]
    state: MutableMapping[Any, Any]
    sharding: Sharding


class GradientReduction(Protocol):
    """Gradients that reach the owned shards other than by DDP's all-reduce
    (:class:`~sharded_rmsprop.grad_reduction.GradientReduceScatter`)."""

    def check(self, params: Sequence[Tensor]) -> None:
        """Raise if some gradient of ``params`` did not arrive as it should."""

    def buffers(self) -> list[Tensor]:
        """The buffers it keeps from backward to backward."""

    def forget(self) -> None:
        """The gradients were reset."""


class ParamOverlap(Protocol):
    """Hooks that let the parameter sync run behind the next forward
    (:class:`~sharded_rmsprop.param_overlap.ParamSyncOverlap`)."""

    handles: list[Any]

    def remove(self) -> None:
        """Take the hooks off."""


@dataclasses.dataclass(frozen=True)
class PlannedBucket:
    """A bucket to build: its plan, its parameters in slot order, and its update (None on
    the meta device, until the parameters reach a real one)."""

    plan: BucketPlan
    params: list[Tensor]
    kernel: UpdateFn | None


class Sharding:
    """Every flat bucket of one optimizer on this rank, the ranks they are sharded over
    (``data_parallel``) and how the updated shards reach every rank (``sync``).

    ``fused``, ``master_weights`` and ``bucket_numel`` are the optimizer's settings of those
    names (``master_weights`` resolved to a bool), ``host_shared`` asks ``sync`` for
    host-shared buffers and ``param_sync`` names its collective.
    """

    def __init__(
        self,
        data_parallel: DataParallelGroup,
        *,
        fused: bool | None,
        master_weights: bool,
        host_shared: bool,
        bucket_numel: int | None = None,
        param_sync: str = "auto",
    ) -> None:
        self.data_parallel = data_parallel
        self.fused = fused
        self.master_weights = master_weights
        self.bucket_numel = bucket_numel
        self.buckets: list[ShardedBucket] = []
        self.sync = ShardSync(self.data_parallel, host_shared, self.buckets, param_sync)
        #: The parameters of each param group as laid out in the buckets (checked each step).
        self.laid_out: list[tuple[Tensor, ...]] = []
        #: DDP's communication hook once gradients are reduce-scattered into the shards
        #: (``ShardedRMSprop.reduce_scatter_gradients``); None while DDP all-reduces them.
        self.grad_reduction: GradientReduction | None = None
        #: The hooks that let the sync run behind the next forward
        #: (``ShardedRMSprop.overlap_param_sync``); None while ``step()`` waits for it.
        self.param_overlap: ParamOverlap | None = None

    @property
    def overlapping(self) -> bool:
        """Whether the sync is left running behind the next forward (hooks registered and
        not removed)."""
        return self.param_overlap is not None and bool(self.param_overlap.handles)

    def __repr__(self) -> str:
        buckets = ", ".join(
            f"{str(b.plan.dtype).removeprefix('torch.')} on {b.plan.device}: "
            f"{len(b.params)} parameters, {b.plan.padded_numel} elements, "
            f"{b.plan.shard_numel} owned, {b.sync.describe()}"
            for b in self.buckets
        )
        dp = self.data_parallel
        return f"Sharding(rank {dp.rank} of {dp.world_size}; buckets [{buckets}])"

    # -- construction ------------------------------------------------------------------------

    def plan(self, groups: Groups) -> list[PlannedBucket]:
        """The buckets for the groups not laid out yet, and their kernels; touches no tensor
        (``RuntimeError`` if ``fused=True`` has no kernel for some parameters)."""
        first = len(self.laid_out)
        offset = sum(len(group["params"]) for group in groups[:first])  # the first new index
        params = [param for group in groups[first:] for param in group["params"]]
        groups_of = [g for g in range(first, len(groups)) for _ in groups[g]["params"]]
        specs = [
            ParamSpec(
                offset + i,
                g,
                tuple(param.shape),
                param.dtype,
                param.device,
                order_of(param.shape, param.stride()),
                kept_strides(param.shape, param.stride()),
            )
            for i, (param, g) in enumerate(zip(params, groups_of))
        ]
        return [
            PlannedBucket(
                plan, [params[slot.index - offset] for slot in plan.slots], self.kernel_for(plan)
            )
            for plan in plan_buckets(
                specs, self.data_parallel.world_size, bucket_numel=self.bucket_numel
            )
        ]

    def lay_out(self, planned: Sequence[PlannedBucket], groups: Groups) -> None:
        """Build the ``planned`` buckets of the groups not laid out yet (collective where
        buffers are shared by the host)."""
        wait_for_every_sync()  # (another optimizer's, over these parameters, say)
        for new in planned:
            sync, flat = self.sync.place(new.plan)
            self.buckets.append(
                ShardedBucket(
                    new.plan,
                    self.data_parallel.rank,
                    new.params,
                    sync,
                    flat,
                    self.master_weights,
                    new.kernel,
                )
            )
        self.sync.written_by_one()  # rank 0 filled the shared buffers
        self.laid_out += [tuple(group["params"]) for group in groups[len(self.laid_out) :]]

    def kernel_for(self, plan: BucketPlan) -> UpdateFn | None:
        """The update of ``plan``'s buckets (None on the meta device)."""
        if plan.device.type == "meta":
            return None
        dtype = update_dtype_for(plan.dtype, self.master_weights)
        return select_update(self.fused, plan.device, dtype)

    def copy(self, memo: dict[int, Any]) -> Sharding:
        """A sharding of its own over copies of the parameters (through ``memo``, the
        copies a model copied with it has), on the same ranks, with private buffers."""
        twin = copy.copy(self)
        twin.buckets = []
        twin.sync = ShardSync(self.data_parallel, False, twin.buckets, self.sync.param_sync)
        for bucket in self.buckets:
            params = [copy.deepcopy(p, memo) for p in bucket.params]
            sync, flat = twin.sync.place(bucket.plan)
            twin.buckets.append(bucket.copy(self.data_parallel.rank, params, sync, flat))
        twin.grad_reduction = None  # (the hook of a DDP model, which reduces into this one)
        twin.param_overlap = None  # (the hooks of a model, which wait for this one)
        twin.laid_out = [tuple(copy.deepcopy(p, memo) for p in params) for params in self.laid_out]
        return twin

    # -- before each collective operation ----------------------------------------------------

    def any_replaced(self) -> bool:
        """Whether some parameter was replaced since the last step (no checks, no errors)."""
        return any(
            bucket.is_replaced(position)
            for bucket in self.buckets
            for position in range(len(bucket.params))
        )

    def scan(
        self, groups: Groups, check_grad: Callable[[Tensor], None] | None = None
    ) -> ParameterScan:
        """Check that ``groups`` still hold the parameters laid out, give every gradient to
        ``check_grad``, and find the parameters replaced since the last step.

        ``RuntimeError`` for a param group changed in place, a parameter replaced by a tensor
        of another dtype, device or shape (which cannot be adopted), or a meta bucket whose
        parameters left for no single real device or one without the kernel asked for.
        """
        self._check_groups(groups)
        count = sum(len(group["params"]) for group in groups)
        has_grad, replaced = [False] * count, [False] * count
        adoptable, materialize = [], []
        for bucket in self.buckets:
            found = bucket.scan(check_grad)
            device = _materialized_on(groups, bucket, found.adoptable, self.fused)
            if device is not None:
                self.kernel_for(dataclasses.replace(bucket.plan, device=device))  # or raise
            materialize.append(device)
            if found.foreign:
                position, change = found.foreign[0]
                label = param_labels(groups)[bucket.plan.slots[position].index]
                raise RuntimeError(
                    f"{label} was replaced after ShardedRMSprop was built, by a tensor with "
                    f"{change}: the optimizer keeps it in a flat buffer it can no longer "
                    "update. Build the optimizer after moving or casting the model "
                    "(model.to(...), .half(), .to_empty(...))."
                )
            for slot, grad in zip(bucket.plan.slots, found.has_grad):
                has_grad[slot.index] = grad
            for position in found.adoptable:
                replaced[bucket.plan.slots[position].index] = True
            adoptable.append(found.adoptable)
        return ParameterScan(tuple(has_grad), tuple(replaced), adoptable, materialize)

    def _check_groups(self, groups: Groups) -> None:
        """The param groups hold the very parameters laid out, in their order."""
        if len(groups) != len(self.laid_out):
            raise RuntimeError(
                f"the optimizer has {len(groups)} param groups, but laid out "
                f"{len(self.laid_out)}: add groups with add_param_group()"
            )
        for g, (group, laid_out) in enumerate(zip(groups, self.laid_out)):
            params = group["params"]
            if len(params) != len(laid_out) or not all(map(operator.is_, params, laid_out)):
                raise RuntimeError(
                    f"the parameters of param group {g} are not those the optimizer laid out "
                    f"({len(params)} now, {len(laid_out)} then): add parameters with "
                    "add_param_group(), and give a parameter new values with p.data = ... "
                    "rather than replacing the parameter"
                )

    def adopt(self, scan: ParameterScan | None, state: MutableMapping[Any, Any]) -> None:
        """Adopt the replaced parameters ``scan`` found (the same on every rank: agreed; None
        on a rank following under Join, which adopts nothing), and make anew on their device
        the buckets whose parameters all left the meta device (their ``state`` entries go:
        meta state holds no values, it is made at the next step)."""
        if scan is None or not any(scan.replaced):
            return
        for i, (bucket, positions, device) in enumerate(
            zip(self.buckets, scan.adoptable, scan.materialize)
        ):
            if device is None:
                bucket.adopt(positions)
                continue
            plan = dataclasses.replace(bucket.plan, device=device)
            sync, flat = self.sync.place(plan)
            self.buckets[i] = bucket.materialized(
                self.data_parallel.rank, plan, sync, flat, self.kernel_for(plan)
            )
            for param in bucket.params:
                state.pop(param, None)
        self.sync.written_by_one()  # rank 0 copied the adopted values

    # -- one step ----------------------------------------------------------------------------

    def begin_step(
        self,
        groups: Groups,
        state: MutableMapping[Any, Any],
        has_grad: Callable[[ShardedBucket, int], bool] | None = None,
    ) -> None:
        """Count the step of the parameters with a gradient (``has_grad`` by bucket and
        position, default: a ``.grad``), create state on first use and keep ``state[p]``
        the views torch's layout asks for."""
        for bucket in self.buckets:
            if has_grad is None:
                stepped = bucket.positions_with_grad()
            else:
                stepped = [p for p in range(len(bucket.params)) if has_grad(bucket, p)]
            if bucket.begin_step(stepped, groups):  # new buffers, or options changed
                self.refresh_state(state, groups, [bucket], only_present=True)
            for position in stepped:
                param = bucket.params[position]
                if param not in state:
                    state[param] = bucket.param_state(position, groups)

    def update(
        self,
        groups: Groups,
        grad_scale: Callable[[torch.device], Tensor | None],
        has_grad: Callable[[ShardedBucket, int], bool] | None = None,
        receive: Callable[[Tensor], None] | None = None,
        after_each: Callable[[ShardedBucket], None] | None = None,
    ) -> None:
        """Every bucket's update of its shard, with the factor ``grad_scale`` gives for its
        device (see :meth:`ShardedBucket.update` for ``has_grad`` and ``receive``), each
        followed by ``after_each(bucket)`` (the start of its sync)."""
        for bucket in self.buckets:
            updated = (
                (lambda position: bucket.params[position].grad is not None)
                if has_grad is None
                else (lambda position, b=bucket: has_grad(b, position))
            )
            bucket.update(groups, grad_scale(bucket.plan.device), updated, receive)
            # changed in place, as torch's update changes them: a backward through a graph
            # that saved them before this step is an error, not a gradient of stale values
            increment_version([p for i, p in enumerate(bucket.params) if updated(i)])
            if after_each is not None:
                after_each(bucket)

    def refresh_state(
        self,
        state: MutableMapping[Any, Any],
        groups: Groups,
        buckets: Sequence[ShardedBucket] | None = None,
        only_present: bool = False,
    ) -> None:
        """Rebuild ``state[p]`` of the parameters of ``buckets`` (default: all) that have
        stepped, or only of those that have an entry already (``only_present``)."""
        for bucket in self.buckets if buckets is None else buckets:
            for position, param in enumerate(bucket.params):
                if param in state if only_present else bucket.steps[position] > 0:
                    state[param] = bucket.param_state(position, groups)

    def reload_master_weights(self) -> None:
        """Take every master weight from its parameter at the next step."""
        for bucket in self.buckets:
            bucket.master_pending.update(range(len(bucket.params)))

    # -- reading ------------------------------------------------------------------------------

    @property
    def home_device(self) -> torch.device:
        """Where scalars about all gradients live: the first bucket's device."""
        return self.buckets[0].plan.device if self.buckets else torch.device("cpu")

    @property
    def dtypes(self) -> list[torch.dtype]:
        """The parameters' dtypes, bucket by bucket."""
        return [bucket.plan.dtype for bucket in self.buckets]

    def owned_grads(self) -> list[Tensor]:
        """This rank's slices of the gradients, every bucket's."""
        return [grad for bucket in self.buckets for _, grad in bucket.owned_grads()]

    def positions_by_index(self) -> list[tuple[ShardedBucket, int]]:
        """``(bucket, position)`` of every parameter, in the optimizer's parameter order."""
        found = [
            (bucket, position) for bucket in self.buckets for position in range(len(bucket.params))
        ]
        found.sort(key=lambda home: home[0].plan.slots[home[1]].index)
        return found

    def param_layouts(self) -> list[list[int]]:
        """Every parameter's shape, and its memory order where not row-major
        (:func:`~sharded_rmsprop.memory_order.layout_entry`), in the optimizer's order."""
        return [
            layout_entry(bucket.plan.slots[position].shape, bucket.plan.slots[position].order)
            for bucket, position in self.positions_by_index()
        ]

    def memory(self) -> dict[str, list[Tensor]]:
        """This rank's own buffers by kind (see ``ShardedRMSprop.memory``)."""
        kinds: dict[str, list[Tensor]] = {"state": [], "master": [], "steps": [], "grad_window": []}
        for bucket in self.buckets:
            for key, buffer in bucket.state.items():
                kinds["master" if key == MASTER_KEY else "state"].append(buffer)
            kinds["steps"].append(bucket.steps)
            kinds["grad_window"].append(bucket.grad_window)
        if self.grad_reduction is not None:
            kinds["grad_reduction"] = self.grad_reduction.buffers()
        return kinds


def _materialized_on(
    groups: Groups, bucket: ShardedBucket, moved: Sequence[int], fused: bool | None
) -> torch.device | None:
    """The one device all parameters of a meta bucket moved to (``module.to_empty(...)``
    after building on ``meta``, swapping tensors), None for a bucket that is not on meta;
    ``RuntimeError`` if none or only some moved (with ``fused=True``, in torch's words
    first: a fused step on meta is refused by torch too)."""
    if not bucket.on_meta:
        return None
    if not moved:
        still = (
            "ShardedRMSprop was built on parameters on the meta device, and they are still "
            "there: module.to_empty(...) gives the module new Parameter objects, which the "
            "optimizer does not hold (as no torch optimizer would). Build the optimizer after "
            "to_empty(), or call torch.__future__.set_swap_module_params_on_conversion(True) "
            "before it, so that the parameters keep their identity and move"
        )
        if fused:
            on_meta = fused_refusal(bucket.plan.device, bucket.plan.dtype, "still on meta")
            still = f"{on_meta}. {still}"
        raise RuntimeError(still)
    staying = sorted(set(range(len(bucket.params))) - set(moved))
    devices = sorted({str(bucket.params[position].device) for position in moved})
    if staying:
        label = param_labels(groups)[bucket.plan.slots[staying[0]].index]
        raise RuntimeError(
            f"parameters built on the meta device moved to {devices[0]}, but {label} is still "
            "on meta: move every parameter (module.to_empty(device=...)) before the step"
        )
    if len(devices) > 1:
        raise RuntimeError(
            f"parameters built on the meta device (one flat buffer) moved to several devices, "
            f"{devices}: move them to one"
        )
    return bucket.params[moved[0]].device
