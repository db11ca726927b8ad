"""The CPU side of benchmarks/gpu_check.py: arguments, the time budget, the report, parsers.

The CUDA parts themselves run only on a GPU; here a dry run must produce the report's
skeleton, the driver must survive parts that fail, run out of time or never start, and the
parts that measure (kernels, train_modes, host_syncs) run their own code on the CPU, at one
gloo rank where they take one, so that the one call a GPU gets fails on no typo.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import PARTS, Budget, Outcome, Report, parse_args, slug
from benchmarks.gpu_host_syncs import SyncWarnings
from benchmarks.gpu_kernels import VARIANTS
from benchmarks.gpu_parts import (
    REHEARSALS,
    Recorder,
    parse_junit,
    parse_train_summary,
    parse_verbose,
)
from benchmarks.gpu_training import BARE, MODES
from benchmarks.host_reads import MODES as MODES_OF_HOST_READS

ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_arguments_default_to_every_part_within_eight_minutes() -> None:
    args = parse_args([])
    assert args.parts == [p.name for p in PARTS] and not args.dry_run
    assert args.budget + 30 < 8 * 60  # room for the interpreter and the report
    assert parse_args(["--parts", "kernels", "train", "--budget", "100"]).parts == [
        "kernels",
        "train",
    ]
    for bad in (["--parts", "everything"], ["--budget", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_the_budget_keeps_the_floors_of_later_parts() -> None:
    clock = FakeClock()
    budget = Budget(300, clock=clock)
    environment, tests, kernels = PARTS[0], PARTS[1], PARTS[2]
    assert budget.limit_for(environment, PARTS[1:]) == environment.limit
    assert budget.limit_for(kernels, PARTS[3:]) == kernels.limit  # 300 - 145 is more
    clock.now += 50  # 250 s left; the floors after the tests need 40 + 50 + 30 + 40 + 25
    assert budget.limit_for(tests, PARTS[2:]) == 250 - 185
    assert budget.limit_for(kernels, PARTS[3:]) == 250 - 145  # under its own limit
    clock.now += 220  # 30 s left: under the kernels' floor
    assert budget.limit_for(kernels, PARTS[3:]) == 0


def test_a_part_that_fails_or_runs_out_of_time_does_not_lose_the_others(tmp_path) -> None:
    ran = []

    def runner(part, seconds, workdir):
        ran.append((part.name, seconds))
        if part.name == "environment":
            return Outcome(part.name, "passed", 1, seconds, data={"cuda_available": True})
        if part.name == "kernels":
            return Outcome(part.name, "timed out", seconds, seconds, data={"copy_gbs": 1.0})
        if part.name == "train":
            return Outcome(part.name, "failed", 3, seconds, note="boom")
        return Outcome(part.name, "passed", 1, seconds, data={})

    code = gpu_check.main(["--out", str(tmp_path), "--budget", "400"], runner=runner)
    assert code == 1  # a part failed
    assert [name for name, _ in ran] == [p.name for p in PARTS]
    report = json.loads((tmp_path / "gpu_unknown.json").read_text())
    statuses = {p["part"]: p["status"] for p in report["parts"]}
    assert statuses == {
        "environment": "passed",
        "cuda_tests": "passed",
        "kernels": "timed out",
        "train": "failed",
        "train_modes": "passed",
        "two_ranks": "passed",
        "host_syncs": "passed",
    }
    markdown = (tmp_path / "gpu_unknown.md").read_text()
    assert "boom" in markdown and "256 M float32" in markdown


def test_parts_without_time_left_are_skipped_and_said_so(tmp_path) -> None:
    def runner(part, seconds, workdir):
        return Outcome(part.name, "passed", seconds, seconds, data={"cuda_available": True})

    gpu_check.main(["--out", str(tmp_path), "--budget", "60"], runner=runner)
    report = json.loads((tmp_path / "gpu_unknown.json").read_text())
    skipped = [p for p in report["parts"] if p["status"] == "skipped"]
    assert skipped and all("No time left" in p["note"] for p in skipped)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, str]:
    """``--dry-run``'s report folder and what it printed (one run for the tests below)."""
    out = tmp_path_factory.mktemp("dry_run")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_a_dry_run_writes_the_skeleton_and_says_what_it_skipped(dry_run) -> None:
    out, printed = dry_run
    markdown = (out / "gpu_cpu_dry_run.md").read_text()
    for part in PARTS:
        assert f"## {part.name}:" in markdown
    assert {p.name for p in PARTS if p.rehearsal} == set(REHEARSALS)
    skipped = [p for p in PARTS if p.needs_cuda and not p.rehearsal]
    assert markdown.count("Needs CUDA (dry run).") == len(skipped)
    assert markdown.count(gpu_check.REHEARSED) == len(REHEARSALS)
    assert "| torch |" in markdown  # the environment part ran
    lines = printed.strip().splitlines()
    assert lines[-len(PARTS) :][0].startswith("environment  passed")  # the summary comes last
    statuses = {line.split()[0]: line.split()[1] for line in lines[-len(PARTS) :]}
    assert {part: statuses[part] for part in REHEARSALS} == dict.fromkeys(REHEARSALS, "passed")


def test_the_train_modes_rehearsal_runs_every_mode(dry_run) -> None:
    """The part's own code at one gloo rank on a small model (on the GPU: NCCL, CUDA)."""
    out, _ = dry_run
    data = json.loads((out / "gpu_check_logs" / "train_modes.json").read_text())
    rows = {row["mode"]: row for row in data["rows"]}
    assert list(rows) == [*MODES, BARE]
    losses = [row["last_loss"] for row in rows.values()]
    assert max(losses) - min(losses) < 1e-5  # the same model, batches and update everywhere
    assert rows["DDP + torch.optim.RMSprop"]["x_ddp_throughput"] == 1.0
    assert rows[BARE]["exposed_ms"] == 0
    assert all(row["iterations_per_s"] > 0 and row["tokens_per_s"] > 0 for row in rows.values())
    markdown = (out / "gpu_cpu_dry_run.md").read_text()
    assert "small throughput vs DDP + torch: blocking" in markdown  # the headline
    assert "| reduce_scatter_gradients + overlap_param_sync |" in markdown


def test_the_host_syncs_rehearsal_counts_every_mode(dry_run) -> None:
    """The part's own code at one gloo rank (on the GPU the sync debug mode counts too)."""
    out, _ = dry_run
    data = json.loads((out / "gpu_check_logs" / "host_syncs.json").read_text())
    modes = {m["mode"]: m for m in data["modes"]}
    assert list(modes) == list(MODES_OF_HOST_READS)
    assert all(m["as_documented"] and m["syncs"] is None for m in modes.values())
    assert modes["plain"]["device_reads"] == {}
    assert set(modes["tensor lr"]["device_reads"]) == set(modes["tensor lr"]["documented"])
    markdown = (out / "gpu_cpu_dry_run.md").read_text()
    assert "10/10 modes as documented" in markdown  # the headline
    assert "| skip_nonfinite | n/a | not counted (no CUDA) | `gradients.py:" in markdown


def test_sync_warnings_are_charged_to_the_line_that_asked() -> None:
    """What set_sync_debug_mode("warn") raises is counted; other warnings pass."""
    with SyncWarnings(torch.device("cpu")) as syncs:
        warnings.warn("called a synchronizing CUDA operation", UserWarning)
        with pytest.warns(UserWarning, match="something else"):
            warnings.warn("something else", UserWarning)
    assert syncs.by_site == {"(outside the package)": 1}


def test_a_part_past_its_limit_is_killed_and_reported(tmp_path) -> None:
    outcome = gpu_check.run_part(PARTS[0], 0.05, tmp_path)
    assert outcome.status == "timed out" and outcome.seconds < 30


def test_report_sections_render_every_parts_figures(tmp_path) -> None:
    report = Report(tmp_path, "python3 -m benchmarks.gpu_check", dry_run=False)
    junit = {
        "passed": 40,
        "failures": 1,
        "errors": 0,
        "skipped": 2,
        "failed": [{"test": "t::x", "message": "assert 1 == 2"}],
        "slowest": [{"test": "t::y", "seconds": 3.5}],
    }
    report.add(
        Outcome(
            "environment",
            "passed",
            1,
            30,
            data={
                "python": "3.12",
                "versions": {"torch": "2.11.0"},
                "cuda_available": True,
                "device": {"name": "NVIDIA H200", "memory_gib": 139.8, "cuda": "12.8"},
            },
        )
    )
    report.add(
        Outcome("cuda_tests", "failed", 50, 150, data={"command": "pytest", "results": junit})
    )
    report.add(
        Outcome(
            "kernels",
            "passed",
            60,
            110,
            data={
                "copy_gbs": 4000.0,
                "byte_model": {"plain": 20},
                "rows": [
                    {
                        "millions": 256,
                        "options": "momentum+centered",
                        "kernel": "fused (rmsprop_triton_)",
                        "ms": 2.5,
                        "gbs": 3600.0,
                        "of_copy": 0.9,
                        "x_foreach": 2.8,
                    }
                ],
            },
        )
    )
    report.add(
        Outcome(
            "train",
            "passed",
            60,
            110,
            data={
                "float32": {
                    "command": "torchrun ...",
                    "exit_code": 0,
                    "tail": "",
                    "figures": {
                        "loss_start": 4.2,
                        "loss_end": 1.9,
                        "val_start": 4.2,
                        "val_end": 2.0,
                        "steps": 300,
                        "seconds": 20.0,
                        "tokens_per_s": 123456.0,
                        "cuda_peak_mib": 900.5,
                        "formula_mib": 120.0,
                    },
                }
            },
        )
    )
    report.add(
        Outcome(
            "host_syncs",
            "passed",
            10,
            45,
            data={
                "modes": [
                    {
                        "mode": "skip_nonfinite",
                        "syncs": {"gradients.py:nonfinite_on_some_rank": 1},
                        "syncs_by_phase": {"forward": 0, "backward": 0, "step": 1},
                        "device_reads": {"gradients.py:nonfinite_on_some_rank": 1},
                        "host_values": {},
                        "documented": ["gradients.py:nonfinite_on_some_rank"],
                        "as_documented": True,
                    },
                    {
                        "mode": "plain",
                        "syncs": {"optimizer.py:step": 1},
                        "syncs_by_phase": {"forward": 0, "backward": 0, "step": 1},
                        "device_reads": {},
                        "host_values": {},
                        "documented": [],
                        "as_documented": False,
                    },
                ],
                "cuda_graph": {"captured": False, "error": "RuntimeError: no"},
            },
        )
    )
    markdown = (tmp_path / "gpu_nvidia_h200.md").read_text()
    for expected in (
        "# GPU check: NVIDIA H200",
        "FAILED `t::x`: assert 1 == 2",
        "| 2.11.0 |",
        "fused 3600 GB/s = 90% of copy, 2.80x torch foreach",
        "900.5",
        "123k tokens/s",
        "| plain | 1 (0, 0, 1) | `optimizer.py:step` 1 | none | none | none | **no** |",
        "syncs per iteration: skip_nonfinite 1, plain 1; 1/2 modes as documented",
        "not captured (RuntimeError: no)",
        "40 passed, 1 failed",
    ):
        assert expected in markdown, expected
    assert json.loads((tmp_path / "gpu_nvidia_h200.json").read_text())["device"] == "NVIDIA H200"
    assert "kernels" in report.summary()


def test_device_names_become_file_names() -> None:
    assert slug("NVIDIA H200") == "nvidia_h200"
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert slug("") == "unknown"


def test_the_recorder_rewrites_its_file_after_every_result(tmp_path) -> None:
    recorder = Recorder(tmp_path / "part.json")
    recorder["a"] = 1
    recorder.append("rows", {"x": 1})
    assert json.loads((tmp_path / "part.json").read_text()) == {"a": 1, "rows": [{"x": 1}]}


def test_the_train_summary_parser_reads_train_py_lines() -> None:
    log = (
        "memory rank 0: params 1.0 ...\n"
        "summary: train loss 4.1735 -> 2.3312 | val loss 4.1702 -> 2.4011 | 300 steps in 12.3 s, "
        "1.25M tokens/s | optimizer state 0.500 MiB per rank vs 1.000 MiB replicated | memory "
        "2.500 MiB per rank vs 3.000 MiB replicated float32 | cuda peak 812.4 MiB allocated | "
        "0 skipped steps | float32 | world size 1\n"
    )
    figures = parse_train_summary(log)
    assert figures == {
        "loss_start": 4.1735,
        "loss_end": 2.3312,
        "val_start": 4.1702,
        "val_end": 2.4011,
        "steps": 300,
        "seconds": 12.3,
        "tokens_per_s": 1.25e6,
        "formula_mib": 2.5,
        "replicated_mib": 3.0,
        "cuda_peak_mib": 812.4,
    }
    assert parse_train_summary("no summary here") is None


def test_the_train_summary_parser_reads_a_real_run() -> None:
    """What launch/train.py writes today (a change to its summary line fails here)."""
    command = [
        sys.executable,
        "launch/train.py",
        "--max-steps",
        "4",
        "--eval-every",
        "0",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--block-size",
        "16",
        "--batch-size",
        "4",
        "--threads",
        "1",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = parse_train_summary(proc.stdout + proc.stderr)
    assert figures is not None and figures["steps"] == 4 and figures["tokens_per_s"] > 0
    assert figures["formula_mib"] > 0 and "cuda_peak_mib" not in figures  # (no GPU here)


def test_the_junit_parser_counts_and_names_failures(tmp_path) -> None:
    (tmp_path / "junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok" time="0.5"/>'
        '<testcase classname="tests.test_a" name="test_bad" time="1.5">'
        '<failure message="assert False">trace</failure></testcase>'
        '<testcase classname="tests.test_a" name="test_skip" time="0"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    parsed = parse_junit(tmp_path / "junit.xml")
    assert (parsed["passed"], parsed["failures"], parsed["skipped"]) == (1, 1, 1)
    assert parsed["failed"] == [{"test": "tests.test_a::test_bad", "message": "assert False"}]
    assert parsed["slowest"][0] == {"test": "tests.test_a::test_bad", "seconds": 1.5}


def test_the_kernel_rehearsal_measures_every_kernel_and_variant(dry_run) -> None:
    """The part's own code, on a tiny CPU shard (on the GPU it only changes device)."""
    out, _ = dry_run
    data = json.loads((out / "gpu_check_logs" / "kernels.json").read_text())
    rows = data["rows"]
    assert {row["options"] for row in rows} == {
        "plain",
        "momentum",
        "centered",
        "momentum+centered",
    }
    assert {row["kernel"].split(" ")[0] for row in rows} == {"reference", "torch", "fused"}
    assert all(row["ms"] > 0 and row["x_foreach"] > 0 for row in rows)
    outcome = Outcome("kernels", "passed", data=data)
    assert "fused" in gpu_check.headline(outcome)
    variants = data["variants"]
    assert [row["variant"] for row in variants] == list(VARIANTS)
    assert all(row["ms"] > 0 and 0 < row["of_copy"] for row in variants)
    assert {row["variant"]: row["bytes"] for row in variants} == {
        "float32": 20,
        "float32 momentum": 28,
        "float32 centered": 28,
        "float32 momentum+centered": 36,
        "float32 weight_decay": 20,
        "float32 maximize": 20,
        "float32 grad_scale tensor": 20,
        "bfloat16": 10,
        "float16": 10,
        "float32 master + bfloat16 copy": 22,  # the bfloat16 copy written too
        "float32 master + bfloat16 copy, momentum, grad_scale tensor": 30,
    }
    assert "11 fused variants at" in gpu_check.headline(outcome)
    assert "| bfloat16 | rmsprop_cpu_fused_ | 10 |" in "\n".join(gpu_check.section(outcome))


def test_tests_cut_short_are_counted_from_pytests_verbose_lines() -> None:
    log = (
        "tests/test_cuda.py::test_a[x] PASSED                [ 10%]\n"
        "tests/test_cuda.py::test_b FAILED                   [ 20%]\n"
        "tests/test_kernel_triton.py::test_c SKIPPED (why)   [ 30%]\n"
        "tests/test_kernel_triton.py::test_d "
    )
    counts = parse_verbose(log)
    assert (counts["tests"], counts["passed"], counts["failures"], counts["skipped"]) == (
        3,
        1,
        1,
        1,
    )
    assert counts["failed"] == [{"test": "tests/test_cuda.py::test_b", "message": "FAILED"}]
