"""``model.py``'s report: the markdown of the measured inputs, the model's check against the
measured steps, and its predictions for H100 clusters (:func:`render`)."""

from __future__ import annotations

import statistics

from bandwidth_model import REPLICATED_BYTES, Cluster, iteration_predictions, predictions


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
        mean, median, worst = _error_summary(errors)
        columns = "set, N, measured ms, model ms, error, host, gather, update, sync".split(", ")
        lines += [
            *_table(columns, check_rows),
            "",
            f"Error (model / measured − 1) over {len(errors)} points: mean |error| {mean}, "
            f"median {median}, worst {worst}. The measurements are medians from a shared, noisy "
            "2-core machine (see the load averages in step_cpu_gloo.md); the inputs were "
            "measured at a different time.",
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
        'ring collectives. "bytes" is what each GPU sends: 2(N−1)/N·4P for DDP\'s '
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
        mean, _, worst = _error_summary(errors)
        lines += [
            "",
            "### Check against whole iterations on this machine (`training_cpu_gloo.json`)",
            "",
            "The step alone (update + sync) measured inside training iterations "
            "(`bench_training.py`, momentum 0: a 20-byte update) against this model's step:",
            "",
            *_table(["model (contender)", "N", "measured step ms", "model ms", "error"], rows),
            "",
            f"Mean |error| {mean} over {len(errors)} points, worst {worst}. The backward's "
            "overlap is not checked here: on 2 CPU cores the collectives and the backward "
            "compete for the same cores, which an H100 node does not.",
        ]
    return lines


def _table(columns: list[str], rows: list[str]) -> list[str]:
    """A markdown table of ``rows``: the first column left-aligned, the numbers right-aligned."""
    return ["| " + " | ".join(columns) + " |", "| --- |" + " ---: |" * (len(columns) - 1), *rows]


def _error_summary(errors: list[float]) -> tuple[str, str, str]:
    """The mean and median |error| of the model against the measurements, and the worst error."""
    absolute = [abs(e) for e in errors]
    return (
        f"{statistics.mean(absolute):.0%}",
        f"{statistics.median(absolute):.0%}",
        f"{max(errors, key=abs):+.0%}",
    )
