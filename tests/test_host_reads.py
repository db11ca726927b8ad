"""Every read of tensor data by the host during training, counted in every mode (issue 26).

On a GPU the host reading a device value waits for the kernels queued before it. This machine
has none, so ``benchmarks/host_reads.py`` counts every host read of tensor data during the
forward (the overlapped sync's waits), the backward (the reduce-scatter hook) and the step
(with ``clip_grad_norm_()``), by the library's line that made it, at 2 ranks, in each of its
``MODES`` (``train_in_mode``, which the GPU check runs on CUDA too). Each line is in its
``HOST_VALUES`` (a value that lives on the host: no GPU synchronisation) or its
``DEVICE_READS`` (a GPU synchronisation, with why it is worth its cost, and listed in
docs/communication.md), and each mode's reads are its ``EXPECTED``. A new read anywhere
fails here until it is classified.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.host_reads import (
    DEVICE_READS,
    EXPECTED,
    HOST_VALUES,
    HostReads,
    train_in_mode,
)
from spawn import run_ranks

ROOT = Path(__file__).resolve().parent.parent


def _reads_in(mode: str) -> dict[str, dict[str, int]]:
    """The host reads of the third training iteration in ``mode``, by phase."""
    seen = train_in_mode(mode, torch.device("cpu"), lambda phase: HostReads())
    return {phase: dict(reads.by_site) for phase, reads in seen.items() if reads.by_site}


def reads_on_rank(rank: int, world_size: int) -> dict[str, dict[str, dict[str, int]]]:
    return {mode: _reads_in(mode) for mode in EXPECTED}


def test_every_host_read_in_every_mode_is_known() -> None:
    for rank, found in enumerate(run_ranks(2, reads_on_rank)):
        for mode, expected in EXPECTED.items():
            assert found[mode] == expected, (rank, mode, found[mode])
    sites = {site for mode in EXPECTED.values() for phase in mode.values() for site in phase}
    assert sites <= set(HOST_VALUES) | set(DEVICE_READS)
    assert not set(HOST_VALUES) & set(DEVICE_READS)


def test_the_docs_list_every_read_that_waits_for_a_gpu() -> None:
    docs = (ROOT / "docs" / "communication.md").read_text()
    for site in DEVICE_READS:
        assert f"`{site}`" in docs, site


def test_the_counter_sees_what_it_claims() -> None:
    """Each kind of read is counted once, by its asker (here, outside the package)."""
    t = torch.arange(3.0)
    with HostReads() as reads:
        t[0].item()
        bool(t[1] > 0)
        torch.equal(t, t)
        t.tolist()
        t.numpy()
    assert reads.by_site == {"(outside the package)": 5}
    assert torch.Tensor.tolist is not None and "read" not in torch.Tensor.tolist.__qualname__
