"""Console output of the training job: logging setup, a text progress bar, the loss plot.

Everything goes through :mod:`logging`. Rank 0 logs at INFO and the other ranks at WARNING,
so they stay quiet unless something is wrong. The progress bar is a log record marked
``progress``: on a terminal the handler redraws it in place with a carriage return, anywhere
else (a pipe, a file, a test) it is an ordinary line written every ``log_every`` steps.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Sequence, TextIO

__all__ = ["ConsoleHandler", "Progress", "format_rate", "setup_logging", "write_loss_plot"]

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
    (``None`` when this step did not compute one). Tokens/s count every rank's tokens over
    the steps since the last printed line.
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
        self._start = time.perf_counter()
        self._mark = (first_step - 1, self._start)  # (step, time) where the rate window began

    def due(self, step: int) -> bool:
        """Whether ``step`` prints a line (the first, the last and every ``log_every``-th)."""
        return step == self.first_step or step % self.log_every == 0 or step == self.last_step

    def update(self, step: int, loss: float | None) -> None:
        if loss is not None:
            self.loss = loss
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
            f"loss {self.loss:.4f} | {format_rate(rate)} tokens/s | eta {_format_duration(eta)}"
        )


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
