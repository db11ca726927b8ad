"""ShardedRMSprop inside HF Trainer, accelerate and Lightning, each used as its documentation
shows plus the one line of this package's docs/checkpoints.md: the checkpoints hold the whole
state and resume bit for bit (fused=False), at the same world size against the uninterrupted run and at
another against torch.optim.RMSprop doing the same resume.

The frameworks are optional (``pip install -e .[integrations]``); each test is skipped
without its framework. Two gloo ranks, a tiny model, a few steps.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

import pytest
import torch
from torch import nn

from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks

OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-3)


def as_framework_rank(rank: int, world_size: int) -> None:
    """The environment torchrun gives a rank (the group is already there)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29555",
    )


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sharded":
        return ShardedRMSprop(params, **OPTIONS, fused=False)
    return torch.optim.RMSprop(params, **OPTIONS)


def in_a_fresh_folder(rank: int, world_size: int, train, *args) -> dict:
    """``train(folder, *args)`` on a rank with torchrun's environment, in a folder of its own."""
    as_framework_rank(rank, world_size)
    folder = tempfile.mkdtemp()
    try:
        return train(folder, *args)
    finally:
        shutil.rmtree(folder)


def resumes_like_torch(world_size: int, train, *args) -> None:
    """At ``world_size`` ranks, ShardedRMSprop and torch.optim.RMSprop, each resuming from the
    same checkpoint with ``train(folder, kind, *args)``, end with the same parameters."""
    ours, torchs = (
        run_ranks(world_size, in_a_fresh_folder, train, kind, *args, timeout=300)
        for kind in ("sharded", "torch")
    )
    for mine, theirs in zip(ours, torchs):
        assert equal(mine["values"], theirs["values"])


def values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- HF Trainer ----------------------------------------------------------------------------------


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=31, n_positions=8, n_embd=8, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)  # the output layer is tied to the token embedding


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 31, (16, 8), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_train(folder: str, kind: str, resume: str | None, callback: bool) -> dict:
    from transformers import Trainer, TrainingArguments

    from sharded_rmsprop.integrations import ShardedRMSpropCallback

    args = TrainingArguments(
        output_dir=folder, max_steps=4, save_steps=2, per_device_train_batch_size=2,
        use_cpu=True, report_to=[], disable_tqdm=True, logging_steps=100, seed=3,
        dataloader_num_workers=0,
    )  # fmt: skip
    model = tiny_gpt2()
    optimizer = make_optimizer(kind, model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        optimizers=(optimizer, schedule),
        callbacks=[ShardedRMSpropCallback()] if callback else None,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    return {
        "values": values(model),
        "incomplete_warnings": sum("consolidate_state_dict" in str(w.message) for w in caught),
    }


def hf_on_rank(rank: int, world_size: int, folder: str) -> dict:
    as_framework_rank(rank, world_size)
    whole = hf_train(os.path.join(folder, "run"), "sharded", None, callback=True)
    resumed = hf_train(
        os.path.join(folder, "resumed"),
        "sharded",
        os.path.join(folder, "run", "checkpoint-2"),
        callback=True,
    )
    bare = hf_train(os.path.join(folder, "bare"), "sharded", None, callback=False)
    return {"whole": whole, "resumed": resumed, "bare": bare}


@pytest.mark.across_ranks
def test_hf_trainer_saves_the_whole_state_and_resumes_bit_for_bit(tmp_path) -> None:
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    results = run_ranks(2, hf_on_rank, str(tmp_path), timeout=300)
    for r in results:
        assert equal(r["resumed"]["values"], r["whole"]["values"])  # 2 -> 2 ranks
        assert r["whole"]["incomplete_warnings"] == 0
    assert results[0]["bare"]["incomplete_warnings"] == 2  # without the callback: each save
    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(saved["state"]) == len(saved["param_groups"][0]["params"])  # every parameter
    model_file = load_file(str(checkpoint / "model.safetensors"))
    assert set(model_file) >= {n for n, _ in tiny_gpt2().named_parameters()} - {"lm_head.weight"}
    # 2 -> 1 and 2 -> 3 ranks: ShardedRMSprop and torch.optim.RMSprop resume alike from it
    for world_size in (1, 3):
        resumes_like_torch(world_size, hf_train, str(checkpoint), True)


# -- accelerate ----------------------------------------------------------------------------------


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 2)
    )


def regression_data() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(
        torch.randn(16, 6, generator=generator), torch.randn(16, 2, generator=generator)
    )


def accelerate_train(kind: str, save_to: str | None, load_from: str | None, hook: bool) -> dict:
    """4 steps, ``save_state`` after the second (or ``load_state`` first and 2 steps)."""
    from accelerate import Accelerator

    from sharded_rmsprop.integrations import consolidate_before_save

    accelerator = Accelerator(cpu=True)
    model = small_model()
    optimizer = make_optimizer(kind, model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    loader = torch.utils.data.DataLoader(regression_data(), batch_size=2)
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    if hook and kind == "sharded":
        accelerator.register_save_state_pre_hook(consolidate_before_save(optimizer))
    batches = list(loader)
    steps = range(4)
    if load_from is not None:
        accelerator.load_state(load_from)
        steps = range(2, 4)
    caught: list = []
    for step in steps:
        x, y = batches[step % len(batches)]  # (3 ranks have fewer batches each)
        loss = (model(x) - y).square().mean()
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step == 1 and save_to is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                accelerator.save_state(save_to)  # safetensors for the model, by default
    return {
        "values": values(accelerator.unwrap_model(model)),
        "incomplete_warnings": sum("consolidate_state_dict" in str(w.message) for w in caught),
    }


def accelerate_on_rank(rank: int, world_size: int, folder: str) -> dict:
    as_framework_rank(rank, world_size)
    saved = os.path.join(folder, "state")
    whole = accelerate_train("sharded", saved, None, hook=True)
    resumed = accelerate_train("sharded", None, saved, hook=True)
    bare = accelerate_train("sharded", os.path.join(folder, "bare"), None, hook=False)
    return {"whole": whole, "resumed": resumed, "bare": bare}


def accelerate_resumed(folder: str, kind: str, checkpoint: str) -> dict:
    return accelerate_train(kind, None, checkpoint, hook=True)


@pytest.mark.across_ranks
def test_accelerate_saves_whole_files_and_resumes_bit_for_bit(tmp_path) -> None:
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    results = run_ranks(2, accelerate_on_rank, str(tmp_path), timeout=300)
    for r in results:
        assert equal(r["resumed"]["values"], r["whole"]["values"])  # 2 -> 2 ranks
        assert r["whole"]["incomplete_warnings"] == 0
    assert results[0]["bare"]["incomplete_warnings"] == 1  # without the hook: loud
    model_file = load_file(str(tmp_path / "state" / "model.safetensors"))
    assert set(model_file) == set(small_model().state_dict())  # every parameter kept
    saved = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=True)
    assert len(saved["state"]) == len(list(small_model().parameters()))
    # 2 -> 1 and 2 -> 3 ranks: ShardedRMSprop and torch.optim.RMSprop resume alike from it
    for world_size in (1, 3):
        resumes_like_torch(world_size, accelerate_resumed, str(tmp_path / "state"))


# -- Lightning -----------------------------------------------------------------------------------


def lightning_module(kind: str):
    import lightning.pytorch as pl

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_model()

        def training_step(self, batch, batch_index):
            x, y = batch
            return (self.net(x) - y).square().mean()

        def configure_optimizers(self):
            optimizer = make_optimizer(kind, self.parameters())
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
            stepwise = {"scheduler": schedule, "interval": "step"}
            return {"optimizer": optimizer, "lr_scheduler": stepwise}

        def train_dataloader(self):
            return torch.utils.data.DataLoader(regression_data(), batch_size=4)

    return Regression()


def lightning_fit(folder: str, kind: str, resume: str | None, devices: int) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoints = ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_epochs=2, callbacks=[checkpoints], logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=devices > 1,
    )  # fmt: skip
    module = lightning_module(kind)
    trainer.fit(module, ckpt_path=resume)
    return {"values": values(module.net)}


def lightning_on_rank(rank: int, world_size: int, folder: str) -> dict:
    as_framework_rank(rank, world_size)
    whole = lightning_fit(os.path.join(folder, "run"), "sharded", None, world_size)
    first = os.path.join(folder, "run", sorted(os.listdir(os.path.join(folder, "run")))[0])
    resumed = lightning_fit(os.path.join(folder, "resumed"), "sharded", first, world_size)
    return {"whole": whole, "resumed": resumed, "first": first}


@pytest.mark.across_ranks
def test_lightning_saves_the_whole_state_and_resumes_bit_for_bit(tmp_path) -> None:
    pytest.importorskip("lightning")
    results = run_ranks(2, lightning_on_rank, str(tmp_path), timeout=300)
    for r in results:
        assert equal(r["resumed"]["values"], r["whole"]["values"])  # 2 -> 2 ranks
    first = results[0]["first"]
    saved = torch.load(first, weights_only=False)["optimizer_states"][0]
    assert len(saved["state"]) == len(list(small_model().parameters()))  # every parameter
    # 2 -> 1 and 2 -> 3 ranks: ShardedRMSprop and torch.optim.RMSprop resume alike from it
    for world_size in (1, 3):
        resumes_like_torch(world_size, lightning_fit, first, world_size)
