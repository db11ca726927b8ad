"""Bitwise parity with torch.optim.RMSprop on the reference path, at world sizes 1 to 4.

bfloat16 parameters run with ``master_weights=False`` here, torch's own arithmetic in their
dtype; float32 master weights are tested against torch in ``test_master_weights.py``.

Each world size is one spawn: every rank runs every configuration, feeding ShardedRMSprop and
a replicated torch.optim.RMSprop the same gradients and comparing all parameters after every
step with ``torch.equal``. The parametrised tests below then read one configuration each.
"""

from __future__ import annotations

import functools

import pytest
import torch

from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks

# torch's own RMSprop test inputs (test/optim/test_optim.py's optim_inputs_func_rmsprop),
# plus momentum alone, a non-default alpha/eps, and a tensor lr.
CONFIGS: dict[str, dict] = {
    "default": {},
    "lr": {"lr": 1e-3},
    "weight_decay": {"weight_decay": 0.1},
    "maximize": {"maximize": True},
    "weight_decay+centered": {"weight_decay": 0.1, "centered": True},
    "maximize+weight_decay": {"maximize": True, "weight_decay": 0.1},
    "weight_decay+centered+momentum": {"weight_decay": 0.1, "centered": True, "momentum": 0.1},
    "all+maximize": {"weight_decay": 0.1, "centered": True, "momentum": 0.1, "maximize": True},
    "momentum": {"momentum": 0.9},
    "alpha+eps+centered+momentum": {"alpha": 0.9, "eps": 1e-4, "centered": True, "momentum": 0.5},
    "tensor_lr": {"lr": torch.tensor(0.005)},
}

# Awkward shapes: 0-d, empty, smaller than any world size, not multiples of the alignment;
# 16-bit ones longer than torch's vector width whose owned ranges start inside them (torch's
# CPU kernels for 16-bit dtypes round a vectorised block and a scalar tail differently, so a
# slice must start where torch's whole-parameter loop starts a block: at a multiple of 64).
SHAPES = {
    torch.float32: [(), (0,), (1,), (3,), (5, 7), (17,), (4, 4, 3), (33, 2), (16,), (40,)],
    torch.float64: [(11,), (2, 3), (1,)],
    torch.bfloat16: [(9,), (6, 5), (64, 33), (130, 7), (33, 65), (1000,)],
    torch.complex64: [(5,), (2, 3)],
}
STEPS = 6


def random_like(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator):
    if dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=dtype)
    return torch.randn(shape, generator=generator).to(dtype)


def make_params(seed: int = 0, shapes: dict = SHAPES, device: str = "cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for dtype, dtype_shapes in shapes.items():
        for shape in dtype_shapes:
            params.append(random_like(shape, dtype, generator).to(device).requires_grad_())
    if len(params) > 2:
        params[2].requires_grad_(False)  # a frozen parameter: never has a gradient
    return params


def set_grads(params: list[torch.Tensor], step: int) -> None:
    """The same gradients on every rank, as DDP would leave them; some are None."""
    generator = torch.Generator().manual_seed(1000 + step)
    for i, param in enumerate(params):
        grad = random_like(param.shape, param.dtype, generator).to(param.device)
        skipped = not param.requires_grad or (i + step) % 4 == 0
        param.grad = None if skipped else grad


def two_groups(params: list[torch.Tensor], options: dict) -> list[dict]:
    """Half the parameters at the config's lr, the rest at half of it (same other options)."""
    half = dict(options, lr=options.get("lr", 1e-2) / 2)
    return [{"params": params[::2]}, {"params": params[1::2], **half}]


def first_mismatch(ours: list[torch.Tensor], theirs: list[torch.Tensor], step: int) -> str | None:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if not torch.equal(a, b):
            diff = (a - b).abs().max().item()
            return f"step {step}, param {i} {tuple(a.shape)} {a.dtype}: max |diff| {diff:.3e}"
    return None


def run_config(options: dict, shapes: dict = SHAPES, device: str = "cpu") -> str | None:
    ours = make_params(shapes=shapes, device=device)
    theirs = [p.detach().clone().requires_grad_(p.requires_grad) for p in ours]
    opt = ShardedRMSprop(two_groups(ours, options), fused=False, master_weights=False)
    # torch's for-loop, the reference path's op sequence (CUDA would default to foreach)
    ref = torch.optim.RMSprop(two_groups(theirs, options), foreach=False)
    for step in range(STEPS):
        if step == STEPS // 2:  # an LR schedule and an alpha change between steps
            for group in opt.param_groups + ref.param_groups:
                group["lr"] = group["lr"] * 0.5
                group["alpha"] = 0.95
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
        mismatch = first_mismatch(ours, theirs, step)
        if mismatch:
            return mismatch
    return None


# Fewer parameters than ranks, each smaller than any world size.
FEW_SHAPES = {torch.float32: [(3,), ()]}


def parity_on_rank(rank: int, world_size: int) -> dict[str, str | None]:
    results = {name: run_config(options) for name, options in CONFIGS.items()}
    results["few_params"] = run_config(CONFIGS["all+maximize"], FEW_SHAPES)
    return results


@functools.cache
def parity_results(world_size: int) -> list[dict[str, str | None]]:
    return run_ranks(world_size, parity_on_rank)


@pytest.mark.parametrize("name", [*CONFIGS, "few_params"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_bitwise_parity_with_torch_rmsprop(world_size: int, name: str) -> None:
    for rank, results in enumerate(parity_results(world_size)):
        assert results[name] is None, f"rank {rank}: {results[name]}"


def test_parity_without_process_group() -> None:
    for name, options in CONFIGS.items():
        assert run_config(options) is None, name


def mixed_groups_on_rank(rank: int, world_size: int) -> str | None:
    """Groups with different momentum/centered sharing one flat buffer."""
    ours = make_params(seed=1)
    theirs = [p.detach().clone().requires_grad_(p.requires_grad) for p in ours]

    def groups(params):
        return [
            {"params": params[0::3], "momentum": 0.9},
            {"params": params[1::3], "centered": True, "lr": 3e-3},
            {"params": params[2::3], "momentum": 0.5, "centered": True, "weight_decay": 0.01},
        ]

    opt = ShardedRMSprop(groups(ours), fused=False, master_weights=False)
    ref = torch.optim.RMSprop(groups(theirs))
    for step in range(STEPS):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
        mismatch = first_mismatch(ours, theirs, step)
        if mismatch:
            return mismatch
    return None


@pytest.mark.parametrize("world_size", [1, 3])
def test_param_groups_with_different_momentum_and_centered(world_size: int) -> None:
    for rank, result in enumerate(run_ranks(world_size, mixed_groups_on_rank)):
        assert result is None, f"rank {rank}: {result}"


# -- the fused path (fused=None picks the compiled CPU kernel here) ---------------------------

# The fused kernel computes each element's update in float32 and rounds once per stored value,
# where torch rounds after every operation (and contracts some into FMAs): float32 results
# differ by a few ulps per step, bfloat16 ones by up to one bfloat16 ulp (2**-8 relative) per
# step. Over STEPS steps that stays within these bounds; float64 is computed in float64 and
# stays within a few float64 ulps (a float32 computation would miss this bound by 1e9);
# complex parameters take the reference path and must match exactly.
FUSED_TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=STEPS * 2**-8, atol=STEPS * 2**-8),
    torch.float64: dict(rtol=1e-14, atol=1e-15),
    torch.complex64: dict(rtol=0, atol=0),
}


def fused_on_rank(rank: int, world_size: int) -> dict[str, str | None]:
    results = {}
    for name, options in CONFIGS.items():
        ours = make_params()
        theirs = [p.detach().clone().requires_grad_(p.requires_grad) for p in ours]
        opt = ShardedRMSprop(two_groups(ours, options), master_weights=False)
        ref = torch.optim.RMSprop(two_groups(theirs, options))
        results[name] = None
        for step in range(STEPS):
            set_grads(ours, step)
            set_grads(theirs, step)
            opt.step()
            ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            try:
                torch.testing.assert_close(a, b, **FUSED_TOLERANCE[a.dtype])
            except AssertionError as error:
                results[name] = f"param {i} {tuple(a.shape)} {a.dtype}: {error}"
                break
    return results


def test_default_path_is_fused_on_this_cpu() -> None:
    from sharded_rmsprop.kernels import rmsprop_cpu_fused_, select_update

    assert select_update(None, torch.device("cpu"), torch.float32) is rmsprop_cpu_fused_


@pytest.mark.parametrize("world_size", [1, 3])
def test_fused_path_matches_torch_within_float32_rounding(world_size: int) -> None:
    for rank, results in enumerate(run_ranks(world_size, fused_on_rank)):
        for name, result in results.items():
            assert result is None, f"rank {rank}, {name}: {result}"
