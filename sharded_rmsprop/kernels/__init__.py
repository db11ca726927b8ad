"""Update kernels: functions of tensors and keyword-only hyperparameters, nothing else.

Every kernel is an :class:`UpdateFn` (:mod:`.contract`: the signature and its rules, in
place, ``None`` returned, ``grad`` scratch, no ``torch.distributed``) and checks its
arguments with the one validator there: a call that breaks the contract is refused by all
three with the same exception (what differs, the dtypes and layouts a fused kernel takes, is
a :class:`~.contract.KernelRules`, data rather than code):

- :func:`rmsprop_reference_`: torch's own operations, bit for bit ``torch.optim.RMSprop``;
- :func:`rmsprop_triton_`: one Triton kernel, one pass over memory (CUDA);
- :func:`rmsprop_cpu_fused_`: one compiled C++ loop, one pass over memory (CPU).

The fused kernels compute in float32 for float32, bfloat16 and float16 parameters, the CPU
one in float64 for float64 parameters; other dtypes (complex, and float64 on CUDA) always
take the reference path.
"""

from __future__ import annotations

import torch

from .contract import UpdateFn
from .cpu_fused import SUPPORTED_DTYPES as _CPU_FUSED_DTYPES
from .cpu_fused import cpu_fused_available, cpu_fused_preferred, rmsprop_cpu_fused_
from .reference import rmsprop_reference_
from .triton_rmsprop import SUPPORTED_DTYPES as _TRITON_DTYPES
from .triton_rmsprop import rmsprop_triton_, triton_available

__all__ = [
    "FUSED_DEVICE_TYPES",
    "UpdateFn",
    "fused_refusal",
    "rmsprop_cpu_fused_",
    "rmsprop_reference_",
    "rmsprop_triton_",
    "select_update",
]


#: The device types that have a fused kernel.
FUSED_DEVICE_TYPES = ("cpu", "cuda")


def fused_refusal(device: torch.device, dtype: torch.dtype, reason: str) -> str:
    """Why ``fused=True`` cannot be had for ``dtype`` on ``device``: torch's words where torch
    refuses too (a device without fused kernels, a dtype that is not floating point), then
    ``reason``."""
    if device.type not in FUSED_DEVICE_TYPES or not dtype.is_floating_point:
        return (
            "`fused=True` requires all the params to be floating point Tensors of supported "
            f"devices: {list(FUSED_DEVICE_TYPES)} but {dtype} and {device.type} ({reason})"
        )
    return f"fused=True was requested, but {reason}"


def _fused_for(device: torch.device, dtype: torch.dtype) -> tuple[UpdateFn | None, str]:
    """The fused kernel for ``device`` and ``dtype``, or None and the reason there is none."""
    if device.type == "cuda":
        if dtype not in _TRITON_DTYPES:
            return None, f"the Triton kernel takes float32, bfloat16 and float16, not {dtype}"
        if not triton_available(device):
            return None, "triton is not installed"
        return rmsprop_triton_, ""
    if device.type == "cpu":
        if dtype not in _CPU_FUSED_DTYPES:
            return None, f"the CPU kernel takes float32, bfloat16, float16 and float64, not {dtype}"
        if not cpu_fused_available():
            return None, "the CPU kernel could not be built (see the warning above)"
        return rmsprop_cpu_fused_, ""
    return None, f"there is no fused kernel for device type '{device.type}'"


def select_update(fused: bool | None, device: torch.device, dtype: torch.dtype) -> UpdateFn:
    """The update for shards of ``dtype`` on ``device``.

    ``fused=False`` gives the reference path; ``None`` the fused kernel where there is one,
    else the reference path; ``True`` the fused kernel or a ``RuntimeError`` saying why not.
    """
    if fused is False:
        return rmsprop_reference_
    kernel, reason = _fused_for(device, dtype)
    if kernel is rmsprop_cpu_fused_ and fused is None and not cpu_fused_preferred(dtype):
        return rmsprop_reference_  # 16-bit on a CPU without AVX2: torch's ops are faster
    if kernel is not None:
        return kernel
    if fused:
        raise RuntimeError(fused_refusal(device, dtype, reason) + "; pass fused=None or False")
    return rmsprop_reference_
