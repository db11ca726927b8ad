"""The GPU check's report: each part's figures as markdown, and its one-line headline.

``benchmarks/gpu_check.py`` writes the report; here is how each part's results (the JSON its
part in ``benchmarks/gpu_parts.py`` wrote) read. A part cut short may have written only some
of its figures: then its section is the raw JSON and its headline empty.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from benchmarks.gpu_check import Outcome

__all__ = ["SECTIONS", "headline", "section"]


def section(outcome: Outcome) -> list[str]:
    """A part's figures in markdown; the raw JSON if they are not all there (a part cut
    short may have written only some)."""
    try:
        return SECTIONS.get(outcome.part, _raw)(outcome.data)
    except (KeyError, TypeError, ValueError):
        return _raw(outcome.data)


def headline(outcome: Outcome) -> str:
    """One line of what a part found (empty if its figures are not all there)."""
    try:
        return _headline(outcome)
    except (KeyError, TypeError, ValueError):
        return ""


def _headline(outcome: Outcome) -> str:
    data = outcome.data
    if outcome.part == "environment":
        versions = data.get("versions", {})
        device = data.get("device", {})
        found = f"torch {versions.get('torch')}, triton {versions.get('triton')}"
        if device:
            found += f", {device['name']} ({device['memory_gib']} GiB, CUDA {device['cuda']})"
        elif data:
            found += ", no CUDA device"
        return found
    if outcome.part in ("cuda_tests", "two_ranks") and "results" in data:
        r = data["results"]
        return f"{r['passed']} passed, {r['failures'] + r['errors']} failed, {r['skipped']} skipped"
    if outcome.part == "kernels":
        found = [_variants_headline(data.get("variants") or [])]
        found.append(_kernel_headline(data.get("rows") or []))
        return "; ".join(f for f in found if f)
    if outcome.part == "train":
        runs = []
        for dtype in ("float32", "bfloat16"):
            figures = (data.get(dtype) or {}).get("figures")
            if figures:
                runs.append(
                    f"{dtype} loss {figures['loss_start']:.2f} -> {figures['loss_end']:.2f}"
                    f", {figures['tokens_per_s'] / 1e3:.0f}k tokens/s"
                )
        return "; ".join(runs)
    if outcome.part == "train_modes" and data.get("rows"):
        return _train_modes_headline(data["rows"])
    if outcome.part == "host_syncs" and data.get("modes"):
        modes = data["modes"]
        counted = [m for m in modes if m["syncs"] is not None]
        found = ", ".join(f"{m['mode']} {sum(m['syncs'].values())}" for m in counted)
        found = f"syncs per iteration: {found}; " if counted else ""
        found += f"{sum(m['as_documented'] for m in modes)}/{len(modes)} modes as documented"
        graph = data.get("cuda_graph", {})
        if graph:
            found += "; CUDA graph " + ("captured" if graph.get("captured") else "not captured")
        return found
    return ""


def _variants_headline(rows: list[dict]) -> str:
    if not rows:
        return ""
    low, high = min(r["of_copy"] for r in rows), max(r["of_copy"] for r in rows)
    return f"{len(rows)} fused variants at {100 * low:.0f}-{100 * high:.0f}% of copy"


#: The modes' short names in the train_modes headline.
_SHORT = {
    "blocking sync": "blocking",
    "overlap_param_sync": "overlap",
    "reduce_scatter_gradients": "rs",
    "reduce_scatter_gradients + overlap_param_sync": "rs+overlap",
}


def _train_modes_headline(rows: list[dict]) -> str:
    """Each mode's throughput as a multiple of DDP + torch's, on the first model measured."""
    model = rows[0]["model"]
    ratios = [
        f"{_SHORT[r['mode']]} {r['x_ddp_throughput']:.2f}x"
        for r in rows
        if r["model"] == model and r["mode"] in _SHORT
    ]
    return f"{model} throughput vs DDP + torch: " + ", ".join(ratios)


def _kernel_headline(rows: list[dict]) -> str | None:
    """The fused kernel at the largest size measured, with momentum and centered if there."""
    fused = [r for r in rows if r["kernel"].startswith("fused")]
    if not fused:
        return None
    largest = max(r["millions"] for r in fused)
    at_largest = [r for r in fused if r["millions"] == largest]
    row = next((r for r in at_largest if r["options"] == "momentum+centered"), at_largest[-1])
    return (
        f"fused {row['gbs']:.0f} GB/s = {100 * row['of_copy']:.0f}% of copy, "
        f"{row['x_foreach']:.2f}x torch foreach ({largest} M, {row['options']})"
    )


def _raw(data: dict[str, Any]) -> list[str]:
    return ["```json", json.dumps(data, indent=1, default=str)[:4000], "```"] if data else []


def _environment_section(data: dict[str, Any]) -> list[str]:
    lines = ["| what | found |", "| --- | --- |", f"| python | {data.get('python')} |"]
    lines += [f"| {name} | {version} |" for name, version in data.get("versions", {}).items()]
    lines += [f"| device {key} | {value} |" for key, value in data.get("device", {}).items()]
    lines += [f"| host {key} | {value} |" for key, value in data.get("host", {}).items()]
    return lines


def _tests_section(data: dict[str, Any]) -> list[str]:
    lines = [f"`{data['command']}`", ""] if "command" in data else []
    results = data.get("results")
    if results:
        lines.append(
            f"{results['passed']} passed, {results['failures']} failed, "
            f"{results['errors']} errors, {results['skipped']} skipped "
            f"({data.get('seconds', 0)} s)."
        )
        if results.get("incomplete"):
            lines.append("Cut short: counted from pytest's lines up to then.")
        lines += [f"- FAILED `{f['test']}`: {f['message']}" for f in results["failed"]]
        if results["slowest"]:
            lines += [
                "",
                "Slowest: "
                + ", ".join(
                    f"`{s['test'].rsplit('::', 1)[-1]}` {s['seconds']} s"
                    for s in results["slowest"]
                ),
            ]
    elif "tail" in data:
        lines += ["```", data["tail"][-1500:], "```"]
    if data.get("note"):
        lines += ["", data["note"]]
    return lines


def _kernels_section(data: dict[str, Any]) -> list[str]:
    lines = _variants_section(data) if data.get("variants") else []
    if "copy_gbs" not in data:
        return lines or _raw(data)
    lines += [
        f"Device copy bandwidth (`dst.copy_(src)`, 256 M float32, 8 bytes an element): "
        f"{data['copy_gbs']} GB/s. Bytes an element of the update: "
        + ", ".join(f"{k} {v}" for k, v in data.get("byte_model", {}).items())
        + ".",
        "",
        "| M elements | options | kernel | ms | GB/s | of copy | x torch foreach |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in data.get("rows", []):
        lines.append(
            f"| {r['millions']} | {r['options']} | {r['kernel']} | {r['ms']} | "
            f"{r['gbs']} | {100 * r['of_copy']:.0f}% | {r['x_foreach']} |"
        )
    if data.get("cut_short"):
        lines += ["", data["cut_short"]]
    return lines


def _variants_section(data: dict[str, Any]) -> list[str]:
    rows = data["variants"]
    lines = [
        f"Each variant of the fused kernel that ShardedRMSprop launches, {rows[0]['millions']} M "
        "elements, beside a torch copy of the same bytes (`dst.copy_(src)`) in the same run:",
        "",
        "| variant | kernel | bytes an element | ms | GB/s | copy GB/s | of copy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['kernel']} | {r['bytes']} | {r['ms']} | {r['gbs']} | "
            f"{r['copy_gbs']} | {100 * r['of_copy']:.0f}% |"
        )
    if data.get("variants_cut_short"):
        lines += ["", data["variants_cut_short"]]
    return lines + [""]


def _train_section(data: dict[str, Any]) -> list[str]:
    lines = [
        "| dtype | exit | loss | val loss | tokens/s | peak allocated MiB | formula MiB "
        "(params + grads + state) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for dtype in ("float32", "bfloat16"):
        run = data.get(dtype)
        if run is None:
            continue
        f = run.get("figures") or {}
        if f:
            lines.append(
                f"| {dtype} | {run['exit_code']} | {f['loss_start']:.3f} -> {f['loss_end']:.3f} | "
                f"{f['val_start']:.3f} -> {f['val_end']:.3f} | {f['tokens_per_s']:.0f} | "
                f"{f.get('cuda_peak_mib', 'n/a')} | {f.get('formula_mib', 'n/a')} |"
            )
        else:
            lines.append(f"| {dtype} | {run['exit_code']} | no summary line | | | | |")
    commands = [f"`{data[d]['command']}`" for d in ("float32", "bfloat16") if d in data]
    if commands:
        lines += [
            "",
            "Commands: " + "; ".join(commands) + ". The peak includes activations, "
            "DDP's gradient buckets and workspaces, which the formula leaves out.",
        ]
    for dtype in ("float32", "bfloat16"):
        run = data.get(dtype)
        if run and run["exit_code"] != 0:
            lines += ["", f"{dtype} log tail:", "```", run["tail"][-1500:], "```"]
    return lines


def _train_modes_section(data: dict[str, Any]) -> list[str]:
    settings = data.get("settings", {})
    lines = [
        f"One rank on {settings.get('device')}, medians of {settings.get('repeats')} "
        f"iterations after {settings.get('warmup')} (phases timed apart, the ranks' queued work "
        "waited for); iterations/s back to back. Tokens: the GPT's, or the rows of a chain "
        "of Linears. Exposed communication: forward + backward beyond the bare module's. At "
        "one rank ShardedRMSprop skips its collectives, so this is DDP's reducer (its "
        "one-rank all-reduce) or the reduce-scatter hook's copies, not the parameter sync "
        "that several GPUs would expose (NCCL runs one rank a GPU: there is one).",
    ]
    for model in dict.fromkeys(r["model"] for r in data["rows"]):
        lines += [
            "",
            f"`{model}`:",
            "",
            "| mode | iterations/s | tokens/s | x DDP + torch | forward ms | backward ms | "
            "step ms | exposed ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in (r for r in data["rows"] if r["model"] == model):
            lines.append(
                f"| {r['mode']} | {r['iterations_per_s']} | {r['tokens_per_s']:.0f} | "
                f"{r['x_ddp_throughput']:.2f} | {r['forward_ms']} | {r['backward_ms']} | "
                f"{r['step_ms']} | {r['exposed_ms']} |"
            )
    if data.get("cut_short"):
        lines += ["", data["cut_short"]]
    return lines


def _sites(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "not counted (no CUDA)"
    return ", ".join(f"`{site}` {n}" for site, n in sorted(counts.items())) or "none"


def _host_syncs_section(data: dict[str, Any]) -> list[str]:
    lines = [
        "One rank, the last of three iterations, each phase watched by "
        '`torch.cuda.set_sync_debug_mode("warn")` (the synchronisations) and '
        "`benchmarks/host_reads.py` (the host's reads of tensor data), both by the library's "
        "line that asked. As documented: the reads of device values are among the mode's "
        "documented ones (`DEVICE_READS`), and on a GPU the synchronisations are those reads.",
        "",
        "| mode | synchronisations (forward, backward, step) | where | device values read | "
        "documented | host values read | as documented |",
        "| --- | ---: | --- | --- | --- | --- | --- |",
    ]
    for m in data.get("modes", []):
        phases = m["syncs_by_phase"]
        count = (
            f"{sum(phases.values())} ({', '.join(str(n) for n in phases.values())})"
            if phases is not None
            else "n/a"
        )
        lines.append(
            f"| {m['mode']} | {count} | {_sites(m['syncs'])} | {_sites(m['device_reads'])} | "
            f"{', '.join(f'`{d}`' for d in m['documented']) or 'none'} | "
            f"{_sites(m['host_values'])} | {'yes' if m['as_documented'] else '**no**'} |"
        )
    graph = data.get("cuda_graph")
    if graph:
        lines += [
            "",
            "step() in a CUDA graph: "
            + (
                "captured and replayed."
                if graph["captured"]
                else f"not captured ({graph['error']})."
            ),
        ]
    return lines


SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "environment": _environment_section,
    "cuda_tests": _tests_section,
    "two_ranks": _tests_section,
    "kernels": _kernels_section,
    "train": _train_section,
    "train_modes": _train_modes_section,
    "host_syncs": _host_syncs_section,
}
