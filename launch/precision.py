"""The training job's number formats: parameter dtype, autocast, loss scaling and clipping.

``--dtype float32`` is plain float32 training. ``--dtype bfloat16`` or ``float16`` casts the
model: parameters, activations and gradients are 16-bit (half the memory and bandwidth of
float32), and ``ShardedRMSprop`` keeps float32 master weights and float32 state for each
rank's shard, so the updates (often far below a bfloat16 ulp of the weight) are not rounded
away. The forward runs under autocast to the same dtype, which changes nothing for the
matmuls (already 16-bit) but runs the ops autocast keeps in float32 in float32; the loss is
computed in float32 from the logits (``gpt.py``).

float16 has 5 exponent bits, so small gradients underflow to zero: its run goes through
``torch.amp.GradScaler``. One step, all of it in :func:`backward_and_step`::

    scaler = torch.amp.GradScaler(device.type)
    scaler.scale(loss).backward()                  # gradients are S times the true ones
    norm = opt.clip_grad_norm_(max_norm * S) / S   # S = scaler.get_scale(); the true norm
    scaler.step(opt)    # the optimizer divides S out inside its update, or skips the step
    scaler.update()     # on every rank if some gradient overflowed; then S is lowered
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sharded_rmsprop import ShardedRMSprop

if TYPE_CHECKING:
    from config import Config

__all__ = ["DTYPES", "autocast", "backward_and_step", "build_scaler"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_scaler(config: Config, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for float16; None for the other dtypes (bfloat16 has float32's range)."""
    return torch.amp.GradScaler(device.type) if config.dtype == "float16" else None


def autocast(config: Config, device: torch.device) -> torch.autocast:
    """The forward's precision: autocast to the 16-bit dtype, so the ops autocast keeps in
    float32 (softmax and layer norm on CUDA, losses everywhere) run in float32; a no-op for
    float32, whose results stay bit for bit those of a run without it."""
    dtype = DTYPES[config.dtype]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def backward_and_step(
    loss: torch.Tensor, opt: ShardedRMSprop, scaler: torch.amp.GradScaler | None,
    max_norm: float,
) -> torch.Tensor | None:
    """Backward, clip, update; the global gradient norm before clipping (None: no clipping).

    ``opt.clip_grad_norm_`` is one scalar all-reduce (each rank measures the gradient
    elements it owns) and its scale is applied inside the update, not by a pass over the
    gradients. With a GradScaler torch's recipe would unscale the gradients before clipping
    (``scaler.unscale_``), but that refuses float16 gradients and costs a pass over them;
    instead the threshold is scaled: the norm of the scaled gradients is ``S`` times the
    true one, and the update divides ``S`` out. An overflow makes the norm inf and the clip
    factor 0, and the scaler skips that step anyway.
    """
    if scaler is None:
        loss.backward()
        norm = opt.clip_grad_norm_(max_norm) if max_norm > 0 else None
        opt.step()
        return norm
    scaler.scale(loss).backward()
    norm = None
    if max_norm > 0:
        scale = scaler.get_scale()
        norm = opt.clip_grad_norm_(max_norm * scale) / scale
    scaler.step(opt)
    scaler.update()
    return norm
