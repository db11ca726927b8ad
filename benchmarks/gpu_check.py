"""The GPU proof in one call: every CUDA path of the library run and measured, in under 8 minutes.

Run from the repository root on a machine with a CUDA GPU::

    python3 -m benchmarks.gpu_check                    # every part; report in benchmarks/results/
    python3 -m benchmarks.gpu_check --out "$OUT"       # the report elsewhere
    python3 -m benchmarks.gpu_check --dry-run          # on a CPU: the report's skeleton
    python3 -m benchmarks.gpu_check --parts kernels train --budget 200

It installs nothing: the python it runs with must already hold torch (a CUDA build), triton and
pytest; the package comes from the working tree (``PYTHONPATH``). The parts run one after
another, each in its own process (``benchmarks/gpu_parts.py``) under its own time limit, never
past the whole budget, keeping enough for the parts after it. A part that fails or runs out of
time loses only its own unfinished measurements: each part writes its results as it goes, and
the report (``gpu_<device>.md`` beside the raw ``gpu_<device>.json``) is rewritten after every
part. The summary is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["PARTS", "Budget", "Outcome", "Part", "Report", "main", "parse_args", "slug"]


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    limit: float  # seconds it may take at most
    floor: float  # seconds without which it is not worth starting
    needs_cuda: bool = True


PARTS = (
    Part("environment", "python, packages and the device, as found", 30, 10, needs_cuda=False),
    Part("cuda_tests", "every test marked `cuda`, at one rank", 150, 60),
    Part("kernels", "update kernels against copy bandwidth and torch, 1 M to 256 M", 110, 40),
    Part("train", "launch/train.py at world size 1 under torchrun with NCCL", 110, 50),
    Part("two_ranks", "two ranks on the one GPU through gloo: sync, checkpoints", 90, 40),
    Part("host_syncs", "host synchronisations of step(), CUDA graph capture", 45, 20),
)


@dataclass
class Budget:
    """The whole run's seconds, shared out so that each part keeps time for those after it."""

    total: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def remaining(self) -> float:
        return self.total - (self.clock() - self.start)

    def limit_for(self, part: Part, later: Sequence[Part]) -> float:
        """Seconds ``part`` may run: its own limit, within what is left after the floors of
        the ``later`` parts; 0 if that is under its own floor."""
        seconds = min(part.limit, self.remaining() - sum(p.floor for p in later))
        return seconds if seconds >= part.floor else 0.0


@dataclass
class Outcome:
    """What became of one part."""

    part: str
    status: str  # passed, failed, timed out, skipped
    seconds: float = 0.0
    limit: float = 0.0
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def slug(text: str) -> str:
    """A file-name-safe lower-case form: ``NVIDIA H200`` -> ``nvidia_h200``."""
    return "_".join("".join(c if c.isalnum() else " " for c in text.lower()).split()) or "unknown"


# -- the report -----------------------------------------------------------------------------


class Report:
    """The markdown report and the raw JSON, rewritten after every part."""

    def __init__(self, out: Path, command: str, dry_run: bool) -> None:
        self.out, self.command, self.dry_run = out, command, dry_run
        self.outcomes: list[Outcome] = []
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    @property
    def device(self) -> str:
        env = self.data_of("environment")
        return env.get("device", {}).get("name") or ("cpu dry run" if self.dry_run else "unknown")

    @property
    def stem(self) -> str:
        return f"gpu_{slug(self.device)}"

    def data_of(self, part: str) -> dict[str, Any]:
        return next((o.data for o in self.outcomes if o.part == part), {})

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.write()

    def write(self) -> tuple[Path, Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        markdown, raw = self.out / f"{self.stem}.md", self.out / f"{self.stem}.json"
        raw.write_text(
            json.dumps(
                {
                    "command": self.command,
                    "started": self.started,
                    "device": self.device,
                    "parts": [o.__dict__ for o in self.outcomes],
                },
                indent=1,
                default=str,
            )
        )
        markdown.write_text(self.markdown())
        return markdown, raw

    def markdown(self) -> str:
        lines = [
            f"# GPU check: {self.device}",
            "",
            f"`{self.command}`, started {self.started}.",
            "",
            "| part | status | seconds (limit) | headline |",
            "| --- | --- | ---: | --- |",
        ]
        for outcome in self.outcomes:
            lines.append(
                f"| {outcome.part} | {outcome.status} | {outcome.seconds:.0f} "
                f"({outcome.limit:.0f}) | {headline(outcome)} |"
            )
        for outcome in self.outcomes:
            part = next(p for p in PARTS if p.name == outcome.part)
            lines += ["", f"## {outcome.part}: {part.what}", "", f"Status: {outcome.status}."]
            if outcome.note:
                lines += ["", outcome.note]
            if outcome.data:
                lines += ["", *section(outcome)]
        return "\n".join(lines).rstrip() + "\n"

    def summary(self) -> str:
        width = max(len(o.part) for o in self.outcomes) if self.outcomes else 0
        return "\n".join(
            f"{o.part:<{width}}  {o.status:<9} {o.seconds:5.0f} s  {headline(o)}"
            for o in self.outcomes
        )


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
    if outcome.part == "kernels" and data.get("rows"):
        best = _kernel_headline(data["rows"])
        return best or ""
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
    if outcome.part == "host_syncs" and data.get("phases"):
        syncs = ", ".join(f"{p['phase']}: {p['syncs']}" for p in data["phases"])
        graph = data.get("cuda_graph", {})
        if graph:
            syncs += "; CUDA graph " + ("captured" if graph.get("captured") else "not captured")
        return "syncs per " + syncs
    return ""


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
    if "copy_gbs" not in data:
        return _raw(data)
    lines = [
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


def _host_syncs_section(data: dict[str, Any]) -> list[str]:
    lines = ["| phase | host synchronisations | where |", "| --- | ---: | --- |"]
    for p in data.get("phases", []):
        lines.append(f"| {p['phase']} | {p['syncs']} | {', '.join(p['where'])} |")
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
    "host_syncs": _host_syncs_section,
}


# -- running the parts --------------------------------------------------------------------------


def run_part(part: Part, seconds: float, workdir: Path) -> Outcome:
    """Run ``part`` in its own process for at most ``seconds``; what it wrote survives."""
    results, log = workdir / f"{part.name}.json", workdir / f"{part.name}.log"
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpu_parts",
        part.name,
        "--json",
        str(results),
        "--seconds",
        str(seconds),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    start = time.monotonic()
    with log.open("w") as sink:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=seconds)
            status = "passed" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the part and whatever it started
            process.wait()
            status = "timed out"
    data = json.loads(results.read_text()) if results.exists() else {}
    note = ""
    if status != "passed":
        tail = log.read_text(errors="replace")[-1500:].strip()
        note = f"Log tail:\n\n```\n{tail}\n```" if tail else ""
    return Outcome(part.name, status, time.monotonic() - start, seconds, note, data)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="where the report goes (default: benchmarks/results)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=420,
        help="seconds for all the parts together (default: 420)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=[p.name for p in PARTS],
        default=[p.name for p in PARTS],
        help="the parts to run, in order",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="skip every part that needs CUDA, and say so (for a CPU)",
    )
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error("--budget must be positive")
    return args


def main(argv: Sequence[str] | None = None, runner: Callable[..., Outcome] = run_part) -> int:
    args = parse_args(argv)
    chosen = [p for p in PARTS if p.name in args.parts]
    command = "python3 -m benchmarks.gpu_check " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report = Report(args.out, command.strip(), args.dry_run)
    budget = Budget(args.budget)
    workdir = args.out / "gpu_check_logs"  # each part's raw results and log
    workdir.mkdir(parents=True, exist_ok=True)
    for index, part in enumerate(chosen):
        cuda = report.data_of("environment").get("cuda_available")
        if part.needs_cuda and (args.dry_run or cuda is False):
            why = "dry run" if args.dry_run else "torch sees no CUDA device"
            report.add(Outcome(part.name, "skipped", note=f"Needs CUDA ({why})."))
            continue
        seconds = budget.limit_for(part, chosen[index + 1 :])
        if seconds <= 0:
            report.add(Outcome(part.name, "skipped", note="No time left in the budget."))
            continue
        print(f"[gpu_check] {part.name}: up to {seconds:.0f} s", flush=True)
        report.add(runner(part, seconds, workdir))
    markdown, raw = report.write()
    print(f"\n[gpu_check] report: {markdown} and {raw}\n{report.summary()}", flush=True)
    return 0 if all(o.status in ("passed", "skipped") for o in report.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
