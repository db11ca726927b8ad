"""Sharded checkpoints of the training job through ``torch.distributed.checkpoint``.

A checkpoint is the directory ``DIR/step_00000100/`` holding the model (each rank writes a
part of the replicated weights), the optimizer (``ShardedRMSprop`` is a DCP ``Stateful``:
each rank writes its own shard, and a load may run at another world size) and
``{"step": 100}``. It is written into ``step_00000100.tmp/`` first and renamed by rank 0
once every rank has finished, so a directory without ``.tmp`` is always complete.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger("train")

_NAME = re.compile(r"step_(\d{8,})")


def _state(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, object]:
    return {"model": model.state_dict(), "optim": opt, "meta": {"step": step}}


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    before_commit: Callable[[], None] | None = None,
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
    dcp.save(_state(model, opt, step), checkpoint_id=staging)
    if before_commit is not None:
        before_commit()
    dist.barrier()  # every rank's files are written
    if dist.get_rank() == 0:
        if final.exists():  # a run repeated over the same directory
            shutil.rmtree(final)
        staging.rename(final)
    dist.barrier()  # nobody looks for the checkpoint before it has its final name
    return final


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Load ``path`` into ``model`` (the bare module) and ``opt``; return its step.

    .. warning::
        Collective: every rank must call it.
    """
    state = _state(model, opt, -1)
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    step = int(state["meta"]["step"])  # type: ignore[index]
    if step < 0:
        raise RuntimeError(f"checkpoint {path} has no step")
    return step


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``directory``, if any."""
    if not directory.is_dir():
        return None
    found = [
        (int(match.group(1)), entry)
        for entry in directory.iterdir()
        if (match := _NAME.fullmatch(entry.name)) and (entry / ".metadata").is_file()
    ]
    return max(found)[1] if found else None
