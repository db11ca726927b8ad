"""End-to-end tests of ``launch/train.py``: the real job under torchrun and mpirun, as subprocesses.

Every run uses a tiny GPT so the file stays well under a few minutes on two cores; every
subprocess has a timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(REPO_ROOT / "launch" / "train.py")
MPIRUN = Path(sys.executable).parent / "mpirun"
TIMEOUT_S = 120

TINY = (
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
    "--batch-size", "4", "--eval-windows", "16",
)
SUMMARY = re.compile(r"summary: train loss (\S+) -> (\S+) \| val loss (\S+) -> (\S+) \|")
MEMORY = re.compile(
    r"optimizer state rank (\d+): ([0-9.]+) MiB sharded vs ([0-9.]+) MiB replicated"
)
LAUNCHER_VARS = re.compile(
    r"^(RANK|LOCAL_RANK|WORLD_SIZE|MASTER_ADDR|MASTER_PORT|OMPI_|PMI_|PMIX_|SLURM_|MV2_)"
)


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without any launcher's variables, one thread per rank."""
    env = {key: value for key, value in os.environ.items() if not LAUNCHER_VARS.match(key)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=REPO_ROOT, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def run_single(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, TRAIN, *args], **env)


def run_torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    return _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", TRAIN, *args]
    )


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def summary(proc: subprocess.CompletedProcess[str]) -> tuple[float, float, float, float]:
    """``(train start, train end, val start, val end)`` from the summary line, all finite."""
    match = SUMMARY.search(proc.stdout)
    assert match, f"no summary line\n{_describe(proc)}"
    values = tuple(float(group) for group in match.groups())
    assert all(math.isfinite(value) for value in values), match.group(0)
    return values  # type: ignore[return-value]


def assert_succeeded_sharded(proc: subprocess.CompletedProcess[str], world_size: int) -> None:
    """Exit 0, a finite loss, one memory line per rank adding up to one replica's worth."""
    assert proc.returncode == 0, _describe(proc)
    summary(proc)
    memory = {
        int(m.group(1)): (float(m.group(2)), float(m.group(3)))
        for m in MEMORY.finditer(proc.stdout)
    }
    assert set(memory) == set(range(world_size)), _describe(proc)
    replicated = memory[0][1]
    assert sum(sharded for sharded, _ in memory.values()) <= replicated + 1e-4 * world_size
    assert f"world size {world_size} " in proc.stdout
    # rank 0 talks, the others stay quiet
    assert all(line.startswith("[rank0]") for line in proc.stdout.splitlines()), _describe(proc)


def assert_failed_with(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode != 0, _describe(proc)
    assert message in proc.stdout + proc.stderr, _describe(proc)


# ---------------------------------------------------------------------------------------------
# Launchers


def test_torchrun_two_ranks() -> None:
    proc = run_torchrun("--max-steps", "3", "--momentum", "0.9", "--centered", *TINY)
    assert_succeeded_sharded(proc, world_size=2)
    assert "(torchrun launch, gloo backend" in proc.stdout


def test_mpirun_two_ranks() -> None:
    if not MPIRUN.exists():
        pytest.skip(f"no mpirun next to {sys.executable} (pip install mpich)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install mpi4py)")
    proc = _run([str(MPIRUN), "-n", "2", sys.executable, TRAIN, "--max-steps", "3", *TINY])
    assert_succeeded_sharded(proc, world_size=2)
    assert "(mpi launch, gloo backend" in proc.stdout


def test_short_run_loss_falls_and_plots(tmp_path: Path) -> None:
    plot = tmp_path / "loss.png"
    proc = run_torchrun(
        "--max-steps", "40", "--lr", "3e-3", "--warmup-steps", "5", "--plot", str(plot), *TINY
    )
    assert proc.returncode == 0, _describe(proc)
    train_start, train_end, val_start, val_end = summary(proc)
    assert train_end < train_start - 0.5, f"train loss did not fall: {train_start} -> {train_end}"
    assert val_end < val_start - 0.5, f"val loss did not fall: {val_start} -> {val_end}"
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", _describe(proc)


# ---------------------------------------------------------------------------------------------
# Bad input: a message and a non-zero exit, never a hang


def test_unknown_flag() -> None:
    proc = run_single("--no-such-flag", "1")
    assert proc.returncode == 2, _describe(proc)
    assert "unrecognized arguments: --no-such-flag" in proc.stderr, _describe(proc)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--batch-size", "0"), "--batch-size must be at least 1, got 0"),
        (("--n-embd", "30", "--n-head", "4"), "--n-embd 30 is not a multiple of --n-head 4"),
        (("--resume",), "--resume needs --checkpoint-dir"),
    ],
)
def test_impossible_sizes(args: tuple[str, ...], message: str) -> None:
    proc = run_single(*args)
    assert proc.returncode == 2, _describe(proc)
    assert message in proc.stderr, _describe(proc)


def test_more_ranks_than_data(tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 4)  # 180 characters
    args = ("--corpus", str(corpus), "--block-size", "8", "--batch-size", "100", "--max-steps", "1",
            "--n-layer", "1", "--n-head", "1", "--n-embd", "8")
    # 162 train characters hold 154 windows: enough for one rank's 100, not for two ranks' 200
    assert run_single(*args).returncode == 0
    proc = run_torchrun(*args)
    assert_failed_with(proc, "not enough data for 2 rank(s)")
    for rank in (0, 1):
        assert f"[rank{rank}]" in proc.stdout, _describe(proc)  # every rank says why it stops


def test_missing_corpus_file(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_corpus.txt"
    proc = run_torchrun("--corpus", str(missing), *TINY)
    assert_failed_with(proc, f"corpus file '{missing}' does not exist")
    for rank in (0, 1):
        assert f"[rank{rank}]" in proc.stdout, _describe(proc)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_master() -> None:
    start = time.monotonic()
    proc = run_single(
        "--init-timeout", "3", *TINY,
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_closed_port()), RANK="1", WORLD_SIZE="2",
        LOCAL_RANK="1",
    )
    elapsed = time.monotonic() - start
    assert_failed_with(proc, "could not start torch.distributed (torchrun launch, rank 1 of 2")
    assert elapsed < 60, f"took {elapsed:.0f} s to give up"
