"""Gradient windows: a rank's owned gradient slices, staged for the update a window at a time.

The update reads the gradients of the elements a rank owns from a window of at most
``GRAD_WINDOW_NUMEL`` elements of its shard, filled just before: the update reads them while
they are still in cache, and no rank holds a shard-sized gradient copy. Which stretch of
which parameter lands where in which window is fixed by the plan, so it is worked out once
(:func:`plan_windows`), for this rank, or for a rank this one sends gradients to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .layout import Piece
from .memory_order import in_order

__all__ = ["Part", "Span", "Window", "merge_spans", "pack", "plan_windows"]


@dataclass(frozen=True)
class Span:
    """A contiguous stretch ``[start, end)`` of the shard that one param group updates."""

    group: int
    start: int
    end: int


def merge_spans(spans: Sequence[Span]) -> list[Span]:
    """Join adjacent spans of the same param group, keeping their order."""
    merged: list[Span] = []
    for span in spans:
        last = merged[-1] if merged else None
        if last is not None and last.group == span.group and last.end == span.start:
            merged[-1] = Span(last.group, last.start, span.end)
        else:
            merged.append(span)
    return merged


@dataclass(frozen=True)
class Part:
    """The stretch of one owned piece that falls in one gradient window."""

    position: int  # of the parameter in the bucket
    param_start: int  # where the stretch lies in the flattened parameter (in its order)
    param_end: int
    span: Span  # in the shard
    target: Tensor  # its place in the window buffer
    order: tuple[int, ...]  # the parameter's (sharded_rmsprop.memory_order)


@dataclass(frozen=True)
class Window:
    start: int  # first shard element of the window
    parts: list[Part]
    spans: list[Span]  # the parts merged, for steps where every parameter has a gradient

    @property
    def length(self) -> int:
        """Elements from the window's start to its last part's end."""
        return self.parts[-1].span.end - self.start

    def present(self, has_grad: Callable[[int], bool]) -> tuple[list[Part], list[Span]]:
        """The parts whose parameter (by position) has a gradient, and the spans to update."""
        parts = [part for part in self.parts if has_grad(part.position)]
        everything = len(parts) == len(self.parts)
        return parts, self.spans if everything else merge_spans([part.span for part in parts])


def plan_windows(
    pieces: Sequence[Piece], position_of: Callable[[Piece], int], buffer: Tensor
) -> list[Window]:
    """``pieces`` (one rank's, in shard order) cut where windows of ``buffer``'s length end,
    by window; each part's target is its place in ``buffer``."""
    width = buffer.numel()
    windows: dict[int, list[Part]] = {}
    for piece in pieces:
        start = piece.shard_start
        while start < piece.shard_end:
            window_start = start // width * width
            end = min(piece.shard_end, window_start + width)
            param_start = piece.param_start + start - piece.shard_start
            windows.setdefault(window_start, []).append(
                Part(
                    position=position_of(piece),
                    param_start=param_start,
                    param_end=param_start + end - start,
                    span=Span(piece.slot.group, start, end),
                    target=buffer[start - window_start : end - window_start],
                    order=piece.slot.order,
                )
            )
            start = end
    return [
        Window(start, parts, merge_spans([part.span for part in parts]))
        for start, parts in windows.items()
    ]


def pack(parts: Sequence[Part], params: Sequence[Tensor]) -> None:
    """Copy the gradient stretches of ``parts`` (of ``params``, by position) into their
    targets."""
    torch._foreach_copy_(
        [part.target for part in parts],
        [
            in_order(params[part.position].grad, part.order)[part.param_start : part.param_end]
            for part in parts
        ],
    )
