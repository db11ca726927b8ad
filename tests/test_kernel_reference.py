"""The reference update: chunking a long span changes nothing, bit for bit."""

from __future__ import annotations

import pytest
import torch

import sharded_rmsprop.kernels.reference as reference


def inputs(numel: int) -> list[torch.Tensor]:
    """param, grad, square_avg, momentum_buffer, grad_avg with square_avg > grad_avg**2."""
    generator = torch.Generator().manual_seed(0)
    param, grad, square_avg, momentum_buffer, grad_avg = (
        torch.rand(numel, generator=generator) for _ in range(5)
    )
    return [param, grad, square_avg + 0.5, momentum_buffer, grad_avg * 0.5]


@pytest.mark.parametrize(
    "momentum, centered, master", [(0.0, False, False), (0.9, True, False), (0.9, True, True)]
)
def test_chunked_update_is_bitwise_the_single_pass(
    monkeypatch, momentum: float, centered: bool, master: bool
) -> None:
    numel = 2 * reference.CHUNK_NUMEL + 12345  # two full chunks and a ragged tail
    hyper = dict(lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=1e-4, momentum=momentum,
                 centered=centered, maximize=True, grad_scale=torch.tensor(0.37) if master else None)
    chunked, whole = inputs(numel), inputs(numel)
    rounded = [torch.zeros(numel, dtype=torch.bfloat16) if master else None for _ in range(2)]
    for tensors in (chunked, whole):
        if momentum == 0:
            tensors[3] = None
        if not centered:
            tensors[4] = None
    reference.rmsprop_reference_(*chunked, low_precision_param=rounded[0], **hyper)
    monkeypatch.setattr(reference, "CHUNK_NUMEL", 1 << 40)
    reference.rmsprop_reference_(*whole, low_precision_param=rounded[1], **hyper)
    for a, b in zip(chunked + rounded[:1], whole + rounded[1:]):
        if a is not None:
            assert torch.equal(a, b)
    if master:
        assert torch.equal(rounded[0], chunked[0].to(torch.bfloat16))
