"""``bench_training.py``'s report: the markdown tables (:func:`render`), the issue's goals at 2
ranks (:func:`goals`, against the best peer: :func:`best_peer`) and the plot (:func:`plot`),
from the results and metadata of a run (measured now, or read back from its ``.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from contenders import available
from harness import median_ms, quartiles_ms
from training_timing import LEFT_OUT_ABOVE_2_RANKS
from workloads import GPT_BATCH, GPT_SHAPE, LINEAR_BATCH, build_model

if TYPE_CHECKING:
    from bench_training import Config

#: The peers (the best of them is the yardstick of goals ii and iii).
PEERS = ("ddp+rmsprop", "torch zero", "fairscale oss", "deepspeed zero-1", "deepspeed zero-2")
PHASES = ("fwd+bwd+step", "bwd+step", "step")


def _median(entry: dict, phase: str) -> float:
    return median_ms(entry[phase])


def best_peer(run: dict, phase: str) -> tuple[str, float] | None:
    """The peer with the lowest median ``phase`` in ``run`` (a model at one world size)."""
    found = [(n, _median(run[n], phase)) for n in PEERS if n in run]
    return min(found, key=lambda x: x[1]) if found else None


#: Our modes the goals are stated for: the step's sync blocking, or left behind the forward
#: (whose "step" is then the update alone: its goal (ii) is shown for the record only).
GOAL_MODES = ("ours reduce-scatter", "ours rs + overlapped sync")


def goals(results: dict, world: int = 2) -> list[tuple[str, str, float, float, float, str]]:
    """(model, goal, ours ms, yardstick ms, ratio vs bound, verdict) at ``world`` ranks, for
    each of :data:`GOAL_MODES` that ran."""
    out = []
    for model_name, m in results.get(world, {}).items():
        run = m["contenders"]
        checks = []
        if "ddp+rmsprop" in run:
            checks.append(
                ("(i) fwd+bwd+step <= 1.0x ddp+rmsprop", "fwd+bwd+step", "ddp+rmsprop", 1.0)
            )
        for label, phase, bound in (
            ("(ii) step <= 0.5x best peer's step", "step", 0.5),
            ("(iii) bwd+step <= 0.7x best peer's bwd+step", "bwd+step", 0.7),
        ):
            bp = best_peer(run, phase)
            if bp is not None:
                checks.append((label, phase, bp[0], bound))
        for ours in (mode for mode in GOAL_MODES if mode in run):
            if "ddp+rmsprop" in run:
                a, b = run[ours]["back to back"] * 1e3, run["ddp+rmsprop"]["back to back"] * 1e3
                verdict = f"{'MET' if a <= b else 'MISSED'} ({a / b:.2f} vs 1.0)"
                label = "(i) back to back <= 1.0x ddp+rmsprop [ddp+rmsprop]"
                out.append((model_name, f"`{ours}`: {label}", a, b, a / b, verdict))
            for label, phase, peer, bound in checks:
                a, b = _median(run[ours], phase), _median(run[peer], phase)
                ratio = a / b
                verdict = f"{'MET' if ratio <= bound else 'MISSED'} ({ratio:.2f} vs {bound})"
                if phase != "fwd+bwd+step" and "overlapped" in ours:
                    verdict = f"({ratio:.2f}; the sync is in the next forward)"
                out.append((model_name, f"`{ours}`: {label} [{peer}]", a, b, ratio, verdict))
    return out


def render(results: dict, cfg: Config, meta: dict) -> str:
    """The markdown of a run; ``meta["note"]``, where a saved run's ``.json`` has one (added by
    hand: what its command does not say, such as the venv and the commit it ran at), follows
    the command."""
    worlds = sorted(results)
    versions = meta["peers"]
    lines = [
        f"# Training iterations: {meta['cpu']}, {meta['cores']} cores, gloo",
        "",
        f"Command: `{meta['command']}`" + (f" {meta['note']}" if "note" in meta else ""),
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} logical cores, 1 thread per rank; torch "
        f"{meta['torch']}; fairscale {versions['fairscale']}; deepspeed {versions['deepspeed']}. "
        f"Load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after (other "
        f"jobs shared the machine). Total {meta['seconds']:.0f} s.",
        "",
        f"float32; RMSprop lr={cfg.lr}, alpha={cfg.alpha}, eps={cfg.eps}, "
        f"momentum={cfg.momentum}, centered={cfg.centered} for every contender; different data "
        f"on every rank. Median over {cfg.repeats} iterations after {cfg.warmup} warm-up "
        "iterations per contender, contenders round-robin within each repeat (the first one "
        "rotating); [quartiles]. Each phase (forward, backward, step) starts after a barrier and "
        "its time is the slowest rank's; a = forward+backward+step, b = backward+step, c = step "
        "alone (update + parameter sync; DeepSpeed: `engine.step()`). The backward includes the "
        "gradient reduction as each contender does it. d = the same number of iterations again, "
        "each contender alone, back to back with no barrier between phases or iterations (what "
        "a contender leaves running at the end waited for inside the time): the mean iteration, "
        "slowest rank; it includes what the barriers of a-c leave out (the time a sync left "
        "running can use while ranks wait for each other). Host-shared buffers off.",
    ]
    if max(worlds) > (meta["cores"] or 1):
        lines += [
            "",
            f"This machine has {meta['cores']} cores: at world sizes above {meta['cores']} the "
            "ranks (1 thread each) oversubscribe them, so those times include waiting for a core "
            "and are less stable.",
        ]
    skipped = [n for n in cfg.contenders if not available(n, versions)]
    if skipped:
        lines += ["", "Not installed in this run's venv, skipped: " + ", ".join(skipped) + "."]
    if max(worlds) > 2:
        lines += [
            "",
            "Above 2 ranks without " + ", ".join(LEFT_OUT_ABOVE_2_RANKS) + " (with all nine "
            "contenders, 4 ranks outgrew this machine's 24 GB on many-small).",
        ]
    for w in worlds:
        for model_name in cfg.models:
            m = results[w].get(model_name)
            if m is None:
                continue
            run = m["contenders"]
            lines += [
                "",
                f"## {model_name}, {w} ranks",
                "",
                f"{_describe(model_name)}. 1-minute load average before: "
                f"{meta['load'][str(w)][model_name]:.1f}.",
                "",
                "| contender | a: fwd+bwd+step ms | b: bwd+step ms | c: step ms "
                "| a / ddp | b / ddp | c / ddp | a / best peer | b / best peer | c / best peer "
                "| d: back to back ms | d / ddp |",
                "| --- |" + " ---: |" * 11,
            ]
            bests = {ph: best_peer(run, ph) for ph in PHASES}
            for name in cfg.contenders:
                e = run.get(name)
                if e is None:
                    continue
                cells = []
                for ph in PHASES:
                    lo, hi = quartiles_ms(e[ph])
                    cells.append(f"{_median(e, ph):.1f} [{lo:.1f}-{hi:.1f}]")
                for ph in PHASES:
                    d = run.get("ddp+rmsprop")
                    cells.append(f"{_median(e, ph) / _median(d, ph):.2f}" if d else "")
                for ph in PHASES:
                    bp = bests[ph]
                    cells.append(f"{_median(e, ph) / bp[1]:.2f}" if bp else "")
                d = run.get("ddp+rmsprop", {}).get("back to back")
                cells.append(f"{e['back to back'] * 1e3:.1f}")
                cells.append(f"{e['back to back'] / d:.2f}" if d else "")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines += [
                "",
                "Best peer (of "
                + ", ".join(n for n in PEERS if n in run)
                + "): "
                + "; ".join(f"{ph}: {bests[ph][0]}" for ph in PHASES if bests[ph])
                + ".",
            ]
            parity = m.get("parity", {})
            proto = parity.get("ours rs via grad hooks (prototype)")
            healthy = all(
                e["losses_finite"] and not e["skipped_steps"] for e in m["contenders"].values()
            )
            lines += [
                "",
                "Every contender's losses finite and no step skipped: "
                + (
                    "yes."
                    if healthy
                    else "NO: "
                    + ", ".join(
                        f"{n} (finite {e['losses_finite']}, skipped {e['skipped_steps']})"
                        for n, e in m["contenders"].items()
                    )
                ),
            ]
            if proto is not None:
                lines += [
                    "",
                    f"Parameters after {m['iterations']} iterations, prototype vs `ours "
                    f"reduce-scatter`: {'bit for bit equal' if proto['equal'] else 'NOT equal'} "
                    f"(max |diff| {proto['max_abs_diff']:.3g}). Others vs `ours reduce-scatter`: "
                    + ", ".join(
                        f"{n} {v['max_abs_diff']:.2g}"
                        for n, v in parity.items()
                        if n != "ours rs via grad hooks (prototype)"
                    )
                    + ".",
                ]
    found = goals(results)
    if found:
        lines += [
            "",
            "## Goals (2 ranks, medians within this run)",
            "",
            "| model | goal [yardstick] | ours ms | yardstick ms | verdict |",
            "| --- | --- | ---: | ---: | --- |",
        ]
        for model_name, what, a, b, _, verdict in found:
            lines.append(f"| {model_name} | {what} | {a:.1f} | {b:.1f} | {verdict} |")
    return "\n".join(lines) + "\n"


def _describe(model_name: str) -> str:
    module = build_model(model_name)
    n = sum(p.numel() for p in module.parameters())
    tensors = len(list(module.parameters()))
    if model_name == "gpt":
        s = GPT_SHAPE
        what = (
            f"GPT (launch/gpt.py) n_layer {s['n_layer']}, n_head {s['n_head']}, n_embd "
            f"{s['n_embd']}, block_size {s['block_size']}, vocab {s['vocab_size']}; batch "
            f"{GPT_BATCH} x {s['block_size']} tokens per rank"
        )
    else:
        what = (
            f"{model_name}: Linears in sequence, batch {LINEAR_BATCH} per rank, "
            "loss square().mean()"
        )
    return f"{what}; {tensors} tensors, {n / 1e6:.2f} M parameters"


def plot(results: dict, cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted(results)
    models = [m for m in cfg.models if any(m in results[w] for w in worlds)]
    fig, axes = plt.subplots(
        len(worlds), len(models), figsize=(5.5 * len(models), 4.2 * len(worlds)), squeeze=False
    )
    colors = {"fwd+bwd+step": "tab:blue", "bwd+step": "tab:orange", "step": "tab:green"}
    for row, w in enumerate(worlds):
        for col, model_name in enumerate(models):
            ax = axes[row][col]
            run = results[w].get(model_name, {}).get("contenders", {})
            names = [n for n in cfg.contenders if n in run]
            ys = range(len(names))
            height = 0.27
            for j, ph in enumerate(PHASES):
                ax.barh(
                    [y + (j - 1) * height for y in ys],
                    [_median(run[n], ph) for n in names],
                    height=height,
                    color=colors[ph],
                    label=ph,
                )
            ax.set_yticks(list(ys))
            ax.set_yticklabels(
                [n.replace(" (prototype)", "\n(prototype)") for n in names], fontsize=7
            )
            ax.invert_yaxis()
            ax.set_xlabel("ms (median, slowest rank)")
            ax.set_title(f"{model_name}, {w} ranks")
            ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Training iteration phases, CPU / gloo, 1 thread per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
