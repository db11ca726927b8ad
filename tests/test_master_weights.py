"""float32 master weights for bfloat16 and float16 parameters.

The truth is ``torch.optim.RMSprop`` run on a float32 copy of the model that gets the same
gradients (the 16-bit gradients, converted exactly to float32): our 16-bit parameters must
equal its parameters rounded to 16 bits, and our master weights its parameters, bit for bit
on the reference path, after every one of many steps, at world sizes 1 to 4.
"""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch
import torch.distributed.checkpoint as dcp

from sharded_rmsprop import ShardedRMSprop
from sharded_rmsprop.comm import DataParallelGroup
from spawn import run_ranks

CONFIGS: dict[str, dict] = {
    "default": {},
    "weight_decay+maximize": {"weight_decay": 0.1, "maximize": True},
    "centered+momentum": {"centered": True, "momentum": 0.9, "lr": 3e-3},
    "all": {"weight_decay": 0.01, "centered": True, "momentum": 0.5, "alpha": 0.9},
}
SHAPES = [(), (3,), (5, 7), (17,), (33, 2), (64,)]
STEPS = 30


def make_model(dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> list[torch.Tensor]:
    """16-bit parameters, with one float32 parameter among them (its own master)."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator).to(dtype) for shape in SHAPES]
    params.append(torch.randn(6, generator=generator))
    return [p.to(device).requires_grad_() for p in params]


def float32_copy(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().float().requires_grad_() for p in params]


def set_grads(ours: list[torch.Tensor], theirs: list[torch.Tensor], step: int) -> None:
    """The same gradients for both (theirs in float32); some parameters skip some steps."""
    generator = torch.Generator().manual_seed(100 + step)
    for i, (p, q) in enumerate(zip(ours, theirs)):
        grad = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
        p.grad, q.grad = (None, None) if (i + step) % 5 == 0 else (grad, grad.float())


def compare(
    ours: list[torch.Tensor], theirs: list[torch.Tensor], opt: ShardedRMSprop
) -> str | None:
    """Where ours differs from torch's float32 run, rounded; and the masters from its values."""
    for i, (p, q) in enumerate(zip(ours, theirs)):
        if not torch.equal(p, q.to(p.dtype)):
            return f"param {i} {p.dtype}: max |diff| {(p.float() - q).abs().max().item():.3e}"
        master = opt.state.get(p, {}).get("master_weight")
        if master is not None and not torch.equal(master, owned_range(opt, p, q)):
            return f"master weights of param {i} differ from torch's float32 parameters"
    return None


def owned_range(opt: ShardedRMSprop, param: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The elements of ``values`` (shaped like ``param``) that this rank owns, flattened."""
    for bucket in opt.sharding.buckets:
        for position, member in enumerate(bucket.params):
            if member is param:
                piece = bucket.owned_piece(position)
                start, end = (piece.param_start, piece.param_end) if piece else (0, 0)
                return values.detach().reshape(-1)[start:end]
    raise KeyError("not a parameter of the optimizer")


def run_parity(
    dtype: torch.dtype, options: dict, fused: bool | None = False, device: str = "cpu"
) -> str | None:
    ours = make_model(dtype, device=device)
    theirs = float32_copy(ours)
    opt = ShardedRMSprop(ours, fused=fused, **options)
    ref = torch.optim.RMSprop(theirs, **options, foreach=False)
    for step in range(STEPS):
        set_grads(ours, theirs, step)
        opt.step()
        ref.step()
        mismatch = compare(ours, theirs, opt) if fused is False else None
        if mismatch:
            return f"step {step}: {mismatch}"
    if fused is not False:
        return fused_mismatch(ours, theirs)
    return None


# The fused kernels compute the float32 update with one rounding per stored value where torch
# rounds after every operation: the float32 master weights agree with torch's to a few ulps
# per step, and a 16-bit parameter is the rounding of its master, so it is equal to torch's
# rounded value or one 16-bit ulp away when the two masters straddle a rounding boundary.
def fused_mismatch(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> str | None:
    for i, (p, q) in enumerate(zip(ours, theirs)):
        ulp = 2.0**-7 if p.dtype == torch.bfloat16 else 2.0**-10
        try:
            torch.testing.assert_close(p.float(), q.detach(), rtol=ulp, atol=1e-5)
        except AssertionError as error:
            return f"param {i} {p.dtype}: {error}"
    return None


def parity_on_rank(rank: int, world_size: int) -> dict[str, str | None]:
    return {
        f"{dtype}-{name}": run_parity(dtype, options)
        for dtype in (torch.bfloat16, torch.float16)
        for name, options in CONFIGS.items()
    }


@functools.cache
def parity_results(world_size: int) -> list[dict[str, str | None]]:
    return run_ranks(world_size, parity_on_rank)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_master_weights_match_torch_float32_bit_for_bit(world_size: int) -> None:
    for rank, results in enumerate(parity_results(world_size)):
        for name, result in results.items():
            assert result is None, f"rank {rank}, {name}: {result}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_master_weights_match_torch_float32_within_one_ulp(dtype: torch.dtype) -> None:
    for name, options in CONFIGS.items():
        assert run_parity(dtype, options, fused=None) is None, name


def test_state_is_float32_and_the_sync_moves_16_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    moved: list[torch.dtype] = []
    sync = DataParallelGroup.sync_shards

    def recording_sync(self, flats, *args, **kwargs):
        moved.extend(flat.dtype for flat in flats)
        return sync(self, flats, *args, **kwargs)

    monkeypatch.setattr(DataParallelGroup, "sync_shards", recording_sync)
    params = [torch.randn(40, dtype=torch.bfloat16, requires_grad=True)]
    opt = ShardedRMSprop(params, momentum=0.9, centered=True, fused=False)
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    state = opt.state[params[0]]
    assert {key: value.dtype for key, value in state.items() if key != "step"} == {
        key: torch.float32 for key in ("square_avg", "momentum_buffer", "grad_avg", "master_weight")
    }
    assert params[0].dtype == torch.bfloat16
    assert moved == [torch.bfloat16]


def test_master_weights_false_keeps_torch_16_bit_arithmetic() -> None:
    ours = [torch.randn(30, dtype=torch.bfloat16, requires_grad=True)]
    theirs = [ours[0].detach().clone().requires_grad_()]
    opt = ShardedRMSprop(ours, master_weights=False, fused=False, momentum=0.9)
    ref = torch.optim.RMSprop(theirs, momentum=0.9)
    for step in range(5):
        grad = torch.randn(30, generator=torch.Generator().manual_seed(step)).bfloat16()
        ours[0].grad, theirs[0].grad = grad, grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(ours[0], theirs[0])
    assert "master_weight" not in opt.state[ours[0]]
    assert opt.state[ours[0]]["square_avg"].dtype == torch.bfloat16


def test_weights_loaded_after_construction_are_kept() -> None:
    """The master weights are taken at the first step, not when the optimizer is built."""
    ours = make_model(torch.bfloat16)
    opt = ShardedRMSprop(ours, fused=False)
    pretrained = make_model(torch.bfloat16, seed=7)
    with torch.no_grad():
        for p, q in zip(ours, pretrained):
            p.copy_(q)
    theirs = float32_copy(ours)
    ref = torch.optim.RMSprop(theirs)
    for step in range(3):
        set_grads(ours, theirs, step)
        opt.step()
        ref.step()
    assert compare(ours, theirs, opt) is None


def test_reload_master_weights_after_writing_to_the_parameters() -> None:
    params = make_model(torch.bfloat16)
    opt = ShardedRMSprop(params, fused=False)
    train(opt, params, range(2))
    replacement = make_model(torch.bfloat16, seed=9)
    with torch.no_grad():
        for p, q in zip(params, replacement):
            p.copy_(q)
    opt.reload_master_weights()
    opt.param_groups[0]["lr"] = 0.0
    train(opt, params, range(2, 3))
    assert all(torch.equal(p, q) for p, q in zip(params, replacement))
    for p in params[1:-1]:
        assert torch.equal(opt.state[p]["master_weight"], p.detach().float().reshape(-1))


# -- checkpoints -----------------------------------------------------------------------------


def train(opt: ShardedRMSprop, params: list[torch.Tensor], steps: range) -> None:
    shadow = float32_copy(params)  # gradients only; ranks agree as DDP would make them
    for step in steps:
        set_grads(params, shadow, step)
        opt.step()


def resume_on_rank(rank: int, world_size: int, workdir: str, saved_world_size: int) -> list:
    """Train 4 steps at ``saved_world_size`` and save (DCP and torch format); at
    ``world_size`` load both and train 4 more; return the parameters of each."""
    options = CONFIGS["all"]
    if world_size == saved_world_size:
        params = make_model(torch.bfloat16)
        opt = ShardedRMSprop(params, fused=False, **options)
        train(opt, params, range(4))
        dcp.save(
            {"optim": opt, "params": {str(i): p for i, p in enumerate(params)}},
            checkpoint_id=workdir,
        )
        full = opt.full_state_dict(to=0)
        if rank == 0:
            torch.save(
                {"optim": full, "params": [p.detach() for p in params]}, f"{workdir}/full.pt"
            )
        torch.distributed.barrier()
        train(opt, params, range(4, 8))
        return [p.detach() for p in params]
    results = []
    for source in ("dcp", "torch"):
        params = make_model(torch.bfloat16, seed=3)  # other values: all must come from disk
        opt = ShardedRMSprop(params, fused=False, **options)
        if source == "dcp":
            state = {"optim": opt, "params": {str(i): p for i, p in enumerate(params)}}
            dcp.load(state, checkpoint_id=workdir)
        else:
            full = torch.load(f"{workdir}/full.pt", weights_only=True)
            with torch.no_grad():
                for p, saved in zip(params, full["params"]):
                    p.copy_(saved)
            opt.load_state_dict(full["optim"])
        train(opt, params, range(4, 8))
        results.append([p.detach() for p in params])
    return results


@pytest.mark.parametrize("saved, loaded", [(2, 3), (3, 1)])
def test_checkpoints_carry_master_weights_across_world_sizes(saved: int, loaded: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        uninterrupted = run_ranks(saved, resume_on_rank, workdir, saved)[0]
        resumed = run_ranks(loaded, resume_on_rank, workdir, saved)
    for rank, results in enumerate(resumed):
        for source, params in zip(("dcp", "torch"), results):
            for i, (a, b) in enumerate(zip(params, uninterrupted)):
                assert torch.equal(a, b), f"rank {rank}, {source} format, param {i}"


def test_full_state_dict_has_float32_master_weights_torch_can_load() -> None:
    params = make_model(torch.bfloat16)
    opt = ShardedRMSprop(params, fused=False, momentum=0.9)
    train(opt, params, range(2))
    full = opt.full_state_dict()
    entry = full["state"][1]
    assert entry["master_weight"].dtype == torch.float32
    assert entry["master_weight"].shape == params[1].shape
    assert torch.equal(entry["master_weight"].to(torch.bfloat16), params[1].detach())
    assert "master_weight" not in full["state"][len(SHAPES)]  # the float32 parameter
    torch.optim.RMSprop(params, momentum=0.9).load_state_dict(full)  # torch accepts it


@pytest.mark.parametrize("model_loaded", ["before", "after"])
def test_torch_format_without_master_weights_takes_them_from_the_parameters(
    model_loaded: str,
) -> None:
    """From the parameters as they are at the next step, whichever is loaded first."""
    params = make_model(torch.bfloat16)
    theirs = float32_copy(params)
    ref = torch.optim.RMSprop(theirs)
    for step in range(3):
        set_grads(params, theirs, step)
        ref.step()
    opt = ShardedRMSprop(params, fused=False, lr=0.0)
    if model_loaded == "after":
        train(opt, params, range(2))  # master weights of other values exist already
        opt.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p, q in zip(params, theirs):
            p.copy_(q)  # rounded to bfloat16: what a model checkpoint of that run holds
    if model_loaded == "before":
        opt.load_state_dict(ref.state_dict())
    opt.param_groups[0]["lr"] = 0.0  # torch's state dict brought its lr
    expected = [p.detach().clone() for p in params]
    train(opt, params, range(3, 4))
    for p, e in zip(params, expected):
        assert torch.equal(p, e)
    for p in params[1:-1]:
        assert torch.equal(opt.state[p]["master_weight"], p.detach().float().reshape(-1))


def test_load_rejects_a_master_weight_of_the_wrong_shape() -> None:
    params = make_model(torch.bfloat16)
    opt = ShardedRMSprop(params, fused=False)
    train(opt, params, range(1))
    full = opt.full_state_dict()
    before = {k: v.clone() for k, v in opt.state[params[2]].items()}
    full["state"][2]["master_weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"state\[2\]\['master_weight'\] has shape"):
        opt.load_state_dict(full)
    assert all(torch.equal(before[k], v) for k, v in opt.state[params[2]].items())


def test_master_weights_validation() -> None:
    with pytest.raises(TypeError, match="master_weights must be None, True or False"):
        ShardedRMSprop([torch.zeros(2, requires_grad=True)], master_weights="yes")
