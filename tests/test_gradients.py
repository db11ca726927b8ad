"""Global-norm clipping, skipping non-finite steps, and torch.amp.GradScaler.

The truths: ``torch.nn.utils.clip_grad_norm_`` on the full gradients for the norm, and
``torch.optim.RMSprop`` fed gradients multiplied by the same clip coefficient for the step
(bit for bit on the reference path); ``torch.amp.GradScaler`` with ``torch.optim.RMSprop``.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks

SHAPES = [(), (3,), (5, 7), (17,), (33, 2), (0,), (64,)]
NORM_TYPES = [2.0, 1.0, 3.5, math.inf, -math.inf]


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in SHAPES]


def copies(params: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [p.detach().to(dtype).requires_grad_() for p in params]


def set_grads(params: list[torch.Tensor], step: int, scale: float = 1.0) -> None:
    """The same gradients on every rank (as DDP leaves them), converted to each param's dtype."""
    generator = torch.Generator().manual_seed(50 + step)
    for param in params:
        grad = torch.randn(param.shape, generator=generator) * scale
        param.grad = grad.to(param.dtype)


def torch_norm(params: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s total norm of the gradients, leaving them as they are."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad.numel()], norm_type)


def ours_and_torch(
    dtype: torch.dtype = torch.float32, fused: bool | None = False, skip_nonfinite: bool = False,
    **options,
) -> tuple[list[torch.Tensor], list[torch.Tensor], ShardedRMSprop, torch.optim.RMSprop]:
    """Our parameters (``dtype``) and optimizer, and float32 copies under torch's RMSprop."""
    ours = make_params(dtype=dtype)
    theirs = copies(ours)
    opt = ShardedRMSprop(ours, fused=fused, skip_nonfinite=skip_nonfinite, **options)
    return ours, theirs, opt, torch.optim.RMSprop(theirs, **options)


def coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


# -- clip_grad_norm_ ---------------------------------------------------------------------------


def clip_on_rank(rank: int, world_size: int) -> list[str]:
    failures = []
    for norm_type in NORM_TYPES:
        ours, theirs, opt, ref = ours_and_torch(momentum=0.9, weight_decay=0.01)
        for step in range(4):
            set_grads(ours, step, scale=10.0)
            set_grads(theirs, step, scale=10.0)
            total = opt.clip_grad_norm_(1.0, norm_type)
            expected = torch_norm(theirs, norm_type)
            # Summed in another order (pieces per rank, then ranks): float32 rounding apart.
            if not torch.allclose(total, expected, rtol=1e-5, atol=0):
                failures.append(f"norm {norm_type}, step {step}: {total} vs torch {expected}")
            torch._foreach_mul_([q.grad for q in theirs], coefficient(total, 1.0))
            opt.step()
            ref.step()
            if not all(torch.equal(p, q) for p, q in zip(ours, theirs)):
                failures.append(f"norm {norm_type}, step {step}: parameters differ from torch's")
        assert all(p.grad is not None for p in ours)
    return failures


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_clip_grad_norm_matches_torch(world_size: int) -> None:
    for rank, failures in enumerate(run_ranks(world_size, clip_on_rank)):
        assert failures == [], f"rank {rank}: {failures}"


def test_clip_leaves_the_gradients_and_a_second_clip_compounds() -> None:
    ours, theirs, opt, ref = ours_and_torch()
    set_grads(ours, 0, scale=10.0)
    set_grads(theirs, 0, scale=10.0)
    grads_before = [p.grad.clone() for p in ours]
    first = opt.clip_grad_norm_(2.0)
    second = opt.clip_grad_norm_(1.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads_before))
    torch.testing.assert_close(first, torch.nn.utils.clip_grad_norm_(theirs, 2.0))
    torch.testing.assert_close(second, torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    opt.step()
    ref.step()
    for p, q in zip(ours, theirs):  # two coefficients multiplied once vs applied one by one
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_zero_grad_forgets_a_pending_clip() -> None:
    ours, theirs, opt, ref = ours_and_torch()
    set_grads(ours, 0, scale=10.0)
    opt.clip_grad_norm_(0.1)
    opt.zero_grad()
    set_grads(ours, 1)
    set_grads(theirs, 1)
    opt.step()
    ref.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_clip_in_bfloat16_with_master_weights_matches_torch_float32() -> None:
    ours, theirs, opt, ref = ours_and_torch(dtype=torch.bfloat16, centered=True)
    for step in range(5):
        set_grads(ours, step, scale=10.0)
        for p, q in zip(ours, theirs):
            q.grad = p.grad.float()
        total = opt.clip_grad_norm_(1.0)
        torch.testing.assert_close(total, torch_norm(theirs))
        torch._foreach_mul_([q.grad for q in theirs], coefficient(total, 1.0))
        opt.step()
        ref.step()
        assert all(torch.equal(p, q.to(torch.bfloat16)) for p, q in zip(ours, theirs)), step


def test_clip_with_the_fused_kernel_matches_torch_within_rounding() -> None:
    ours, theirs, opt, ref = ours_and_torch(fused=None, momentum=0.9)
    for step in range(5):
        set_grads(ours, step, scale=10.0)
        set_grads(theirs, step, scale=10.0)
        opt.clip_grad_norm_(1.0)
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):  # fused float32: a few ulps per step (see test_parity.py)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clip_with_float64_parameters_on_the_fused_path() -> None:
    """A float64 model's clipping factor is float64: the fused CPU kernel takes it (it once
    refused it after the step count had moved; at several ranks, a hang)."""
    ours = [torch.randn(300, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt, ref = ShardedRMSprop(ours, fused=None), torch.optim.RMSprop(theirs)
    for step in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.full_like(p, 10.0 + step)
            q.grad = p.grad.clone()
        opt.clip_grad_norm_(1.0)
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        opt.step(), ref.step()
    for p, q in zip(ours, theirs):  # float64 computed in float64: a few float64 ulps
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-14)


def nonfinite_norm_on_rank(rank: int, world_size: int) -> str:
    params = make_params()
    opt = ShardedRMSprop(params, fused=False)
    set_grads(params, 0)
    params[3].grad[4] = math.nan
    try:
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_error_if_nonfinite_raises_on_every_rank() -> None:
    for message in run_ranks(2, nonfinite_norm_on_rank):
        assert "is non-finite, so it cannot be clipped" in message


@pytest.mark.parametrize("norm_type", [0, -1.0, "two", None])
def test_bad_norm_type(norm_type) -> None:
    params = make_params()
    opt = ShardedRMSprop(params)
    set_grads(params, 0)
    with pytest.raises(ValueError, match="norm_type must be"):
        opt.clip_grad_norm_(1.0, norm_type)


def test_float64_and_complex_gradients() -> None:
    """Measured in their own precision, as torch measures them; the norm is float64."""
    ours = [torch.ones(8, dtype=torch.float64), torch.ones(3, dtype=torch.complex64),
            torch.ones(5)]
    ours = [p.requires_grad_() for p in ours]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = ShardedRMSprop(ours, skip_nonfinite=True, fused=False)
    for p, q in zip(ours, theirs):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    total = opt.clip_grad_norm_(1.0)
    assert total.dtype == torch.float64
    torch.testing.assert_close(total, torch_norm(theirs).double(), rtol=1e-6, atol=0)
    opt.step()
    ours[1].grad[0] = complex(math.nan, 0)  # the next step's gradients, read by the check
    opt.step()
    assert opt.skipped_steps == 1


def nan_under_max_norm_on_rank(rank: int, world_size: int) -> tuple[float, int]:
    """A NaN in the last rank's slice only: collectives' max drops NaNs, the norm must not."""
    params = make_params()
    opt = ShardedRMSprop(params, fused=False, skip_nonfinite=True)
    set_grads(params, 0)
    if rank == world_size - 1:
        params[6].grad[-1] = math.nan
    total = opt.clip_grad_norm_(1.0, math.inf)
    opt.step()
    return total.item(), opt.skipped_steps


def test_a_nan_makes_the_max_norm_infinite_on_every_rank() -> None:
    assert run_ranks(2, nan_under_max_norm_on_rank) == [(math.inf, 1), (math.inf, 1)]


def test_a_min_norm_does_not_hide_an_inf_from_skip_nonfinite() -> None:
    params = make_params()
    opt = ShardedRMSprop(params, fused=False, skip_nonfinite=True)
    set_grads(params, 0)
    params[4].grad[1, 1] = math.inf
    assert opt.clip_grad_norm_(1.0, -math.inf).isfinite()  # min |g|: finite
    opt.step()
    assert opt.skipped_steps == 1


def test_no_gradients_give_a_zero_norm() -> None:
    opt = ShardedRMSprop(make_params())
    assert opt.clip_grad_norm_(1.0).item() == 0.0


# -- skip_nonfinite ----------------------------------------------------------------------------


def skip_on_rank(rank: int, world_size: int, use_clip: bool) -> list[str]:
    """A NaN on the last rank only (no DDP here): every rank must skip, then go on as torch."""
    ours, theirs, opt, ref = ours_and_torch(skip_nonfinite=True, momentum=0.9)
    failures = []
    for step in range(4):
        set_grads(ours, step)
        set_grads(theirs, step)
        if step == 1 and rank == world_size - 1:
            ours[6].grad[-1] = math.inf  # owned by the last rank
        if step == 2:
            ours[4].grad[0, 0] = math.nan  # every rank sees it
        before = [p.detach().clone() for p in ours]
        state_before = {k: v.clone() for k, v in opt.state.get(ours[6], {}).items()}
        if use_clip:
            opt.clip_grad_norm_(100.0)  # never clips these gradients: coefficient 1
        opt.step()
        if step in (1, 2):
            if not all(torch.equal(p, b) for p, b in zip(ours, before)):
                failures.append(f"step {step}: parameters changed")
            state_after = opt.state.get(ours[6], {})
            if state_before.keys() != state_after.keys() or not all(
                torch.equal(v, state_after[k]) for k, v in state_before.items()
            ):
                failures.append(f"step {step}: state changed")
        else:
            ref.step()
            if not all(torch.equal(p, q) for p, q in zip(ours, theirs)):
                failures.append(f"step {step}: parameters differ from torch's")
    if opt.skipped_steps != 2:
        failures.append(f"skipped_steps is {opt.skipped_steps}")
    if opt.state[ours[6]]["step"].item() != 2:
        failures.append(f"step counter is {opt.state[ours[6]]['step'].item()}")
    return failures


@pytest.mark.parametrize("use_clip", [False, True], ids=["scan", "from-clip-norm"])
def test_nonfinite_step_is_skipped_on_every_rank(use_clip: bool) -> None:
    for rank, failures in enumerate(run_ranks(2, skip_on_rank, use_clip)):
        assert failures == [], f"rank {rank}: {failures}"


def test_a_skipped_step_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    params = make_params()
    opt = ShardedRMSprop(params, skip_nonfinite=True)
    set_grads(params, 0)
    params[1].grad[0] = math.nan
    with caplog.at_level(logging.WARNING, logger="sharded_rmsprop"):
        opt.step()
    assert "skipped a step: inf or NaN gradients (1 skipped so far)" in caplog.text


def test_without_skip_nonfinite_nan_propagates_like_torch() -> None:
    params = make_params()
    opt = ShardedRMSprop(params, fused=False)
    set_grads(params, 0)
    params[1].grad[0] = math.nan
    opt.step()
    assert params[1][0].isnan() and opt.skipped_steps == 0


def test_skip_nonfinite_validation() -> None:
    with pytest.raises(TypeError, match="skip_nonfinite must be True or False"):
        ShardedRMSprop(make_params(), skip_nonfinite=1)


# -- torch.amp.GradScaler ----------------------------------------------------------------------


def backward_scaled(
    scaler: torch.amp.GradScaler, params: list[torch.Tensor], step: int, factor: float = 1.0
) -> None:
    """The gradients ``scaler.scale(loss).backward()`` would leave."""
    scaler.scale(torch.ones(()))  # the scaler creates its scale tensor on first use
    set_grads(params, step, scale=factor * scaler.get_scale())


def test_grad_scaler_float32_matches_torch_bit_for_bit() -> None:
    ours, theirs, opt, ref = ours_and_torch(centered=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step in range(5):
        for params, optimizer, scaler in ((ours, opt, scalers[0]), (theirs, ref, scalers[1])):
            backward_scaled(scaler, params, step)
            if step == 2:
                params[3].grad[0] = math.inf  # an overflow: both skip and back off
            scaler.step(optimizer)
            scaler.update()
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs)), step
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert opt.skipped_steps == 1


def test_grad_scaler_unscale_then_clip() -> None:
    ours, theirs, opt, ref = ours_and_torch()
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    for step in range(3):
        backward_scaled(scalers[0], ours, step, factor=10.0)
        backward_scaled(scalers[1], theirs, step, factor=10.0)
        scalers[0].unscale_(opt)
        scalers[1].unscale_(ref)
        total = opt.clip_grad_norm_(1.0)
        torch.testing.assert_close(total, torch_norm(theirs))
        torch._foreach_mul_([q.grad for q in theirs], coefficient(total, 1.0))
        for scaler, optimizer in zip(scalers, (opt, ref)):
            scaler.step(optimizer)
            scaler.update()
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs)), step


def test_grad_scaler_with_float16_parameters() -> None:
    """torch's own optimizers refuse to unscale float16 gradients; ours unscales in float32
    inside the update, on the float32 master weights: torch's float32 run, rounded."""
    ours, theirs, opt, ref = ours_and_torch(dtype=torch.float16, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(4):
        backward_scaled(scaler, ours, step)
        scale = scaler.get_scale()
        inverse = torch.tensor(scale).double().reciprocal().float()
        for p, q in zip(ours, theirs):
            q.grad = p.grad.float() * inverse
        scaler.step(opt)
        scaler.update()
        ref.step()
        assert all(torch.equal(p, q.to(torch.float16)) for p, q in zip(ours, theirs)), step
    assert opt.skipped_steps == 0


def test_a_failed_step_does_not_leave_the_scale_behind() -> None:
    """GradScaler removes what it hands over only after a step that returns."""
    ours, theirs, opt, ref = ours_and_torch()
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    backward_scaled(scalers[0], ours, 0)
    ours[1].grad = ours[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="RMSprop does not support sparse gradients"):
        scalers[0].step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    scalers[0] = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for params, optimizer, scaler in ((ours, opt, scalers[0]), (theirs, ref, scalers[1])):
        backward_scaled(scaler, params, 1)
        scaler.step(optimizer)
        scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def scaler_disagreement_on_rank(rank: int, world_size: int) -> tuple[int, float]:
    """Only rank 0's scaler finds an inf (no DDP): both ranks must skip, nobody may hang."""
    params = make_params()
    opt = ShardedRMSprop(params, fused=False)
    scaler = torch.amp.GradScaler("cpu")
    backward_scaled(scaler, params, 0)
    if rank == 0:
        params[2].grad[0, 0] = math.inf
    before = [p.detach().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    unchanged = all(torch.equal(p, b) for p, b in zip(params, before))
    return opt.skipped_steps, float(unchanged)


def test_grad_scaler_inf_on_one_rank_skips_on_all() -> None:
    assert run_ranks(2, scaler_disagreement_on_rank) == [(1, 1.0), (1, 1.0)]
