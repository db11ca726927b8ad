"""Train a small MLP with ``ShardedRMSprop``: the library's first end-to-end job.

Run from the repository root, on CPU, with no download:

    torchrun --standalone --nproc-per-node 2 launch/train.py
    python launch/train.py                      # one process, no process group

    # options (every field of ``Config`` is a flag; ``--help`` lists them):
    torchrun --standalone --nproc-per-node 2 launch/train.py \
        --max-steps 60 --momentum 0.9 --centered

``torchrun`` may be spelled ``python -m torch.distributed.run``.

The task is a regression onto a fixed random "teacher" MLP: the teacher's weights come from
a fixed seed, every rank draws its own input batches (generator seeded ``seed + rank``), and
the student is wrapped in ``DistributedDataParallel`` when a process group exists. Rank 0
logs the loss averaged over ranks, each rank's optimizer-state bytes beside what a replicated
``torch.optim.RMSprop`` would hold, and ends with a summary line
``summary: loss START -> END | ...`` whose END is the final loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Run from a checkout without installing: put the repository root ahead of the script's own
# folder so ``import sharded_rmsprop`` finds the library next to ``launch/``.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from sharded_rmsprop import ShardedRMSprop  # noqa: E402

log = logging.getLogger("train")

IN_FEATURES = 32
OUT_FEATURES = 8
TEACHER_HIDDEN = 64
TEACHER_SEED = 20240601  # fixed: every run and every rank learns the same function
MIB = 1024**2
_GLOO_DRAIN_S = 0.1  # see shutdown_distributed


@dataclass
class Config:
    """Everything the job can be told; each field is a ``--kebab-case`` flag."""

    max_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=128, metadata={"help": "examples per rank per step"})
    hidden: int = field(default=256, metadata={"help": "student hidden width"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    alpha: float = field(default=0.99, metadata={"help": "RMSprop smoothing constant"})
    eps: float = field(default=1e-8, metadata={"help": "RMSprop epsilon"})
    weight_decay: float = field(default=0.0, metadata={"help": "L2 penalty"})
    momentum: float = field(default=0.0, metadata={"help": "momentum factor"})
    centered: bool = field(default=False, metadata={"help": "centered RMSprop"})
    seed: int = field(
        default=0, metadata={"help": "model init seed; rank r draws data with seed + r"}
    )
    log_every: int = field(default=20, metadata={"help": "log the loss every this many steps"})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads per rank"})


# ---------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a small MLP on a synthetic teacher task with ShardedRMSprop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=f.metadata["help"],
            )
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    return parser


def _validate(parser: argparse.ArgumentParser, config: Config) -> None:
    for name in ("max_steps", "batch_size", "hidden", "log_every", "threads"):
        value = getattr(config, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("lr", "eps", "weight_decay", "momentum"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not 0.0 <= config.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {config.alpha}")


def parse_config(argv: Sequence[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown flags: argparse prints usage and exits 2
    config = Config(**vars(args))
    _validate(parser, config)
    return config


# ---------------------------------------------------------------------------------------
# Distributed setup


def init_distributed() -> tuple[int, int]:
    """Join a gloo process group when started by torchrun; return ``(rank, world_size)``."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Destroy the process group, then let gloo's worker threads finish before exit.

    A gloo worker thread drops its references to a finished collective's tensors itself,
    and for tensors created in Python that takes the GIL. If the main thread is already
    finalizing the interpreter by then (a rank that logs nothing can get there within a
    millisecond of its last collective), the waiting thread is killed inside a noexcept
    destructor and the process aborts with "terminate called without an active exception"
    (SIGABRT; 7 runs in 77 here on torch 2.13 CPU; see pytorch/pytorch#179291). Sleeping
    with the GIL released hands it to those threads first.
    """
    dist.destroy_process_group()
    time.sleep(_GLOO_DRAIN_S)


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )


def mean_across_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / dist.get_world_size()


def gather_across_ranks(value: int) -> list[int]:
    if not dist.is_initialized():
        return [value]
    everyone = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, torch.tensor([value], dtype=torch.int64))
    return [int(t) for t in everyone]


# ---------------------------------------------------------------------------------------
# Task and model


class Teacher:
    """A fixed random two-layer tanh network; its outputs are the regression targets."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(TEACHER_SEED)
        self.w1 = torch.randn(IN_FEATURES, TEACHER_HIDDEN, generator=g) / math.sqrt(IN_FEATURES)
        self.b1 = 0.1 * torch.randn(TEACHER_HIDDEN, generator=g)
        self.w2 = torch.randn(TEACHER_HIDDEN, OUT_FEATURES, generator=g) / math.sqrt(TEACHER_HIDDEN)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2


class BatchStream:
    """An endless stream of ``(inputs, targets)`` drawn from this rank's own generator."""

    def __init__(self, teacher: Teacher, batch_size: int, seed: int) -> None:
        self.teacher = teacher
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(self.batch_size, IN_FEATURES, generator=self.generator)
        return x, self.teacher(x)


def build_model(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # same init on every rank (DDP also broadcasts rank 0's)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, OUT_FEATURES),
    )


# ---------------------------------------------------------------------------------------
# Optimizer memory


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state tensors, each counted by its own ``numel``.

    0-d tensors (the ``step`` counter) are skipped: they are bookkeeping, not per-element
    state, and the replicated baseline below leaves them out as well.
    """
    total = 0
    for p_state in opt.state.values():
        for value in p_state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total


def replicated_rmsprop_bytes(model: nn.Module, config: Config) -> int:
    """What ``torch.optim.RMSprop`` with these options holds on every rank (0-d step excluded)."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = 1 + int(config.momentum > 0) + int(config.centered)  # square_avg, momentum, grad_avg
    return param_bytes * buffers


def log_memory(per_rank: list[int], replicated: int) -> None:
    for rank, nbytes in enumerate(per_rank):
        ratio = nbytes / replicated if replicated else float("nan")
        log.info(
            "optimizer state rank %d: %.4f MiB sharded vs %.4f MiB replicated RMSprop (ratio %.3f)",
            rank, nbytes / MIB, replicated / MIB, ratio,
        )
    log.info(
        "optimizer state all ranks: %.4f MiB sharded vs %.4f MiB replicated",
        sum(per_rank) / MIB, replicated * len(per_rank) / MIB,
    )


# ---------------------------------------------------------------------------------------
# Training


def train(config: Config, rank: int, world_size: int) -> float:
    """Run the job; return the final loss averaged across ranks."""
    model: nn.Module = build_model(config.hidden, config.seed)
    if dist.is_initialized():
        model = DistributedDataParallel(model)
    opt = ShardedRMSprop(
        model.parameters(),
        lr=config.lr,
        alpha=config.alpha,
        eps=config.eps,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        centered=config.centered,
    )
    batches = BatchStream(Teacher(), config.batch_size, config.seed + rank)
    loss_fn = nn.MSELoss()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("world size %d, %d parameters, config %s", world_size, n_params, config)

    first_loss = last_loss = float("nan")
    start = time.perf_counter()
    for step in range(1, config.max_steps + 1):
        x, y = batches.next()
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        if step == 1:
            log_memory(gather_across_ranks(optimizer_state_bytes(opt)),
                       replicated_rmsprop_bytes(model, config))
        if step == 1 or step % config.log_every == 0 or step == config.max_steps:
            last_loss = mean_across_ranks(loss.item())
            if step == 1:
                first_loss = last_loss
            log.info("step %d/%d loss %.6g", step, config.max_steps, last_loss)
    elapsed = time.perf_counter() - start

    log.info(
        "summary: loss %.6g -> %.6g | %d steps in %.2f s | %.1f steps/s | world size %d",
        first_loss, last_loss, config.max_steps, elapsed, config.max_steps / elapsed, world_size,
    )
    return last_loss


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    torch.set_num_threads(config.threads)
    rank, world_size = init_distributed()
    setup_logging(rank)
    try:
        final_loss = train(config, rank, world_size)
    finally:
        if dist.is_initialized():
            shutdown_distributed()
    if not math.isfinite(final_loss):
        log.error("final loss is not finite: %s", final_loss)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
