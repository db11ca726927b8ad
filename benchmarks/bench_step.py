"""One optimizer step, ShardedRMSprop against its peers: time (update + parameter sync) and memory.

For each world size (one launch of spawned ranks per world size, every contender in the same
processes) and each parameter set, it measures

- the median optimizer step time: gradients already in ``p.grad`` (identical on every rank, as
  DDP leaves them), ranks barriered, then the update plus the parameter sync; a step's time is
  the slowest rank's, the table shows the median over the repeats, after warm-up steps;
- the optimizer's memory per rank (max and min over the ranks, and max / mean).

Contenders, timed in round-robin within each repeat (the first one rotates) so that machine
noise hits all of them alike:

- ``replicated``: ``torch.optim.RMSprop`` as under DDP (every rank updates everything, no
  sync); torch's default implementation for the device (the for-loop on CPU, foreach on CUDA);
- ``zero``: ``ZeroRedundancyOptimizer(RMSprop)``, one broadcast per parameter;
- ``zero-bucket``: the same with ``parameters_as_bucket_view=True`` (one broadcast per rank);
- ``fsdp2``: ``fully_shard`` on the root module and ``torch.optim.RMSprop`` on its sharded
  DTensor parameters; the time is its step plus ``module.unshard()`` (the all-gather and
  copy-out FSDP2 runs before the next forward), not the ``reshard()`` after it;
  ``fsdp2 step only`` is the step alone, from the same iterations;
- ``ours``: ``ShardedRMSprop`` (``fused=None``: the fused kernel where there is one), with its
  defaults: private buffers, the parameter sync a collective, the path that also runs across
  hosts and on GPUs;
- ``ours host_shared``: the same with ``host_shared=True`` (ranks of this host map one copy of
  the parameters; the sync is a barrier);
- ``ours fused=False``: ``ShardedRMSprop`` on the reference update (torch's ops).
- ``ours copy-out`` (only when named with ``--contenders``): ``ours`` plus a copy of every
  parameter out of the flat buffer into memory of its own after each step, the work and the
  memory (counted as the optimizer's) that parameters with their own memory would cost, as
  torch ZeRO's default has them; ShardedRMSprop's parameters instead get a storage of their
  own over their range of the flat buffer, which costs neither (docs/checkpoints.md, "Model files").

For the ShardedRMSprop contenders it also times, inside the same steps, the agreement that
starts each ``step()`` (building the facts and the one host all-reduce of their digests).

Parameter sets (float32): ``wide``: 24 x Linear(1024, 1024); ``many-small``: 400 x
Linear(256, 256); ``gpt2``: GPT-2-shaped, a 50257x384 token embedding, a 1024x384 position
embedding, six pre-LayerNorm blocks (n_embd 384), a final LayerNorm and an untied 50257x384
head (as ``launch/gpt.py``).

Memory counted as the optimizer's: the state tensors (``square_avg``, ``momentum_buffer``,
``grad_avg``; 0-d ``step`` counters left out) of ``opt.state`` (ZeRO: its local optimizer's;
FSDP2: the local shards of the DTensor state); for ShardedRMSprop its state buffers, its
gradient window (16 MiB at most) and its per-parameter step counters. Parameters and gradients are not
counted for anyone: ZeRO's bucket views hold the parameters (no extra memory); FSDP2's
parameters and gradients are sharded too (1/N of them per rank, a saving not shown here).

Run (CPU, gloo, 1 thread per rank; ranks 3 and 4 oversubscribe a 2-core machine)::

    .venv/bin/python benchmarks/bench_step.py                       # world sizes 1-4, all sets
    .venv/bin/python benchmarks/bench_step.py --world-sizes 2 --sets wide --repeats 5
    .venv/bin/python benchmarks/bench_step.py --device cuda         # NCCL, 1 GPU per rank
    .venv/bin/python benchmarks/bench_step.py --render benchmarks/results/step_cpu_gloo.json

The full CPU run takes about 6-7 minutes on 2 cores (15 repeats). It prints markdown tables and
writes ``benchmarks/results/step_<device>_<backend>.md``, the raw numbers as ``.json``
(``benchmarks/model.py`` reads them) and two plots (``_time.png``, ``_memory.png``). With
``--world-sizes``, ``--sets`` or ``--contenders`` narrower than the defaults the files get a
``_partial`` suffix, so a quick run does not overwrite the full one; ``--render`` rewrites the
table and plots of a saved run without measuring.

Noise: other jobs may share the machine; the contenders are interleaved so that it hits them
alike, and only ratios within one run are worth comparing. Even identical optimizers differ:
four ``torch.optim.RMSprop`` instances on copies of ``wide`` in one process measured 77 to
93 ms (allocation placement), so differences under ~20 % between contenders are not findings.

Its parts: ``workloads.py`` (the parameter sets), ``contenders.py`` (the optimizers, each built
there), ``step_timing.py`` (the contenders as this benchmark drives them, and the measurement)
and ``step_report.py`` (the tables, targets and plots).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    Rank,
    device_name,
    measured_or_saved,
    run_ranks,
    saved_config,
)
from step_report import plot, render  # noqa: E402
from step_timing import measure_set  # noqa: E402
from workloads import SETS, describe_set  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

CONTENDERS = (
    "replicated",
    "zero",
    "zero-bucket",
    "fsdp2",
    "ours",
    "ours host_shared",
    "ours fused=False",
)
#: Contenders measured only when named (``--contenders``).
EXTRA_CONTENDERS = ("ours copy-out",)


@dataclass(frozen=True)
class Config:
    world_sizes: tuple[int, ...] = (1, 2, 3, 4)
    sets: tuple[str, ...] = SETS
    contenders: tuple[str, ...] = CONTENDERS
    repeats: int = 15
    warmup: int = 2
    device: str = "cpu"
    lr: float = 1e-3
    alpha: float = 0.99
    momentum: float = 0.9
    centered: bool = True
    timeout_s: float = 1800.0

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    def options(self) -> dict:
        return dict(lr=self.lr, alpha=self.alpha, momentum=self.momentum, centered=self.centered)


def _rank_main(at: Rank, cfg: Config) -> tuple[dict, dict]:
    """Every set at one world size: (results by set, the load average before each set)."""
    results, loads = {}, {}
    for set_name in cfg.sets:
        load = loads[set_name] = os.getloadavg()[0]
        start = time.perf_counter()
        results[set_name] = measure_set(set_name, cfg, at.device)
        if at.rank == 0:
            print(
                f"  world {at.world}, {set_name}: {time.perf_counter() - start:.0f} s "
                f"(load average {load:.1f} before)",
                flush=True,
            )
    return results, loads


def run_world(world: int, cfg: Config) -> tuple[dict, dict]:
    """One launch of ``world`` ranks: (results by set, the load average before each set)."""
    return run_ranks(_rank_main, world, cfg, device=cfg.device, timeout_s=cfg.timeout_s)


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    """The configuration, and the results file to re-render (``--render``) if any."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--world-sizes", type=int, nargs="+", help="default: 1 2 3 4 (CPU), 1..GPUs (CUDA)"
    )
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS + EXTRA_CONTENDERS,
        default=list(CONTENDERS),
    )
    parser.add_argument("--repeats", type=int, default=Config.repeats)
    parser.add_argument("--warmup", type=int, default=Config.warmup)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--momentum", type=float, default=Config.momentum)
    parser.add_argument("--no-centered", dest="centered", action="store_false")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: rewrite the table and plots of a saved run",
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        return saved_config(args.render, Config), args.render
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    worlds = args.world_sizes
    if worlds is None:
        worlds = (
            [1, 2, 3, 4] if args.device == "cpu" else list(range(1, torch.cuda.device_count() + 1))
        )
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        parser.error(f"--world-sizes: only {torch.cuda.device_count()} GPUs here (one per rank)")
    cfg = Config(
        world_sizes=tuple(worlds),
        sets=tuple(args.sets),
        contenders=tuple(args.contenders),
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        momentum=args.momentum,
        centered=args.centered,
    )
    return cfg, None


def measure(cfg: Config) -> tuple[dict, dict]:
    """Every world size of ``cfg``: (results by world size, metadata)."""
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    results, loads = {}, {}
    for world in cfg.world_sizes:
        print(f"world size {world} ...", flush=True)
        results[world], loads[world] = run_world(world, cfg)
    meta = dict(
        device_name=device_name(cfg.device),
        torch=torch.__version__,
        threads="1 thread per rank" if cfg.device == "cpu" else "1 GPU per rank",
        load_before=load_before,
        load_after=os.getloadavg()[0],
        load_per_run={str(w): v for w, v in loads.items()},
        seconds=time.perf_counter() - start,
        sets={s: describe_set(s) for s in cfg.sets},
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    )
    return results, meta


def main(argv: list[str] | None = None) -> None:
    cfg, saved = parse_args(argv)
    gpus = torch.cuda.device_count() if cfg.device == "cuda" else 0
    full = (
        set(cfg.world_sizes)
        >= ({1, 2, 3, 4} if cfg.device == "cpu" else set(range(1, gpus + 1)))
        and set(cfg.sets) == set(SETS)
        and set(cfg.contenders) == set(CONTENDERS)
    )
    stem = RESULTS / f"step_{cfg.device}_{cfg.backend}{'' if full else '_partial'}"
    results, meta, stem = measured_or_saved(cfg, stem, saved, measure)
    table = render(results, cfg, meta)
    print(table)
    stem.with_suffix(".md").write_text(table)
    written = plot(results, cfg, stem)
    print("wrote", stem.with_suffix(".md"), stem.with_suffix(".json"), *written)


if __name__ == "__main__":
    main()
