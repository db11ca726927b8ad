"""Run a function on several gloo ranks, each a process of its own, and collect what each returns.

Ranks are forked from a warm process (the *zygote*), started once per test session with torch
and the package imported: a fork costs milliseconds where a fresh interpreter spends seconds
importing torch. Each rank is still a new process, forked for this call alone (with this
test's environment, working directory and ``sys.path``), so nothing a test does in its ranks
(module state, a monkeypatch, a destroyed group, a crash) reaches another test; the zygote
itself runs no test code, it only imports the modules that hold the rank functions. Each rank
runs one thread and joins a gloo group through a file store in a temporary directory.

A rank that raises or dies makes ``run_ranks`` stop the others and raise, with the rank's
traceback or signal; a run that outlives ``timeout`` is killed and reported, so a hang fails
the test instead of stalling the suite. What the ranks print is replayed into the calling
test's captured output. ``SHARDED_RMSPROP_TEST_SPAWN=1`` spawns fresh
interpreters instead (the slow way, for comparison).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
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

    ``fn`` must be a module-level function (it is pickled by name into the ranks) and return
    something ``torch.save`` can store.
    """
    with tempfile.TemporaryDirectory() as workdir:
        if os.environ.get("SHARDED_RMSPROP_TEST_SPAWN") == "1":
            _spawned(world_size, fn, workdir, args, timeout)
        else:
            try:
                _forked(world_size, fn, workdir, args, timeout)
            finally:  # what the ranks printed, into this test's captured output
                _replay_output(workdir, world_size)
        return [
            torch.load(os.path.join(workdir, f"result{rank}.pt"), weights_only=False)
            for rank in range(world_size)
        ]


def _spawned(world_size: int, fn: Callable[..., Any], workdir: str, args: tuple, timeout: float) -> None:
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


# -- the zygote ---------------------------------------------------------------------------------

_zygote: tuple[Any, Connection] | None = None


def _forked(world_size: int, fn: Callable[..., Any], workdir: str, args: tuple, timeout: float) -> None:
    """Run the ranks as children of the zygote; raise as ``torch.multiprocessing`` would."""
    global _zygote
    if _zygote is None or not _zygote[0].is_alive():
        context = mp.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(theirs,), daemon=True)
        process.start()
        theirs.close()
        _zygote = (process, ours)
    process, conn = _zygote
    task = pickle.dumps((fn, world_size, workdir, args))
    conn.send((list(sys.path), dict(os.environ), os.getcwd(), task))
    try:
        pids = conn.recv()
        if isinstance(pids, str):  # the zygote could not even read the task
            raise RuntimeError(f"the rank zygote could not start {fn.__name__}:\n{pids}")
        _wait_for_ranks(conn, pids, fn, world_size, workdir, timeout)
    except TimeoutError:  # (an OSError: first)
        process.kill()  # (exits it may still report would read as the next call's): a new one
        _zygote = None
        raise
    except (EOFError, OSError):
        process.kill()
        _zygote = None
        raise RuntimeError(f"the rank zygote died while running {fn.__name__}") from None


def _wait_for_ranks(
    conn: Connection, pids: list[int], fn: Callable[..., Any], world_size: int, workdir: str,
    timeout: float,
) -> None:
    """Collect every rank's exit; on the first failure stop the others, then raise."""
    deadline = time.monotonic() + timeout
    running, failure = set(range(world_size)), None
    while running:
        if not conn.poll(max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                _kill(pids, running)
                _drain_exits(conn, running)
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks ran past {timeout} s")
            continue
        rank, status = conn.recv()
        running.discard(rank)
        if status != 0 and failure is None:
            failure = (rank, status)
            _kill(pids, running)
    if failure is not None:
        rank, status = failure
        error = os.path.join(workdir, f"error{rank}.txt")
        if status > 0 and os.path.exists(error):
            with open(error) as f:
                raise RuntimeError(f"rank {rank} of {fn.__name__} raised:\n\n{f.read()}")
        how = f"signal {signal.Signals(-status).name}" if status < 0 else f"exit code {status}"
        raise RuntimeError(f"process {rank} terminated with {how}")


def _replay_output(workdir: str, world_size: int) -> None:
    for rank in range(world_size):
        path = os.path.join(workdir, f"output{rank}.txt")
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, errors="replace") as f:
                sys.stderr.write(f"--- rank {rank} ---\n{f.read()}")


def _kill(pids: list[int], ranks: set[int]) -> None:
    for rank in ranks:
        try:
            os.kill(pids[rank], signal.SIGKILL)
        except ProcessLookupError:
            pass


def _drain_exits(conn: Connection, running: set[int]) -> None:
    while running and conn.poll(10):
        rank, _ = conn.recv()
        running.discard(rank)
    if running:
        raise TimeoutError(f"ranks {sorted(running)} did not exit when killed")


def _serve(conn: Connection) -> None:
    """The zygote: import once, then fork the ranks of each task and report their exits."""
    torch.set_num_threads(1)
    import sharded_rmsprop  # noqa: F401  (every rank function uses it: import it once here)

    while True:
        try:
            path, environ, cwd, task = conn.recv()
        except EOFError:
            return
        sys.path[:] = path
        try:
            fn, world_size, workdir, args = pickle.loads(task)
        except Exception:
            conn.send(traceback.format_exc())
            continue
        pids = [_fork_rank(rank, fn, world_size, workdir, args, environ, cwd, conn)
                for rank in range(world_size)]
        conn.send(pids)
        for _ in range(world_size):
            pid, status = os.wait()
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            conn.send((pids.index(pid), code))


def _fork_rank(
    rank: int, fn: Callable[..., Any], world_size: int, workdir: str, args: tuple,
    environ: dict[str, str], cwd: str, conn: Connection,
) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        # the zygote's stdout and stderr are those of the test that started it: this rank's
        # own file instead, which run_ranks replays into the calling test's output
        output = os.open(os.path.join(workdir, f"output{rank}.txt"), os.O_WRONLY | os.O_CREAT)
        os.dup2(output, 1)
        os.dup2(output, 2)
        conn.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(environ)
        dist.set_debug_level_from_env()  # (read at import otherwise: TORCH_DISTRIBUTED_DEBUG)
        os.chdir(cwd)
        _rank_main(rank, fn, world_size, workdir, args)
        code = 0
    except BaseException:
        with open(os.path.join(workdir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _finalize_mpi()
        os._exit(code)


def _finalize_mpi() -> None:
    """What a normal exit would do that ``os._exit`` skips: finalize MPI where the rank's
    code started it (Lightning's environment detection does, through mpi4py), or MPICH leaves
    its shared-memory segments in /dev/shm, 1 MiB each, at every such test."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
