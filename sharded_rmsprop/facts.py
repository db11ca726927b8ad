"""What the ranks of a :class:`ShardedRMSprop` compare before each of its collective operations.

Each function returns the :class:`~sharded_rmsprop.agreement.Fact` s one operation agrees on.
Only what the host already knows is compared (flags, options, counters), so building them
reads no tensor data and costs no host synchronisation on a GPU.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .agreement import Fact, plain

if TYPE_CHECKING:
    from .gradients import PendingClip, ScalerRequest
    from .optimizer import ShardedRMSprop
    from .shards import ShardedBucket

__all__ = [
    "OPTION_KEYS",
    "TORCH_ONLY_OPTIONS",
    "construction_facts",
    "options_fact",
    "param_labels",
    "ParameterScan",
    "scan_parameters",
    "state_facts",
    "step_facts",
]

#: The param-group options that the update reads.
OPTION_KEYS = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")

#: The entries torch.optim.RMSprop's groups have beyond ours, with the values we write for them.
TORCH_ONLY_OPTIONS = {"capturable": False, "foreach": None, "differentiable": False}

_SAME_PARAMETERS = (
    "Every rank must pass the same parameters in the same order, with the same shapes, "
    "dtypes and param-group options."
)


def param_labels(groups: Sequence[dict[str, Any]]) -> list[str]:
    """Words for every parameter of ``groups``, in the optimizer's order: its index, its name
    when the groups have ``param_names``, and its shape."""
    labels = []
    for group in groups:
        names = group.get("param_names") or [None] * len(group["params"])
        for param, name in zip(group["params"], names):
            named = f"'{name}', " if name is not None else ""
            labels.append(f"parameter {len(labels)} ({named}shape {tuple(param.shape)})")
    return labels


def options_fact(
    groups: Sequence[Mapping[str, Any]], first: int = 0, subject: str = "the param-group options"
) -> Fact:
    """The options of ``groups`` (the first being param group ``first``), compared as numbers."""

    def name(index: int) -> str:
        group, key = divmod(index, len(OPTION_KEYS))
        return f"the {OPTION_KEYS[key]} of param group {first + group}"

    values = tuple(_number(group[key]) for group in groups for key in OPTION_KEYS)
    return Fact(subject, values, name)


def _number(value: Any) -> Any:
    """An option as the number it is: ``0`` and ``0.0`` compute alike, so they agree (and
    read ``0`` in a message)."""
    value = plain(value)
    whole = isinstance(value, float) and value.is_integer() and abs(value) < 2**53
    return int(value) if whole else value


def construction_facts(opt: ShardedRMSprop, first: int) -> list[Fact]:
    """For building the flat buffers of the param groups ``first:``."""
    settings = ("fused", "master_weights", "skip_nonfinite", "host_shared")
    groups = opt.param_groups[first:]
    offset = sum(len(group["params"]) for group in opt.param_groups[:first])
    params = tuple(
        f"{str(p.dtype).removeprefix('torch.')} {tuple(p.shape)} on {p.device.type}, "
        f"param group {first + g}"
        for g, group in enumerate(groups)
        for p in group["params"]
    )
    options = options_fact(groups, first)
    return [
        Fact(
            "the optimizer's settings",
            tuple(getattr(opt, f"_{name}") for name in settings),
            lambda index: settings[index],
            _SAME_PARAMETERS,
        ),
        Fact(
            "the parameters", params, lambda index: f"parameter {offset + index}", _SAME_PARAMETERS
        ),
        Fact(options.subject, options.values, options.name, _SAME_PARAMETERS),
    ]


@dataclass(frozen=True)
class ParameterScan:
    """One pass over the parameters: what a step (or a load) finds before it agrees."""

    has_grad: tuple[bool, ...]  # by parameter index
    replaced: tuple[bool, ...]  # by parameter index: replaced since the last step, adoptable
    adoptable: list[list[int]]  # the same, as positions by bucket
    materialize: list[torch.device | None]  # by bucket: where a meta bucket's parameters went

    def has_grad_fact(self, opt: ShardedRMSprop) -> Fact:
        return _per_parameter(
            opt,
            "which parameters have a gradient",
            self.has_grad,
            "whether {} has a gradient",
            "Without DDP averaging the gradients, every rank must give the same parameters a "
            "gradient (zero_grad(set_to_none=True) and frozen parameters alike on all ranks).",
        )

    def replaced_fact(self, opt: ShardedRMSprop) -> Fact:
        return _per_parameter(
            opt,
            "the parameters replaced since the last step",
            self.replaced,
            "whether {} was replaced (p.data = ...)",
            "Replace parameters on every rank alike.",
        )


def _per_parameter(
    opt: ShardedRMSprop, subject: str, flags: tuple[bool, ...], question: str, advice: str
) -> Fact:
    """A fact of one flag per parameter; ``question`` puts a parameter's label in words."""
    label = lambda index: param_labels(opt.param_groups)[index]  # noqa: E731 (errors only)
    return Fact(subject, flags, lambda index: question.format(label(index)), advice)


def scan_parameters(
    opt: ShardedRMSprop, check_grad: Callable[[Tensor], None] | None = None
) -> ParameterScan:
    """Check that the param groups still hold the parameters the optimizer laid out, give
    every gradient to ``check_grad``, and find the parameters replaced since the last step.

    ``RuntimeError`` for a param group changed in place, or a parameter replaced by a tensor
    of another dtype, device or shape (which cannot be adopted).
    """
    _check_param_groups(opt)
    count = sum(len(group["params"]) for group in opt.param_groups)
    has_grad, replaced = [False] * count, [False] * count
    adoptable = []
    materialize = []
    for bucket in opt._buckets:
        found = bucket.scan(check_grad)
        materialize.append(_materialized_on(opt, bucket, found.adoptable))
        if found.foreign:
            position, change = found.foreign[0]
            label = param_labels(opt.param_groups)[bucket.plan.slots[position].index]
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


def _materialized_on(
    opt: ShardedRMSprop, bucket: ShardedBucket, moved: Sequence[int]
) -> torch.device | None:
    """The one device all parameters of a meta bucket moved to (``module.to_empty(...)``
    after building on ``meta``, swapping tensors), None for a bucket that is not on meta;
    ``RuntimeError`` if none or only some moved."""
    if not bucket.on_meta:
        return None
    if not moved:
        raise RuntimeError(
            "ShardedRMSprop was built on parameters on the meta device, and they are still "
            "there: module.to_empty(...) gives the module new Parameter objects, which the "
            "optimizer does not hold (as no torch optimizer would). Build the optimizer after "
            "to_empty(), or call torch.__future__.set_swap_module_params_on_conversion(True) "
            "before it, so that the parameters keep their identity and move"
        )
    staying = sorted(set(range(len(bucket.params))) - set(moved))
    devices = sorted({str(bucket.params[position].device) for position in moved})
    if staying:
        label = param_labels(opt.param_groups)[bucket.plan.slots[staying[0]].index]
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


def _check_param_groups(opt: ShardedRMSprop) -> None:
    """The param groups hold the very parameters the optimizer laid out, in their order."""
    if len(opt.param_groups) != len(opt._group_params):
        raise RuntimeError(
            f"the optimizer has {len(opt.param_groups)} param groups, but laid out "
            f"{len(opt._group_params)}: add groups with add_param_group()"
        )
    for g, (group, laid_out) in enumerate(zip(opt.param_groups, opt._group_params)):
        params = group["params"]
        if len(params) != len(laid_out) or not all(map(operator.is_, params, laid_out)):
            raise RuntimeError(
                f"the parameters of param group {g} are not those the optimizer laid out "
                f"({len(params)} now, {len(laid_out)} then): add parameters with "
                "add_param_group(), and give a parameter new values with p.data = ... rather "
                "than replacing the parameter"
            )


def step_facts(
    opt: ShardedRMSprop,
    clip: PendingClip | None,
    scaler: ScalerRequest | None,
    scan: ParameterScan,
) -> list[Fact]:
    """For one step: who has gradients, the options, the clip, the scaler, replaced
    parameters and master weights to reload."""
    return [
        scan.has_grad_fact(opt),
        options_fact(opt.param_groups),
        Fact(
            "the clipping to apply",
            (None if clip is None else plain(clip.requests),),
            lambda _: "the (max_norm, norm_type) of each pending clip_grad_norm_()",
            "clip_grad_norm_() must be called on every rank, with the same arguments.",
        ),
        Fact(
            "the GradScaler",
            (scaler is not None, scaler is not None and scaler.inverse_scale is not None),
            lambda index: ("whether a GradScaler calls step()", "whether it is still scaled")[
                index
            ],
            "Use a GradScaler on every rank or on none, and unscale_() on all or none.",
        ),
        scan.replaced_fact(opt),
        _reloads(opt),
    ]


def _reloads(opt: ShardedRMSprop) -> Fact:
    """Which parameters' master weights are to be taken from the parameters."""
    reloading = [False] * sum(len(bucket.params) for bucket in opt._buckets)
    for bucket in opt._buckets:
        for position in bucket.master_pending:
            reloading[bucket.plan.slots[position].index] = True
    return _per_parameter(
        opt,
        "the master weights to take from the parameters",
        tuple(reloading),
        "whether the master weights of {} are to be reloaded",
        "Call reload_master_weights() on every rank.",
    )


def state_facts(opt: ShardedRMSprop) -> list[Fact]:
    """For assembling state: every parameter's step count, the buffers each bucket holds and
    the master weights to take from the parameters."""
    labels = lambda index: param_labels(opt.param_groups)[index]  # noqa: E731 (errors only)
    steps: dict[int, float] = {}
    for bucket in opt._buckets:
        for slot, step in zip(bucket.plan.slots, bucket.steps.tolist()):
            steps[slot.index] = step
    buffers = tuple(tuple(sorted(bucket.state)) for bucket in opt._buckets)
    return [
        Fact(
            "the step counts",
            tuple(steps[i] for i in sorted(steps)),
            lambda index: f"the step of {labels(index)}",
        ),
        Fact("the state buffers", buffers, lambda index: f"the buffers of flat buffer {index}"),
        _reloads(opt),
    ]
