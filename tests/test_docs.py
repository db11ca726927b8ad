"""What the README promises is what the code and the measurements say, and it stays the short
entry point to docs/."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import torch

from sharded_rmsprop import ShardedRMSprop
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


def readme_section(title: str) -> str:
    """The text of the README's ``## title`` section."""
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_stays_short_and_points_to_every_doc() -> None:
    """The README is the entry point (at most 150 lines); the rest lives in docs/ and
    benchmarks/README.md, each linked from it."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    links = readme_section("Documentation")
    for doc in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]:
        assert f"]({doc.relative_to(ROOT)})" in links, f"the README does not link {doc.name}"


def test_the_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    block = readme_section("Quick start").split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert commands == [
        "bash launch/setup.sh && .venv/bin/torchrun --standalone --nproc-per-node 2 launch/train.py",
        "bash launch/setup.sh && .venv/bin/python -m pytest",
    ]
    assert (ROOT / ".ci/run").read_text().splitlines()[-1] == commands[1]


def test_the_options_table_has_every_constructor_argument() -> None:
    rows = re.findall(r"^\| `(\w+)` \|\s*(`[^`]*`)?\s*\|", readme_section("Options"), flags=re.M)
    parameters = list(inspect.signature(ShardedRMSprop.__init__).parameters.values())[1:]
    assert [name for name, _ in rows] == [p.name for p in parameters], (
        "one row per argument, in the signature's order"
    )
    for (name, default), parameter in zip(rows, parameters):
        if parameter.default is not inspect.Parameter.empty:
            assert ast.literal_eval(default.strip("`")) == parameter.default, f"{name}'s default"
