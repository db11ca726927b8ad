"""The GPU proof in one call: every CUDA path of the library run and measured, in under 8 minutes.

Run from the repository root on a machine with a CUDA GPU::

    python3 -m benchmarks.gpu_check                    # every part; report in benchmarks/results/
    python3 -m benchmarks.gpu_check --out "$OUT"       # the report elsewhere
    python3 -m benchmarks.gpu_check --dry-run          # on a CPU: the skeleton, parts rehearsed
    python3 -m benchmarks.gpu_check --parts kernels train --budget 200

It installs nothing: the python it runs with must already hold torch (a CUDA build), triton and
pytest; the package comes from the working tree (``PYTHONPATH``). The parts run one after
another, each in its own process (``benchmarks/gpu_parts.py``) under its own time limit, never
past the whole budget, keeping enough for the parts after it. A part that fails or runs out of
time loses only its own unfinished measurements: each part writes its results as it goes, and
the report (``gpu_<device>.md`` beside the raw ``gpu_<device>.json``) is rewritten after every
part. The summary is printed last.

A dry run (``--dry-run``, on a CPU) runs the environment part and rehearses the parts that
measure (kernels, train_modes, host_syncs: ``gpu_parts.REHEARSALS``) through the very command
line a GPU gets, on the CPU at small sizes, so that their report sections are written too;
the others are skipped and said so.
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

from benchmarks.gpu_report import headline, section

ROOT = Path(__file__).resolve().parent.parent

#: The note of a part rehearsed in a dry run.
REHEARSED = "CPU rehearsal (dry run): the part's own code on the CPU, small; not a GPU's figures."

__all__ = ["PARTS", "Budget", "Outcome", "Part", "Report", "main", "parse_args", "slug"]


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    limit: float  # seconds it may take at most
    floor: float  # seconds without which it is not worth starting
    needs_cuda: bool = True
    rehearsal: bool = False  # whether its code runs on the CPU in a dry run (gpu_parts.REHEARSALS)


PARTS = (
    Part("environment", "python, packages and the device, as found", 30, 10, needs_cuda=False),
    Part("cuda_tests", "every test marked `cuda`, at one rank", 150, 60),
    Part(
        "kernels",
        "update kernel variants and sizes against copy bandwidth and torch",
        110,
        40,
        rehearsal=True,
    ),
    Part("train", "launch/train.py at world size 1 under torchrun with NCCL", 110, 50),
    Part(
        "train_modes",
        "DDP + torch.optim.RMSprop beside ShardedRMSprop's sync modes, NCCL at world size 1",
        75,
        30,
        rehearsal=True,
    ),
    Part("two_ranks", "two ranks on the one GPU through gloo: sync, checkpoints", 90, 40),
    Part(
        "host_syncs",
        "host synchronisations in every training mode, CUDA graph",
        60,
        25,
        rehearsal=True,
    ),
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


# -- running the parts --------------------------------------------------------------------------


def run_part(part: Part, seconds: float, workdir: Path, rehearse: bool = False) -> Outcome:
    """Run ``part`` in its own process for at most ``seconds`` (on the CPU, small, if
    ``rehearse``); what it wrote survives."""
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
        *(["--rehearse"] if rehearse else []),
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
        help="on a CPU: rehearse the parts that can run their code there, skip the others",
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
        rehearse = part.needs_cuda and args.dry_run and part.rehearsal
        if part.needs_cuda and (args.dry_run or cuda is False) and not rehearse:
            why = "dry run" if args.dry_run else "torch sees no CUDA device"
            report.add(Outcome(part.name, "skipped", note=f"Needs CUDA ({why})."))
            continue
        seconds = budget.limit_for(part, chosen[index + 1 :])
        if seconds <= 0:
            report.add(Outcome(part.name, "skipped", note="No time left in the budget."))
            continue
        print(f"[gpu_check] {part.name}: up to {seconds:.0f} s", flush=True)
        if not rehearse:
            report.add(runner(part, seconds, workdir))
            continue
        outcome = runner(part, seconds, workdir, rehearse=True)
        outcome.note = "\n\n".join(filter(None, [REHEARSED, outcome.note]))
        report.add(outcome)
    markdown, raw = report.write()
    print(f"\n[gpu_check] report: {markdown} and {raw}\n{report.summary()}", flush=True)
    return 0 if all(o.status in ("passed", "skipped") for o in report.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
