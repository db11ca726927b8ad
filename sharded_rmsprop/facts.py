"""What the ranks of a :class:`ShardedRMSprop` compare before each of its collective operations.

Each function returns the :class:`~sharded_rmsprop.agreement.Fact` s one operation agrees on.
Only what the host already knows is compared (flags, options, counters), so building them
reads no tensor data and costs no host synchronisation on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from .agreement import Fact, plain
from .memory_order import is_row_major, order_of
from .options import OPTION_KEYS, TORCH_SWITCHES

if TYPE_CHECKING:
    from .gradients import PendingClip, ScalerRequest
    from .shards import ShardedBucket

#: Param groups as torch.optim.Optimizer keeps them.
Groups = Sequence[Mapping[str, Any]]

__all__ = [
    "TORCH_ONLY_OPTIONS",
    "construction_facts",
    "options_fact",
    "param_labels",
    "Groups",
    "ParameterScan",
    "state_facts",
    "step_facts",
]

#: The entries torch.optim.RMSprop's groups have beyond ours, with the values we write for them.
TORCH_ONLY_OPTIONS = {switch.name: switch.default for switch in TORCH_SWITCHES}

_SAME_PARAMETERS = (
    "Every rank must pass the same parameters in the same order, with the same shapes, "
    "dtypes and param-group options."
)


def param_labels(groups: Groups) -> list[str]:
    """Words for every parameter of ``groups``, in the optimizer's order: its index, its name
    when the groups have ``param_names``, and its shape."""
    labels = []
    for group in groups:
        names = group.get("param_names") or [None] * len(group["params"])
        for param, name in zip(group["params"], names):
            named = f"'{name}', " if name is not None else ""
            labels.append(f"parameter {len(labels)} ({named}shape {tuple(param.shape)})")
    return labels


def options_fact(groups: Groups, first: int = 0, subject: str = "the param-group options") -> Fact:
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


def construction_facts(all_groups: Groups, first: int, settings: Mapping[str, Any]) -> list[Fact]:
    """For building the flat buffers of the param groups ``first:`` of ``all_groups`` with
    the optimizer's ``settings`` (name: value)."""
    names = tuple(settings)
    groups = all_groups[first:]
    offset = sum(len(group["params"]) for group in all_groups[:first])
    params = tuple(
        f"{str(p.dtype).removeprefix('torch.')} {tuple(p.shape)}{_layout(p)} on {p.device.type}, "
        f"param group {first + g}"
        for g, group in enumerate(groups)
        for p in group["params"]
    )
    options = options_fact(groups, first)
    return [
        Fact(
            "the optimizer's settings",
            tuple(settings.values()),
            lambda index: names[index],
            _SAME_PARAMETERS,
        ),
        Fact(
            "the parameters", params, lambda index: f"parameter {offset + index}", _SAME_PARAMETERS
        ),
        Fact(options.subject, options.values, options.name, _SAME_PARAMETERS),
    ]


def _layout(param: torch.Tensor) -> str:
    """The memory order the parameter is laid out in, where it is not row-major (the ranks
    must share it: they exchange flat shards in that order)."""
    order = order_of(param.shape, param.stride())
    return "" if is_row_major(order) else f" in memory order {order}"


@dataclass(frozen=True)
class ParameterScan:
    """One pass over the parameters: what a step (or a load) finds before it agrees."""

    has_grad: tuple[bool, ...]  # by parameter index
    replaced: tuple[bool, ...]  # by parameter index: replaced since the last step, adoptable
    adoptable: list[list[int]]  # the same, as positions by bucket
    materialize: list[torch.device | None]  # by bucket: where a meta bucket's parameters went

    def has_grad_fact(self, groups: Groups) -> Fact:
        return _per_parameter(
            groups,
            "which parameters have a gradient",
            self.has_grad,
            "whether {} has a gradient",
            "Without DDP averaging the gradients, every rank must give the same parameters a "
            "gradient (zero_grad(set_to_none=True) and frozen parameters alike on all ranks).",
        )

    def replaced_fact(self, groups: Groups) -> Fact:
        return _per_parameter(
            groups,
            "the parameters replaced since the last step",
            self.replaced,
            "whether {} was replaced (p.data = ...)",
            "Replace parameters on every rank alike.",
        )


def _per_parameter(
    groups: Groups, subject: str, flags: tuple[bool, ...], question: str, advice: str
) -> Fact:
    """A fact of one flag per parameter; ``question`` puts a parameter's label in words."""
    label = lambda index: param_labels(groups)[index]  # noqa: E731 (errors only)
    return Fact(subject, flags, lambda index: question.format(label(index)), advice)


def step_facts(
    groups: Groups,
    buckets: Sequence[ShardedBucket],
    clip: PendingClip | None,
    scaler: ScalerRequest | None,
    scan: ParameterScan,
) -> list[Fact]:
    """For one step of the optimizer with ``groups`` and ``buckets``: who has gradients, the
    options, the clip, the scaler, replaced parameters and master weights to reload."""
    return [
        scan.has_grad_fact(groups),
        options_fact(groups),
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
        scan.replaced_fact(groups),
        _reloads(groups, buckets),
    ]


def _reloads(groups: Groups, buckets: Sequence[ShardedBucket]) -> Fact:
    """Which parameters' master weights are to be taken from the parameters."""
    reloading = [False] * sum(len(bucket.params) for bucket in buckets)
    for bucket in buckets:
        for position in bucket.master_pending:
            reloading[bucket.plan.slots[position].index] = True
    return _per_parameter(
        groups,
        "the master weights to take from the parameters",
        tuple(reloading),
        "whether the master weights of {} are to be reloaded",
        "Call reload_master_weights() on every rank.",
    )


def state_facts(groups: Groups, buckets: Sequence[ShardedBucket]) -> list[Fact]:
    """For assembling the state of the optimizer with ``groups`` and ``buckets``: every
    parameter's step count, the buffers each bucket holds and the master weights to take
    from the parameters."""
    labels = lambda index: param_labels(groups)[index]  # noqa: E731 (errors only)
    steps: dict[int, float] = {}
    for bucket in buckets:
        for slot, step in zip(bucket.plan.slots, bucket.steps.tolist()):
            steps[slot.index] = step
    buffers = tuple(tuple(sorted(bucket.state)) for bucket in buckets)
    return [
        Fact(
            "the step counts",
            tuple(steps[i] for i in sorted(steps)),
            lambda index: f"the step of {labels(index)}",
        ),
        Fact("the state buffers", buffers, lambda index: f"the buffers of flat buffer {index}"),
        _reloads(groups, buckets),
    ]
