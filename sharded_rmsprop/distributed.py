"""Start torch.distributed from whatever launched this process: torchrun, MPI, Slurm or nothing.

:func:`init_distributed` reads the launcher's variables once, at the call, and:

- **torchrun** (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): its store, with
  the keys of each restart kept apart (see :func:`_torchrun_store`);
- **MPI** (Open MPI's ``OMPI_COMM_WORLD_*``, MPICH/Hydra's and Intel MPI's ``PMI_*``,
  PMIx's ``PMIX_RANK``): through mpi4py, rank 0 picks its address and a free port and
  broadcasts both; the local rank comes from a node-local communicator;
- **Slurm** (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``):
  the first node of the job is the master, the port derives from the job id
  (``MASTER_ADDR`` / ``MASTER_PORT`` override both);
- **nothing**: a world of one process on a free local port, so that the same code (DDP
  included) runs unchanged.

It picks NCCL when CUDA is available and gloo otherwise, and binds each rank to the GPU of its
local rank. :func:`destroy_distributed` (or the :func:`distributed` context manager) tears it
down. :func:`node_local_group` gives the ranks of this rank's node, for hybrid sharding.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Mapping, MutableMapping

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "LaunchInfo",
    "check_not_launched_as_several",
    "destroy_distributed",
    "detect_launch",
    "distributed",
    "drain_at_exit",
    "finish_before_teardown",
    "node_local_group",
    "init_distributed",
]

_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher's variables say; ``None`` where only the launch itself can tell."""

    launcher: str  # "torchrun", "mpi", "slurm" or "none"
    rank: int
    world_size: int
    local_rank: int | None
    master_addr: str | None
    master_port: int | None


@dataclass(frozen=True)
class DistributedContext:
    """The process group that :func:`init_distributed` started, and this process's place in it."""

    launcher: str
    backend: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``"gpu[007-010,12],cpu1"`` gives ``"gpu007"``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_port(env: Mapping[str, str]) -> int:
    """A port every task of the job derives alike: 15000 + the job id modulo 20000."""
    if "MASTER_PORT" in env:
        return _int(env, "MASTER_PORT")
    return 15000 + _int(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else 29500


def detect_launch(env: Mapping[str, str]) -> LaunchInfo:
    """Which launcher started this process, read from its environment variables ``env``."""
    if all(name in env for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return LaunchInfo(
            launcher="torchrun",
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env["MASTER_ADDR"],
            master_port=_int(env, "MASTER_PORT"),
        )
    mpi_size = next((name for name in _MPI_SIZE_VARS if name in env), None)
    if mpi_size is not None:
        mpi_rank = next((name for name in _MPI_RANK_VARS if name in env), None)
        return LaunchInfo(
            launcher="mpi",
            rank=_int(env, mpi_rank) if mpi_rank else 0,
            world_size=_int(env, mpi_size),
            local_rank=None,
            master_addr=None,
            master_port=None,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost"
        return LaunchInfo(
            launcher="slurm",
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=_slurm_port(env),
        )
    return LaunchInfo(
        "none", rank=0, world_size=1, local_rank=0, master_addr=None, master_port=None
    )


#: Variables by which launchers tell a process how many ranks they started: torchrun's (and
#: accelerate's, Lightning's), MPI's, and the task count of a Slurm job step (``srun``; not
#: ``SLURM_NTASKS``, which a batch script's single process also sees).
_LAUNCHED_SIZE_VARS = ("WORLD_SIZE", *_MPI_SIZE_VARS, "SLURM_STEP_NUM_TASKS")


def check_not_launched_as_several(env: Mapping[str, str] | None = None) -> None:
    """Raise if ``env`` (``os.environ`` by default) says this process is one of several ranks:
    called when an optimizer finds no process group, it would otherwise keep the whole state on
    every rank, unsharded, with nothing to show for it."""
    env = os.environ if env is None else env
    for name in _LAUNCHED_SIZE_VARS:
        try:
            ranks = int(env.get(name, "1"))
        except ValueError:
            continue
        if ranks > 1:
            raise RuntimeError(
                f"ShardedRMSprop was built while torch.distributed is not initialized, but "
                f"{name}={ranks} says this process is one of {ranks} ranks: every rank would "
                "keep the whole optimizer state, unsharded. Initialize the process group first "
                "(torch.distributed.init_process_group() or sharded_rmsprop.init_distributed(); "
                "with HF Trainer, build the TrainingArguments, which initialize it, before the "
                "optimizer; with accelerate, the Accelerator), then build the optimizer. A "
                f"process meant to run alone (one a rank started, say) must not inherit {name}: "
                "remove it from its environment"
            )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


#: Open MPI's library, by the name of its ABI (``libmpi.so.40`` since Open MPI 3.0, 5.x too).
_OPEN_MPI_LIBRARY = "libmpi.so.40"


def _point_mpi4py_at_open_mpi(environ: MutableMapping[str, str] | None = None) -> bool:
    """Under Open MPI's ``mpirun``, make mpi4py load Open MPI's library; returns whether it did.

    mpi4py's binary wheels (4.1 and later) carry one extension for MPICH's ABI and one for
    Open MPI's, and load the first ``libmpi`` they find, the environment's own first: with the
    ``mpich`` wheel beside them (``pip install ".[mpi]"``), that is MPICH's, whatever launched
    the process. Under Open MPI's ``mpirun``, MPICH's ``MPI_Init`` then aborts the process
    ("Runtime environment uses unsupported PMI version PMIx"), before Python can say why.
    Where the process's own variables (``environ``, ``os.environ`` by default: the ones the MPI
    library reads) say Open MPI started it, and neither ``MPI4PY_LIBMPI`` nor ``MPI4PY_MPIABI``
    chooses already, ``MPI4PY_LIBMPI`` names Open MPI's library: the environment's own, else the
    one the system's loader finds. mpi4py builds made against one MPI (from source, conda) do
    not read the variable. Nothing changes once ``mpi4py.MPI`` is imported.
    """
    environ = os.environ if environ is None else environ
    if (
        "OMPI_COMM_WORLD_SIZE" not in environ
        or "MPI4PY_LIBMPI" in environ
        or "MPI4PY_MPIABI" in environ
        or "mpi4py.MPI" in sys.modules
    ):
        return False
    environ["MPI4PY_LIBMPI"] = os.pathsep.join(
        (os.path.join(sys.prefix, "lib", _OPEN_MPI_LIBRARY), _OPEN_MPI_LIBRARY)
    )
    return True


def _rendezvous_over_mpi(info: LaunchInfo) -> tuple[LaunchInfo, str]:
    """Rank 0 chooses the address and port and tells the others; returns the init method."""
    _point_mpi4py_at_open_mpi()
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            "this process was launched by MPI but mpi4py is not installed; install it with "
            "`pip install mpi4py` (and `pip install mpich` if the machine has no MPI)"
        ) from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size:
        raise RuntimeError(
            f"MPI reports {comm.Get_size()} processes but the environment said "
            f"{info.world_size}; was mpi4py built against a different MPI than mpirun's?"
        )
    hosts = comm.allgather(socket.gethostname())
    if comm.Get_rank() == 0:
        addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(hosts[0])
        chosen = (addr, _free_port())
    else:
        chosen = None
    addr, port = comm.bcast(chosen, root=0)
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    info = LaunchInfo("mpi", comm.Get_rank(), comm.Get_size(), local_rank, addr, port)
    return info, f"tcp://{addr}:{port}"


def _torchrun_store(info: LaunchInfo, env: Mapping[str, str], timeout: timedelta) -> dist.Store:
    """torchrun's store, under a key prefix of its own for each restart of the job.

    Under ``--max-restarts`` torchrun keeps its store and ``MASTER_PORT`` across restarts,
    and ``env://`` reuses the keys of the failed attempt: a restarted rank can read a dead
    peer's address and fail to connect (torch 2.13, gloo). A prefix per attempt
    (``TORCHELASTIC_RESTART_COUNT``) keeps every attempt's keys apart.
    """
    agent_serves = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        info.master_addr,
        info.master_port,
        info.world_size,
        is_master=not agent_serves and info.rank == 0,
        timeout=timeout,
        multi_tenant=True,
    )
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"sharded_rmsprop/attempt_{attempt}", store)


def init_distributed(
    backend: str | None = None,
    *,
    timeout: timedelta = timedelta(minutes=5),
    env: Mapping[str, str] | None = None,
) -> DistributedContext:
    """Initialise the default process group from the launcher's variables (see module doc).

    Args:
        backend: ``"nccl"``, ``"gloo"`` or any backend string torch accepts; by default NCCL
            when CUDA is available, else gloo.
        timeout: how long to wait for the other ranks (rendezvous included) before giving up
            with an error instead of hanging.
        env: the variables to read; ``os.environ`` by default.

    .. warning::
        Collective: every process of the job must call it.
    """
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized")
    env = os.environ if env is None else env
    info = detect_launch(env)
    if info.launcher == "mpi":
        info, init_method = _rendezvous_over_mpi(info)
    elif info.launcher == "torchrun":
        init_method = f"tcp://{info.master_addr}:{info.master_port} (torchrun's store)"
    elif info.launcher == "slurm":
        init_method = f"tcp://{info.master_addr}:{info.master_port}"
    else:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} is outside a world of size {info.world_size}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = info.local_rank or 0
    device = torch.device("cpu")
    if "nccl" in backend:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    try:
        if info.launcher == "torchrun":
            rendezvous = dict(store=_torchrun_store(info, env, timeout))
        else:
            rendezvous = dict(init_method=init_method)
        dist.init_process_group(
            backend, rank=info.rank, world_size=info.world_size, timeout=timeout, **rendezvous
        )
    except (RuntimeError, TimeoutError, OSError) as error:  # DistStoreError is a RuntimeError
        raise RuntimeError(
            f"could not start torch.distributed ({info.launcher} launch, rank {info.rank} of "
            f"{info.world_size}, rendezvous {init_method}, timeout {timeout}): {error}"
        ) from error
    return DistributedContext(
        info.launcher, backend, info.rank, info.world_size, local_rank, device
    )


#: How long :func:`destroy_distributed` lets gloo's worker threads finish (see there).
_GLOO_DRAIN_S = 0.1


def destroy_distributed() -> None:
    """Tear the default process group down, if there is one.

    After a collective, a gloo worker thread releases the tensors it used, which needs the
    GIL. A rank that exits right after its last collective can start finalizing Python
    first; the thread is then killed inside a destructor and the process aborts with
    "terminate called without an active exception" (seen in about 1 run in 11 of a 2-rank
    job on torch 2.13 CPU). A short sleep, with the GIL released, lets those threads finish.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(_GLOO_DRAIN_S)


_drains_at_exit = False
#: Whether :func:`_drain` has run (read by the tests of the exit).
_drained = False


def drain_at_exit() -> None:
    """Make this process let gloo finish before the interpreter exits (called when a
    collective object of the package is made). After a job's last collectives, gloo's worker
    threads still release the tensors they used; a process that starts finalizing Python
    meanwhile aborts (see :func:`destroy_distributed`), and torchrun reports the job failed
    after training went well, however the user tore down (``dist.destroy_process_group()``,
    or not at all). The ``atexit`` handler :func:`_drain` waits for any parameter sync still in
    flight and then gives gloo's threads the time to finish. It tears nothing down.

    The handler is registered when this module is imported, before the user's own exit
    handlers, so it runs after them (``atexit`` runs the last registered first), just before
    Python finalizes. NCCL groups are left to torch: no abort is known there, and a wait at
    exit could block on a peer that failed."""
    global _drains_at_exit
    _drains_at_exit = True


#: What must land before the process exits: the package's collectives in flight (registered
#: by the modules that start them, :func:`finish_before_teardown`).
_BEFORE_TEARDOWN: list[Callable[[], None]] = []


def finish_before_teardown(finish: Callable[[], None]) -> None:
    """Have the exit handler of :func:`drain_at_exit` call ``finish`` first."""
    if finish not in _BEFORE_TEARDOWN:
        _BEFORE_TEARDOWN.append(finish)


def _drain() -> None:
    global _drained
    if not _drains_at_exit:
        return
    group_up = dist.is_available() and dist.is_initialized()
    if group_up and "gloo" not in str(dist.get_backend()).lower():
        return
    try:
        if group_up:
            for finish in _BEFORE_TEARDOWN:
                finish()
    finally:
        time.sleep(_GLOO_DRAIN_S)
        _drained = True


atexit.register(_drain)  # (at import: see drain_at_exit)


@contextmanager
def distributed(backend: str | None = None, **kwargs) -> Iterator[DistributedContext]:
    """``with distributed() as ctx:`` initialises as :func:`init_distributed` and always tears
    down."""
    context = init_distributed(backend, **kwargs)
    try:
        yield context
    finally:
        destroy_distributed()


def node_local_group(ranks_per_node: int | None = None) -> dist.ProcessGroup:
    """The ranks of this rank's node, as a process group: for hybrid sharding.

    ``ShardedRMSprop(params, process_group=node_local_group())`` shards the optimizer state
    among the ranks of each node and keeps one copy of it per node, while DDP (on the
    default group) averages the gradients over every node: each node's ranks then update
    alike, and the parameter sync stays within the node, on its fast links.

    Nodes are told apart by host name, gathered from every rank, whatever launched them
    (torchrun, mpirun, srun) and however their ranks are numbered. ``ranks_per_node``
    instead takes consecutive blocks of that many ranks (torchrun numbers a node's ranks
    so; a single host can then stand in for several nodes). The groups use the default
    group's backend.

    Collective over the default group: every rank calls it, and each call creates a new
    set of groups (call it once and keep the group).
    """
    if not dist.is_initialized():
        raise RuntimeError("node_local_group() needs torch.distributed to be initialized")
    world_size = dist.get_world_size()
    said: list[tuple[str, str] | None] = [None] * world_size  # (host, ranks_per_node), by rank
    dist.all_gather_object(said, (socket.gethostname(), repr(ranks_per_node)))
    asked = sorted({wanted for _, wanted in said})
    if len(asked) > 1:  # every rank sees it, before any group is made
        raise ValueError(f"the ranks passed different ranks_per_node: {', '.join(asked)}")
    if ranks_per_node is None:
        nodes: dict[str, list[int]] = {}
        for rank, (host, _) in enumerate(said):
            nodes.setdefault(host, []).append(rank)
        blocks = list(nodes.values())
    elif (
        isinstance(ranks_per_node, int)
        and not isinstance(ranks_per_node, bool)
        and ranks_per_node >= 1
        and world_size % ranks_per_node == 0
    ):
        blocks = [
            list(range(first, first + ranks_per_node))
            for first in range(0, world_size, ranks_per_node)
        ]
    else:
        raise ValueError(
            f"ranks_per_node must be a positive integer that divides the world size "
            f"{world_size}, got {ranks_per_node!r}"
        )
    group, _ = dist.new_subgroups_by_enumeration(blocks)
    return group
