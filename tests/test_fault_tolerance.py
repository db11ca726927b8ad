"""A rank killed mid-training, or mid-checkpoint, under torchrun --max-restarts: the job
restarts from the last complete checkpoint and ends with exactly the parameters of a run that
was never interrupted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# A tiny GPT, 12 steps, a checkpoint every 4: the kill lands between checkpoints.
JOB = [
    "launch/train.py", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
    "--batch-size", "4", "--max-steps", "12", "--warmup-steps", "2", "--eval-windows", "8",
    "--eval-every", "0", "--log-every", "4", "--momentum", "0.9", "--centered",
    "--checkpoint-every", "4",
]


def torchrun(*args: str, restarts: int = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK", "TORCHELASTIC"))}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", str(restarts), *JOB, *args,
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = torchrun("--checkpoint-dir", str(workdir / "ckpt"), "--save-final", str(workdir / "final.pt"))
    assert result.returncode == 0, result.stdout + result.stderr
    return torch.load(workdir / "final.pt", weights_only=True)


@pytest.mark.parametrize("where", ["training", "checkpoint save"])
def test_killed_rank_restarts_from_the_last_checkpoint_and_ends_bit_for_bit(tmp_path, uninterrupted, where) -> None:
    fault = ["--fail-at-step", "7"] if where == "training" else ["--fail-at-step", "8", "--fail-in-save"]
    result = torchrun(
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume", "--save-final", str(tmp_path / "final.pt"),
        *fault, restarts=1,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "fault injection: rank 1 kills itself" in output
    # the step-8 save was cut short: its staging directory is never taken for a checkpoint
    assert "resumed from" in output and "step_00000004 (step 4)" in output
    restarted = torch.load(tmp_path / "final.pt", weights_only=True)
    assert restarted.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(restarted[name], value), name
