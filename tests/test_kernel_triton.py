"""The fused Triton RMSprop kernel against a float64 ground truth and torch's own update.

On CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, numpy, one program at a
time); the CUDA tests run the compiled kernel where a GPU exists.

How ``TRITON_INTERPRET`` is handled: ``triton.jit`` chooses between the compiler and the
interpreter when it *decorates* a function, and pytest imports every test module (and so
possibly triton and the package) before running any test, so setting the variable at the top
of this module would be order-dependent and would leak into every other test module of the
process. Instead the kernel module wraps its kernel with ``triton.jit`` lazily, once per mode,
reading Triton's knob at each call, and the ``interpret`` fixture below sets the variable for
one test with ``monkeypatch`` (restored afterwards). The CUDA tests unset it, so they run the
compiled kernel in the same process.

Triton's interpreter converts float32 to bfloat16 by truncation (``_convert_float`` with no
rounding mode), while the GPU (``cvt.rn.bf16.f32``) and torch round to nearest even. The
``interpret`` fixture replaces that one conversion with torch's, so the interpreter computes what
the GPU does; ``test_bfloat16_store_rounds_to_nearest_even`` checks it took effect. (Asking for
``fp_downcast_rounding="rtne"`` does not help: in Triton 3.9 it is the default, and the interpreter
truncates either way.) The bfloat16 copy of float32 master weights (``low_precision_param``)
therefore is bit-exact in the interpreter by construction; ``test_cuda_rounded_copy_is_bit_exact``
checks the GPU's own conversion, while float16 is numpy's correctly rounded conversion here.

No recompilation on an LR schedule is checked twice: on the CPU by feeding the arguments the
wrapper passes to the binder Triton builds for the compiled kernel (the cache key), and on a GPU
by counting the compiled variants in the kernel's cache.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys

import pytest
import torch

pytest.importorskip("triton")

from sharded_rmsprop.kernels import rmsprop_reference_  # noqa: E402
from sharded_rmsprop.kernels import triton_rmsprop  # noqa: E402
from sharded_rmsprop.kernels.triton_rmsprop import (  # noqa: E402
    BLOCK_SIZE,
    rmsprop_triton_,
    triton_available,
)

requires_cuda = pytest.mark.cuda  # (skipped without a GPU: see conftest.py)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)
# (weight_decay, momentum, centered, maximize): all 16 combinations of the four switches.
OPTIONS = list(itertools.product((0.0, 0.1), (0.0, 0.9), (False, True), (False, True)))
ALL_ON = dict(weight_decay=0.1, momentum=0.9, centered=True, maximize=True)

STEPS = 20
# Gradient scales for successive steps (cycled): none, numbers (the int 1 among them) and 0-d
# float32 tensors, moved to the test's device. 0 makes a step that only decays the state.
GRAD_SCALES = (
    None, 0.37, torch.tensor(0.37), 1.0, torch.tensor(1.0), 0.0, torch.tensor(0.0), 2.5,
    torch.tensor(2.5), 1,
)  # fmt: skip
# Two programs, the second one partial: the full-block path and the masked tail both run.
N_CORRECTNESS = BLOCK_SIZE + 77

# The fused result may be at most FACTOR times as far from the float64 truth as torch's own
# update in the same storage dtype, plus SLACK_ULPS ulps at the tensor's scale. Both compute in
# at least the storage precision and round every stored value once per step, so their errors
# are of the same size; FACTOR absorbs the different rounding pattern (which elements happen to
# round badly), SLACK_ULPS the early steps where torch's error can be exactly zero.
FACTOR = 2.0
SLACK_ULPS = 4.0


def _option_id(opts: tuple[float, float, bool, bool]) -> str:
    wd, mom, centered, maximize = opts
    return f"wd{int(wd != 0)}-mom{int(mom > 0)}-cent{int(centered)}-max{int(maximize)}"


def _patch_interpreter_bf16_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the interpreter round float32 -> bfloat16 to nearest even, as the GPU does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_fp_trunc", None)
    if original is None:  # a different Triton; the rounding test below reports it
        return

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            bits = rounded.view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(builder, "create_fp_trunc", create_fp_trunc)


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _patch_interpreter_bf16_rounding(monkeypatch)


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _state(
    n: int, dtype: torch.dtype, device: str, *, momentum: float, centered: bool, gen: torch.Generator
) -> dict[str, torch.Tensor | None]:
    """Fresh optimizer state as torch.optim.RMSprop makes it: random params, zero buffers."""
    param = torch.randn(n, generator=gen).to(dtype)
    zeros = torch.zeros(n, dtype=dtype)
    return {
        "param": param.to(device),
        "square_avg": zeros.to(device),
        "momentum_buffer": zeros.clone().to(device) if momentum > 0 else None,
        "grad_avg": zeros.clone().to(device) if centered else None,
    }


def _copy(state: dict[str, torch.Tensor | None], dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    return {k: None if v is None else v.to(dtype, copy=True) for k, v in state.items()}


def _step(fn, state: dict[str, torch.Tensor | None], grad: torch.Tensor, **hp) -> None:
    fn(state["param"], grad, state["square_avg"], state["momentum_buffer"], state["grad_avg"], **hp)


def _check_close_to_truth(
    name: str, fused: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, step: int
) -> None:
    """Assert the fused result is as close to the float64 truth as torch's own update is."""
    if fused.numel() == 0:
        return
    fused64, ref64 = fused.double().cpu(), ref.double().cpu()
    truth = truth.cpu()
    ulp = torch.finfo(dtype).eps * truth.abs().max().item()  # one ulp at the tensor's scale
    assert torch.isfinite(fused64).all(), f"{name}: non-finite values after step {step}"
    err_fused = (fused64 - truth).abs()
    # torch's float16 update can overflow where the fused one does not (eps=1e-8 rounds to 0 in
    # float16, and g/0 = inf); compare where torch's result is finite.
    finite = torch.isfinite(ref64)
    err_ref = (ref64 - truth).abs()[finite].max().item() if finite.any() else math.inf
    worst = err_fused[finite].max().item() if finite.any() else 0.0
    bound = FACTOR * err_ref + SLACK_ULPS * ulp
    assert worst <= bound, (
        f"{name} after step {step}: fused error {worst:.3g} > {FACTOR} x torch's {err_ref:.3g} "
        f"+ {SLACK_ULPS} ulp ({ulp:.3g})"
    )
    # Absolute tolerance at the tensor's scale: a step computes each value through at most four
    # roundings (square_avg, sqrt, + eps, the division; half an ulp each) and adds that to what
    # the earlier steps carried, which alpha and momentum damp and param keeps, so after `step`
    # steps the error is within 2 * step ulps even if every rounding went the same way.
    # (Observed: at most 4 ulps after 20 steps.)
    tol = 2 * step * ulp
    torch.testing.assert_close(fused64, truth, rtol=0.0, atol=tol, msg=lambda m: f"{name}, step {step}: {m}")


def _grad_scale_on(scale: torch.Tensor | float | None, device: str) -> torch.Tensor | float | None:
    """``scale`` as the kernel gets it: a number, or a 0-d float32 tensor on ``device``."""
    return scale.to(device) if isinstance(scale, torch.Tensor) else scale


def _exact_grad_scale(scale: torch.Tensor | float | None) -> torch.Tensor | float | None:
    """The scale the float64 truth uses: the float32 value that the fp32 kernels multiply by.

    torch and the kernel both round a Python number to float32 before multiplying a float32 (or
    16-bit) gradient; the truth multiplies exactly by that float32 value, not by the decimal.
    """
    if scale is None or isinstance(scale, torch.Tensor):
        return scale  # None, or a float32 tensor, whose value float64 math uses as it is
    return torch.tensor(scale, dtype=torch.float32).item()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A 16-bit tensor's bit patterns, for bitwise comparisons (NaN != NaN in values)."""
    return t.cpu().view(torch.int16)


def _run_against_truth(
    dtype: torch.dtype,
    opts: tuple[float, float, bool, bool],
    device: str,
    n: int,
    steps: int = STEPS,
    *,
    grad_scales: tuple[torch.Tensor | float | None, ...] = (None,),
    low_precision: torch.dtype | None = None,
) -> None:
    """``steps`` updates of the fused kernel against torch's and a float64 truth.

    Step k uses ``grad_scales[(k - 1) % len(grad_scales)]``. With ``low_precision`` (float32
    ``dtype`` only), the kernel also writes a rounded copy of param, which must be exactly
    ``param.to(low_precision)`` after every step.
    """
    wd, mom, centered, maximize = opts
    hp = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=wd, momentum=mom, centered=centered, maximize=maximize)
    gen = torch.Generator().manual_seed(1234)
    fused = _state(n, dtype, device, momentum=mom, centered=centered, gen=gen)
    ref = _copy(fused, dtype)
    truth = _copy(fused, torch.float64)  # the same (storage-rounded) start, exact math after it
    copy_fused = copy_ref = None
    if low_precision is not None:
        copy_fused = fused["param"].to(low_precision)  # the model's copy, as the caller keeps it
        copy_ref = copy_fused.clone()
    for step in range(1, steps + 1):
        scale = _grad_scale_on(grad_scales[(step - 1) % len(grad_scales)], device)
        grad = torch.randn(n, generator=gen).to(dtype).to(device)
        grad_before = grad.clone()
        _step(rmsprop_triton_, fused, grad, **hp, grad_scale=scale, low_precision_param=copy_fused)
        assert torch.equal(grad, grad_before), "the kernel must not write grad"
        _step(rmsprop_reference_, ref, grad.clone(), **hp, grad_scale=scale, low_precision_param=copy_ref)
        _step(rmsprop_reference_, truth, grad.double(), **hp, grad_scale=_exact_grad_scale(scale))
        for name, value in fused.items():
            if value is not None:
                _check_close_to_truth(name, value, ref[name], truth[name], dtype, step)
        if copy_fused is not None:
            expected = fused["param"].to(low_precision)
            assert torch.equal(_bits(copy_fused), _bits(expected)), f"rounded copy after step {step}"


# ---------------------------------------------------------------------------------------------
# Interpreter (CPU)


@pytest.mark.parametrize("opts", OPTIONS, ids=_option_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_truth(interpret, dtype: torch.dtype, opts) -> None:
    _run_against_truth(dtype, opts, "cpu", N_CORRECTNESS)


@pytest.mark.parametrize("opts", OPTIONS, ids=_option_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_scale_matches_float64_truth(interpret, dtype: torch.dtype, opts) -> None:
    _run_against_truth(dtype, opts, "cpu", N_CORRECTNESS, grad_scales=GRAD_SCALES)


@pytest.mark.parametrize("opts", OPTIONS, ids=_option_id)
@pytest.mark.parametrize("low_precision", LOW_PRECISION_DTYPES, ids=str)
def test_master_weights_match_float64_truth(interpret, low_precision: torch.dtype, opts) -> None:
    _run_against_truth(
        torch.float32, opts, "cpu", N_CORRECTNESS, grad_scales=GRAD_SCALES, low_precision=low_precision
    )


@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 0.37, 3.0])
def test_grad_scale_comes_first(interpret, scale: float, as_tensor: bool) -> None:
    """The gradient is scaled before the maximize negation and the weight decay.

    With alpha=0 the new square_avg is exactly g_eff**2 for the gradient the update used, so it
    shows g_eff = -(scale * grad) + weight_decay * param, and not, say, the decayed gradient
    scaled (which is what a scale applied after the weight decay would give).
    """
    n, wd = 1000, 0.5
    gen = torch.Generator().manual_seed(5)
    param, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    square_avg = torch.zeros(n)
    grad_scale = torch.tensor(scale) if as_tensor else scale
    hp = dict(lr=0.0, alpha=0.0, eps=1e-8, weight_decay=wd, momentum=0.0, centered=False, maximize=True)
    rmsprop_triton_(param, grad, square_avg, None, None, **hp, grad_scale=grad_scale)
    s32 = torch.tensor(scale, dtype=torch.float32).double()
    scaled, decay = s32 * grad.double(), wd * param.double()
    g_eff = -scaled + decay
    # |g_eff| in float32 is within a few ulps of its terms' size (the sum can cancel).
    magnitude = square_avg.double().sqrt()
    tol = 4 * torch.finfo(torch.float32).eps * (scaled.abs() + decay.abs())
    assert ((magnitude - g_eff.abs()).abs() <= tol).all()
    if scale != 1.0:  # then scaling last is a different update, which the check tells apart
        scaled_last = s32 * (-grad.double() + decay)
        assert ((magnitude - scaled_last.abs()).abs() > tol).float().mean() > 0.9
    ref_square_avg = torch.zeros(n)
    rmsprop_reference_(param.clone(), grad.clone(), ref_square_avg, None, None, **hp, grad_scale=grad_scale)
    _check_close_to_truth("square_avg", square_avg, ref_square_avg, g_eff**2, torch.float32, 1)


def _rounding_cases() -> torch.Tensor:
    """float32 values whose rounding to bfloat16 or float16 is easy to get wrong.

    Exact ties (half-way between two neighbours, odd and even, to be rounded to the even one)
    and the values one ulp either side of them, for both formats; float16 subnormals and ties
    among them; values that overflow float16 (65520 is the tie with infinity) or bfloat16 (the
    largest float32); float32 subnormals (bfloat16's own subnormals); signed zeros, infinities
    and NaNs; and random bit patterns.
    """
    gen = torch.Generator().manual_seed(99)
    high = torch.randint(0, 1 << 15, (256,), generator=gen, dtype=torch.int64)  # sign 0, any exp.
    bf16_ties = (high << 16) | 0x8000
    fp16_grid = torch.randn(256, generator=gen).to(torch.float16).float().view(torch.int32).long()
    fp16_ties = (fp16_grid & ~0x1FFF) | 0x1000  # half an ulp of float16's 10-bit mantissa
    fp16_sub = (torch.arange(0, 64, dtype=torch.float64) * 0.5 * 2.0**-24).float()  # k/2 ulps
    fp16_sub = fp16_sub.view(torch.int32).long()
    ties = torch.cat([bf16_ties, fp16_ties, fp16_sub])
    patterns = torch.cat([ties - 1, ties, ties + 1])
    specials = torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 65504.0, 65519.996, 65520.0, -65520.0,
         65536.0, 1e5, 3.4028234663852886e38, -3.4028234663852886e38, 2.0**-25, 2.0**-24, 6.1e-5,
         1e-45, -1e-45, 1.1754942e-38, 1e-40],
        dtype=torch.float32,
    )  # fmt: skip
    weird = torch.tensor([0x00008000, 0x00018000, 0x007FFFFF, 0x7F800001, 0xFFC00001, 0x7FFFFFFF])
    random_bits = torch.randint(-(2**31), 2**31, (512,), generator=gen, dtype=torch.int64)
    bits = torch.cat([patterns, weird, random_bits])
    # Wrap to int32 two's complement, then reinterpret the bits as float32.
    from_bits = ((bits + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32)
    return torch.cat([from_bits, specials, -from_bits])


# numpy warns about the arithmetic on the infinities and NaNs among the cases; that is the point.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("low_precision", LOW_PRECISION_DTYPES, ids=str)
def test_rounded_copy_is_bit_exact(interpret, low_precision: torch.dtype) -> None:
    _check_rounded_copy(low_precision, "cpu")


def _check_rounded_copy(low_precision: torch.dtype, device: str) -> None:
    """The rounded copy is param.to(dtype) bit for bit: ties, subnormals, overflow, NaN.

    lr=0 and a zero gradient leave param exactly as it was (p - 0 * 0), so param holds the hard
    cases after the update. The copy is a view one element into a larger buffer: misaligned,
    and its neighbours must stay untouched.
    """
    values = _rounding_cases()
    n = values.numel()
    param = values.to(device)
    buffer = torch.full((n + 2,), 7.0, dtype=low_precision, device=device)
    copy = buffer[1 : n + 1]
    zeros = torch.zeros(n, device=device)
    hp = dict(lr=0.0, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False)
    rmsprop_triton_(param, zeros.clone(), zeros.clone(), None, None, **hp, low_precision_param=copy)
    param, buffer, copy = param.cpu(), buffer.cpu(), buffer.cpu()[1 : n + 1]
    nan = param.isnan()
    assert torch.equal(nan, values.isnan()) and torch.equal(
        param[~nan].view(torch.int32), values[~nan].view(torch.int32)
    ), "the premise: lr=0 must leave param bit for bit"
    expected = param.to(low_precision)
    assert torch.equal(copy.isnan(), expected.isnan()), "NaN must round to NaN, and only NaN"
    keep = ~expected.isnan()  # NaN payloads may differ: torch writes 0x7FC0, the GPU 0x7FFF
    mismatch = (_bits(copy) != _bits(expected)) & keep
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} values rounded differently, e.g. {param[mismatch][:5].tolist()} -> "
        f"{copy[mismatch][:5].tolist()} instead of {expected[mismatch][:5].tolist()}"
    )
    assert buffer[0].item() == 7.0 and buffer[-1].item() == 7.0, "written outside the copy"


def test_lerp_branch_for_small_alpha(interpret) -> None:
    # alpha < 0.5 makes grad_avg.lerp_(grad, 1 - alpha) take torch's other formula.
    gen = torch.Generator().manual_seed(7)
    n = 300
    hp = dict(lr=0.01, alpha=0.3, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=True, maximize=False)
    fused = _state(n, torch.float32, "cpu", momentum=0.0, centered=True, gen=gen)
    ref = _copy(fused, torch.float32)
    truth = _copy(fused, torch.float64)
    for step in range(1, 6):
        grad = torch.randn(n, generator=gen)
        _step(rmsprop_triton_, fused, grad.clone(), **hp)
        _step(rmsprop_reference_, ref, grad.clone(), **hp)
        _step(rmsprop_reference_, truth, grad.double(), **hp)
        for name in ("param", "square_avg", "grad_avg"):
            _check_close_to_truth(name, fused[name], ref[name], truth[name], torch.float32, step)


def _random_live_state(n: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A mid-training state: square_avg >= grad_avg**2, so centered avg is real."""
    grad_avg = 0.1 * torch.randn(n, generator=gen)
    return {
        "param": torch.randn(n, generator=gen).to(dtype),
        "grad": torch.randn(n, generator=gen).to(dtype),
        "square_avg": (grad_avg**2 + torch.rand(n, generator=gen) + 0.1).to(dtype),
        "momentum_buffer": torch.randn(n, generator=gen).to(dtype),
        "grad_avg": grad_avg.to(dtype),
    }


_NAMES = ("param", "grad", "square_avg", "momentum_buffer", "grad_avg")


def _one_step_matches_reference(views: dict[str, torch.Tensor], dtype: torch.dtype, **hp) -> None:
    ref = {k: v.clone() for k, v in views.items()}
    truth = {k: v.double() for k, v in views.items()}
    grad_before = views["grad"].clone()
    rmsprop_triton_(*(views[k] for k in _NAMES), **hp)
    rmsprop_reference_(*(ref[k] for k in _NAMES), **hp)
    rmsprop_reference_(*(truth[k] for k in _NAMES), **hp)
    assert torch.equal(views["grad"], grad_before)
    for name in ("param", "square_avg", "momentum_buffer", "grad_avg"):
        _check_close_to_truth(name, views[name], ref[name], truth[name], dtype, 1)


@pytest.mark.parametrize(
    "n", [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 1_000_003], ids=lambda n: f"n{n}"
)
def test_sizes(interpret, n: int) -> None:
    """Every size updates exactly its n elements: nothing past the end is read or written."""
    guard = 5
    gen = torch.Generator().manual_seed(n)
    full = _random_live_state(n + guard, torch.float32, gen)
    before = {k: v.clone() for k, v in full.items()}
    views = {k: v[:n] for k, v in full.items()}
    _one_step_matches_reference(views, torch.float32, lr=0.01, alpha=0.99, eps=1e-8, **ALL_ON)
    for k in full:
        assert torch.equal(full[k][n:], before[k][n:]), f"{k} was written past element {n}"


@pytest.mark.parametrize("offset", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_slices(interpret, dtype: torch.dtype, offset: int) -> None:
    """Shards that start off a 16-byte boundary (views into a larger buffer)."""
    n, guard = 2 * BLOCK_SIZE + 5, 4
    gen = torch.Generator().manual_seed(offset)
    full = _random_live_state(offset + n + guard, dtype, gen)
    before = {k: v.clone() for k, v in full.items()}
    views = {k: v[offset : offset + n] for k, v in full.items()}
    assert views["param"].data_ptr() % 16 != 0
    _one_step_matches_reference(views, dtype, lr=0.01, alpha=0.99, eps=1e-8, **ALL_ON)
    for k in full:
        assert torch.equal(full[k][:offset], before[k][:offset]), f"{k} written before the slice"
        assert torch.equal(full[k][offset + n :], before[k][offset + n :]), f"{k} written after the slice"


def test_lr_schedule(interpret) -> None:
    """A learning rate changed every step gives torch's result for that schedule."""
    n = 500
    gen = torch.Generator().manual_seed(3)
    fused = _state(n, torch.float32, "cpu", momentum=0.9, centered=True, gen=gen)
    ref = _copy(fused, torch.float32)
    truth = _copy(fused, torch.float64)
    for step in range(1, 11):
        lr = 0.01 * 0.5 * (1 + math.cos(math.pi * step / 10))  # cosine decay, ends at 0
        hp = dict(lr=lr, alpha=0.99, eps=1e-8, **ALL_ON)
        grad = torch.randn(n, generator=gen)
        _step(rmsprop_triton_, fused, grad.clone(), **hp)
        _step(rmsprop_reference_, ref, grad.clone(), **hp)
        _step(rmsprop_reference_, truth, grad.double(), **hp)
        for name, value in fused.items():
            _check_close_to_truth(name, value, ref[name], truth[name], torch.float32, step)
    # The schedule ends at lr=0, where p - 0 * buf == p: the step changed the state, not param.
    before = fused["param"].clone()
    _step(rmsprop_triton_, fused, torch.randn(n, generator=gen), lr=0.0, alpha=0.99, eps=1e-8, **ALL_ON)
    assert torch.equal(fused["param"], before)


def test_bfloat16_store_rounds_to_nearest_even(interpret) -> None:
    """bfloat16 results are rounded to nearest even, as on the GPU and in torch."""
    _check_bf16_rounding("cpu")


def _check_bf16_rounding(device: str) -> None:
    # alpha=0: square_avg becomes g*g, exact in float32 (8 x 8 significant bits), then rounded
    # to bfloat16 on the store. Pick values of g where truncation and rounding differ.
    g = torch.arange(1.0, 2.0, 2**-7, dtype=torch.float32).to(torch.bfloat16)
    exact = g.float() ** 2
    nearest = exact.to(torch.bfloat16)
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert not torch.equal(nearest, truncated)  # the test distinguishes the two
    n = g.numel()
    param = torch.zeros(n, dtype=torch.bfloat16, device=device)
    square_avg = torch.zeros(n, dtype=torch.bfloat16, device=device)
    rmsprop_triton_(
        param, g.to(device), square_avg, None, None,
        lr=0.0, alpha=0.0, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
    )  # fmt: skip
    assert torch.equal(square_avg.cpu(), nearest)


def test_triton_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available(torch.device("cpu"))
    assert triton_available(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available(torch.device("cpu"))
    assert not triton_available(torch.device("meta"))


def test_imports_and_refuses_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module imports where triton does not; the kernel then says why it cannot run."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    # Named inside the package, so that its relative import (of the kernel contract) resolves.
    spec = importlib.util.spec_from_file_location(
        "sharded_rmsprop.kernels._triton_rmsprop_no_triton", triton_rmsprop.__file__
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.triton_available(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not module.triton_available(torch.device("cpu"))
    t = torch.zeros(4)
    with pytest.raises(RuntimeError, match="needs triton"):
        module.rmsprop_triton_(
            t, t.clone(), t.clone(), None, None,
            lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing modified


def _args(n: int = 10, dtype: torch.dtype = torch.float32) -> dict:
    return {k: torch.ones(n, dtype=dtype) for k in _NAMES}


_HP = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9, centered=True, maximize=False)


def _call(args: dict, **overrides) -> None:
    rmsprop_triton_(*(args[k] for k in _NAMES), **{**_HP, **overrides})


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(grad=torch.ones(9)), ValueError, r"grad has shape \(9,\), expected a 1-D tensor of 10 elements"),
        (lambda a: a.update(grad_avg=torch.ones(11)), ValueError, r"grad_avg has shape \(11,\)"),
        (lambda a: a.update({k: v.double() for k, v in a.items()}), TypeError, "float64"),
        (lambda a: a.update({k: v.to(torch.int32) for k, v in a.items()}), TypeError, "int32"),
        (lambda a: a.update(square_avg=a["square_avg"].half()), TypeError, "square_avg has dtype torch.float16"),
        (lambda a: a.update(square_avg=torch.ones(20)[::2]), ValueError, "square_avg must be contiguous"),
        (lambda a: a.update({k: v.view(2, 5) for k, v in a.items()}), ValueError,
         r"param has shape \(2, 5\), expected a 1-D tensor of 10 elements"),
        (lambda a: a.update(momentum_buffer=None), ValueError, "momentum_buffer is required when momentum > 0"),
        (lambda a: a.update(grad_avg=None), ValueError, "grad_avg is required when centered=True"),
        (lambda a: a.update(grad=torch.ones(10, device="meta")), ValueError, "grad is on meta but param is on cpu"),
        (lambda a: a.update(grad=[1.0] * 10), TypeError, "grad must be a Tensor"),
    ],
    ids=[
        "short-grad", "long-grad_avg", "float64", "int32", "mixed-dtypes", "non-contiguous",
        "2-d", "missing-momentum_buffer", "missing-grad_avg", "other-device", "not-a-tensor",
    ],
)  # fmt: skip
def test_bad_input(interpret, change, error, match) -> None:
    args = _args()
    change(args)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    with pytest.raises(error, match=match):
        _call(args)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was modified by a call that raised"


def _other_view(t: torch.Tensor, dtype: torch.dtype, start: int = 0) -> torch.Tensor:
    """A ``dtype`` view of ``t``'s memory from its ``start``-th ``dtype`` element on."""
    return t.view(dtype)[start : start + t.numel()]


def _scale_inside_copy() -> dict[str, torch.Tensor]:
    """A float16 copy for 10 elements and a float32 grad_scale made of its last two."""
    buffer = torch.zeros(10, dtype=torch.float16)
    return dict(low_precision_param=buffer, grad_scale=buffer[8:].view(torch.float32)[0])


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (lambda a: dict(low_precision_param=torch.ones(10)), TypeError,
         "low_precision_param has dtype torch.float32, expected torch.bfloat16 or torch.float16"),
        (lambda a: dict(low_precision_param=torch.ones(9, dtype=torch.bfloat16)), ValueError,
         r"low_precision_param has shape \(9,\), expected a 1-D tensor of 10 elements"),
        (lambda a: dict(low_precision_param=torch.ones(2, 5, dtype=torch.float16)), ValueError,
         r"low_precision_param has shape \(2, 5\), expected a 1-D tensor of 10 elements"),
        (lambda a: dict(low_precision_param=torch.ones(20, dtype=torch.bfloat16)[::2]), ValueError,
         "low_precision_param must be contiguous"),
        (lambda a: dict(low_precision_param=torch.ones(10, dtype=torch.bfloat16, device="meta")),
         ValueError, "low_precision_param is on meta but param is on cpu"),
        (lambda a: dict(low_precision_param=[0.0] * 10), TypeError, "low_precision_param must be a Tensor"),
        (lambda a: dict(low_precision_param=_other_view(a["param"], torch.bfloat16)), ValueError,
         "param and low_precision_param overlap in memory"),
        (lambda a: dict(low_precision_param=_other_view(a["param"], torch.float16, 7)), ValueError,
         "param and low_precision_param overlap in memory"),
        (lambda a: dict(low_precision_param=_other_view(a["grad"], torch.bfloat16, 10)), ValueError,
         "grad and low_precision_param overlap in memory"),
        (lambda a: dict(low_precision_param=_other_view(a["grad_avg"], torch.float16, 3)), ValueError,
         "grad_avg and low_precision_param overlap in memory"),
        (lambda a: dict(grad_scale=torch.ones(1)), ValueError, r"grad_scale must be a 0-d tensor, got shape \(1,\)"),
        (lambda a: dict(grad_scale=torch.tensor(0.5, dtype=torch.float64)), TypeError,
         "grad_scale must be a float32 tensor, got dtype torch.float64"),
        (lambda a: dict(grad_scale=torch.tensor(0.5, device="meta")), ValueError,
         "grad_scale is on meta but param is on cpu"),
        (lambda a: dict(grad_scale="0.5"), TypeError, "grad_scale must be a number, a 0-d tensor or None, got str"),
        (lambda a: dict(grad_scale=True), TypeError, "grad_scale must be a number, a 0-d tensor or None, got bool"),
        (lambda a: dict(grad_scale=a["square_avg"][3]), ValueError, "square_avg and grad_scale overlap in memory"),
        (lambda a: _scale_inside_copy(), ValueError, "low_precision_param and grad_scale overlap in memory"),
        # A valid copy does not excuse a bad scale: every check runs before the launch.
        (lambda a: dict(low_precision_param=torch.zeros(10, dtype=torch.bfloat16), grad_scale=torch.ones(2)),
         ValueError, "grad_scale must be a 0-d tensor"),
    ],
    ids=[
        "copy-float32", "copy-short", "copy-2-d", "copy-non-contiguous", "copy-other-device", "copy-not-a-tensor",
        "copy-aliases-param", "copy-overlaps-param", "copy-overlaps-grad", "copy-overlaps-grad_avg",
        "scale-1-d", "scale-float64", "scale-other-device", "scale-str", "scale-bool", "scale-in-square_avg",
        "scale-in-copy", "scale-after-good-copy",
    ],
)  # fmt: skip
def test_bad_master_weights_or_grad_scale(interpret, extra, error, match) -> None:
    gen = torch.Generator().manual_seed(21)
    args = {k: torch.rand(10, generator=gen) + 0.5 for k in _NAMES}
    kwargs = extra(args)
    tensors = {**args, **{k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}}
    # Compared as bytes: a float16 view of float32 data may hold NaNs, and NaN != NaN.
    before = {k: _bytes(v) for k, v in tensors.items() if v.device.type == "cpu"}
    with pytest.raises(error, match=match):
        _call(args, **kwargs)
    for k, v in before.items():
        assert torch.equal(_bytes(tensors[k]), v), f"{k} was modified by a call that raised"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``'s contents as raw bytes."""
    return t.contiguous().view(-1).view(torch.uint8).clone()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_need_float32_param(interpret, dtype: torch.dtype) -> None:
    args = _args(dtype=dtype)
    copy = torch.zeros(10, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in args.items()}
    with pytest.raises(TypeError, match=f"low_precision_param needs float32 master weights, got param of dtype {dtype}"):
        _call(args, low_precision_param=copy)
    assert not copy.any()
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was modified by a call that raised"


def test_unexpected_buffers(interpret) -> None:
    with pytest.raises(ValueError, match="momentum_buffer must be None when momentum <= 0"):
        _call(_args(), momentum=0.0)
    with pytest.raises(ValueError, match="grad_avg must be None when centered=False"):
        _call(_args(), centered=False)


def test_cpu_without_interpreter(compiled) -> None:
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        _call(_args())


def test_empty(interpret) -> None:
    args = _args(0)
    _call(args)
    assert all(v.numel() == 0 for v in args.values())


@pytest.mark.parametrize("scale_kind", ["none", "number", "tensor"])
def test_hyperparameters_keep_the_specialisation_key(
    interpret, monkeypatch: pytest.MonkeyPatch, scale_kind: str
) -> None:
    """No recompilation on a schedule, checked without a GPU.

    The compiled kernel's cache is keyed by what Triton's binder makes of the launch arguments.
    Capture the arguments the wrapper really passes, feed them to the binder Triton builds for
    the compiled kernel (for an sm_90 target), and check that changing lr, alpha, eps,
    weight_decay, momentum or a numeric grad_scale -- including to ints like 1, which Triton
    would specialise as constants -- leaves the key unchanged. A tensor grad_scale must reach
    the kernel as the tensor (read there through its pointer, never on the host), here together
    with a rounded copy. `test_cuda_changing_hyperparameters_does_not_recompile` checks the real
    cache on a GPU.
    """
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", 90, 32))
    except Exception as exc:  # internals of this triton version, or no NVIDIA backend
        pytest.skip(f"cannot build Triton's binder here: {exc!r}")
    monkeypatch.delenv("TRITON_INTERPRET")
    jitted = triton_rmsprop._get_kernel(interpret=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    binder = create_function_from_signature(jitted.signature, jitted.params, backend)

    calls = []

    class _Capture:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((args, kwargs))

    monkeypatch.setattr(triton_rmsprop, "_get_kernel", lambda interpret=None: _Capture())
    n = 4 * BLOCK_SIZE
    t = {k: torch.rand(n) + 0.5 for k in _NAMES}
    settings = [
        (0.01, 0.99, 1e-8, 0.1, 0.9, 0.37),
        (0.02, 0.99, 1e-8, 0.1, 0.9, 1),
        (1, 0.9, 1e-6, 1, 0.5, 0),
        (1.0, 0.5, 0, 0.01, 1, 1.0),
        (1e-5, 0.0, 1e-3, 2.5, 0.99, 2.5),
    ]
    copy = torch.empty(n, dtype=torch.bfloat16) if scale_kind == "tensor" else None
    for lr, alpha, eps, wd, mom, scale in settings:
        grad_scale = {"none": None, "number": scale, "tensor": torch.tensor(float(scale))}[scale_kind]
        rmsprop_triton_(
            *(t[k] for k in _NAMES),
            lr=lr, alpha=alpha, eps=eps, weight_decay=wd, momentum=mom, centered=True, maximize=False,
            grad_scale=grad_scale, low_precision_param=copy,
        )  # fmt: skip
        args, kwargs = calls[-1]
        assert kwargs["GRAD_SCALE"] == {"none": "none", "number": "value", "tensor": "pointer"}[scale_kind]
        if scale_kind == "tensor":
            assert any(a is grad_scale for a in args), "the tensor grad_scale must be passed as is"
    keys = {str(binder(*args, **kwargs)[1:]) for args, kwargs in calls}
    assert len(calls) == len(settings) and len(keys) == 1, keys


# ---------------------------------------------------------------------------------------------
# CUDA: the compiled kernel


def _compiled_variants(kernel) -> int:
    """How many compiled specialisations the jitted kernel holds, over all devices."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:  # triton >= 3.2: device -> (kernel_cache, ...)
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(c) for c in kernel.cache.values())  # older triton: device -> {key: kernel}


@requires_cuda
@pytest.mark.parametrize("opts", OPTIONS, ids=_option_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_float64_truth(compiled, dtype: torch.dtype, opts) -> None:
    _run_against_truth(dtype, opts, "cuda", (1 << 16) + 77)


@requires_cuda
def test_cuda_bfloat16_rounds_to_nearest_even(compiled) -> None:
    _check_bf16_rounding("cuda")


@requires_cuda
@pytest.mark.parametrize("opts", OPTIONS, ids=_option_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_grad_scale_matches_float64_truth(compiled, dtype: torch.dtype, opts) -> None:
    _run_against_truth(dtype, opts, "cuda", (1 << 16) + 77, grad_scales=GRAD_SCALES)


@requires_cuda
@pytest.mark.parametrize("opts", OPTIONS, ids=_option_id)
@pytest.mark.parametrize("low_precision", LOW_PRECISION_DTYPES, ids=str)
def test_cuda_master_weights_match_float64_truth(compiled, low_precision: torch.dtype, opts) -> None:
    _run_against_truth(
        torch.float32, opts, "cuda", (1 << 16) + 77, grad_scales=GRAD_SCALES, low_precision=low_precision
    )


@requires_cuda
@pytest.mark.parametrize("low_precision", LOW_PRECISION_DTYPES, ids=str)
def test_cuda_rounded_copy_is_bit_exact(compiled, low_precision: torch.dtype) -> None:
    _check_rounded_copy(low_precision, "cuda")


@requires_cuda
def test_cuda_tensor_grad_scale_does_not_synchronise(compiled) -> None:
    """A grad_scale tensor on the GPU is read by the kernel: the host never waits for it."""
    n = 4 * BLOCK_SIZE
    t = {k: torch.rand(n, device="cuda") + 0.5 for k in _NAMES}
    copy = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    scale = torch.tensor(0.5, device="cuda")
    hp = dict(lr=0.01, alpha=0.99, eps=1e-8, **ALL_ON, grad_scale=scale, low_precision_param=copy)
    rmsprop_triton_(*(t[k] for k in _NAMES), **hp)  # compiles outside the checked region
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising torch call now raises
    try:
        rmsprop_triton_(*(t[k] for k in _NAMES), **hp)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


@requires_cuda
def test_cuda_changing_hyperparameters_does_not_recompile(compiled) -> None:
    n = 4 * BLOCK_SIZE  # a multiple of 16, like a padded shard
    t = {k: torch.rand(n, device="cuda") + 0.5 for k in _NAMES}
    hp = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.1, momentum=0.9, centered=True, maximize=False)
    rmsprop_triton_(*(t[k] for k in _NAMES), **hp)
    kernel = triton_rmsprop._get_kernel(interpret=False)
    variants = _compiled_variants(kernel)
    assert variants >= 1
    # lr=1 and weight_decay=1 as ints would be specialised by Triton if passed through as ints.
    for lr, alpha, eps, wd, mom in [
        (0.02, 0.99, 1e-8, 0.1, 0.9),
        (1, 0.9, 1e-6, 1, 0.5),
        (1.0, 0.5, 0.0, 0.01, 1),
        (1e-5, 0.0, 1e-3, 2.5, 0.99),
    ]:
        rmsprop_triton_(
            *(t[k] for k in _NAMES),
            lr=lr, alpha=alpha, eps=eps, weight_decay=wd, momentum=mom, centered=True, maximize=False,
        )  # fmt: skip
    torch.cuda.synchronize()
    assert _compiled_variants(kernel) == variants, "changing a hyperparameter compiled a new kernel"


@requires_cuda
@pytest.mark.parametrize("low_precision", LOW_PRECISION_DTYPES, ids=str)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
def test_cuda_master_weights_same_bits_as_interpreter(
    monkeypatch: pytest.MonkeyPatch, low_precision: torch.dtype, as_tensor: bool
) -> None:
    """The scaled update and its rounded copy: the same bits on the GPU and in the interpreter."""
    n = BLOCK_SIZE + 77
    gen = torch.Generator().manual_seed(13)
    cpu = _random_live_state(n, torch.float32, gen)
    cpu["copy"] = torch.zeros(n, dtype=low_precision)
    gpu = {k: v.cuda() for k, v in cpu.items()}
    hp = dict(lr=0.01, alpha=0.99, eps=1e-8, **ALL_ON)

    def run(state: dict[str, torch.Tensor], device: str) -> None:
        scale = torch.tensor(0.37, device=device) if as_tensor else 0.37
        rmsprop_triton_(*(state[k] for k in _NAMES), **hp, grad_scale=scale, low_precision_param=state["copy"])

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run(gpu, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _patch_interpreter_bf16_rounding(monkeypatch)
    run(cpu, "cpu")
    for k in cpu:
        assert torch.equal(gpu[k].cpu(), cpu[k]), k


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_same_bits_as_interpreter(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """No FMA contraction and IEEE div/sqrt: the GPU computes the interpreter's bits."""
    n = BLOCK_SIZE + 77
    gen = torch.Generator().manual_seed(11)
    cpu = _random_live_state(n, dtype, gen)
    gpu = {k: v.cuda() for k, v in cpu.items()}
    hp = dict(lr=0.01, alpha=0.99, eps=1e-8, **ALL_ON)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rmsprop_triton_(*(gpu[k] for k in _NAMES), **hp)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rmsprop_triton_(*(cpu[k] for k in _NAMES), **hp)
    for k in _NAMES:
        assert torch.equal(gpu[k].cpu(), cpu[k]), k
