"""The fused CPU update (``sharded_rmsprop.kernels.cpu_fused``).

Numbers: every option combination against a float64 ground truth, with torch's own reference
path in the same storage dtype as the yardstick, on every instruction set the CPU has; the
same for gradient scales and for float32 master weights with a bfloat16 / float16 copy, whose
rounding is checked bit for bit. Then sizes and misaligned starts, LR schedules (no rebuild),
bad input, the fallback when the build fails, and several processes building at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from typing import Callable, Iterator

import pytest
import torch
from torch import Tensor

from sharded_rmsprop.kernels import rmsprop_reference_
from sharded_rmsprop.kernels import cpu_fused
from sharded_rmsprop.kernels.cpu_fused import (
    cpu_fused_available,
    cpu_fused_preferred,
    rmsprop_cpu_fused_,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STEPS = 20
# eps = 1e-8 underflows to 0 in float16, where torch's reference then divides 0 by 0; 1e-4 is
# a normal float16 number, so the reference stays a meaningful yardstick there.
EPS = {torch.float32: 1e-8, torch.bfloat16: 1e-8, torch.float16: 1e-4}
# (weight_decay, momentum, centered, maximize): all 16 combinations.
COMBOS = list(itertools.product((0.0, 0.1), (0.0, 0.9), (False, True), (False, True)))
ALL_OPTIONS = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.1, momentum=0.9, centered=True,
                   maximize=False)
#: The dtypes of a low-precision copy of float32 master weights.
COPY_DTYPES = (torch.bfloat16, torch.float16)
#: grad_scale as callers pass it: a number or a 0-d float32 tensor (or None).
GRAD_SCALES = [0.0, 1.0, 0.37, torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.37)]


def scale_id(scale: Tensor | float | None) -> str:
    return f"tensor({scale.item()})" if isinstance(scale, Tensor) else str(scale)


def exact_scale(scale: Tensor | float | None) -> float | None:
    """The scale the kernels multiply by (float32), for the float64 truth."""
    return None if scale is None else float(torch.as_tensor(scale, dtype=torch.float32))


@pytest.fixture(scope="module")
def kernel() -> None:
    """Build (or load) the kernel once; skip, saying why, where no compiler works."""
    if not cpu_fused_available():
        pytest.skip(f"no fused CPU kernel here: {cpu_fused._unavailable_reason}")


def isas() -> list[str]:
    """Every instruction set the kernel can use on this CPU, lowest first."""
    best = cpu_fused._isa()
    return list(cpu_fused._ISA_NAMES[: cpu_fused._ISA_NAMES.index(best) + 1])


@contextlib.contextmanager
def using_isa(isa: str) -> Iterator[None]:
    best = cpu_fused._isa()
    assert cpu_fused._isa(isa) == isa
    try:
        yield
    finally:
        cpu_fused._isa(best)


class Run:
    """One optimizer state (param and buffers) of a given dtype, stepped by one update fn."""

    def __init__(self, fn, p0: Tensor, dtype: torch.dtype, momentum: float, centered: bool,
                 copy_dtype: torch.dtype | None = None):
        self.fn, self.momentum, self.centered = fn, momentum, centered
        self.param = p0.to(dtype).clone()
        self.square_avg = torch.zeros_like(self.param)
        self.momentum_buffer = torch.zeros_like(self.param) if momentum > 0 else None
        self.grad_avg = torch.zeros_like(self.param) if centered else None
        # the model's low-precision copy of float32 master weights, rewritten by every step
        self.copy = None if copy_dtype is None else torch.empty(len(p0), dtype=copy_dtype)

    def step(self, grad: Tensor, **hp) -> None:
        g = grad.to(self.param.dtype).clone()
        if self.copy is not None:
            hp["low_precision_param"] = self.copy
        self.fn(self.param, g, self.square_avg, self.momentum_buffer, self.grad_avg,
                momentum=self.momentum, centered=self.centered, **hp)

    def tensors(self) -> dict[str, Tensor]:
        out = {"param": self.param, "square_avg": self.square_avg}
        if self.momentum_buffer is not None:
            out["momentum_buffer"] = self.momentum_buffer
        if self.grad_avg is not None:
            out["grad_avg"] = self.grad_avg
        return out


def three_runs(p0: Tensor, dtype: torch.dtype, momentum: float, centered: bool,
               copy_dtype: torch.dtype | None = None) -> list[Run]:
    """The fused kernel and torch's reference in ``dtype`` (both keeping a ``copy_dtype``
    copy of the params if given), and the reference in float64."""
    return [
        Run(rmsprop_cpu_fused_, p0, dtype, momentum, centered, copy_dtype),
        Run(rmsprop_reference_, p0, dtype, momentum, centered, copy_dtype),
        Run(rmsprop_reference_, p0, torch.float64, momentum, centered),
    ]


def step_all(runs: list[Run], grad: Tensor, grad_scale: Tensor | float | None, **hp) -> None:
    """One step of the three runs; the float64 truth scales by the kernels' float32 value."""
    fused, ref, truth = runs
    fused.step(grad, grad_scale=grad_scale, **hp)
    ref.step(grad, grad_scale=grad_scale, **hp)
    truth.step(grad, grad_scale=exact_scale(grad_scale), **hp)


def assert_rounded_copy(copy: Tensor, param: Tensor, where: str) -> None:
    """``copy`` holds the bits of ``param.to(copy.dtype)``; a NaN only has to stay a NaN
    (torch's own conversions disagree on its bits: 0x7FC0 scalar, 0xFFFF vectorised)."""
    want = param.to(copy.dtype)
    nan = want.isnan()
    assert torch.equal(copy.isnan(), nan), f"{where}: NaNs differ"
    got, want = copy[~nan].view(torch.int16), want[~nan].view(torch.int16)
    if not torch.equal(got, want):
        i = (got != want).nonzero()[0].item()
        bits = param[~nan][i].view(torch.int32).item()
        got_bits, want_bits = got[i].item() & 0xFFFF, want[i].item() & 0xFFFF
        raise AssertionError(f"{where}: param bits {bits:#010x}: copy {got_bits:#06x}, "
                             f"param.to() {want_bits:#06x}")


def assert_as_accurate(
    fused: Run, ref: Run, truth: Run, dtype: torch.dtype, where: str, absolute: bool = True
) -> None:
    """The fused result is as close to the float64 truth as torch's own path in ``dtype``.

    Bound, per tensor, with e(x) = max |x - truth| and s = max |truth|:
        e(fused) <= 2 e(reference) + 2 eps(dtype) s.
    Why: both paths start from the same rounded inputs and store each step's result rounded
    to ``dtype``; the fused kernel rounds once per step where torch rounds after every op,
    so it is never expected to be worse, but the two round differently near ties, and the
    2 eps s term (two ulps of the tensor's largest element) absorbs a path that happens to
    be exact where the other is not. Observed ratios e(fused) / e(reference) are 0.4 to 1.3.
    With ``absolute``, also an absolute tolerance: 8 eps(dtype) s. Each step adds about one
    rounding, damped by alpha and momentum; after 20 steps both paths stay below 4 eps s
    (observed <= 3.6) at alpha = 0.99. (Not at small alpha with centered: there
    square_avg - grad_avg**2 cancels and amplifies every rounding, for both paths.)
    """
    eps = torch.finfo(dtype).eps
    want = truth.tensors()
    for name, f in fused.tensors().items():
        t = want[name]
        r = ref.tensors()[name]
        scale = t.abs().max().item()
        e_fused = (f.double() - t).abs().max().item()
        e_ref = (r.double() - t).abs().max().item()
        assert e_fused <= 2 * e_ref + 2 * eps * scale, (
            f"{where}: {name} error {e_fused:.3g}, the reference's {e_ref:.3g}, scale {scale:.3g}"
        )
        if absolute:
            torch.testing.assert_close(
                f.double(), t, rtol=0, atol=8 * eps * scale, msg=lambda m: f"{where}: {name}: {m}"
            )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_options_match_float64_truth(kernel, dtype: torch.dtype) -> None:
    n = 1031  # odd: whole vectors and a tail
    for isa in isas():
        with using_isa(isa):
            for wd, momentum, centered, maximize in COMBOS:
                where = f"{isa} {dtype} wd={wd} mom={momentum} centered={centered} max={maximize}"
                gen = torch.Generator().manual_seed(0)
                p0 = torch.randn(n, generator=gen).to(dtype).double()  # exactly representable
                hp = dict(lr=0.01, alpha=0.99, eps=EPS[dtype], weight_decay=wd, maximize=maximize)
                runs = three_runs(p0, dtype, momentum, centered)
                for step in range(STEPS):
                    grad = torch.randn(n, generator=gen).to(dtype).double()
                    for run in runs:
                        run.step(grad, **hp)
                    assert_as_accurate(*runs, dtype, f"{where} step {step}")


def test_float64_computes_in_float64(kernel) -> None:
    """float64 shards are computed in float64, as torch computes them: within a few float64
    ulps of torch's own float64 ops after 20 steps, every option combination and instruction
    set, with no scale, a number (not rounded to float32: torch's ``grad.mul_(number)`` on a
    float64 gradient keeps it whole) and a float32 tensor. The bound is the absolute one of
    :func:`assert_as_accurate` in float64 (8 eps s); a float32 computation would miss it by
    nine orders of magnitude."""
    n, eps = 1031, torch.finfo(torch.float64).eps
    scales = (None, 0.1 + 1e-12, torch.tensor(1.7))
    for isa in isas():
        with using_isa(isa):
            for wd, momentum, centered, maximize in COMBOS:
                where = f"{isa} wd={wd} mom={momentum} centered={centered} max={maximize}"
                gen = torch.Generator(device="cpu").manual_seed(8)
                p0 = torch.randn(n, generator=gen, dtype=torch.float64)
                hp = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=wd, maximize=maximize)
                fused, torchs = (Run(fn, p0, torch.float64, momentum, centered)
                                 for fn in (rmsprop_cpu_fused_, rmsprop_reference_))
                for step in range(STEPS):
                    grad = torch.randn(n, generator=gen, dtype=torch.float64)
                    scale = scales[step % len(scales)]
                    fused.step(grad, grad_scale=scale, **hp)
                    torchs.step(grad, grad_scale=scale, **hp)
                for name, f in fused.tensors().items():
                    t = torchs.tensors()[name]
                    assert f.dtype == torch.float64
                    bound = 8 * eps * t.abs().max().item()
                    torch.testing.assert_close(f, t, rtol=0, atol=bound,
                                               msg=lambda m: f"{where}: {name}: {m}")


@pytest.mark.parametrize("grad_scale", GRAD_SCALES, ids=scale_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_scale_matches_float64_truth(kernel, dtype: torch.dtype, grad_scale) -> None:
    """grad * grad_scale, before maximize and weight decay, with every option combination.

    A zero scale leaves weight decay alone as the gradient, 0.1 p, whose square (1e-4 p**2,
    times 1 - alpha) underflows float16 for small p: there both paths lose the absolute
    bound (after 5 steps about 80 eps s for the fused momentum buffer, 600-1100 for the
    reference's), so only the bound relative to the reference applies.
    """
    n = 1031
    absolute = not (dtype == torch.float16 and exact_scale(grad_scale) == 0.0)
    for wd, momentum, centered, maximize in COMBOS:
        where = (f"{dtype} scale={scale_id(grad_scale)} wd={wd} mom={momentum} "
                 f"centered={centered} max={maximize}")
        gen = torch.Generator().manual_seed(5)
        p0 = torch.randn(n, generator=gen).to(dtype).double()
        hp = dict(lr=0.01, alpha=0.99, eps=EPS[dtype], weight_decay=wd, maximize=maximize)
        runs = three_runs(p0, dtype, momentum, centered)
        for step in range(5):
            grad = torch.randn(n, generator=gen).to(dtype).double()
            step_all(runs, grad, grad_scale, **hp)
            assert_as_accurate(*runs, dtype, f"{where} step {step}", absolute)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 0.37, -2.5])
def test_grad_scale_comes_first(kernel, scale: float, as_tensor: bool) -> None:
    """In float32, scaling in the kernel is bit for bit scaling the gradient beforehand:
    the scale comes first, before maximize and weight decay (with the scale after them the
    results differ), and a scale of 1 is no scale."""
    grad_scale = torch.tensor(scale) if as_tensor else scale
    hp = {**ALL_OPTIONS, "maximize": True}
    spans, _ = _spans(1031, torch.float32, (0, 0, 0, 0, 0), torch.Generator().manual_seed(6))
    for isa in isas():
        with using_isa(isa):
            scaled = [s.clone() for s in spans]
            rmsprop_cpu_fused_(*scaled, **hp, grad_scale=grad_scale)
            prescaled = [s.clone() for s in spans]
            prescaled[1].mul_(scale)  # what clip_grad_norm_ does to the gradient
            rmsprop_cpu_fused_(*prescaled, **hp)
            for name, a, b in zip(("param", "grad", "square_avg", "momentum_buffer", "grad_avg"),
                                  scaled, prescaled):
                if name != "grad":
                    assert torch.equal(a, b), (isa, name)


@pytest.mark.parametrize("copy_dtype", COPY_DTYPES, ids=str)
def test_master_weights_match_float64_truth(kernel, copy_dtype: torch.dtype) -> None:
    """float32 master weights with a low-precision copy, every option combination and
    instruction set: params and state as accurate as the reference's, the copy exactly
    ``param.to(copy_dtype)`` after every step. Steps cycle through no scale, a float scale
    and a tensor one."""
    n, dtype = 1031, torch.float32
    scales = (None, 0.37, torch.tensor(1.7))
    for isa in isas():
        with using_isa(isa):
            for wd, momentum, centered, maximize in COMBOS:
                where = (f"{isa} copy {copy_dtype} wd={wd} mom={momentum} centered={centered} "
                         f"max={maximize}")
                gen = torch.Generator().manual_seed(7)
                p0 = torch.randn(n, generator=gen).double()
                hp = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=wd, maximize=maximize)
                runs = three_runs(p0, dtype, momentum, centered, copy_dtype)
                for step in range(STEPS):
                    grad = torch.randn(n, generator=gen).double()
                    step_all(runs, grad, scales[step % len(scales)], **hp)
                    assert_as_accurate(*runs, dtype, f"{where} step {step}")
                    assert_rounded_copy(runs[0].copy, runs[0].param, f"{where} step {step}")


def _rounding_cases(copy_dtype: torch.dtype) -> Tensor:
    """float32 values whose rounding to ``copy_dtype`` is delicate, both signs.

    Every tie between neighbouring finite ``copy_dtype`` values (subnormal ones included)
    and between the largest one and the next power of two (rounds to inf), the float32
    values either side of each tie; float32 subnormals, zeros, infinities, NaNs; and random
    bit patterns.
    """
    if copy_dtype == torch.bfloat16:  # a bfloat16 is a float32's top half: ties end in 0x8000
        top = torch.arange(0, 0x7F80, dtype=torch.int32) << 16  # every finite bfloat16 >= 0
        grid, ties = top.view(torch.float32), (top | 0x8000).view(torch.float32)
    else:
        grid = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(copy_dtype).float()
        upper = torch.cat([grid[1:], torch.tensor([65536.0])])
        ties = ((grid.double() + upper.double()) / 2).float()  # exact: 12 significant bits
        assert torch.equal(ties.double(), (grid.double() + upper.double()) / 2)
    up, down = ties.nextafter(torch.tensor(float("inf"))), ties.nextafter(torch.tensor(0.0))
    special = torch.tensor([0.0, 1e-45, 1e-40, 1.1754942e-38, 65504.0, 65519.996, 65520.0,
                            65520.004, 3.4028235e38, float("inf"), float("nan")])
    gen = torch.Generator().manual_seed(8)
    bits = torch.randint(-(2**31), 2**31, (1 << 16,), generator=gen, dtype=torch.int64)
    bits = bits.to(torch.int32).view(torch.float32)
    values = torch.cat([ties, up, down, grid, special, bits])
    return torch.cat([values, -values])


@pytest.mark.parametrize("copy_dtype", COPY_DTYPES, ids=str)
def test_low_precision_copy_rounds_exactly(kernel, copy_dtype: torch.dtype) -> None:
    """The copy of any float32 result holds the bits of ``param.to(copy_dtype)``."""
    values = _rounding_cases(copy_dtype)
    for isa in isas():
        with using_isa(isa):
            # lr = 0 and grad = 0: param is loaded and stored unchanged, and its copy rounded
            p = values.clone()
            copy = torch.full_like(p, 7.0, dtype=copy_dtype)
            zeros = torch.zeros_like(p)
            rmsprop_cpu_fused_(p, zeros.clone(), zeros.clone(), None, None, lr=0.0, alpha=0.99,
                               eps=1e-3, weight_decay=0.0, momentum=0.0, centered=False,
                               maximize=False, low_precision_param=copy)
            nan = values.isnan()
            assert torch.equal(p[~nan].view(torch.int32), values[~nan].view(torch.int32)), isa
            assert_rounded_copy(copy, p, isa)


@pytest.mark.parametrize("alpha", [0.3, 0.6], ids=lambda a: f"alpha={a}")
def test_lerp_both_formulas(kernel, alpha: float) -> None:
    """torch's lerp switches formula at weight 0.5; weight = 1 - alpha covers both sides."""
    n, dtype = 1031, torch.float32
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(n, generator=gen).double()
    runs = three_runs(p0, dtype, 0.9, True)
    for step in range(STEPS):
        grad = torch.randn(n, generator=gen).double()
        for run in runs:
            run.step(grad, lr=0.01, alpha=alpha, eps=1e-8, weight_decay=0.1, maximize=False)
        assert_as_accurate(*runs, dtype, f"alpha={alpha} step {step}", absolute=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_conversions_are_exact(kernel, dtype: torch.dtype) -> None:
    """Every 16-bit pattern loads and stores unchanged; float32 results round to nearest even."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    nan = x.isnan()
    for isa in isas():
        with using_isa(isa):
            # lr = 0 and grad = 0: param is loaded and stored, nothing else
            p = x.clone()
            rmsprop_cpu_fused_(p, torch.zeros_like(x), torch.zeros_like(x), None, None, lr=0.0,
                               alpha=0.99, eps=1e-3, weight_decay=0.0, momentum=0.0,
                               centered=False, maximize=False)
            assert torch.equal(p[~nan].view(torch.int16), x[~nan].view(torch.int16)), isa
            assert p[nan].isnan().all(), isa
            # alpha = 0: square_avg = g * g, exact in float32, then rounded once to dtype
            g = torch.where(nan, torch.zeros_like(x), x)
            sq = torch.zeros_like(x)
            rmsprop_cpu_fused_(torch.zeros_like(x), g.clone(), sq, None, None, lr=0.0, alpha=0.0,
                               eps=1e-3, weight_decay=0.0, momentum=0.0, centered=False,
                               maximize=False)
            want = (g.float() * g.float()).to(dtype)
            assert torch.equal(sq.view(torch.int16), want.view(torch.int16)), isa


def _spans(n: int, dtype: torch.dtype, offsets: tuple[int, ...], gen: torch.Generator):
    """Five spans of length n at the given offsets into larger buffers, and the buffers."""
    bufs = [torch.randn(off + n + 7, generator=gen).to(dtype) for off in offsets]
    bufs[2] = bufs[2].abs() + 0.1  # square_avg > grad_avg**2: no sqrt of a negative number
    bufs[4] = bufs[4] * 0.01
    return [b[off : off + n] for b, off in zip(bufs, offsets)], bufs


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 100003])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offsets", [(0, 0, 0, 0, 0), (1, 3, 17, 1, 3), (17, 1, 3, 17, 1)],
                         ids=["aligned", "offsets-1-3-17", "offsets-17-1-3"])
def test_sizes_and_misaligned_starts(kernel, n: int, dtype: torch.dtype, offsets) -> None:
    gen = torch.Generator().manual_seed(n)
    (p, g, sq, mb, ga), bufs = _spans(n, dtype, offsets, gen)
    before = [b.clone() for b in bufs]
    hp = ALL_OPTIONS
    truth = [t.double() for t in (p, g, sq, mb, ga)]
    ref = [t.clone() for t in (p, g, sq, mb, ga)]
    grad_before = g.clone()
    rmsprop_cpu_fused_(p, g, sq, mb, ga, **hp)
    rmsprop_reference_(*ref, **hp)
    rmsprop_reference_(*truth, **hp)
    assert torch.equal(g, grad_before)  # grad is read, not written
    eps = torch.finfo(dtype).eps
    for name, f, r, t in zip(("param", "grad", "square_avg", "momentum_buffer", "grad_avg"),
                             (p, g, sq, mb, ga), ref, truth):
        if name == "grad" or n == 0:
            continue
        scale = t.abs().max().item()
        e_fused = (f.double() - t).abs().max().item()
        e_ref = (r.double() - t).abs().max().item()
        # one step: the bound of assert_as_accurate
        assert e_fused <= 2 * e_ref + 2 * eps * scale, f"{name}: {e_fused:.3g} vs {e_ref:.3g}"
    # nothing outside the spans changed
    for b, b0, off in zip(bufs, before, offsets):
        assert torch.equal(b[:off], b0[:off]) and torch.equal(b[off + n :], b0[off + n :])


@pytest.mark.parametrize("copy_dtype", [None, *COPY_DTYPES], ids=str)
def test_result_does_not_depend_on_thread_count(kernel, copy_dtype: torch.dtype | None) -> None:
    n = 1_000_003
    gen = torch.Generator().manual_seed(2)
    spans, _ = _spans(n, torch.float32, (0, 0, 0, 0, 0), gen)
    hp = {**ALL_OPTIONS, "maximize": True, "grad_scale": 0.37}
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            state = [s.clone() for s in spans]
            if copy_dtype is not None:
                state.append(torch.empty(n, dtype=copy_dtype))
                hp["low_precision_param"] = state[-1]
            rmsprop_cpu_fused_(*state[:5], **hp)
            results.append(state)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_isas_agree_bitwise(kernel) -> None:
    """Every instruction set runs the same float32 operations in the same order."""
    gen = torch.Generator().manual_seed(3)
    hp = ALL_OPTIONS
    for dtype in DTYPES:
        spans, _ = _spans(70001, dtype, (0, 0, 0, 0, 0), gen)
        results = []
        for isa in isas():
            with using_isa(isa):
                copy = [s.clone() for s in spans]
                rmsprop_cpu_fused_(*copy, **hp)
                results.append(copy)
        for other in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0], other)), dtype


@pytest.mark.parametrize("copy_dtype", COPY_DTYPES, ids=str)
def test_isas_agree_bitwise_with_scale_and_copy(kernel, copy_dtype: torch.dtype) -> None:
    """A gradient scale and a low-precision copy (F16C or bit manipulation for float16)."""
    gen = torch.Generator().manual_seed(9)
    hp = {**ALL_OPTIONS, "maximize": True, "grad_scale": torch.tensor(0.37)}
    spans, _ = _spans(70001, torch.float32, (0, 0, 0, 0, 0), gen)
    results = []
    for isa in isas():
        with using_isa(isa):
            state = [s.clone() for s in spans] + [torch.empty(70001, dtype=copy_dtype)]
            rmsprop_cpu_fused_(*state[:5], **hp, low_precision_param=state[5])
            results.append(state)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("copy_offset", [0, 1, 3])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 511, 512, 513, 100003])
@pytest.mark.parametrize("copy_dtype", COPY_DTYPES, ids=str)
def test_copy_sizes_and_misaligned_starts(kernel, copy_dtype: torch.dtype, n: int,
                                          copy_offset: int) -> None:
    """With a copy, params and state get the same bits as without one (sizes around the
    vector width and the 512-element blocks of the F16C path, one above the threading
    threshold); the copy is the rounded params, and nothing outside its span changes."""
    gen = torch.Generator().manual_seed(n)
    spans, _ = _spans(n, torch.float32, (1, 3, 17, 1, 3), gen)
    plain = [s.clone() for s in spans]
    rmsprop_cpu_fused_(*plain, **ALL_OPTIONS)
    buffer = torch.full((copy_offset + n + 5,), 7.0, dtype=copy_dtype)
    copy = buffer[copy_offset : copy_offset + n]
    version = copy._version
    rmsprop_cpu_fused_(*spans, **ALL_OPTIONS, low_precision_param=copy)
    assert all(torch.equal(a, b) for a, b in zip(spans, plain))
    assert_rounded_copy(copy, spans[0], f"n={n}")
    assert (buffer[:copy_offset] == 7.0).all() and (buffer[copy_offset + n :] == 7.0).all()
    assert n == 0 or copy._version > version  # autograd sees the copy change


def test_lr_schedule_without_rebuild(kernel) -> None:
    """A new LR each step: the torch-reference result for that schedule, and no new build."""
    attempts, fn = cpu_fused._build_attempts, cpu_fused._kernel
    n, dtype = 4099, torch.float32
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(n, generator=gen).double()
    runs = three_runs(p0, dtype, 0.9, True)
    for step, lr in enumerate([0.1, 0.05, 0.02, 0.01, 3e-3, 1e-3, 1e-4, 0.0, 0.01, 0.1]):
        grad = torch.randn(n, generator=gen).double()
        for run in runs:
            run.step(grad, lr=lr, alpha=0.99, eps=1e-8, weight_decay=0.01, maximize=False)
        assert_as_accurate(*runs, dtype, f"step {step} lr={lr}")
    assert cpu_fused._build_attempts == attempts and cpu_fused._kernel is fn


def _args(n: int = 5, dtype: torch.dtype = torch.float32, **replace: Tensor | None) -> list:
    """param, grad, square_avg, momentum_buffer, grad_avg: zeros, some replaced."""
    names = ("param", "grad", "square_avg", "momentum_buffer", "grad_avg")
    return [replace[k] if k in replace else torch.zeros(n, dtype=dtype) for k in names]


def _overlapping() -> list:
    base = torch.zeros(6)
    return _args(square_avg=base[:5], grad_avg=base[1:])


def _aliased() -> list:
    p = torch.zeros(5)
    return _args(param=p, grad=p)


HP = {**ALL_OPTIONS, "weight_decay": 0.0}

BAD_INPUT = {
    "length": (lambda: _args(grad=torch.zeros(6)), ValueError,
               r"grad has shape \(6,\), expected a 1-D tensor of 5 elements"),
    "2-D": (lambda: _args(square_avg=torch.zeros(5, 1)), ValueError,
            r"square_avg has shape \(5, 1\), expected a 1-D tensor of 5 elements"),
    "non-contiguous": (lambda: _args(param=torch.zeros(10)[::2]), ValueError,
                       "param must be contiguous"),
    "no-momentum-buffer": (lambda: _args(momentum_buffer=None), ValueError,
                           "momentum_buffer is required when momentum > 0"),
    "no-grad-avg": (lambda: _args(grad_avg=None), ValueError,
                    "grad_avg is required when centered=True"),
    "device": (lambda: _args(momentum_buffer=torch.zeros(5, device="meta")), ValueError,
               "momentum_buffer is on meta but param is on cpu"),
    "mixed-dtype": (lambda: _args(square_avg=torch.zeros(5, dtype=torch.float64)), TypeError,
                    "square_avg has dtype torch.float64, expected the param's torch.float32"),
    "not-a-tensor": (lambda: _args(grad=[0.0] * 5), TypeError, "grad must be a Tensor, got list"),
    "aliased": (_aliased, ValueError, "param and grad overlap in memory"),
    "overlapping": (_overlapping, ValueError, "square_avg and grad_avg overlap in memory"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_raises_and_changes_nothing(case: str) -> None:
    make, error, match = BAD_INPUT[case]
    args = make()
    before = [a.clone() if isinstance(a, Tensor) and a.device.type == "cpu" else None for a in args]
    with pytest.raises(error, match=match):
        rmsprop_cpu_fused_(*args, **HP)
    for a, b in zip(args, before):
        if b is not None:
            assert torch.equal(a, b)


def _copy_in(base: Tensor, byte_offset: int) -> Tensor:
    """A 5-element bfloat16 copy over ``base``'s bytes from ``byte_offset`` on."""
    return base.view(torch.uint8)[byte_offset : byte_offset + 10].view(torch.bfloat16)


def _copy_aliasing_param() -> tuple[list, dict]:
    args = _args()
    return args, {"low_precision_param": _copy_in(args[0], 0)}


def _copy_overlapping_grad_avg() -> tuple[list, dict]:
    base = torch.zeros(8)  # grad_avg: bytes 0-19; the copy, of narrower elements: 18-27
    return _args(grad_avg=base[:5]), {"low_precision_param": _copy_in(base, 18)}


def _with(args: Callable[[], list] = _args, **options) -> Callable[[], tuple[list, dict]]:
    """A case: arguments (by default float32 zeros) and these options."""
    return lambda: (args(), options)


def _bf16(*shape: int, **kwargs) -> Tensor:
    return torch.zeros(*shape, dtype=torch.bfloat16, **kwargs)


#: Bad master-weight copies and gradient scales: (arguments and options, error, match).
BAD_OPTIONS = {
    "copy-of-bf16-param": (_with(lambda: _args(dtype=torch.bfloat16), low_precision_param=_bf16(5)),
                           TypeError, "low_precision_param needs float32 master weights, got "
                           "param of dtype torch.bfloat16"),
    "copy-float32": (_with(low_precision_param=torch.zeros(5)), TypeError,
                     "low_precision_param has dtype torch.float32, expected torch.bfloat16 or "
                     "torch.float16"),
    "copy-length": (_with(low_precision_param=_bf16(6)), ValueError,
                    r"low_precision_param has shape \(6,\), expected a 1-D tensor of 5 elements"),
    "copy-2-D": (_with(low_precision_param=_bf16(5, 1)), ValueError,
                 r"low_precision_param has shape \(5, 1\), expected a 1-D tensor of 5 elements"),
    "copy-non-contiguous": (_with(low_precision_param=_bf16(10)[::2]), ValueError,
                            "low_precision_param must be contiguous"),
    "copy-device": (_with(low_precision_param=_bf16(5, device="meta")), ValueError,
                    "low_precision_param is on meta but param is on cpu"),
    "copy-not-a-tensor": (_with(low_precision_param=[0.0] * 5), TypeError,
                          "low_precision_param must be a Tensor, got list"),
    "copy-aliases-param": (_copy_aliasing_param, ValueError,
                           "param and low_precision_param overlap in memory"),
    "copy-overlaps-grad_avg": (_copy_overlapping_grad_avg, ValueError,
                               "grad_avg and low_precision_param overlap in memory"),
    "scale-1-D": (_with(grad_scale=torch.ones(1)), ValueError,
                  r"grad_scale must be a 0-d tensor, got shape \(1,\)"),
    "scale-bfloat16": (_with(grad_scale=torch.tensor(0.5, dtype=torch.bfloat16)), TypeError,
                       "grad_scale must be a float32 or float64 tensor, got dtype torch.bfloat16"),
    "scale-device": (_with(grad_scale=torch.tensor(0.5, device="meta")), ValueError,
                     "grad_scale is on meta but param is on cpu"),
    "scale-str": (_with(grad_scale="0.5"), TypeError,
                  "grad_scale must be a number, a 0-d tensor or None, got str"),
    "scale-bool": (_with(grad_scale=True), TypeError,
                   "grad_scale must be a number, a 0-d tensor or None, got bool"),
    "scale-after-good-copy": (_with(low_precision_param=_bf16(5), grad_scale=torch.ones(2)),
                              ValueError, "grad_scale must be a 0-d tensor"),
}


def _bits(t: Tensor) -> Tensor:
    """``t``'s elements as integers of the same width: compared bit for bit, NaNs included."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_copy_or_scale_raises_and_changes_nothing(case: str) -> None:
    make, error, match = BAD_OPTIONS[case]
    args, options = make()
    tensors = [t for t in [*args, *options.values()]
               if isinstance(t, Tensor) and t.device.type == "cpu"]
    gen = torch.Generator().manual_seed(10)
    for t in tensors:  # not zeros, which an update of zeros would leave as they are
        t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    before = [_bits(t).clone() for t in tensors]
    with pytest.raises(error, match=match):
        rmsprop_cpu_fused_(*args, **HP, **options)
    for t, b in zip(tensors, before):
        assert torch.equal(_bits(t), b)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32], ids=str)
def test_unsupported_dtype(dtype: torch.dtype) -> None:
    match = rf"supports float32, bfloat16, float16 and float64 parameters, got {dtype}"
    with pytest.raises(TypeError, match=match):
        rmsprop_cpu_fused_(*_args(dtype=dtype), **HP)


def test_extra_buffers_are_refused_like_the_reference(kernel) -> None:
    """momentum = 0 with a momentum_buffer, or centered = False with a grad_avg, is a
    caller's mistake (the kernel contract's one answer): ValueError, nothing written."""
    p, g, sq = (torch.ones(9) for _ in range(3))
    mb, ga = torch.full((9,), 5.0), torch.full((9,), 7.0)
    with pytest.raises(ValueError, match="momentum_buffer must be None when momentum <= 0"):
        rmsprop_cpu_fused_(p, g, sq, mb, None, **{**HP, "momentum": 0.0, "centered": False})
    with pytest.raises(ValueError, match="grad_avg must be None when centered=False"):
        rmsprop_cpu_fused_(p, g, sq, None, ga, **{**HP, "momentum": 0.0, "centered": False})
    assert (mb == 5.0).all() and (ga == 7.0).all() and (p == 1.0).all()


def test_preferred_where_measured_faster(kernel) -> None:
    """float32 and float64 with any instruction set; the half types only with AVX2 or
    AVX-512; never complex."""
    assert not cpu_fused_preferred(torch.complex64)
    for isa in isas():
        with using_isa(isa):
            assert cpu_fused_preferred(torch.float32) and cpu_fused_preferred(torch.float64)
            for dtype in (torch.bfloat16, torch.float16):
                assert cpu_fused_preferred(dtype) is (isa != "baseline"), (isa, dtype)


def _reset_load_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the module try to load the kernel again (monkeypatch restores it afterwards)."""
    monkeypatch.setattr(cpu_fused, "_tried", False)
    monkeypatch.setattr(cpu_fused, "_kernel", None)
    monkeypatch.setattr(cpu_fused, "_unavailable_reason", None)


def test_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    _reset_load_state(monkeypatch)

    def no_compiler() -> str:
        raise RuntimeError("no C++ compiler found (test)")

    monkeypatch.setattr(cpu_fused, "_build_library", no_compiler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_fused_available() is False
        assert cpu_fused_available() is False
        assert cpu_fused_preferred(torch.float32) is False
        with pytest.raises(RuntimeError, match="fused CPU RMSprop kernel is unavailable"):
            rmsprop_cpu_fused_(*_args(), **HP)
    assert len(caught) == 1
    assert caught[0].category is RuntimeWarning
    assert "no C++ compiler found (test)" in str(caught[0].message)
    assert "falling back to the reference update" in str(caught[0].message)


def test_waiting_for_a_stuck_builder_times_out(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Another process holding the build lock (a hung compiler) costs a timeout, not a hang."""
    _reset_load_state(monkeypatch)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_fused, "_BUILD_LOCK_TIMEOUT_S", 0.5)
    _, build_dir = cpu_fused._build_location()
    os.makedirs(build_dir)
    fd = os.open(os.path.join(build_dir, "sharded_rmsprop.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a separate open file: conflicts even in one process
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match="waited 0 s for another process building"):
            assert cpu_fused_available() is False
        assert time.monotonic() - start < 10
    finally:
        os.close(fd)


def _python(code: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    path = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **env, "PYTHONPATH": path}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, timeout: float = 300) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"subprocess hung for {timeout} s\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_no_compiler_in_a_fresh_process(tmp_path) -> None:
    """The real thing: $CXX names no program, nothing is cached, so the build fails."""
    code = """
        import json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from sharded_rmsprop.kernels import cpu_fused
            first, second = cpu_fused.cpu_fused_available(), cpu_fused.cpu_fused_available()
        ours = [str(w.message) for w in caught if "sharded_rmsprop" in str(w.message)]
        print(json.dumps({"first": first, "second": second, "ours": ours,
                          "all": [str(w.message)[:200] for w in caught]}))
    """
    result = _result(_python(code, {"CXX": str(tmp_path / "no-such-compiler"),
                                    "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}))
    assert result["first"] is False and result["second"] is False
    assert len(result["ours"]) == 1, result["all"]
    assert "fused CPU RMSprop kernel is unavailable" in result["ours"][0]
    assert "no-such-compiler" in result["ours"][0]


def test_concurrent_first_use_builds_once(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Two processes start using the kernel at the same moment on a machine with no build.

    One builds, the other waits for it and loads the result; a stale lock file of torch's
    (what a builder killed mid-build leaves) does not make either wait forever.
    """
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    code = """
        import json, os, sys, time
        import torch
        from sharded_rmsprop.kernels import cpu_fused, rmsprop_reference_
        ready, go = sys.argv[1], sys.argv[2]
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.005)
        start = time.perf_counter()
        ok = cpu_fused.cpu_fused_available()
        seconds = time.perf_counter() - start
        p, g, sq = torch.randn(1000), torch.randn(1000), torch.rand(1000)
        ref = [t.clone() for t in (p, g, sq)]
        hp = dict(lr=0.1, alpha=0.9, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                  maximize=False)
        cpu_fused.rmsprop_cpu_fused_(p, g, sq, None, None, **hp)
        rmsprop_reference_(ref[0], ref[1], ref[2], None, None, **hp)
        close = torch.allclose(p, ref[0], rtol=1e-5, atol=1e-6)
        print(json.dumps({"ok": ok, "builds": cpu_fused._build_attempts, "close": close,
                          "seconds": seconds}))
    """
    # torch's lock file, as a build killed in the middle leaves it
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])
    _, build_dir = cpu_fused._build_location()
    os.makedirs(build_dir)
    open(os.path.join(build_dir, "lock"), "w").close()

    go = tmp_path / "go"
    procs = [_python(code, env, str(tmp_path / f"ready{i}"), str(go)) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        assert time.monotonic() < deadline, "the subprocesses did not start"
        time.sleep(0.01)
    go.touch()
    results = [_result(p) for p in procs]
    assert all(r["ok"] and r["close"] for r in results), results
    assert sum(r["builds"] for r in results) == 1, results
