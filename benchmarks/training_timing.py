"""``bench_training.py``'s measurement: each contender trains its own copy of a model on the same
batches, one iteration timed phase by phase (:func:`measure_model`).

A contender here is one optimizer of :mod:`contenders` with the data parallelism it trains
under (DDP, or DeepSpeed's engine): ``forward``, ``backward`` and ``step`` are the timed phases.
:class:`OursGradHooks` is the prototype of the other reduce-scatter design (the gradients
staged by per-parameter hooks), compared at the end with ``ours reduce-scatter``
(:func:`parity_with_reduce_scatter`).

The GPU check (``gpu_training.py``) drives the same contenders on CUDA: ``make_contender``,
:func:`iteration` and :func:`back_to_back` take a ``device``.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import contenders
from harness import Rank, all_gather, now
from workloads import batch_for, build_model, loss_of, micro_batch

if TYPE_CHECKING:
    from bench_training import Config

#: Contenders left out above 2 ranks: with all nine, 4 ranks' models, gradients and states
#: outgrow this machine's 24 GB on many-small (a rank was killed for memory). The prototype
#: is a design comparison, made at 2 ranks.
LEFT_OUT_ABOVE_2_RANKS = ("ours rs via grad hooks (prototype)",)

#: ``bucket_numel`` of every ShardedRMSprop contender: DDP's 25 MiB buckets in float32 elements,
#: so that each reduce-scatter can start while the rest of the backward runs (with one buffer
#: it could only start after the whole backward) and the sync of one buffer runs while the
#: next is updated.
BUCKET_NUMEL = 25 * 2**20 // 4


# -- contenders ------------------------------------------------------------------------------------


class Contender:
    """One way to train: its own model copy; ``forward``, ``backward`` and ``step`` are the
    timed phases."""

    def __init__(self, model_name: str, ddp: bool = True, device: torch.device | None = None):
        self.model_name = model_name
        self.module = build_model(model_name).to(device)
        #: What runs the forward: the module under DDP (with its defaults), or DeepSpeed's engine.
        self.wrapped: Any = DDP(self.module) if ddp else None
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
    def __init__(self, model_name, cfg: Config, device: torch.device | None = None) -> None:
        super().__init__(model_name, device=device)
        self.opt = contenders.rmsprop(self.module.parameters(), cfg.options())


def ours(module: torch.nn.Module, cfg: Config):
    """The optimizer of every ShardedRMSprop contender: its defaults (private buffers,
    ``fused=None``), buckets of :data:`BUCKET_NUMEL` elements."""
    return contenders.sharded_rmsprop(module.parameters(), cfg.options(), bucket_numel=BUCKET_NUMEL)


class Ours(Contender):
    def __init__(
        self,
        model_name,
        cfg: Config,
        reduce_scatter: bool,
        overlap: bool = False,
        device: torch.device | None = None,
    ):
        super().__init__(model_name, device=device)
        self.opt = ours(self.module, cfg)
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

    def __init__(self, model_name, cfg: Config) -> None:
        super().__init__(model_name)
        self.wrapped.register_comm_hook(None, _noop_hook)
        self.opt = ours(self.module, cfg)
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
    def __init__(self, model_name, cfg: Config) -> None:
        super().__init__(model_name)
        self.opt = contenders.torch_zero(self.module.parameters(), cfg.options(), bucket_view=True)


class FairscaleOSS(Contender):
    def __init__(self, model_name, cfg: Config) -> None:
        super().__init__(model_name)
        self.opt = contenders.fairscale_oss(self.module.parameters(), cfg.options())


class DeepSpeedZero(Contender):
    def __init__(self, model_name, cfg: Config, stage: int, world: int) -> None:
        super().__init__(model_name, ddp=False)
        self.wrapped, self.opt = contenders.deepspeed_zero(
            self.module,
            cfg.options(),
            stage=stage,
            micro_batch=micro_batch(model_name),
            world=world,
        )

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


def make_contender(
    name: str, model_name: str, cfg: Config, world: int, device: torch.device | None = None
) -> Contender:
    """The contender ``name``; ``device`` (the CPU if None) only for DDP + torch's RMSprop and
    ShardedRMSprop's (``ours overlapped sync``, without the reduce-scatter, is the GPU
    check's)."""
    if name == "ddp+rmsprop":
        return DDPRMSprop(model_name, cfg, device)
    if name == "ours zero-1":
        return Ours(model_name, cfg, reduce_scatter=False, device=device)
    if name == "ours reduce-scatter":
        return Ours(model_name, cfg, reduce_scatter=True, device=device)
    if name == "ours overlapped sync":
        return Ours(model_name, cfg, reduce_scatter=False, overlap=True, device=device)
    if name == "ours rs + overlapped sync":
        return Ours(model_name, cfg, reduce_scatter=True, overlap=True, device=device)
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


#: The group of the barriers between phases (not the contenders' own: see bench_training.py).
_BARRIERS: list[dist.ProcessGroup] = []


def barrier() -> None:
    if not _BARRIERS:
        _BARRIERS.append(dist.new_group(backend="gloo"))
    dist.barrier(group=_BARRIERS[0])


def iteration(
    c: Contender, batch, device: torch.device | None = None
) -> tuple[float, float, float, float]:
    """(forward, backward, step seconds, loss) of one iteration on this rank, the ranks
    barriered before each phase (and a CUDA ``device``'s queued work waited for at each
    clock reading)."""
    c.zero_grad()
    barrier()
    t0 = now(device)
    loss = c.forward(batch)
    t1 = now(device)
    barrier()
    t2 = now(device)
    c.backward(loss)
    t3 = now(device)
    barrier()
    t4 = now(device)
    c.step()
    t5 = now(device)
    return t1 - t0, t3 - t2, t5 - t4, loss.item()


def back_to_back(
    c: Contender, model_name: str, rank: int, first: int, repeats: int, device=None
) -> float:
    """Seconds per iteration of ``repeats`` iterations of ``c`` with no barrier between them,
    on batches ``first``, ``first + 1``... (whatever it leaves running at the end is waited
    for inside the time)."""
    barrier()
    start = now(device)
    for r in range(repeats):
        c.zero_grad()
        c.backward(c.forward(batch_for(model_name, rank, first + r, device)))
        c.step()
    c.params()
    return (now(device) - start) / repeats


def measure_model(model_name: str, cfg: Config, at: Rank, names: list[str]) -> dict:
    """Every contender on ``model_name``: phase seconds per repeat (slowest rank)."""
    running = {}
    for name in names:
        running[name] = make_contender(name, model_name, cfg, at.world)
    gc.collect()
    step = 0
    for _ in range(cfg.warmup):
        batch = batch_for(model_name, at.rank, step)
        for name in names:
            iteration(running[name], batch)
        step += 1
    phases = torch.zeros(len(names), cfg.repeats, 3, dtype=torch.float64)
    losses = torch.zeros(len(names), cfg.repeats, dtype=torch.float64)
    for r in range(cfg.repeats):
        batch = batch_for(model_name, at.rank, step)
        for k in range(len(names)):  # round-robin, starting one further each repeat
            i = (r + k) % len(names)
            *secs, loss = iteration(running[names[i]], batch)
            phases[i, r] = torch.tensor(secs, dtype=torch.float64)
            losses[i, r] = loss
        step += 1
    every = all_gather(phases)  # [world, contender, repeat, phase]
    slowest = every.max(dim=0).values  # [contender, repeat, phase]
    # (d) back to back: each contender alone, its iterations with no barrier between them
    # (whatever a contender leaves running at the end is waited for inside the time)
    seconds = [
        back_to_back(running[name], model_name, at.rank, step, cfg.repeats) for name in names
    ]
    step += cfg.repeats
    in_a_row = all_gather(torch.tensor(seconds, dtype=torch.float64)).max(dim=0).values
    parity = parity_with_reduce_scatter(running, names)
    out: dict[str, Any] = {"contenders": {}, "parity": parity, "iterations": step}
    for i, name in enumerate(names):
        fwd, bwd, stp = (slowest[i, :, j] for j in range(3))
        out["contenders"][name] = {
            "fwd+bwd+step": (fwd + bwd + stp).tolist(),
            "back to back": in_a_row[i].item(),
            "bwd+step": (bwd + stp).tolist(),
            "step": stp.tolist(),
            "forward": fwd.tolist(),
            "backward": bwd.tolist(),
            "last_loss_rank0": losses[i, -1].item(),
            "losses_finite": bool(losses[i].isfinite().all()),
            "skipped_steps": running[name].skipped_steps(),
        }
    del running
    gc.collect()
    return out


def parity_with_reduce_scatter(running: dict[str, Contender], names: list[str]) -> dict:
    """Max |difference| of the prototype's (and others') parameters against ``ours
    reduce-scatter``'s after the same iterations, on this rank (equal on every rank)."""
    ref_name = "ours reduce-scatter"
    if ref_name not in running:
        return {}
    ref = [p.detach() for p in running[ref_name].params()]
    out = {}
    for name in names:
        if name == ref_name:
            continue
        ps = [p.detach() for p in running[name].params()]
        if len(ps) != len(ref) or any(a.shape != b.shape for a, b in zip(ps, ref)):
            continue
        diff = max((a - b).abs().max().item() for a, b in zip(ps, ref))
        out[name] = {"max_abs_diff": diff, "equal": all(torch.equal(a, b) for a, b in zip(ps, ref))}
    return out
