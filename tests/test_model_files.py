"""Model files stay whole: a model trained by ShardedRMSprop saves like one trained by torch.

The optimizer lays each (dtype, device)'s parameters end to end in one flat buffer. Each
parameter still has a storage of its own (over its range of that buffer), so ``torch.save`` of
one parameter or one layer writes its own bytes, and savers that drop tensors sharing a
storage (safetensors, accelerate, ``save_pretrained``) keep every parameter.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
import zipfile

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks


class TiedModel(nn.Module):
    """A small language-model shape: an embedding tied to the output layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens)))


def saved_bytes(obj: object) -> int:
    """The tensor bytes ``torch.save(obj)`` writes (its storage records)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as archive:
        return sum(
            entry.file_size for entry in archive.infolist() if "/data/" in entry.filename
        )


def plain_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def trained(rank: int, steps: int = 2) -> TiedModel:
    model = TiedModel()
    ddp = DDP(model) if torch.distributed.is_initialized() else model
    opt = ShardedRMSprop(model.parameters(), lr=1e-2, momentum=0.9)
    generator = torch.Generator().manual_seed(rank)  # each rank its own data
    for _ in range(steps):
        opt.zero_grad()
        ddp(torch.randint(0, 11, (4, 3), generator=generator)).square().mean().backward()
        opt.step()
    return model


def files_on_rank(rank: int, world_size: int) -> dict:
    model, untouched = trained(rank), TiedModel()  # untouched: torch's own tensors
    result = {
        # what torch.save writes of one parameter, one layer, the model, against the same
        # tensors of a model the optimizer never saw
        "bias_bytes": (saved_bytes(model.body[2].bias), saved_bytes(untouched.body[2].bias)),
        "layer_bytes": (
            saved_bytes(model.body[0].state_dict()),
            saved_bytes(untouched.body[0].state_dict()),
        ),
        "model_bytes": (saved_bytes(model.state_dict()), saved_bytes(untouched.state_dict())),
        "values": plain_copy(model.state_dict()),
    }
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = TiedModel()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    result["torch_roundtrip"] = plain_copy(fresh.state_dict())
    try:
        from safetensors.torch import load_model, save_model
    except ImportError:
        return result
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        save_model(model, path)
        fresh = TiedModel()
        for p in fresh.parameters():
            p.data.zero_()
        missing, unexpected = load_model(fresh, path)
        result["safetensors"] = (plain_copy(fresh.state_dict()), missing, unexpected)
    return result


def check_files(results: list[dict]) -> None:
    for result in results:
        for what in ("bias_bytes", "layer_bytes", "model_bytes"):
            ours, plain = result[what]
            assert ours == plain, f"{what}: {ours} bytes written, {plain} for the same tensors"
        values = result["values"]
        assert values.keys() == result["torch_roundtrip"].keys()
        for name, value in values.items():
            assert torch.equal(result["torch_roundtrip"][name], value), name
        if "safetensors" in result:
            loaded, missing, unexpected = result["safetensors"]
            assert not unexpected and not missing
            for name, value in values.items():
                assert torch.equal(loaded[name], value), name
    # the ranks hold the same model
    for name, value in results[0]["values"].items():
        assert all(torch.equal(r["values"][name], value) for r in results[1:]), name


@pytest.mark.across_ranks
def test_model_files_are_whole_at_two_ranks() -> None:
    check_files(run_ranks(2, files_on_rank))


def test_model_files_are_whole_in_one_process() -> None:
    check_files([files_on_rank(0, 1)])


def test_safetensors_save_model_keeps_every_parameter() -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    model = trained(0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        safetensors.save_model(model, path)
        loaded = safetensors.load_file(path)
    # every parameter is there (the tied one once), each with its own values
    names = {name for name, _ in model.named_parameters()}
    assert names <= set(loaded) | {"head.weight"}
    for name, param in model.named_parameters():
        if name in loaded:
            assert torch.equal(loaded[name], param.detach()), name


@pytest.mark.cuda
def test_parameters_on_a_gpu_have_storages_of_their_own() -> None:
    """The storages come through DLPack, which CUDA tensors go through as well."""
    model = nn.Sequential(nn.Linear(13, 32), nn.Tanh(), nn.Linear(32, 5)).cuda()
    untouched = copy.deepcopy(model)
    opt = ShardedRMSprop(model.parameters(), lr=1e-2)
    model(torch.randn(4, 13, device="cuda")).square().mean().backward()
    opt.step()
    (bucket,) = opt.sharding.buckets
    start = bucket.flat.data_ptr()
    end = start + bucket.flat.numel() * bucket.flat.element_size()
    for p, q in zip(model.parameters(), untouched.parameters()):
        storage = p.untyped_storage()
        assert storage.data_ptr() == p.data_ptr() and start <= p.data_ptr() < end
        assert storage.nbytes() == p.numel() * p.element_size()
        assert saved_bytes(p.detach()) == saved_bytes(q.detach())
