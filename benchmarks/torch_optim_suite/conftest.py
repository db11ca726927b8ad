"""torch's own optimizer tests (pytorch's test/test_optim.py, ``TestOptimRenewed``) against
ShardedRMSprop on the CPU: the best statement of the ``torch.optim.Optimizer`` contract.

Before pytest collects ``test_optim.py`` (which you fetch: see ``run.sh``), this rewrites
torch's ``common_optimizers.optim_db`` in place to one entry, torch's RMSprop entry with
``optim_cls=ShardedRMSprop``, ``supported_impls=("foreach", "fused")`` (``foreach`` is
accepted and changes nothing; ``differentiable=True`` is refused), ``supports_fused_on=("cpu",)``
and ``fused`` among the flags older state dicts lack, as torch's fused optimizers declare it.
``SHARDED_MODE=group1`` runs every test inside a gloo process group of one; ``nogroup``
without torch.distributed.
"""

from __future__ import annotations

import copy
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "deps"))  # expecttest, which torch's test utilities need

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.testing._internal import common_optimizers  # noqa: E402

from sharded_rmsprop import ShardedRMSprop  # noqa: E402

MODE = os.environ.get("SHARDED_MODE", "nogroup")


def _only_sharded_rmsprop() -> None:
    db = common_optimizers.optim_db  # the list test_optim.py imports: changed in place
    if len(db) == 1 and db[0].optim_cls is ShardedRMSprop:
        return
    info = copy.copy(next(i for i in db if i.optim_cls is torch.optim.RMSprop))
    info.optim_cls = ShardedRMSprop
    info.supported_impls = ("foreach", "fused")
    info.supports_fused_on = ("cpu",)
    info.not_og_supported_flags = (*info.not_og_supported_flags, "fused")
    db[:] = [info]


_only_sharded_rmsprop()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "serial: torch's serialTest() marker")
    if MODE == "group1" and not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0
        )


def pytest_unconfigure(config) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
