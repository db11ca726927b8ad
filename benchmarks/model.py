"""A bandwidth/latency model of one ShardedRMSprop step, checked here and extrapolated to H100s.

For ``N`` ranks, ``P`` (padded) parameters in one flat buffer, ``S = P / N`` per rank and ``n``
parameter tensors, one step (``fused=None``, momentum and centered on, float32) is modelled as

    T = f(N) * (h_step + n * h_param)           host work: Python loops over the parameters
      + 8 * S / B_copy(N)                        gather: copy the owned gradient slices
      + 36 * S / B_update(N)                     fused update: 5 arrays read, 4 written
      + [N > 1] * (L(N) + (N - 1) / N * 4 P / B_bus(N))     parameter sync (collectives)

except that ranks of one host on gloo share the flat buffer, so there the sync is two
barriers, ``2 * L_barrier(N)`` (that is what the CPU check below models; the H100
predictions use the collective sync).

``f(N) = max(1, N / cores)`` charges oversubscribed cores for host work; the memory
bandwidths are measured with ``N`` ranks running at once, so they already include the sharing
of cores and memory. ``B_bus`` is bus bandwidth: each rank moves ``(N - 1) / N`` of the
buffer, whatever the algorithm (ring all-gather, or one broadcast per owner as on gloo).

Its inputs are measured on the machine at hand (spawned gloo ranks, 1 thread each, as in
``bench_step.py``): the fused kernel's and a copy's bandwidth at each ``N``, the host cost
per step and per parameter, and the sync's latency (a tiny buffer) and bus bandwidth (100 MiB)
at each ``N``. The model is then checked against ``benchmarks/results/step_cpu_gloo.json``
(``ours`` rows), and evaluated for H100 clusters (8 GPUs per node on NVLink, ~360 GB/s busbw;
400 Gb/s per GPU between nodes; HBM ~3 TB/s) for 1 B and 10 B float32 parameters.

A second model covers whole training iterations (:func:`training_iteration`): per GPU, the
bytes sent and the communication that nothing hides, for DDP with replicated RMSprop and for
ShardedRMSprop with DDP's all-reduce, with reduce-scattered gradients, and with the sync
behind the next forward (``overlap_param_sync``), at 8 to 1024 H100s. Its step is checked
against the step measured inside training iterations (``results/training_cpu_gloo.json``, from
``bench_training.py``).

Run::

    .venv/bin/python benchmarks/model.py                  # measure (about 1-2 min), check, predict
    .venv/bin/python benchmarks/model.py --reuse-inputs   # use results/model_inputs_cpu.json

It prints the tables and writes ``benchmarks/results/model_predictions.md`` (and the measured
inputs as ``model_inputs_cpu.json``).

Its parts: this script measures the inputs and checks the model against the benchmarks'
results; ``bandwidth_model.py`` is the model and its H100 predictions; ``model_report.py``
writes the markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth_model import (  # noqa: E402
    ALIGN,
    GATHER_BYTES,
    UPDATE_BYTES,
    Cluster,
    cpu_machine,
    padded_numel,
    step_time,
)
from harness import Rank, cores, run_ranks, slowest, timed  # noqa: E402
from model_report import render  # noqa: E402
from workloads import set_numels  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
INPUTS = RESULTS / "model_inputs_cpu.json"
MEASURED = RESULTS / "step_cpu_gloo.json"
TRAINING = RESULTS / "training_cpu_gloo.json"


# -- measuring the inputs ------------------------------------------------------------------------


def _tiny_params(count: int) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(16)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(16)
    return params


def _measure_rank(at: Rank, numel: int, repeats: int) -> dict:
    """Every micro-benchmark once per round, ``repeats`` rounds (interleaved, as in
    bench_step.py, so that a burst of load from elsewhere hits them all), medians."""
    from sharded_rmsprop import ShardedRMSprop
    from sharded_rmsprop.comm import DataParallelGroup
    from sharded_rmsprop.kernels import select_update

    world = at.world
    # Memory bandwidths: every rank at once on its own arrays of `numel` elements.
    update = select_update(None, torch.device("cpu"), torch.float32)
    # Values as in training: square_avg above grad_avg**2, so no NaN from the square root
    # (NaN arithmetic is much slower on some CPUs and would understate the bandwidth).
    param, grad, momentum_buffer = (torch.randn(numel) for _ in range(3))
    square_avg, grad_avg = torch.rand(numel) + 1, torch.rand(numel) * 0.1
    opts = dict(
        lr=1e-6,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0.0,
        momentum=0.9,
        centered=True,
        maximize=False,
    )
    targets, sources = list(param.split(numel // 16)), list(grad.split(numel // 16))
    benches = {
        "update": lambda: update(param, grad, square_avg, momentum_buffer, grad_avg, **opts),
        "copy": lambda: torch._foreach_copy_(targets, sources),
    }
    calls = {"update": 1, "copy": 1}
    if world == 1:
        # Host work: whole steps on tiny parameters (the bandwidth terms are negligible).
        one = ShardedRMSprop(_tiny_params(1), lr=1e-6, momentum=0.9, centered=True)
        many = ShardedRMSprop(_tiny_params(2000), lr=1e-6, momentum=0.9, centered=True)
        benches.update(step1=one.step, step2000=many.step)
        calls.update(step1=50, step2000=3)
    else:
        group = DataParallelGroup.resolve(None)
        small = torch.randn(world * ALIGN)
        shard = (100 * 2**20 // 4) // (world * ALIGN) * ALIGN
        big = torch.randn(world * shard)
        benches.update(
            sync_small=lambda: group.sync_shards([small], [ALIGN]),
            sync_big=lambda: group.sync_shards([big], [shard]),
            barrier=group.barrier,
        )
        calls.update(sync_small=20, sync_big=1, barrier=20)
    samples: dict[str, list[float]] = {name: [] for name in benches}
    for round_ in range(repeats + 1):
        for name, fn in benches.items():
            seconds = slowest(timed(fn, barrier=True, calls=calls[name]))
            if round_:  # the first round is warm-up
                samples[name].append(seconds)
    t = {name: statistics.median(v) for name, v in samples.items()}
    out: dict[str, object] = dict(
        update_kernel=update.__name__,
        B_update=UPDATE_BYTES * numel / t["update"],
        B_copy=GATHER_BYTES * numel / t["copy"],
    )
    if world == 1:
        out["h_param"] = (t["step2000"] - t["step1"]) / 1999
        out["h_step"] = t["step1"]
    else:
        out["L"] = t["sync_small"]
        out["L_barrier"] = t["barrier"]
        moved = (world - 1) / world * big.numel() * 4
        out["B_bus"] = moved / max(t["sync_big"] - t["sync_small"], 1e-9)
    return out


def measure_inputs(worlds: list[int], numel: int, repeats: int) -> dict:
    inputs = {"cores": cores(), "numel": numel, "per_world": {}}
    for world in worlds:
        inputs["per_world"][str(world)] = run_ranks(_measure_rank, world, numel, repeats)
        print(f"  measured {world} rank(s): {inputs['per_world'][str(world)]}", flush=True)
    return inputs


# -- checks against the benchmarks' results ------------------------------------------------------


def check(inputs: dict, measured: dict) -> tuple[list[str], list[float]]:
    """Rows comparing the model with the measured ``ours`` times, and the relative errors."""
    rows, errors = [], []
    for world_key in sorted(measured["results"], key=int):
        world = int(world_key)
        if str(world) not in inputs["per_world"]:
            continue
        for set_name, entries in measured["results"][world_key].items():
            for contender, host_shared in (("ours", False), ("ours host_shared", True)):
                if contender not in entries:
                    continue
                m = cpu_machine(inputs, world, host_shared)
                shapes = set_numels(set_name)
                padded = padded_numel(shapes, world)
                t = step_time(m, padded, len(shapes), world)
                got = statistics.median(entries[contender]["times"])
                err = t["total"] / got - 1
                errors.append(err)
                rows.append(
                    f"| {set_name} ({contender}) | {world} | {got * 1e3:.1f} | "
                    f"{t['total'] * 1e3:.1f} | {err:+.0%} | {t['host'] * 1e3:.1f} | "
                    f"{t['gather'] * 1e3:.1f} | {t['update'] * 1e3:.1f} | {t['sync'] * 1e3:.1f} |"
                )
    return rows, errors


def check_iterations(inputs: dict, measured: dict) -> tuple[list[str], list[float]]:
    """Rows comparing the model's step (update + sync) with the step alone measured inside
    whole training iterations (``bench_training.py``), for both of our modes."""
    rows, errors = [], []
    for world_key, models in sorted(measured.get("results", {}).items(), key=lambda x: int(x[0])):
        world = int(world_key)
        if world_key not in inputs["per_world"]:
            continue
        for model_name, run in models.items():
            if model_name not in ("wide", "many-small"):
                continue
            shapes = set_numels(model_name)
            padded = padded_numel(shapes, world)
            # momentum 0 and not centered in bench_training: param, grad, square_avg read,
            # two written: 20 of the 36 bytes per element of the fused update
            m = cpu_machine(inputs, world, host_shared=False)
            t = step_time(m, padded, len(shapes), world)
            model_s = t["total"] - t["update"] * (1 - 20 / UPDATE_BYTES)
            for contender in ("ours zero-1", "ours reduce-scatter"):
                entry = run["contenders"].get(contender)
                if entry is None:
                    continue
                got = statistics.median(entry["step"])
                errors.append(model_s / got - 1)
                rows.append(
                    f"| {model_name} ({contender}) | {world} | {got * 1e3:.1f} | "
                    f"{model_s * 1e3:.1f} | {errors[-1]:+.0%} |"
                )
    return rows, errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reuse-inputs", action="store_true", help=f"read {INPUTS.name} instead of measuring"
    )
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument(
        "--numel", type=float, default=8.0, help="millions of elements per rank for the bandwidths"
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="rounds of the interleaved micro-benchmarks"
    )
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    if args.reuse_inputs:
        inputs = json.loads(INPUTS.read_text())
    else:
        worlds = sorted(set(args.world_sizes) | {1})
        inputs = measure_inputs(worlds, int(args.numel * 1e6), args.repeats)
        INPUTS.write_text(json.dumps(inputs, indent=1))
    measured = json.loads(MEASURED.read_text()) if MEASURED.exists() else {"results": {}}
    rows, errors = check(inputs, measured)
    training = json.loads(TRAINING.read_text()) if TRAINING.exists() else {}
    iteration_check = check_iterations(inputs, training)
    text = render(inputs, rows, errors, Cluster(), measured.get("meta"), iteration_check)
    print(text)
    (RESULTS / "model_predictions.md").write_text(text)


if __name__ == "__main__":
    main()
