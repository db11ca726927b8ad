"""The optimizers the benchmarks compare, each built here and nowhere else.

``bench_step.py`` (through ``step_timing.py``), ``bench_training.py`` (through
``training_timing.py``) and ``bench_memory.py`` drive them each in their own way; the
optimizer itself, and every setting that makes it the contender a table names, comes from one
function of this module:

- :func:`rmsprop`: ``torch.optim.RMSprop``, torch's default implementation for the device
  (the for-loop on CPU, foreach on CUDA), replicated on every rank;
- :func:`torch_zero`: ``ZeroRedundancyOptimizer(RMSprop)``, with or without
  ``parameters_as_bucket_view``;
- :func:`fsdp2`: ``fully_shard`` on the root module and ``torch.optim.RMSprop`` on its sharded
  DTensor parameters;
- :func:`sharded_rmsprop`: this project's ``ShardedRMSprop``, with the settings of its mode;
- :func:`fairscale_oss`: ``fairscale.optim.oss.OSS(optim=RMSprop)``, its defaults;
- :func:`deepspeed_zero`: ``deepspeed.initialize`` with a client ``torch.optim.RMSprop``, fp32,
  ZeRO stage 1 or 2 (DeepSpeed's defaults otherwise), on torch's gloo process group.

``options`` is always ``torch.optim.RMSprop``'s keyword arguments, the same for every
contender of a run. :data:`NEEDS`, :func:`peer_versions` and :func:`available`: the peers that
need a package beyond torch and this project, and whether it is installed.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

#: Which package each contender needs beyond torch and this project (by its bench_training name).
NEEDS = {
    "fairscale oss": "fairscale",
    "deepspeed zero-1": "deepspeed",
    "deepspeed zero-2": "deepspeed",
}


def peer_versions() -> dict[str, str]:
    """The installed version of each peer package, or "not installed"."""
    out = {}
    for package in ("fairscale", "deepspeed"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def available(name: str, versions: dict[str, str]) -> bool:
    return versions.get(NEEDS.get(name, ""), "") != "not installed"


def rmsprop(params: Iterable[torch.Tensor], options: dict) -> torch.optim.RMSprop:
    return torch.optim.RMSprop(params, **options)


def torch_zero(params: Iterable[torch.Tensor], options: dict, *, bucket_view: bool):
    """torch's ZeRO-1: each parameter's state on one rank, one broadcast per parameter, or
    per rank with ``bucket_view``."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(
        params,
        optimizer_class=torch.optim.RMSprop,
        parameters_as_bucket_view=bucket_view,
        **options,
    )


def fsdp2(module: nn.Module, options: dict, device: torch.device) -> torch.optim.RMSprop:
    """``module`` sharded in place over every rank (its parameters become DTensors), and the
    optimizer of its sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    fully_shard(module, mesh=mesh)
    return rmsprop(module.parameters(), options)


def sharded_rmsprop(params: Iterable[torch.Tensor], options: dict, **settings: Any):
    """``ShardedRMSprop`` with ``settings`` beyond torch's options (``fused``,
    ``host_shared``, ``bucket_numel``, ``master_weights``...)."""
    from sharded_rmsprop import ShardedRMSprop

    return ShardedRMSprop(params, **options, **settings)


def fairscale_oss(params: Iterable[torch.Tensor], options: dict):
    from fairscale.optim.oss import OSS

    return OSS(params, optim=torch.optim.RMSprop, **options)


def deepspeed_zero(
    module: nn.Module, options: dict, *, stage: int, micro_batch: int, world: int
) -> tuple[Any, Any]:
    """``(engine, optimizer)``: DeepSpeed's ZeRO ``stage`` over ``module``, fp32, gradient
    clipping off, on torch's process group (gloo), ``micro_batch`` per rank."""
    import deepspeed

    # what a launcher would have set (DeepSpeed asserts LOCAL_RANK); one host here
    for key, value in (
        ("RANK", dist.get_rank()),
        ("LOCAL_RANK", dist.get_rank()),
        ("WORLD_SIZE", world),
        ("LOCAL_WORLD_SIZE", world),
    ):
        os.environ.setdefault(key, str(value))
    deepspeed.init_distributed(dist_backend="gloo")  # finds torch's group, keeps it
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    client = rmsprop(module.parameters(), options)
    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=client, config=config)
    torch.set_num_threads(1)  # in case DeepSpeed changed it
    return engine, optimizer
