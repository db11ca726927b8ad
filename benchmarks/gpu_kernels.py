"""The GPU check's ``kernels`` part: the fused update's bandwidth against the device's copy.

First every variant of the fused kernel that ``ShardedRMSprop`` launches (:data:`VARIANTS`:
the storage dtype and the switches the Triton kernel compiles apart: momentum, centered,
weight decay, maximize, a ``grad_scale`` tensor for clipping and the GradScaler, the
low-precision copy of master weights) at one shard size, each beside a torch copy of the same
bytes measured in the same run (``dst.copy_(src)``: the bytes it reads and writes are the
kernel's, by the byte model of ``sharded_rmsprop/kernels/triton_rmsprop.py``); then the
kernels of ``bench_kernels.py`` (reference, torch foreach and for-loop, fused) from 1 M to
256 M elements beside the copy bandwidth. On a CPU (the rehearsal) the same code measures the
CPU's fused kernel.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

__all__ = ["VARIANTS", "kernels", "variant_bytes"]

#: Each variant: the shards' dtype and the update's settings (torch's defaults otherwise).
VARIANTS: dict[str, dict[str, Any]] = {
    "float32": {},
    "float32 momentum": {"momentum": 0.9},
    "float32 centered": {"centered": True},
    "float32 momentum+centered": {"momentum": 0.9, "centered": True},
    "float32 weight_decay": {"weight_decay": 1e-2},
    "float32 maximize": {"maximize": True},
    "float32 grad_scale tensor": {"grad_scale": True},
    "bfloat16": {"dtype": torch.bfloat16},
    "float16": {"dtype": torch.float16},
    "float32 master + bfloat16 copy": {"low_precision": torch.bfloat16},
    "float32 master + bfloat16 copy, momentum, grad_scale tensor": {
        "low_precision": torch.bfloat16,
        "momentum": 0.9,
        "grad_scale": True,
    },
}


def variant_bytes(settings: dict[str, Any]) -> int:
    """Bytes an element of the variant moves: param, grad and square_avg read, param and
    square_avg written, each state buffer read and written, the low-precision copy written."""
    size = torch.empty((), dtype=settings.get("dtype", torch.float32)).element_size()
    buffers = (settings.get("momentum", 0.0) > 0) + bool(settings.get("centered"))
    low = settings.get("low_precision")
    return size * (5 + 2 * buffers) + (torch.empty((), dtype=low).element_size() if low else 0)


def _variant_run(
    numel: int, on: torch.device, settings: dict[str, Any]
) -> tuple[str, Callable[[], None]]:
    """(the kernel's name, one update of the variant on its own shards of ``numel``)."""
    from sharded_rmsprop.kernels import select_update

    dtype = settings.get("dtype", torch.float32)
    kernel = select_update(None, on, dtype)
    param, grad, square_avg = (torch.rand(numel, device=on, dtype=dtype) for _ in range(3))
    momentum = settings.get("momentum", 0.0)
    buffer = torch.zeros_like(param) if momentum > 0 else None
    grad_avg = torch.zeros_like(param) if settings.get("centered") else None
    low = settings.get("low_precision")
    low_copy = param.to(low) if low else None
    scale = torch.tensor(0.5, device=on) if settings.get("grad_scale") else None
    hyper = dict(lr=1e-3, alpha=0.99, eps=1e-8, momentum=momentum)
    hyper |= dict(weight_decay=settings.get("weight_decay", 0.0))
    hyper |= dict(centered=bool(settings.get("centered")), maximize=bool(settings.get("maximize")))

    def run() -> None:
        kernel(
            param,
            grad,
            square_avg,
            buffer,
            grad_avg,
            **hyper,
            grad_scale=scale,
            low_precision_param=low_copy,
        )

    return kernel.__name__, run


def _variants(out: Any, on: torch.device, millions: float, deadline: float) -> None:
    from benchmarks.bench_kernels import copy_bandwidth, median_seconds

    numel = int(millions * 1e6)
    for name, settings in VARIANTS.items():
        if time.monotonic() > deadline:
            out["variants_cut_short"] = f"stopped before {name}: out of time"
            return
        per_element = variant_bytes(settings)
        kernel, run = _variant_run(numel, on, settings)
        seconds = median_seconds(run, on, 10)
        del run
        copy_gbs = copy_bandwidth(per_element * numel // 8, on, 10) / 1e9
        gbs = per_element * numel / seconds / 1e9
        row = {"variant": name, "kernel": kernel, "millions": millions, "bytes": per_element}
        row |= {"ms": round(seconds * 1e3, 4), "gbs": round(gbs, 1)}
        row |= {"copy_gbs": round(copy_gbs, 1), "of_copy": round(gbs / copy_gbs, 3)}
        out.append("variants", row)
        if on.type == "cuda":
            torch.cuda.empty_cache()


def kernels(
    out: Any,
    seconds: float,
    device: str = "cuda",
    sizes: tuple[float, ...] = (1, 4, 16, 64, 256),
    variant_millions: float = 64,
) -> None:
    """The fused kernel's variants at ``variant_millions`` M elements, then the update kernels
    by the byte model beside the device's copy bandwidth; ``sizes`` in millions of elements
    (the largest also for the copy); ``out`` a Recorder."""
    from benchmarks.bench_kernels import (
        BYTES_PER_ELEMENT,
        OPTION_SETS,
        candidates,
        copy_bandwidth,
        median_seconds,
    )

    on = torch.device(device)
    deadline = time.monotonic() + seconds - 10
    _variants(out, on, variant_millions, time.monotonic() + (seconds - 10) / 2)
    out["byte_model"] = BYTES_PER_ELEMENT
    copy_gbs = copy_bandwidth(int(max(sizes) * 1e6), on, 20) / 1e9
    out["copy_gbs"] = round(copy_gbs, 1)
    for millions in sizes:
        numel = int(millions * 1e6)
        for name, options in OPTION_SETS.items():
            if time.monotonic() > deadline:
                out["cut_short"] = f"stopped before {millions} M {name}: out of time"
                return
            runs = candidates(numel, on, options)
            times = {kernel: median_seconds(fn, on, 10) for kernel, fn in runs.items()}
            del runs
            if on.type == "cuda":
                torch.cuda.empty_cache()
            for kernel, t in times.items():
                gbs = BYTES_PER_ELEMENT[name] * numel / t / 1e9
                row = {"millions": millions, "options": name, "kernel": kernel}
                row |= {"ms": round(t * 1e3, 4), "gbs": round(gbs, 1)}
                row |= {"of_copy": round(gbs / copy_gbs, 3)}
                row |= {"x_foreach": round(times["torch foreach"] / t, 2)}
                out.append("rows", row)
