"""One optimizer step, ShardedRMSprop against its peers: time (update + parameter sync) and memory.

For each world size (one launch of spawned ranks per world size, every contender in the same
processes) and each parameter set, it measures

- the median optimizer step time: gradients already in ``p.grad`` (identical on every rank, as
  DDP leaves them), ranks barriered, then the update plus the parameter sync; a step's time is
  the slowest rank's, the table shows the median over the repeats, after warm-up steps;
- the optimizer's memory per rank (max and min over the ranks, and max / mean).

Contenders, timed in round-robin within each repeat (the first one rotates) so that machine
noise hits all of them alike:

- ``replicated``: ``torch.optim.RMSprop`` as under DDP (every rank updates everything, no
  sync); torch's default implementation for the device (the for-loop on CPU, foreach on CUDA);
- ``zero``: ``ZeroRedundancyOptimizer(RMSprop)``, one broadcast per parameter;
- ``zero-bucket``: the same with ``parameters_as_bucket_view=True`` (one broadcast per rank);
- ``fsdp2``: ``fully_shard`` on the root module and ``torch.optim.RMSprop`` on its sharded
  DTensor parameters; the time is its step plus ``module.unshard()`` (the all-gather and
  copy-out FSDP2 runs before the next forward), not the ``reshard()`` after it;
  ``fsdp2 step only`` is the step alone, from the same iterations;
- ``ours``: ``ShardedRMSprop`` (``fused=None``: the fused kernel where there is one), with its
  defaults: private buffers, the parameter sync a collective, the path that also runs across
  hosts and on GPUs;
- ``ours host_shared``: the same with ``host_shared=True`` (ranks of this host map one copy of
  the parameters; the sync is a barrier);
- ``ours fused=False``: ``ShardedRMSprop`` on the reference update (torch's ops).
- ``ours copy-out`` (only when named with ``--contenders``): ``ours`` plus a copy of every
  parameter out of the flat buffer into memory of its own after each step, the work and the
  memory (counted as the optimizer's) that parameters with their own memory would cost, as
  torch ZeRO's default has them; ShardedRMSprop's parameters instead get a storage of their
  own over their range of the flat buffer, which costs neither (README, "Model files").

For the ShardedRMSprop contenders it also times, inside the same steps, the agreement that
starts each ``step()`` (building the facts and the one host all-reduce of their digests).

Parameter sets (float32): ``wide``: 24 x Linear(1024, 1024); ``many-small``: 400 x
Linear(256, 256); ``gpt2``: GPT-2-shaped, a 50257x384 token embedding, a 1024x384 position
embedding, six pre-LayerNorm blocks (n_embd 384), a final LayerNorm and an untied 50257x384
head (as ``launch/gpt.py``).

Memory counted as the optimizer's: the state tensors (``square_avg``, ``momentum_buffer``,
``grad_avg``; 0-d ``step`` counters left out) of ``opt.state`` (ZeRO: its local optimizer's;
FSDP2: the local shards of the DTensor state); for ShardedRMSprop its state buffers, its
gradient window (16 MiB at most) and its per-parameter step counters. Parameters and gradients are not
counted for anyone: ZeRO's bucket views hold the parameters (no extra memory); FSDP2's
parameters and gradients are sharded too (1/N of them per rank, a saving not shown here).

Run (CPU, gloo, 1 thread per rank; ranks 3 and 4 oversubscribe a 2-core machine)::

    .venv/bin/python benchmarks/bench_step.py                       # world sizes 1-4, all sets
    .venv/bin/python benchmarks/bench_step.py --world-sizes 2 --sets wide --repeats 5
    .venv/bin/python benchmarks/bench_step.py --device cuda         # NCCL, 1 GPU per rank
    .venv/bin/python benchmarks/bench_step.py --render benchmarks/results/step_cpu_gloo.json

The full CPU run takes about 6-7 minutes on 2 cores (15 repeats). It prints markdown tables and
writes ``benchmarks/results/step_<device>_<backend>.md``, the raw numbers as ``.json``
(``benchmarks/model.py`` reads them) and two plots (``_time.png``, ``_memory.png``). With
``--world-sizes``, ``--sets`` or ``--contenders`` narrower than the defaults the files get a
``_partial`` suffix, so a quick run does not overwrite the full one; ``--render`` rewrites the
table and plots of a saved run without measuring.

Noise: other jobs may share the machine; the contenders are interleaved so that it hits them
alike, and only ratios within one run are worth comparing. Even identical optimizers differ:
four ``torch.optim.RMSprop`` instances on copies of ``wide`` in one process measured 77 to
93 ms (allocation placement), so differences under ~20 % between contenders are not findings.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    Rank,
    all_gather,
    cores,
    device_name,
    measured_or_saved,
    median_ms,
    now,
    quartiles_ms,
    run_ranks,
)

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20

SETS = ("wide", "many-small", "gpt2")
CONTENDERS = (
    "replicated",
    "zero",
    "zero-bucket",
    "fsdp2",
    "ours",
    "ours host_shared",
    "ours fused=False",
)
#: Contenders measured only when named (``--contenders``).
EXTRA_CONTENDERS = ("ours copy-out",)
#: Plot styles: one colour per optimizer, dashed for the variants.
STYLE = {
    "replicated": dict(color="tab:blue", marker="o"),
    "zero": dict(color="tab:orange", marker="v"),
    "zero-bucket": dict(color="tab:green", marker="^"),
    "fsdp2": dict(color="tab:red", marker="s"),
    "fsdp2 step only": dict(color="tab:red", marker="s", linestyle="--", mfc="none"),
    "ours": dict(color="black", marker="D", linewidth=2),
    "ours host_shared": dict(color="tab:purple", marker="D", linestyle=":"),
    "ours fused=False": dict(color="black", marker="D", linestyle="--", mfc="none"),
    "ours copy-out": dict(color="tab:gray", marker="D", linestyle="-."),
}


@dataclass(frozen=True)
class Target:
    """One of the project's targets: a ratio within one run, at most ``bound`` (NaN: shown
    for reference, no verdict). ``kind``: "step" (median step time of ``contender`` over
    ``peer``'s), "memory" (the largest rank's optimizer bytes, ``contender`` over ``peer``)
    or "balance" (``contender``'s largest rank's bytes over the mean rank's)."""

    kind: str
    set: str
    world: int
    contender: str
    peer: str = ""
    bound: float = math.nan


TARGETS = (
    Target("step", "wide", 2, "ours", "zero-bucket", 0.45),
    Target("step", "wide", 2, "ours", "replicated", 0.8),
    Target("step", "many-small", 2, "ours", "zero", 0.35),
    Target("step", "many-small", 2, "ours", "zero-bucket", 0.35),
    Target("step", "wide", 2, "ours host_shared", "zero-bucket", 0.45),
    Target("step", "wide", 2, "ours host_shared", "replicated", 0.8),
    Target("step", "many-small", 2, "ours host_shared", "zero", 0.35),
    Target("step", "many-small", 2, "ours host_shared", "zero-bucket", 0.35),
    Target("memory", "wide", 2, "ours", "replicated", 0.7),
    Target("memory", "wide", 4, "ours", "replicated", 0.4),
    Target("memory", "many-small", 2, "ours", "replicated", 0.7),
    Target("memory", "many-small", 4, "ours", "replicated", 0.4),
    Target("memory", "gpt2", 2, "ours", "replicated", 0.7),
    Target("memory", "gpt2", 4, "ours", "replicated", 0.4),
    Target("balance", "gpt2", 4, "ours", bound=1.01),
    Target("balance", "gpt2", 4, "zero-bucket"),
    Target("balance", "gpt2", 4, "zero"),
    Target("balance", "gpt2", 4, "fsdp2"),
)


@dataclass(frozen=True)
class Config:
    world_sizes: tuple[int, ...] = (1, 2, 3, 4)
    sets: tuple[str, ...] = SETS
    contenders: tuple[str, ...] = CONTENDERS
    repeats: int = 15
    warmup: int = 2
    device: str = "cpu"
    lr: float = 1e-3
    alpha: float = 0.99
    momentum: float = 0.9
    centered: bool = True
    timeout_s: float = 1800.0

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    def options(self) -> dict:
        return dict(lr=self.lr, alpha=self.alpha, momentum=self.momentum, centered=self.centered)


# -- parameter sets ------------------------------------------------------------------------------


class _Block(nn.Module):
    """A GPT-2 block's parameters (pre-LayerNorm attention and 4x MLP)."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.attn_proj = nn.Linear(n_embd, n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)


class _GPT2Shaped(nn.Module):
    def __init__(
        self, vocab: int = 50257, block_size: int = 1024, n_layer: int = 6, n_embd: int = 384
    ):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(_Block(n_embd) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)


def build_set(name: str) -> nn.Module:
    """The parameter set ``name`` as a module (on the CPU; nothing runs its forward)."""
    if name == "wide":
        return nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(24)))
    if name == "many-small":
        return nn.Sequential(*(nn.Linear(256, 256) for _ in range(400)))
    if name == "gpt2":
        return _GPT2Shaped()
    raise ValueError(f"unknown parameter set {name!r}; choose from {SETS}")


def describe_set(name: str) -> dict:
    module = build_set(name)
    shapes = [tuple(p.shape) for p in module.parameters()]
    return dict(params=len(shapes), numel=sum(p.numel() for p in module.parameters()))


# -- contenders ----------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def torch_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the state tensors of ``opt`` (0-d ``step`` counters left out)."""
    return sum(
        _tensor_bytes(v)
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )


class Contender:
    """One optimizer on its own copy of the parameters; ``step`` is what gets timed."""

    def __init__(self, module: nn.Module, grads: list[torch.Tensor]) -> None:
        self.module = module
        self.params = list(module.parameters())
        self.grads = grads
        self.opt: torch.optim.Optimizer

    def set_grads(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g

    def step(self) -> float | None:
        """Update plus parameter sync; may return the ``perf_counter()`` at the end of its
        first phase (FSDP2: the optimizer step, before the all-gather)."""
        self.opt.step()
        return None

    def after(self) -> None:
        """Untimed work between steps."""

    def optimizer_bytes(self) -> int:
        return torch_state_bytes(self.opt)


class Replicated(Contender):
    def __init__(self, module, grads, cfg: Config) -> None:
        super().__init__(module, grads)
        self.opt = torch.optim.RMSprop(self.params, **cfg.options())


class Zero(Contender):
    def __init__(self, module, grads, cfg: Config, bucket_view: bool) -> None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        super().__init__(module, grads)
        self.opt = ZeroRedundancyOptimizer(
            self.params,
            optimizer_class=torch.optim.RMSprop,
            parameters_as_bucket_view=bucket_view,
            **cfg.options(),
        )

    def optimizer_bytes(self) -> int:
        return torch_state_bytes(self.opt.optim)  # the bucket views are the parameters


class FSDP2(Contender):
    def __init__(self, module, grads, cfg: Config, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        fully_shard(module, mesh=mesh)
        params = list(module.parameters())
        # Each rank's shard of the (identical) full gradient, no communication.
        sharded = [
            distribute_tensor(g, mesh, p.placements, src_data_rank=None)
            for p, g in zip(params, grads)
        ]
        super().__init__(module, sharded)
        self.opt = torch.optim.RMSprop(self.params, **cfg.options())
        self.device = device

    def step(self) -> float:
        self.opt.step()
        stepped = now(self.device)
        self.module.unshard()
        return stepped

    def after(self) -> None:
        self.module.reshard()


class StepAgreements:
    """Times the agreement that starts each ``ShardedRMSprop.step()``: the seconds from
    entering its ``sharded_rmsprop.agreement.Agreement`` (the one whose ``operation`` is
    "step()"; its body checks the gradients and builds the facts) to leaving it (after the
    all-reduce of their digests), through that public class's ``__enter__`` and ``__exit__``,
    wrapped once per process. Each step's seconds go to the list in ``sink``."""

    sink: list[float] | None = None
    _starts: list[float] = []  # entered, not yet left (innermost last)

    @classmethod
    def install(cls) -> None:
        from sharded_rmsprop.agreement import Agreement

        enter, leave = Agreement.__enter__, Agreement.__exit__
        if getattr(enter, "timed", False):
            return

        def timed_enter(agreement):
            cls._starts.append(time.perf_counter())
            return enter(agreement)

        def timed_exit(agreement, *exc_info):
            try:
                return leave(agreement, *exc_info)
            finally:
                start = cls._starts.pop()
                if agreement.operation == "step()" and cls.sink is not None:
                    cls.sink.append(time.perf_counter() - start)

        timed_enter.timed = True
        Agreement.__enter__, Agreement.__exit__ = timed_enter, timed_exit


class Ours(Contender):
    def __init__(
        self, module, grads, cfg: Config, fused: bool | None, host_shared: bool = False
    ) -> None:
        from sharded_rmsprop import ShardedRMSprop

        super().__init__(module, grads)
        self.opt = ShardedRMSprop(
            self.params, **cfg.options(), fused=fused, host_shared=host_shared
        )
        #: Seconds of each step()'s agreement (facts and their all-reduce), step by step.
        self.agreement_s: list[float] = []
        StepAgreements.install()

    def step(self) -> None:
        StepAgreements.sink = self.agreement_s
        self.opt.step()

    def optimizer_bytes(self) -> int:
        return sum(self.opt.memory_bytes().values())


class OursCopyOut(Ours):
    """``ours`` with every parameter copied out of the flat buffer after each step."""

    def __init__(self, module, grads, cfg: Config) -> None:
        super().__init__(module, grads, cfg, fused=None)
        self.copies = [p.detach().clone() for p in self.params]

    def step(self) -> None:
        super().step()
        with torch.no_grad():
            torch._foreach_copy_(self.copies, [p.detach() for p in self.params])

    def optimizer_bytes(self) -> int:
        return super().optimizer_bytes() + sum(_tensor_bytes(c) for c in self.copies)


def make_contender(name: str, set_name: str, grads, cfg: Config, device: torch.device) -> Contender:
    torch.manual_seed(0)  # the same initial parameters for every contender and rank
    module = build_set(set_name).to(device)
    if name == "replicated":
        return Replicated(module, grads, cfg)
    if name == "zero":
        return Zero(module, grads, cfg, bucket_view=False)
    if name == "zero-bucket":
        return Zero(module, grads, cfg, bucket_view=True)
    if name == "fsdp2":
        return FSDP2(module, grads, cfg, device)
    if name == "ours":
        return Ours(module, grads, cfg, fused=None)
    if name == "ours host_shared":
        return Ours(module, grads, cfg, fused=None, host_shared=True)
    if name == "ours fused=False":
        return Ours(module, grads, cfg, fused=False)
    if name == "ours copy-out":
        return OursCopyOut(module, grads, cfg)
    raise ValueError(f"unknown contender {name!r}")


# -- one world size ------------------------------------------------------------------------------


def timed_step(c: Contender, device: torch.device) -> tuple[float, float]:
    """(seconds of the whole step, seconds to the end of its first phase) on this rank."""
    c.set_grads()
    dist.barrier()
    start = now(device)
    mid = c.step()
    end = now(device)
    c.after()
    return end - start, (mid if mid is not None else end) - start


def measure_set(set_name: str, cfg: Config, device: torch.device) -> dict:
    """Every contender on ``set_name``: times per repeat (slowest rank) and bytes per rank."""
    gen = torch.Generator().manual_seed(1234)  # identical gradients on every rank
    grads = [
        torch.randn(p.shape, generator=gen).to(device) for p in build_set(set_name).parameters()
    ]
    contenders = {
        name: make_contender(name, set_name, grads, cfg, device) for name in cfg.contenders
    }
    names = list(contenders)
    for _ in range(cfg.warmup):
        for name in names:
            timed_step(contenders[name], device)
    whole = torch.zeros(len(names), cfg.repeats, dtype=torch.float64)
    first = torch.zeros_like(whole)
    for r in range(cfg.repeats):
        for k in range(len(names)):  # round-robin, starting one further each repeat
            i = (r + k) % len(names)
            whole[i, r], first[i, r] = timed_step(contenders[names[i]], device)
    memory = torch.tensor([contenders[n].optimizer_bytes() for n in names], dtype=torch.int64)
    agreement = torch.tensor(  # this rank's median agreement per step (the timed steps), or -1
        [
            statistics.median(c.agreement_s[-cfg.repeats :]) if isinstance(c, Ours) else -1.0
            for c in (contenders[n] for n in names)
        ],
        dtype=torch.float64,
    )
    agreement_all = all_gather(agreement, device)  # [world, contender]
    whole_all = all_gather(whole, device)  # [world, contender, repeat]
    first_all = all_gather(first, device)
    memory_all = all_gather(memory, device)  # [world, contender]
    del contenders, grads
    gc.collect()
    out = {}
    for i, name in enumerate(names):
        out[name] = dict(
            times=whole_all[:, i].max(dim=0).values.tolist(),  # slowest rank per repeat
            rank_median=whole_all[:, i].median(dim=1).values.tolist(),
            bytes=memory_all[:, i].tolist(),
        )
        if agreement_all[0, i] >= 0:
            out[name]["agreement_s"] = agreement_all[:, i].max().item()  # the slowest rank's
        if name == "fsdp2":
            out["fsdp2 step only"] = dict(
                times=first_all[:, i].max(dim=0).values.tolist(),
                rank_median=first_all[:, i].median(dim=1).values.tolist(),
                bytes=memory_all[:, i].tolist(),
            )
    return out


def _rank_main(at: Rank, cfg: Config) -> tuple[dict, dict]:
    """Every set at one world size: (results by set, the load average before each set)."""
    results, loads = {}, {}
    for set_name in cfg.sets:
        load = loads[set_name] = os.getloadavg()[0]
        start = time.perf_counter()
        results[set_name] = measure_set(set_name, cfg, at.device)
        if at.rank == 0:
            print(
                f"  world {at.world}, {set_name}: {time.perf_counter() - start:.0f} s "
                f"(load average {load:.1f} before)",
                flush=True,
            )
    return results, loads


def run_world(world: int, cfg: Config) -> tuple[dict, dict]:
    """One launch of ``world`` ranks: (results by set, the load average before each set)."""
    return run_ranks(_rank_main, world, cfg, device=cfg.device, timeout_s=cfg.timeout_s)


# -- report --------------------------------------------------------------------------------------


def _rows(cfg: Config) -> list[str]:
    rows = []
    for name in cfg.contenders:
        rows.append(name)
        if name == "fsdp2":
            rows.append("fsdp2 step only")
    return rows


def targets(results: dict) -> list[tuple[str, float, float, str]]:
    """(what, measured ratio, bound, met?) for the targets in ``TARGETS`` that the run covers."""
    out = []
    for t in TARGETS:
        run = results.get(t.world, {}).get(t.set, {})
        if t.contender not in run or (t.kind != "balance" and t.peer not in run):
            continue
        entry, peer = run[t.contender], run.get(t.peer)
        if t.kind == "step":
            what = f"step, {t.contender} / {t.peer}"
            num, den = median_ms(entry["times"]), median_ms(peer["times"])
        elif t.kind == "memory":
            what = f"memory, {t.contender} / {t.peer}"
            num, den = max(entry["bytes"]), max(peer["bytes"])
        else:
            what = f"memory max/mean, {t.contender}"
            num, den = max(entry["bytes"]), sum(entry["bytes"]) / len(entry["bytes"])
        if den > 0:
            ratio = num / den
            verdict = "met" if ratio <= t.bound else "MISSED"
            if math.isnan(t.bound):
                verdict = "(reference)"
            out.append((f"{t.set}, {t.world} ranks: {what}", ratio, t.bound, verdict))
    return out


def render(results: dict, cfg: Config, meta: dict) -> str:
    worlds = sorted(results)
    lines = [
        f"# Optimizer step: {meta['device_name']}, {cfg.backend}",
        "",
        f"float32; lr={cfg.lr}, alpha={cfg.alpha}, momentum={cfg.momentum}, "
        f"centered={cfg.centered}; "
        f"median of {cfg.repeats} steps after {cfg.warmup} warm-up steps per contender, contenders "
        f"round-robin within each repeat; a step's time is its slowest rank's. torch "
        f"{meta['torch']}, {meta['threads']}. Load average {meta['load_before']:.1f} before, "
        f"{meta['load_after']:.1f} after (other jobs shared the machine). "
        f"Total {meta['seconds']:.0f} s.",
        "",
        "Step = update + parameter sync (fsdp2: step + `unshard()`, its all-gather; `fsdp2 step "
        "only` is the step alone). Memory = optimizer-owned tensors per rank: state buffers; for "
        "ours also the gradient window (16 MiB at most) and step counters. Parameters and gradients are not "
        "counted (ZeRO's bucket views are the parameters themselves; FSDP2 also shards the "
        "parameters and gradients, 1/N per rank, not shown).",
    ]
    if cfg.device == "cpu" and max(worlds) > (cores() or 1):
        lines.append(
            f"\nThis machine has {cores()} cores; world sizes above {cores()} "
            f"oversubscribe them (1 thread per rank), so their times include waiting for a core."
        )
    for s in cfg.sets:
        info = meta["sets"][s]
        lines += [
            "",
            f"## {s}: {info['params']} tensors, {info['numel'] / 1e6:.2f} M elements "
            f"({info['numel'] * 4 / MIB:.0f} MiB fp32)",
            "",
            "1-minute load average when this set started (this benchmark's ranks included): "
            + ", ".join(
                f"{w} rank{'s' if w > 1 else ''} {meta['load_per_run'][str(w)][s]:.1f}"
                for w in worlds
                if s in meta.get("load_per_run", {}).get(str(w), {})
            )
            + f" (the machine has {cores()} cores).",
            "",
            "Step time, ms (median; [quartiles]):",
            "",
            "| contender | " + " | ".join(f"{w} rank{'s' if w > 1 else ''}" for w in worlds) + " |",
            "| --- |" + " ---: |" * len(worlds),
        ]
        for name in _rows(cfg):
            cells = []
            for w in worlds:
                e = results[w].get(s, {}).get(name)
                if e is None:
                    cells.append("")
                else:
                    lo, hi = quartiles_ms(e["times"])
                    cells.append(f"{median_ms(e['times']):.1f} [{lo:.0f}-{hi:.0f}]")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", *_agreement_lines(results, s, worlds, cfg)]
        lines += [
            "",
            "Optimizer memory per rank, MiB: max / min over ranks (max/mean):",
            "",
            "| contender | " + " | ".join(f"{w} rank{'s' if w > 1 else ''}" for w in worlds) + " |",
            "| --- |" + " ---: |" * len(worlds),
        ]
        for name in cfg.contenders:
            cells = []
            for w in worlds:
                e = results[w].get(s, {}).get(name)
                if e is None:
                    cells.append("")
                    continue
                b = e["bytes"]
                mean = sum(b) / len(b)
                cells.append(
                    f"{max(b) / MIB:.1f} / {min(b) / MIB:.1f} ({max(b) / mean if mean else 0:.2f})"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    found = targets(results)
    if found:
        lines += [
            "",
            "## Targets (ratios within this run)",
            "",
            "| target | ratio | bound | |",
            "| --- | ---: | ---: | --- |",
        ]
        for what, ratio, bound, verdict in found:
            b = "" if bound != bound else f"{bound:.2f}"
            lines.append(f"| {what} | {ratio:.3f} | {b} | {verdict} |")
    return "\n".join(lines) + "\n"


def _agreement_lines(results: dict, s: str, worlds: list[int], cfg: Config) -> list[str]:
    """What the agreement at the start of each step() costs, within those steps."""
    cells = {}
    for name in cfg.contenders:
        for w in worlds:
            e = results[w].get(s, {}).get(name)
            if e is not None and "agreement_s" in e:
                ms = e["agreement_s"] * 1e3
                cells.setdefault(name, []).append(
                    f"{w} rank{'s' if w > 1 else ''} {ms:.3f} ms ({ms / median_ms(e['times']):.1%})"
                )
    if not cells:
        return []
    return [
        "The ranks' agreement at the start of each `step()` (building the facts and one host "
        "all-reduce of their digests), median per step of the slowest rank, and its share of "
        "the step: " + "; ".join(f"{name}: {', '.join(c)}" for name, c in cells.items()) + "."
    ]


def plot(results: dict, cfg: Config, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted(results)
    written = []
    for kind in ("time", "memory"):
        fig, axes = plt.subplots(1, len(cfg.sets), figsize=(5 * len(cfg.sets), 4), squeeze=False)
        for ax, s in zip(axes[0], cfg.sets):
            names = _rows(cfg) if kind == "time" else list(cfg.contenders)
            for name in names:
                ws = [w for w in worlds if name in results[w].get(s, {})]
                if not ws:
                    continue
                style = STYLE.get(name, {})
                if kind == "time":
                    ys = [median_ms(results[w][s][name]["times"]) for w in ws]
                    ax.plot(ws, ys, label=name, **style)
                else:
                    hi = [max(results[w][s][name]["bytes"]) / MIB for w in ws]
                    lo = [min(results[w][s][name]["bytes"]) / MIB for w in ws]
                    (line,) = ax.plot(ws, hi, label=name, **style)
                    ax.fill_between(ws, lo, hi, color=line.get_color(), alpha=0.15)
            ax.set_title(s)
            ax.set_xlabel("ranks")
            ax.set_xticks(worlds)
            ax.set_ylabel(
                "step, ms (median)" if kind == "time" else "optimizer MiB per rank (max; band: min)"
            )
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(
            f"Optimizer step ({cfg.backend}, momentum={cfg.momentum}, centered={cfg.centered}): "
            + ("time" if kind == "time" else "memory")
        )
        fig.tight_layout()
        path = stem.with_name(stem.name + f"_{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    """The configuration, and the results file to re-render (``--render``) if any."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--world-sizes", type=int, nargs="+", help="default: 1 2 3 4 (CPU), 1..GPUs (CUDA)"
    )
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS + EXTRA_CONTENDERS,
        default=list(CONTENDERS),
    )
    parser.add_argument("--repeats", type=int, default=Config.repeats)
    parser.add_argument("--warmup", type=int, default=Config.warmup)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--momentum", type=float, default=Config.momentum)
    parser.add_argument("--no-centered", dest="centered", action="store_false")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: rewrite the table and plots of a saved run",
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        raw = json.loads(args.render.read_text())
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["config"].items()}
        return Config(**fields), args.render
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    worlds = args.world_sizes
    if worlds is None:
        worlds = (
            [1, 2, 3, 4] if args.device == "cpu" else list(range(1, torch.cuda.device_count() + 1))
        )
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        parser.error(f"--world-sizes: only {torch.cuda.device_count()} GPUs here (one per rank)")
    cfg = Config(
        world_sizes=tuple(worlds),
        sets=tuple(args.sets),
        contenders=tuple(args.contenders),
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        momentum=args.momentum,
        centered=args.centered,
    )
    return cfg, None


def measure(cfg: Config) -> tuple[dict, dict]:
    """Every world size of ``cfg``: (results by world size, metadata)."""
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    results, loads = {}, {}
    for world in cfg.world_sizes:
        print(f"world size {world} ...", flush=True)
        results[world], loads[world] = run_world(world, cfg)
    meta = dict(
        device_name=device_name(cfg.device),
        torch=torch.__version__,
        threads="1 thread per rank" if cfg.device == "cpu" else "1 GPU per rank",
        load_before=load_before,
        load_after=os.getloadavg()[0],
        load_per_run={str(w): v for w, v in loads.items()},
        seconds=time.perf_counter() - start,
        sets={s: describe_set(s) for s in cfg.sets},
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    )
    return results, meta


def main(argv: list[str] | None = None) -> None:
    cfg, saved = parse_args(argv)
    gpus = torch.cuda.device_count() if cfg.device == "cuda" else 0
    full = (
        set(cfg.world_sizes)
        >= ({1, 2, 3, 4} if cfg.device == "cpu" else set(range(1, gpus + 1)))
        and set(cfg.sets) == set(SETS)
        and set(cfg.contenders) == set(CONTENDERS)
    )
    stem = RESULTS / f"step_{cfg.device}_{cfg.backend}{'' if full else '_partial'}"
    results, meta, stem = measured_or_saved(cfg, stem, saved, measure)
    table = render(results, cfg, meta)
    print(table)
    stem.with_suffix(".md").write_text(table)
    written = plot(results, cfg, stem)
    print("wrote", stem.with_suffix(".md"), stem.with_suffix(".json"), *written)


if __name__ == "__main__":
    main()
