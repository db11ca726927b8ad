"""ShardedRMSprop inside Lightning: nothing to add.

    .venv/bin/python launch/examples/lightning_train.py

Lightning starts its own 2 CPU processes (``strategy="ddp"``). It trains for 2 epochs, saving a
``.ckpt`` after each, then resumes from the first and checks that it ends where the
uninterrupted run ended. Lightning calls ``optimizer.consolidate_state_dict()`` on every rank
before it saves (torch's ZeroRedundancyOptimizer protocol), so the ``.ckpt`` holds the whole
optimizer state.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from sharded_rmsprop import ShardedRMSprop


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch, index):
        x, y = batch
        return (self.net(x) - y).square().mean()

    def configure_optimizers(self):
        return ShardedRMSprop(self.parameters(), lr=1e-3, momentum=0.9)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(
            torch.randn(64, 8, generator=generator), torch.randn(64, 1, generator=generator)
        )
        return torch.utils.data.DataLoader(data, batch_size=4)


def fit(folder: str, resume: str | None = None) -> tuple[pl.Trainer, Regression]:
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
        callbacks=[ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1)],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    module = Regression()
    trainer.fit(module, ckpt_path=resume)
    return trainer, module


def main() -> None:
    folder = os.environ.setdefault("EXAMPLE_FOLDER", tempfile.mkdtemp())  # (shared by both)
    trainer, whole = fit(f"{folder}/run")
    first = f"{folder}/run/" + sorted(os.listdir(f"{folder}/run"))[0]
    _, resumed = fit(f"{folder}/resumed", resume=first)
    same = all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))
    if trainer.is_global_zero:
        shutil.rmtree(folder)
        print(f"resumed from {os.path.basename(first)} and ended where the run ended: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
