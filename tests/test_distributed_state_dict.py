"""torch's distributed state-dict API (``torch.distributed.checkpoint.state_dict``) gives for a
ShardedRMSprop what it gives for torch.optim.RMSprop: whole tensors shaped like the
parameters where whole ones are asked for, a sharded form that DCP saves and reloads at any
world size otherwise, and loads through it resume bit for bit (fused=False)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks

OPTIONS = {"lr": 1e-2, "momentum": 0.9, "centered": True, "weight_decay": 1e-3}
FULL = StateDictOptions(full_state_dict=True)
FULL_ON_RANK_0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(kind: str) -> tuple[DDP, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = DDP(nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 3)))
    if kind == "sharded":
        return net, ShardedRMSprop(net.parameters(), **OPTIONS, fused=False)
    return net, torch.optim.RMSprop(net.parameters(), **OPTIONS)


def train(net: DDP, opt: torch.optim.Optimizer, rank: int, seed: int, steps: int = 2) -> None:
    generator = torch.Generator().manual_seed(100 * seed + rank)  # each rank its own data
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(4, 7, generator=generator)).square().mean().backward()
        opt.step()


def params(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def same(a: object, b: object) -> bool:
    """Equal nested state dicts, tensors bit for bit (and of one type)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return type(a) is type(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def whole_on_rank(rank: int, world_size: int) -> dict:
    out: dict = {}
    trained = {kind: build(kind) for kind in ("sharded", "torch")}
    for net, opt in trained.values():
        train(net, opt, rank, seed=1)
    got = {
        kind: (
            get_optimizer_state_dict(net, opt, options=FULL),
            get_optimizer_state_dict(net, opt, options=FULL_ON_RANK_0),
        )
        for kind, (net, opt) in trained.items()
    }
    out["full_equal"] = same(got["sharded"][0], got["torch"][0])
    out["full_on_rank_0_equal"] = same(got["sharded"][1], got["torch"][1])
    out["full_on_rank_0_empty_elsewhere"] = rank == 0 or got["sharded"][1] == {}
    whole_state = got["sharded"][0]["state"]
    out["full_shapes"] = sorted(
        (name, tuple(entry["square_avg"].shape)) for name, entry in whole_state.items()
    )
    # set_optimizer_state_dict with whole tensors, from every rank and broadcast from rank 0,
    # into fresh optimizers: they continue as torch's RMSprop given the same state
    resumed = {}
    for how, options in (
        ("every rank", FULL),
        ("from rank 0", StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)),
    ):
        net, opt = build("sharded")
        with torch.no_grad():
            for p, q in zip(net.parameters(), trained["torch"][0].parameters()):
                p.copy_(q)
        state = got["torch"][0] if how == "every rank" or rank == 0 else {}
        set_optimizer_state_dict(net, opt, state, options=options)
        train(net, opt, rank, seed=2)
        resumed[how] = params(net)
    # the sharded form, offloaded to the CPU, set back into a fresh optimizer
    net, opt = build("sharded")
    offload = StateDictOptions(cpu_offload=True)
    sharded = get_optimizer_state_dict(*trained["sharded"], options=offload)
    with torch.no_grad():
        for p, q in zip(net.parameters(), trained["sharded"][0].parameters()):
            p.copy_(q)
    set_optimizer_state_dict(net, opt, sharded, options=offload)
    train(net, opt, rank, seed=2)
    resumed["sharded, offloaded"] = params(net)
    net, opt = trained["torch"]
    train(net, opt, rank, seed=2)
    out["resumed_equal"] = {how: same(p, params(net)) for how, p in resumed.items()}
    return out


@pytest.mark.across_ranks
def test_whole_state_dicts_are_torchs() -> None:
    for rank, r in enumerate(run_ranks(2, whole_on_rank)):
        assert r["full_equal"], rank
        assert r["full_on_rank_0_equal"], rank
        assert r["full_on_rank_0_empty_elsewhere"], rank
        assert r["full_shapes"] == [("0.bias", (16,)), ("0.weight", (16, 7)), ("2.bias", (3,)),
                                    ("2.weight", (3, 16))]  # fmt: skip
        assert r["resumed_equal"] == dict.fromkeys(
            ("every rank", "from rank 0", "sharded, offloaded"), True
        ), rank


def save_on_rank(rank: int, world_size: int, folder: str) -> dict:
    net, opt = build("sharded")
    train(net, opt, rank, seed=1)
    model_state, optim_state = get_state_dict(net, opt)  # the sharded form
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    whole = get_optimizer_state_dict(net, opt, options=FULL)
    train(net, opt, rank, seed=2)
    return {"whole": whole, "after": params(net)}


def load_on_rank(rank: int, world_size: int, folder: str) -> dict:
    net, opt = build("sharded")  # fresh: other values, no state yet
    model_state, optim_state = get_state_dict(net, opt)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    set_state_dict(net, opt, model_state_dict=model_state, optim_state_dict=optim_state)
    whole = get_optimizer_state_dict(net, opt, options=FULL)
    train(net, opt, rank, seed=2)
    return {"whole": whole, "after": params(net)}


@pytest.mark.across_ranks
def test_dcp_through_the_api_resumes_at_any_world_size(tmp_path) -> None:
    folder = str(tmp_path / "checkpoint")
    saved = run_ranks(2, save_on_rank, folder)
    resumed = run_ranks(2, load_on_rank, folder)
    for before, after in zip(saved, resumed):
        assert same(after["whole"], before["whole"])  # the whole state came back
        assert same(after["after"], before["after"])  # and continues bit for bit
    for r in run_ranks(3, load_on_rank, folder):  # 2 -> 3 ranks: resharded
        assert same(r["whole"], saved[0]["whole"])
    assert os.path.isdir(folder)


def reduce_scatter_on_rank(rank: int, world_size: int, folder: str) -> dict:
    """The API with reduce-scattered gradients, after a consolidation, into a fresh optimizer
    (whose empty state the API makes exist with a step of its own, on zero gradients)."""
    net, opt = build("sharded")
    opt.reduce_scatter_gradients(net)
    reference, torch_opt = build("torch")
    for model, optimizer in ((net, opt), (reference, torch_opt)):
        train(model, optimizer, rank, seed=1)
    opt.consolidate_state_dict()  # (rank 0's next state_dict() would be the whole state)
    out = {
        "full_equal": same(
            get_optimizer_state_dict(net, opt, options=FULL),
            get_optimizer_state_dict(reference, torch_opt, options=FULL),
        )
    }
    opt.zero_grad()
    model_state, optim_state = get_state_dict(net, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    fresh, fresh_opt = build("sharded")
    fresh_opt.reduce_scatter_gradients(fresh)
    model_state, optim_state = get_state_dict(fresh, fresh_opt)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    set_state_dict(fresh, fresh_opt, model_state_dict=model_state, optim_state_dict=optim_state)
    for model, optimizer in ((net, opt), (fresh, fresh_opt)):
        train(model, optimizer, rank, seed=2)
    out["resumed_equal"] = same(params(fresh), params(net))
    return out


@pytest.mark.across_ranks
def test_the_api_with_reduce_scattered_gradients_and_after_a_consolidation(tmp_path) -> None:
    for r in run_ranks(2, reduce_scatter_on_rank, str(tmp_path / "checkpoint")):
        assert r == {"full_equal": True, "resumed_equal": True}
