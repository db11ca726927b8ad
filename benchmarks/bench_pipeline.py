"""Does starting each flat buffer's sync while the next buffer is updated pay?

ShardedRMSprop(..., bucket_numel=N) splits the parameters into buffers of at most N elements;
``step()`` starts each buffer's parameter sync as soon as that buffer's shard is updated, so
the collective of one runs while the next is updated. This measures ``step()`` (update and
sync, the slowest rank's) on the "wide" set's size (48 tensors of 1024 x 512, 25.2 M float32
elements, momentum and centered), for one buffer and for buffers of 4 M and 2 M elements,
each both pipelined and with every sync started after all updates (the order before),
alternating step by step in one run. The results are bit for bit the same either way.

Run::

    .venv/bin/python benchmarks/bench_pipeline.py [--world 2] [--repeats 11]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Rank, device_name, median_ms, run_ranks, slowest, timed  # noqa: E402

from sharded_rmsprop import ShardedRMSprop  # noqa: E402
from sharded_rmsprop.sharding import Sharding  # noqa: E402

PIPELINED = Sharding.update
SHAPES = [(1024, 512)] * 48


def after_all(self, groups, grad_scale, has_grad=None, receive=None, after_each=None):
    """Sharding.update with every sync started after all updates."""
    PIPELINED(self, groups, grad_scale, has_grad, receive)
    for bucket in self.buckets:
        after_each(bucket)


def measure(rank: Rank, bucket_numel: int | None, repeats: int) -> dict:
    torch.manual_seed(0)
    params = [torch.randn(shape, requires_grad=True) for shape in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = ShardedRMSprop(params, lr=1e-3, momentum=0.9, centered=True, bucket_numel=bucket_numel)
    seconds: dict[str, list[float]] = {"pipelined": [], "after all": []}
    for i in range(2 * repeats + 4):  # the first 4 warm up
        order = "pipelined" if i % 2 else "after all"
        Sharding.update = PIPELINED if order == "pipelined" else after_all
        step = slowest(timed(opt.step, rank.device, barrier=True))
        if i >= 4:
            seconds[order].append(step)
    return {
        "buffers": len(opt.sharding.buckets),
        **{order: median_ms(values) for order, values in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    print(
        f"{device_name()}, {args.world} gloo ranks, 1 thread each; step ms, median of "
        f"{args.repeats}, the slowest rank's"
    )
    print("| bucket_numel | buffers | pipelined | every sync after all updates |")
    print("| --- | ---: | ---: | ---: |")
    for bucket_numel in (None, 1 << 22, 1 << 21):
        row = run_ranks(measure, args.world, bucket_numel, args.repeats)
        print(
            f"| {bucket_numel or 'one buffer'} | {row['buffers']} | {row['pipelined']:.1f} | "
            f"{row['after all']:.1f} |"
        )


if __name__ == "__main__":
    main()
