"""What checkpoint checksums cost: DCP save and load of a GPT-2-small-shaped optimizer.

The optimizer of a 124 M-parameter model (fp32, momentum and centered: three state buffers)
at 2 gloo ranks on this machine, one thread each. Each rank times, over ``--repeats`` rounds:

- ``state_dict()``, of which computing the checksums of its owned buffers;
- ``dcp.save({"optim": opt})`` into a fresh directory, the state dict included;
- ``dcp.load({"optim": opt}, planner=SafeLoadPlanner())``, of which ``load_state_dict``'s
  checks: the whole validation, of which verifying the checksums of what the rank loads.

It prints a table and writes ``benchmarks/results/checkpoint_cpu.md``::

    .venv/bin/python benchmarks/bench_checkpoint.py [--model gpt2|gpt2-mini|tiny] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import MODELS  # noqa: E402
from harness import Rank, all_gather, run_ranks, timed  # noqa: E402

from sharded_rmsprop import ShardedRMSprop, checkpoint, validation  # noqa: E402
from sharded_rmsprop.checkpoint import SafeLoadPlanner  # noqa: E402
from sharded_rmsprop.checksums import block_checksums  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = (
    "state_dict",
    "state_dict checksums",
    "save",
    "checksums",
    "load",
    "validation",
    "verify checksums",
)
#: Each part, and the phase it is part of.
PARTS = {
    "state_dict checksums": "state_dict",
    "checksums": "save",
    "validation": "load",
    "verify checksums": "load",
}


class Timed:
    """Wraps a function and adds the seconds spent in it to ``totals[name]``."""

    def __init__(self, totals: dict[str, float], name: str, fn) -> None:
        self.totals, self.name, self.fn = totals, name, fn

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.totals[self.name] += time.perf_counter() - start


def rank_main(at: Rank, model: str, repeats: int) -> torch.Tensor:
    """Seconds of every rank, shaped (rank, round, phase)."""
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in MODELS[model].param_shapes()]
    opt = ShardedRMSprop(params, lr=1e-3, momentum=0.9, centered=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    rounds = []
    for round_ in range(repeats):
        totals = dict.fromkeys(PHASES, 0.0)
        # the checksum and validation parts, timed inside the real save and load
        checkpoint.block_checksums = Timed(totals, "checksums", block_checksums)
        checkpoint.validated = Timed(totals, "validation", validation.validated)
        validation.verify_checksums = Timed(totals, "verify checksums", _VERIFY)
        path = os.path.join(at.workdir, f"ckpt{round_}")
        totals["state_dict"] = timed_collectively(opt.state_dict)
        totals["state_dict checksums"], totals["checksums"] = totals["checksums"], 0.0
        totals["save"] = timed_collectively(lambda: dcp.save({"optim": opt}, checkpoint_id=path))
        totals["load"] = timed_collectively(
            lambda: dcp.load({"optim": opt}, checkpoint_id=path, planner=SafeLoadPlanner())
        )
        rounds.append([totals[phase] for phase in PHASES])
        if at.rank == 0:
            shutil.rmtree(path)
    return all_gather(torch.tensor(rounds, dtype=torch.float64))


_VERIFY = validation.verify_checksums


def timed_collectively(fn) -> float:
    """Seconds of ``fn()`` between two barriers."""
    return timed(lambda: (fn(), dist.barrier()), barrier=True)


def measure(model: str, world: int, repeats: int) -> torch.Tensor:
    """Seconds, shaped (rank, round, phase)."""
    return run_ranks(rank_main, world, model, repeats, tmp_dir=os.environ.get("BENCH_TMP"))


def render(seconds: torch.Tensor, model: str, world: int, command: str) -> str:
    numel = sum(torch.Size(s).numel() for s in MODELS[model].param_shapes())
    # each phase on its slowest rank, and its parts on that same rank
    median = {}
    for i, phase in enumerate(PHASES):
        parent = PHASES.index(PARTS.get(phase, phase))
        slowest = seconds[:, :, parent].argmax(dim=0)
        median[phase] = statistics.median(
            seconds[rank, round_, i].item() for round_, rank in enumerate(slowest.tolist())
        )
    state_gb = 3 * numel * 4 / 1e9
    lines = [
        f"# Checkpoint checksums: cost on a {numel / 1e6:.1f} M-parameter optimizer (CPU, gloo)",
        "",
        f"`{command}`: {world} ranks, one thread each, fp32 with momentum and centered "
        f"(3 state buffers, {state_gb:.2f} GB in all), median of {seconds.shape[1]} rounds of "
        "the slowest rank (its parts on that rank). The checksum and validation parts are timed inside the real "
        "`state_dict()`, `dcp.save` and `dcp.load`.",
        "",
        "| phase | seconds | of which | seconds | share |",
        "| --- | ---: | --- | ---: | ---: |",
        f"| `state_dict()` | {median['state_dict']:.3f} | checksums of the owned buffers | "
        f"{median['state_dict checksums']:.3f} | "
        f"{median['state_dict checksums'] / median['state_dict']:.0%} |",
        f"| `dcp.save` (state dict included) | {median['save']:.3f} | checksums | "
        f"{median['checksums']:.3f} | {median['checksums'] / median['save']:.0%} |",
        f"| `dcp.load` (SafeLoadPlanner) | {median['load']:.3f} | all of `load_state_dict`'s checks | "
        f"{median['validation']:.3f} | {median['validation'] / median['load']:.0%} |",
        f"| | | of which verifying checksums | {median['verify checksums']:.3f} | "
        f"{median['verify checksums'] / median['load']:.0%} |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="gpt2")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    seconds = measure(args.model, args.world_size, args.repeats)
    command = "python benchmarks/bench_checkpoint.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = render(seconds, args.model, args.world_size, command.strip())
    print(text)
    if args.model == "gpt2":
        (RESULTS / "checkpoint_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
