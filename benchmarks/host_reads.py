"""Count the host's reads of tensor data, by the library's line that asked.

On a GPU, the host reading a device value (``.item()``, ``bool(t)``, ``.tolist()``, a copy to
the CPU) waits for every kernel queued before it: the training loop stalls. This machine has
no GPU, so :class:`HostReads` counts every read of tensor data the host makes, whatever the
device, and names the innermost frame of ``sharded_rmsprop`` that asked: which of them would
be a GPU synchronisation is a property of that line (a value built on the host from Python
numbers never is; a gradient's norm is), recorded in the tables below.

Counted: ``aten._local_scalar_dense`` (``item()``, ``bool()``, ``float()``, ``int()``),
``aten.is_nonzero``, ``aten.equal``, a copy of a non-CPU tensor to the CPU, and
``Tensor.tolist()`` / ``Tensor.numpy()``, which never dispatch on the CPU (they are wrapped
while counting). On a GPU, ``torch.cuda.set_sync_debug_mode`` counts the real ones
(``benchmarks/gpu_host_syncs.py``, a part of ``benchmarks/gpu_check.py``).

The modes the reads are counted in (:data:`MODES`) and how each of them trains
(:func:`train_in_mode`) are here, shared by ``tests/test_host_reads.py`` (2 gloo ranks on the
CPU) and the GPU check (one rank on CUDA), with what each read is (:data:`HOST_VALUES`,
:data:`DEVICE_READS`) and each mode's reads at 2 ranks (:data:`EXPECTED`).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "DEVICE_READS",
    "EXPECTED",
    "HOST_VALUES",
    "MODES",
    "PHASES",
    "HostReads",
    "package_frame",
    "train_in_mode",
]

_PACKAGE = str(Path(__file__).resolve().parent.parent / "sharded_rmsprop")

#: aten operators that hand tensor data to the host.
_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def package_frame() -> str:
    """``module.py:Class.function`` of the innermost sharded_rmsprop frame on the stack (above
    its caller's caller), or ``"(outside the package)"``."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_PACKAGE):
            relative = Path(path).relative_to(_PACKAGE).as_posix()
            code = frame.f_code
            return f"{relative}:{getattr(code, 'co_qualname', code.co_name)}"
        frame = frame.f_back
    return "(outside the package)"


def _copies_to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    if func is torch.ops.aten._to_copy.default:
        device = kwargs.get("device")
        to_cpu = device is not None and torch.device(device).type == "cpu"
        return to_cpu and args[0].device.type != "cpu"
    destination, source = args[0], args[1]
    return destination.device.type == "cpu" and source.device.type != "cpu"


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...``: ``reads.by_site`` counts the host reads of tensor
    data made inside, by the library's ``module.py:function`` that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.by_site: collections.Counter[str] = collections.Counter()
        self._wrapped: dict[str, Any] = {}
        self._within_read = False

    def __enter__(self) -> HostReads:
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._wrapped[name] = original
            setattr(torch.Tensor, name, self._counting(original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in self._wrapped.items():
            setattr(torch.Tensor, name, original)
        self._wrapped.clear()

    def _counting(self, original: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.by_site[package_frame()] += 1
            self._within_read = True  # (its own copy to the CPU, off a GPU, is this read)
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._within_read = False

        return read

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        reads = func in _READS or (func in _COPIES and _copies_to_host(func, args, kwargs))
        if reads and not self._within_read:
            self.by_site[package_frame()] += 1
        return func(*args, **kwargs)


# -- the modes the reads are counted in (tests/test_host_reads.py, the GPU check) ----------------

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

#: Each mode's reads in a steady-state iteration at 2 ranks, by phase (what the lines above
#: say); at one rank the agreement's all-reduce (``host_all_reduce_max``) has nothing to do.
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

MODES = tuple(EXPECTED)
PHASES = ("forward", "backward", "step")


def train_in_mode(
    mode: str,
    device: torch.device,
    watch: Callable[[str], ContextManager[Any]],
    iterations: int = 3,
) -> dict[str, Any]:
    """Train a small model under DDP with ``ShardedRMSprop`` in ``mode`` (one of :data:`MODES`)
    for ``iterations`` iterations on ``device``, in the process group that exists; each phase
    (:data:`PHASES`: the forward, the backward, the step with ``clip_grad_norm_()`` or the
    GradScaler where the mode has them) runs inside ``watch(phase)``. Returns what
    ``watch(phase)`` entered as, by phase, in the last iteration (the steady state)."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sharded_rmsprop import ShardedRMSprop

    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == "master weights" else torch.float32
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(device, dtype)
    ddp = DDP(model, gradient_as_bucket_view=False)
    options = {
        "skip_nonfinite": mode == "skip_nonfinite",
        "bucket_numel": 64 if mode in ("several buckets", "overlap_param_sync") else None,
    }
    lr = torch.tensor(1e-3, device=device) if mode == "tensor lr" else 1e-3
    opt = ShardedRMSprop(model.parameters(), lr=lr, momentum=0.9, **options)
    if mode == "reduce_scatter_gradients":
        opt.reduce_scatter_gradients(ddp)
    if mode == "overlap_param_sync":
        opt.overlap_param_sync(model)
    scaler = torch.amp.GradScaler(device.type) if mode == "GradScaler" else None
    seen: dict[str, Any] = {}
    for _ in range(iterations):
        x = torch.randn(4, 8, dtype=dtype, device=device)
        with watch("forward") as seen["forward"]:
            loss = ddp(x).float().pow(2).mean()
        with watch("backward") as seen["backward"]:
            (scaler.scale(loss) if scaler is not None else loss).backward()
        with watch("step") as seen["step"]:
            if mode.startswith("clip"):
                opt.clip_grad_norm_(1.0, error_if_nonfinite=mode.endswith("nonfinite"))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        opt.zero_grad()
    opt.wait_for_params()
    return seen
