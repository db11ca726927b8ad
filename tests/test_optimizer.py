"""ShardedRMSprop's behaviour as a torch optimizer: DDP, subgroups, groups, schedulers, state."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_rmsprop import ShardedRMSprop, shards
from sharded_rmsprop.layout import ALIGNMENT
from sharded_rmsprop.shards import GRAD_WINDOW_NUMEL
from spawn import run_ranks


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 32), nn.Tanh(), nn.Linear(32, 5), nn.LayerNorm(5))


def clone_params(params) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


# -- DDP -------------------------------------------------------------------------------------


def ddp_on_rank(rank: int, world_size: int, host_shared: bool) -> dict:
    """A DDP model stepped by ShardedRMSprop against torch's RMSprop fed the same gradients."""
    model = DDP(tiny_model())
    reference = clone_params(model.parameters())
    options = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-3)
    opt = ShardedRMSprop(model.parameters(), **options, fused=False, host_shared=host_shared)
    ref = torch.optim.RMSprop(reference, **options)
    losses, equal = [], True
    generator = torch.Generator().manual_seed(rank)  # each rank its own data
    for _ in range(5):
        x = torch.randn(8, 13, generator=generator)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        for p, r in zip(model.parameters(), reference):
            r.grad = p.grad.clone()  # DDP's averaged gradient
        opt.step()
        ref.step()
        equal &= all(torch.equal(p, r) for p, r in zip(model.parameters(), reference))
        losses.append(loss.item())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shared = [bucket.sync.shares_host_memory for bucket in opt.sharding.buckets]
    return {"equal": equal, "losses": losses, "flat": flat, "host_shared": shared}


@pytest.mark.parametrize("host_shared", [False, True], ids=["broadcasts", "host-shared"])
def test_ddp_model_matches_torch_and_ranks_agree(host_shared: bool) -> None:
    """Both syncs: gloo broadcasts (the default), and one buffer mapped by the host's ranks."""
    results = run_ranks(2, ddp_on_rank, host_shared)
    for result in results:
        assert result["equal"]
        assert result["losses"][-1] < result["losses"][0]
        assert result["host_shared"] == [host_shared]
    assert torch.equal(results[0]["flat"], results[1]["flat"])


# -- subgroups -------------------------------------------------------------------------------


def subgroup_on_rank(rank: int, world_size: int) -> dict:
    """Two independent data-parallel pairs, {0, 1} and {2, 3}, each with its own optimizer."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = pairs[rank // 2]
    params = [torch.randn(100, generator=torch.Generator().manual_seed(rank // 2)).requires_grad_()]
    reference = clone_params(params)
    opt = ShardedRMSprop(params, lr=0.1, momentum=0.5, process_group=group, fused=False)
    ref = torch.optim.RMSprop(reference, lr=0.1, momentum=0.5)
    for step in range(3):
        grad = torch.full((100,), float(step + 1 + rank // 2))
        params[0].grad, reference[0].grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    return {
        "equal": torch.equal(params[0], reference[0]),
        "state_numel": opt.state[params[0]]["square_avg"].numel(),
        "param": params[0].detach().clone(),
    }


def test_process_group_may_be_a_subgroup() -> None:
    results = run_ranks(4, subgroup_on_rank)
    assert all(r["equal"] for r in results)
    # 100 elements padded to 128 over a pair: rank 0 of each pair owns 64, rank 1 owns 36
    assert [r["state_numel"] for r in results] == [64, 36, 64, 36]
    assert torch.equal(results[0]["param"], results[1]["param"])
    assert torch.equal(results[2]["param"], results[3]["param"])
    assert not torch.equal(results[0]["param"], results[2]["param"])


# -- memory ----------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [16, 48, 1000])
def test_gradients_staged_in_small_windows_give_the_same_bits(
    monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """Windows that cut parameters, spans and param groups apart: still torch's numbers."""
    monkeypatch.setattr(shards, "GRAD_WINDOW_NUMEL", window)
    ours = [
        torch.randn(shape, generator=torch.Generator().manual_seed(i)).requires_grad_()
        for i, shape in enumerate([(40,), (7, 9), (), (100,), (3,)])
    ]
    theirs = [p.detach().clone().requires_grad_() for p in ours]

    def groups(params: list[torch.Tensor]) -> list[dict]:
        return [{"params": params[:2]}, {"params": params[2:], "momentum": 0.9}]

    opt = ShardedRMSprop(groups(ours), fused=False, centered=True)
    ref = torch.optim.RMSprop(groups(theirs), centered=True)
    (bucket,) = opt.sharding.buckets
    assert bucket.grad_window.numel() == min(window, bucket.plan.shard_numel)
    for step in range(3):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            grad = None if (i + step) % 3 == 0 else torch.randn_like(p)
            p.grad, q.grad = grad, grad
        opt.step()
        ref.step()
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs)), step


def memory_on_rank(rank: int, world_size: int) -> dict:
    model = tiny_model()
    params = list(model.parameters())
    opt = ShardedRMSprop(params, momentum=0.9, centered=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    (bucket,) = opt.sharding.buckets
    return {
        "param_numel": sum(p.numel() for p in params),
        "shard_numel": bucket.plan.shard_numel,
        "buffers": {key: t.numel() for key, t in bucket.state.items()},
        "grad_window": bucket.grad_window.numel(),
        "state_numel": sum(
            t.numel() for p in params for k, t in opt.state[p].items() if k != "step"
        ),
        # each parameter's own storage is its range of the flat buffer's memory, no more
        "in_flat": all(
            p.untyped_storage().data_ptr() == p.data_ptr()
            and p.untyped_storage().nbytes() == p.numel() * p.element_size()
            and bucket.flat.data_ptr()
            <= p.data_ptr()
            < bucket.flat.data_ptr() + bucket.flat.numel() * bucket.flat.element_size()
            for p in params
        ),
    }


def test_state_exists_only_for_the_owned_range() -> None:
    world_size = 3
    results = run_ranks(world_size, memory_on_rank)
    total = results[0]["param_numel"]
    for r in results:
        assert r["buffers"] == {
            "square_avg": r["shard_numel"],
            "momentum_buffer": r["shard_numel"],
            "grad_avg": r["shard_numel"],
        }
        # gradients are staged in a window, here the whole (small) shard; never more
        assert r["grad_window"] == min(r["shard_numel"], GRAD_WINDOW_NUMEL)
        # padding only: at most ALIGNMENT per parameter (6 of them) and per rank
        assert r["shard_numel"] * world_size < total + ALIGNMENT * (6 + world_size)
        assert r["in_flat"]  # parameters lie in the flat buffer, not copies of it
    # the per-parameter state views add up to each element exactly once across ranks
    assert sum(r["state_numel"] for r in results) == 3 * total


# -- single-process behaviour (no process group) ----------------------------------------------


def test_closure_is_called_with_grad_enabled_and_its_loss_returned() -> None:
    model = tiny_model()
    opt = ShardedRMSprop(model.parameters())
    x = torch.randn(4, 13)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad


def test_zero_grad_sets_gradients_to_none() -> None:
    model = tiny_model()
    opt = ShardedRMSprop(model.parameters())
    model(torch.randn(2, 13)).sum().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_lr_scheduler_matches_torch() -> None:
    params = [torch.randn(50, requires_grad=True)]
    reference = clone_params(params)
    opt = ShardedRMSprop(params, lr=0.1, fused=False)
    ref = torch.optim.RMSprop(reference, lr=0.1)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3) for o in (opt, ref)]
    for step in range(7):
        grad = torch.randn(50, generator=torch.Generator().manual_seed(step))
        params[0].grad, reference[0].grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        for scheduler in schedulers:
            scheduler.step()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] != 0.1
    assert torch.equal(params[0], reference[0])


def test_named_parameters_are_accepted() -> None:
    model = tiny_model()
    opt = ShardedRMSprop(model.named_parameters())
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]


def test_add_param_group_continues_like_torch() -> None:
    first, second = [torch.randn(20, requires_grad=True)], [torch.randn(7, 3, requires_grad=True)]
    ref_first, ref_second = clone_params(first), clone_params(second)
    opt = ShardedRMSprop(first, lr=0.05, fused=False)
    ref = torch.optim.RMSprop(ref_first, lr=0.05)
    for step in range(4):
        if step == 2:
            opt.add_param_group({"params": second, "momentum": 0.9, "centered": True})
            ref.add_param_group({"params": ref_second, "momentum": 0.9, "centered": True})
        for p, r in zip(first + second, ref_first + ref_second):
            grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            p.grad, r.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    assert all(torch.equal(p, r) for p, r in zip(first + second, ref_first + ref_second))
    assert opt.param_groups[1]["momentum"] == 0.9 and len(opt.param_groups) == 2


def test_state_holds_torch_keys_and_step_counts() -> None:
    params = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = ShardedRMSprop(params, momentum=0.9, fused=False)
    params[0].grad = torch.ones(5)
    opt.step()
    opt.step()
    assert set(opt.state[params[0]]) == {"step", "square_avg", "momentum_buffer"}
    assert opt.state[params[0]]["step"].item() == 2.0
    assert opt.state[params[0]]["step"].dtype == torch.float32
    assert params[1] not in opt.state  # never had a gradient: no state, as in torch
    assert torch.equal(opt.state[params[0]]["square_avg"], torch.full((5,), 1 - 0.99**2))


def test_momentum_switched_on_later_starts_from_zero() -> None:
    params = [torch.randn(10, requires_grad=True)]
    opt = ShardedRMSprop(params)
    params[0].grad = torch.ones(10)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    opt.step()
    assert (opt.state[params[0]]["momentum_buffer"] != 0).all()


def test_memory_accounts_for_every_buffer_by_kind() -> None:
    """100 float32 elements lie in 128 (a multiple of 64); bfloat16 ones get float32 masters."""
    params = [
        torch.randn(100, requires_grad=True),
        torch.randn(100, dtype=torch.bfloat16, requires_grad=True),
    ]
    opt = ShardedRMSprop(params, momentum=0.9, centered=True)
    assert opt.memory_bytes()["state"] == 0  # no state before the first step
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.memory_bytes() == {
        "state": 3 * 128 * 4 * 2,  # three float32 buffers of each bucket (masters' dtype)
        "master": 128 * 4,  # the bfloat16 bucket's float32 master weights
        "steps": 2 * opt.memory()["steps"][0].element_size(),
        "grad_window": 128 * 4 * 2,  # the whole (small) shard, float32 in both buckets
    }
    assert not opt.shares_host_memory
