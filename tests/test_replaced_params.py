"""Parameters replaced after the optimizer was built: adopted, or a clear error; never frozen.

``p.data = ...``, ``module.to_empty(...)`` and casts replace the tensor a parameter holds. The
optimizer's flat buffer no longer backs it, so before these tests the parameter silently
stopped training while torch.optim.RMSprop kept training it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks

OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True)


def model_and_copy() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))
    twin = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))
    twin.load_state_dict(model.state_dict())
    return model, twin


def train(models: list[nn.Module], optimizers: list, steps: range) -> None:
    """The same gradients for both models at each step (as DDP would leave them)."""
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        for p_ours, p_theirs in zip(models[0].parameters(), models[1].parameters()):
            grad = torch.randn(p_ours.shape, generator=generator)
            p_ours.grad, p_theirs.grad = grad.clone(), grad.clone()
        for opt in optimizers:
            opt.step()


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def reinitialise(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))


def replace_on_rank(rank: int, world_size: int) -> dict:
    model, twin = model_and_copy()
    opt = ShardedRMSprop(model.parameters(), **OPTIONS, fused=False)
    ref = torch.optim.RMSprop(twin.parameters(), **OPTIONS)
    train([model, twin], [opt, ref], range(2))
    outcome = {}

    # 1. p.data = a copy, and p.data = new values: adopted, training goes on as torch's
    for m in (model, twin):
        m[0].weight.data = m[0].weight.data.clone()
        m[2].bias.data = torch.full_like(m[2].bias, 0.5)
    train([model, twin], [opt, ref], range(2, 4))
    outcome["data_assignment"] = same(model, twin)
    outcome["views_flat_again"] = model[0].weight.data_ptr() == opt.sharding.buckets[0].views[0].data_ptr()

    # 2. to_empty() then initialisation, the meta-device habit
    for m in (model, twin):
        m.to_empty(device="cpu")
        reinitialise(m)
    train([model, twin], [opt, ref], range(4, 6))
    outcome["to_empty"] = same(model, twin)

    # 3. a cast: a clear error on every rank, nothing changed; casting back is adopted
    before = [p.detach().clone() for p in model.parameters()]
    model.to(torch.float64)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    try:
        opt.step()
        outcome["cast"] = "no error"
    except RuntimeError as error:
        outcome["cast"] = str(error)
    model.to(torch.float32)
    outcome["cast_changed_nothing"] = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    train([model, twin], [opt, ref], range(6, 8))
    outcome["cast_back"] = same(model, twin)
    return outcome


def test_replaced_parameters_are_adopted_on_every_rank_or_rejected() -> None:
    for outcome in run_ranks(2, replace_on_rank):
        assert outcome["data_assignment"] and outcome["views_flat_again"]
        assert outcome["to_empty"]
        assert outcome["cast"].startswith(
            "parameter 0 (shape (9, 6)) was replaced after ShardedRMSprop was built, by a "
            "tensor with dtype torch.float64, not torch.float32"
        )
        assert "Build the optimizer after moving or casting the model" in outcome["cast"]
        assert outcome["cast_changed_nothing"]
        assert outcome["cast_back"]


def test_a_parameter_replaced_by_another_shape_is_an_error() -> None:
    p = torch.randn(4, 3, requires_grad=True)
    opt = ShardedRMSprop([p])
    p.data = torch.randn(3, 4)
    p.grad = torch.ones(3, 4)
    with pytest.raises(RuntimeError, match=r"shape \(3, 4\), not \(4, 3\)"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_replaced_16_bit_parameters_renew_their_master_weights(dtype: torch.dtype) -> None:
    """The float32 master weights are the truth once training has begun: a replaced parameter
    must replace its master weights too, or the next step writes the old values back."""
    p = torch.randn(40, dtype=dtype, requires_grad=True)
    opt = ShardedRMSprop([p], lr=0.0)
    p.grad = torch.ones_like(p)
    opt.step()
    p.data = torch.full_like(p, 3.0)
    opt.step()  # lr 0: the parameter must stay what it was set to
    assert torch.equal(p, torch.full_like(p, 3.0))
    assert torch.equal(opt.state[p]["master_weight"], torch.full((40,), 3.0))


@pytest.mark.parametrize(
    "replace, change",
    [
        (lambda p: setattr(p, "data", p.data.t()), r"memory order \(1, 0\), not \(0, 1\)"),
        (lambda p: setattr(p, "data", p.data.clone()), None),  # the same order: adopted
    ],
    ids=["transposed", "same order"],
)
def test_a_parameter_replaced_in_another_memory_format_is_an_error(replace, change) -> None:
    """A new memory format (``p.data = p.data.t()``, ``model.to(memory_format=...)`` after
    building the optimizer) cannot be adopted: the optimizer would lay the parameter out as
    before, and a DDP model built since keeps its gradients in the new layout (wrong numbers
    with reduce_scatter_gradients). An error on the step, nothing changed."""
    ours = torch.randn(6, 6, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_()
    opt = ShardedRMSprop([ours], **OPTIONS, fused=False)
    ref = torch.optim.RMSprop([theirs], **OPTIONS)
    generator = torch.Generator().manual_seed(3)
    for step in range(3):
        grad = torch.randn(6, 6, generator=generator)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        if step == 2:
            replace(ours)
            if change is not None:
                before = ours.detach().clone()
                with pytest.raises(RuntimeError, match=change):
                    opt.step()
                assert torch.equal(ours, before) and float(opt.state[ours]["step"]) == 2
                return
        opt.step(), ref.step()
        assert torch.equal(ours, theirs), step


def test_a_model_made_channels_last_after_the_optimizer_is_an_error() -> None:
    model = torch.nn.Conv2d(3, 4, 3)
    opt = ShardedRMSprop(model.parameters(), fused=False)
    model.to(memory_format=torch.channels_last)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    with pytest.raises(RuntimeError, match=r"memory order \(0, 2, 3, 1\), not \(0, 1, 2, 3\)"):
        opt.step()


@pytest.mark.parametrize(
    "replace, change",
    [
        (lambda p: setattr(p, "data", p.data.t()), r"shape \(9, 7\), not \(7, 9\)"),
        (lambda p: setattr(p, "data", p.data[:3]), r"shape \(3, 9\), not \(7, 9\)"),
        (lambda p: setattr(p, "data", p.data.view(63)), r"shape \(63,\), not \(7, 9\)"),
    ],
    ids=["transposed", "sliced", "reshaped"],
)
def test_another_view_of_the_same_memory_with_another_shape_is_an_error(replace, change) -> None:
    p = torch.randn(7, 9, requires_grad=True)
    opt = ShardedRMSprop([p], fused=False)
    replace(p)
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=change):
        opt.step()
    assert all(float(state["step"]) == 0 for state in opt.state.values())


def sliced_on_rank(rank: int, world_size: int) -> str:
    p = torch.nn.Parameter(torch.randn(256))
    opt = ShardedRMSprop([p], fused=False)
    p.data = p.data[:128]
    p.grad = torch.ones(128)
    try:
        opt.step()
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_a_sliced_parameter_is_an_error_on_every_rank_not_a_hang() -> None:
    for message in run_ranks(2, sliced_on_rank, timeout=60):
        assert "shape (128,), not (256,)" in message


@pytest.mark.parametrize("change", ["append", "swap", "new group"])
def test_param_groups_changed_in_place_are_an_error(change: str) -> None:
    """torch would update a parameter appended to a group; the flat buffers cannot."""
    params = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = ShardedRMSprop(params, fused=False)
    extra = torch.randn(4, requires_grad=True)
    if change == "append":
        opt.param_groups[0]["params"].append(extra)
    elif change == "swap":
        opt.param_groups[0]["params"][0] = extra
    else:
        opt.param_groups.append({**opt.param_groups[0], "params": [extra]})
    for p in (*params, extra):
        p.grad = torch.ones_like(p)
    message = "add groups with add_param_group" if change == "new group" else (
        "the parameters of param group 0 are not those the optimizer laid out"
    )
    with pytest.raises(RuntimeError, match=message):
        opt.step()


# -- master weights across replacements, reloads and checkpoints ------------------------------------


def bf16_steps(p: torch.Tensor, opt: ShardedRMSprop, steps: range) -> None:
    for step in steps:
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(p.dtype)
        opt.step()


def bf16_run() -> tuple[torch.Tensor, ShardedRMSprop]:
    p = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()
    return p, ShardedRMSprop([p], **OPTIONS, fused=False)


@pytest.mark.parametrize("before_load", ["to_empty", "reload_master_weights"])
def test_master_weights_loaded_after_a_replacement_or_reload_are_kept(before_load: str) -> None:
    """Resume: a fresh model (to_empty or freshly written weights), then the optimizer's
    state: the loaded float32 master weights, not the bfloat16 parameters, go on."""
    p, opt = bf16_run()
    bf16_steps(p, opt, range(3))
    saved, weights = opt.full_state_dict(to=0), p.detach().clone()
    bf16_steps(p, opt, range(3, 4))  # the uninterrupted run
    q, resumed = bf16_run()
    if before_load == "to_empty":
        q.data = torch.empty_like(q)
        q.data.copy_(weights)
    else:
        q.data.copy_(weights)
        resumed.reload_master_weights()
    resumed.load_state_dict(saved)
    bf16_steps(q, resumed, range(3, 4))
    assert torch.equal(q, p)
    assert torch.equal(resumed.state[q]["master_weight"], opt.state[p]["master_weight"])


@pytest.mark.parametrize("change", ["replaced", "written and reloaded"])
def test_checkpoints_hold_the_master_weights_the_next_step_would_use(change: str) -> None:
    p, opt = bf16_run()
    bf16_steps(p, opt, range(2))
    if change == "replaced":
        p.data = torch.full_like(p, 3.0)
    else:
        p.data.fill_(3.0)
        opt.reload_master_weights()
    full = opt.full_state_dict(to=0)
    sharded = opt.state_dict()
    assert torch.equal(full["state"][0]["master_weight"], torch.full((1, 64), 3.0))
    assert torch.equal(sharded["state"][0]["master_weight"], torch.full((64,), 3.0))  # (world size 1: plain)


def sliced_bf16_state_dict_on_rank(rank: int, world_size: int) -> dict:
    """A parameter replaced by a shorter tensor cannot be adopted: saving must not fail on
    the ranks that own its end only (DCP would hang the others), the next step fails on all."""
    p = torch.nn.Parameter(torch.randn(256).bfloat16())
    opt = ShardedRMSprop([p], fused=False)
    p.grad = torch.ones_like(p)
    opt.step()
    p.data = p.data[:200]
    outcome = {"state_dict": "ok"}
    try:
        opt.state_dict()
    except Exception as error:  # noqa: BLE001
        outcome["state_dict"] = repr(error)
    p.grad = torch.ones_like(p)
    try:
        opt.step()
        outcome["step"] = "no error"
    except RuntimeError as error:
        outcome["step"] = str(error)
    return outcome


def test_saving_with_a_parameter_it_cannot_adopt_succeeds_on_every_rank() -> None:
    for outcome in run_ranks(2, sliced_bf16_state_dict_on_rank, timeout=60):
        assert outcome["state_dict"] == "ok"
        assert "shape (200,), not (256,)" in outcome["step"]
