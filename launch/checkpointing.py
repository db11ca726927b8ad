"""Sharded checkpoints of the training job through ``torch.distributed.checkpoint``.

A checkpoint is the directory ``DIR/step_00000100/`` holding the model (each rank writes a
part of the replicated weights, in the model's dtype), the optimizer (``ShardedRMSprop`` is a
DCP ``Stateful``: each rank writes its own shard, float32 master weights included, and a
load may run at another world size), ``{"step": 100, "skipped_steps": ...,
"model_checksums": ...}`` (the optimizer's count of skipped steps, the checksums of the model's
weights), and any other DCP ``Stateful`` the job passes as ``extra`` (the float16 run's
``GradScaler``, whose scale a resumed run continues from). It is written into
``step_00000100.tmp/`` first and renamed by rank 0 once every rank has finished, so a
directory without ``.tmp`` is always complete. A resume takes the newest checkpoint that
loads: one with a missing or damaged file (the optimizer's and the model's checksums find a
flipped bit), or with a ``.metadata`` that asks for code to run (read with
``sharded_rmsprop.dcp_reader.SafeFileSystemReader``, which refuses it before it runs), is
logged and passed over for the one before it. Also here: the fault injection of the restart
tests, and the ``--save-final`` parameter file.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from torch.distributed.checkpoint.api import CheckpointException

from rank_stats import all_ranks_true, broadcast_ints
from sharded_rmsprop.checkpoint import SafeLoadPlanner
from sharded_rmsprop.checksums import block_checksums, first_mismatch
from sharded_rmsprop.dcp_reader import SafeFileSystemReader

if TYPE_CHECKING:
    from config import Config

__all__ = [
    "checkpoint_due",
    "complete_checkpoints",
    "load_checkpoint",
    "resume_from_latest",
    "save_checkpoint",
    "save_final_parameters",
]

log = logging.getLogger("train")

_NAME = re.compile(r"step_(\d{8,})")


def _state(
    model: nn.Module, opt: torch.optim.Optimizer, step: int, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    weights = model.state_dict()
    meta = {
        "step": step,
        "skipped_steps": getattr(opt, "skipped_steps", 0),
        "model_checksums": {name: block_checksums(t) for name, t in weights.items()},
    }
    return {"model": weights, "optim": opt, "meta": meta, **(extra or {})}


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    before_commit: Callable[[], None] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``directory/step_{step:08d}``; ``model`` is the bare module (``ddp.module``).

    ``before_commit`` runs on every rank once its files are written, before the checkpoint
    gets its final name (the fault-injection tests kill a rank there).

    .. warning::
        Collective: every rank must call it.
    """
    final = directory / f"step_{step:08d}"
    staging = directory / f"step_{step:08d}.tmp"
    staging.mkdir(parents=True, exist_ok=True)
    dcp.save(_state(model, opt, step, extra), checkpoint_id=staging)
    if before_commit is not None:
        before_commit()
    dist.barrier()  # every rank's files are written
    if dist.get_rank() == 0:
        if final.exists():  # a run repeated over the same directory
            shutil.rmtree(final)
        staging.rename(final)
    dist.barrier()  # nobody looks for the checkpoint before it has its final name
    return final


def load_checkpoint(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    extra: Mapping[str, Any] | None = None,
) -> int:
    """Load ``path`` into ``model`` (the bare module), ``opt`` and ``extra``; return its step.

    The checkpoint's pickles are read as data only (``SafeFileSystemReader``: a crafted
    ``.metadata`` is refused before it runs; ``SafeLoadPlanner``: non-tensor entries); the
    optimizer checks its own checksums, and the model's weights are checked against theirs here.

    .. warning::
        Collective: every rank must call it.
    """
    state = _state(model, opt, -1, extra)
    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    for name, weight in state["model"].items():
        if first_mismatch(weight, state["meta"]["model_checksums"][name]) is not None:
            raise ValueError(f"the model weight {name} does not match its checksum")
    model.load_state_dict(state["model"])
    step = int(state["meta"]["step"])
    if step < 0:
        raise RuntimeError(f"checkpoint {path} has no step")
    if hasattr(opt, "skipped_steps"):
        opt.skipped_steps = int(state["meta"]["skipped_steps"])
    return step


def resume_from_latest(
    directory: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device,
    extra: Mapping[str, Any] | None = None,
) -> int:
    """Load the newest complete checkpoint in ``directory`` that loads (rank 0 lists them);
    its step, or 0 if there is none.

    A checkpoint that fails to load on any rank (a missing or damaged shard file, a checksum
    that does not match, a ``.metadata`` that asks for code to run) is logged with its reason
    and the next older one is tried; if there are checkpoints but none loads, that is an error.

    .. warning::
        Collective: every rank must call it.
    """
    listed = [int(path.name.split("_")[1]) for path in complete_checkpoints(directory)]
    steps = broadcast_ints(listed, device)
    if not steps:
        log.info("no complete checkpoint in %s: starting from step 0", directory)
        return 0
    for step in steps:
        path = directory / f"step_{step:08d}"
        try:
            loaded, problem = load_checkpoint(path, model, opt, extra), ""
        except (Exception, CheckpointException) as error:  # DCP's is a BaseException
            loaded, problem = -1, _reason(error)
        if all_ranks_true(not problem, device):
            log.info("resumed from %s (step %d)", path, loaded)
            return loaded
        log.warning(
            "checkpoint %s cannot be loaded (%s): trying the one before it",
            path,
            problem or "it failed on another rank",
        )
    raise RuntimeError(f"none of the {len(steps)} checkpoints in {directory} could be loaded")


def _reason(error: BaseException) -> str:
    """The gist of a load error: its last line (DCP wraps the cause in tracebacks)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def save_final_parameters(path: str, model: nn.Module) -> None:
    """Rank 0 writes the parameters (in their dtype) to ``path`` with ``torch.save``."""
    if dist.get_rank() == 0:
        torch.save({name: p.detach().cpu() for name, p in model.named_parameters()}, path)
        log.info("trained parameters written to %s", path)


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in ``directory``, newest first (on rank 0; empty elsewhere)."""
    if dist.get_rank() != 0 or not directory.is_dir():
        return []
    found = [
        (int(match.group(1)), entry)
        for entry in directory.iterdir()
        if (match := _NAME.fullmatch(entry.name)) and (entry / ".metadata").is_file()
    ]
    return [path for _, path in sorted(found, reverse=True)]


def checkpoint_due(step: int, config: Config) -> bool:
    if config.checkpoint_dir is None:
        return False
    every = config.checkpoint_every
    return step == config.max_steps or (every > 0 and step % every == 0)
