"""How far the default update (``fused=None``) drifts from ``torch.optim.RMSprop`` in training.

The reference path (``fused=False``) computes torch's bits; the fused kernels compute in
float32 with one rounding per stored value, so their parameters differ in the last bits after
the first step, and training then carries the difference on through the forward passes. This
trains ``launch/train.py``'s GPT (its defaults: 4 layers, width 128, 0.83 M parameters, lr
1e-3) on its text in one process three times from the same weights and batches, with
``torch.optim.RMSprop``, ``ShardedRMSprop(fused=False)`` and ``ShardedRMSprop(fused=None)``,
and reports after each checkpoint step how the parameters differ from torch's: the largest
absolute difference, the largest relative to the parameter's largest magnitude, the share of
elements that differ at all, and the loss of each run.

Run::

    .venv/bin/python benchmarks/bench_fused_drift.py            # steps 1, 12, 100, 300 (~1 min)
    .venv/bin/python benchmarks/bench_fused_drift.py --momentum 0.9 --centered

It writes ``benchmarks/results/fused_drift_cpu.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))
from gpt import GPT, GPTConfig  # noqa: E402
from text_data import TrainBatches, load_corpus  # noqa: E402

from sharded_rmsprop import ShardedRMSprop  # noqa: E402
from sharded_rmsprop.kernels import select_update  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fused_drift_cpu.md"
CONTENDERS = ("torch.optim.RMSprop", "fused=False", "fused=None")


def _optimizer(name: str, params, options: dict) -> torch.optim.Optimizer:
    if name == "torch.optim.RMSprop":
        return torch.optim.RMSprop(params, **options)
    return ShardedRMSprop(params, fused={"fused=False": False, "fused=None": None}[name], **options)


def train(name: str, options: dict, checkpoints: list[int]) -> dict[int, tuple[list, float]]:
    """Parameters (copies) and loss of one run at each checkpoint step."""
    corpus = load_corpus(None, 0.1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(corpus.vocab_size, 64, 4, 4, 128))
    opt = _optimizer(name, model.parameters(), options)
    batches = TrainBatches(
        corpus.train, block_size=64, batch_size=32, seed=0, rank=0, device=torch.device("cpu")
    )
    seen = {}
    for step in range(1, max(checkpoints) + 1):
        inputs, targets = batches(step)
        opt.zero_grad()
        loss = model(inputs, targets)
        loss.backward()
        opt.step()
        if step in checkpoints:
            seen[step] = ([p.detach().clone() for p in model.parameters()], loss.item())
    return seen


def compare(theirs: list, ours: list) -> tuple[float, float, float]:
    """Largest absolute difference, largest relative to each tensor's largest magnitude, share
    of elements that differ."""
    worst_abs = worst_rel = 0.0
    differing = total = 0
    for a, b in zip(theirs, ours):
        delta = (a - b).abs()
        worst_abs = max(worst_abs, delta.max().item())
        worst_rel = max(worst_rel, (delta.max() / a.abs().max().clamp_min(1e-30)).item())
        differing += int((a != b).sum())
        total += a.numel()
    return worst_abs, worst_rel, differing / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 12, 100, 300])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--centered", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    options = dict(lr=args.lr, momentum=args.momentum, centered=args.centered)
    fused_kernel = select_update(None, torch.device("cpu"), torch.float32).__name__
    runs = {name: train(name, options, args.steps) for name in CONTENDERS}
    lines = [
        "# How far `fused=None` drifts from `torch.optim.RMSprop` (CPU, float32)",
        "",
        f"`.venv/bin/python benchmarks/bench_fused_drift.py {' '.join(argv or sys.argv[1:])}`"
        .replace(" `", "`"),
        "",
        f"launch/train.py's GPT (0.83 M parameters), one process, options {options}; "
        f"`fused=None` ran `{fused_kernel}`. Differences are to torch's parameters after the same "
        "steps from the same weights and batches.",
        "",
        "| step | update | max abs diff | max diff / max abs param | elements differing "
        "| loss (torch's) |",
        "| ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for step in args.steps:
        reference, reference_loss = runs["torch.optim.RMSprop"][step]
        for name in CONTENDERS[1:]:
            params, loss = runs[name][step]
            worst_abs, worst_rel, share = compare(reference, params)
            lines.append(
                f"| {step} | `{name}` | {worst_abs:.2e} | {worst_rel:.2e} | {share:.1%} "
                f"| {loss:.6f} ({reference_loss:.6f}) |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
