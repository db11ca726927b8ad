"""The GPU check's ``train_modes`` part: ShardedRMSprop's sync modes beside DDP + torch's RMSprop.

``bench_training.py``'s contenders (built by ``training_timing.make_contender``, each its own
copy of the model, the same batches), in one process at one rank (NCCL on CUDA; gloo on the
CPU, the rehearsal), for each model:

- ``DDP + torch.optim.RMSprop`` (foreach on CUDA), the yardstick;
- ``blocking sync`` (``ours zero-1``: DDP's all-reduce, the parameter sync inside ``step()``);
- ``overlap_param_sync`` (the sync behind the next forward);
- ``reduce_scatter_gradients`` (DDP's hook reduce-scatters into the shards);
- both together (``ours rs + overlapped sync``);
- ``no DDP + torch.optim.RMSprop``: the bare module, no communication: the compute floor.

Timed as ``bench_training.py`` times them: one iteration phase by phase (forward, backward,
step; the device's queued work waited for at each clock reading), contenders round-robin,
medians over the repeats; then each one's iterations back to back (the throughput: iterations
and tokens per second). The exposed communication of a contender is its forward + backward
beyond the bare module's: at one rank ShardedRMSprop communicates nothing (its collectives
are skipped), so what remains is DDP's reducer (its buckets and its one-rank NCCL
all-reduce) or the reduce-scatter hook's copies; the sync that two ranks would expose is not
there to measure (NCCL cannot run two ranks on one GPU).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import Rank, run_ranks

__all__ = ["BARE", "MODES", "train_modes"]

HERE = Path(__file__).resolve().parent

#: The rows of the table, by the name of their ``training_timing`` contender.
MODES = {
    "DDP + torch.optim.RMSprop": "ddp+rmsprop",
    "blocking sync": "ours zero-1",
    "overlap_param_sync": "ours overlapped sync",
    "reduce_scatter_gradients": "ours reduce-scatter",
    "reduce_scatter_gradients + overlap_param_sync": "ours rs + overlapped sync",
}
BARE = "no DDP + torch.optim.RMSprop (no communication)"
YARDSTICK = "DDP + torch.optim.RMSprop"


def _contenders(model_name: str, cfg: Any, at: Rank) -> dict[str, Any]:
    import contenders
    import training_timing

    running = {
        label: training_timing.make_contender(name, model_name, cfg, at.world, at.device)
        for label, name in MODES.items()
    }
    bare = training_timing.Contender(model_name, ddp=False, device=at.device)
    bare.wrapped, bare.opt = (
        bare.module,
        contenders.rmsprop(bare.module.parameters(), cfg.options()),
    )
    running[BARE] = bare
    return running


def _tokens(batch: tuple[torch.Tensor, ...]) -> int:
    """Tokens (GPT) or rows (the chains of Linears) of one rank's batch."""
    return batch[0].numel() if batch[0].dtype == torch.long else batch[0].shape[0]


def measure(model_name: str, cfg: Any, at: Rank) -> list[dict[str, Any]]:
    """One row per contender on ``model_name``: medians of its phases and its throughput."""
    import training_timing as timing
    from workloads import batch_for

    running = _contenders(model_name, cfg, at)
    labels = list(running)
    step = 0
    for _ in range(cfg.warmup):  # kernels compiled, state allocated
        for label in labels:
            batch = batch_for(model_name, at.rank, step, at.device)
            timing.iteration(running[label], batch, at.device)
        step += 1
    phases: dict[str, list[tuple[float, ...]]] = {label: [] for label in labels}
    losses: dict[str, float] = {}
    for r in range(cfg.repeats):
        batch = batch_for(model_name, at.rank, step, at.device)
        for k in range(len(labels)):  # round-robin, starting one further each repeat
            label = labels[(r + k) % len(labels)]
            *seconds, losses[label] = timing.iteration(running[label], batch, at.device)
            phases[label].append(tuple(seconds))
        step += 1
    tokens = _tokens(batch_for(model_name, at.rank, 0))
    rows = []
    for label in labels:
        per_iteration = timing.back_to_back(
            running[label], model_name, at.rank, step, cfg.repeats, at.device
        )
        forward, backward, stepping = (
            statistics.median(p[j] for p in phases[label]) for j in range(3)
        )
        rows.append(
            {
                "model": model_name,
                "mode": label,
                "forward_ms": round(forward * 1e3, 3),
                "backward_ms": round(backward * 1e3, 3),
                "step_ms": round(stepping * 1e3, 3),
                "iteration_ms": round(per_iteration * 1e3, 3),
                "iterations_per_s": round(1 / per_iteration, 1),
                "tokens_per_s": round(tokens / per_iteration, 1),
                "last_loss": losses[label],
            }
        )
    floor = next(r for r in rows if r["mode"] == BARE)
    ddp = next(r for r in rows if r["mode"] == YARDSTICK)
    for row in rows:
        row["exposed_ms"] = round(
            row["forward_ms"] + row["backward_ms"] - floor["forward_ms"] - floor["backward_ms"], 3
        )
        row["x_ddp_throughput"] = round(ddp["iteration_ms"] / row["iteration_ms"], 3)
    del running
    gc.collect()
    if at.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _on_one_rank(
    at: Rank, out: Any, models: tuple[str, ...], warmup: int, repeats: int, deadline: float
) -> None:
    sys.path.insert(0, str(HERE))  # the benchmarks' own imports (``import training_timing``)
    from bench_training import Config

    cfg = Config(warmup=warmup, repeats=repeats)
    settings = {"device": str(at.device), "world": at.world, "warmup": warmup}
    out["settings"] = settings | {"repeats": repeats, "options": cfg.options()}
    for model_name in models:
        if time.monotonic() > deadline:
            out["cut_short"] = f"stopped before {model_name}: out of time"
            return
        for row in measure(model_name, cfg, at):
            out.append("rows", row)


def train_modes(
    out: Any,
    seconds: float,
    device: str = "cuda",
    models: tuple[str, ...] = ("gpt", "wide"),
    warmup: int = 3,
    repeats: int = 20,
) -> None:
    """Every sync mode beside DDP + torch's RMSprop at one rank on ``device``; ``out`` a
    Recorder. A model is started only with a third of ``seconds`` left."""
    deadline = time.monotonic() + seconds * 2 / 3
    args = (out, models, warmup, repeats, deadline)
    run_ranks(_on_one_rank, 1, *args, device=device, timeout_s=max(seconds - 5, 5))
