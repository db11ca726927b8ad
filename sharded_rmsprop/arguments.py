"""Checks of ShardedRMSprop's arguments that need no other rank, in torch's wording."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from .memory_order import overlaps_itself
from .options import NUMBER_KEYS, OPTIONS, SETTINGS

__all__ = [
    "check_grad",
    "check_hyperparameters",
    "check_numeric_options",
    "check_params",
    "check_torch_implementation",
    "checked_settings",
    "is_real",
]


def check_hyperparameters(options: Mapping[str, Any]) -> None:
    """torch.optim.RMSprop's checks of the options (:data:`~sharded_rmsprop.options.OPTIONS`),
    in its order and with its messages."""
    lr = options["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    for option in OPTIONS:
        value = options[option.name]
        if option.invalid and not option.minimum <= value:
            raise ValueError(option.invalid.format(value))


def check_torch_implementation(capturable: Any, foreach: Any, differentiable: Any) -> None:
    """torch.optim.RMSprop's implementation switches: ``foreach`` is accepted and changes
    nothing (every path computes torch's numbers; ``fused`` picks the kernel), the other two
    only off."""
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
    if capturable is not False:
        raise ValueError(
            "ShardedRMSprop does not support capturable=True: its step reads the options and "
            "agrees with the other ranks on the host, so it cannot be captured in a CUDA graph"
        )
    if differentiable is not False:
        raise ValueError(
            "ShardedRMSprop does not support differentiable=True: its update runs outside "
            "autograd, on a shard of the parameters"
        )


def checked_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """ShardedRMSprop's own settings (:data:`~sharded_rmsprop.options.SETTINGS`) but the
    process group, checked by kind, ``master_weights=None`` resolved (it means True)."""
    checked = {}
    for setting in SETTINGS:
        value = settings[setting.name]
        if setting.kind == "choice" and not (isinstance(value, str) and value in setting.choices):
            choices = ", ".join(repr(choice) for choice in setting.choices)
            raise ValueError(f"{setting.name} must be one of {choices}, got {value!r}")
        if setting.kind == "optional flag" and not (value is None or isinstance(value, bool)):
            raise TypeError(f"{setting.name} must be None, True or False, got {value!r}")
        if setting.kind == "flag" and not isinstance(value, bool):
            raise TypeError(f"{setting.name} must be True or False, got {value!r}")
        checked[setting.name] = value
    checked["master_weights"] = checked["master_weights"] is not False
    del checked["process_group"]  # (resolved into a DataParallelGroup first)
    return checked


def is_real(value: Any) -> bool:
    """A Python int or float (not a bool) that a float holds."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def check_numeric_options(where: str, group: Mapping[str, Any]) -> None:
    """The options the update computes with are numbers (``lr`` may be a one-element float
    tensor): ``ValueError`` naming the one that is not."""
    for key in NUMBER_KEYS:
        if key != "lr" and not is_real(group[key]):
            raise ValueError(f"{where}['{key}'] is {group[key]!r}, not a number")
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.is_meta or not lr.dtype.is_floating_point:
            raise ValueError(f"{where}['lr'] must be a number or a one-element float tensor")
    elif not is_real(lr):
        raise ValueError(f"{where}['lr'] is {lr!r}, not a number")


def check_params(params: list[Tensor]) -> None:
    """What sharding needs beyond torch's own checks: distinct, floating-point tensors."""
    if len(params) != len({id(p) for p in params}):
        raise ValueError(
            "ShardedRMSprop got the same parameter twice in one param group; each parameter "
            "gets one place in the flat buffer, so pass each once"
        )
    for param in params:
        if not (param.is_floating_point() or param.is_complex()):
            raise TypeError(
                f"ShardedRMSprop can only optimize floating-point or complex parameters, "
                f"but one of the params has dtype {param.dtype}"
            )
        if param.is_sparse:
            raise TypeError("ShardedRMSprop cannot shard sparse parameters")
        if overlaps_itself(param.shape, param.stride()):
            # (any other layout is laid out in its own memory order: memory_order.py)
            raise ValueError(
                "ShardedRMSprop lays each parameter's elements out once in its flat buffer, but "
                f"one of the params (shape {tuple(param.shape)}, strides {param.stride()}) "
                "reaches some of its elements more than once, e.g. an expanded view: pass a "
                "tensor of its own (param.contiguous(), or clone())"
            )


def check_grad(param: Tensor) -> None:
    """Reject a gradient torch would reject (``RuntimeError``, in torch's words where it has
    them)."""
    grad = param.grad
    if grad.is_sparse:
        raise RuntimeError("RMSprop does not support sparse gradients")
    if grad.shape != param.shape:
        raise RuntimeError(
            f"a gradient has shape {tuple(grad.shape)} but its parameter has shape "
            f"{tuple(param.shape)}"
        )
