"""What the benchmarks share: spawning ranks, timing, and describing the machine.

- :func:`run_ranks` spawns ``world`` ranks on this host (gloo on the CPU with one thread
  each, or NCCL with one GPU each), runs a function on every rank in a process group with a
  scratch directory, and returns what rank 0's returned; a rank that raises fails the run, a
  run past its timeout is killed and raises :class:`TimeoutError`.
- :func:`now`, :func:`timed`, :func:`slowest`, :func:`all_gather`, :func:`median_ms` and
  :func:`quartiles_ms`: wall-clock time after the device's queued work, per call or across
  ranks, and the statistics the tables show.
- :func:`cores`, :func:`cpu_name` and :func:`device_name`: the machine, in words.
- :func:`measured_or_saved` and :func:`saved_config`: a run measured and written as ``.json``,
  or one read back from its file, to render again.

The benchmarks run as scripts (``python benchmarks/bench_step.py``), with this folder first on
``sys.path``, and import it as ``harness``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# -- spawning ranks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rank:
    """Where a spawned rank runs: its rank, the world size, its device and a scratch folder
    that every rank of the run shares (removed after the run)."""

    rank: int
    world: int
    device: torch.device
    workdir: str


_RESULT = "result.pt"


def run_ranks(
    body: Callable[..., Any],
    world: int,
    *args: Any,
    device: str = "cpu",
    timeout_s: float = 1800.0,
    tmp_dir: str | None = None,
) -> Any:
    """``body(Rank, *args)`` on ``world`` spawned ranks; what it returned on rank 0.

    ``device`` "cpu": gloo, one thread per rank; "cuda": NCCL, GPU ``rank`` for each rank.
    ``body`` and ``args`` must pickle (a module-level function). The scratch folder is made
    in ``tmp_dir`` (default: the system's)."""
    with tempfile.TemporaryDirectory(dir=tmp_dir) as workdir:
        context = mp.start_processes(
            _rank_main,
            args=(world, device, workdir, body, args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1):  # raises if a rank failed
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"world size {world} ran past {timeout_s} s")
        return torch.load(os.path.join(workdir, _RESULT), weights_only=False)


def _rank_main(
    rank: int, world: int, device: str, workdir: str, body: Callable[..., Any], args: tuple
) -> None:
    if device == "cuda":
        on = torch.device("cuda", rank)
        torch.cuda.set_device(on)
        backend, extra = "nccl", {"device_id": on}
    else:
        torch.set_num_threads(1)
        on = torch.device("cpu")
        backend, extra = "gloo", {}
    store = f"file://{workdir}/store"
    dist.init_process_group(backend, init_method=store, rank=rank, world_size=world, **extra)
    try:
        result = body(Rank(rank, world, on, workdir), *args)
        if rank == 0:
            torch.save(result, os.path.join(workdir, _RESULT))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# -- timing ----------------------------------------------------------------------------------------


def now(device: torch.device | None = None) -> float:
    """``time.perf_counter()`` once ``device`` (CUDA) has finished the work queued on it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(
    fn: Callable[[], Any],
    device: torch.device | None = None,
    *,
    barrier: bool = False,
    calls: int = 1,
) -> float:
    """This rank's seconds per call of ``fn`` (``calls`` calls back to back, the device's
    work included), the ranks barriered first if ``barrier``."""
    if barrier:
        dist.barrier()
    start = now(device)
    for _ in range(calls):
        fn()
    return (now(device) - start) / calls


def slowest(seconds: float) -> float:
    """The largest of every rank's ``seconds``; collective."""
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_gather(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """``[world, *t.shape]`` on the CPU: every rank's ``t`` (sent from ``device``, which the
    backend needs: NCCL's is the GPU). Collective; tensors, not objects."""
    if device is not None:
        t = t.to(device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.stack(out).cpu()


def median_ms(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1e3


def quartiles_ms(seconds: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles of ``seconds``, in ms (one sample: itself twice)."""
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else list(seconds) * 3
    return q[0] * 1e3, q[2] * 1e3


# -- the machine -----------------------------------------------------------------------------------


def cores() -> int | None:
    """This host's logical cores (``os.cpu_count()``)."""
    return os.cpu_count()


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return name


def device_name(device: str = "cpu") -> str:
    """The first GPU's name (``device`` "cuda"), or the CPU's and its cores."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {cores()} cores"


# -- saved runs ------------------------------------------------------------------------------------


def measured_or_saved(
    cfg: Any, stem: Path, saved: Path | None, measure: Callable[[Any], tuple[dict, dict]]
) -> tuple[dict[int, Any], dict, Path]:
    """``(results by world size, meta, stem)`` of a run: ``measure(cfg)``, written to
    ``stem.json`` with ``cfg`` (a dataclass), or, given ``saved``, that file read back (and its
    stem)."""
    if saved is None:
        results, meta = measure(cfg)
        stem.parent.mkdir(exist_ok=True)
        raw = dict(config=asdict(cfg), meta=meta, results={str(w): r for w, r in results.items()})
        stem.with_suffix(".json").write_text(json.dumps(raw, indent=1))
        return results, meta, stem
    raw = json.loads(saved.read_text())
    return {int(w): r for w, r in raw["results"].items()}, raw["meta"], saved.with_suffix("")


ConfigT = TypeVar("ConfigT")


def saved_config(saved: Path, config: type[ConfigT]) -> ConfigT:
    """The configuration (a dataclass ``config``) that a run saved by :func:`measured_or_saved`
    was measured with (its lists as tuples)."""
    raw = json.loads(saved.read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["config"].items()}
    return config(**fields)
