"""Checksums of the tensors a checkpoint holds, so that a changed bit is found on load.

A tensor's checksum is one int64 per block of :data:`BLOCK_NUMEL` consecutive elements (the
last block may be shorter): the sum, over the block's 8-bit, 16-bit or 32-bit words (1-byte,
2-byte and all other dtypes), of the word times a fixed odd weight below 2**24 for its place in the
block. Every product and sum is exact in int64, so a change to any one word always changes its
block's checksum, and values moved within a block change it too.

Blocks, rather than one checksum per tensor, because each rank owns whole blocks of every
parameter (the layout aligns parameters and shard boundaries to :data:`BLOCK_NUMEL` elements):
in the sharded format each rank writes the checksums of exactly the elements it owns, and
after a load at another world size verifies exactly the elements it now owns, without asking
another rank.

These guard against damage (bit rot, truncated or mixed-up files), not against someone who
rewrites a checkpoint on purpose: a checkpoint must still come from a place you trust.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import ALIGNMENT

__all__ = ["BLOCK_NUMEL", "block_count", "block_checksums", "first_mismatch"]

#: Elements per checksum block: the layout's alignment, so that ranks own whole blocks.
BLOCK_NUMEL = ALIGNMENT

#: Blocks summed at once, to keep the int64 products in cache.
_BLOCKS_PER_PASS = 1 << 14

_weights: dict[tuple[int, torch.device], Tensor] = {}


def block_count(numel: int) -> int:
    """How many checksums a tensor of ``numel`` elements has."""
    return -(-numel // BLOCK_NUMEL)


def block_checksums(values: Tensor) -> Tensor:
    """The checksums of ``values``, one int64 per block, on the CPU.

    ``values`` is a whole tensor or a run of one (flattened) that starts at a block boundary.
    """
    flat = values.detach().reshape(-1)
    word = {1: torch.int8, 2: torch.int16}.get(flat.element_size(), torch.int32)
    words = flat.view(word) if flat.numel() else torch.zeros(0, dtype=word, device=flat.device)
    per_block = BLOCK_NUMEL * flat.element_size() // word.itemsize
    sums = []
    for start in range(0, words.numel(), per_block * _BLOCKS_PER_PASS):
        chunk = words[start : start + per_block * _BLOCKS_PER_PASS].to(torch.int64)
        short = -chunk.numel() % per_block
        if short:
            chunk = torch.cat([chunk, chunk.new_zeros(short)])
        sums.append((chunk.view(-1, per_block) * _weights_for(per_block, chunk.device)).sum(dim=1))
    return torch.cat(sums).cpu() if sums else torch.zeros(0, dtype=torch.int64)


def first_mismatch(values: Tensor, checksums: Tensor) -> int | None:
    """The first block of ``values`` whose checksum is not ``checksums``' (or None)."""
    actual = block_checksums(values)
    if actual.shape == checksums.shape and torch.equal(actual, checksums.to(actual.dtype)):
        return None
    if actual.shape != checksums.shape:
        return 0
    return int((actual != checksums).nonzero()[0, 0])


def _weights_for(count: int, device: torch.device) -> Tensor:
    """The fixed weights of the words of a block: odd, spread out, and below 2**22, so that
    the 256 products of a complex128 block's 32-bit words sum exactly in int64."""
    key = (count, device)
    if key not in _weights:
        places = torch.arange(count, dtype=torch.int64)
        _weights[key] = ((places * 2654435761 + 40503) % (1 << 22) | 1).to(device)
    return _weights[key]
