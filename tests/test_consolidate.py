"""consolidate_state_dict(): torch ZeroRedundancyOptimizer's protocol for saving on one rank,
and the warning when one rank's shard is pickled as if it were the whole state."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from sharded_rmsprop import ShardedRMSprop
from sharded_rmsprop.shard_view import IncompleteStateWarning, ShardView
from spawn import run_ranks

OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-3)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 3))


def train(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, seed: int) -> None:
    """Steps with gradients alike on every rank (as DDP leaves them)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        opt.step()


def has_shard_views(state_dict: dict) -> bool:
    return any(
        isinstance(value, ShardView)
        for entry in state_dict["state"].values()
        if isinstance(entry, dict)
        for value in entry.values()
    )


def pickled(obj: object) -> tuple[bytes, list[warnings.WarningMessage]]:
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.save(obj, buffer)
    return buffer.getvalue(), [w for w in caught if w.category is IncompleteStateWarning]


def consolidate_on_rank(rank: int, world_size: int) -> dict:
    net = model()
    params = list(net.parameters())
    opt = ShardedRMSprop(params, **OPTIONS, fused=False)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(opt, params, 3, seed=1)
    out: dict = {}

    # a bad rank on one rank: an error on every rank, nothing kept
    try:
        opt.consolidate_state_dict(to=world_size if rank == 1 else 0)
    except ValueError as error:
        out["bad_to"] = str(error)
    out["after_bad_to_sharded"] = has_shard_views(opt.state_dict())

    # pickling one rank's state dict of several warns, once per state dict
    sharded = opt.state_dict()
    _, first = pickled(sharded)
    _, again = pickled(sharded)
    _, another = pickled(opt.state_dict())
    out["warnings"] = (len(first), len(again), len(another), str(first[0].message))

    opt.consolidate_state_dict()  # Lightning's call: to=0
    scheduler.step()  # the lr changes after the consolidation, before the save
    saved = opt.state_dict()
    out["consolidated_on_this_rank"] = not has_shard_views(saved)
    out["saved_lr"] = saved["param_groups"][0]["lr"]
    out["lr"] = opt.param_groups[0]["lr"]
    data, caught = pickled(saved)
    out["warned_for_whole"] = len(caught)
    out["read_once"] = has_shard_views(opt.state_dict())  # the next call is sharded again
    if rank == 0:
        out["whole"] = opt.full_state_dict(0)
        out["saved"] = torch.load(io.BytesIO(data), weights_only=True)
    else:
        opt.full_state_dict(0)

    # what rank 0 saved, loaded on every rank, continues as the uninterrupted optimizer
    file = [data if rank == 0 else None]
    torch.distributed.broadcast_object_list(file, src=0)
    loaded = torch.load(io.BytesIO(file[0]), weights_only=True)
    twin_params = [p.detach().clone() for p in params]
    twin = ShardedRMSprop(twin_params, **OPTIONS, fused=False)
    twin.load_state_dict(loaded)
    train(opt, params, 2, seed=2)
    train(twin, twin_params, 2, seed=2)
    out["resumed_equal"] = all(torch.equal(p, q) for p, q in zip(params, twin_params))

    # a consolidated state is never returned once the state changed
    opt.consolidate_state_dict()
    train(opt, params, 1, seed=3)
    out["stale_after_step"] = has_shard_views(opt.state_dict())
    opt.consolidate_state_dict()
    params[0].data = params[0].data.clone()  # replaced: adopted, with its values, at the next step
    out["stale_after_replacement"] = has_shard_views(opt.state_dict())
    return out


@pytest.mark.across_ranks
def test_consolidated_state_dict_is_torch_format_on_rank_0_until_the_next_step() -> None:
    results = run_ranks(2, consolidate_on_rank)
    for rank, r in enumerate(results):
        assert "to=2 is not a rank of a process group of size 2" in r["bad_to"], r["bad_to"]
        assert r["after_bad_to_sharded"]  # nothing consolidated by the failed call
        assert r["warnings"][:3] == (1, 0, 1)  # once per state dict
        assert "consolidate_state_dict(to=0)" in r["warnings"][3]
        assert r["consolidated_on_this_rank"] == (rank == 0)
        assert r["saved_lr"] == r["lr"] == OPTIONS["lr"] * 0.5  # groups read at save time
        assert r["warned_for_whole"] == 0 if rank == 0 else True
        assert r["read_once"]
        assert r["resumed_equal"]
        assert r["stale_after_step"]  # a step makes rank 0's state_dict() sharded again
        assert r["stale_after_replacement"]
    whole, saved = results[0]["whole"], results[0]["saved"]
    assert whole["state"].keys() == saved["state"].keys()
    for index, entry in whole["state"].items():
        for key, value in entry.items():
            assert torch.equal(saved["state"][index][key], value), (index, key)


def test_consolidated_state_loads_into_torch_rmsprop_in_one_process() -> None:
    net = model()
    params = list(net.parameters())
    opt = ShardedRMSprop(params, **OPTIONS, fused=False)
    reference_params = [p.detach().clone() for p in params]
    reference = torch.optim.RMSprop(reference_params, **OPTIONS)
    train(opt, params, 3, seed=1)
    train(reference, reference_params, 3, seed=1)
    opt.consolidate_state_dict()
    data, caught = pickled(opt.state_dict())
    assert not caught  # one process holds the whole state anyway
    resumed_params = [p.detach().clone() for p in params]
    resumed = torch.optim.RMSprop(resumed_params, **OPTIONS)
    resumed.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
    train(resumed, resumed_params, 2, seed=2)
    train(reference, reference_params, 2, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(resumed_params, reference_params))


def join_on_rank(rank: int, world_size: int) -> dict:
    """Rank 0 runs out of data and follows rank 1's second step under Join, after a
    consolidation: its next state_dict() must not be the state from before that step."""
    from torch.distributed.algorithms.join import Join
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = DDP(model())
    opt = ShardedRMSprop(net.parameters(), **OPTIONS, fused=False)
    with Join([net, opt]):
        for i in range(1 + rank):
            opt.zero_grad()
            generator = torch.Generator().manual_seed(10 * rank + i)
            net(torch.randn(4, 7, generator=generator)).square().mean().backward()
            opt.step()
            if i == 0:
                opt.consolidate_state_dict(to=0)
    return {"sharded": has_shard_views(opt.state_dict()), "whole": opt.full_state_dict(to=0)}


@pytest.mark.across_ranks
def test_a_step_followed_under_join_forgets_the_consolidated_state() -> None:
    first, _ = run_ranks(2, join_on_rank)
    assert first["sharded"]
    assert all(float(entry["step"]) == 2 for entry in first["whole"]["state"].values())
