"""The sharding plan, without processes."""

from __future__ import annotations

import pytest
import torch

from sharded_rmsprop.layout import ALIGNMENT, ParamSpec, plan_buckets
from sharded_rmsprop.windows import Span, merge_spans

CPU = torch.device("cpu")


def span_of(piece) -> Span:
    """The span a piece covers in its shard."""
    return Span(piece.slot.group, piece.shard_start, piece.shard_end)


def specs(*shapes, dtype=torch.float32, group=0, start=0):
    return [ParamSpec(start + i, group, shape, dtype, CPU) for i, shape in enumerate(shapes)]


AWKWARD = specs((), (0,), (1,), (3,), (5, 7), (17,), (4, 4, 3), (1000,), (33, 2))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 64])
def test_shards_are_equal_aligned_and_cover_every_element_once(world_size: int) -> None:
    (plan,) = plan_buckets(AWKWARD, world_size)
    assert plan.padded_numel == plan.shard_numel * world_size
    assert plan.shard_numel % ALIGNMENT == 0
    assert (
        plan.padded_numel >= sum(slot.numel for slot in plan.slots) == sum(s.numel for s in AWKWARD)
    )
    owners = {}
    for rank in range(world_size):
        start, end = plan.shard_range(rank)
        assert start % ALIGNMENT == 0 and end - start == plan.shard_numel
        for piece in plan.pieces(rank):
            assert 0 <= piece.shard_start < piece.shard_end <= plan.shard_numel
            for k in range(piece.numel):
                key = (piece.slot.index, piece.param_start + k)
                assert key not in owners
                owners[key] = rank
                # the element's flat position is the same seen from the param and the shard
                assert piece.slot.offset + piece.param_start + k == start + piece.shard_start + k
    expected = {(s.index, k) for s in AWKWARD for k in range(s.numel)}
    assert set(owners) == expected


def test_parameter_starts_are_aligned_and_in_order() -> None:
    (plan,) = plan_buckets(AWKWARD, 3)
    offsets = [slot.offset for slot in plan.slots]
    assert offsets == sorted(offsets)
    assert all(offset % ALIGNMENT == 0 for offset in offsets)
    assert [slot.index for slot in plan.slots] == list(range(len(AWKWARD)))


def test_exact_balance_with_one_huge_parameter() -> None:
    """An embedding-like parameter is split across ranks, not assigned to one of them."""
    (plan,) = plan_buckets(specs((50257, 384), (384,), (64, 64)), 4)
    owned = [sum(p.numel for p in plan.pieces(r)) for r in range(4)]
    assert max(owned) - min(owned) <= ALIGNMENT * 4
    assert all(len(plan.pieces(r)) >= 1 for r in range(4))


def test_world_size_larger_than_parameter_count() -> None:
    (plan,) = plan_buckets(specs((3,)), 8)
    pieces = [plan.pieces(r) for r in range(8)]
    assert [len(p) for p in pieces] == [1, 0, 0, 0, 0, 0, 0, 0]
    assert plan.shard_numel == ALIGNMENT


def test_only_empty_parameters_need_no_buffer() -> None:
    (plan,) = plan_buckets(specs((0,), (0, 5)), 2)
    assert plan.padded_numel == 0 and plan.pieces(0) == () and plan.pieces(1) == ()


def test_one_bucket_per_dtype_and_device_in_order_of_appearance() -> None:
    mixed = [
        ParamSpec(0, 0, (4,), torch.bfloat16, CPU),
        ParamSpec(1, 0, (4,), torch.float32, CPU),
        ParamSpec(2, 1, (4,), torch.bfloat16, CPU),
        ParamSpec(3, 1, (4,), torch.float64, torch.device("meta")),
    ]
    plans = plan_buckets(mixed, 2)
    assert [(p.dtype, p.device.type) for p in plans] == [
        (torch.bfloat16, "cpu"),
        (torch.float32, "cpu"),
        (torch.float64, "meta"),
    ]
    assert [s.index for s in plans[0].slots] == [0, 2]


def test_bucket_numel_splits_each_kind_into_consecutive_buckets() -> None:
    sizes = specs((30,), (50,), (20,), (200,), (10,), (15,))
    plans = plan_buckets(sizes, 2, bucket_numel=100)
    # 30+50+20 fill one; 200 is larger than a bucket: alone; 10+15 start the next
    assert [[slot.index for slot in plan.slots] for plan in plans] == [[0, 1, 2], [3], [4, 5]]
    for plan in plans:  # each bucket split evenly across the ranks on its own
        assert plan.padded_numel % (2 * ALIGNMENT) == 0
        assert sum(piece.numel for r in range(2) for piece in plan.pieces(r)) == sum(
            slot.numel for slot in plan.slots
        )
    assert plan_buckets(sizes, 2, bucket_numel=10**9) == plan_buckets(sizes, 2)
    with pytest.raises(ValueError, match="bucket_numel must be None or a positive integer"):
        plan_buckets(sizes, 2, bucket_numel=0)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="world_size must be at least 1"):
        plan_buckets(AWKWARD, 0)
    with pytest.raises(ValueError, match="alignment must be at least 1"):
        plan_buckets(AWKWARD, 2, alignment=0)
    (plan,) = plan_buckets(AWKWARD, 2)
    with pytest.raises(ValueError, match="rank 2 is outside a world of size 2"):
        plan.shard_range(2)


def test_adjacent_pieces_of_one_group_merge_into_one_span() -> None:
    a = ALIGNMENT
    group0 = specs((a,), (2 * a,), (5,), group=0)  # (5,) is followed by padding
    group1 = specs((a,), (a,), group=1, start=3)
    (plan,) = plan_buckets(group0 + group1, 1)
    spans = merge_spans([span_of(piece) for piece in plan.pieces(0)])
    assert spans == [Span(0, 0, 3 * a + 5), Span(1, 4 * a, 6 * a)]
    # a missing gradient splits a span: the middle piece is left out
    pieces = plan.pieces(0)
    assert merge_spans([span_of(pieces[0]), span_of(pieces[2])]) == [
        Span(0, 0, a),
        Span(0, 3 * a, 3 * a + 5),
    ]
