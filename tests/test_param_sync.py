"""The public choice of the parameter sync (``param_sync``): each collective is the one called,
and every choice gives torch's RMSprop bit for bit.

The training loop is ``test_buckets.train_on_rank``'s: DDP with data of each rank's own, 4 flat
buffers, private (``host_shared=False``) unless said otherwise.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from spawn import run_ranks
from test_buckets import network, train_on_rank

from sharded_rmsprop import ShardedRMSprop

STEPS, BUCKETS = 6, 4


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("param_sync", ["auto", "all_gather", "broadcast"])
def test_each_param_sync_is_the_collective_called_and_torchs_numbers(
    world_size: int, param_sync: str
) -> None:
    # "auto" on gloo: one broadcast per owning rank (4x gloo's all-gather, bench_sync.py)
    collective = "broadcast" if param_sync == "auto" else param_sync
    per_step = BUCKETS * (world_size if collective == "broadcast" else 1)
    for result in run_ranks(world_size, train_on_rank, False, param_sync):
        assert result["sync_path"] == collective
        assert result["collectives"] == {collective: STEPS * per_step}
        assert result["equal_after_each_step"] == [True] * STEPS
        assert result["state_as_torch"]


def test_host_shared_buffers_sync_by_barrier_whatever_the_param_sync() -> None:
    for result in run_ranks(2, train_on_rank, True, "all_gather"):
        assert result["sync_path"] == "host_shared"
        assert result["collectives"] == {}
        assert result["equal_after_each_step"] == [True] * STEPS


def test_one_process_has_nothing_to_sync() -> None:
    assert not dist.is_initialized()
    assert ShardedRMSprop(network().parameters(), param_sync="broadcast").sync_path == "none"


@pytest.mark.parametrize("bad", ["ring", "ALL_GATHER", None, 3])
def test_an_unknown_param_sync_is_an_error(bad) -> None:
    message = "param_sync must be one of 'auto', 'all_gather', 'broadcast', got "
    with pytest.raises(ValueError, match=message + repr(bad).replace("'", ".")):
        ShardedRMSprop(network().parameters(), param_sync=bad)


def construct_on_rank(rank: int, world_size: int) -> str:
    try:
        ShardedRMSprop(network().parameters(), param_sync=["auto", "broadcast"][rank])
    except RuntimeError as error:
        return str(error)
    return ""


def test_ranks_asking_for_different_syncs_get_one_error_on_every_rank() -> None:
    errors = run_ranks(2, construct_on_rank)
    expected = "param_sync is 'auto' on rank 0 but 'broadcast' on rank 1"
    assert all(expected in error for error in errors), errors
