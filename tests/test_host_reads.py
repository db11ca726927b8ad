"""Every read of tensor data by the host during training, counted in every mode (issue 26).

On a GPU the host reading a device value waits for the kernels queued before it. This machine
has none, so ``benchmarks/host_reads.py`` counts every host read of tensor data during the
forward (the overlapped sync's waits), the backward (the reduce-scatter hook) and the step
(with ``clip_grad_norm_()``), by the library's line that made it, at 2 ranks. Each line is in
:data:`HOST_VALUES` (a value that lives on the host: no GPU synchronisation) or in
:data:`DEVICE_READS` (a GPU synchronisation, with why it is worth its cost, and listed in
docs/communication.md). A new read anywhere fails here until it is classified.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.host_reads import HostReads
from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks

ROOT = Path(__file__).resolve().parent.parent

#: Reads of values that live on the host, whatever the parameters' device.
HOST_VALUES = {
    "comm.py:DataParallelGroup.host_all_reduce_max": "the agreement's digests (and, with "
    "reduce_scatter_gradients, the hook slot's flag at each backward): integers built on the "
    "host and all-reduced by the gloo group",
    "sync.py:_OnTheWay.value": "the overlapped sync's race check, read once its copy reached "
    "pinned host memory (on a GPU, when its event has completed: never waiting)",
    "kernels/cpu_fused.py:rmsprop_cpu_fused_": "the CPU kernel takes the gradient factor "
    "(clip, unscaling) as a number; on CUDA the Triton kernel reads it on the device",
}

#: Reads that synchronise with a GPU, each worth its cost (docs/communication.md lists them).
DEVICE_READS = {
    "gradients.py:nonfinite_on_some_rank": "skip_nonfinite and GradScaler: whether some rank "
    "found an inf or NaN decides on the host whether the step runs (one read per step)",
    "gradients.py:PendingClip.after": "clip_grad_norm_(error_if_nonfinite=True) only: raising "
    "needs the norm on the host, as torch's clip_grad_norm_ does",
    "agreement.py:plain": "a tensor lr on the GPU only: the ranks compare the options' values",
    "shards.py:_as_float": "a tensor lr on the GPU only: the kernels take lr as a number",
}

#: Each mode's reads in a steady-state iteration, by phase (what the line above says).
EXPECTED = {
    "plain": {"step": {"comm.py:DataParallelGroup.host_all_reduce_max": 1}},
    "clip": {
        "step": {
            "comm.py:DataParallelGroup.host_all_reduce_max": 2,
            "kernels/cpu_fused.py:rmsprop_cpu_fused_": 1,
        }
    },
    "clip error_if_nonfinite": {
        "step": {
            "comm.py:DataParallelGroup.host_all_reduce_max": 2,
            "gradients.py:PendingClip.after": 1,
            "kernels/cpu_fused.py:rmsprop_cpu_fused_": 1,
        }
    },
    "skip_nonfinite": {
        "step": {
            "comm.py:DataParallelGroup.host_all_reduce_max": 1,
            "gradients.py:nonfinite_on_some_rank": 1,
        }
    },
    "GradScaler": {
        "step": {
            "comm.py:DataParallelGroup.host_all_reduce_max": 1,
            "gradients.py:nonfinite_on_some_rank": 1,
            "kernels/cpu_fused.py:rmsprop_cpu_fused_": 1,
        }
    },
    "master weights": {"step": {"comm.py:DataParallelGroup.host_all_reduce_max": 1}},
    "reduce_scatter_gradients": {
        "backward": {"comm.py:DataParallelGroup.host_all_reduce_max": 1},
        "step": {"comm.py:DataParallelGroup.host_all_reduce_max": 1},
    },
    "overlap_param_sync": {
        "forward": {"sync.py:_OnTheWay.value": 4},  # one per bucket (4)
        "step": {"comm.py:DataParallelGroup.host_all_reduce_max": 1},
    },
    "several buckets": {"step": {"comm.py:DataParallelGroup.host_all_reduce_max": 1}},
    "tensor lr": {
        "step": {
            "agreement.py:plain": 1,
            "comm.py:DataParallelGroup.host_all_reduce_max": 1,
            "shards.py:_as_float": 1,
        }
    },
}


def _reads_in(mode: str) -> dict[str, dict[str, int]]:
    """The host reads of the third training iteration in ``mode``, by phase."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == "master weights" else torch.float32
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    ddp = DDP(model, gradient_as_bucket_view=False)
    options = {
        "skip_nonfinite": mode == "skip_nonfinite",
        "bucket_numel": 64 if mode in ("several buckets", "overlap_param_sync") else None,
    }
    lr = torch.tensor(1e-3) if mode == "tensor lr" else 1e-3
    opt = ShardedRMSprop(model.parameters(), lr=lr, momentum=0.9, **options)
    if mode == "reduce_scatter_gradients":
        opt.reduce_scatter_gradients(ddp)
    if mode == "overlap_param_sync":
        opt.overlap_param_sync(model)
    scaler = torch.amp.GradScaler("cpu") if mode == "GradScaler" else None
    for _ in range(3):
        x = torch.randn(4, 8, dtype=dtype)
        with HostReads() as forward:
            loss = ddp(x).float().pow(2).mean()
        with HostReads() as backward:
            (scaler.scale(loss) if scaler is not None else loss).backward()
        with HostReads() as step:
            if mode.startswith("clip"):
                opt.clip_grad_norm_(1.0, error_if_nonfinite=mode.endswith("nonfinite"))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        opt.zero_grad()
    phases = {"forward": forward, "backward": backward, "step": step}
    return {phase: dict(reads.by_site) for phase, reads in phases.items() if reads.by_site}


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
