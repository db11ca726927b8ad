"""The update kernels side by side: reference, torch.optim.RMSprop (foreach, for-loop), fused.

For each shard size and option set, the median time of one update over a 1-D fp32 shard, and
the bandwidth it implies under the byte model of a single pass (bytes per element: 20 plain,
28 with momentum or centered, 36 with both), next to the device's copy bandwidth
(``dst.copy_(src)``, 8 bytes per element). Ratios in one run are what to compare: these
machines are shared and noisy.

Run::

    python benchmarks/bench_kernels.py                       # CPU: 1 M to 32 M elements
    python benchmarks/bench_kernels.py --device cuda         # GPU: 1 M to 256 M elements
    python benchmarks/bench_kernels.py --sizes 12.5 --repeats 20

It prints a markdown table and writes it to ``benchmarks/results/kernels_<device>.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from sharded_rmsprop.kernels import rmsprop_reference_, select_update

RESULTS = Path(__file__).resolve().parent / "results"
OPTION_SETS = {
    "plain": dict(momentum=0.0, centered=False),
    "momentum": dict(momentum=0.9, centered=False),
    "centered": dict(momentum=0.0, centered=True),
    "momentum+centered": dict(momentum=0.9, centered=True),
}
BYTES_PER_ELEMENT = {"plain": 20, "momentum": 28, "centered": 28, "momentum+centered": 36}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def median_seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: compilation, first touch of memory
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(numel: int, device: torch.device, repeats: int) -> float:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 8 * numel / median_seconds(lambda: dst.copy_(src), device, repeats)


def candidates(numel: int, device: torch.device, options: dict) -> dict[str, Callable[[], None]]:
    """One update of each contender on its own fp32 shard of ``numel`` elements."""
    hyper = dict(lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=1e-4, maximize=False, **options)
    fused = select_update(None, device, torch.float32)

    def kernel_run(kernel) -> Callable[[], None]:
        param, grad, square_avg = (torch.rand(numel, device=device) for _ in range(3))
        momentum_buffer = torch.zeros_like(param) if options["momentum"] > 0 else None
        grad_avg = torch.zeros_like(param) if options["centered"] else None
        return lambda: kernel(param, grad, square_avg, momentum_buffer, grad_avg, **hyper)

    def torch_run(foreach: bool) -> Callable[[], None]:
        param = torch.rand(numel, device=device, requires_grad=True)
        param.grad = torch.rand(numel, device=device)
        opt = torch.optim.RMSprop(
            [param], foreach=foreach, **{k: v for k, v in hyper.items() if k != "maximize"}
        )
        return opt.step

    runs = {
        "reference": kernel_run(rmsprop_reference_),
        "torch foreach": torch_run(True),
        "torch for-loop": torch_run(False),
    }
    if fused is not rmsprop_reference_:
        runs[f"fused ({fused.__name__})"] = kernel_run(fused)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=float, nargs="+", help="shard sizes in millions")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = args.sizes or ([1, 4, 12.5, 32] if device.type == "cpu" else [1, 4, 16, 64, 256])
    copy_gbs = copy_bandwidth(int(max(sizes) * 1e6), device, args.repeats) / 1e9
    lines = [
        f"RMSprop update kernels on {device_name(device)}, torch {torch.__version__}, "
        f"median of {args.repeats}",
        "",
        f"Device copy bandwidth (`dst.copy_(src)`, {max(sizes):g} M fp32): {copy_gbs:.1f} GB/s",
        "",
        "| M elements | options | kernel | ms | GB/s (byte model) | % of copy | x reference | x torch foreach |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    for millions in sizes:
        numel = int(millions * 1e6)
        for name, options in OPTION_SETS.items():
            runs = candidates(numel, device, options)
            times = {kernel: median_seconds(fn, device, args.repeats) for kernel, fn in runs.items()}
            del runs
            for kernel, seconds in times.items():
                gbs = BYTES_PER_ELEMENT[name] * numel / seconds / 1e9
                row = (
                    f"| {millions:g} | {name} | {kernel} | {seconds * 1e3:.2f} | {gbs:.1f} | "
                    f"{100 * gbs / copy_gbs:.0f}% | {times['reference'] / seconds:.2f} | "
                    f"{times['torch foreach'] / seconds:.2f} |"
                )
                lines.append(row)
                print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    if device.type == "cuda":
        name = "".join(c if c.isalnum() else "_" for c in device_name(device)).strip("_")
    else:
        name = f"cpu_{torch.get_num_threads()}threads"
    out = RESULTS / f"kernels_{name}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
