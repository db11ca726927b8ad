"""``bench_step.py``'s report: the markdown tables (:func:`render`), the project's targets
checked within the run (:data:`TARGETS`, :func:`targets`) and the plots (:func:`plot`), all
from the results and metadata of a run (measured now, or read back from its ``.json``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from harness import cores, median_ms, quartiles_ms

if TYPE_CHECKING:
    from bench_step import Config

MIB = 2**20

#: Plot styles: one colour per optimizer, dashed for the variants.
STYLE = {
    "replicated": dict(color="tab:blue", marker="o"),
    "zero": dict(color="tab:orange", marker="v"),
    "zero-bucket": dict(color="tab:green", marker="^"),
    "fsdp2": dict(color="tab:red", marker="s"),
    "fsdp2 step only": dict(color="tab:red", marker="s", linestyle="--", mfc="none"),
    "ours": dict(color="black", marker="D", linewidth=2),
    "ours host_shared": dict(color="tab:purple", marker="D", linestyle=":"),
    "ours fused=False": dict(color="black", marker="D", linestyle="--", mfc="none"),
    "ours copy-out": dict(color="tab:gray", marker="D", linestyle="-."),
}


@dataclass(frozen=True)
class Target:
    """One of the project's targets: a ratio within one run, at most ``bound`` (NaN: shown
    for reference, no verdict). ``kind``: "step" (median step time of ``contender`` over
    ``peer``'s), "memory" (the largest rank's optimizer bytes, ``contender`` over ``peer``)
    or "balance" (``contender``'s largest rank's bytes over the mean rank's)."""

    kind: str
    set: str
    world: int
    contender: str
    peer: str = ""
    bound: float = math.nan


TARGETS = (
    Target("step", "wide", 2, "ours", "zero-bucket", 0.45),
    Target("step", "wide", 2, "ours", "replicated", 0.8),
    Target("step", "many-small", 2, "ours", "zero", 0.35),
    Target("step", "many-small", 2, "ours", "zero-bucket", 0.35),
    Target("step", "wide", 2, "ours host_shared", "zero-bucket", 0.45),
    Target("step", "wide", 2, "ours host_shared", "replicated", 0.8),
    Target("step", "many-small", 2, "ours host_shared", "zero", 0.35),
    Target("step", "many-small", 2, "ours host_shared", "zero-bucket", 0.35),
    Target("memory", "wide", 2, "ours", "replicated", 0.7),
    Target("memory", "wide", 4, "ours", "replicated", 0.4),
    Target("memory", "many-small", 2, "ours", "replicated", 0.7),
    Target("memory", "many-small", 4, "ours", "replicated", 0.4),
    Target("memory", "gpt2", 2, "ours", "replicated", 0.7),
    Target("memory", "gpt2", 4, "ours", "replicated", 0.4),
    Target("balance", "gpt2", 4, "ours", bound=1.01),
    Target("balance", "gpt2", 4, "zero-bucket"),
    Target("balance", "gpt2", 4, "zero"),
    Target("balance", "gpt2", 4, "fsdp2"),
)


def _rows(cfg: Config) -> list[str]:
    rows = []
    for name in cfg.contenders:
        rows.append(name)
        if name == "fsdp2":
            rows.append("fsdp2 step only")
    return rows


def targets(results: dict) -> list[tuple[str, float, float, str]]:
    """(what, measured ratio, bound, met?) for the targets in ``TARGETS`` that the run covers."""
    out = []
    for t in TARGETS:
        run = results.get(t.world, {}).get(t.set, {})
        if t.contender not in run or (t.kind != "balance" and t.peer not in run):
            continue
        entry, peer = run[t.contender], run.get(t.peer)
        if t.kind == "step":
            what = f"step, {t.contender} / {t.peer}"
            num, den = median_ms(entry["times"]), median_ms(peer["times"])
        elif t.kind == "memory":
            what = f"memory, {t.contender} / {t.peer}"
            num, den = max(entry["bytes"]), max(peer["bytes"])
        else:
            what = f"memory max/mean, {t.contender}"
            num, den = max(entry["bytes"]), sum(entry["bytes"]) / len(entry["bytes"])
        if den > 0:
            ratio = num / den
            verdict = "met" if ratio <= t.bound else "MISSED"
            if math.isnan(t.bound):
                verdict = "(reference)"
            out.append((f"{t.set}, {t.world} ranks: {what}", ratio, t.bound, verdict))
    return out


def render(results: dict, cfg: Config, meta: dict) -> str:
    worlds = sorted(results)
    lines = [
        f"# Optimizer step: {meta['device_name']}, {cfg.backend}",
        "",
        f"float32; lr={cfg.lr}, alpha={cfg.alpha}, momentum={cfg.momentum}, "
        f"centered={cfg.centered}; "
        f"median of {cfg.repeats} steps after {cfg.warmup} warm-up steps per contender, contenders "
        f"round-robin within each repeat; a step's time is its slowest rank's. torch "
        f"{meta['torch']}, {meta['threads']}. Load average {meta['load_before']:.1f} before, "
        f"{meta['load_after']:.1f} after (other jobs shared the machine). "
        f"Total {meta['seconds']:.0f} s.",
        "",
        "Step = update + parameter sync (fsdp2: step + `unshard()`, its all-gather; `fsdp2 step "
        "only` is the step alone). Memory = optimizer-owned tensors per rank: state buffers; for "
        "ours also the gradient window (16 MiB at most) and step counters. Parameters and "
        "gradients are not counted (ZeRO's bucket views are the parameters themselves; FSDP2 "
        "also shards the parameters and gradients, 1/N per rank, not shown).",
    ]
    if cfg.device == "cpu" and max(worlds) > (cores() or 1):
        lines.append(
            f"\nThis machine has {cores()} cores; world sizes above {cores()} "
            f"oversubscribe them (1 thread per rank), so their times include waiting for a core."
        )
    for s in cfg.sets:
        info = meta["sets"][s]
        lines += [
            "",
            f"## {s}: {info['params']} tensors, {info['numel'] / 1e6:.2f} M elements "
            f"({info['numel'] * 4 / MIB:.0f} MiB fp32)",
            "",
            "1-minute load average when this set started (this benchmark's ranks included): "
            + ", ".join(
                f"{_ranks(w)} {meta['load_per_run'][str(w)][s]:.1f}"
                for w in worlds
                if s in meta.get("load_per_run", {}).get(str(w), {})
            )
            + f" (the machine has {cores()} cores).",
            "",
            "Step time, ms (median; [quartiles]):",
            "",
            *_table(results, s, _rows(cfg), worlds, _time_cell),
            "",
            *_agreement_lines(results, s, worlds, cfg),
            "",
            "Optimizer memory per rank, MiB: max / min over ranks (max/mean):",
            "",
            *_table(results, s, cfg.contenders, worlds, _memory_cell),
        ]
    found = targets(results)
    if found:
        lines += [
            "",
            "## Targets (ratios within this run)",
            "",
            "| target | ratio | bound | |",
            "| --- | ---: | ---: | --- |",
        ]
        for what, ratio, bound, verdict in found:
            b = "" if bound != bound else f"{bound:.2f}"
            lines.append(f"| {what} | {ratio:.3f} | {b} | {verdict} |")
    return "\n".join(lines) + "\n"


def _ranks(world: int) -> str:
    return f"{world} rank{'s' if world > 1 else ''}"


def _table(
    results: dict, s: str, names: Iterable[str], worlds: list[int], cell: Callable[[dict], str]
) -> list[str]:
    """A markdown table of set ``s``: a row per contender of ``names``, a column per world
    size, ``cell`` of its entry (empty where it did not run)."""
    lines = [
        "| contender | " + " | ".join(_ranks(w) for w in worlds) + " |",
        "| --- |" + " ---: |" * len(worlds),
    ]
    for name in names:
        entries = (results[w].get(s, {}).get(name) for w in worlds)
        cells = ["" if e is None else cell(e) for e in entries]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _time_cell(e: dict) -> str:
    lo, hi = quartiles_ms(e["times"])
    return f"{median_ms(e['times']):.1f} [{lo:.0f}-{hi:.0f}]"


def _memory_cell(e: dict) -> str:
    b = e["bytes"]
    mean = sum(b) / len(b)
    return f"{max(b) / MIB:.1f} / {min(b) / MIB:.1f} ({max(b) / mean if mean else 0:.2f})"


def _agreement_lines(results: dict, s: str, worlds: list[int], cfg: Config) -> list[str]:
    """What the agreement at the start of each step() costs, within those steps."""
    cells = {}
    for name in cfg.contenders:
        for w in worlds:
            e = results[w].get(s, {}).get(name)
            if e is not None and "agreement_s" in e:
                ms = e["agreement_s"] * 1e3
                cells.setdefault(name, []).append(
                    f"{_ranks(w)} {ms:.3f} ms ({ms / median_ms(e['times']):.1%})"
                )
    if not cells:
        return []
    return [
        "The ranks' agreement at the start of each `step()` (building the facts and one host "
        "all-reduce of their digests), median per step of the slowest rank, and its share of "
        "the step: " + "; ".join(f"{name}: {', '.join(c)}" for name, c in cells.items()) + "."
    ]


def plot(results: dict, cfg: Config, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted(results)
    written = []
    for kind in ("time", "memory"):
        fig, axes = plt.subplots(1, len(cfg.sets), figsize=(5 * len(cfg.sets), 4), squeeze=False)
        for ax, s in zip(axes[0], cfg.sets):
            names = _rows(cfg) if kind == "time" else list(cfg.contenders)
            for name in names:
                ws = [w for w in worlds if name in results[w].get(s, {})]
                if not ws:
                    continue
                style = STYLE.get(name, {})
                if kind == "time":
                    ys = [median_ms(results[w][s][name]["times"]) for w in ws]
                    ax.plot(ws, ys, label=name, **style)
                else:
                    hi = [max(results[w][s][name]["bytes"]) / MIB for w in ws]
                    lo = [min(results[w][s][name]["bytes"]) / MIB for w in ws]
                    (line,) = ax.plot(ws, hi, label=name, **style)
                    ax.fill_between(ws, lo, hi, color=line.get_color(), alpha=0.15)
            ax.set_title(s)
            ax.set_xlabel("ranks")
            ax.set_xticks(worlds)
            ax.set_ylabel(
                "step, ms (median)" if kind == "time" else "optimizer MiB per rank (max; band: min)"
            )
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(
            f"Optimizer step ({cfg.backend}, momentum={cfg.momentum}, centered={cfg.centered}): "
            + ("time" if kind == "time" else "memory")
        )
        fig.tight_layout()
        path = stem.with_name(stem.name + f"_{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
