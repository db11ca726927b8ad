"""Hooks that do not outlive their optimizer: ``close()``, or dropping the optimizer, gives a
DDP model back DDP's own all-reduce and takes ``overlap_param_sync``'s hooks off a model."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 33), nn.Tanh(), nn.Linear(33, 4))


def backward(ddp: DDP, rank: int, seed: int) -> list[torch.Tensor]:
    """One backward on this rank's own data; the gradients DDP leaves."""
    generator = torch.Generator().manual_seed(seed * 10 + rank)
    for p in ddp.parameters():
        p.grad = None
    ddp(torch.randn(6, 9, generator=generator)).square().mean().backward()
    return [p.grad.clone() for p in ddp.parameters()]


def plain_grads(ddp: DDP, rank: int, seed: int) -> list[torch.Tensor]:
    """What DDP's own all-reduce gives for the same parameters and data."""
    twin = DDP(model())
    with torch.no_grad():
        for mine, theirs in zip(twin.parameters(), ddp.parameters()):
            mine.copy_(theirs)
    return backward(twin, rank, seed)


def close_on_rank(rank: int, world_size: int, how: str) -> dict:
    ddp = DDP(model())
    opt = ShardedRMSprop(ddp.parameters(), lr=1e-2, fused=False)
    opt.reduce_scatter_gradients(ddp)
    backward(ddp, rank, 0)
    opt.step()
    out: dict = {}
    second = ShardedRMSprop(ddp.parameters(), lr=1e-2, fused=False)
    try:  # while the first one is attached
        second.reduce_scatter_gradients(ddp)
    except ValueError as error:
        out["refused"] = str(error)
    if how == "close":
        try:  # p.grad holds reduce-scattered gradients, which a backward would add to
            opt.close()
        except RuntimeError as error:
            out["held"] = str(error)
        opt.zero_grad()
        opt.close()
        opt.close()  # idempotent
        backward(ddp, rank, 1)
        opt.step()  # it keeps working, on all-reduced gradients
    else:
        opt.zero_grad()
        if rank == 1:  # freed on rank 0 at once, on rank 1 only by a collection
            gc.disable()
            cycle: list = [opt]
            cycle.append(cycle)
        del opt
    grads = backward(ddp, rank, 2)  # the ranks agree: all-reduce on every rank
    gc.enable()
    out["plain_after"] = all(torch.equal(g, h) for g, h in zip(grads, plain_grads(ddp, rank, 2)))
    # another optimizer attaches to the same model and trains as torch.optim.RMSprop would
    second.reduce_scatter_gradients(ddp)
    reference = [p.detach().clone() for p in ddp.parameters()]
    torch_opt = torch.optim.RMSprop(reference, lr=1e-2)
    plain = plain_grads(ddp, rank, 3)
    backward(ddp, rank, 3)
    second.step()
    for p, g in zip(reference, plain):
        p.grad = g
    torch_opt.step()
    out["second_trains"] = all(torch.equal(p, q) for p, q in zip(ddp.parameters(), reference))
    return out


@pytest.mark.across_ranks
@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_closed_or_dropped_optimizer_gives_ddp_its_all_reduce_back(how) -> None:
    for r in run_ranks(2, close_on_rank, how):
        assert "for another ShardedRMSprop already: call its close() first" in r["refused"]
        if how == "close":
            assert "call step() and zero_grad() first" in r["held"]
        assert r["plain_after"]
        assert r["second_trains"]


def overlap_on_rank(rank: int, world_size: int) -> dict:
    net = model()
    ddp = DDP(net)
    opt = ShardedRMSprop(ddp.parameters(), lr=1e-2, fused=False)
    opt.overlap_param_sync(net)
    hooked = sum(len(m._forward_pre_hooks) for m in net.modules())
    backward(ddp, rank, 0)
    opt.step()
    opt.close()
    left = sum(len(m._forward_pre_hooks) for m in net.modules())
    backward(ddp, rank, 1)
    opt.step()  # blocking again: the parameters are whole on return
    whole = all(torch.isfinite(p).all().item() for p in net.parameters())
    dropped = ShardedRMSprop(ddp.parameters(), lr=1e-2, fused=False)
    dropped.overlap_param_sync(net)
    del dropped
    gc.collect()
    return {
        "hooked": hooked,
        "left": left,
        "whole": whole,
        "left_after_drop": sum(len(m._forward_pre_hooks) for m in net.modules()),
    }


@pytest.mark.across_ranks
def test_close_takes_the_overlap_hooks_off() -> None:
    for r in run_ranks(2, overlap_on_rank):
        assert r["hooked"] > 0
        assert r["left"] == 0 and r["left_after_drop"] == 0
        assert r["whole"]
