"""How a parameter's elements lie in its range of the flat buffer: in its own memory order.

A parameter's *order* lists its dimensions from the outermost in memory to the innermost:
``(0, 1, 2, 3)`` for a contiguous NCHW weight, ``(0, 2, 3, 1)`` for a ``channels_last`` one,
``(1, 0)`` for a transposed matrix. Laid out in that order, the parameter stays a view with
its own strides, and so does its gradient: autograd gives a dense, non-overlapping parameter
a gradient of the same strides (and DDP's buckets hold it that way), so reading the gradient
in the same order reads its memory front to back, with no copy.

A parameter that is not dense (a strided slice, ``torch.randn(10, 5, 2)[..., 0]``) gets the
row-major order: autograd gives it a contiguous gradient, and it becomes a contiguous view of
the buffer (its values and shape kept). One that overlaps itself (an expanded view) has no
order: writing it would write several elements at once.

Every flat form of a parameter, its state and its gradient (shards, gathered gradients,
checkpoint ranges, checksums) is in its order, so a rank's range is one contiguous run.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = [
    "dense_strides",
    "flat_source",
    "in_order",
    "is_row_major",
    "kept_strides",
    "layout_entry",
    "order_of",
    "overlaps_itself",
    "parse_layout_entry",
    "shaped",
]


def overlaps_itself(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether two indices of a tensor of ``shape`` and ``stride`` reach one element (never,
    for a tensor of no elements)."""
    if 0 in shape:
        return False
    dims = sorted((st, size) for size, st in zip(shape, stride) if size > 1)
    reach = 0  # how far (in elements) the dimensions inside this one reach
    for st, size in dims:
        if st <= reach:
            return True
        reach += st * (size - 1)
    return False


def order_of(shape: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """The parameter's dimensions from the outermost in memory to the innermost, if it is
    dense (and so does not overlap itself); the row-major order otherwise (see the module
    docstring). Dimensions of size 1 move no element: they keep their row-major places, so a
    contiguous tensor always gives the row-major order."""
    rank = len(shape)
    moving = sorted((d for d in range(rank) if shape[d] > 1), key=lambda d: (-stride[d], d))
    inner = 1
    for d in reversed(moving):
        if stride[d] != inner:
            return tuple(range(rank))
        inner *= shape[d]
    outermost_first = iter(moving)
    return tuple(d if shape[d] <= 1 else next(outermost_first) for d in range(rank))


def dense_strides(shape: Sequence[int], order: Sequence[int]) -> tuple[int, ...]:
    """The strides of the dense layout of ``shape`` in ``order``."""
    strides = [0] * len(shape)
    inner = 1
    for d in reversed(order):
        strides[d] = inner
        inner *= shape[d]
    return tuple(strides)


def kept_strides(shape: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """The strides a parameter keeps as a view of its flat buffer: its own if it is dense
    (those of its dimensions of size 1 included, which DDP compares) or if it has no
    elements, else contiguous ones."""
    if 0 in shape:
        return tuple(stride)
    order = order_of(shape, stride)
    dense = dense_strides(shape, order)
    if all(size <= 1 or have == want for size, have, want in zip(shape, stride, dense)):
        return tuple(stride)
    return dense


def is_row_major(order: Sequence[int]) -> bool:
    return list(order) == sorted(order)


def in_order(tensor: Tensor, order: Sequence[int]) -> Tensor:
    """``tensor``'s elements, 1-D, in ``order``: a view when its layout is that order (a
    parameter's, its gradient's), a copy otherwise."""
    if is_row_major(order):
        return tensor.reshape(-1)
    return tensor.permute(tuple(order)).reshape(-1)


def shaped(flat: Tensor, shape: Sequence[int], order: Sequence[int]) -> Tensor:
    """The view of ``flat`` (``numel`` elements in ``order``) as a tensor of ``shape`` whose
    strides are the dense layout in ``order``: the inverse of :func:`in_order`."""
    if is_row_major(order):
        return flat.view(tuple(shape))
    permuted = flat.view(tuple(shape[d] for d in order))
    inverse = sorted(range(len(order)), key=lambda i: order[i])
    return permuted.permute(tuple(inverse))


def flat_source(tensor: Tensor, order: Sequence[int]) -> Tensor:
    """A state tensor from a state dict as its parameter's flat form: a 1-D one (the sharded
    format at world size 1, or a 1-D parameter's) as it is, one shaped like the parameter
    (torch's format, whatever its strides) in ``order``."""
    return tensor.reshape(-1) if tensor.dim() <= 1 else in_order(tensor, order)


#: In a sharded state dict's ``param_shapes``, what separates a shape from its order.
ORDER_MARK = -1


def layout_entry(shape: Sequence[int], order: Sequence[int]) -> list[int]:
    """A parameter's entry in a sharded state dict's ``param_shapes``: its shape, then, if its
    order is not row-major, :data:`ORDER_MARK` and the order. One entry per parameter under
    one key, so that a checkpoint from before orders were saved still has every key a load
    asks for, and reads as row-major."""
    return list(shape) if is_row_major(order) else [*shape, ORDER_MARK, *order]


def parse_layout_entry(entry: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(shape, order)`` from a :func:`layout_entry` (``ValueError`` or ``TypeError`` if it
    is none)."""
    numbers = [int(n) for n in entry]
    if ORDER_MARK not in numbers:
        return tuple(numbers), tuple(range(len(numbers)))
    cut = numbers.index(ORDER_MARK)
    shape, order = tuple(numbers[:cut]), tuple(numbers[cut + 1 :])
    if sorted(order) != list(range(len(shape))):
        raise ValueError(f"{entry!r} is not a shape and a memory order")
    return shape, order
