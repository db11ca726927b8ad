"""Which collective should sync the parameters? Measure them side by side on this backend.

After the update each rank holds the fresh values of its own shard of a flat buffer and needs
everyone else's. Candidates:

- ``all_gather``: one in-place ``all_gather_single`` / ``all_gather_into_tensor`` of the buffer;
- ``all_gather x4``: the same in four async chunks (overlap of chunks inside the backend);
- ``broadcasts``: one async broadcast per owning rank, each of its shard, then wait on all.

Run (CPU, gloo, 2 ranks, 100 MB of fp32)::

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_sync.py --megabytes 100

On a GPU pass ``--backend nccl``. Rank 0 prints a table of median times and the ratio to the
fastest, and writes it to ``benchmarks/results/sync_<backend>_<world>ranks.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import timed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _gather(output: torch.Tensor, shard: torch.Tensor):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, shard, async_op=True)


def sync_all_gather(flat: torch.Tensor, world: int, rank: int, chunks: int = 1) -> None:
    works = []
    for piece in flat.chunk(chunks):
        shard = piece.numel() // world
        works.append(_gather(piece, piece[rank * shard : (rank + 1) * shard]))
    for work in works:
        work.wait()


def sync_broadcasts(flat: torch.Tensor, world: int, rank: int) -> None:
    works = [
        dist.broadcast(shard, owner, async_op=True) for owner, shard in enumerate(flat.chunk(world))
    ]
    for work in works:
        work.wait()


def time_it(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, ranks barriered before each."""
    times = [timed(fn, device, barrier=True) for _ in range(repeats + 2)]
    return statistics.median(times[2:])  # after two warm-up runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cpu")
        if args.backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        numel = int(args.megabytes * 2**20 / 4) // (world * 64) * world * 64
        flat = torch.randn(numel, device=device)
        candidates = {
            "all_gather": lambda: sync_all_gather(flat, world, rank),
            "all_gather x4": lambda: sync_all_gather(flat, world, rank, chunks=4),
            "broadcasts": lambda: sync_broadcasts(flat, world, rank),
        }
        results = {name: time_it(fn, device, args.repeats) for name, fn in candidates.items()}
        if rank == 0:
            best = min(results.values())
            lines = [
                f"Parameter sync of {numel * 4 / 2**20:.0f} MiB fp32, {args.backend}, "
                f"{world} ranks, median of {args.repeats}",
                "",
                "| collective | ms | x fastest |",
                "| --- | ---: | ---: |",
                *(f"| {n} | {t * 1e3:.1f} | {t / best:.2f} |" for n, t in results.items()),
            ]
            table = "\n".join(lines)
            print(table)
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"sync_{args.backend}_{world}ranks.md").write_text(table + "\n")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
