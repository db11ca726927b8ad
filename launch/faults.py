"""Fault injection for the restart tests, switched on by the environment, not by the job's flags.

``SHARDED_RMSPROP_FAULT=step:7`` makes the last rank SIGKILL itself, as an out-of-memory killer
would, as step 7 begins; ``step:8:in_save`` inside step 8's checkpoint save instead, after the
rank's files are written and before the checkpoint is complete. Only on a job's first attempt
under torchrun (``TORCHELASTIC_RESTART_COUNT`` 0), so that the restarted job runs through.
"""

from __future__ import annotations

import logging
import os
import signal

__all__ = ["VARIABLE", "fail_if_told"]

VARIABLE = "SHARDED_RMSPROP_FAULT"

log = logging.getLogger("train")


def _told() -> tuple[int, bool] | None:
    """The step and whether in the save, from the environment; None if not told."""
    words = os.environ.get(VARIABLE, "").split(":")
    if len(words) < 2 or words[0] != "step" or not words[1].isdigit():
        return None
    return int(words[1]), words[2:] == ["in_save"]


def fail_if_told(rank: int, world_size: int, step: int, in_save: bool) -> None:
    """SIGKILL this process if the environment says so for this rank, step and place."""
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and _told() == (step, in_save) and rank == world_size - 1:
        log.warning("fault injection: rank %d kills itself at step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)
