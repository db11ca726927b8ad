"""``bench_step.py``'s measurement: each contender on its own copy of a parameter set, the
same gradients in ``p.grad`` on every rank, and its step timed (:func:`measure_set`).

A contender here is one optimizer of :mod:`contenders` as this benchmark drives it: it sets
its gradients, takes a step (the update plus the parameter sync; FSDP2: the step, then
``unshard()``), does the untimed work before the next one and counts the memory the table
calls the optimizer's (:meth:`Contender.optimizer_bytes`). :class:`StepAgreements` times, inside
ShardedRMSprop's steps, the agreement that starts each ``step()``.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

import contenders
from harness import all_gather, now
from workloads import build_set

if TYPE_CHECKING:
    from bench_step import Config


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
        self.opt = contenders.rmsprop(self.params, cfg.options())


class Zero(Contender):
    def __init__(self, module, grads, cfg: Config, bucket_view: bool) -> None:
        super().__init__(module, grads)
        self.opt = contenders.torch_zero(self.params, cfg.options(), bucket_view=bucket_view)

    def optimizer_bytes(self) -> int:
        return torch_state_bytes(self.opt.optim)  # the bucket views are the parameters


class FSDP2(Contender):
    def __init__(self, module, grads, cfg: Config, device: torch.device) -> None:
        from torch.distributed.tensor import distribute_tensor

        opt = contenders.fsdp2(module, cfg.options(), device)
        # Each rank's shard of the (identical) full gradient, no communication.
        sharded = [
            distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
            for p, g in zip(module.parameters(), grads)
        ]
        super().__init__(module, sharded)
        self.opt = opt
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
        super().__init__(module, grads)
        self.opt = contenders.sharded_rmsprop(
            self.params, cfg.options(), fused=fused, host_shared=host_shared
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
    running = {name: make_contender(name, set_name, grads, cfg, device) for name in cfg.contenders}
    names = list(running)
    for _ in range(cfg.warmup):
        for name in names:
            timed_step(running[name], device)
    whole = torch.zeros(len(names), cfg.repeats, dtype=torch.float64)
    first = torch.zeros_like(whole)
    for r in range(cfg.repeats):
        for k in range(len(names)):  # round-robin, starting one further each repeat
            i = (r + k) % len(names)
            whole[i, r], first[i, r] = timed_step(running[names[i]], device)
    memory = torch.tensor([running[n].optimizer_bytes() for n in names], dtype=torch.int64)
    agreement = torch.tensor(  # this rank's median agreement per step (the timed steps), or -1
        [
            statistics.median(c.agreement_s[-cfg.repeats :]) if isinstance(c, Ours) else -1.0
            for c in (running[n] for n in names)
        ],
        dtype=torch.float64,
    )
    agreement_all = all_gather(agreement, device)  # [world, contender]
    whole_all = all_gather(whole, device)  # [world, contender, repeat]
    first_all = all_gather(first, device)
    memory_all = all_gather(memory, device)  # [world, contender]
    del running, grads
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
