"""Several flat buffers (``bucket_numel``): each buffer's sync starts while the next buffer is
updated, and ``step()`` returns with every parameter whole, bit for bit torch's RMSprop.

Each rank feeds DDP data of its own; the model below lies in 4 flat buffers.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from spawn import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sharded_rmsprop import ShardedRMSprop

OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)
# The reference update (fused=False): results compare bit for bit with torch.optim.RMSprop.
OURS = dict(OPTIONS, fused=False, bucket_numel=300)


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 4),
    )


@contextlib.contextmanager
def counting_collectives(counts: Counter):
    """Count the broadcasts and all-gathers of torch.distributed called inside."""
    names = [name for name in ("broadcast", "all_gather_single", "all_gather_into_tensor")
             if hasattr(dist, name)]
    originals = {name: getattr(dist, name) for name in names}

    def counted(name):
        def call(*args, **kwargs):
            counts["all_gather" if name.startswith("all_gather") else name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in names:
        setattr(dist, name, counted(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def train_on_rank(
    rank: int, world_size: int, host_shared: bool = False, param_sync: str = "auto"
) -> dict:
    model = network()
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    opt = ShardedRMSprop(
        model.parameters(), host_shared=host_shared, param_sync=param_sync, **OURS
    )
    collectives: Counter = Counter()
    ref_opt = torch.optim.RMSprop(reference.parameters(), **OPTIONS)
    equal_after_each_step = []
    for step in range(6):
        data = torch.randn(5, 8, generator=torch.Generator().manual_seed(100 * step + rank))
        opt.zero_grad()
        ddp(data).square().mean().backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            q.grad = p.grad.clone()
        if step == 3:
            opt.clip_grad_norm_(0.05)
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        with counting_collectives(collectives):
            opt.step()
        ref_opt.step()
        # read right after step(): nothing of the sync may still be under way
        equal_after_each_step.append(
            all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
        )
    full = opt.full_state_dict(to=None)
    return {
        "buckets": len(opt.sharding.buckets),
        "shared": opt.shares_host_memory,
        "sync_path": opt.sync_path,
        "collectives": dict(collectives),
        "equal_after_each_step": equal_after_each_step,
        "pending": len(opt.sharding.sync.pending),
        "state_as_torch": all(
            torch.equal(full["state"][index][key], value)
            for index, entry in ref_opt.state_dict()["state"].items()
            for key, value in entry.items()
        ),
    }


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("host_shared", [False, True], ids=["private", "host_shared"])
def test_several_flat_buffers_are_torchs_rmsprop_bit_for_bit(
    world_size: int, host_shared: bool
) -> None:
    for result in run_ranks(world_size, train_on_rank, host_shared):
        assert result["buckets"] == 4
        assert result["shared"] == host_shared
        assert result["equal_after_each_step"] == [True] * 6
        assert result["pending"] == 0
        assert result["state_as_torch"]


def test_bad_bucket_numel_is_an_error() -> None:
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="bucket_numel must be None or a positive integer"):
            ShardedRMSprop(network().parameters(), bucket_numel=bad)
