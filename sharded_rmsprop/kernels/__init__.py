"""Update kernels: functions of tensors and keyword-only hyperparameters, nothing else.

Every kernel has the signature of :func:`rmsprop_reference_`, updates in place, returns
``None`` and never touches ``torch.distributed``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .reference import rmsprop_reference_

__all__ = ["UpdateFn", "rmsprop_reference_", "select_update"]

UpdateFn = Callable[..., None]


def select_update(fused: bool | None, device: torch.device) -> UpdateFn:
    """The update to run on shards that live on ``device``.

    ``fused=False`` always gives the reference path; ``None`` the fastest available one;
    ``True`` a fused kernel or an error saying why there is none.
    """
    if fused:
        raise RuntimeError(
            f"fused=True was requested, but no fused RMSprop kernel is available for "
            f"device type '{device.type}' in this version of sharded_rmsprop; "
            f"pass fused=None or fused=False to use the reference update"
        )
    return rmsprop_reference_
