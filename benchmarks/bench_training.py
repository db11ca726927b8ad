"""Whole training iterations, ShardedRMSprop against its peers: forward, backward and step.

For each world size (one launch of spawned ranks per world size, every contender in the same
processes) and each model, every contender trains its own copy of the model (the same initial
weights) on the same data: each rank gets different data, seeded by its rank and the
iteration, and every contender sees the same batches. One iteration is timed in three phases,
the ranks barriered before each one (so that a rank's lateness in one phase is not charged to
the next) and each phase's time the slowest rank's:

- (a) ``forward+backward+step``: the sum of the three phases;
- (b) ``backward+step``: the backward (gradient reduction included, as each contender does
  it) plus the step;
- (c) ``step``: the optimizer step alone (update and parameter sync; DeepSpeed:
  ``engine.step()``).

The barriers themselves are not counted; they run on a process group of their own, so that
they never wait for collectives a contender left running on the default group (an
overlapped parameter sync must be charged to the forward that waits for it). The tables show
medians over the repeats after warm-up iterations, with quartiles; contenders run
round-robin within each repeat, the first one rotating from repeat to repeat, so that machine
noise hits them alike. Gradients are reset outside the timed phases
(``zero_grad(set_to_none=True)``; DeepSpeed resets its own in ``engine.step()``).

Contenders (torch.optim.RMSprop's options everywhere: lr 1e-3, alpha 0.99, eps 1e-8,
momentum 0, centered False, weight decay 0; fp32; DDP with its defaults, 25 MiB buckets,
``gradient_as_bucket_view=False``):

1. ``ddp+rmsprop``: DDP and a replicated ``torch.optim.RMSprop`` (torch's CPU default, the
   for-loop implementation);
2. ``ours zero-1``: DDP (all-reduce) and ``ShardedRMSprop`` (defaults: private buffers,
   ``fused=None``; ``bucket_numel`` DDP's bucket size in elements, for every ShardedRMSprop
   contender: see ``BUCKET_NUMEL``);
3. ``ours reduce-scatter``: the same with ``opt.reduce_scatter_gradients(ddp)``: DDP's
   communication hook reduce-scatters the gradients into the optimizer's shards;
4. ``ours rs + overlapped sync``: contender 3 with ``opt.overlap_param_sync(ddp)``: the step
   returns once each bucket's parameter sync has started, and the next forward waits for each
   bucket when a module that holds its parameters starts (so the sync's time is counted in
   the next forward, and only where the forward did not hide it);
5. ``ours rs via grad hooks (prototype)``: the other design: DDP's all-reduce made a no-op
   (a comm hook returning the bucket as it is), a ``register_post_accumulate_grad_hook`` on
   every parameter that copies ``grad / world`` into a staging buffer laid out like the
   optimizer's bucket and, once a bucket is complete, starts its reduce-scatter
   (``opt.sharding.data_parallel.reduce_scatter``); after ``loss.backward()`` (counted in
   the backward) it waits for them and writes each owned range into ``p.grad``; then
   ``opt.step()``. Prototyped here; at the end its parameters are compared with contender 3's;
6. ``torch zero``: DDP and ``ZeroRedundancyOptimizer(RMSprop, parameters_as_bucket_view=True)``;
7. ``fairscale oss``: DDP and ``fairscale.optim.oss.OSS(optim=RMSprop)`` (its defaults);
8. ``deepspeed zero-1``, 9. ``deepspeed zero-2``: ``deepspeed.initialize`` with a client
   ``torch.optim.RMSprop``, fp32, ``zero_optimization.stage`` 1 or 2 (DeepSpeed's defaults
   otherwise: 5e8-element buckets, ``overlap_comm`` off, ``contiguous_gradients`` on),
   ``gradient_clipping`` 0, ``zero_allow_untested_optimizer``, ``DS_ACCELERATOR=cpu``, on the
   same gloo process group.

Peers 7-9 run only where ``fairscale`` / ``deepspeed`` import; elsewhere they are skipped and
marked "not installed" (the project's venv has neither: they are not its dependencies).

Models (float32):

- ``gpt``: ``launch/gpt.py``'s GPT, vocab 96, block_size 64, 4 layers, 4 heads, n_embd 256
  (3.2 M parameters), 16 sequences of 64 tokens per rank, its own cross-entropy loss;
- ``wide`` (24 x Linear(1024, 1024)) and ``many-small`` (400 x Linear(256, 256)), the
  parameter sets of ``bench_step.py``: a batch of 8 x in_features through the Linears in
  sequence, each as ``x + tanh(linear(x))``, loss ``.square().mean()``. (A plain chain of
  Linears diverges under RMSprop at lr 1e-3: the loss reached 1e32 by the fourth iteration,
  where DeepSpeed then skips its steps as overflows, and ``many-small``'s gradients vanished
  to zero in two thirds of its elements. With residual tanh every loss and gradient stays
  finite and nonzero; each contender's losses are checked and reported.) Denormals are
  flushed to zero on every rank (``torch.set_flush_denormal``).

Run (CPU, gloo, 1 thread per rank; 4 ranks oversubscribe a 2-core machine). The peers live in
a separate venv (``python3 -m venv /work/peers-venv``, then ``pip install torch==2.13.0
deepspeed fairscale matplotlib`` and ``pip install -e .`` in it)::

    DS_ACCELERATOR=cpu /work/peers-venv/bin/python benchmarks/bench_training.py   # all peers
    .venv/bin/python benchmarks/bench_training.py          # the project venv: peers 6-8 skipped
    .venv/bin/python benchmarks/bench_training.py --world-sizes 2 --models gpt --repeats 3
    .venv/bin/python benchmarks/bench_training.py --render benchmarks/results/training_cpu_gloo.json

It prints markdown tables and the issue's goals (at 2 ranks) and writes
``benchmarks/results/training_cpu_gloo.md``, the raw numbers as ``.json`` and a plot
(``.png``). A run narrower than the defaults (world sizes, models, contenders) gets a
``_partial`` suffix so that it does not overwrite the full one.

Noise: other jobs may share the machine; only ratios within one run are worth comparing, and
differences under ~20 % between contenders are not findings (see ``bench_step.py``).

Its parts: ``workloads.py`` (the models and their data), ``contenders.py`` (the optimizers,
each built there), ``training_timing.py`` (the contenders as this benchmark drives them, and
the measurement) and ``training_report.py`` (the tables, goals and plot).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contenders import NEEDS, available, peer_versions  # noqa: E402
from harness import (  # noqa: E402
    Rank,
    cores,
    cpu_name,
    measured_or_saved,
    run_ranks,
    saved_config,
)
from training_report import goals, plot, render  # noqa: E402
from training_timing import LEFT_OUT_ABOVE_2_RANKS, measure_model  # noqa: E402
from workloads import MODELS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

CONTENDERS = (
    "ddp+rmsprop",
    "ours zero-1",
    "ours reduce-scatter",
    "ours rs + overlapped sync",
    "ours rs via grad hooks (prototype)",
    "torch zero",
    "fairscale oss",
    "deepspeed zero-1",
    "deepspeed zero-2",
)


@dataclass(frozen=True)
class Config:
    world_sizes: tuple[int, ...] = (2, 4)
    models: tuple[str, ...] = MODELS
    contenders: tuple[str, ...] = CONTENDERS
    repeats: int = 9
    warmup: int = 2
    lr: float = 1e-3
    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False
    timeout_s: float = 3600.0

    def options(self) -> dict:
        return dict(
            lr=self.lr,
            alpha=self.alpha,
            eps=self.eps,
            momentum=self.momentum,
            centered=self.centered,
        )


def _rank_main(at: Rank, cfg: Config) -> dict:
    torch.set_flush_denormal(True)
    versions = peer_versions()
    names = [
        n
        for n in cfg.contenders
        if available(n, versions) and not (at.world > 2 and n in LEFT_OUT_ABOVE_2_RANKS)
    ]
    out = {"models": {}, "load": {}, "seconds": {}}
    for model_name in cfg.models:
        out["load"][model_name] = os.getloadavg()[0]
        start = time.perf_counter()
        out["models"][model_name] = measure_model(model_name, cfg, at, names)
        out["seconds"][model_name] = time.perf_counter() - start
        if at.rank == 0:
            print(
                f"  world {at.world}, {model_name}: {out['seconds'][model_name]:.0f} s "
                f"(load average {out['load'][model_name]:.1f} before)",
                flush=True,
            )
    return out


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(Config.world_sizes))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--repeats", type=int, default=Config.repeats)
    parser.add_argument("--warmup", type=int, default=Config.warmup)
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="measure nothing: rewrite a saved run's files"
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        return saved_config(args.render, Config), args.render
    if min(args.world_sizes) < 2:
        parser.error("--world-sizes: at least 2 (the contenders are distributed)")
    cfg = Config(
        world_sizes=tuple(args.world_sizes),
        models=tuple(args.models),
        contenders=tuple(args.contenders),
        repeats=args.repeats,
        warmup=args.warmup,
    )
    return cfg, None


def measure(cfg: Config) -> tuple[dict, dict]:
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    versions = peer_versions()
    for name in cfg.contenders:
        if not available(name, versions):
            print(f"skipping {name}: {NEEDS[name]} not installed in {sys.prefix}", flush=True)
    results, loads = {}, {}
    for world in cfg.world_sizes:
        print(f"world size {world} ...", flush=True)
        out = run_ranks(_rank_main, world, cfg, device="cpu", timeout_s=cfg.timeout_s)
        results[world] = out["models"]
        loads[str(world)] = out["load"]
    meta = dict(
        command=" ".join(
            ["DS_ACCELERATOR=cpu" if versions["deepspeed"] != "not installed" else ""]
            + [sys.executable, "benchmarks/bench_training.py", *sys.argv[1:]]
        ).strip(),
        cpu=cpu_name(),
        cores=cores(),
        torch=torch.__version__,
        peers=versions,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        load=loads,
        seconds=time.perf_counter() - start,
    )
    return results, meta


def main(argv: list[str] | None = None) -> None:
    cfg, saved = parse_args(argv)
    full = (
        set(cfg.world_sizes) >= {2, 4}
        and set(cfg.models) == set(MODELS)
        and set(cfg.contenders) == set(CONTENDERS)
    )
    stem = RESULTS / f"training_cpu_gloo{'' if full else '_partial'}"
    results, meta, stem = measured_or_saved(cfg, stem, saved, measure)
    table = render(results, cfg, meta)
    print(table)
    for model_name, what, a, b, _, verdict in goals(results):
        print(f"goal, {model_name}: {what}: ours {a:.1f} ms vs {b:.1f} ms -> {verdict}")
    stem.with_suffix(".md").write_text(table)
    plot(results, cfg, stem.with_suffix(".png"))
    print("wrote", stem.with_suffix(".md"), stem.with_suffix(".json"), stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
