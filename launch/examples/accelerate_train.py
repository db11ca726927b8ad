"""ShardedRMSprop inside accelerate: ``save_state()`` files that hold everything.

    .venv/bin/accelerate launch --cpu --num_processes 2 launch/examples/accelerate_train.py
    .venv/bin/torchrun --standalone --nproc-per-node 2 launch/examples/accelerate_train.py

Trains a small regression model for 8 steps, saving its state after 4 (``model.safetensors``
with every parameter, ``optimizer.bin`` with the whole optimizer state), then loads that state
into fresh objects, trains the last 4 steps again and checks that it ends where it ended. The
one line this library adds is ``register_save_state_pre_hook``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile

import torch
from accelerate import Accelerator
from torch import nn

from sharded_rmsprop import ShardedRMSprop
from sharded_rmsprop.integrations import consolidate_before_save


def train(folder: str, resume: bool) -> dict[str, torch.Tensor]:
    accelerator = Accelerator(cpu=True)  # (each run its own: it lists what it prepared)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = ShardedRMSprop(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(64, 8, generator=generator), torch.randn(64, 1, generator=generator)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_save_state_pre_hook(consolidate_before_save(optimizer))
    batches = list(loader)
    if resume:
        accelerator.load_state(folder)
    for step in range(4 if resume else 0, 8):
        x, y = batches[step]
        accelerator.backward((model(x) - y).square().mean())
        optimizer.step()
        optimizer.zero_grad()
        if step == 3 and not resume:
            accelerator.save_state(folder)
    unwrapped = accelerator.unwrap_model(model)
    return {name: p.detach().clone() for name, p in unwrapped.named_parameters()}


def main() -> None:
    accelerator = Accelerator(cpu=True)
    folder = tempfile.mkdtemp() if accelerator.is_main_process else None
    folder = accelerator.gather_for_metrics([folder], use_gather_object=True)[0]
    whole = train(folder, resume=False)
    resumed = train(folder, resume=True)
    same = all(torch.equal(whole[name], resumed[name]) for name in whole)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder)
    accelerator.print(f"loaded the saved state and ended where the first run ended: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
