"""The reference update: torch's own single-tensor RMSprop, one span of a shard at a time.

It runs exactly the operations of ``torch.optim.rmsprop._single_tensor_rmsprop`` in the same
order and dtype, so parameters come out bit for bit equal to ``torch.optim.RMSprop``. Every
operation is elementwise, so applying it to a span that covers parts of several parameters
gives each element the same result as applying it to each parameter alone.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .contract import KernelRules, check_update_arguments

__all__ = ["RULES", "rmsprop_reference_"]

#: What the reference takes: what ``torch.optim.RMSprop`` takes (every floating-point and
#: complex dtype, any shape and strides), and a scale of any floating-point dtype.
RULES = KernelRules("rmsprop_reference_", dtypes=None, flat=False, scale_dtypes=None)

#: Elements per pass over a long span. Each of torch's operations streams its operands once;
#: on a 25 M-element span that is main memory every time, while chunks of 1 M elements (20 to
#: 36 MB for all operands) keep the later operations' reads in cache: about twice as fast on
#: the CPU here, and bit for bit the same, since every operation is elementwise.
CHUNK_NUMEL = 1 << 20


@torch.no_grad()
def rmsprop_reference_(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    momentum_buffer: Tensor | None,
    grad_avg: Tensor | None,
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    grad_scale: Tensor | float | None = None,
    low_precision_param: Tensor | None = None,
) -> None:
    """Update ``param`` and the state in place; ``grad`` is scratch and gets overwritten.

    The :class:`~sharded_rmsprop.kernels.contract.UpdateFn` contract under :data:`RULES`:
    tensors of any shape and of any dtype ``torch.optim.RMSprop`` takes. ``grad_scale`` (a
    number or a 0-d tensor) multiplies the gradient first, as
    ``torch.nn.utils.clip_grad_norm_`` would have. ``low_precision_param``, if given,
    receives the updated ``param`` rounded to its own dtype (the model's bfloat16 or float16
    copy of float32 master weights). 1-D tensors longer than :data:`CHUNK_NUMEL` are updated
    chunk by chunk.
    """
    check_update_arguments(
        RULES,
        param,
        grad,
        square_avg,
        momentum_buffer,
        grad_avg,
        momentum,
        centered,
        grad_scale,
        low_precision_param,
    )
    chunks = _chunks(param, grad, square_avg, momentum_buffer, grad_avg, low_precision_param)
    for param, grad, square_avg, momentum_buffer, grad_avg, low_precision_param in chunks:
        if grad_scale is not None:
            grad.mul_(grad_scale)
        if maximize:
            grad.neg_()
        if weight_decay != 0:
            grad.add_(param, alpha=weight_decay)  # in the complex dtype, as torch does it

        if param.is_complex():  # (master weights, and so a rounded copy, are never complex)
            param, grad, square_avg = (torch.view_as_real(t) for t in (param, grad, square_avg))
            if momentum_buffer is not None:
                momentum_buffer = torch.view_as_real(momentum_buffer)
            if grad_avg is not None:
                grad_avg = torch.view_as_real(grad_avg)

        square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)

        if grad_avg is not None:  # centered
            grad_avg.lerp_(grad, 1 - alpha)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg.add_(eps)

        if momentum_buffer is not None:  # momentum > 0
            momentum_buffer.mul_(momentum).addcdiv_(grad, avg)
            param.add_(momentum_buffer, alpha=-lr)
        else:
            param.addcdiv_(grad, avg, value=-lr)

        if low_precision_param is not None:
            low_precision_param.copy_(param)  # round to nearest even, as .to(bfloat16) does


def _chunks(param: Tensor, *others: Tensor | None) -> Iterator[tuple[Tensor | None, ...]]:
    """The tensors whole, or, when 1-D and longer than :data:`CHUNK_NUMEL`, chunk by chunk."""
    if param.dim() != 1 or param.numel() <= CHUNK_NUMEL:
        yield (param, *others)
        return
    for start in range(0, param.numel(), CHUNK_NUMEL):
        window = slice(start, start + CHUNK_NUMEL)
        yield tuple(None if t is None else t[window] for t in (param, *others))
