"""Checkpoints: torch's format on one rank, DCP shards that reload at any world size, bad input."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from sharded_rmsprop import ShardedRMSprop
from sharded_rmsprop.checkpoint import dcp_to_torch_format, main as convert_main
from spawn import run_ranks

OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1)
# ShardedRMSprop runs its reference update (fused=False) wherever results are compared with
# torch.optim.RMSprop bit for bit.
SHAPES = [(7, 5), (3,), (), (0,), (40,), (17, 3)]


def initial_params(device: str = "cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).to(device).requires_grad_() for shape in SHAPES]


def groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:3]}, {"params": params[3:], "lr": 3e-3, "momentum": 0.5}]


def step_with_grads(optimizers, params_lists, step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=generator).to(p.device) for p in params_lists[0]]
    for params in params_lists:
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (i == 1 and step == 0) else g.clone()  # param 1 skips step 0
    for opt in optimizers:
        opt.step()


def torch_run(steps: int, device: str = "cpu") -> tuple[list[torch.Tensor], torch.optim.RMSprop]:
    """The uninterrupted reference: torch.optim.RMSprop for ``steps`` steps."""
    params = initial_params(device)
    # torch's for-loop: the reference path's op sequence (CPU's default; CUDA's is foreach)
    opt = torch.optim.RMSprop(groups(params), **OPTIONS, foreach=None if device == "cpu" else False)
    for step in range(steps):
        step_with_grads([opt], [params], step)
    return params, opt


def assert_same_state(ours: dict, theirs: dict) -> None:
    assert ours["param_groups"] == theirs["param_groups"]
    assert sorted(ours["state"]) == sorted(theirs["state"])
    for index, entry in theirs["state"].items():
        assert sorted(ours["state"][index]) == sorted(entry), index
        for key, value in entry.items():
            assert torch.equal(ours["state"][index][key], value), (index, key)
            assert ours["state"][index][key].dtype == value.dtype


# -- torch format ---------------------------------------------------------------------------------


def full_state_on_rank(rank: int, world_size: int, path: str) -> dict:
    params = initial_params()
    opt = ShardedRMSprop(groups(params), **OPTIONS, fused=False)
    reference, ref_opt = initial_params(), None
    ref_opt = torch.optim.RMSprop(groups(reference), **OPTIONS)
    for step in range(3):
        step_with_grads([opt, ref_opt], [params, reference], step)
    to_one = opt.full_state_dict(to=1, chunk_numel=7)  # tiny chunks: many messages
    to_all = opt.full_state_dict(to=None)
    if rank == 1:
        torch.save(to_one, path)
    return {"to_one": to_one, "to_all": to_all, "reference": ref_opt.state_dict()}


def test_full_state_dict_is_torchs_state_dict_and_torch_continues_from_it(tmp_path) -> None:
    path = str(tmp_path / "full.pt")
    results = run_ranks(3, full_state_on_rank, path)
    for rank, result in enumerate(results):
        assert (result["to_one"] is None) == (rank != 1)
        assert_same_state(result["to_all"], result["reference"])
    assert_same_state(results[1]["to_one"], results[1]["reference"])
    loaded = torch.load(path, weights_only=True)  # tensors and plain containers only
    # torch.optim.RMSprop continues from it exactly as from its own state
    params, ref_opt = torch_run(3)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = torch.optim.RMSprop(groups(resumed_params), **OPTIONS)
    resumed.load_state_dict(loaded)
    for step in range(3, 6):
        step_with_grads([ref_opt, resumed], [params, resumed_params], step)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))


def load_torch_state_on_rank(rank: int, world_size: int) -> bool:
    params, ref_opt = torch_run(3)
    ours = [p.detach().clone().requires_grad_() for p in params]
    opt = ShardedRMSprop(groups(ours), lr=0.5, fused=False)  # options come from the state dict
    opt.load_state_dict(ref_opt.state_dict())
    for step in range(3, 6):
        step_with_grads([ref_opt, opt], [params, ours], step)
    return all(torch.equal(a, b) for a, b in zip(params, ours))


def test_load_state_dict_from_torch_continues_bit_for_bit() -> None:
    assert all(run_ranks(2, load_torch_state_on_rank))


# -- DCP -----------------------------------------------------------------------------------------


def dcp_save_on_rank(
    rank: int, world_size: int, path: str, steps: int, device: str = "cpu"
) -> None:
    params = initial_params(device)
    opt = ShardedRMSprop(groups(params), **OPTIONS, fused=False)
    for step in range(steps):
        step_with_grads([opt], [params], step)
    model = {f"p{i}": p.detach() for i, p in enumerate(params)}
    dcp.save({"model": model, "optim": opt}, checkpoint_id=path)


def dcp_resume_on_rank(
    rank: int, world_size: int, path: str, steps: int, device: str = "cpu"
) -> dict:
    params = initial_params(device)
    opt = ShardedRMSprop(groups(params), **OPTIONS, fused=False)  # fresh: never stepped
    model = {f"p{i}": p.detach() for i, p in enumerate(params)}
    dcp.load({"model": model, "optim": opt}, checkpoint_id=path)  # params load in place
    reference, ref_opt = torch_run(steps, device)
    equal_at_load = all(torch.equal(a, b) for a, b in zip(params, reference))
    for step in range(steps, steps + 3):
        step_with_grads([opt, ref_opt], [params, reference], step)
    return {
        "equal_at_load": equal_at_load,
        "equal_after": all(torch.equal(a, b) for a, b in zip(params, reference)),
        "steps": [float(opt.state[p]["step"]) for p in params if p in opt.state],
    }


@pytest.mark.parametrize("saved_on, loaded_on", [(2, 3), (3, 2), (4, 1), (1, 2)])
def test_dcp_checkpoint_resumes_at_another_world_size(tmp_path, saved_on, loaded_on) -> None:
    path = str(tmp_path / "ckpt")
    run_ranks(saved_on, dcp_save_on_rank, path, 3)
    files = sorted(os.listdir(path))
    assert sum(name.endswith(".distcp") for name in files) == saved_on  # one file per rank
    for result in run_ranks(loaded_on, dcp_resume_on_rank, path, 3):
        assert result["equal_at_load"] and result["equal_after"]
        assert result["steps"] == [6.0, 5.0, 6.0, 6.0, 6.0, 6.0]


def test_dcp_checkpoint_converts_offline_to_torch_format(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    run_ranks(3, dcp_save_on_rank, path, 3)
    _, ref_opt = torch_run(3)
    assert_same_state(dcp_to_torch_format(path), ref_opt.state_dict())
    out = str(tmp_path / "optim.pt")
    convert_main([path, out])
    assert_same_state(torch.load(out, weights_only=True), ref_opt.state_dict())


# -- bad checkpoints -------------------------------------------------------------------------------


def snapshot(opt: ShardedRMSprop) -> list[torch.Tensor]:
    tensors = []
    for bucket in opt.sharding.buckets:
        tensors += [bucket.steps.clone(), *(b.clone() for b in bucket.state.values())]
    return tensors + [torch.tensor([g["lr"] for g in opt.param_groups])]


def stepped_optimizer() -> tuple[ShardedRMSprop, list[torch.Tensor]]:
    params = initial_params()
    opt = ShardedRMSprop(groups(params), **OPTIONS, fused=False)
    for step in range(2):
        step_with_grads([opt], [params], step)
    return opt, params


def adam_state_dict() -> dict:
    params = initial_params()
    adam = torch.optim.Adam(groups(params))
    for p in params:
        p.grad = torch.ones_like(p)
    adam.step()
    return adam.state_dict()


def other_shapes_state_dict() -> dict:
    params = [p.detach().reshape(-1).requires_grad_() for p in initial_params()]
    opt = torch.optim.RMSprop(groups(params), **OPTIONS)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def fewer_params_state_dict() -> dict:
    _, ref_opt = torch_run(1)
    sd = ref_opt.state_dict()
    sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][:-1]
    return sd


@pytest.mark.parametrize(
    "make, message",
    [
        (adam_state_dict, r"lacks the RMSprop options \['alpha'\].*another optimizer"),
        (
            other_shapes_state_dict,
            r"state\[0\]\['square_avg'\] has shape \(35,\) but the parameter has shape \(7, 5\)",
        ),
        (fewer_params_state_dict, "doesn't match the size of optimizer's group"),
        (lambda: {"state": {}}, "not an optimizer state dict"),
        (lambda: {"state": {}, "param_groups": []}, "different number of parameter groups"),
    ],
)
def test_bad_state_dict_is_a_clear_error_and_changes_nothing(make, message) -> None:
    opt, params = stepped_optimizer()
    before, params_before = snapshot(opt), [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(make())
    assert all(torch.equal(a, b) for a, b in zip(snapshot(opt), before))
    assert all(torch.equal(a, b) for a, b in zip(params, params_before))


def test_corrupted_dcp_checkpoint_is_an_error_and_changes_nothing(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    opt, params = stepped_optimizer()
    dcp.save({"optim": opt}, checkpoint_id=path)
    (data_file,) = [name for name in os.listdir(path) if name.endswith(".distcp")]
    with open(os.path.join(path, data_file), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, data_file)) // 2)
    step_with_grads([opt], [params], 2)  # the optimizer moves on after the save
    before = snapshot(opt)
    with pytest.raises(CheckpointException):  # DCP's own error for a truncated file
        dcp.load({"optim": opt}, checkpoint_id=path)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(opt), before))


def test_dcp_checkpoint_of_other_shapes_is_rejected_before_loading(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    params = [torch.randn(5, 7, requires_grad=True)]
    saver = ShardedRMSprop(params)
    params[0].grad = torch.ones(5, 7)
    saver.step()
    dcp.save({"optim": saver}, checkpoint_id=path)
    other = [torch.randn(7, 5, requires_grad=True)]  # same numel, other shape
    loader = ShardedRMSprop(other)
    with pytest.raises(
        ValueError, match=r"parameter 0 has shape \(5, 7\) in the state dict and \(7, 5\)"
    ):
        dcp.load({"optim": loader}, checkpoint_id=path)
    assert len(loader.state) == 0
