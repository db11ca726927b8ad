"""Hybrid sharding: the state sharded within a node, replicated across nodes, DDP over all.

Four gloo ranks stand in for two nodes of two (``node_local_group(ranks_per_node=2)``).
Every rank feeds DDP different data; the parameters and the state must be bit for bit those
of torch.optim.RMSprop given DDP's averaged gradients, and checkpoints taken from the hybrid
optimizer must resume with the state sharded another way.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sharded_rmsprop import ShardedRMSprop, node_local_group
from spawn import run_ranks

# The reference update (fused=False) is torch's op sequence: results compare bit for bit.
OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)


def train(ddp, opt, reference, ref_opt, rank: int, steps: range) -> None:
    """Steps on data of this rank's own; the reference takes DDP's averaged gradients."""
    for step in steps:
        data = torch.randn(8, 6, generator=torch.Generator().manual_seed(100 * step + rank))
        opt.zero_grad()
        ddp(data).square().mean().backward()
        for p, q in zip(ddp.module.parameters(), reference.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def same_state(ours: dict, theirs: dict) -> bool:
    return sorted(ours["state"]) == sorted(theirs["state"]) and all(
        torch.equal(ours["state"][index][key], value)
        for index, entry in theirs["state"].items()
        for key, value in entry.items()
    )


def hybrid_on_rank(rank: int, world_size: int, path: str) -> dict:
    node = node_local_group(ranks_per_node=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    opt = ShardedRMSprop(model.parameters(), process_group=node, fused=False, **OPTIONS)
    ref_opt = torch.optim.RMSprop(reference.parameters(), **OPTIONS)
    train(ddp, opt, reference, ref_opt, rank, range(4))
    outcome = {
        "node": dist.get_process_group_ranks(node),
        "shards": opt.sharding.data_parallel.world_size,
        "as_torch": same(model, reference),
        "full_state_as_torch": same_state(opt.full_state_dict(to=None), ref_opt.state_dict()),
    }
    dcp.save({"optim": opt}, checkpoint_id=path)
    resumed = {}
    for name in ("dcp, sharded over the world", "torch format, sharded over the world"):
        twin = copy.deepcopy(model)  # the model as it was saved; a new optimizer on it
        twin_opt = ShardedRMSprop(twin.parameters(), fused=False, **OPTIONS)
        if name.startswith("dcp"):
            dcp.load({"optim": twin_opt}, checkpoint_id=path)
        else:
            twin_opt.load_state_dict(opt.full_state_dict(to=None))
        twin_reference = copy.deepcopy(reference)
        twin_ref_opt = torch.optim.RMSprop(twin_reference.parameters(), **OPTIONS)
        twin_ref_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # torch's aliases
        train(
            DistributedDataParallel(twin), twin_opt, twin_reference, twin_ref_opt, rank, range(4, 7)
        )
        resumed[name] = same(twin, twin_reference)
    outcome["resumed_as_torch"] = resumed
    return outcome


def test_hybrid_sharding_is_torchs_rmsprop_and_its_checkpoints_resume_sharded_otherwise(
    tmp_path,
) -> None:
    results = run_ranks(4, hybrid_on_rank, str(tmp_path / "ckpt"))
    for rank, result in enumerate(results):
        assert result["node"] == ([0, 1] if rank < 2 else [2, 3])
        assert result["shards"] == 2
        assert result["as_torch"] and result["full_state_as_torch"], rank
        assert all(result["resumed_as_torch"].values()), (rank, result["resumed_as_torch"])


def bad_nodes_on_rank(rank: int, world_size: int, case: str) -> str:
    asked = {"different": [1, 2], "not a divisor": [3, 3], "zero": [0, 0]}[case][rank]
    try:
        node_local_group(ranks_per_node=asked)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize(
    "case, message",
    [
        ("different", "the ranks passed different ranks_per_node: 1, 2"),
        ("not a divisor", "divides the world size 2, got 3"),
        ("zero", "divides the world size 2, got 0"),
    ],
)
def test_bad_ranks_per_node_is_an_error_on_every_rank(case: str, message: str) -> None:
    for result in run_ranks(2, bad_nodes_on_rank, case, timeout=120):
        assert message in result


def default_nodes_on_rank(rank: int, world_size: int) -> list[int]:
    return dist.get_process_group_ranks(node_local_group())


def test_one_host_is_one_node() -> None:
    assert run_ranks(2, default_nodes_on_rank, timeout=120) == [[0, 1], [0, 1]]
