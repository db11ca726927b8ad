"""Console output of the training job: logging setup, the run's description, a text
progress bar, the summary line and the loss plot.

Everything goes through :mod:`logging`. Rank 0 logs at INFO and the other ranks at WARNING,
so they stay quiet unless something is wrong. The progress bar is a log record marked
``progress``: on a terminal the handler redraws it in place with a carriage return, anywhere
else (a pipe, a file, a test) it is an ordinary line written every ``log_every`` steps.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence, TextIO

from rank_stats import MIB, MemoryFigures

if TYPE_CHECKING:
    import torch

    from sharded_rmsprop import ShardedRMSprop
    from sharded_rmsprop.distributed import DistributedContext
    from text_data import CharCorpus
    from config import Config

__all__ = [
    "ConsoleHandler",
    "Progress",
    "RunRecord",
    "describe_run",
    "format_rate",
    "log_summary",
    "progress_notes",
    "setup_logging",
    "write_loss_plot",
]

log = logging.getLogger("train")


class ConsoleHandler(logging.StreamHandler):
    """A stream handler that redraws ``progress`` records in place on a terminal."""

    def __init__(self, stream: TextIO, interactive: bool) -> None:
        super().__init__(stream)
        self.interactive = interactive
        self._line_open = False  # a progress line is on screen without its newline

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if getattr(record, "progress", False) and self.interactive:
                self.stream.write("\r" + record.getMessage() + "\x1b[K")
                self.flush()
                self._line_open = True
                return
            if self._line_open:
                self.stream.write("\n")
                self._line_open = False
            super().emit(record)
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)


def setup_logging(rank: int, stream: TextIO = sys.stdout) -> ConsoleHandler:
    """Log to ``stream``: the job's INFO on rank 0; warnings and errors from every rank."""
    handler = ConsoleHandler(stream, interactive=rank == 0 and stream.isatty())
    handler.setFormatter(
        logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()  # other libraries' records: warnings and worse
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.captureWarnings(True)
    return handler


def format_rate(per_second: float) -> str:
    """``12345.6`` -> ``"12.3k"``."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_second >= limit:
            return f"{per_second / limit:.1f}{suffix}"
    return f"{per_second:.0f}"


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Step, loss and tokens/s of a run from ``first_step`` to ``last_step``.

    Call :meth:`update` after every step; ``loss`` is the latest loss averaged over the ranks
    (``None`` when this step did not compute one), ``notes`` what else the line shows (the
    gradient norm, skipped steps; ``None``: the last ones again). Tokens/s count every
    rank's tokens over the steps since the last printed line.
    """

    WIDTH = 24

    def __init__(
        self,
        *,
        first_step: int,
        last_step: int,
        tokens_per_step: int,
        log_every: int,
        interactive: bool,
    ) -> None:
        self.first_step = first_step
        self.last_step = last_step
        self.tokens_per_step = tokens_per_step
        self.log_every = log_every
        self.interactive = interactive
        self.loss = math.nan
        self.notes = ""
        self._start = time.perf_counter()
        self._mark = (first_step - 1, self._start)  # (step, time) where the rate window began

    def due(self, step: int) -> bool:
        """Whether ``step`` prints a line (the first, the last and every ``log_every``-th)."""
        return step == self.first_step or step % self.log_every == 0 or step == self.last_step

    def update(self, step: int, loss: float | None, notes: str | None = None) -> None:
        if loss is not None:
            self.loss = loss
        if notes is not None:
            self.notes = notes
        due = self.due(step)
        if not (due or self.interactive):
            return
        now = time.perf_counter()
        mark_step, mark_time = self._mark
        rate = (step - mark_step) * self.tokens_per_step / max(now - mark_time, 1e-9)
        if due:
            self._mark = (step, now)
        log.info(self._line(step, rate, now), extra={"progress": True})

    def _line(self, step: int, rate: float, now: float) -> str:
        filled = self.WIDTH * step // self.last_step
        bar = "#" * filled + "." * (self.WIDTH - filled)
        done_here = step - self.first_step + 1  # steps this process has run (after a resume)
        eta = (now - self._start) / done_here * (self.last_step - step)
        width = len(str(self.last_step))
        return (
            f"step {step:{width}d}/{self.last_step} [{bar}] {100 * step / self.last_step:3.0f}% | "
            f"loss {self.loss:.4f} | {self.notes + ' | ' if self.notes else ''}"
            f"{format_rate(rate)} tokens/s | eta {_format_duration(eta)}"
        )


@dataclass
class RunRecord:
    """What the summary and the plot need."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per step, averaged over ranks
    grad_norms: list[float] = field(default_factory=list)  # per step, before clipping
    val: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    skipped_steps: int = 0  # by the optimizer: inf/NaN gradients, including GradScaler's
    memory: MemoryFigures | None = None  # rank 0's
    cuda_peak_bytes: int | None = None  # rank 0's torch.cuda.max_memory_allocated, on a GPU


def progress_notes(
    record: RunRecord, opt: ShardedRMSprop, scaler: torch.amp.GradScaler | None, config: Config
) -> str:
    """The progress line's extras: the latest gradient norm, the loss scale, skipped steps."""
    notes = [f"grad norm {record.grad_norms[-1]:.3f}"] if record.grad_norms else []
    if scaler is not None:
        notes.append(f"loss scale {scaler.get_scale():g}")
    if scaler is not None or config.skip_nonfinite:  # the cases where steps can be skipped
        notes.append(f"skipped {opt.skipped_steps}")
    return " | ".join(notes)


def describe_run(
    config: Config, corpus: CharCorpus, n_params: int, tokens_per_step: int,
    ctx: DistributedContext, sync_path: str,
) -> None:
    """The run's first log lines; ``sync_path``: ``ShardedRMSprop.sync_path``."""
    log.info(
        "world size %d (%s launch, %s backend, %s) | corpus %s: %d train + %d val characters, "
        "vocabulary %d", ctx.world_size, ctx.launcher, ctx.backend, ctx.device, corpus.source,
        len(corpus.train), len(corpus.val), corpus.vocab_size,
    )
    options = [
        f"lr {config.lr:g} alpha {config.alpha:g} eps {config.eps:g} weight_decay "
        f"{config.weight_decay:g} momentum {config.momentum:g} centered {config.centered}",
        f"clip grad norm {config.clip_grad_norm:g}" if config.clip_grad_norm else "no clipping",
        "gradients " + {"reduce-scatter": "reduce-scattered", "all-reduce": "all-reduced"}[
            config.grad_sync
        ] + f", parameters synced by {sync_path}"
        + (" behind the next forward" if config.overlap_param_sync else ""),
    ]
    if config.dtype != "float32":
        options.append("float32 master weights" if config.master_weights else "no master weights")
    if config.dtype == "float16":
        options.append("GradScaler")
    if config.skip_nonfinite:
        options.append("skips non-finite steps")
    log.info(
        "GPT %d layers x %d heads x %d wide, context %d: %.3f M parameters in %s | batch %d x %d "
        "characters per rank, %d per step | ShardedRMSprop %s", config.n_layer, config.n_head,
        config.n_embd, config.block_size, n_params / 1e6, config.dtype, config.batch_size,
        config.block_size, tokens_per_step, ", ".join(options),
    )


def _grad_norm_summary(norms: Sequence[float], max_norm: float) -> str | None:
    finite = [norm for norm in norms if math.isfinite(norm)]
    if not finite:
        return None
    clipped = sum(norm > max_norm for norm in finite)
    return (
        f"grad norm median {statistics.median(finite):.3g} max {max(finite):.3g}, "
        f"clipped in {clipped}/{len(finite)} steps"
    )


def log_summary(record: RunRecord, config: Config, world_size: int) -> None:
    """The last line: ``summary: train loss A -> B | val loss C -> D | ...``."""
    rate = record.tokens / record.seconds if record.seconds > 0 else 0.0
    parts = [
        "train loss " + (
            f"{record.losses[0]:.4f} -> {record.losses[-1]:.4f}" if record.losses else "n/a"
        ),
        f"val loss {record.val[0][1]:.4f} -> {record.val[-1][1]:.4f}",
        f"{len(record.losses)} steps in {record.seconds:.1f} s, {format_rate(rate)} tokens/s",
    ]
    memory = record.memory
    if memory is not None:
        parts.append(
            f"optimizer state {memory.state / MIB:.3f} MiB per rank vs "
            f"{memory.replicated_state / MIB:.3f} MiB replicated"
        )
        parts.append(
            f"memory {memory.total / MIB:.3f} MiB per rank vs "
            f"{memory.replicated_total / MIB:.3f} MiB replicated float32"
        )
    if record.cuda_peak_bytes is not None:
        parts.append(f"cuda peak {record.cuda_peak_bytes / MIB:.1f} MiB allocated")
    norms = _grad_norm_summary(record.grad_norms, config.clip_grad_norm)
    if norms:
        parts.append(norms)
    parts += [f"{record.skipped_steps} skipped steps", config.dtype, f"world size {world_size}"]
    log.info("summary: %s", " | ".join(parts))


def write_loss_plot(
    path: str,
    steps: Sequence[int],
    losses: Sequence[float],
    val_points: Sequence[tuple[int, float]],
    title: str,
) -> bool:
    """Write the training curve (and the validation points) to a PNG; ``False`` if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss plot written to %s", path)
        return False
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    axes.plot(steps, losses, linewidth=0.8, alpha=0.8, label="train loss (mean over ranks)")
    if val_points:
        axes.plot(*zip(*val_points), "o-", color="tab:red", label="val loss")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats / character)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(path)
    except OSError as error:
        log.warning("could not write the loss plot to %s: %s", path, error)
        return False
    finally:
        plt.close(figure)
    log.info("loss plot written to %s", path)
    return True
