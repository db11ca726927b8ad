"""A rank killed mid-training, or mid-checkpoint, under torchrun --max-restarts: the job
restarts from the last complete checkpoint and ends with exactly the parameters of a run that
was never interrupted."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

REPO = Path(__file__).resolve().parents[1]
# A tiny GPT, 12 steps, a checkpoint every 4: the kill lands between checkpoints.
JOB = [
    "launch/train.py", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
    "--batch-size", "4", "--max-steps", "12", "--warmup-steps", "2", "--eval-windows", "8",
    "--eval-every", "0", "--log-every", "4", "--momentum", "0.9", "--centered",
    "--checkpoint-every", "4",
]


def torchrun(*args: str, restarts: int = 0, fault: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK", "TORCHELASTIC"))}
    env["OMP_NUM_THREADS"] = "1"
    env["SHARDED_RMSPROP_FAULT"] = fault  # see launch/faults.py
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", str(restarts), *JOB, *args,
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The final parameters of a run never interrupted, and its checkpoints (4, 8, 12)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = torchrun("--checkpoint-dir", str(workdir / "ckpt"), "--save-final", str(workdir / "final.pt"))
    assert result.returncode == 0, result.stdout + result.stderr
    return {"final": torch.load(workdir / "final.pt", weights_only=True), "checkpoints": workdir / "ckpt"}


@pytest.mark.parametrize("where", ["training", "checkpoint save"])
def test_killed_rank_restarts_from_the_last_checkpoint_and_ends_bit_for_bit(tmp_path, uninterrupted, where) -> None:
    fault = "step:7" if where == "training" else "step:8:in_save"
    result = torchrun(
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume", "--save-final", str(tmp_path / "final.pt"),
        restarts=1, fault=fault,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "fault injection: rank 1 kills itself" in output
    # the step-8 save was cut short: its staging directory is never taken for a checkpoint
    assert "resumed from" in output and "step_00000004 (step 4)" in output
    restarted = torch.load(tmp_path / "final.pt", weights_only=True)
    assert restarted.keys() == uninterrupted["final"].keys()
    for name, value in uninterrupted["final"].items():
        assert torch.equal(restarted[name], value), name


# -- a damaged newest checkpoint: resume from the newest intact one --------------------------------


def damage(checkpoint: Path, how: str) -> None:
    """Delete one rank's shard file, or flip a bit in the middle of a tensor's values (the
    optimizer's ``square_avg`` of parameter 0, or the largest model weight)."""
    if how == "missing shard":
        (checkpoint / "__1_0.distcp").unlink()
        return
    storage = FileSystemReader(str(checkpoint)).read_metadata().storage_data
    prefix = "optim.state.0.square_avg" if how == "flipped bit in the optimizer" else "model."
    index = max((i for i in storage if i.fqn.startswith(prefix)), key=lambda i: storage[i].length)
    info = storage[index]
    path = checkpoint / info.relative_path
    data = bytearray(path.read_bytes())
    item = bytes(data[info.offset : info.offset + info.length])
    values = torch.load(io.BytesIO(item), weights_only=True)
    where = item.find(values.contiguous().view(torch.uint8).numpy().tobytes())
    assert where >= 0 and values.numel() > 0
    data[info.offset + where + values.numel() * values.element_size() // 2] ^= 0x04
    path.write_bytes(data)


@pytest.mark.parametrize(
    "how, reason",
    [
        ("missing shard", "__1_0.distcp"),
        ("flipped bit in the optimizer", "state[0]['square_avg']"),
        ("flipped bit in the model", "does not match its checksum"),
    ],
)
def test_a_damaged_newest_checkpoint_is_passed_over_for_the_newest_intact_one(
    tmp_path, uninterrupted, how, reason
) -> None:
    checkpoints = tmp_path / "ckpt"
    shutil.copytree(uninterrupted["checkpoints"], checkpoints)
    shutil.rmtree(checkpoints / "step_00000012")  # as if the job had died after step 8's save
    damage(checkpoints / "step_00000008", how)
    result = torchrun(
        "--checkpoint-dir", str(checkpoints), "--resume", "--save-final", str(tmp_path / "final.pt")
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{checkpoints / 'step_00000008'} cannot be loaded (" in output, output
    assert reason in output.split("cannot be loaded (")[1].split("\n")[0], output
    assert f"resumed from {checkpoints / 'step_00000004'} (step 4)" in output
    resumed = torch.load(tmp_path / "final.pt", weights_only=True)
    for name, value in uninterrupted["final"].items():
        assert torch.equal(resumed[name], value), name
