"""Bytes per rank for a GPT-2-small-shaped model: bf16 + fp32 master weights against its peers.

Configurations, side by side in one run (one launch of spawned gloo ranks per world size):

- (a) ``torch.optim.RMSprop``, fp32 parameters, replicated on every rank (the baseline);
- (b) ``torch.optim.RMSprop``, bf16 parameters, replicated (no master weights: state in bf16);
- (c) ``ZeroRedundancyOptimizer(RMSprop)`` on bf16 parameters (it assigns whole tensors to
  ranks, so the table shows the rank holding the most; the other ranks are listed below);
- (d) ``ShardedRMSprop``, fp32 parameters;
- (e) ``ShardedRMSprop``, bf16 parameters with fp32 master weights (its default).

Each rank builds real tensors of the real sizes (constant values: memory does not depend on
them), sets a gradient on every parameter, takes one real ``step()`` and counts the bytes of
the tensors it holds, each untyped storage once (by ``data_ptr``): the parameters, their
``.grad``, the optimizer's state (``master_weight`` apart, 0-d ``step`` counters included)
and, for ShardedRMSprop, each bucket's state and ``grad_window`` (the staging buffer of
``min(shard, GRAD_WINDOW_NUMEL)`` fp32 elements). Any other tensor alive in the process (found
through ``gc``) that was not there before is reported as unaccounted; it is zero. The formula
(``bf16 params + bf16 grads + (fp32 master + fp32 state)/N + grad window`` for (e)) is only
printed beside the measurement, with the difference in bytes.

ShardedRMSprop keeps private flat buffers (``host_shared=False``, its default); with
``host_shared=True`` each rank's mapping of the one shared buffer would still be counted in full:
per-rank memory as a GPU rank holds it (its own flat copy), not what this host physically holds. The replicated (a) and (b) do no communication and
hold the same tensors on every rank, so rank 0 alone builds them: N copies of (a) would not
fit this 24 GB host at N = 8.

Run (CPU, gloo, 1 thread per rank; on 2 cores ``both`` took 3 to 6 min, by the load)::

    .venv/bin/python benchmarks/bench_memory.py --momentum-centered both  # the saved results
    .venv/bin/python benchmarks/bench_memory.py                           # 3 state buffers only
    .venv/bin/python benchmarks/bench_memory.py --model tiny --world-sizes 1,2   # under a minute

It prints the tables and writes ``benchmarks/results/memory_bf16_cpu.md`` (GPT-2 small) or
``memory_bf16_cpu_<model>.md`` (other models).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contenders  # noqa: E402
from bandwidth_model import ALIGN, padded_numel  # noqa: E402
from harness import Rank, all_gather, cores, run_ranks  # noqa: E402

from sharded_rmsprop import ShardedRMSprop  # noqa: E402
from sharded_rmsprop.shards import GRAD_WINDOW_NUMEL  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
STEP_BYTES = 4  # one float32 0-d ``step`` counter per parameter (torch's and ours)
COLUMNS = ("params", "grads", "master", "state", "grad_window", "unaccounted")


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    block_size: int
    n_layer: int
    n_embd: int

    def param_shapes(self) -> list[tuple[int, ...]]:
        """GPT-2's tensors (``lm_head`` tied to ``wte``, as in GPT-2, so not listed twice)."""
        e = self.n_embd
        shapes: list[tuple[int, ...]] = [(self.vocab, e), (self.block_size, e)]
        for _ in range(self.n_layer):
            shapes += [(e,), (e,), (e, 3 * e), (3 * e,), (e, e), (e,)]  # ln_1, attn
            shapes += [(e,), (e,), (e, 4 * e), (4 * e,), (4 * e, e), (e,)]  # ln_2, mlp
        return shapes + [(e,), (e,)]  # ln_f


MODELS = {
    "gpt2": ModelShape(50257, 1024, 12, 768),  # GPT-2 small: 124.44 M parameters
    "gpt2-mini": ModelShape(50257, 1024, 6, 384),  # 30.0 M
    "tiny": ModelShape(4096, 256, 2, 128),  # 0.96 M, for quick runs
}


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    dtype: torch.dtype
    kind: str  # "replicated", "zero" or "ours"


CONTENDERS = (
    Contender("a", "RMSprop fp32 (replicated)", torch.float32, "replicated"),
    Contender("b", "RMSprop bf16 (replicated)", torch.bfloat16, "replicated"),
    Contender("c", "ZeRO(RMSprop) bf16", torch.bfloat16, "zero"),
    Contender("d", "ShardedRMSprop fp32", torch.float32, "ours"),
    Contender("e", "ShardedRMSprop bf16 + master", torch.bfloat16, "ours"),
)


@dataclass(frozen=True)
class Config:
    model: str
    world_sizes: tuple[int, ...]
    variants: tuple[bool, ...]  # momentum and centered on (3 buffers) / off (square_avg only)
    fused: bool | None

    def options(self, full: bool) -> dict:
        return dict(lr=1e-3, alpha=0.99, momentum=0.9 if full else 0.0, centered=full)


# -- one rank ---------------------------------------------------------------------------------


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.full(shape, 0.02, dtype=dtype)) for shape in shapes]


def build_optimizer(
    c: Contender, params: list[torch.nn.Parameter], options: dict, fused: bool | None
) -> torch.optim.Optimizer:
    if c.kind == "replicated":
        return contenders.rmsprop(params, options)
    if c.kind == "zero":
        return contenders.torch_zero(params, options, bucket_view=False)
    return contenders.sharded_rmsprop(params, options, fused=fused, master_weights=True)


def live_storages() -> dict[int, int]:
    """``data_ptr -> nbytes`` of the storage of every tensor alive in this process (via gc); of
    storages starting at one address (a flat buffer and its first parameter's), the largest."""
    out: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:  # type(): no __class__ lookups
            storage = obj.untyped_storage()
            if storage.nbytes():
                ptr = storage.data_ptr()
                out[ptr] = max(out.get(ptr, 0), storage.nbytes())
    return out


class StorageCounter:
    """Bytes per column; each byte of memory counted once, in the first column that meets it
    (ShardedRMSprop's parameters have storages of their own inside their flat buffer's)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []  # disjoint [start, end) address ranges, sorted
        self.bytes = dict.fromkeys(COLUMNS, 0)

    def add(self, column: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        self.add_range(column, storage.data_ptr(), storage.nbytes())

    def add_range(self, column: str, start: int, nbytes: int) -> None:
        end = start + nbytes
        covered = sum(max(0, min(e, end) - max(s, start)) for s, e in self.seen)
        self.bytes[column] += nbytes - covered
        merged = [(start, end)]
        for s, e in self.seen:
            if e < merged[0][0] or s > merged[0][1]:
                merged.append((s, e))
            else:
                merged[0] = (min(s, merged[0][0]), max(e, merged[0][1]))
        self.seen = sorted(merged)


def count_bytes(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], before: dict[int, int]
) -> dict[str, int]:
    counter = StorageCounter()
    for p in params:
        counter.add("params", p)
        if p.grad is not None:
            counter.add("grads", p.grad)
    inner = getattr(opt, "optim", opt)  # ZeRO: the local RMSprop over this rank's tensors
    for state in inner.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                counter.add("master" if key == "master_weight" else "state", value)
    if isinstance(opt, ShardedRMSprop):  # its buffers, as it accounts for them
        for kind, tensors in opt.memory().items():
            for tensor in tensors:
                counter.add("state" if kind == "steps" else kind, tensor)
    for ptr, nbytes in live_storages().items():
        if ptr not in before:
            counter.add_range("unaccounted", ptr, nbytes)
    return counter.bytes


def measure(
    c: Contender, shapes: list[tuple[int, ...]], options: dict, fused: bool | None
) -> list[int]:
    """One real step of ``c``; this rank's bytes per column, then 1 if ours is host-shared."""
    gc.collect()
    before = live_storages()
    params = make_params(shapes, c.dtype)
    opt = build_optimizer(c, params, options, fused)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    counts = count_bytes(opt, params, before)
    shared = isinstance(opt, ShardedRMSprop) and opt.shares_host_memory
    del opt, params
    gc.collect()
    return [counts[column] for column in COLUMNS] + [int(shared)]


def rank_main(at: Rank, cfg: Config) -> dict[tuple[bool, str], list[list[int]]]:
    """Every contender and variant: each rank's row (the ranks that built it)."""
    shapes = MODELS[cfg.model].param_shapes()
    results: dict[tuple[bool, str], list[list[int]]] = {}
    for full in cfg.variants:
        for c in CONTENDERS:
            start = time.perf_counter()
            # Replicated: no communication, the same tensors on every rank; rank 0 alone.
            skip = c.kind == "replicated" and at.rank != 0
            row = [-1] * 7 if skip else measure(c, shapes, cfg.options(full), cfg.fused)
            rows = all_gather(torch.tensor(row, dtype=torch.int64)).tolist()
            results[full, c.key] = [r for r in rows if r[0] >= 0]  # skipped ranks: -1
            if at.rank == 0:
                print(
                    f"  N={at.world} ({c.key}) {'3' if full else '1'} buffers: "
                    f"{time.perf_counter() - start:.1f} s",
                    flush=True,
                )
    return results


def run_world(world: int, cfg: Config) -> dict:
    return run_ranks(rank_main, world, cfg)


# -- formulas and report --------------------------------------------------------------------------


def mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f}"


def formula(
    c: Contender, shapes: list[tuple[int, ...]], world: int, buffers: int
) -> tuple[str, int]:
    """What the configuration should hold per rank: (the terms in MiB, bytes).

    Every count includes ``STEP_BYTES`` per step counter (torch: one per tensor it updates;
    ours: one per tensor on every rank); ZeRO's is for an even split it cannot reach."""
    numels = [torch.Size(s).numel() for s in shapes]
    numel = sum(numels)
    steps = STEP_BYTES * len(shapes)
    width = torch.empty((), dtype=c.dtype).element_size()
    if c.kind == "replicated":
        terms = [width * numel, width * numel, buffers * width * numel]
        return f"{mib(terms[0])} + {mib(terms[1])} + {mib(terms[2])}", sum(terms) + steps
    if c.kind == "zero":
        state = buffers * width * numel
        text = f"{mib(width * numel)} + {mib(width * numel)} + {mib(state)}/{world} (even split)"
        return text, 2 * width * numel + (state + steps) // world
    pad = padded_numel(numels, world)  # one bucket: all parameters share dtype and device
    master = 4 * pad if c.dtype != torch.float32 else 0
    sharded = [master, 4 * buffers * pad]  # fp32 master (bf16 only), fp32 state
    window = 4 * min(pad // world, GRAD_WINDOW_NUMEL)  # fp32 staging, a constant per bucket
    inner = " + ".join(mib(t) for t in sharded if t)
    inner = f"({inner})" if master else inner
    text = f"{mib(width * pad)} + {mib(width * numel)} + {inner}/{world} + {mib(window)}"
    return text, width * pad + width * numel + sum(sharded) // world + window + steps


def top_rank(rows: list[list[int]]) -> list[int]:
    """The row of the rank holding the most (ZeRO's ranks differ; the others' are equal)."""
    return max(rows, key=lambda r: sum(r[: len(COLUMNS)]))


def total(results: dict, world: int, full: bool, key: str) -> int:
    """Bytes per rank of configuration ``key`` at ``world`` ranks (its fullest rank)."""
    return sum(top_rank(results[world][full, key])[: len(COLUMNS)])


def ratio(results: dict, world: int, full: bool, key: str) -> float:
    return total(results, world, full, key) / total(results, world, full, "a")


def render_variant(results: dict, cfg: Config, full: bool) -> list[str]:
    shapes = MODELS[cfg.model].param_shapes()
    title = (
        "momentum=0.9, centered=True: 3 state buffers"
        if full
        else ("momentum=0, centered=False: 1 state buffer (square_avg)")
    )
    lines = [
        f"## {title}",
        "",
        "| N | config | params | grads | master | state | grad window | **total / rank** "
        "| x (a) | formula, MiB | measured - formula, B |",
        "| ---: | --- |" + " ---: |" * 7 + " --- | ---: |",
    ]
    notes = []
    for world in cfg.world_sizes:
        for c in CONTENDERS:
            rows = results[world][full, c.key]
            row, held = top_rank(rows), total(results, world, full, c.key)
            text, predicted = formula(c, shapes, world, 3 if full else 1)
            cells = [f"{row[i] / MIB:.1f}" if row[i] else "-" for i in range(5)]
            lines.append(
                f"| {world} | ({c.key}) {c.label} | " + " | ".join(cells) + f" | **{mib(held)}** "
                f"| {ratio(results, world, full, c.key):.3f} | {text} = {mib(predicted)} "
                f"| {held - predicted:+,} |"
            )
            if c.kind == "zero" and world > 1:
                each = ", ".join(f"{sum(r[: len(COLUMNS)]) / MIB:.1f}" for r in rows)
                notes.append(f"ZeRO at N={world}, total per rank (MiB): {each}.")
    return lines + [""] + notes


def summary(results: dict, cfg: Config, full: bool) -> list[str]:
    """Totals and ratios to (a) per N; then (e) against (a), (b) and (c) in words."""
    worlds = cfg.world_sizes
    lines = [
        "Total per rank, MiB (x (a)):",
        "",
        "| config | " + " | ".join(f"N={w}" for w in worlds) + " |",
        "| --- |" + " ---: |" * len(worlds),
    ]
    for c in CONTENDERS:
        cells = [
            f"{total(results, w, full, c.key) / MIB:.0f} ({ratio(results, w, full, c.key):.2f}x)"
            for w in worlds
        ]
        lines.append(f"| ({c.key}) {c.label} | " + " | ".join(cells) + " |")
    listed = lambda key: ", ".join(f"{ratio(results, w, full, key):.2f}" for w in worlds)

    def versus(key: str) -> str:
        less = [w for w in worlds if ratio(results, w, full, "e") < ratio(results, w, full, key)]
        sides = (("less", less), ("more", [w for w in worlds if w not in less]))
        return " and ".join(f"{side} at N = {', '.join(map(str, ws))}" for side, ws in sides if ws)

    numel = sum(torch.Size(s).numel() for s in MODELS[cfg.model].param_shapes())
    floor = 4 * numel / total(results, worlds[0], full, "a")
    return lines + [
        "",
        (
            f"In words: per rank, (e) ShardedRMSprop bf16 + fp32 master holds {listed('e')} times "
            f"what replicated fp32 RMSprop (a) holds at N = {', '.join(map(str, worlds))}. Its fp32 "
            "master and state divide by N; its bf16 parameters and gradients and its fixed grad "
            f"window do not, so it tends to about {floor:.2f} (bf16 params + grads). Against (b), "
            f"replicated bf16 RMSprop ({listed('b')}), (e) holds {versus('b')}; against (c), ZeRO "
            f"over bf16 ({listed('c')}, its fullest rank), {versus('c')}. (b) and (c) keep their "
            "state in bf16 and have no fp32 master: what (e) holds above them pays for an fp32 "
            "update."
        ),
    ]


def render(results: dict, cfg: Config, command: str, seconds: float) -> str:
    shapes = MODELS[cfg.model].param_shapes()
    numels = [torch.Size(s).numel() for s in shapes]
    numel = sum(numels)
    every_row = [row for by_key in results.values() for rows in by_key.values() for row in rows]
    unaccounted = max(row[COLUMNS.index("unaccounted")] for row in every_row)
    shared = sorted(  # world sizes at which ShardedRMSprop's buckets were host-shared
        {w for w in cfg.world_sizes for rows in results[w].values() if any(r[-1] for r in rows)}
    )
    lines = [
        f"# Memory per rank: bf16 + fp32 master weights ({cfg.model}, CPU, gloo)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today()}, torch {torch.__version__}, "
        f"{cores()} cores, 1 thread per rank; ran in {seconds:.0f} s.",
        "",
        f"Model: `{cfg.model}` {MODELS[cfg.model]}, {len(shapes)} tensors, {numel:,} "
        f"parameters (P). MiB = 2^20 bytes. One real `step()` per configuration, then the "
        "bytes of the untyped storages each rank holds (each once): parameters, `.grad`, "
        "`master_weight`, other optimizer state (0-d step counters included), ShardedRMSprop's "
        f"`grad_window`. Live tensors (found through gc) in none of these columns: at most "
        f"{unaccounted} bytes on any rank in any configuration.",
        "",
        "- (a), (b): replicated, no communication, built on rank 0 only (identical on every rank).",
        "- (c): ZeRO assigns whole tensors; the row is the rank holding the most, the others are "
        "listed under the table. Its formula is the even split it cannot reach.",
        "- (d), (e): the formula is `params(P') + grads(P) + (fp32 master + fp32 state)/N + "
        f"grad window`, with P' the padded flat length (starts aligned to {ALIGN}, end to "
        f"{ALIGN}N) and "
        f"the window min(P'/N, GRAD_WINDOW_NUMEL = {GRAD_WINDOW_NUMEL:,}) fp32 elements "
        f"(at most {mib(4 * GRAD_WINDOW_NUMEL)} MiB) per bucket, one bucket here; the step "
        "counters (4 B per tensor) are in every formula total.",
        "- Per-rank memory is what a GPU rank would hold"
        + (
            f": at N = {shared} ShardedRMSprop's ranks shared one flat buffer on this host "
            "(`host_shared=True`), and each rank's mapping is counted in full, as its own copy."
            if shared
            else " (ShardedRMSprop's default private buffers)."
        ),
        "- Not counted: activations, DDP's gradient buckets, transient buffers during `step()`.",
        "",
    ]
    for full in cfg.variants:
        lines += render_variant(results, cfg, full) + [""] + summary(results, cfg, full) + [""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="gpt2")
    parser.add_argument("--world-sizes", default="1,2,4,8", help="comma-separated, e.g. 1,2,4")
    parser.add_argument(
        "--momentum-centered",
        choices=["on", "off", "both"],
        default="on",
        help="on: momentum and centered (3 state buffers); off: square_avg only",
    )
    parser.add_argument(
        "--fused",
        choices=["auto", "off"],
        default="off",
        help="ShardedRMSprop's update kernel (held memory does not depend on it)",
    )
    args = parser.parse_args(argv)
    variants = {"on": (True,), "off": (False,), "both": (True, False)}[args.momentum_centered]
    worlds = tuple(int(w) for w in args.world_sizes.split(","))
    return Config(args.model, worlds, variants, None if args.fused == "auto" else False)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    command = " ".join([".venv/bin/python", "benchmarks/bench_memory.py", *sys.argv[1:]])
    start = time.perf_counter()
    results = {}
    for world in cfg.world_sizes:
        print(f"world size {world} ...", flush=True)
        results[world] = run_world(world, cfg)
    table = render(results, cfg, command, time.perf_counter() - start)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    name = "memory_bf16_cpu.md" if cfg.model == "gpt2" else f"memory_bf16_cpu_{cfg.model}.md"
    (path := RESULTS / name).write_text(table)
    print("wrote", path)


if __name__ == "__main__":
    main()
