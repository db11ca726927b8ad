"""A bad state dict changes nothing: ``ValueError`` naming the entry, on every rank.

Before, a ``step`` that was a string, a 2-element tensor, ``None`` or a meta tensor, or a meta
``square_avg``, raised only after the param groups were overwritten and the state cleared; a
``state`` given as a list, ``param_groups`` as an int or a group's ``params`` as an int raised
AttributeError or TypeError.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks

SHAPES = [(7, 5), (3,), (40,)]


def stepped() -> tuple[ShardedRMSprop, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).requires_grad_() for s in SHAPES]
    opt = ShardedRMSprop(
        [{"params": params[:2]}, {"params": params[2:], "momentum": 0.9, "centered": True}],
        lr=1e-2, fused=False,
    )
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        opt.step()
    return opt, params


def everything(opt: ShardedRMSprop, params: list[torch.Tensor]) -> list:
    """All that loading could change: options, step counts, buffers, parameters."""
    found = [copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])]
    for bucket in opt.sharding.buckets:
        found += [bucket.steps.clone(), *(bucket.state[k].clone() for k in sorted(bucket.state))]
    return found + [p.detach().clone() for p in params] + [sorted(id(p) for p in opt.state)]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b)
    )


def entry(sd: dict, index: int, key: str, value) -> dict:
    sd["state"].setdefault(index, {})[key] = value
    return sd


BAD = {
    "step is a string": (lambda sd: entry(sd, 0, "step", "3"), r"state\[0\]\['step'\] is '3', not a number"),
    "step has two elements": (
        lambda sd: entry(sd, 0, "step", torch.tensor([1.0, 2.0])),
        r"state\[0\]\['step'\] must be a number or a one-element real tensor, got a cpu tensor of shape \(2,\)",
    ),
    "step is None": (lambda sd: entry(sd, 0, "step", None), r"state\[0\]\['step'\] is None, not a number"),
    "step on meta": (
        lambda sd: entry(sd, 0, "step", torch.tensor(2.0, device="meta")),
        r"state\[0\]\['step'\] must be .* got a meta tensor of shape \(\)",
    ),
    "step negative": (lambda sd: entry(sd, 1, "step", -1), r"state\[1\]\['step'\] is -1.0, not a count of steps"),
    "step too large for a float": (
        lambda sd: entry(sd, 1, "step", 10**400),
        r"state\[1\]\['step'\] is 10{400}, not a number",
    ),
    "step is nan": (lambda sd: entry(sd, 1, "step", torch.tensor(math.nan)), r"state\[1\]\['step'\] is nan"),
    "square_avg on meta": (
        lambda sd: entry(sd, 0, "square_avg", torch.empty(7, 5, device="meta")),
        r"state\[0\]\['square_avg'\] is a meta tensor of shape \(7, 5\), which holds no values to load",
    ),
    "square_avg of integers": (
        lambda sd: entry(sd, 2, "square_avg", torch.zeros(40, dtype=torch.int64)),
        r"state\[2\]\['square_avg'\] has dtype torch.int64, the parameter torch.float32",
    ),
    "a buffer its group does not use, misshapen": (
        lambda sd: entry(sd, 0, "momentum_buffer", torch.zeros(3)),
        r"state\[0\]\['momentum_buffer'\] has shape \(3,\) but the parameter has shape \(7, 5\)",
    ),
    "grad_avg missing": (
        lambda sd: (sd["state"][2].pop("grad_avg"), sd)[1],
        r"state\[2\] lacks \['grad_avg'\]",
    ),
    "state is a list": (
        lambda sd: {**sd, "state": list(sd["state"].values())},
        r"state_dict\['state'\] is of type list, not a mapping",
    ),
    "an entry is a list": (lambda sd: {**sd, "state": {0: [1.0]}}, r"state\[0\] is of type list, not a mapping"),
    "param_groups is an int": (
        lambda sd: {**sd, "param_groups": 3},
        r"state_dict\['param_groups'\] is of type int, not a list of param groups",
    ),
    "a group is a string": (
        lambda sd: {**sd, "param_groups": ["lr", sd["param_groups"][1]]},
        r"param_groups\[0\] is of type str, not a mapping",
    ),
    "params is an int": (
        lambda sd: (sd["param_groups"][0].__setitem__("params", 5), sd)[1],
        r"param_groups\[0\]\['params'\] is of type int, not a list of parameter ids",
    ),
    "ids repeat": (
        lambda sd: (sd["param_groups"][1].__setitem__("params", [0]), sd)[1],
        r"param_groups\[1\]\['params'\] holds 0: ids must be distinct integers",
    ),
    "lr is a string": (
        lambda sd: (sd["param_groups"][0].__setitem__("lr", "0.1"), sd)[1],
        r"param_groups\[0\]\['lr'\] is '0.1', not a number",
    ),
    "negative lr": (
        lambda sd: (sd["param_groups"][0].__setitem__("lr", -0.1), sd)[1],
        r"param_groups\[0\]: Invalid learning rate: -0.1",
    ),
    "centered is 1": (
        lambda sd: (sd["param_groups"][1].__setitem__("centered", 1), sd)[1],
        r"param_groups\[1\]\['centered'\] is 1, not True or False",
    ),
    "state of an unlisted id": (
        lambda sd: entry(sd, 99, "step", 1.0),
        r"state dict has state for parameter 99, which no group lists",
    ),
    "another optimizer's key": (
        lambda sd: entry(sd, 0, "exp_avg", torch.zeros(7, 5)),
        r"state\[0\] has keys \['exp_avg'\] that RMSprop does not have",
    ),
}


@pytest.mark.parametrize("fmt", ["torch format", "torch.optim.RMSprop's"])
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_state_dict_is_a_value_error_naming_the_entry_and_changes_nothing(case, fmt) -> None:
    opt, params = stepped()
    sd = opt.full_state_dict(to=0)
    if fmt != "torch format":
        sd.pop("checksums")  # torch's own state dicts carry none
    damage, message = BAD[case]
    before = everything(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(damage(sd))
    assert same(everything(opt, params), before)


def test_a_state_dict_of_an_older_torch_without_maximize_loads_with_torchs_defaults() -> None:
    opt, _ = stepped()
    sd = opt.full_state_dict(to=0)
    for group in sd["param_groups"]:
        del group["maximize"], group["foreach"], group["differentiable"], group["capturable"]
    del sd["param_groups"][0]["momentum"], sd["param_groups"][0]["centered"]
    fresh, _ = stepped()
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["maximize"] is False and fresh.param_groups[0]["momentum"] == 0
    assert fresh.param_groups[1]["maximize"] is False and fresh.param_groups[1]["centered"] is True


# -- on every rank -------------------------------------------------------------------------------


def bad_on_one_rank(rank: int, world_size: int, bad) -> dict:
    opt, params = stepped()
    sd = opt.full_state_dict(to=None)
    if rank == world_size - 1:
        sd["state"][0]["step"] = bad
    before = everything(opt, params)
    try:
        opt.load_state_dict(sd)
        error = ("no error", "")
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
        error = (type(exc).__name__, str(exc))
    return {"error": error, "unchanged": same(everything(opt, params), before)}


@pytest.mark.parametrize("bad", ["x", 10**400], ids=["a string", "an int too large for a float"])
def test_a_state_dict_bad_on_one_rank_is_an_error_on_every_rank(bad) -> None:
    last, others = 2, [0, 1]
    results = run_ranks(3, bad_on_one_rank, bad)
    assert results[last]["error"] == ("ValueError", f"state[0]['step'] is {bad!r}, not a number")
    for rank in others:
        assert results[rank]["error"] == (
            "ValueError",
            f"ShardedRMSprop.load_state_dict() failed on rank 2: state[0]['step'] is {bad!r}, "
            "not a number (nothing was changed on any rank)",
        )
    assert all(result["unchanged"] for result in results)


def different_files_on_rank(rank: int, world_size: int) -> str:
    """Each rank loads a checkpoint of another step: an error, not a mixture."""
    opt, params = stepped()
    sd = opt.full_state_dict(to=None)
    if rank == 1:
        sd = copy.deepcopy(sd)
        for entry_ in sd["state"].values():
            entry_["step"] = entry_["step"] + 1
        sd.pop("checksums")
    try:
        opt.load_state_dict(sd)
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_ranks_loading_different_state_dicts_all_raise() -> None:
    for message in run_ranks(2, different_files_on_rank):
        assert "load_state_dict(): the ranks disagree on the loaded step counts: the step of " \
               "parameter 0 is 2.0 on rank 0 but 3.0 on rank 1" in message
