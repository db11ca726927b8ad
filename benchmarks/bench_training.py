"""Whole training iterations, ShardedRMSprop against its peers: forward, backward and step.

For each world size (one launch of spawned ranks per world size, every contender in the same
processes) and each model, every contender trains its own copy of the model (the same initial
weights) on the same data: each rank gets different data, seeded by its rank and the
iteration, and every contender sees the same batches. One iteration is timed in three phases,
the ranks barriered before each one (so that a rank's lateness in one phase is not charged to
the next) and each phase's time the slowest rank's:

- (a) ``forward+backward+step``: the sum of the three phases;
- (b) ``backward+step``: the backward (gradient reduction included, as each contender does
  it) plus the step;
- (c) ``step``: the optimizer step alone (update and parameter sync; DeepSpeed:
  ``engine.step()``).

The barriers themselves are not counted; they run on a process group of their own, so that
they never wait for collectives a contender left running on the default group (an
overlapped parameter sync must be charged to the forward that waits for it). The tables show
medians over the repeats after warm-up iterations, with quartiles; contenders run
round-robin within each repeat, the first one rotating from repeat to repeat, so that machine
noise hits them alike. Gradients are reset outside the timed phases
(``zero_grad(set_to_none=True)``; DeepSpeed resets its own in ``engine.step()``).

Contenders (torch.optim.RMSprop's options everywhere: lr 1e-3, alpha 0.99, eps 1e-8,
momentum 0, centered False, weight decay 0; fp32; DDP with its defaults, 25 MiB buckets,
``gradient_as_bucket_view=False``):

1. ``ddp+rmsprop``: DDP and a replicated ``torch.optim.RMSprop`` (torch's CPU default, the
   for-loop implementation);
2. ``ours zero-1``: DDP (all-reduce) and ``ShardedRMSprop`` (defaults: private buffers,
   ``fused=None``; ``bucket_numel`` DDP's bucket size in elements, for every ShardedRMSprop
   contender: see ``BUCKET_NUMEL``);
3. ``ours reduce-scatter``: the same with ``opt.reduce_scatter_gradients(ddp)``: DDP's
   communication hook reduce-scatters the gradients into the optimizer's shards;
4. ``ours rs + overlapped sync``: contender 3 with ``opt.overlap_param_sync(ddp)``: the step
   returns once each bucket's parameter sync has started, and the next forward waits for each
   bucket when a module that holds its parameters starts (so the sync's time is counted in
   the next forward, and only where the forward did not hide it);
5. ``ours rs via grad hooks (prototype)``: the other design: DDP's all-reduce made a no-op
   (a comm hook returning the bucket as it is), a ``register_post_accumulate_grad_hook`` on
   every parameter that copies ``grad / world`` into a staging buffer laid out like the
   optimizer's bucket and, once a bucket is complete, starts its reduce-scatter
   (``opt.sharding.data_parallel.reduce_scatter``); after ``loss.backward()`` (counted in
   the backward) it waits for them and writes each owned range into ``p.grad``; then
   ``opt.step()``. Prototyped here; at the end its parameters are compared with contender 3's;
6. ``torch zero``: DDP and ``ZeroRedundancyOptimizer(RMSprop, parameters_as_bucket_view=True)``;
7. ``fairscale oss``: DDP and ``fairscale.optim.oss.OSS(optim=RMSprop)`` (its defaults);
8. ``deepspeed zero-1``, 9. ``deepspeed zero-2``: ``deepspeed.initialize`` with a client
   ``torch.optim.RMSprop``, fp32, ``zero_optimization.stage`` 1 or 2 (DeepSpeed's defaults
   otherwise: 5e8-element buckets, ``overlap_comm`` off, ``contiguous_gradients`` on),
   ``gradient_clipping`` 0, ``zero_allow_untested_optimizer``, ``DS_ACCELERATOR=cpu``, on the
   same gloo process group.

Peers 7-9 run only where ``fairscale`` / ``deepspeed`` import; elsewhere they are skipped and
marked "not installed" (the project's venv has neither: they are not its dependencies).

Models (float32):

- ``gpt``: ``launch/gpt.py``'s GPT, vocab 96, block_size 64, 4 layers, 4 heads, n_embd 256
  (3.2 M parameters), 16 sequences of 64 tokens per rank, its own cross-entropy loss;
- ``wide`` (24 x Linear(1024, 1024)) and ``many-small`` (400 x Linear(256, 256)), the
  parameter sets of ``bench_step.py``: a batch of 8 x in_features through the Linears in
  sequence, each as ``x + tanh(linear(x))``, loss ``.square().mean()``. (A plain chain of
  Linears diverges under RMSprop at lr 1e-3: the loss reached 1e32 by the fourth iteration,
  where DeepSpeed then skips its steps as overflows, and ``many-small``'s gradients vanished
  to zero in two thirds of its elements. With residual tanh every loss and gradient stays
  finite and nonzero; each contender's losses are checked and reported.) Denormals are
  flushed to zero on every rank (``torch.set_flush_denormal``).

Run (CPU, gloo, 1 thread per rank; 4 ranks oversubscribe a 2-core machine). The peers live in
a separate venv (``python3 -m venv /work/peers-venv``, then ``pip install torch==2.13.0
deepspeed fairscale matplotlib`` and ``pip install -e .`` in it)::

    DS_ACCELERATOR=cpu /work/peers-venv/bin/python benchmarks/bench_training.py   # all peers
    .venv/bin/python benchmarks/bench_training.py          # the project venv: peers 6-8 skipped
    .venv/bin/python benchmarks/bench_training.py --world-sizes 2 --models gpt --repeats 3
    .venv/bin/python benchmarks/bench_training.py --render benchmarks/results/training_cpu_gloo.json

It prints markdown tables and the issue's goals (at 2 ranks) and writes
``benchmarks/results/training_cpu_gloo.md``, the raw numbers as ``.json`` and a plot
(``.png``). A run narrower than the defaults (world sizes, models, contenders) gets a
``_partial`` suffix so that it does not overwrite the full one.

Noise: other jobs may share the machine; only ratios within one run are worth comparing, and
differences under ~20 % between contenders are not findings (see ``bench_step.py``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "launch"))
from bench_step import build_set  # noqa: E402
from harness import (  # noqa: E402
    Rank,
    all_gather,
    cores,
    cpu_name,
    measured_or_saved,
    median_ms,
    now,
    quartiles_ms,
    run_ranks,
)

RESULTS = HERE / "results"

MODELS = ("gpt", "wide", "many-small")
CONTENDERS = (
    "ddp+rmsprop",
    "ours zero-1",
    "ours reduce-scatter",
    "ours rs + overlapped sync",
    "ours rs via grad hooks (prototype)",
    "torch zero",
    "fairscale oss",
    "deepspeed zero-1",
    "deepspeed zero-2",
)
#: The peers (the best of them is the yardstick of goals ii and iii).
PEERS = ("ddp+rmsprop", "torch zero", "fairscale oss", "deepspeed zero-1", "deepspeed zero-2")
#: Contenders left out above 2 ranks: with all nine, 4 ranks' models, gradients and states
#: outgrow this machine's 24 GB on many-small (a rank was killed for memory). The prototype
#: is a design comparison, made at 2 ranks.
LEFT_OUT_ABOVE_2_RANKS = ("ours rs via grad hooks (prototype)",)
#: Which package each contender needs beyond torch and this project.
NEEDS = {
    "fairscale oss": "fairscale",
    "deepspeed zero-1": "deepspeed",
    "deepspeed zero-2": "deepspeed",
}
PHASES = ("fwd+bwd+step", "bwd+step", "step")

#: ``bucket_numel`` of every ShardedRMSprop contender: DDP's 25 MiB buckets in float32 elements,
#: so that each reduce-scatter can start while the rest of the backward runs (with one buffer
#: it could only start after the whole backward) and the sync of one buffer runs while the
#: next is updated.
BUCKET_NUMEL = 25 * 2**20 // 4

GPT_SHAPE = dict(vocab_size=96, block_size=64, n_layer=4, n_head=4, n_embd=256)
GPT_BATCH = 16
LINEAR_BATCH = 8


@dataclass(frozen=True)
class Config:
    world_sizes: tuple[int, ...] = (2, 4)
    models: tuple[str, ...] = MODELS
    contenders: tuple[str, ...] = CONTENDERS
    repeats: int = 9
    warmup: int = 2
    lr: float = 1e-3
    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False
    timeout_s: float = 3600.0

    def options(self) -> dict:
        return dict(
            lr=self.lr,
            alpha=self.alpha,
            eps=self.eps,
            momentum=self.momentum,
            centered=self.centered,
        )


def peer_versions() -> dict[str, str]:
    """The installed version of each peer package, or "not installed"."""
    out = {}
    for package in ("fairscale", "deepspeed"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def available(name: str, versions: dict[str, str]) -> bool:
    return versions.get(NEEDS.get(name, ""), "") != "not installed"


# -- models and data -------------------------------------------------------------------------------


class Chain(nn.Module):
    """The Linears of a ``bench_step`` parameter set, applied in sequence."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights for every contender and rank
    if name == "gpt":
        from gpt import GPT, GPTConfig

        return GPT(GPTConfig(**GPT_SHAPE))
    if name in ("wide", "many-small"):
        return Chain(build_set(name))
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def batch_for(name: str, rank: int, step: int) -> tuple[torch.Tensor, ...]:
    """This rank's batch of iteration ``step`` (different on every rank)."""
    gen = torch.Generator().manual_seed(1_000_003 * step + 7919 * rank + 17)
    if name == "gpt":
        shape = (GPT_BATCH, GPT_SHAPE["block_size"])
        idx = torch.randint(0, GPT_SHAPE["vocab_size"], shape, generator=gen)
        targets = torch.randint(0, GPT_SHAPE["vocab_size"], shape, generator=gen)
        return idx, targets
    width = 1024 if name == "wide" else 256
    return (torch.randn(LINEAR_BATCH, width, generator=gen),)


def loss_of(model: nn.Module, name: str, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if name == "gpt":
        return model(*batch)
    return model(*batch).square().mean()


# -- contenders ------------------------------------------------------------------------------------


class Contender:
    """One way to train: its own model copy; ``forward``, ``backward`` and ``step`` are the
    timed phases."""

    def __init__(self, model_name: str, cfg: Config) -> None:
        self.model_name = model_name
        self.module = build_model(model_name)
        self.cfg = cfg
        self.wrapped: Any = None
        self.opt: Any = None

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def forward(self, batch) -> torch.Tensor:
        return loss_of(self.wrapped, self.model_name, batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.opt.step()

    def params(self) -> list[torch.Tensor]:
        return list(self.module.parameters())

    def skipped_steps(self) -> int:
        """Steps the contender skipped on its own (DeepSpeed's overflow check)."""
        return 0


class DDPRMSprop(Contender):
    def __init__(self, model_name, cfg) -> None:
        super().__init__(model_name, cfg)
        self.wrapped = DDP(self.module)
        self.opt = torch.optim.RMSprop(self.module.parameters(), **cfg.options())


class Ours(Contender):
    def __init__(self, model_name, cfg, reduce_scatter: bool, overlap: bool = False) -> None:
        from sharded_rmsprop import ShardedRMSprop

        super().__init__(model_name, cfg)
        self.wrapped = DDP(self.module)
        self.opt = ShardedRMSprop(
            self.module.parameters(), bucket_numel=BUCKET_NUMEL, **cfg.options()
        )
        if reduce_scatter:
            self.opt.reduce_scatter_gradients(self.wrapped)
        if overlap:
            self.opt.overlap_param_sync(self.wrapped)

    def params(self) -> list[torch.Tensor]:
        self.opt.wait_for_params()
        return super().params()


def _noop_hook(state, bucket):  # no annotations: DDP checks them as classes
    """A DDP comm hook that reduces nothing: the bucket, as it is."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


class OursGradHooks(Contender):
    """Reduce-scatter fed by per-parameter post-accumulate-grad hooks (the prototype)."""

    def __init__(self, model_name, cfg) -> None:
        from sharded_rmsprop import ShardedRMSprop

        super().__init__(model_name, cfg)
        self.wrapped = DDP(self.module)
        self.wrapped.register_comm_hook(None, _noop_hook)
        self.opt = ShardedRMSprop(
            self.module.parameters(), bucket_numel=BUCKET_NUMEL, **cfg.options()
        )
        sharding = self.opt.sharding
        self.dp = sharding.data_parallel
        self.world = self.dp.world_size
        self.buckets = sharding.buckets
        self.staging = [
            torch.zeros(b.plan.padded_numel, dtype=b.plan.dtype, device=b.plan.device)
            for b in self.buckets
        ]
        self.shards = [
            torch.empty(b.plan.shard_numel, dtype=b.plan.dtype, device=b.plan.device)
            for b in self.buckets
        ]
        self.inboxes = [self.dp.reduce_scatter_inbox(shard) for shard in self.shards]
        self.expected = [len(b.params) for b in self.buckets]
        # every owned range: (parameter, bucket index, piece)
        self.owned = [
            (param, index, piece)
            for index, b in enumerate(self.buckets)
            for position, param in enumerate(b.params)
            if (piece := b.owned_piece(position)) is not None
        ]
        self.remaining: list[int] = []
        self.next_to_start = -1
        self.reductions: list[Any] = []
        for index, b in enumerate(self.buckets):
            for position, param in enumerate(b.params):
                slot = b.plan.slots[position]
                param.register_post_accumulate_grad_hook(
                    self._hook_for(index, self.staging[index][slot.offset : slot.end])
                )
        self._reset()

    def _reset(self) -> None:
        self.remaining = list(self.expected)
        self.next_to_start = len(self.buckets) - 1
        self.reductions = []

    def _hook_for(self, index: int, staged: torch.Tensor):
        world = self.world

        def hook(param: torch.Tensor) -> None:
            torch.div(param.grad.reshape(-1), world, out=staged)
            self.remaining[index] -= 1
            # start the complete buckets from the last one down (one order on every rank)
            while self.next_to_start >= 0 and self.remaining[self.next_to_start] == 0:
                i = self.next_to_start
                self.reductions.append(self._reduce_scatter(i))
                self.next_to_start -= 1

        return hook

    def _reduce_scatter(self, i: int):
        return self.dp.reduce_scatter(self.staging[i], self.shards[i], self.inboxes[i])

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        while self.next_to_start >= 0:  # buckets some of whose parameters got no gradient
            i = self.next_to_start
            self.reductions.append(self._reduce_scatter(i))
            self.next_to_start -= 1
        for reduction in self.reductions:
            reduction.wait()
        for param, index, piece in self.owned:
            averaged = self.shards[index][piece.shard_start : piece.shard_end]
            param.grad.reshape(-1)[piece.param_start : piece.param_end].copy_(averaged)
        self._reset()


class TorchZero(Contender):
    def __init__(self, model_name, cfg) -> None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        super().__init__(model_name, cfg)
        self.wrapped = DDP(self.module)
        self.opt = ZeroRedundancyOptimizer(
            self.module.parameters(),
            optimizer_class=torch.optim.RMSprop,
            parameters_as_bucket_view=True,
            **cfg.options(),
        )


class FairscaleOSS(Contender):
    def __init__(self, model_name, cfg) -> None:
        from fairscale.optim.oss import OSS

        super().__init__(model_name, cfg)
        self.wrapped = DDP(self.module)
        self.opt = OSS(self.module.parameters(), optim=torch.optim.RMSprop, **cfg.options())


class DeepSpeedZero(Contender):
    def __init__(self, model_name, cfg, stage: int, world: int) -> None:
        import deepspeed

        super().__init__(model_name, cfg)
        # what a launcher would have set (DeepSpeed asserts LOCAL_RANK); one host here
        for key, value in (
            ("RANK", dist.get_rank()),
            ("LOCAL_RANK", dist.get_rank()),
            ("WORLD_SIZE", world),
            ("LOCAL_WORLD_SIZE", world),
        ):
            os.environ.setdefault(key, str(value))
        deepspeed.init_distributed(dist_backend="gloo")  # finds torch's group, keeps it
        micro = GPT_BATCH if model_name == "gpt" else LINEAR_BATCH
        self.config = {
            "train_micro_batch_size_per_gpu": micro,
            "train_batch_size": micro * world,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage},
            "fp16": {"enabled": False},
            "bf16": {"enabled": False},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        client = torch.optim.RMSprop(self.module.parameters(), **cfg.options())
        self.wrapped, self.opt, _, _ = deepspeed.initialize(
            model=self.module, optimizer=client, config=self.config
        )
        torch.set_num_threads(1)  # in case DeepSpeed changed it

    def zero_grad(self) -> None:
        pass  # engine.step() resets the gradients

    def backward(self, loss: torch.Tensor) -> None:
        self.wrapped.backward(loss)

    def step(self) -> None:
        self.wrapped.step()

    def params(self) -> list[torch.Tensor]:
        return list(self.wrapped.module.parameters())

    def skipped_steps(self) -> int:
        return int(self.wrapped.skipped_steps)


def make_contender(name: str, model_name: str, cfg: Config, world: int) -> Contender:
    if name == "ddp+rmsprop":
        return DDPRMSprop(model_name, cfg)
    if name == "ours zero-1":
        return Ours(model_name, cfg, reduce_scatter=False)
    if name == "ours reduce-scatter":
        return Ours(model_name, cfg, reduce_scatter=True)
    if name == "ours rs + overlapped sync":
        return Ours(model_name, cfg, reduce_scatter=True, overlap=True)
    if name == "ours rs via grad hooks (prototype)":
        return OursGradHooks(model_name, cfg)
    if name == "torch zero":
        return TorchZero(model_name, cfg)
    if name == "fairscale oss":
        return FairscaleOSS(model_name, cfg)
    if name == "deepspeed zero-1":
        return DeepSpeedZero(model_name, cfg, stage=1, world=world)
    if name == "deepspeed zero-2":
        return DeepSpeedZero(model_name, cfg, stage=2, world=world)
    raise ValueError(f"unknown contender {name!r}")


# -- one world size --------------------------------------------------------------------------------


#: The group of the barriers between phases (not the contenders' own: see the docstring).
_BARRIERS: list[dist.ProcessGroup] = []


def barrier() -> None:
    if not _BARRIERS:
        _BARRIERS.append(dist.new_group(backend="gloo"))
    dist.barrier(group=_BARRIERS[0])


def iteration(c: Contender, batch) -> tuple[float, float, float, float]:
    """(forward, backward, step seconds, loss) of one iteration on this rank, the ranks
    barriered before each phase."""
    c.zero_grad()
    barrier()
    t0 = now()
    loss = c.forward(batch)
    t1 = now()
    barrier()
    t2 = now()
    c.backward(loss)
    t3 = now()
    barrier()
    t4 = now()
    c.step()
    t5 = now()
    return t1 - t0, t3 - t2, t5 - t4, loss.item()


def measure_model(model_name: str, cfg: Config, at: Rank, names: list[str]) -> dict:
    """Every contender on ``model_name``: phase seconds per repeat (slowest rank)."""
    contenders = {}
    for name in names:
        contenders[name] = make_contender(name, model_name, cfg, at.world)
    gc.collect()
    step = 0
    for _ in range(cfg.warmup):
        batch = batch_for(model_name, at.rank, step)
        for name in names:
            iteration(contenders[name], batch)
        step += 1
    phases = torch.zeros(len(names), cfg.repeats, 3, dtype=torch.float64)
    losses = torch.zeros(len(names), cfg.repeats, dtype=torch.float64)
    for r in range(cfg.repeats):
        batch = batch_for(model_name, at.rank, step)
        for k in range(len(names)):  # round-robin, starting one further each repeat
            i = (r + k) % len(names)
            *secs, loss = iteration(contenders[names[i]], batch)
            phases[i, r] = torch.tensor(secs, dtype=torch.float64)
            losses[i, r] = loss
        step += 1
    every = all_gather(phases)  # [world, contender, repeat, phase]
    slowest = every.max(dim=0).values  # [contender, repeat, phase]
    # (d) back to back: each contender alone, its iterations with no barrier between them
    # (whatever a contender leaves running at the end is waited for inside the time)
    back_to_back = torch.zeros(len(names), dtype=torch.float64)
    for i, name in enumerate(names):
        barrier()
        start = now()
        for r in range(cfg.repeats):
            c = contenders[name]
            c.zero_grad()
            c.backward(c.forward(batch_for(model_name, at.rank, step + r)))
            c.step()
        contenders[name].params()
        back_to_back[i] = (now() - start) / cfg.repeats
    step += cfg.repeats
    back_to_back = all_gather(back_to_back).max(dim=0).values
    parity = _parity(contenders, names)
    out: dict[str, Any] = {"contenders": {}, "parity": parity, "iterations": step}
    for i, name in enumerate(names):
        fwd, bwd, stp = (slowest[i, :, j] for j in range(3))
        out["contenders"][name] = {
            "fwd+bwd+step": (fwd + bwd + stp).tolist(),
            "back to back": back_to_back[i].item(),
            "bwd+step": (bwd + stp).tolist(),
            "step": stp.tolist(),
            "forward": fwd.tolist(),
            "backward": bwd.tolist(),
            "last_loss_rank0": losses[i, -1].item(),
            "losses_finite": bool(losses[i].isfinite().all()),
            "skipped_steps": contenders[name].skipped_steps(),
        }
    del contenders
    gc.collect()
    return out


def _parity(contenders: dict[str, Contender], names: list[str]) -> dict:
    """Max |difference| of the prototype's (and others') parameters against ``ours
    reduce-scatter``'s after the same iterations, on this rank (equal on every rank)."""
    ref_name = "ours reduce-scatter"
    if ref_name not in contenders:
        return {}
    ref = [p.detach() for p in contenders[ref_name].params()]
    out = {}
    for name in names:
        if name == ref_name:
            continue
        ps = [p.detach() for p in contenders[name].params()]
        if len(ps) != len(ref) or any(a.shape != b.shape for a, b in zip(ps, ref)):
            continue
        diff = max((a - b).abs().max().item() for a, b in zip(ps, ref))
        out[name] = {"max_abs_diff": diff, "equal": all(torch.equal(a, b) for a, b in zip(ps, ref))}
    return out


def _rank_main(at: Rank, cfg: Config) -> dict:
    torch.set_flush_denormal(True)
    versions = peer_versions()
    names = [
        n
        for n in cfg.contenders
        if available(n, versions) and not (at.world > 2 and n in LEFT_OUT_ABOVE_2_RANKS)
    ]
    out = {"models": {}, "load": {}, "seconds": {}}
    for model_name in cfg.models:
        out["load"][model_name] = os.getloadavg()[0]
        start = time.perf_counter()
        out["models"][model_name] = measure_model(model_name, cfg, at, names)
        out["seconds"][model_name] = time.perf_counter() - start
        if at.rank == 0:
            print(
                f"  world {at.world}, {model_name}: {out['seconds'][model_name]:.0f} s "
                f"(load average {out['load'][model_name]:.1f} before)",
                flush=True,
            )
    return out


# -- report ----------------------------------------------------------------------------------------


def _median(entry: dict, phase: str) -> float:
    return median_ms(entry[phase])


def best_peer(run: dict, phase: str) -> tuple[str, float] | None:
    """The peer with the lowest median ``phase`` in ``run`` (a model at one world size)."""
    found = [(n, _median(run[n], phase)) for n in PEERS if n in run]
    return min(found, key=lambda x: x[1]) if found else None


#: Our modes the goals are stated for: the step's sync blocking, or left behind the forward
#: (whose "step" is then the update alone: its goal (ii) is shown for the record only).
GOAL_MODES = ("ours reduce-scatter", "ours rs + overlapped sync")


def goals(results: dict, world: int = 2) -> list[tuple[str, str, float, float, float, str]]:
    """(model, goal, ours ms, yardstick ms, ratio vs bound, verdict) at ``world`` ranks, for
    each of :data:`GOAL_MODES` that ran."""
    out = []
    for model_name, m in results.get(world, {}).items():
        run = m["contenders"]
        checks = []
        if "ddp+rmsprop" in run:
            checks.append(
                ("(i) fwd+bwd+step <= 1.0x ddp+rmsprop", "fwd+bwd+step", "ddp+rmsprop", 1.0)
            )
        for label, phase, bound in (
            ("(ii) step <= 0.5x best peer's step", "step", 0.5),
            ("(iii) bwd+step <= 0.7x best peer's bwd+step", "bwd+step", 0.7),
        ):
            bp = best_peer(run, phase)
            if bp is not None:
                checks.append((label, phase, bp[0], bound))
        for ours in (mode for mode in GOAL_MODES if mode in run):
            if "ddp+rmsprop" in run:
                a, b = run[ours]["back to back"] * 1e3, run["ddp+rmsprop"]["back to back"] * 1e3
                verdict = f"{'MET' if a <= b else 'MISSED'} ({a / b:.2f} vs 1.0)"
                label = "(i) back to back <= 1.0x ddp+rmsprop [ddp+rmsprop]"
                out.append((model_name, f"`{ours}`: {label}", a, b, a / b, verdict))
            for label, phase, peer, bound in checks:
                a, b = _median(run[ours], phase), _median(run[peer], phase)
                ratio = a / b
                verdict = f"{'MET' if ratio <= bound else 'MISSED'} ({ratio:.2f} vs {bound})"
                if phase != "fwd+bwd+step" and "overlapped" in ours:
                    verdict = f"({ratio:.2f}; the sync is in the next forward)"
                out.append((model_name, f"`{ours}`: {label} [{peer}]", a, b, ratio, verdict))
    return out


def render(results: dict, cfg: Config, meta: dict) -> str:
    worlds = sorted(results)
    versions = meta["peers"]
    lines = [
        f"# Training iterations: {meta['cpu']}, {meta['cores']} cores, gloo",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} logical cores, 1 thread per rank; torch "
        f"{meta['torch']}; fairscale {versions['fairscale']}; deepspeed {versions['deepspeed']}. "
        f"Load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after (other "
        f"jobs shared the machine). Total {meta['seconds']:.0f} s.",
        "",
        f"float32; RMSprop lr={cfg.lr}, alpha={cfg.alpha}, eps={cfg.eps}, "
        f"momentum={cfg.momentum}, centered={cfg.centered} for every contender; different data "
        f"on every rank. Median over {cfg.repeats} iterations after {cfg.warmup} warm-up "
        "iterations per contender, contenders round-robin within each repeat (the first one "
        "rotating); [quartiles]. Each phase (forward, backward, step) starts after a barrier and "
        "its time is the slowest rank's; a = forward+backward+step, b = backward+step, c = step "
        "alone (update + parameter sync; DeepSpeed: `engine.step()`). The backward includes the "
        "gradient reduction as each contender does it. d = the same number of iterations again, "
        "each contender alone, back to back with no barrier between phases or iterations (what "
        "a contender leaves running at the end waited for inside the time): the mean iteration, "
        "slowest rank; it includes what the barriers of a-c leave out (the time a sync left "
        "running can use while ranks wait for each other). Host-shared buffers off.",
    ]
    if max(worlds) > (meta["cores"] or 1):
        lines += [
            "",
            f"This machine has {meta['cores']} cores: at world sizes above {meta['cores']} the "
            "ranks (1 thread each) oversubscribe them, so those times include waiting for a core "
            "and are less stable.",
        ]
    skipped = [n for n in cfg.contenders if not available(n, versions)]
    if skipped:
        lines += ["", "Not installed in this run's venv, skipped: " + ", ".join(skipped) + "."]
    if max(worlds) > 2:
        lines += [
            "",
            "Above 2 ranks without " + ", ".join(LEFT_OUT_ABOVE_2_RANKS) + " (with all nine "
            "contenders, 4 ranks outgrew this machine's 24 GB on many-small).",
        ]
    for w in worlds:
        for model_name in cfg.models:
            m = results[w].get(model_name)
            if m is None:
                continue
            run = m["contenders"]
            lines += [
                "",
                f"## {model_name}, {w} ranks",
                "",
                f"{_describe(model_name)}. 1-minute load average before: "
                f"{meta['load'][str(w)][model_name]:.1f}.",
                "",
                "| contender | a: fwd+bwd+step ms | b: bwd+step ms | c: step ms "
                "| a / ddp | b / ddp | c / ddp | a / best peer | b / best peer | c / best peer "
                "| d: back to back ms | d / ddp |",
                "| --- |" + " ---: |" * 11,
            ]
            bests = {ph: best_peer(run, ph) for ph in PHASES}
            for name in cfg.contenders:
                e = run.get(name)
                if e is None:
                    continue
                cells = []
                for ph in PHASES:
                    lo, hi = quartiles_ms(e[ph])
                    cells.append(f"{_median(e, ph):.1f} [{lo:.1f}-{hi:.1f}]")
                for ph in PHASES:
                    d = run.get("ddp+rmsprop")
                    cells.append(f"{_median(e, ph) / _median(d, ph):.2f}" if d else "")
                for ph in PHASES:
                    bp = bests[ph]
                    cells.append(f"{_median(e, ph) / bp[1]:.2f}" if bp else "")
                d = run.get("ddp+rmsprop", {}).get("back to back")
                cells.append(f"{e['back to back'] * 1e3:.1f}")
                cells.append(f"{e['back to back'] / d:.2f}" if d else "")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines += [
                "",
                "Best peer (of "
                + ", ".join(n for n in PEERS if n in run)
                + "): "
                + "; ".join(f"{ph}: {bests[ph][0]}" for ph in PHASES if bests[ph])
                + ".",
            ]
            parity = m.get("parity", {})
            proto = parity.get("ours rs via grad hooks (prototype)")
            healthy = all(
                e["losses_finite"] and not e["skipped_steps"] for e in m["contenders"].values()
            )
            lines += [
                "",
                "Every contender's losses finite and no step skipped: "
                + (
                    "yes."
                    if healthy
                    else "NO: "
                    + ", ".join(
                        f"{n} (finite {e['losses_finite']}, skipped {e['skipped_steps']})"
                        for n, e in m["contenders"].items()
                    )
                ),
            ]
            if proto is not None:
                lines += [
                    "",
                    f"Parameters after {m['iterations']} iterations, prototype vs `ours "
                    f"reduce-scatter`: {'bit for bit equal' if proto['equal'] else 'NOT equal'} "
                    f"(max |diff| {proto['max_abs_diff']:.3g}). Others vs `ours reduce-scatter`: "
                    + ", ".join(
                        f"{n} {v['max_abs_diff']:.2g}"
                        for n, v in parity.items()
                        if n != "ours rs via grad hooks (prototype)"
                    )
                    + ".",
                ]
    found = goals(results)
    if found:
        lines += [
            "",
            "## Goals (2 ranks, medians within this run)",
            "",
            "| model | goal [yardstick] | ours ms | yardstick ms | verdict |",
            "| --- | --- | ---: | ---: | --- |",
        ]
        for model_name, what, a, b, _, verdict in found:
            lines.append(f"| {model_name} | {what} | {a:.1f} | {b:.1f} | {verdict} |")
    return "\n".join(lines) + "\n"


def _describe(model_name: str) -> str:
    module = build_model(model_name)
    n = sum(p.numel() for p in module.parameters())
    tensors = len(list(module.parameters()))
    if model_name == "gpt":
        s = GPT_SHAPE
        what = (
            f"GPT (launch/gpt.py) n_layer {s['n_layer']}, n_head {s['n_head']}, n_embd "
            f"{s['n_embd']}, block_size {s['block_size']}, vocab {s['vocab_size']}; batch "
            f"{GPT_BATCH} x {s['block_size']} tokens per rank"
        )
    else:
        what = f"{model_name}: Linears in sequence, batch {LINEAR_BATCH} per rank, loss square().mean()"
    return f"{what}; {tensors} tensors, {n / 1e6:.2f} M parameters"


def plot(results: dict, cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted(results)
    models = [m for m in cfg.models if any(m in results[w] for w in worlds)]
    fig, axes = plt.subplots(
        len(worlds), len(models), figsize=(5.5 * len(models), 4.2 * len(worlds)), squeeze=False
    )
    colors = {"fwd+bwd+step": "tab:blue", "bwd+step": "tab:orange", "step": "tab:green"}
    for row, w in enumerate(worlds):
        for col, model_name in enumerate(models):
            ax = axes[row][col]
            run = results[w].get(model_name, {}).get("contenders", {})
            names = [n for n in cfg.contenders if n in run]
            ys = range(len(names))
            height = 0.27
            for j, ph in enumerate(PHASES):
                ax.barh(
                    [y + (j - 1) * height for y in ys],
                    [_median(run[n], ph) for n in names],
                    height=height,
                    color=colors[ph],
                    label=ph,
                )
            ax.set_yticks(list(ys))
            ax.set_yticklabels(
                [n.replace(" (prototype)", "\n(prototype)") for n in names], fontsize=7
            )
            ax.invert_yaxis()
            ax.set_xlabel("ms (median, slowest rank)")
            ax.set_title(f"{model_name}, {w} ranks")
            ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Training iteration phases, CPU / gloo, 1 thread per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(Config.world_sizes))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--repeats", type=int, default=Config.repeats)
    parser.add_argument("--warmup", type=int, default=Config.warmup)
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="measure nothing: rewrite a saved run's files"
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        raw = json.loads(args.render.read_text())
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["config"].items()}
        return Config(**fields), args.render
    if min(args.world_sizes) < 2:
        parser.error("--world-sizes: at least 2 (the contenders are distributed)")
    cfg = Config(
        world_sizes=tuple(args.world_sizes),
        models=tuple(args.models),
        contenders=tuple(args.contenders),
        repeats=args.repeats,
        warmup=args.warmup,
    )
    return cfg, None


def measure(cfg: Config) -> tuple[dict, dict]:
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    versions = peer_versions()
    for name in cfg.contenders:
        if not available(name, versions):
            print(f"skipping {name}: {NEEDS[name]} not installed in {sys.prefix}", flush=True)
    results, loads = {}, {}
    for world in cfg.world_sizes:
        print(f"world size {world} ...", flush=True)
        out = run_ranks(_rank_main, world, cfg, device="cpu", timeout_s=cfg.timeout_s)
        results[world] = out["models"]
        loads[str(world)] = out["load"]
    meta = dict(
        command=" ".join(
            ["DS_ACCELERATOR=cpu" if versions["deepspeed"] != "not installed" else ""]
            + [sys.executable, "benchmarks/bench_training.py", *sys.argv[1:]]
        ).strip(),
        cpu=cpu_name(),
        cores=cores(),
        torch=torch.__version__,
        peers=versions,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        load=loads,
        seconds=time.perf_counter() - start,
    )
    return results, meta


def main(argv: list[str] | None = None) -> None:
    cfg, saved = parse_args(argv)
    full = (
        set(cfg.world_sizes) >= {2, 4}
        and set(cfg.models) == set(MODELS)
        and set(cfg.contenders) == set(CONTENDERS)
    )
    stem = RESULTS / f"training_cpu_gloo{'' if full else '_partial'}"
    results, meta, stem = measured_or_saved(cfg, stem, saved, measure)
    table = render(results, cfg, meta)
    print(table)
    for model_name, what, a, b, _, verdict in goals(results):
        print(f"goal, {model_name}: {what}: ours {a:.1f} ms vs {b:.1f} ms -> {verdict}")
    stem.with_suffix(".md").write_text(table)
    plot(results, cfg, stem.with_suffix(".png"))
    print("wrote", stem.with_suffix(".md"), stem.with_suffix(".json"), stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
