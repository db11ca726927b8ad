"""Character-level text for the training job: a corpus, its vocabulary, and the batches.

The default corpus is CPython's own ``pydoc_data.topics`` (the language reference topics that
``help()`` shows, about 460 000 characters of English prose and code), so nothing is
downloaded; ``--corpus FILE`` reads a UTF-8 text file instead. Token ids are the corpus's
distinct characters in code-point order. The first ``1 - val_fraction`` of the text trains,
the rest validates.

Batches are a pure function of ``(seed, rank, step)``: rank ``r`` draws its windows at step
``s`` from a generator seeded by a hash of the three, so ranks see different text and a run
resumed at step ``s`` draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

__all__ = [
    "CharCorpus",
    "CorpusError",
    "TrainBatches",
    "check_fits",
    "load_corpus",
    "val_batches",
    "window_count",
]


class CorpusError(Exception):
    """The corpus cannot be read, or is too small for the asked sizes."""


@dataclass(frozen=True)
class CharCorpus:
    source: str  # where the text came from, for the log
    vocab: str  # the distinct characters; a token id is an index into it
    train: torch.Tensor  # int64 token ids
    val: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def _read_default_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise CorpusError(
            "this Python has no pydoc_data.topics (some distributions leave it out); "
            "pass a UTF-8 text file with --corpus FILE"
        ) from None
    return "\n\n".join(topics[key] for key in sorted(topics))


def _read_text_file(path: str) -> str:
    file = Path(path)
    if not file.exists():
        raise CorpusError(f"corpus file {path!r} does not exist")
    if not file.is_file():
        raise CorpusError(f"corpus path {path!r} is not a file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(f"corpus file {path!r} is not UTF-8 text: {error}") from None
    except OSError as error:
        raise CorpusError(f"cannot read corpus file {path!r}: {error.strerror}") from None


def _encode(text: str) -> tuple[str, torch.Tensor]:
    """The vocabulary (sorted distinct characters) and the text as int64 ids into it."""
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
    vocab_codes, ids = torch.unique(codes, sorted=True, return_inverse=True)
    return "".join(map(chr, vocab_codes.tolist())), ids.to(torch.int64)


def load_corpus(path: str | None, val_fraction: float) -> CharCorpus:
    """Read the corpus (``None``: ``pydoc_data.topics``), encode it and split train / val."""
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in (0, 1), got {val_fraction}")
    text = _read_default_text() if path is None else _read_text_file(path)
    if len(text) < 2:
        raise CorpusError(f"the corpus {path or 'pydoc_data.topics'!r} has {len(text)} characters")
    vocab, ids = _encode(text)
    n_val = max(1, int(len(ids) * val_fraction))
    source = "pydoc_data.topics" if path is None else path
    return CharCorpus(source, vocab, ids[:-n_val].clone(), ids[-n_val:].clone())


def window_count(tokens: torch.Tensor, block_size: int) -> int:
    """How many windows of ``block_size + 1`` tokens (input and shifted target) fit."""
    return max(0, len(tokens) - block_size)


def check_fits(corpus: CharCorpus, block_size: int, batch_size: int, world_size: int) -> None:
    """Raise :class:`CorpusError` unless every rank's batch can be drawn from distinct windows.

    Every rank reads the same corpus and so decides alike: all of them raise, none waits.
    """
    val_windows = window_count(corpus.val, block_size)
    if val_windows < 1:
        raise CorpusError(
            f"the validation split of {corpus.source!r} has {len(corpus.val)} characters, too "
            f"few for one window of block_size + 1 = {block_size + 1}: use a larger corpus, "
            f"a larger --val-fraction or a smaller --block-size"
        )
    train_windows = window_count(corpus.train, block_size)
    needed = world_size * batch_size
    if train_windows < needed:
        raise CorpusError(
            f"not enough data for {world_size} rank(s): the training split of "
            f"{corpus.source!r} has {train_windows} windows of {block_size + 1} characters, "
            f"fewer than world size x batch size = {world_size} x {batch_size} = {needed}; "
            f"use a larger corpus, a smaller --batch-size or --block-size, or fewer ranks"
        )


def _step_seed(seed: int, rank: int, step: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _windows(
    tokens: torch.Tensor, starts: torch.Tensor, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``(len(starts), block_size)`` for windows beginning at ``starts``."""
    chunk = tokens[starts[:, None] + torch.arange(block_size + 1)]
    chunk = chunk.to(device, non_blocking=True)
    return chunk[:, :-1], chunk[:, 1:]


class TrainBatches:
    """``batches(step)`` is this rank's ``(inputs, targets)`` for ``step``: random windows."""

    def __init__(
        self,
        tokens: torch.Tensor,
        *,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int,
        device: torch.device,
    ) -> None:
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.device = device
        self.n_windows = window_count(tokens, block_size)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(_step_seed(self.seed, self.rank, step))
        starts = torch.randint(0, self.n_windows, (self.batch_size,), generator=generator)
        return _windows(self.tokens, starts, self.block_size, self.device)


def val_batches(
    tokens: torch.Tensor,
    *,
    block_size: int,
    batch_size: int,
    count: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of ``count`` evenly spaced validation windows, in batches.

    The windows are the same whatever the world size; rank ``r`` takes every
    ``world_size``-th of them starting at ``r`` (possibly none).
    """
    n_windows = window_count(tokens, block_size)
    starts = torch.linspace(0, n_windows - 1, min(count, n_windows)).round().long().unique()
    mine = starts[rank::world_size]
    for first in range(0, len(mine), batch_size):
        yield _windows(tokens, mine[first : first + batch_size], block_size, device)
