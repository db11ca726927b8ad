"""Checkpoints that cannot lie, and cannot run code.

Every tensor the optimizer writes carries checksums, in both formats; a flipped bit is an error
on every rank, naming the parameter and the buffer, before anything changes. The offline
converter reads non-tensor entries as plain data only, and says when a checkpoint is another
optimizer's.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from sharded_rmsprop import ShardedRMSprop
from sharded_rmsprop.checkpoint import dcp_to_torch_format
from sharded_rmsprop.checksums import BLOCK_NUMEL, block_checksums
from spawn import run_ranks

SHAPES = [(7, 5), (3,), (300,), (0,)]
OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True)


def params_and_optimizer() -> tuple[list[torch.Tensor], ShardedRMSprop]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).requires_grad_() for s in SHAPES]
    return params, ShardedRMSprop(params, **OPTIONS, fused=False)


def train(params: list[torch.Tensor], opt: ShardedRMSprop, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        opt.step()


def flip_a_bit_of(directory_or_file: str, values: torch.Tensor) -> str:
    """Flip one bit in the middle of where ``values``' bytes are stored; the file's name."""
    paths = (
        [os.path.join(directory_or_file, name) for name in sorted(os.listdir(directory_or_file))]
        if os.path.isdir(directory_or_file) else [directory_or_file]
    )
    needle = values.contiguous().view(torch.uint8).numpy().tobytes()
    for path in paths:
        data = bytearray(open(path, "rb").read())
        where = data.find(needle)
        if where >= 0:
            data[where + len(needle) // 2] ^= 0x10
            open(path, "wb").write(data)
            return path
    raise AssertionError("the values were not found in the checkpoint")


def snapshot(opt: ShardedRMSprop) -> list[torch.Tensor]:
    found = []
    for bucket in opt.sharding.buckets:
        found += [bucket.steps.clone(), *(bucket.state[k].clone() for k in sorted(bucket.state))]
    return found


# -- both formats carry checksums ------------------------------------------------------------------


def test_both_formats_carry_a_checksum_of_every_tensor() -> None:
    params, opt = params_and_optimizer()
    train(params, opt, 2)
    full = opt.full_state_dict(to=0)
    for index, entry in full["state"].items():
        assert sorted(full["checksums"][index]) == sorted(entry)
        for key, value in entry.items():
            assert torch.equal(full["checksums"][index][key], block_checksums(value))
    sharded = opt.state_dict()
    for index, entry in sharded["state"].items():
        assert sorted(sharded["checksums"][index]) == sorted(entry)
    # (world size 1: the sharded format's tensors are plain, the whole range)
    assert torch.equal(sharded["checksums"][2]["square_avg"], block_checksums(full["state"][2]["square_avg"]))
    assert sharded["checksums"][2]["square_avg"].shape == (-(-300 // BLOCK_NUMEL),)


def test_any_changed_element_changes_its_blocks_checksum() -> None:
    values = torch.randn(1000)
    sums = block_checksums(values)
    bits = values.view(torch.int32)
    for element in (0, 63, 64, 999):
        for bit in (0, 17, 31):
            changed = bits.clone()
            changed[element] ^= 1 << bit if bit < 31 else -(1 << 31)
            differs = (block_checksums(changed.view(torch.float32)) != sums).nonzero().flatten()
            assert differs.tolist() == [element // BLOCK_NUMEL]
    swapped = values.clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert not torch.equal(block_checksums(swapped), sums)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.float64, torch.complex64])
def test_checksums_of_any_dtype_and_length(dtype: torch.dtype) -> None:
    """Model state dicts hold masks and counters too (launch/train.py checks them all)."""
    for numel in (0, 1, 3, 65, 130):
        values = (torch.arange(numel) % 3 == 1).to(dtype)
        sums = block_checksums(values)
        assert sums.shape == (-(-numel // BLOCK_NUMEL),) and sums.dtype == torch.int64
        if numel:
            changed = values.clone()
            changed.view(torch.uint8)[-1] ^= 1
            assert not torch.equal(block_checksums(changed), sums)


def test_an_entry_dropped_from_a_checkpoint_is_found() -> None:
    params, opt = params_and_optimizer()
    train(params, opt, 2)
    sd = opt.full_state_dict(to=0)
    del sd["state"][1]  # its checksums stay: the file held it
    with pytest.raises(ValueError, match=r"the checkpoint is damaged: state\[1\] is missing"):
        opt.load_state_dict(sd)
    del sd["state"][2]["grad_avg"]
    sd["state"][1] = opt.full_state_dict(to=0)["state"][1]
    with pytest.raises(ValueError, match=r"state\[2\] lacks \['grad_avg'\]"):
        opt.load_state_dict(sd)


# -- torch format ----------------------------------------------------------------------------------


def load_damaged_torch_file(rank: int, world_size: int, path: str) -> dict:
    params, opt = params_and_optimizer()
    train(params, opt, 1)
    before = snapshot(opt)
    try:
        opt.load_state_dict(torch.load(path, weights_only=True))
        error = ("no error", "")
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
        error = (type(exc).__name__, str(exc))
    return {"error": error, "unchanged": all(torch.equal(a, b) for a, b in zip(before, snapshot(opt)))}


def test_a_flipped_bit_in_a_torch_format_file_is_an_error_on_every_rank(tmp_path) -> None:
    params, opt = params_and_optimizer()
    train(params, opt, 3)
    full = opt.full_state_dict(to=0)
    path = str(tmp_path / "optim.pt")
    torch.save(full, path)
    flip_a_bit_of(path, full["state"][2]["momentum_buffer"][200:232])  # elements 200-231
    results = run_ranks(2, load_damaged_torch_file, path)
    expected = (
        "the checkpoint is damaged: state[2]['momentum_buffer'] (parameter of shape (300,)) does "
        "not match its checksum at elements 192 to 255; nothing was loaded"
    )
    owner = 1  # parameter 2 sits at 128-427 of 512 elements: rank 1 owns its elements 128-299
    assert results[owner]["error"][0] == "ValueError"
    assert results[owner]["error"][1].startswith(expected)
    assert results[1 - owner]["error"] == (
        "ValueError",
        f"ShardedRMSprop.load_state_dict() failed on rank {owner}: {results[owner]['error'][1]} "
        "(nothing was changed on any rank)",
    )
    assert all(result["unchanged"] for result in results)


def test_a_state_dict_changed_on_purpose_loads_once_its_checksums_are_deleted() -> None:
    params, opt = params_and_optimizer()
    train(params, opt, 2)
    sd = opt.full_state_dict(to=0)
    sd["state"][0]["square_avg"].zero_()  # a deliberate reset
    with pytest.raises(ValueError, match="delete its 'checksums' entry"):
        opt.load_state_dict(sd)
    del sd["checksums"]
    opt.load_state_dict(sd)
    assert torch.equal(opt.state[params[0]]["square_avg"], torch.zeros(35))


# -- DCP -------------------------------------------------------------------------------------------


def dcp_save(rank: int, world_size: int, path: str) -> torch.Tensor:
    params, opt = params_and_optimizer()
    train(params, opt, 3)
    dcp.save({"optim": opt}, checkpoint_id=path)
    saved = opt.state_dict()["state"][2]["grad_avg"]
    return getattr(saved, "local", saved)  # (a plain tensor at world size 1)


def dcp_load(rank: int, world_size: int, path: str) -> dict:
    params, opt = params_and_optimizer()  # fresh
    before = snapshot(opt) + [p.detach().clone() for p in params]
    try:
        dcp.load({"optim": opt}, checkpoint_id=path)
        error = ("no error", "")
    except Exception as exc:  # noqa: BLE001
        error = (type(exc).__name__, str(exc))
    after = snapshot(opt) + [p.detach().clone() for p in params]
    return {
        "error": error,
        "unchanged": len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)),
        "stateless": len(opt.state) == 0,
    }


@pytest.mark.parametrize("loaded_on", [2, 3])
def test_a_flipped_bit_in_a_dcp_shard_is_an_error_on_every_rank(tmp_path, loaded_on) -> None:
    path = str(tmp_path / "ckpt")
    locals_ = run_ranks(2, dcp_save, path)
    flip_a_bit_of(path, locals_[1][100:140])  # inside rank 1's range of parameter 2
    results = run_ranks(loaded_on, dcp_load, path)
    damaged = [r for r in results if "checkpoint is damaged" in r["error"][1] and "failed on" not in r["error"][1]]
    assert len(damaged) == 1, [r["error"] for r in results]
    assert "state[2]['grad_avg'] (parameter of shape (300,)) does not match its checksum" in damaged[0]["error"][1]
    for result in results:
        assert result["error"][0] == "ValueError"
        assert "state[2]['grad_avg']" in result["error"][1]
        assert result["unchanged"] and result["stateless"]


def test_the_converter_checks_the_checksums(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    locals_ = run_ranks(2, dcp_save, path)
    flip_a_bit_of(path, locals_[0][:40])
    with pytest.raises(ValueError, match=r"the checkpoint is damaged: state\[2\]\['grad_avg'\]"):
        dcp_to_torch_format(path)


# -- nothing unpickled that could run code ---------------------------------------------------------


class RunsCode:
    """Unpickling it would create a directory: what a crafted checkpoint could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def save_alone(state: dict, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=path, no_dist=True)


def test_the_converter_refuses_a_checkpoint_that_would_run_code(tmp_path) -> None:
    path, marker = str(tmp_path / "ckpt"), str(tmp_path / "ran")
    crafted = {"state": {}, "param_groups": [{"lr": RunsCode(marker)}], "param_shapes": [], "checksums": {}}
    save_alone({"optim": crafted}, path)
    with pytest.raises(CheckpointException, match="Weights only load failed"):
        dcp_to_torch_format(path)
    assert not os.path.exists(marker)


def test_the_converter_takes_a_checkpoint_from_before_checksums_with_a_warning(tmp_path) -> None:
    params, opt = params_and_optimizer()
    train(params, opt, 2)
    old_format = opt.state_dict()
    del old_format["checksums"]
    path = str(tmp_path / "ckpt")
    save_alone({"optim": old_format}, path)
    with pytest.warns(UserWarning, match="written before checkpoints carried checksums"):
        converted = dcp_to_torch_format(path)
    assert "checksums" not in converted
    assert torch.equal(converted["state"][2]["grad_avg"], opt.full_state_dict(to=0)["state"][2]["grad_avg"])
    opt.load_state_dict(converted)  # loads, unverified


def test_the_converter_says_when_a_checkpoint_is_another_optimizers(tmp_path) -> None:
    params = [torch.randn(4, requires_grad=True)]
    adam = torch.optim.Adam(params)
    params[0].grad = torch.ones(4)
    adam.step()
    path = str(tmp_path / "ckpt")
    save_alone({"optim": adam.state_dict()}, path)
    with pytest.raises(ValueError, match="the checkpoint's 'optim' entry is not a ShardedRMSprop state dict"):
        dcp_to_torch_format(path)
    with pytest.raises(ValueError, match=r"the checkpoint has no 'model' entry; it has \['optim'\]"):
        dcp_to_torch_format(path, key="model")


# -- tensor learning rates ----------------------------------------------------------------------


def test_tensor_learning_rates_load_per_group_and_only_once_checked(tmp_path) -> None:
    """DCP loads into the state dict's tensors in place: a tensor lr there must be a copy of
    the group's (torch gives every group the default's one tensor), or a damaged checkpoint
    would change it before anything is checked, and groups would end with one lr."""
    def build() -> tuple[list[torch.Tensor], ShardedRMSprop]:
        params = [torch.randn(40, requires_grad=True), torch.randn(30, requires_grad=True)]
        groups = [{"params": params[:1]}, {"params": params[1:], "lr": torch.tensor(0.05)}]
        return params, ShardedRMSprop(groups, lr=torch.tensor(0.01), fused=False)

    params, opt = build()
    train(params, opt, 2)
    path = str(tmp_path / "ckpt")
    save_alone({"optim": opt}, path)
    _, fresh = build()
    fresh.param_groups[0]["lr"] = torch.tensor(0.5)
    fresh.param_groups[1]["lr"] = fresh.param_groups[0]["lr"]  # one tensor, as torch shares it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"optim": fresh}, checkpoint_id=path, no_dist=True)
    assert [float(g["lr"]) for g in fresh.param_groups] == pytest.approx([0.01, 0.05])
    flip_a_bit_of(path, opt.state_dict()["state"][0]["square_avg"][:20])  # (world size 1: plain)
    _, damaged = build()
    damaged.param_groups[0]["lr"], damaged.param_groups[1]["lr"] = torch.tensor(0.5), torch.tensor(0.25)
    with pytest.raises(ValueError, match="the checkpoint is damaged"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"optim": damaged}, checkpoint_id=path, no_dist=True)
    assert [float(g["lr"]) for g in damaged.param_groups] == [0.5, 0.25]  # as they were


def test_add_param_group_between_a_clip_and_its_step_is_an_error() -> None:
    """torch's clip covers the gradients there were; ours is applied in the step."""
    params, opt = params_and_optimizer()
    train(params, opt, 1)
    opt.clip_grad_norm_(1.0)
    with pytest.raises(RuntimeError, match="add_param_group\\(\\) between clip_grad_norm_\\(\\) and step\\(\\)"):
        opt.add_param_group({"params": [torch.randn(3, requires_grad=True)]})
    assert len(opt.param_groups) == 1
