"""What torch's distributed state-dict API asks of ``optimizer.state_dict()``.

``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (and ``get_state_dict``;
torchtitan, Lightning's ModelParallelStrategy and accelerate's FSDP2 path call them) calls
``optimizer.state_dict()`` on every rank and turns the parameter ids into names. With
``StateDictOptions(full_state_dict=True)`` it then gathers the DTensors and ShardedTensors it
finds into whole tensors; it cannot see that a ShardedRMSprop's sharded format holds one rank's
ranges of each buffer (its layout is neither), so it would hand back those ranges as if they
were whole. :func:`full_state_dict_requested` tells ``state_dict()`` that the API asked for
whole tensors, from the API's own options, so that it answers with torch's format instead.

The answer is read from the calling frame: the API passes its options to the function that
calls ``state_dict()`` and nowhere else. ``tests/test_distributed_state_dict.py`` runs the API
itself, so a torch that moves those options fails that test rather than the user's checkpoint.
The loading side needs nothing of the kind: the API hands ``load_state_dict()`` whole tensors
or this rank's ranges, keyed by parameter names, which it accepts as torch does.
"""

from __future__ import annotations

import inspect

__all__ = ["full_state_dict_requested"]

#: The module and function of torch's API that call ``optimizer.state_dict()``.
_API_MODULE = "torch.distributed.checkpoint.state_dict"
_API_CALLER = "_get_optim_state_dict"

#: Frames between ``optimizer.state_dict()`` and the API's caller, at most.
_DEPTH = 4


def full_state_dict_requested() -> bool:
    """Whether the caller of the caller is torch's distributed state-dict API asking for whole
    tensors (``full_state_dict=True``)."""
    here = inspect.currentframe()
    frame = here.f_back.f_back if here is not None and here.f_back is not None else None
    for _ in range(_DEPTH):
        if frame is None:
            return False
        if frame.f_code.co_name == _API_CALLER and frame.f_globals.get("__name__") == _API_MODULE:
            options = frame.f_locals.get("info")
            return bool(getattr(options, "full_state_dict", False))
        frame = frame.f_back
    return False
