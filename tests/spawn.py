"""Run a function on several gloo ranks in fresh processes and collect what each returns.

Each rank is a spawned process with one thread, joined to a gloo group through a file store
in a temporary directory. A rank that raises makes ``run_ranks`` raise with its traceback; a
run that outlives ``timeout`` is killed and reported, so a hang fails the test instead of
stalling the suite.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sharded_rmsprop.distributed import destroy_distributed


def _rank_main(rank: int, fn: Callable[..., Any], world_size: int, workdir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world_size
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(workdir, f"result{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        destroy_distributed()


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 240) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each on its own rank.

    ``fn`` must be a module-level function (it is pickled by name into the children) and
    return something ``torch.save`` can store.
    """
    with tempfile.TemporaryDirectory() as workdir:
        context = mp.start_processes(
            _rank_main,
            args=(fn, world_size, workdir, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks ran past {timeout} s")
        return [
            torch.load(os.path.join(workdir, f"result{rank}.pt"), weights_only=False)
            for rank in range(world_size)
        ]
