"""Launcher detection from each launcher's variables, and the lone-process start."""

from __future__ import annotations

import builtins
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from sharded_rmsprop.distributed import (
    LaunchInfo,
    detect_launch,
    distributed,
    first_slurm_host,
    init_distributed,
)

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
HYDRA = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}  # MPICH and Intel MPI
SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[007-010,12]",
    "SLURM_JOB_ID": "123456",
}


def test_torchrun_variables() -> None:
    assert detect_launch(TORCHRUN) == LaunchInfo("torchrun", 3, 8, 1, "n1", 29400)


@pytest.mark.parametrize("env, rank, size", [(OPEN_MPI, 2, 4), (HYDRA, 1, 2), ({"PMIX_RANK": "0", "PMIX_SIZE": "3"}, 0, 3)])
def test_mpi_variables(env: dict, rank: int, size: int) -> None:
    # address, port and local rank come from the MPI rendezvous, not from the variables
    assert detect_launch(env) == LaunchInfo("mpi", rank, size, None, None, None)


def test_slurm_variables() -> None:
    assert detect_launch(SLURM) == LaunchInfo("slurm", 5, 16, 1, "gpu007", 15000 + 123456 % 20000)


def test_slurm_master_can_be_overridden() -> None:
    env = dict(SLURM, MASTER_ADDR="10.0.0.9", MASTER_PORT="23456")
    assert detect_launch(env) == LaunchInfo("slurm", 5, 16, 1, "10.0.0.9", 23456)


def test_torchrun_inside_slurm_and_mpi_under_slurm_prefer_the_inner_launcher() -> None:
    assert detect_launch({**SLURM, **TORCHRUN}).launcher == "torchrun"
    assert detect_launch({**SLURM, **OPEN_MPI}).launcher == "mpi"


def test_nothing_means_one_process() -> None:
    assert detect_launch({}) == LaunchInfo("none", 0, 1, 0, None, None)


@pytest.mark.parametrize(
    "nodelist, first",
    [("node1", "node1"), ("gpu[007-010,12]", "gpu007"), ("a[3,5],b[1-2]", "a3"), ("x1,y2", "x1"), ("c[09]", "c09")],
)
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first


def test_bad_variables_name_the_variable() -> None:
    with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
        detect_launch(dict(SLURM, SLURM_PROCID="x"))


def test_lone_process_gets_a_world_of_one_and_tears_down() -> None:
    with distributed(env={}) as ctx:
        assert (ctx.launcher, ctx.backend, ctx.rank, ctx.world_size) == ("none", "gloo", 0, 1)
        assert dist.is_initialized() and dist.get_world_size() == 1
    assert not dist.is_initialized()


def test_mpi_launch_without_mpi4py_says_to_install_it(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_mpi4py(name, *args, **kwargs):
        if name.startswith("mpi4py"):
            raise ImportError("No module named 'mpi4py'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "mpi4py", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_mpi4py)
    with pytest.raises(RuntimeError, match="launched by MPI but mpi4py is not installed.*pip install mpi4py"):
        init_distributed(env=OPEN_MPI)
    assert not dist.is_initialized()


def test_unreachable_master_is_an_error_not_a_hang() -> None:
    # rank 1 of 2 waits for a master nobody serves: a bounded wait, then a clear error
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}
    with pytest.raises(RuntimeError, match="could not start torch.distributed \\(slurm launch, rank 1 of 2"):
        init_distributed("gloo", env=env, timeout=timedelta(seconds=3))
    assert not dist.is_initialized()


# -- never silently unsharded ------------------------------------------------------------------


LAUNCHES_OF_SEVERAL = [
    {"WORLD_SIZE": "2"},  # torchrun, accelerate launch
    {"OMPI_COMM_WORLD_SIZE": "4"},  # Open MPI's mpirun
    {"PMI_SIZE": "3"},  # MPICH's
    {"SLURM_STEP_NUM_TASKS": "2"},  # srun -n 2
]


@pytest.mark.parametrize("env", LAUNCHES_OF_SEVERAL)
def test_an_optimizer_built_before_the_group_of_a_multi_rank_launch_is_an_error(
    monkeypatch, env
) -> None:
    """HF Trainer's usual script builds the optimizer before TrainingArguments, which starts
    the process group: it would run unsharded, each rank holding the whole state."""
    from sharded_rmsprop import ShardedRMSprop

    assert not torch.distributed.is_initialized()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    param = torch.nn.Parameter(torch.ones(3))
    ((name, value),) = env.items()
    expected = f"while torch.distributed is not initialized, but {name}={value}"
    with pytest.raises(RuntimeError, match=expected):
        ShardedRMSprop([param])
    assert torch.equal(param, torch.ones(3)) and param.grad is None


@pytest.mark.parametrize(
    "env",
    [{}, {"WORLD_SIZE": "1"}, {"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, {"WORLD_SIZE": "x"}],
)
def test_a_lone_process_builds_an_optimizer_without_a_group(monkeypatch, env) -> None:
    """One process: no launcher, a launcher of one, a Slurm batch script's single process."""
    from sharded_rmsprop import ShardedRMSprop

    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    opt = ShardedRMSprop([torch.nn.Parameter(torch.ones(3))])
    assert opt.sharding.data_parallel.world_size == 1
