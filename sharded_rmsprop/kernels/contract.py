"""The kernel contract: one signature, :class:`UpdateFn`, and one validator for its arguments.

Every update kernel (:func:`~sharded_rmsprop.kernels.rmsprop_reference_`,
:func:`~sharded_rmsprop.kernels.rmsprop_cpu_fused_`,
:func:`~sharded_rmsprop.kernels.rmsprop_triton_`) is an :class:`UpdateFn` and starts with
:func:`check_update_arguments`, so a call that breaks the contract is refused by all of
them with the same exception and message. What differs between kernels (the dtypes a fused
kernel computes, its need for flat contiguous shards, the dtype of a tensor scale) is data,
a :class:`KernelRules`, not code. Whether a kernel can run on a device at all (a fused
kernel that is not built, CPU tensors for Triton outside its interpreter) is not an
argument error: the kernel raises ``RuntimeError`` for it once the arguments passed.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

__all__ = [
    "LOW_PRECISION_DTYPES",
    "KernelRules",
    "UpdateFn",
    "check_update_arguments",
    "mark_written",
]

#: The dtypes of ``low_precision_param``, the model's rounded copy of float32 master weights.
LOW_PRECISION_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


class UpdateFn(Protocol):
    """One RMSprop step on one span of a shard: ``torch.optim.RMSprop``'s algorithm."""

    def __call__(
        self,
        param: Tensor,
        grad: Tensor,
        square_avg: Tensor,
        momentum_buffer: Tensor | None,
        grad_avg: Tensor | None,
        *,
        lr: float,
        alpha: float,
        eps: float,
        weight_decay: float,
        momentum: float,
        centered: bool,
        maximize: bool,
        grad_scale: Tensor | float | None = None,
        low_precision_param: Tensor | None = None,
    ) -> None:
        """Update ``param``, ``square_avg`` and the buffers in place; return ``None``.

        - ``grad`` is scratch: a kernel may overwrite it (the reference does), so a caller
          that needs the gradient afterwards passes a copy.
        - ``momentum_buffer`` is given exactly when ``momentum > 0`` and ``grad_avg`` exactly
          when ``centered``: a buffer the step would not use is a caller's mistake, not
          something to ignore.
        - ``grad_scale``, a real number or a 0-d tensor on ``param``'s device, multiplies
          the gradient before anything else (a clipping coefficient, a loss scaler's
          inverse scale); a tensor is never read on the host by a GPU kernel.
        - ``low_precision_param`` (bfloat16 or float16, for float32 ``param`` only)
          receives the updated ``param`` rounded to nearest even, the bits of
          ``low_precision_param.copy_(param)``.
        - Tensors have ``param``'s shape, device and dtype (the copy its own dtype) and
          share no memory with one another.
        - Bad arguments raise ``TypeError`` or ``ValueError`` before anything is written.
        - A kernel never touches ``torch.distributed``: which rank updates what is the
          caller's business.
        """


@dataclass(frozen=True)
class KernelRules:
    """What one kernel accepts on top of the contract's common rules.

    ``dtypes``: the dtypes of ``param`` (and so of ``grad`` and the state) it computes;
    ``None`` for every floating-point and complex dtype, as ``torch.optim.RMSprop``.
    ``flat``: whether every tensor must be 1-D and contiguous (a fused loop over raw
    pointers); otherwise any shape and strides. ``scale_dtypes``: the dtypes of a tensor
    ``grad_scale``; ``None`` for every floating-point dtype.
    """

    name: str
    dtypes: tuple[torch.dtype, ...] | None
    flat: bool
    scale_dtypes: tuple[torch.dtype, ...] | None


def check_update_arguments(
    rules: KernelRules,
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    momentum_buffer: Tensor | None,
    grad_avg: Tensor | None,
    momentum: float,
    centered: bool,
    grad_scale: Tensor | float | None,
    low_precision_param: Tensor | None,
) -> list[Tensor]:
    """Raise ``TypeError`` or ``ValueError`` unless the arguments keep :class:`UpdateFn`'s
    contract under ``rules``; return the tensors the update writes besides ``grad``.

    ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong value: a missing or
    unneeded buffer, a shape, a device, a layout, memory shared between two arguments. The
    message names the argument. Memory is compared by extent (first to last byte a tensor
    can reach), so two interleaved strided views count as overlapping.
    """
    if momentum > 0:
        if momentum_buffer is None:
            raise ValueError(f"momentum_buffer is required when momentum > 0 (momentum={momentum})")
    elif momentum_buffer is not None:
        raise ValueError(
            f"momentum_buffer must be None when momentum <= 0 (momentum={momentum}): "
            f"the update would not use it"
        )
    if centered:
        if grad_avg is None:
            raise ValueError("grad_avg is required when centered=True")
    elif grad_avg is not None:
        raise ValueError("grad_avg must be None when centered=False: the update would not use it")

    named = [("param", param), ("grad", grad), ("square_avg", square_avg)]
    if momentum_buffer is not None:
        named.append(("momentum_buffer", momentum_buffer))
    if grad_avg is not None:
        named.append(("grad_avg", grad_avg))
    if low_precision_param is not None:
        named.append(("low_precision_param", low_precision_param))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")

    dtype = param.dtype
    if not _dtype_allowed(dtype, rules.dtypes, complex_too=True):
        raise TypeError(
            f"{rules.name} supports {_dtypes_text(rules.dtypes, 'floating-point and complex')} "
            f"parameters, got {dtype}"
            + ("" if rules.dtypes is None else "; use rmsprop_reference_ for other dtypes")
        )
    if low_precision_param is not None:
        if dtype != torch.float32:
            raise TypeError(
                f"low_precision_param needs float32 master weights, got param of dtype {dtype}"
            )
        if low_precision_param.dtype not in LOW_PRECISION_DTYPES:
            raise TypeError(
                f"low_precision_param has dtype {low_precision_param.dtype}, expected "
                f"{' or '.join(str(d) for d in LOW_PRECISION_DTYPES)}"
            )

    device = param.device
    shape = (param.numel(),) if rules.flat else param.shape
    for name, t in named:
        if t.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.dtype != dtype and t is not low_precision_param:
            raise TypeError(f"{name} has dtype {t.dtype}, expected the param's {dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but param is on {device}")
        if t.shape != shape:
            want = (
                f"a 1-D tensor of {shape[0]} elements"
                if rules.flat
                else f"param's shape {tuple(shape)}"
            )
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")
        if rules.flat and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")
    written = [t for name, t in named if name != "grad"]

    if isinstance(grad_scale, Tensor):
        if grad_scale.dim() != 0:
            raise ValueError(
                f"grad_scale must be a 0-d tensor, got shape {tuple(grad_scale.shape)}"
            )
        if not _dtype_allowed(grad_scale.dtype, rules.scale_dtypes, complex_too=False):
            raise TypeError(
                f"grad_scale must be a {_dtypes_text(rules.scale_dtypes, 'floating-point', 'or')} "
                f"tensor, got dtype {grad_scale.dtype}"
            )
        if grad_scale.device != device:
            raise ValueError(f"grad_scale is on {grad_scale.device} but param is on {device}")
        named.append(("grad_scale", grad_scale))
    # bool is an int subclass, but grad_scale=True is a mistake, not a scale of 1.
    elif grad_scale is not None and (
        isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real)
    ):
        raise TypeError(
            f"grad_scale must be a number, a 0-d tensor or None, got {type(grad_scale).__name__}"
        )

    if device.type != "meta":  # meta tensors have no memory (every data_ptr is 0)
        _check_no_overlap(named)
    return written


def mark_written(tensors: list[Tensor]) -> None:
    """Tell autograd that a kernel wrote ``tensors`` through raw pointers, as torch's own
    in-place operations do (its version counters cannot see such writes)."""
    for t in tensors:
        if not t.is_inference():  # an inference tensor has no version counter
            increment_version(t)


def _dtype_allowed(
    dtype: torch.dtype, allowed: tuple[torch.dtype, ...] | None, complex_too: bool
) -> bool:
    """``dtype`` is one of ``allowed``; for ``None``, floating point (or complex)."""
    if allowed is not None:
        return dtype in allowed
    return dtype.is_floating_point or (complex_too and dtype.is_complex)


def _dtypes_text(
    dtypes: tuple[torch.dtype, ...] | None, otherwise: str, last: str = "and"
) -> str:
    """``float32, bfloat16 and float16``, or ``otherwise`` for ``None``."""
    if dtypes is None:
        return otherwise
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def _check_no_overlap(named: list[tuple[str, Tensor]]) -> None:
    """Raise naming two of the tensors whose memory overlaps, in argument order.

    No two may: a kernel that reads one while it writes the other (or, for ``grad_scale``,
    reads it after another program or chunk has written) would compute from changed
    inputs. Extents are sorted by their first byte, so each one is compared once with the
    furthest-reaching extent before it, which overlaps it if any earlier one does.
    """
    extents = []
    for index, (_, t) in enumerate(named):
        n = t.numel()
        if n == 0:
            continue  # reaches no memory
        if not t.is_contiguous():  # one past the last element's offset, for any strides
            n = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        first = t.data_ptr()
        extents.append((first, first + n * t.element_size(), index))
    extents.sort()
    reach, holder = 0, 0
    for first, end, index in extents:
        if first < reach:
            a, b = sorted((holder, index))
            raise ValueError(f"{named[a][0]} and {named[b][0]} overlap in memory")
        if end > reach:
            reach, holder = end, index
