"""DCP checkpoint directories that cannot run code: a crafted ``.metadata`` (a pickle that
torch's own reader unpickles whatever it holds) is refused by ``SafeFileSystemReader``, the
offline converter and the launcher's resume, on every rank, naming the file; real
checkpoints still load bit for bit."""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from sharded_rmsprop import SafeFileSystemReader, ShardedRMSprop
from sharded_rmsprop.checkpoint import dcp_to_torch_format
from sharded_rmsprop.dcp_reader import UnsafeMetadataError, read_metadata_file
from spawn import run_ranks
from test_checkpoint import (
    OPTIONS,
    dcp_save_on_rank,
    groups,
    initial_params,
    step_with_grads,
    torch_run,
)

REPO = Path(__file__).resolve().parents[1]
#: what every refusal says (the file's path comes before it)
ASKS_FOR_TOUCH = "it asks for pathlib.Path.touch, which a DCP checkpoint's metadata never holds"


class TouchesOnLoad:
    """Unpickling it creates the file ``marker``: what a crafted checkpoint could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def plant(checkpoint: str | Path, marker: str | Path, name: str = ".metadata") -> str:
    """Replace the checkpoint's metadata file ``name`` with a crafted one; its path."""
    path = os.path.join(checkpoint, name)
    with open(path, "wb") as file:
        pickle.dump(TouchesOnLoad(str(marker)), file)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A ShardedRMSprop checkpoint (and the model) written at 2 ranks after 3 steps."""
    path = str(tmp_path_factory.mktemp("saved") / "ckpt")
    run_ranks(2, dcp_save_on_rank, path, 3)
    return path


@pytest.fixture
def checkpoint(saved, tmp_path) -> str:
    """A copy of ``saved`` the test may tamper with."""
    return shutil.copytree(saved, tmp_path / "ckpt")


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to ... a single process"
        return fn(*args, **kwargs)


# -- real checkpoints ------------------------------------------------------------------------------


def test_real_metadata_reads_as_pickle_reads_it(saved, tmp_path) -> None:
    """Every kind of entry DCP writes: sharded optimizer state (ShardViews), model weights,
    tensors of several dtypes and memory formats, and plain Python data."""
    everything = {
        "half": torch.ones(3, dtype=torch.float16),
        "bf16": torch.ones(2, 2, dtype=torch.bfloat16),
        "flags": torch.tensor([True, False]),
        "ints": torch.arange(4),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "channels_last": torch.zeros(1, 2, 3, 3).to(memory_format=torch.channels_last),
        "plain": {"i": 3, "f": 1.5, "s": "x", "n": None, "l": [1, "a"], "t": (1, 2.0)},
    }
    quietly(dcp.save, everything, checkpoint_id=tmp_path / "everything", no_dist=True)
    for path in (os.path.join(saved, ".metadata"), tmp_path / "everything" / ".metadata"):
        with open(path, "rb") as file:
            assert read_metadata_file(path) == pickle.load(file)


def test_metadata_written_by_another_python_reads(tmp_path) -> None:
    """StorageMeta holds the checkpoint's path, pickled as pathlib.PosixPath up to Python
    3.12 and as pathlib._local.PosixPath from 3.13: either reads, on either Python."""
    quietly(dcp.save, {"x": torch.ones(2)}, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    path = tmp_path / "ckpt" / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    as_written = pickle.dumps(metadata, protocol=2)  # GLOBAL opcodes: module and name as text
    module = type(metadata.storage_meta.checkpoint_id).__module__.encode()
    assert b"c" + module + b"\nPosixPath\n" in as_written
    for other in (b"pathlib", b"pathlib._local"):
        path.write_bytes(as_written.replace(b"c" + module + b"\n", b"c" + other + b"\n"))
        assert read_metadata_file(path) == metadata


def load_through_the_reader_on_rank(rank: int, world_size: int, path: str) -> dict:
    params = initial_params()
    opt = ShardedRMSprop(groups(params), **OPTIONS, fused=False)  # fresh: never stepped
    model = {f"p{i}": p.detach() for i, p in enumerate(params)}
    dcp.load(
        {"model": model, "optim": opt},
        storage_reader=SafeFileSystemReader(path),
        no_dist=world_size == 1,
    )
    reference, ref_opt = torch_run(3)
    equal_at_load = all(torch.equal(a, b) for a, b in zip(params, reference))
    for step in range(3, 6):
        step_with_grads([opt, ref_opt], [params, reference], step)
    return {
        "equal_at_load": equal_at_load,
        "equal_after": all(torch.equal(a, b) for a, b in zip(params, reference)),
    }


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_real_checkpoint_loads_bit_for_bit_through_the_reader(saved, world_size) -> None:
    """Saved at 2 ranks; loaded at 1 (in this process) and 2: the parameters, and the next
    steps, are torch.optim.RMSprop's exactly."""
    if world_size == 1:
        results = [quietly(load_through_the_reader_on_rank, 0, 1, saved)]
    else:
        results = run_ranks(2, load_through_the_reader_on_rank, saved, timeout=60)
    assert results == [{"equal_at_load": True, "equal_after": True}] * world_size


# -- crafted metadata ----------------------------------------------------------------------------


def test_torchs_own_reader_runs_the_planted_file(checkpoint, tmp_path) -> None:
    """The threat is real: the payload the tests below plant runs under torch's reader."""
    marker = tmp_path / "ran"
    plant(checkpoint, marker)
    with pytest.raises(AttributeError):  # after the payload ran: it returns None, not metadata
        FileSystemReader(checkpoint).read_metadata()
    assert marker.exists()


def test_the_converter_refuses_planted_metadata(checkpoint, tmp_path) -> None:
    marker = tmp_path / "ran"
    planted = plant(checkpoint, marker)
    with pytest.raises(UnsafeMetadataError, match=f"refusing to load {planted}: {ASKS_FOR_TOUCH}"):
        dcp_to_torch_format(checkpoint)
    assert not marker.exists()


def test_the_converters_command_refuses_planted_metadata(checkpoint, tmp_path) -> None:
    marker, out = tmp_path / "ran", tmp_path / "optim.pt"
    planted = plant(checkpoint, marker)
    result = subprocess.run(
        [sys.executable, "-m", "sharded_rmsprop.checkpoint", checkpoint, str(out)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"UnsafeMetadataError: refusing to load {planted}: {ASKS_FOR_TOUCH}" in result.stderr
    assert not marker.exists() and not out.exists()


def test_metadata_that_is_not_metadata_is_refused(checkpoint) -> None:
    planted = os.path.join(checkpoint, ".metadata")
    with open(planted, "wb") as file:
        pickle.dump({"state_dict_metadata": {}}, file)
    with pytest.raises(UnsafeMetadataError, match=f"refusing to load {planted}: it holds a dict"):
        dcp_to_torch_format(checkpoint)


def test_planted_rank_local_metadata_is_refused_too(checkpoint, tmp_path) -> None:
    """Without ``.metadata``, DCP reads ``__{rank}.metadata``: through the same allowlist."""
    marker = tmp_path / "ran"
    os.remove(os.path.join(checkpoint, ".metadata"))
    planted = plant(checkpoint, marker, "__0.metadata")
    opt = ShardedRMSprop(groups(initial_params()), **OPTIONS, fused=False)
    with pytest.raises(CheckpointException, match=f"refusing to load {planted}: {ASKS_FOR_TOUCH}"):
        quietly(
            dcp.load, {"optim": opt}, storage_reader=SafeFileSystemReader(checkpoint), no_dist=True
        )
    assert not marker.exists()


def test_a_crafted_bytes_entry_is_refused_whatever_the_planner(tmp_path) -> None:
    """The reader hands DCP's default planner (which unpickles bytes entries with
    ``weights_only=False``) only plain data."""
    path, marker = tmp_path / "ckpt", tmp_path / "ran"
    quietly(
        dcp.save, {"lr": TouchesOnLoad(str(marker)), "steps": 7}, checkpoint_id=path, no_dist=True
    )
    with pytest.raises(CheckpointException, match="Weights only load failed"):
        quietly(dcp.load, {"lr": None}, storage_reader=SafeFileSystemReader(path), no_dist=True)
    assert not marker.exists()
    loaded = {"steps": 0}
    quietly(dcp.load, loaded, storage_reader=SafeFileSystemReader(path), no_dist=True)
    assert loaded == {"steps": 7}


def load_planted_on_rank(rank: int, world_size: int, path: str) -> str:
    opt = ShardedRMSprop(groups(initial_params()), **OPTIONS, fused=False)
    try:
        dcp.load({"optim": opt}, storage_reader=SafeFileSystemReader(path))
    except CheckpointException as error:
        return str(error)
    return "loaded"


def test_every_rank_refuses_planted_metadata(checkpoint, tmp_path) -> None:
    marker = tmp_path / "ran"
    planted = plant(checkpoint, marker)
    for message in run_ranks(2, load_planted_on_rank, checkpoint, timeout=60):
        assert f"refusing to load {planted}: {ASKS_FOR_TOUCH}" in message
    assert not marker.exists()


def resume_past_planted_on_rank(rank: int, world_size: int, directory: str, marker: str) -> dict:
    """The launcher saves step 4; a crafted step 8 appears; a fresh job resumes."""
    sys.path.insert(0, str(REPO / "launch"))
    from checkpointing import resume_from_latest, save_checkpoint

    def build() -> tuple[nn.Module, ShardedRMSprop]:
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        return model, ShardedRMSprop(model.parameters(), lr=0.1, fused=False)

    model, opt = build()
    model(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    step_4 = save_checkpoint(Path(directory), 4, model, opt)
    if rank == 0:
        plant(shutil.copytree(step_4, Path(directory) / "step_00000008"), marker)
    dist.barrier()
    warned: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("train").addHandler(handler)
    fresh_model, fresh_opt = build()
    step = resume_from_latest(Path(directory), fresh_model, fresh_opt, torch.device("cpu"))
    equal = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))
    return {"step": step, "equal": equal, "log": warned}


def test_the_launchers_resume_passes_over_a_planted_newest_checkpoint(tmp_path) -> None:
    directory, marker = tmp_path / "ckpt", tmp_path / "ran"
    results = run_ranks(2, resume_past_planted_on_rank, str(directory), str(marker), timeout=60)
    planted = directory / "step_00000008" / ".metadata"
    for result in results:
        assert result["step"] == 4 and result["equal"]
        refusal = [line for line in result["log"] if "cannot be loaded" in line]
        # (the launcher logs the last line of DCP's error, cut at 300 characters)
        assert (
            len(refusal) == 1
            and f"refusing to load {planted}: it asks for pathlib.Path.touch" in refusal[0]
        )
    assert not marker.exists()
