"""Train a small GPT on text with DDP and ``ShardedRMSprop``: the library's end-to-end job.

Run from the repository root; nothing is downloaded (the default text is CPython's own
``pydoc_data.topics``, the language reference that ``help()`` shows):

    torchrun --standalone --nproc-per-node 2 launch/train.py       # 2 CPU ranks, gloo
    mpirun -n 2 python launch/train.py                             # the same through MPI
    srun -n 2 python launch/train.py                               # or Slurm
    python launch/train.py                                         # one process (a world of 1)

    # the same command on a GPU machine uses NCCL, one GPU per rank:
    torchrun --standalone --nproc-per-node 8 launch/train.py --n-layer 6 --n-embd 384 \
        --block-size 256 --batch-size 64 --max-steps 2000

    # bfloat16 (fp32 master weights in the optimizer), float16 with torch.amp.GradScaler;
    # no gradient clipping, and steps with inf/NaN gradients skipped on every rank:
    torchrun --standalone --nproc-per-node 2 launch/train.py --dtype bfloat16
    torchrun --standalone --nproc-per-node 2 launch/train.py --dtype float16
    torchrun --standalone --nproc-per-node 2 launch/train.py --clip-grad-norm 0 --skip-nonfinite

    # other text, RMSprop options, a loss plot, checkpoints every 100 steps and a resume:
    torchrun --standalone --nproc-per-node 2 launch/train.py --corpus book.txt \
        --momentum 0.9 --centered --plot loss.png --checkpoint-dir checkpoints
    torchrun --standalone --nproc-per-node 2 launch/train.py --checkpoint-dir checkpoints \
        --resume --max-steps 600

``torchrun`` may be spelled ``python -m torch.distributed.run``; every field of ``Config`` is
a flag (``--help`` lists them). The model is a character-level GPT (``gpt.py``) wrapped in
``DistributedDataParallel``; each rank draws its own random windows of the training text
(``text_data.py``). With ``--dtype bfloat16`` or ``float16`` parameters and gradients are
16-bit and ``ShardedRMSprop`` updates float32 master weights of each rank's shard
(``precision.py``). Gradients are clipped to global norm ``--clip-grad-norm`` (default 1.0)
by ``ShardedRMSprop.clip_grad_norm_``. Rank 0 shows a progress bar with the loss (averaged
over ranks), the gradient norm, skipped steps and tokens/s; logs each rank's memory (params
+ grads + its optimizer shard) beside replicated float32 ``torch.optim.RMSprop``'s; and
ends with the line
``summary: train loss START -> END | val loss START -> END | ...``. The other ranks log only
warnings and errors. Bad input (flags, sizes, a missing corpus, an unreachable master)
gives a message and a non-zero exit on every rank.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from checkpointing import (
    checkpoint_due,
    resume_from_latest,
    save_checkpoint,
    save_final_parameters,
)
from config import Config, parse_config
from faults import fail_if_told
from gpt import GPT, GPTConfig
from precision import DTYPES, autocast, backward_and_step, build_scaler
from rank_stats import mean_over_ranks, report_memory
from sharded_rmsprop import ShardedRMSprop
from sharded_rmsprop.distributed import (
    DistributedContext,
    detect_launch,
    distributed,
)
from text_data import (
    CharCorpus,
    CorpusError,
    TrainBatches,
    check_fits,
    load_corpus,
    val_batches,
)
from train_log import (
    Progress,
    RunRecord,
    describe_run,
    log_summary,
    progress_notes,
    setup_logging,
    write_loss_plot,
)

log = logging.getLogger("train")


class JobError(Exception):
    """A problem the user can fix; reported as one line and a non-zero exit."""


# ---------------------------------------------------------------------------------------------
# Model, optimizer, schedule (the dtypes: precision.py)


def build_model(
    config: Config, vocab_size: int, ctx: DistributedContext
) -> DistributedDataParallel:
    torch.manual_seed(config.seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    shape = GPTConfig(vocab_size, config.block_size, config.n_layer, config.n_head, config.n_embd)
    # initialised in float32, then rounded: every --dtype starts from the same weights
    model = GPT(shape).to(ctx.device, DTYPES[config.dtype])
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def build_optimizer(model: DistributedDataParallel, config: Config) -> ShardedRMSprop:
    """Constructed after DDP, as the library asks (it makes the parameters views of its
    buffers); with ``--grad-sync reduce-scatter`` DDP reduce-scatters into it, and with
    ``--overlap-param-sync`` the parameter sync runs behind the next forward."""
    opt = ShardedRMSprop(
        model.parameters(),
        lr=config.lr,
        alpha=config.alpha,
        eps=config.eps,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        centered=config.centered,
        fused={"auto": None, "on": True, "off": False}[config.fused],
        master_weights=config.master_weights,  # applies to bfloat16 / float16 parameters only
        skip_nonfinite=config.skip_nonfinite,
        bucket_numel=config.bucket_numel or None,
        param_sync=config.param_sync.replace("-", "_"),
        host_shared=config.host_shared,
    )
    if config.grad_sync == "reduce-scatter":
        opt.reduce_scatter_gradients(model)
    if config.overlap_param_sync:
        opt.overlap_param_sync(model)
    return opt


def lr_at(step: int, config: Config) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then a cosine down to ``final_lr_ratio``."""
    if step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.final_lr_ratio + (1.0 - config.final_lr_ratio) * cosine)


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module, corpus: CharCorpus, config: Config, ctx: DistributedContext
) -> float:
    """Mean validation loss over the fixed validation windows, whatever the world size.

    ``model`` is the bare module: ranks may hold different numbers of windows, so no DDP
    forward runs here.

    .. warning:: Collective: every rank must call it.
    """
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss x tokens, tokens
    for inputs, targets in val_batches(
        corpus.val, block_size=config.block_size, batch_size=config.batch_size,
        count=config.eval_windows, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
    ):
        with autocast(config, ctx.device):
            loss = model(inputs, targets)
        totals[0] += loss.double() * targets.numel()
        totals[1] += targets.numel()
    model.train()
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


# ---------------------------------------------------------------------------------------------
# Training


def tokens_per_step(config: Config, ctx: DistributedContext) -> int:
    return ctx.world_size * config.batch_size * config.block_size


def train_steps(
    model: DistributedDataParallel,
    opt: ShardedRMSprop,
    scaler: torch.amp.GradScaler | None,
    corpus: CharCorpus,
    config: Config,
    ctx: DistributedContext,
    first_step: int,
    interactive: bool,
    record: RunRecord,
) -> None:
    """Steps ``first_step`` to ``max_steps``; fills ``record``.

    Everything collective (the loss reduction, validation, checkpoints) happens at steps
    that every rank computes alike, so the ranks never wait on each other in vain.
    """
    batches = TrainBatches(
        corpus.train, block_size=config.block_size, batch_size=config.batch_size,
        seed=config.seed, rank=ctx.rank, device=ctx.device,
    )
    progress = Progress(
        first_step=first_step, last_step=config.max_steps, log_every=config.log_every,
        tokens_per_step=tokens_per_step(config, ctx), interactive=interactive,
    )
    pending: list[torch.Tensor] = []  # this rank's losses since the last progress line
    norms: list[torch.Tensor] = []  # the gradient norms since then (alike on every rank)
    extra = {"scaler": scaler} if scaler is not None else None  # checkpointed beside the model
    start = time.perf_counter()
    for step in range(first_step, config.max_steps + 1):
        fail_if_told(ctx.rank, ctx.world_size, step, in_save=False)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        inputs, targets = batches(step)
        with autocast(config, ctx.device):
            loss = model(inputs, targets)
        opt.zero_grad(set_to_none=True)
        grad_norm = backward_and_step(loss, opt, scaler, config.clip_grad_norm)
        pending.append(loss.detach())
        if grad_norm is not None:
            norms.append(grad_norm)
        if step == first_step:
            record.memory = report_memory(
                opt, model, momentum=config.momentum, centered=config.centered, device=ctx.device
            )
            kept = opt.memory_bytes().get("grad_reduction")
            if kept is not None:
                log.info("reduce-scatter buffers: %.4f MiB on this rank (staging, shards and "
                         "gloo's receive buffers; not in the figures above)", kept / 2**20)
        mean_loss = notes = None
        if progress.due(step):  # the same steps on every rank: the reduction is collective
            means = mean_over_ranks(torch.stack(pending))
            record.steps.extend(range(step - len(means) + 1, step + 1))
            record.losses.extend(means)
            mean_loss, pending = means[-1], []
            if norms:  # one host synchronisation per progress line, not per step
                record.grad_norms.extend(torch.stack(norms).tolist())
                norms = []
            notes = progress_notes(record, opt, scaler, config)
        progress.update(step, mean_loss, notes)
        if config.eval_every and step % config.eval_every == 0 and step < config.max_steps:
            record.val.append((step, evaluate(model.module, corpus, config, ctx)))
            log.info("val loss at step %d: %.4f", *record.val[-1])
        if checkpoint_due(step, config):
            directory = Path(config.checkpoint_dir)  # type: ignore[arg-type]
            path = save_checkpoint(
                directory, step, model.module, opt,
                before_commit=lambda: fail_if_told(ctx.rank, ctx.world_size, step, in_save=True),
                extra=extra,
            )
            log.info("checkpoint written to %s", path)
    record.seconds = time.perf_counter() - start
    record.tokens = (config.max_steps - first_step + 1) * tokens_per_step(config, ctx)


def train(
    config: Config, corpus: CharCorpus, ctx: DistributedContext, interactive: bool
) -> RunRecord:
    check_fits(corpus, config.block_size, config.batch_size, ctx.world_size)
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(config, corpus.vocab_size, ctx)
    opt = build_optimizer(model, config)
    scaler = build_scaler(config, ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    describe_run(config, corpus, n_params, tokens_per_step(config, ctx), ctx, opt.sync_path)
    first_step = 1
    if config.resume:
        first_step += resume_from_latest(
            Path(config.checkpoint_dir), model.module, opt, ctx.device,  # type: ignore[arg-type]
            extra={"scaler": scaler} if scaler is not None else None,
        )
    record = RunRecord()
    record.val.append((first_step - 1, evaluate(model.module, corpus, config, ctx)))
    log.info("val loss at step %d: %.4f", *record.val[0])
    if first_step <= config.max_steps:
        train_steps(model, opt, scaler, corpus, config, ctx, first_step, interactive, record)
    else:
        log.info("the checkpoint is at step %d, past --max-steps: nothing to train", first_step - 1)
    record.skipped_steps = opt.skipped_steps
    if ctx.device.type == "cuda":  # activations and workspaces included
        record.cuda_peak_bytes = torch.cuda.max_memory_allocated(ctx.device)
    record.val.append((config.max_steps, evaluate(model.module, corpus, config, ctx)))
    if config.save_final:
        opt.wait_for_params()  # (named_parameters() is not a forward: nothing else waits)
        save_final_parameters(config.save_final, model.module)
    dist.barrier()  # no rank tears the group down while a peer still talks to it
    return record


def run(config: Config, corpus: CharCorpus, interactive: bool) -> int:
    """Start the process group, train, tear it down, report; the exit status."""
    if config.backend == "nccl" and not torch.cuda.is_available():
        raise JobError("--backend nccl needs CUDA, and torch sees no GPU here; use --backend gloo")
    with ExitStack() as stack:
        try:
            ctx = stack.enter_context(
                distributed(config.backend, timeout=timedelta(seconds=config.init_timeout))
            )
        except (RuntimeError, ValueError) as error:  # no rendezvous, bad launcher variables
            raise JobError(str(error)) from error
        record = train(config, corpus, ctx, interactive)
    log_summary(record, config, ctx.world_size)
    if config.plot and ctx.is_main and record.losses:
        write_loss_plot(
            config.plot, record.steps, record.losses, record.val,
            f"GPT {config.n_layer}x{config.n_embd} on {corpus.source}, {ctx.world_size} "
            f"rank(s), {config.dtype}, ShardedRMSprop lr {config.lr}",
        )
    final = record.losses[-1] if record.losses else record.val[-1][1]
    if not math.isfinite(final):
        log.error("the final loss is not finite: %s", final)
        return 1
    return 0


def _launch_rank() -> int:
    """This process's rank as the launcher's variables tell it, for logging before init."""
    try:
        return detect_launch(os.environ).rank
    except ValueError:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    handler = setup_logging(_launch_rank())
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        # every rank reads and checks the corpus before any rendezvous: all fail alike
        corpus = load_corpus(config.corpus, config.val_fraction)
        return run(config, corpus, handler.interactive)
    except (JobError, CorpusError, NotImplementedError) as error:
        log.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
