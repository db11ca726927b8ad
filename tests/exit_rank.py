"""One rank of a 2-rank job for tests/test_clean_exit.py: trains a few steps and exits the way
its pattern says. Run as ``python exit_rank.py PATTERN RANK WORLD_SIZE STORE_FILE``.

Before anything else it registers an ``atexit`` report, which Python runs after every handler
registered later (the package's included): it prints whether the package's exit handler ran. Patterns: ``control`` (torch.optim.RMSprop, ``dist.destroy_process_group()``, no
sharded_rmsprop), ``destroy`` (the same with ShardedRMSprop), ``none`` (no teardown at all),
``error`` (ShardedRMSprop refused on every rank, the error caught, no teardown), ``overlap``
(the last step's parameter sync left in flight by ``overlap_param_sync``, no teardown),
``user_atexit`` (the user's own exit handler, registered after the import, uses the group),
``accelerate`` and ``lightning`` (ShardedRMSprop inside them, as their users exit).
"""

from __future__ import annotations

import atexit
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def report() -> None:
    package = sys.modules.get("sharded_rmsprop.distributed")
    print(f"drained at exit: {getattr(package, '_drained', None)}", flush=True)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))


def train(net: nn.Module, opt: torch.optim.Optimizer, backward=None) -> None:
    for _ in range(3):
        opt.zero_grad()
        loss = net(torch.randn(8, 16)).square().mean()
        (backward or torch.Tensor.backward)(loss)
        opt.step()


def main(pattern: str, rank: int, world_size: int, store: str) -> None:
    atexit.register(report)
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="29556",
    )  # fmt: skip
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    if pattern == "control":
        net = DDP(model())
        train(net, torch.optim.RMSprop(net.parameters(), lr=1e-3))
        dist.destroy_process_group()
        return
    from sharded_rmsprop import ShardedRMSprop

    if pattern == "user_atexit":  # the user's own teardown at exit, which uses the group

        def teardown() -> None:
            dist.barrier()
            dist.destroy_process_group()
            print("user handler done", flush=True)

        atexit.register(teardown)
    if pattern in ("destroy", "none", "overlap", "user_atexit"):
        net = DDP(model())
        opt = ShardedRMSprop(net.parameters(), lr=1e-3)
        if pattern == "overlap":
            opt.overlap_param_sync(net)  # the last step's sync is still in flight at exit
        train(net, opt)
        if pattern == "destroy":
            dist.destroy_process_group()
    elif pattern == "error":
        try:
            ShardedRMSprop(model().parameters(), lr=1e-3 * (1 + rank))  # lr differs by rank
        except RuntimeError as error:
            print(f"refused: {str(error)[:60]}", flush=True)
    elif pattern == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        net = model()
        net, opt = accelerator.prepare(net, ShardedRMSprop(net.parameters(), lr=1e-3))
        train(net, opt, accelerator.backward)
    elif pattern == "lightning":
        import lightning.pytorch as pl

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = model()

            def training_step(self, batch, index):
                return self.net(batch[0]).square().mean()

            def configure_optimizers(self):
                return ShardedRMSprop(self.parameters(), lr=1e-3)

        data = torch.utils.data.TensorDataset(torch.randn(16, 16))
        trainer = pl.Trainer(
            accelerator="cpu", devices=world_size, strategy="ddp", max_steps=3, logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )  # fmt: skip
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    else:
        raise ValueError(f"unknown pattern {pattern!r}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
