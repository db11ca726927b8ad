"""The fused RMSprop update as one Triton kernel: one pass over a shard, fp32 math.

:func:`rmsprop_triton_` has the signature and the semantics of
:func:`~sharded_rmsprop.kernels.reference.rmsprop_reference_` (``torch.optim.RMSprop``'s
algorithm), but does the whole update in one pass (one kernel launch, two where the length is
not a multiple of 16: see below): every element of ``param``,
``grad`` and ``square_avg`` (and ``momentum_buffer`` / ``grad_avg`` when enabled) is read once
and every result is written once. The eager reference runs 5 to 9 torch operations, each a full
pass over memory with its own intermediate; the update is purely memory-bound, so the fused pass
is the fastest it can be.

**Bytes per element** (fp32 storage; half of it for bfloat16 and float16):

- plain: reads param, grad, square_avg (12 B), writes param, square_avg (8 B): **20 B**;
- momentum *or* centered: also reads and writes momentum_buffer or grad_avg: **28 B**;
- momentum *and* centered: both: **36 B**.

``grad`` is read and never written (the reference uses it as scratch; here the scaling, the
negation and the weight decay live in registers), so it costs 4 B, not 8.

**Options that add no pass.** ``low_precision_param`` (float32 master weights with a bfloat16 or
float16 model copy) additionally writes the new ``param`` rounded to nearest even: **+2 B**, so
22, 30 or 38 B; a separate ``low_precision_param.copy_(param)`` after the update would be a
second pass of 6 B (reading ``param`` back, 4 B, and writing the copy). ``grad_scale`` (gradient clipping, loss-scale
unscaling) costs nothing per element: a number is a kernel argument, and a 0-d tensor is one
4-byte load per program, read on the device so that a scale computed on the GPU never makes the
host wait (``.item()`` would).

**Why fp32 math.** Every element is loaded, converted to float32, updated entirely in float32 and
rounded once to the storage dtype on the store. For bfloat16 and float16 storage this is *more*
accurate than the eager path, which rounds to the storage dtype after each of its operations
(``g*g``, the square root, ``g/avg``, ... each lose up to half an ulp of an 8- or 11-bit mantissa)
and can even overflow where float32 does not (``eps=1e-8`` is 0 in float16); here only the stored
state is rounded. For float32 storage it is the eager path's precision: the same operations in the
same order, each rounded as an IEEE float32 operation, so the results agree to a few ulps, not bit
for bit (torch's kernels contract some ``a*b + c`` into FMAs; the reference path is the one with
bitwise parity). The division and the square root are the IEEE round-to-nearest ones
(``div_rn``, ``sqrt_rn``), not the approximate ones Triton's ``/`` and ``tl.sqrt`` may lower to,
and the launch disables FMA contraction: the compiled kernel then computes exactly what Triton's
interpreter computes, so the CPU tests check the GPU's bits. float64 is rejected: the caller runs
the reference path for it.

**No recompilation on a schedule.** The option switches (``WEIGHT_DECAY``, ``MOMENTUM``,
``CENTERED``, ``MAXIMIZE``, ``STORE_LOW_PRECISION`` and ``GRAD_SCALE``: none, a number, or a
tensor) are ``tl.constexpr``: each combination compiles once, with dead branches removed. The numbers (``lr``,
``alpha``, ``1 - alpha``, ``eps``, ``weight_decay``, ``momentum``, a numeric ``grad_scale``) are
runtime arguments annotated ``tl.float32``: Triton neither specialises a float-annotated
argument on its value nor retypes it (an ``int`` equal to 1 *would* be specialised, and a bare
``0`` would change the signature to ``i32``), and the wrapper passes ``float(...)`` anyway. An LR
scheduler changing ``lr``, or a clipping coefficient changing every step, therefore reuses the
compiled kernel. ``n_elements`` keeps Triton's default specialisation (divisible by 16 or not),
and only the divisible variant vectorises: with any other ``n_elements`` every access of the
launch is a scalar one (``ld.global.b16`` for 16-bit storage), since the mask may turn false at
any element. The optimizer's layout aligns every parameter's start but updates only a
parameter's own elements, so a parameter of odd size is an ``n`` that is not a multiple of 16:
such a call on 16-byte-aligned shards is two launches, the first ``n - n % 16`` elements through
the vectorised variant and the last ``n % 16`` through the scalar one.

**The compiled code.** For 16-byte-aligned shards and a multiple of 16 elements every global
access is a 128-bit one (``ld.global.v4.b32`` / ``st.global.v4.b32``, eight 16-bit values or
four float32 ones): two per thread and float32 stream, one per 16-bit stream; the only other
load is a tensor ``grad_scale``'s 4 bytes. No variant spills, none contains an ``fma``, the
divisions are ``div.rn.f32`` and the square roots ``sqrt.rn.f32``, on sm_80, sm_90 and sm_100.
With ``STORE_LOW_PRECISION`` Triton lays the 16-bit store out as eight values per thread and
the float32 stores as four (it never makes a store wider than 128 bits), so the float32
results pass through 4 KiB of shared memory on their way to their stores (barriers between):
the bytes moved to and from global memory are the ones above, what the exchange costs has not
been measured. ``tests/test_kernel_compiled.py`` checks all of this on every commit, compiling
ahead of time without a GPU; ``benchmarks/triton_compiled.py`` compiles every variant and keeps
the table (``benchmarks/results/triton_compiled.md``).

**Interpreter.** With ``TRITON_INTERPRET=1`` Triton runs kernels in numpy on the host, which CI uses
to test this math on CPU tensors. ``triton.jit`` decides between the compiled and the interpreted
kernel *when it decorates* a function, so a module-level ``@triton.jit`` would be frozen by
whatever the environment said at import time. Instead the kernel body is a plain function that is
wrapped by ``triton.jit`` lazily, once per mode, and the mode is read from Triton's own knob at
each call: setting or unsetting ``TRITON_INTERPRET`` at any time (a test fixture, for instance)
takes effect on the next call, whatever the import order.

Offsets are computed in int64 (``program_id`` is widened before multiplying by ``BLOCK_SIZE``), so
shards of more than 2**31 elements are addressed correctly.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from .contract import KernelRules, check_update_arguments, mark_written

try:  # triton is optional: the package must import on machines without it.
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a broken install that fails while importing
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _HAS_TRITON = False
    _TRITON_IMPORT_ERROR: Exception | None = exc
else:
    _HAS_TRITON = True
    _TRITON_IMPORT_ERROR = None

__all__ = ["BLOCK_SIZE", "RULES", "SUPPORTED_DTYPES", "rmsprop_triton_", "triton_available"]

#: Elements per Triton program. 1024 elements on 4 warps is 8 per thread: two 16-byte vector
#: accesses per fp32 stream, one per 16-bit stream; large enough to hide latency on every stream.
BLOCK_SIZE: int = 1024
_NUM_WARPS: int = 4
#: Triton specialises an integer argument, and a pointer, on being divisible by 16 (the
#: pointer's address, in bytes): only then are the accesses vectorised.
_DIVISIBILITY: int = 16

#: The storage dtypes the kernel handles; the caller routes others (float64, complex) to the
#: reference update.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

#: What the kernel takes: 1-D contiguous shards of :data:`SUPPORTED_DTYPES`, and a
#: ``grad_scale`` tensor of float32 (read by the kernel through its pointer).
RULES = KernelRules(
    "rmsprop_triton_", dtypes=SUPPORTED_DTYPES, flat=True, scale_dtypes=(torch.float32,)
)


def _interpret_mode() -> bool:
    """Whether Triton would interpret kernels right now (``TRITON_INTERPRET``), read live."""
    if not _HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # triton >= 3.4: the knob reads the environment on each access
        return bool(knobs.runtime.interpret)
    # Older triton reads the variable itself, with these spellings.
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available(device: torch.device) -> bool:
    """Whether :func:`rmsprop_triton_` can run on tensors that live on ``device``.

    True when triton imports and ``device`` is a CUDA device, or when ``TRITON_INTERPRET=1`` is
    set and ``device`` is the CPU (Triton's interpreter, slow, for testing the math).
    """
    if not _HAS_TRITON:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _interpret_mode()


if _HAS_TRITON:

    def _rmsprop_kernel(
        param_ptr,  # *T, the parameter shard: read, updated, written back once
        grad_ptr,  # *T, the gradient shard: read once, never written
        square_avg_ptr,  # *T, running average of grad**2: read and written once
        momentum_buffer_ptr,  # *T when MOMENTUM; otherwise a placeholder that is never touched
        grad_avg_ptr,  # *T when CENTERED; otherwise a placeholder that is never touched
        low_precision_param_ptr,  # *bf16 or *fp16 when STORE_LOW_PRECISION; else a placeholder
        grad_scale_ptr,  # *fp32, a 0-d tensor, when GRAD_SCALE == "pointer"; else a placeholder
        n_elements,  # elements in every one of the buffers above
        lr: tl.float32,
        alpha: tl.float32,
        one_minus_alpha: tl.float32,  # 1 - alpha, computed in float64 on the host as torch does
        eps: tl.float32,
        weight_decay: tl.float32,
        momentum: tl.float32,
        grad_scale: tl.float32,  # used when GRAD_SCALE == "value"
        WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
        MOMENTUM: tl.constexpr,  # momentum > 0
        CENTERED: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        GRAD_SCALE: tl.constexpr,  # "none", "value" (the float grad_scale) or "pointer"
        STORE_LOW_PRECISION: tl.constexpr,  # also write the rounded copy of the new param
        BLOCK_SIZE: tl.constexpr,
    ):
        # int64 before the multiply: pid * BLOCK_SIZE overflows int32 past 2**31 elements.
        pid = tl.program_id(axis=0).to(tl.int64)
        offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements

        p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        sq = tl.load(square_avg_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

        # The scale comes first: it stands for what clip_grad_norm_ (or an unscale) would have
        # done to the gradient before the optimizer saw it.
        if GRAD_SCALE == "pointer":
            # Read on the device: a scale computed on the GPU (a clipping coefficient) is used
            # without the host ever waiting for it. One 4-byte load per program, cached.
            g = g * tl.load(grad_scale_ptr).to(tl.float32)
        elif GRAD_SCALE == "value":
            g = g * grad_scale
        if MAXIMIZE:
            g = -g
        if WEIGHT_DECAY:
            g = g + weight_decay * p

        sq = alpha * sq + one_minus_alpha * g * g

        if CENTERED:
            ga = tl.load(grad_avg_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            # torch.lerp(start, end, w): start + w*(end - start) if |w| < 0.5,
            # else end - (end - start)*(1 - w); w = 1 - alpha.
            ga = tl.where(
                tl.abs(one_minus_alpha) < 0.5,
                ga + one_minus_alpha * (g - ga),
                g - (g - ga) * (1.0 - one_minus_alpha),
            )
            tl.store(grad_avg_ptr + offsets, ga.to(grad_avg_ptr.dtype.element_ty), mask=mask)
            avg = tl.sqrt_rn(sq - ga * ga)
        else:
            avg = tl.sqrt_rn(sq)
        avg = avg + eps  # after the square root, as torch does

        if MOMENTUM:
            buf = tl.load(momentum_buffer_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            buf = momentum * buf + tl.div_rn(g, avg)
            tl.store(
                momentum_buffer_ptr + offsets,
                buf.to(momentum_buffer_ptr.dtype.element_ty),
                mask=mask,
            )
            p = p - lr * buf
        else:
            p = p - lr * tl.div_rn(g, avg)

        tl.store(square_avg_ptr + offsets, sq.to(square_avg_ptr.dtype.element_ty), mask=mask)
        tl.store(param_ptr + offsets, p.to(param_ptr.dtype.element_ty), mask=mask)
        if STORE_LOW_PRECISION:
            # param is float32 here, so p holds exactly the value just stored; rounding it once
            # gives the bits of low_precision_param.copy_(param). Round to nearest even is
            # Triton's default for a float downcast, spelled out because the bits are the
            # contract (cvt.rn.bf16.f32 / cvt.rn.f16.f32 on the GPU). Triton 3.9's interpreter
            # truncates to bfloat16 whatever the mode says; the tests make it round as the GPU.
            lp = p.to(low_precision_param_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(low_precision_param_ptr + offsets, lp, mask=mask)


# One jitted wrapper per mode: {False: compiled JITFunction, True: InterpretedFunction}.
_KERNELS: dict[bool, Any] = {}


def _get_kernel(interpret: bool | None = None) -> Any:
    """The jitted kernel for the current (or the given) ``TRITON_INTERPRET`` mode.

    ``triton.jit`` picks the interpreter or the compiler from the knob at decoration time, so
    the wrapper is created while the knob has the wanted value. The compiled one keeps its
    per-device cache of compiled variants (``.device_caches``) across calls.
    """
    if not _HAS_TRITON:
        raise RuntimeError(f"triton is not available: {_TRITON_IMPORT_ERROR!r}")
    current = _interpret_mode()
    if interpret is None:
        interpret = current
    kernel = _KERNELS.get(interpret)
    if kernel is None:
        if interpret != current:
            raise RuntimeError(
                f"the {'interpreted' if interpret else 'compiled'} Triton kernel has not been "
                f"created yet and TRITON_INTERPRET is {'set' if current else 'not set'}"
            )
        kernel = triton.jit(_rmsprop_kernel)
        _KERNELS[interpret] = kernel
    return kernel


@torch.no_grad()
def rmsprop_triton_(
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
    """Update ``param`` and the state in place with one fused Triton kernel.

    The :class:`~sharded_rmsprop.kernels.contract.UpdateFn` contract under :data:`RULES`: 1-D
    contiguous tensors of one dtype from :data:`SUPPORTED_DTYPES`, on a CUDA device (or the
    CPU under ``TRITON_INTERPRET=1``). ``grad`` is only read. The hyperparameters are
    converted with ``float()`` (a tensor ``lr`` on a GPU would synchronise), and a tensor
    ``grad_scale`` is read by the kernel, never on the host. ``low_precision_param`` is stored
    while the other
    buffers are still being read and written: the contract's rule that no two arguments share
    memory is what keeps a bfloat16 view of ``param``'s own storage from corrupting the update.
    Every check runs before the first launch, so a call that raises has written nothing.
    """
    written = check_update_arguments(
        RULES,
        param,
        grad,
        square_avg,
        momentum_buffer,
        grad_avg,
        momentum,
        centered,
        grad_scale,
        low_precision_param,
    )
    if not _HAS_TRITON:
        raise RuntimeError(
            f"rmsprop_triton_ needs triton, which failed to import: {_TRITON_IMPORT_ERROR!r}; "
            f"use rmsprop_reference_ instead"
        )
    interpret = _interpret_mode()
    device = param.device
    if not (device.type == "cuda" or (device.type == "cpu" and interpret)):
        raise RuntimeError(
            f"rmsprop_triton_ runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
            f"got tensors on {device}"
        )

    n = param.numel()
    if n == 0:
        return

    scale_mode, scale_tensor, scale_value = _grad_scale_args(grad_scale)
    kernel = _get_kernel(interpret)
    shards = [
        param,
        grad,
        square_avg,
        momentum_buffer if momentum_buffer is not None else param,  # placeholder, never read
        grad_avg if grad_avg is not None else param,  # placeholder, never read
        # A placeholder, never touched, where the feature is off.
        low_precision_param if low_precision_param is not None else param,
    ]
    numbers = (
        float(lr),
        float(alpha),
        1.0 - float(alpha),
        float(eps),
        float(weight_decay),
        float(momentum),
        scale_value,
    )
    options = dict(
        WEIGHT_DECAY=bool(weight_decay != 0),
        MOMENTUM=momentum_buffer is not None,
        CENTERED=bool(centered),
        MAXIMIZE=bool(maximize),
        GRAD_SCALE=scale_mode,
        STORE_LOW_PRECISION=low_precision_param is not None,
        BLOCK_SIZE=BLOCK_SIZE,
        num_warps=_NUM_WARPS,
        # No a*b + c -> fma contraction: every operation rounds as one IEEE fp32 operation, as
        # in the interpreter, so the CPU tests and the GPU compute the same bits. Passing it
        # explicitly also silences Triton 3.9's warning about the default changing in 3.10.
        enable_fp_fusion=False,
    )
    for start, end in _launch_ranges(n, shards):
        part = shards if end - start == n else [t[start:end] for t in shards]
        # A placeholder, never touched, where grad_scale is not a tensor.
        scale_ptr = scale_tensor if scale_tensor is not None else param
        args = (*part, scale_ptr, end - start, *numbers)
        grid = (triton.cdiv(end - start, BLOCK_SIZE),)
        if device.type == "cuda":
            # Triton launches on the *current* device and its current stream.
            with torch.cuda.device(device):
                kernel[grid](*args, **options)
        else:
            kernel[grid](*args, **options)

    mark_written(written)


def _launch_ranges(n: int, shards: list[Tensor]) -> list[tuple[int, int]]:
    """The ranges ``[start, end)`` of the launches that update ``n`` elements: one, or two.

    Triton specialises ``n_elements`` on being divisible by 16, and only that variant
    vectorises: otherwise ``offsets < n_elements`` may turn false at any element, and every
    access of the launch becomes a scalar one (``ld.global.b16`` for 16-bit storage). So when
    ``n`` is not a multiple of 16 and every shard starts on a 16-byte boundary (without that,
    the accesses are scalar anyway), the first ``n - n % 16`` elements are one launch, of the
    vectorised variant, and the last ``n % 16`` another.
    """
    body = n - n % _DIVISIBILITY
    if 0 < body < n and all(t.data_ptr() % _DIVISIBILITY == 0 for t in shards):
        return [(0, body), (body, n)]
    return [(0, n)]


def _grad_scale_args(grad_scale: Tensor | float | None) -> tuple[str, Tensor | None, float]:
    """How the kernel gets a valid ``grad_scale``: ``(GRAD_SCALE, 0-d tensor to read, float)``.

    A number becomes a runtime float32 argument (mode ``"value"``): no device copy per call
    and, being a float-annotated argument, no recompilation when it changes every step. A
    tensor is read by the kernel through its pointer (mode ``"pointer"``), on the CPU under
    the interpreter as well, so the tests exercise the GPU's code path; it is never read on
    the host, which for a CUDA tensor would wait for the GPU. Every program reads it while
    others already write their results, which is why the contract keeps it out of every
    other argument's memory. ``None`` compiles the multiply away.
    """
    if grad_scale is None:
        return "none", None, 1.0
    if isinstance(grad_scale, Tensor):
        return "pointer", grad_scale, 1.0
    return "value", None, float(grad_scale)
