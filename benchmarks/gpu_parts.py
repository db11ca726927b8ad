"""The parts of the GPU check (see ``benchmarks/gpu_check.py``), one per process.

``python -m benchmarks.gpu_parts PART --json FILE`` runs one part and rewrites ``FILE`` after
every measurement, so that a part killed at its time limit still leaves what it found. Each
part uses the python it runs in as it is (a GPU machine reaches no package index). The parts
that measure are modules of their own: ``gpu_kernels.py`` (``kernels``), ``gpu_training.py``
(``train_modes``) and ``gpu_host_syncs.py`` (``host_syncs``); each takes a ``device``, and
``--rehearse`` runs it on the CPU at the small sizes of :data:`REHEARSALS` (what
``gpu_check.py --dry-run`` and the tests do).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "PARTS",
    "REHEARSALS",
    "Recorder",
    "parse_junit",
    "parse_train_summary",
    "parse_verbose",
]


class Recorder:
    """A part's results, written to its JSON file after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.write()

    def append(self, key: str, value: Any) -> None:
        self.data.setdefault(key, []).append(value)
        self.write()

    def write(self) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=1, default=str))
        partial.replace(self.path)  # a reader never sees half a file


# -- parsers (pure: tested on CPU) -------------------------------------------------------------


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts, failures and the slowest tests of a pytest ``--junitxml`` report."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {
        key: sum(int(s.get(key, 0)) for s in suites)
        for key in ("tests", "failures", "errors", "skipped")
    }
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed, timings = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        timings.append((float(case.get("time", 0)), name))
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failed.append({"test": name, "message": message[0][:300] if message else ""})
    slowest = [{"test": name, "seconds": round(t, 2)} for t, name in sorted(timings)[::-1][:5]]
    return {**counts, "failed": failed, "slowest": slowest}


_VERBOSE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.MULTILINE)


def parse_verbose(log: str) -> dict[str, Any]:
    """What ``pytest -v`` output says about the tests that ran (when there is no report)."""
    outcomes = _VERBOSE.findall(log)
    count = lambda *kinds: sum(kind in kinds for _, kind in outcomes)  # noqa: E731
    failed = [
        {"test": test, "message": kind} for test, kind in outcomes if kind in ("FAILED", "ERROR")
    ]
    return {
        "tests": len(outcomes),
        "passed": count("PASSED", "XFAIL", "XPASS"),
        "failures": count("FAILED"),
        "errors": count("ERROR"),
        "skipped": count("SKIPPED"),
        "failed": failed,
        "slowest": [],
        "incomplete": True,
    }


_SUMMARY = re.compile(
    r"summary: train loss (?P<loss_start>[\d.]+) -> (?P<loss_end>[\d.]+|nan|inf) \| "
    r"val loss (?P<val_start>[\d.]+) -> (?P<val_end>[\d.]+|nan|inf) \| "
    r"(?P<steps>\d+) steps in (?P<seconds>[\d.]+) s, (?P<rate>[\d.]+)(?P<unit>[kMG]?) tokens/s"
)
_MEMORY = re.compile(r"memory (?P<formula>[\d.]+) MiB per rank vs (?P<replicated>[\d.]+) MiB")
_PEAK = re.compile(r"cuda peak (?P<peak>[\d.]+) MiB allocated")
_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}


def parse_train_summary(log: str) -> dict[str, Any] | None:
    """The figures of ``launch/train.py``'s summary line, or None if there is none."""
    found = _SUMMARY.search(log)
    if found is None:
        return None
    figures: dict[str, Any] = {
        "loss_start": float(found["loss_start"]),
        "loss_end": float(found["loss_end"]),
        "val_start": float(found["val_start"]),
        "val_end": float(found["val_end"]),
        "steps": int(found["steps"]),
        "seconds": float(found["seconds"]),
        "tokens_per_s": float(found["rate"]) * _UNITS[found["unit"]],
    }
    memory = _MEMORY.search(log[found.start() :])
    if memory is not None:
        figures["formula_mib"] = float(memory["formula"])
        figures["replicated_mib"] = float(memory["replicated"])
    peak = _PEAK.search(log[found.start() :])
    if peak is not None:
        figures["cuda_peak_mib"] = float(peak["peak"])
    return figures


# -- the parts -----------------------------------------------------------------------------------


def environment(out: Recorder, seconds: float) -> None:
    """The python, the packages and the device, as found."""
    versions = {}
    for package in ("torch", "triton", "numpy", "pytest", "mpi4py", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    out["python"] = platform.python_version()
    out["versions"] = versions
    out["host"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    import torch

    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        out["device"] = {
            "name": properties.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        }


def _pytest(out: Recorder, seconds: float, selection: list[str]) -> None:
    """Run pytest on ``selection`` (CUDA tests), record its counts."""
    with tempfile.TemporaryDirectory() as workdir:
        report = Path(workdir) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "cuda"]
        command += ["--continue-on-collection-errors", f"--junitxml={report}", *selection]
        out["command"] = " ".join(command[1:])
        start = time.perf_counter()
        code, log = _run(command, seconds - 5)
        out["seconds"] = round(time.perf_counter() - start, 1)
        out["exit_code"] = code
        out["tail"] = log[-3000:]
        # pytest writes its report at the end; cut short, the verbose lines say how far it got
        out["results"] = parse_junit(report) if report.exists() else parse_verbose(log)
    if code != 0:
        raise SystemExit(f"pytest: {code}")


def cuda_tests(out: Recorder, seconds: float) -> None:
    """Every test marked ``cuda`` at one rank (the two-rank ones are their own part)."""
    _pytest(out, seconds, ["tests", "-k", "not two_ranks"])


def two_ranks(out: Recorder, seconds: float) -> None:
    """Two ranks on the one GPU through gloo (NCCL refuses two ranks on one device): the
    sync with CUDA tensors, the control tensors' placement, checkpoints saved on CUDA and
    loaded at another world size. NCCL at world size > 1 stays untested."""
    out["note"] = "gloo on CUDA tensors; NCCL at world size > 1 is untested (one GPU)"
    _pytest(out, seconds, ["tests/test_cuda.py", "-k", "two_ranks"])


#: launch/train.py's model and run for the GPU check: a few seconds of a GPU's time each.
TRAIN_ARGS = (
    "--n-layer 6 --n-head 6 --n-embd 384 --block-size 128 --batch-size 32 --max-steps 300 "
    "--eval-every 0 --log-every 50"
).split()


def train(out: Recorder, seconds: float) -> None:
    """``launch/train.py`` at world size 1 under torchrun with NCCL, float32 then bfloat16."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for index, dtype in enumerate(("float32", "bfloat16")):
        command = [*torchrun, "--nproc_per_node", "1", "launch/train.py", "--backend", "nccl"]
        command += ["--dtype", dtype, *TRAIN_ARGS]
        start = time.perf_counter()
        # the first run may take half of what is left, the second all of it
        code, log = _run(command, seconds / (2 - index) - 5)
        seconds -= time.perf_counter() - start
        out[dtype] = {
            "command": " ".join(["torchrun", *command[4:]]),
            "exit_code": code,
            "figures": parse_train_summary(log),
            "tail": log[-2000:],
        }
    if any(out.data[dtype]["exit_code"] != 0 for dtype in ("float32", "bfloat16")):
        raise SystemExit("a training run failed")


def _run(command: list[str], seconds: float) -> tuple[int | str, str]:
    """Run ``command`` from the repository root, with the package from the working tree and
    Triton compiling (not interpreting); its exit code ("timed out" past ``seconds``) and
    output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    try:
        proc = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(seconds, 1)
        )
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as error:
        return "timed out", _text(error.stdout) + _text(error.stderr)


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


def _imported(module: str, name: str) -> Callable[..., None]:
    """The part ``name`` of ``benchmarks.<module>``, imported when it runs (so that the
    environment part reports the versions even where torch fails to import)."""

    def part(*args: Any, **kwargs: Any) -> None:
        getattr(importlib.import_module(f"benchmarks.{module}"), name)(*args, **kwargs)

    return part


kernels = _imported("gpu_kernels", "kernels")
train_modes = _imported("gpu_training", "train_modes")
host_syncs = _imported("gpu_host_syncs", "host_syncs")

PARTS: dict[str, Callable[..., None]] = {
    "environment": environment,
    "cuda_tests": cuda_tests,
    "kernels": kernels,
    "train": train,
    "train_modes": train_modes,
    "two_ranks": two_ranks,
    "host_syncs": host_syncs,
}


#: How each part that can be rehearsed runs its own code on the CPU, small (``--rehearse``;
#: ``gpu_check.py --dry-run`` runs them).
REHEARSALS: dict[str, dict[str, Any]] = {
    "kernels": {"device": "cpu", "sizes": (0.01,), "variant_millions": 0.01},
    "train_modes": {"device": "cpu", "models": ("small",), "warmup": 1, "repeats": 2},
    "host_syncs": {"device": "cpu"},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--seconds", type=float, default=600, help="this part's time limit")
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help=f"run on the CPU, small (parts {', '.join(REHEARSALS)})",
    )
    args = parser.parse_args(argv)
    if args.rehearse and args.part not in REHEARSALS:
        parser.error(f"{args.part} has no CPU rehearsal")
    settings = REHEARSALS[args.part] if args.rehearse else {}
    PARTS[args.part](Recorder(args.json), args.seconds, **settings)


if __name__ == "__main__":
    main()
