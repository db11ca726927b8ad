"""What torch's distributed state-dict API asks of the optimizer.

``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (and ``get_state_dict``,
``set_*``; torchtitan, Lightning's ModelParallelStrategy and accelerate's FSDP2 path call them)
calls ``optimizer.state_dict()`` on every rank and turns the parameter ids into names. With
``StateDictOptions(full_state_dict=True)`` it then gathers the DTensors and ShardedTensors it
finds into whole tensors; it cannot see that a ShardedRMSprop's sharded format holds one rank's
ranges of each buffer (its layout is neither), so it would hand back those ranges as if they
were whole. :func:`full_state_dict_requested` tells ``state_dict()`` that the API asked for
whole tensors, from the API's own options, so that it answers with torch's format instead.

Before any of that, on an optimizer with no state yet, the API runs a step of its own with
zero gradients set by hand and a zero learning rate, to make the state exist
(:func:`initializing_state`): gradients that no DDP reduction produced, which the checks of
``reduce_scatter_gradients()`` would refuse although they are alike on every rank.

Both are read from the calling frames: the API passes its options to the function that calls
``state_dict()`` and nowhere else. ``tests/test_distributed_state_dict.py`` runs the API
itself, so a torch that moves them fails that test rather than the user's checkpoint. The
loading side needs nothing of the kind: the API hands ``load_state_dict()`` whole tensors or
this rank's ranges, keyed by parameter names, which it accepts as torch does.
"""

from __future__ import annotations

import inspect
from types import FrameType

__all__ = ["full_state_dict_requested", "initializing_state"]

#: The module of torch's API, and its functions that call the optimizer.
_API_MODULE = "torch.distributed.checkpoint.state_dict"
_GETS_STATE = "_get_optim_state_dict"
_INITIALIZES = "_init_optim_state"

#: Frames searched above the optimizer's method, at most.
_DEPTH = 10


def full_state_dict_requested() -> bool:
    """Whether ``optimizer.state_dict()``, this function's caller, was called by torch's
    distributed state-dict API asking for whole tensors (``full_state_dict=True``)."""
    frame = _api_frame(_GETS_STATE)
    try:
        options = None if frame is None else frame.f_locals.get("info")
        return bool(getattr(options, "full_state_dict", False))
    finally:
        del frame  # (a frame held here would keep the optimizer alive in a cycle)


def initializing_state() -> bool:
    """Whether the step running now is the API's own, which makes an empty state exist."""
    frame = _api_frame(_INITIALIZES)
    found = frame is not None
    del frame
    return found


def _api_frame(function: str) -> FrameType | None:
    """The frame of the API's ``function`` among the callers, if it is there."""
    frame = inspect.currentframe()
    try:
        for _ in range(_DEPTH):
            if frame is None:
                return None
            frame = frame.f_back
            if (
                frame is not None
                and frame.f_code.co_name == function
                and frame.f_globals.get("__name__") == _API_MODULE
            ):
                return frame
        return None
    finally:
        del frame
