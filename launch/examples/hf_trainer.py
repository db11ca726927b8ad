"""ShardedRMSprop inside HF transformers' Trainer: a checkpoint that holds the whole state.

    .venv/bin/torchrun --standalone --nproc-per-node 2 launch/examples/hf_trainer.py

Trains a tiny GPT-2 (built from its config: nothing is downloaded) on random tokens for 6
steps, saving every 3, then resumes from checkpoint-3 and checks that it ends where the
uninterrupted run ended. The one line this library adds is ``callbacks=[...]``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from sharded_rmsprop import ShardedRMSprop
from sharded_rmsprop.integrations import ShardedRMSpropCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (48, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(output_dir: str, resume: str | None = None) -> dict[str, torch.Tensor]:
    # TrainingArguments first: it starts the process group the optimizer shards over
    args = TrainingArguments(
        output_dir=output_dir, max_steps=6, save_steps=3, per_device_train_batch_size=4,
        use_cpu=True, report_to=[], logging_steps=3, disable_tqdm=True, seed=0,
    )  # fmt: skip
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    optimizer = ShardedRMSprop(model.parameters(), lr=1e-3, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        optimizers=(optimizer, schedule),
        callbacks=[ShardedRMSpropCallback()],  # the whole optimizer state in optimizer.pt
    )
    trainer.train(resume_from_checkpoint=resume)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def main() -> None:
    # one folder for all ranks: torchrun gives them one run id
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "alone")
    folder = os.path.join(tempfile.gettempdir(), f"sharded_rmsprop_hf_example_{run_id}")
    whole = train(f"{folder}/run")
    resumed = train(f"{folder}/resumed", resume=f"{folder}/run/checkpoint-3")
    same = all(torch.equal(whole[name], resumed[name]) for name in whole)
    torch.distributed.barrier()  # (every rank is done with the folder)
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(folder)
        print(f"resumed from checkpoint-3 and ended where the uninterrupted run ended: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
