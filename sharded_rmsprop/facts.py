"""What the ranks of a :class:`ShardedRMSprop` compare before each of its collective operations.

Each function returns the :class:`~sharded_rmsprop.agreement.Fact` s one operation agrees on.
Only what the host already knows is compared (flags, options, counters), so building them
reads no tensor data and costs no host synchronisation on a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .agreement import Fact, plain

if TYPE_CHECKING:
    from .gradients import PendingClip, ScalerRequest
    from .optimizer import ShardedRMSprop

__all__ = [
    "OPTION_KEYS",
    "TORCH_ONLY_OPTIONS",
    "construction_facts",
    "param_labels",
    "replaced_params",
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


def _options(groups: Sequence[dict[str, Any]], first: int = 0) -> Fact:
    def name(index: int) -> str:
        group, key = divmod(index, len(OPTION_KEYS))
        return f"the {OPTION_KEYS[key]} of param group {first + group}"

    values = tuple(plain(group[key]) for group in groups for key in OPTION_KEYS)
    return Fact("the param-group options", values, name)


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
    options = _options(groups, first)
    return [
        Fact(
            "the optimizer's settings",
            tuple(getattr(opt, f"_{name}") for name in settings),
            lambda index: settings[index],
            _SAME_PARAMETERS,
        ),
        Fact("the parameters", params, lambda index: f"parameter {offset + index}", _SAME_PARAMETERS),
        Fact(options.subject, options.values, options.name, _SAME_PARAMETERS),
    ]


def replaced_params(opt: ShardedRMSprop) -> list[list[int]]:
    """The positions of the parameters replaced since the last step, by bucket; a
    ``RuntimeError`` for one that cannot be adopted (another dtype, device or shape)."""
    adoptable = []
    for bucket in opt._buckets:
        positions, foreign = bucket.replaced()
        if foreign:
            position, change = foreign[0]
            label = param_labels(opt.param_groups)[bucket.plan.slots[position].index]
            raise RuntimeError(
                f"{label} was replaced after ShardedRMSprop was built, by a tensor with "
                f"{change}: the optimizer keeps it in a flat buffer it can no longer "
                "update. Build the optimizer after moving or casting the model "
                "(model.to(...), .half(), .to_empty(...))."
            )
        adoptable.append(positions)
    return adoptable


def step_facts(
    opt: ShardedRMSprop, clip: PendingClip | None, scaler: ScalerRequest | None,
    replaced: Sequence[int],
) -> list[Fact]:
    """For one step: who has gradients, the options, the clip, the scaler, replaced
    parameters (indices in ``replaced``) and master weights to reload."""
    params = [param for group in opt.param_groups for param in group["params"]]
    label = lambda index: param_labels(opt.param_groups)[index]  # noqa: E731 (errors only)
    reloading = {
        bucket.plan.slots[position].index
        for bucket in opt._buckets
        for position in bucket.master_pending
    }
    replaced = set(replaced)
    return [
        Fact(
            "which parameters have a gradient",
            tuple(param.grad is not None for param in params),
            lambda index: f"whether {label(index)} has a gradient",
            "Without DDP averaging the gradients, every rank must give the same parameters a "
            "gradient (zero_grad(set_to_none=True) and frozen parameters alike on all ranks).",
        ),
        _options(opt.param_groups),
        Fact(
            "the clipping to apply",
            (None if clip is None else plain(clip.requests),),
            lambda _: "the (max_norm, norm_type) of each pending clip_grad_norm_()",
            "clip_grad_norm_() must be called on every rank, with the same arguments.",
        ),
        Fact(
            "the GradScaler",
            (scaler is not None, scaler is not None and scaler.inverse_scale is not None),
            lambda index: ("whether a GradScaler calls step()", "whether it is still scaled")[index],
            "Use a GradScaler on every rank or on none, and unscale_() on all or none.",
        ),
        Fact(
            "the parameters replaced since the last step",
            tuple(index in replaced for index in range(len(params))),
            lambda index: f"whether {label(index)} was replaced (p.data = ...)",
            "Replace parameters on every rank alike.",
        ),
        Fact(
            "the master weights to take from the parameters",
            tuple(index in reloading for index in range(len(params))),
            lambda index: f"whether the master weights of {label(index)} are to be reloaded",
            "Call reload_master_weights() on every rank.",
        ),
    ]


def state_facts(opt: ShardedRMSprop) -> list[Fact]:
    """For assembling or loading state: every parameter's step count and the buffers each
    bucket holds."""
    labels = lambda index: param_labels(opt.param_groups)[index]  # noqa: E731 (errors only)
    steps: dict[int, float] = {}
    for bucket in opt._buckets:
        for slot, step in zip(bucket.plan.slots, bucket.steps.tolist()):
            steps[slot.index] = step
    buffers = tuple(tuple(sorted(bucket.state)) for bucket in opt._buckets)
    return [
        Fact("the step counts", tuple(steps[i] for i in sorted(steps)), lambda index: f"the step of {labels(index)}"),
        Fact("the state buffers", buffers, lambda index: f"the buffers of flat buffer {index}"),
    ]

