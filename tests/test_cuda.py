"""The optimizer on CUDA tensors: what only a GPU runs (skipped without one; see conftest.py).

At one rank: the reference path is torch's bits on CUDA too, the fused Triton path is torch's
numbers within the fused tolerance of test_parity.py, float32 master weights of bfloat16
parameters, and clipping, the skip check and a GradScaler with CUDA tensors. At two ranks
sharing the one GPU through gloo (NCCL refuses two ranks on one device, so NCCL at world size
> 1 is not tested here): the parameter sync and the control values with CUDA tensors, and
checkpoints saved there and loaded at another world size. benchmarks/gpu_check.py runs them.
"""

from __future__ import annotations

import pytest
import torch

from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks
from test_checkpoint import dcp_resume_on_rank, dcp_save_on_rank
from test_master_weights import run_parity as run_master_weights_parity
from test_parity import (
    CONFIGS,
    FUSED_TOLERANCE,
    STEPS,
    make_params,
    run_config,
    set_grads,
    two_groups,
)

pytestmark = pytest.mark.cuda

CUDA = "cuda"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_path_is_torchs_bits_on_cuda(name: str) -> None:
    assert run_config(CONFIGS[name], device=CUDA) is None


def fused_mismatch_on(device: str) -> str | None:
    """The fused path (Triton on CUDA) against torch, within test_parity's fused tolerance."""
    for name, options in CONFIGS.items():
        ours = make_params(device=device)
        theirs = [p.detach().clone().requires_grad_(p.requires_grad) for p in ours]
        opt = ShardedRMSprop(two_groups(ours, options), master_weights=False)  # fused: Triton
        ref = torch.optim.RMSprop(two_groups(theirs, options), foreach=False)
        for step in range(STEPS):
            set_grads(ours, step), set_grads(theirs, step)
            opt.step(), ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            try:
                torch.testing.assert_close(a, b, **FUSED_TOLERANCE[a.dtype])
            except AssertionError as error:
                return f"{name}, param {i} {tuple(a.shape)} {a.dtype}: {error}"
    return None


def test_fused_triton_path_is_torchs_numbers_on_cuda() -> None:
    assert fused_mismatch_on(CUDA) is None


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "triton"])
def test_master_weights_of_bfloat16_parameters_on_cuda(fused: bool) -> None:
    options = {"momentum": 0.9, "centered": True, "weight_decay": 0.01}
    assert run_master_weights_parity(torch.bfloat16, options, fused=fused, device=CUDA) is None


def test_clip_skip_and_grad_scaler_on_cuda() -> None:
    """A NaN step is skipped on the GPU's word; the others clip and unscale as torch would."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    model = model.to(CUDA)
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    opt = ShardedRMSprop(
        model.parameters(), lr=torch.tensor(1e-2, device=CUDA), momentum=0.9, skip_nonfinite=True
    )
    ref = torch.optim.RMSprop(twin, lr=1e-2, momentum=0.9, foreach=False)
    scaler = torch.amp.GradScaler(CUDA, init_scale=2.0**8)
    for step in range(5):
        scale = scaler.get_scale()  # (halved after the NaN step)
        opt.zero_grad()
        scaler.scale(model(torch.randn(4, 8, device=CUDA)).square().mean()).backward()
        if step == 2:
            next(model.parameters()).grad[0, 0] = float("nan")
        grads = [p.grad.detach().clone() for p in model.parameters()]
        scaler.unscale_(opt)
        norm = opt.clip_grad_norm_(0.5)
        scaler.step(opt)
        scaler.update()
        if step == 2:
            continue  # skipped by ours (the scaler's inf check) and so by the truth
        factor = torch.clamp(0.5 / (norm + 1e-6), max=1.0)
        for q, g in zip(twin, grads):
            q.grad = g / scale * factor
        ref.step()
    assert opt.skipped_steps == 1
    for p, q in zip(model.parameters(), twin):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # clip factor: float32 rounding


# -- two ranks on the one GPU, through gloo ------------------------------------------------------


def two_ranks_parity_on_rank(rank: int, world_size: int) -> dict[str, str | None]:
    results = {name: run_config(options, device=CUDA) for name, options in CONFIGS.items()}
    results["fused"] = fused_mismatch_on(CUDA)
    return results


def test_two_ranks_on_one_gpu_are_torchs_numbers() -> None:
    for rank, results in enumerate(run_ranks(2, two_ranks_parity_on_rank)):
        for name, mismatch in results.items():
            assert mismatch is None, f"rank {rank}, {name}: {mismatch}"


def test_two_ranks_checkpoint_saved_on_cuda_resumes_at_one_and_three(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    run_ranks(2, dcp_save_on_rank, path, 3, CUDA)
    for world_size in (1, 3):
        for result in run_ranks(world_size, dcp_resume_on_rank, path, 3, CUDA):
            assert result["equal_at_load"] and result["equal_after"]


def overlap_race_on_rank(rank: int, world_size: int, race: bool) -> dict:
    """overlap_param_sync with CUDA buffers shared by gloo ranks: the race check's flags go
    through pinned host memory (sync._OnTheWay). ``race``: every rank clamps p.data while the
    sync is in flight (no version counter sees it), and the next step's agreement, which
    settles the flags, must refuse on every rank."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).to(CUDA)
    opt = ShardedRMSprop(model.parameters(), lr=1e-2)
    opt.overlap_param_sync(model)
    model(torch.randn(8, 64, device=CUDA)).square().mean().backward()
    opt.step()  # (its sync left in flight)
    if race:
        for p in model.parameters():
            p.data.clamp_(-0.01, 0.01)
    try:
        opt.step()  # (the same gradients again: its agreement waits for the sync first)
    except RuntimeError as caught:
        return {"error": str(caught)}
    opt.wait_for_params()
    return {"error": None, "finite": all(p.isfinite().all().item() for p in model.parameters())}


@pytest.mark.parametrize("race", [False, True], ids=["no race", "p.data in flight"])
def test_overlap_race_check_on_cuda_reaches_every_rank(race: bool) -> None:
    for result in run_ranks(2, overlap_race_on_rank, race):
        if race:
            assert result["error"] and "changed while the sync" in result["error"], result
        else:
            assert result["error"] is None and result["finite"], result
