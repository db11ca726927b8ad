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
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Rank, cores, run_ranks, slowest, timed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
INPUTS = RESULTS / "model_inputs_cpu.json"
MEASURED = RESULTS / "step_cpu_gloo.json"
TRAINING = RESULTS / "training_cpu_gloo.json"

#: Bytes per element moved by one fused update with momentum and centered (float32):
#: param, grad, square_avg, momentum_buffer, grad_avg read; all but grad written.
UPDATE_BYTES = 36
#: Bytes per element of the gradient gather (read the gradient slice, write the grad window).
GATHER_BYTES = 8
#: The staging buffer of the owned gradients (sharded_rmsprop.shards.GRAD_WINDOW_NUMEL, fp32).
GRAD_WINDOW_BYTES = 4 * (1 << 22)
#: torch.optim.RMSprop's foreach op sequence with momentum and centered, per element (no grad
#: copy): mul_ 8, addcmul_ 12, lerp_ 12, addcmul 12, sqrt_ 8, add_ 8, mul_ 8, addcdiv_ 16,
#: add_ 12.
REPLICATED_BYTES = 96
ALIGN = 64  # the layout aligns each parameter's start to 64 elements (layout.ALIGNMENT)


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


# -- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """The model's inputs for one world size (bandwidths in bytes/s, times in seconds)."""

    B_update: float
    B_copy: float
    h_step: float
    h_param: float
    L: float = 0.0
    B_bus: float = math.inf
    oversubscription: float = 1.0
    # Ranks of one host sharing the flat buffer (gloo): the sync is two barriers, no bytes.
    host_shared: bool = False
    L_barrier: float = 0.0


def padded_numel(shapes: list[int], world: int) -> int:
    """The flat buffer's length: each start aligned to ALIGN elements, the end to ALIGN * N."""
    end = 0
    for numel in shapes:
        end = (end + ALIGN - 1) // ALIGN * ALIGN + numel
    return (end + ALIGN * world - 1) // (ALIGN * world) * (ALIGN * world)


def step_time(
    m: Machine, padded: int, tensors: int, world: int, sync_bytes_per_elem: int = 4
) -> dict:
    """The model's terms and total, seconds."""
    shard = padded / world
    terms = dict(
        host=m.oversubscription * (m.h_step + tensors * m.h_param),
        gather=GATHER_BYTES * shard / m.B_copy,
        update=UPDATE_BYTES * shard / m.B_update,
        sync=(
            0.0
            if world == 1
            else 2 * m.L_barrier
            if m.host_shared
            else m.L + (world - 1) / world * sync_bytes_per_elem * padded / m.B_bus
        ),
    )
    terms["total"] = sum(terms.values())
    return terms


def cpu_machine(inputs: dict, world: int, host_shared: bool) -> Machine:
    one = inputs["per_world"]["1"]
    here = inputs["per_world"][str(world)]
    return Machine(
        B_update=here["B_update"],
        B_copy=here["B_copy"],
        h_step=one["h_step"],
        h_param=one["h_param"],
        L=here.get("L", 0.0),
        B_bus=here.get("B_bus", math.inf),
        oversubscription=max(1.0, world / inputs["cores"]),
        host_shared=host_shared and world > 1,  # ShardedRMSprop(host_shared=True)
        L_barrier=here.get("L_barrier", 0.0),
    )


def set_shapes(name: str) -> list[int]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_step import build_set

    return [p.numel() for p in build_set(name).parameters()]


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
                shapes = set_shapes(set_name)
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


# -- H100 predictions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """Assumed H100 figures (bytes/s, seconds); see the notes printed with the table."""

    hbm: float = (
        3.0e12  # streaming kernels: about 3 TB/s of an H100's HBM3 in a device-to-device copy
    )
    nvlink_busbw: float = 360e9  # NCCL all-gather busbw within an 8-GPU node
    network_busbw: float = 400e9 / 8  # 400 Gb/s per GPU between nodes
    gpus_per_node: int = 8
    hop_latency_nvlink: float = 2e-6  # per ring step
    hop_latency_network: float = 6e-6
    base_latency: float = 10e-6  # launch and the first step of a collective
    host_step: float = 150e-6  # the Python of one step on a GPU host (few large buckets)
    memory: float = 80e9
    # the iteration model (training_iteration): sustained matmul throughput in float32 with
    # TF32 (~40% of the 495 TFLOP/s peak), tokens per GPU per step, DDP's bucket size
    flops: float = 200e12
    tokens_per_gpu: int = 16 * 1024
    bucket_bytes: int = 25 * 2**20

    def machine(self, world: int) -> Machine:
        intra = world <= self.gpus_per_node
        hop = self.hop_latency_nvlink if intra else self.hop_latency_network
        return Machine(
            B_update=self.hbm,
            B_copy=self.hbm,
            h_step=self.host_step,
            h_param=0.0,
            L=self.base_latency + (world - 1) * hop,
            B_bus=self.nvlink_busbw if intra else self.network_busbw,
        )


def predictions(cluster: Cluster) -> list[str]:
    rows = []
    for billions in (1, 10):
        params = billions * 10**9
        for world in (8, 16, 32, 64, 128, 256, 512, 1024):
            m = cluster.machine(world)
            t = step_time(m, params, 0, world)
            bf16 = step_time(m, params, 0, world, sync_bytes_per_elem=2)
            replicated = REPLICATED_BYTES * params / cluster.hbm
            # hybrid: sharded within a node (node_local_group()), replicated across nodes
            node = min(world, cluster.gpus_per_node)
            hybrid = step_time(cluster.machine(node), params, 0, node)
            ours_mem = 3 * 4 * params / world + GRAD_WINDOW_BYTES  # 3 fp32 state buffers + window
            hybrid_mem = 3 * 4 * params / node + GRAD_WINDOW_BYTES
            total_mem = 4 * params * 2 + ours_mem  # + params and grads, fp32, unsharded
            rows.append(
                f"| {billions} B | {world} | {world // cluster.gpus_per_node} | "
                f"{t['update'] * 1e3 + t['gather'] * 1e3:.2f} | {t['sync'] * 1e3:.1f} | "
                f"{t['total'] * 1e3:.1f} | {bf16['total'] * 1e3:.1f} | "
                f"{hybrid['total'] * 1e3:.1f} | {replicated * 1e3:.1f} | "
                f"{ours_mem / 1e9:.2f} | {hybrid_mem / 1e9:.2f} | {12 * params / 1e9:.0f} | "
                f"{total_mem / 1e9:.1f}{'' if total_mem < cluster.memory else ' (> 80)'} |"
            )
    return rows


def _ring(m: Machine, world: int, numel: float, passes: int) -> float:
    """One ring collective over ``numel`` float32 elements: ``passes`` 1 for a reduce-scatter
    or an all-gather, 2 for an all-reduce."""
    return 0.0 if world == 1 else passes * (m.L + (world - 1) / world * 4 * numel / m.B_bus)


#: The training modes the iteration model compares: (gradient collective passes over every
#: GPU, whether the parameter sync follows the update, whether that sync hides behind the next
#: forward, whether the state is sharded within each node only).
MODES = {
    "DDP + replicated RMSprop": (2, False, False, False),
    "ours ZeRO-1 (DDP all-reduce + sync)": (2, True, False, False),
    "ours reduce-scatter": (1, True, False, False),
    "ours hybrid (node_local_group(), DDP all-reduce)": (2, True, False, True),
    "ours reduce-scatter + overlap_param_sync (sync behind the forward)": (1, True, True, False),
}


def training_iteration(cluster: Cluster, params: float, world: int, mode: str) -> dict:
    """Seconds of one training iteration's communication that nothing hides (``exposed``),
    of the update (``update``), and bytes sent per GPU (``bytes``), for ``mode`` of
    :data:`MODES`.

    The gradient collective runs bucket by bucket behind the backward (2x the forward's
    ``2 P tokens`` FLOPs): only the last bucket's, and whatever does not fit behind the
    backward, is exposed. The parameter sync runs after the update (exposed whole), or,
    behind the next forward, all but the first bucket's hide there."""
    grad_passes, syncs, behind_forward, node_local = MODES[mode]
    m = cluster.machine(world)
    shards = min(world, cluster.gpus_per_node) if node_local else world
    sharded = cluster.machine(shards)  # the links and ranks the state is sharded over
    bucket = cluster.bucket_bytes / 4
    forward = 2 * params * cluster.tokens_per_gpu / cluster.flops
    backward = 2 * forward
    grads = _ring(m, world, params, grad_passes)
    exposed = _ring(m, world, min(bucket, params), grad_passes) + max(0.0, grads - backward)
    terms = step_time(sharded, params, 0, shards)
    update = terms["update"] + terms["gather"] if syncs else REPLICATED_BYTES * params / cluster.hbm
    sync = _ring(sharded, shards, params, 1) if syncs else 0.0
    if behind_forward:
        exposed += _ring(m, world, min(bucket, params), 1) + max(0.0, sync - forward)
    else:
        exposed += sync
    moved = 4 * params * (
        (world - 1) / world * grad_passes + ((shards - 1) / shards if syncs else 0.0)
    )
    return {"exposed": exposed, "update": update, "bytes": moved, "backward": backward}


def iteration_predictions(cluster: Cluster) -> list[str]:
    rows = []
    for billions in (1, 10):
        params = billions * 10**9
        for world in (8, 16, 64, 256, 1024):
            ddp = training_iteration(cluster, params, world, "DDP + replicated RMSprop")
            for mode in MODES:
                t = training_iteration(cluster, params, world, mode)
                verdict = "yes" if t["exposed"] <= ddp["exposed"] * 1.001 else "no"
                rows.append(
                    f"| {billions} B | {world} | {mode} | {t['bytes'] / 1e9:.1f} | "
                    f"{t['exposed'] * 1e3:.1f} | {t['update'] * 1e3:.2f} | "
                    f"{(t['exposed'] + t['update']) * 1e3:.1f} | {verdict} |"
                )
    return rows


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
            shapes = set_shapes(model_name)
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


# -- report --------------------------------------------------------------------------------------


def render(
    inputs: dict,
    check_rows: list[str],
    errors: list[float],
    cluster: Cluster,
    measured_meta: dict | None,
    iteration_check: tuple[list[str], list[float]] = ([], []),
) -> str:
    lines = [
        "# A bandwidth model of the ShardedRMSprop step",
        "",
        "T = f(N)·(h_step + n·h_param) + 8·S/B_copy + 36·S/B_update "
        "+ [N>1]·(L + (N−1)/N·4P/B_bus), "
        "S = P/N elements per rank (float32, momentum and centered, fused update). f(N) = "
        "max(1, N/cores).",
        "",
        f"## Inputs measured on this machine ({inputs['cores']} cores, gloo, 1 thread per rank; "
        f"bandwidths with all N ranks running at once on {inputs['numel'] / 1e6:.0f} M elements "
        "each)",
        "",
        "| N | B_update GB/s | B_copy GB/s | sync latency L ms | sync busbw GB/s "
        "| host per step ms | host per tensor µs |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    one = inputs["per_world"]["1"]
    for key in sorted(inputs["per_world"], key=int):
        v = inputs["per_world"][key]
        lines.append(
            f"| {key} | {v['B_update'] / 1e9:.1f} | {v['B_copy'] / 1e9:.1f} | "
            f"{v['L'] * 1e3:.2f} | {v['B_bus'] / 1e9:.2f} | {one['h_step'] * 1e3:.3f} | "
            f"{one['h_param'] * 1e6:.1f} |"
            if "L" in v
            else f"| {key} | {v['B_update'] / 1e9:.1f} | {v['B_copy'] / 1e9:.1f} | – | – | "
            f"{one['h_step'] * 1e3:.3f} | {one['h_param'] * 1e6:.1f} |"
        )
    lines += [
        "",
        f"Update kernel: `{one.get('update_kernel', '?')}`.",
        "",
        "## Check against the measured step (`ours`, benchmarks/results/step_cpu_gloo.md)",
        "",
    ]
    if check_rows:
        abs_err = [abs(e) for e in errors]
        lines += [
            "| set | N | measured ms | model ms | error | host | gather | update | sync |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *check_rows,
            "",
            f"Error (model / measured − 1) over {len(errors)} points: mean |error| "
            f"{statistics.mean(abs_err):.0%}, median {statistics.median(abs_err):.0%}, worst "
            f"{max(errors, key=abs):+.0%}. The measurements are medians from a shared, noisy "
            f"2-core machine (see the load averages in step_cpu_gloo.md); the inputs were "
            f"measured at a different time.",
        ]
    else:
        lines.append("No measured results found (run benchmarks/bench_step.py first).")
    c = cluster
    lines += [
        "",
        "## Predictions: H100 clusters, float32 parameters, one flat buffer, NCCL all-gather",
        "",
        f"Assumed: HBM {c.hbm / 1e12:.1f} TB/s for the update and gather; all-gather busbw "
        f"{c.nvlink_busbw / 1e9:.0f} GB/s within a node (N ≤ {c.gpus_per_node}, NVLink), "
        f"{c.network_busbw / 1e9:.0f} GB/s across nodes (one 400 Gb/s NIC per GPU, the ring's "
        f"slowest link, at full line rate); latency {c.base_latency * 1e6:.0f} µs + "
        f"(N−1)·{c.hop_latency_network * 1e6:.0f} µs per ring all-gather across nodes "
        f"((N−1)·{c.hop_latency_nvlink * 1e6:.0f} µs within one); {c.host_step * 1e6:.0f} µs "
        f"of host work per step. No overlap of the sync with anything.",
        "",
        "| model | GPUs | nodes | update+gather ms | sync ms | step ms | step, bf16 sync ms | "
        "hybrid step ms | replicated RMSprop update ms | optimizer GB/GPU | "
        "hybrid optimizer GB/GPU | replicated optimizer GB/GPU | "
        "params+grads+optimizer GB/GPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *predictions(cluster),
        "",
        "- The update shrinks as 1/N, the sync does not: each GPU receives (N−1)/N of the "
        "parameters every step, at NVLink speed inside a node and at the NIC's speed across "
        "nodes. Beyond one node the step is the all-gather: ~80 ms per step for 1 B float32 "
        "parameters, ~800 ms for 10 B, against ~32 ms / ~320 ms for the replicated update it "
        "replaces. Within a node the sharded step is ~3x faster than the replicated update.",
        '- "bf16 sync" is the same step with the all-gather in bfloat16 (half the bytes; the '
        "library does not do this yet). Overlapping the all-gather with the next forward "
        "(`overlap_param_sync`) and replacing DDP's all-reduce with a reduce-scatter "
        "(`reduce_scatter_gradients`: gradients plus parameters cost one all-reduce's worth "
        "of traffic) are the other ways to hide it; the next section models both.",
        '- "hybrid" shards within each node only (`process_group=node_local_group()`, DDP '
        "over every GPU): the update is that of 8 GPUs and the sync stays on NVLink, so the "
        "step no longer grows with the number of nodes, at the cost of the state of 1/8 of "
        "the parameters per GPU instead of 1/N. Beyond one node it is the faster choice "
        "whenever that memory fits.",
        "- 10 B float32 parameters do not fit on an 80 GB GPU under ZeRO-1 at any N (params and "
        "gradients alone are 80 GB); they need bf16 weights or gradient/parameter sharding.",
        '- "replicated" is torch.optim.RMSprop\'s foreach update over all parameters at '
        f'{REPLICATED_BYTES} B/element (no sync); "optimizer GB/GPU" counts the three state '
        "buffers and the gradient shard (ours) against the three full state buffers (replicated).",
    ]
    lines += _iteration_section(cluster, *iteration_check)
    if measured_meta:
        lines += [
            "",
            f"Measured step times from: {measured_meta.get('device_name', '?')}, "
            f"torch {measured_meta.get('torch', '?')}.",
        ]
    return "\n".join(lines) + "\n"


def _iteration_section(cluster: Cluster, rows: list[str], errors: list[float]) -> list[str]:
    c = cluster
    lines = [
        "",
        "## Whole training iterations: the communication nothing hides",
        "",
        "Per GPU and iteration: the gradient collective runs bucket by bucket "
        f"({c.bucket_bytes / 2**20:.0f} MiB, DDP's) behind the backward (4·P·tokens FLOPs at "
        f"{c.flops / 1e12:.0f} TFLOP/s, {c.tokens_per_gpu} tokens per GPU); the last bucket's "
        "collective, and whatever does not fit behind the backward, is exposed. The parameter "
        "sync after the update is exposed whole; behind the next forward (2·P·tokens FLOPs) "
        "all but its first bucket hide. The same links, latencies and HBM as above; "
        "ring collectives. \"bytes\" is what each GPU sends: 2(N−1)/N·4P for DDP's "
        "all-reduce, 3(N−1)/N·4P for ZeRO-1 (all-reduce + all-gather), 2(N−1)/N·4P again "
        "with the reduce-scatter (reduce-scatter + all-gather).",
        "",
        "| model | GPUs | mode | GB sent per GPU | exposed comm ms | update ms | "
        "exposed + update ms | exposed ≤ DDP's? |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
        *iteration_predictions(cluster),
        "",
        "- The reduce-scatter takes ZeRO-1's bytes down to DDP's, and its gradient half hides "
        "behind the backward as DDP's all-reduce does; what stays exposed is the parameter "
        "sync. So the goal (exposed communication no more than DDP's) is met by the sync "
        "behind the forward (`overlap_param_sync`), where the forward is long enough to hide "
        "it. Without it the sharded step pays the sync on top of DDP, but saves the "
        "replicated update: it wins within a node, and across nodes only with hybrid "
        "sharding, whose sync stays on NVLink (at the memory cost of sharding over 8 GPUs "
        "instead of N).",
    ]
    if rows:
        abs_err = [abs(e) for e in errors]
        lines += [
            "",
            "### Check against whole iterations on this machine (`training_cpu_gloo.json`)",
            "",
            "The step alone (update + sync) measured inside training iterations "
            "(`bench_training.py`, momentum 0: a 20-byte update) against this model's step:",
            "",
            "| model (contender) | N | measured step ms | model ms | error |",
            "| --- | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            f"Mean |error| {statistics.mean(abs_err):.0%} over {len(errors)} points, worst "
            f"{max(errors, key=abs):+.0%}. The backward's overlap is not checked here: on 2 "
            "CPU cores the collectives and the backward compete for the same cores, which "
            "an H100 node does not.",
        ]
    return lines


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
