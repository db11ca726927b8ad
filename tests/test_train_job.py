"""End-to-end tests of ``launch/train.py``: the real job, run as subprocesses."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(REPO_ROOT / "launch" / "train.py")
TIMEOUT_S = 180

SUMMARY = re.compile(r"summary: loss (\S+) -> (\S+) \|")
MEMORY = re.compile(
    r"optimizer state rank (\d+): ([0-9.]+) MiB sharded vs ([0-9.]+) MiB replicated"
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def run_single(*args: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, TRAIN, *args])


def run_torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    return _run(
        [
            sys.executable, "-m", "torch.distributed.run",
            "--standalone", f"--nproc-per-node={nproc}",
            TRAIN, *args,
        ]
    )


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def summary_losses(proc: subprocess.CompletedProcess[str]) -> tuple[float, float]:
    """``(start, end)`` from the summary line, which must be the last line of stdout."""
    lines = proc.stdout.strip().splitlines()
    assert lines, _describe(proc)
    match = SUMMARY.search(lines[-1])
    assert match, f"last line is not the summary: {lines[-1]!r}\n{_describe(proc)}"
    start, end = float(match.group(1)), float(match.group(2))
    assert math.isfinite(start) and math.isfinite(end), lines[-1]
    return start, end


def memory_lines(proc: subprocess.CompletedProcess[str]) -> dict[int, tuple[float, float]]:
    return {
        int(m.group(1)): (float(m.group(2)), float(m.group(3)))
        for m in MEMORY.finditer(proc.stdout)
    }


def assert_state_sharded(proc: subprocess.CompletedProcess[str], world_size: int) -> None:
    """Each rank's state lines exist and together hold one replica's worth, not ``world_size``."""
    memory = memory_lines(proc)
    assert set(memory) == set(range(world_size)), _describe(proc)
    sharded_total = sum(sharded for sharded, _ in memory.values())
    replicated = memory[0][1]
    # The printed MiB are rounded to 4 decimals: allow that much per rank.
    assert sharded_total <= replicated + 1e-4 * world_size, _describe(proc)


def test_single_process_runs() -> None:
    proc = run_single("--max-steps", "3")
    assert proc.returncode == 0, _describe(proc)
    summary_losses(proc)
    assert set(memory_lines(proc)) == {0}, _describe(proc)


def test_two_ranks_run() -> None:
    proc = run_torchrun("--max-steps", "3")
    assert proc.returncode == 0, _describe(proc)
    summary_losses(proc)
    assert_state_sharded(proc, world_size=2)
    assert "world size 2" in proc.stdout


def test_two_ranks_momentum_centered_run() -> None:
    proc = run_torchrun(
        "--max-steps", "3", "--momentum", "0.9", "--centered", "--weight-decay", "1e-4"
    )
    assert proc.returncode == 0, _describe(proc)
    summary_losses(proc)
    assert_state_sharded(proc, world_size=2)


def test_loss_falls() -> None:
    proc = run_torchrun("--max-steps", "60")
    assert proc.returncode == 0, _describe(proc)
    start, end = summary_losses(proc)
    assert end < 0.5 * start, f"loss did not fall enough: {start} -> {end}"


def test_unknown_flag_rejected() -> None:
    proc = run_single("--no-such-flag", "1")
    assert proc.returncode != 0, _describe(proc)
    assert "unrecognized arguments" in proc.stderr, _describe(proc)


@pytest.mark.parametrize(
    ("flag", "value"), [("--batch-size", "0"), ("--max-steps", "0")]
)
def test_impossible_values_rejected(flag: str, value: str) -> None:
    proc = run_single(flag, value)
    assert proc.returncode != 0, _describe(proc)
    assert f"{flag} must be at least 1" in proc.stderr, _describe(proc)
