"""The GPU check's ``host_syncs`` part: the host's synchronisations in every training mode.

Each mode of ``benchmarks/host_reads.py`` (:data:`~benchmarks.host_reads.MODES`, the ones
``tests/test_host_reads.py`` counts on the CPU) trains for three iterations at one rank; in the
last one, each phase (forward, backward, step) is watched twice at once:

- ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising CUDA operation warns, and the
  warning is charged to the innermost ``sharded_rmsprop`` frame on the stack (the same names
  as the host reads'), or to "(outside the package)";
- :class:`~benchmarks.host_reads.HostReads`: every host read of tensor data, by the same names.

On a GPU the two must agree at the lines :data:`~benchmarks.host_reads.DEVICE_READS` lists, and
those must be among the mode's documented ones (its ``EXPECTED`` lines that read a device
value). Then whether ``step()`` can be captured in a CUDA graph. On a CPU (``device="cpu"``,
the rehearsal) the same code runs over gloo without the sync debug mode.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any, Callable

import torch

from benchmarks.harness import Rank, run_ranks
from benchmarks.host_reads import (
    DEVICE_READS,
    EXPECTED,
    MODES,
    PHASES,
    HostReads,
    package_frame,
    train_in_mode,
)

__all__ = ["SyncWarnings", "host_syncs"]


class SyncWarnings:
    """``with SyncWarnings(device) as syncs:`` counts, in ``syncs.by_site``, the warnings of
    synchronising CUDA operations made inside, by the library's line that made them (on a
    CUDA ``device``: ``torch.cuda.set_sync_debug_mode("warn")``; elsewhere only warnings
    issued by hand are seen). Other warnings go on as they would have."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.by_site: collections.Counter[str] = collections.Counter()
        self._caught: Any = None

    def __enter__(self) -> SyncWarnings:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # what was queued before is not charged here
        self._caught = warnings.catch_warnings()
        self._caught.__enter__()
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if "synchroniz" in str(message):
                self.by_site[package_frame()] += 1
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show  # restored by catch_warnings on exit
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        finally:
            self._caught.__exit__(*exc)


class _Watch:
    """One phase watched by both counters."""

    def __init__(self, device: torch.device) -> None:
        self.reads, self.syncs = HostReads(), SyncWarnings(device)

    def __enter__(self) -> _Watch:
        self.syncs.__enter__()
        self.reads.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.reads.__exit__(*exc)
        finally:
            self.syncs.__exit__(*exc)


def mode_row(mode: str, seen: dict[str, _Watch], cuda: bool) -> dict[str, Any]:
    """What the two counters found in ``mode``'s last iteration, beside its documented reads."""
    documented = sorted(
        {site for sites in EXPECTED[mode].values() for site in sites if site in DEVICE_READS}
    )
    device_reads: collections.Counter[str] = collections.Counter()
    host_values: collections.Counter[str] = collections.Counter()
    syncs: collections.Counter[str] = collections.Counter()
    by_phase = {}
    for phase in PHASES:
        watch = seen[phase]
        for site, count in watch.reads.by_site.items():
            (device_reads if site in DEVICE_READS else host_values)[site] += count
        syncs.update(watch.syncs.by_site)
        by_phase[phase] = sum(watch.syncs.by_site.values())
    row: dict[str, Any] = {
        "mode": mode,
        "syncs": dict(syncs) if cuda else None,
        "syncs_by_phase": by_phase if cuda else None,
        "device_reads": dict(device_reads),
        "host_values": dict(host_values),
        "documented": documented,
    }
    row["as_documented"] = set(device_reads) <= set(documented) and (
        not cuda or dict(syncs) == dict(device_reads)
    )
    return row


def _on_one_rank(at: Rank, out: Any) -> None:
    cuda = at.device.type == "cuda"
    out["device"] = str(at.device)
    for mode in MODES:
        seen = train_in_mode(mode, at.device, lambda phase: _Watch(at.device))
        out.append("modes", mode_row(mode, seen, cuda))
    if cuda:
        out["cuda_graph"] = _capture_step(at.device)


def host_syncs(out: Any, seconds: float, device: str = "cuda") -> None:
    """Host synchronisations of every mode at one rank (NCCL on CUDA, gloo on the CPU), and
    whether ``step()`` can be captured in a CUDA graph; ``out`` a Recorder."""
    run_ranks(_on_one_rank, 1, out, device=device, timeout_s=max(seconds - 5, 5))


def _capture_step(device: torch.device) -> dict[str, Any]:
    """Try to capture one step() in a CUDA graph and replay it."""
    from sharded_rmsprop import ShardedRMSprop

    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)]
    model = torch.nn.Sequential(*layers).to(device)
    batch = torch.randn(64, 256, device=device)
    loss: Callable[[], torch.Tensor] = lambda: model(batch).square().mean()
    opt = ShardedRMSprop(model.parameters(), lr=1e-3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            loss().backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            opt.step()
        graph.replay()
        torch.cuda.synchronize()
        return {"captured": True}
    except Exception as error:  # noqa: BLE001 - the answer is the error
        return {"captured": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
