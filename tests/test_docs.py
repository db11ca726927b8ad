"""What the README promises first is what the code and the measurements say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sharded_rmsprop.kernels import rmsprop_reference_, select_update

ROOT = Path(__file__).resolve().parent.parent


def opening() -> str:
    """The README up to its first code block: what a reader sees before anything else."""
    return (ROOT / "README.md").read_text().split("```", 1)[0]


def test_the_opening_says_which_call_is_bit_for_bit_and_what_the_default_gives() -> None:
    text = " ".join(opening().split())
    exact = re.search(r"`ShardedRMSprop\(\.\.\., fused=False\)`[^.]*bit for bit equal", text)
    assert exact, "the opening must name the call that gives torch's bits"
    default = re.search(r"The default, `fused=None`, .*? It is not bit for bit", text)
    assert default, "the opening must say that the default is not bit for bit"
    assert select_update(False, torch.device("cpu"), torch.float32) is rmsprop_reference_


def test_the_figures_in_the_opening_are_the_measured_ones() -> None:
    """Every figure the opening quotes about the default path is in the committed result of
    benchmarks/bench_fused_drift.py, which the opening names."""
    text = opening()
    assert "benchmarks/results/fused_drift_cpu.md" in text
    measured = (ROOT / "benchmarks/results/fused_drift_cpu.md").read_text()
    quoted = re.findall(r"\d+\.\d+e-\d+|\d+\.\d+%|\b\d\.\d{3}\b", text)
    assert len(quoted) >= 5
    for figure in quoted:
        mantissa, _, exponent = figure.partition("e-")
        as_measured = f"{mantissa}e-{int(exponent):02d}" if exponent else figure
        assert as_measured in measured, f"{figure} is not in fused_drift_cpu.md"
