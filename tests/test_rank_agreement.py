"""Ranks that disagree at step time: a clear error on every rank, nothing changed, no hang.

Without DDP nothing makes the ranks' inputs agree. Each case below gives the last rank of the
group other input than the rest (a missing gradient, another lr, a sparse gradient, ...) and
calls the collective method; every rank must raise the error the case names, with parameters,
state and step counters as they were, and afterwards a consistent step must continue exactly
as torch.optim.RMSprop does, with ``full_state_dict()`` (which hung before) equal to torch's.
All cases run in one spawn per world size.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks

SHAPES = [(40,), (7, 5), (3,), (64,), (2, 2)]
OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True)


def make_params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in SHAPES]


def groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:3]}, {"params": params[3:], "lr": 3e-3, "momentum": 0.5}]


def set_grads(params: list[torch.Tensor], step: int) -> None:
    """The same gradients on every rank, as DDP would leave them."""
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def snapshot(opt: ShardedRMSprop, params: list[torch.Tensor]) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in params]
    for bucket in opt.sharding.buckets:
        tensors.append(bucket.steps.clone())
        tensors += [bucket.state[key].clone() for key in sorted(bucket.state)]
    return tensors


def unchanged(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


# -- the cases: each makes the last rank (``odd``) differ, then calls the collective -----------


def grad_missing(params, opt, odd):
    if odd:
        params[2].grad = None
    opt.step()


def zero_grad_on_one_rank(params, opt, odd):
    if odd:
        opt.zero_grad(set_to_none=True)
    opt.step()


def lr_on_one_rank(params, opt, odd):
    old = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = 0.02 if odd else old
    try:
        opt.step()
    finally:
        opt.param_groups[0]["lr"] = old


def momentum_on_one_rank(params, opt, odd):
    opt.param_groups[1]["momentum"] = 0.25 if odd else 0.5
    try:
        opt.step()
    finally:
        opt.param_groups[1]["momentum"] = 0.5


def sparse_on_one_rank(params, opt, odd):
    if odd:
        params[1].grad = params[1].grad.to_sparse()
    opt.step()


def misshapen_grad_on_one_rank(params, opt, odd):
    if odd:
        params[1].grad.data = params[1].grad.data.reshape(5, 7)
    opt.step()


def clip_differs(params, opt, odd):
    opt.clip_grad_norm_(0.5 if odd else 1.0)


def clip_rejected_on_one_rank(params, opt, odd):
    opt.clip_grad_norm_(1.0, norm_type="two" if odd else 2.0)


def clip_on_one_rank(params, opt, odd):
    if not odd:
        opt.clip_grad_norm_(1.0)
    opt.step()


def sparse_at_clip_on_one_rank(params, opt, odd):
    if odd:
        params[1].grad = params[1].grad.to_sparse()
    opt.clip_grad_norm_(1.0)


def momentum_not_a_number(params, opt, odd):
    opt.param_groups[1]["momentum"] = None if odd else 0.5
    try:
        opt.step()
    finally:
        opt.param_groups[1]["momentum"] = 0.5


def scaled_step(opt: ShardedRMSprop, init_scale: float) -> None:
    """``scaler.step(opt)`` as after ``scaler.scale(loss).backward()`` (the gradients as they are)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    scaler.scale(torch.ones(()))
    scaler.step(opt)


def scaler_on_one_rank(params, opt, odd):
    if odd:
        opt.step()
    else:
        scaled_step(opt, 1.0)


def scales_differ(params, opt, odd):
    scaled_step(opt, 4.0 if odd else 2.0)


def replaced_on_one_rank(params, opt, odd):
    if odd:
        params[3].data = params[3].data.clone()
    try:
        opt.step()
    finally:  # the others follow, so that the next step adopts it on every rank
        if not odd:
            params[3].data = params[3].data.clone()


def different_methods(params, opt, odd):
    if odd:
        opt.full_state_dict(to=None)
    else:
        opt.step()


def full_state_dict_to_differs(params, opt, odd):
    opt.full_state_dict(to=1 if odd else 0)


def full_state_dict_to_is_a_string(params, opt, odd):
    opt.full_state_dict(to="1" if odd else 1)


CASES = {
    "grad_missing": (
        grad_missing,
        "the ranks disagree on which parameters have a gradient: "
        "whether parameter 2 (shape (3,)) has a gradient is True on rank 0 but "
        "False on rank {odd}",
    ),
    "zero_grad_on_one_rank": (
        zero_grad_on_one_rank,
        "whether parameter 0 (shape (40,)) has a "
        "gradient is True on rank 0 but False on rank {odd}",
    ),
    "lr_on_one_rank": (
        lr_on_one_rank,
        "the ranks disagree on the param-group options: the lr "
        "of param group 0 is 0.01 on rank 0 but 0.02 on rank {odd}",
    ),
    "momentum_on_one_rank": (
        momentum_on_one_rank,
        "the momentum of param group 1 is 0.5 on rank 0 but 0.25 on rank {odd}",
    ),
    "sparse_on_one_rank": (sparse_on_one_rank, "RMSprop does not support sparse gradients"),
    "misshapen_grad_on_one_rank": (
        misshapen_grad_on_one_rank,
        "a gradient has shape (5, 7) but its parameter has shape (7, 5)",
    ),
    "sparse_at_clip_on_one_rank": (
        sparse_at_clip_on_one_rank,
        "RMSprop does not support sparse gradients",
    ),
    "clip_differs": (
        clip_differs,
        "clip_grad_norm_(): the ranks disagree on the arguments: "
        "max_norm is 1.0 on rank 0 but 0.5 on rank {odd}",
    ),
    "clip_rejected_on_one_rank": (
        clip_rejected_on_one_rank,
        "norm_type must be a number or 'inf', got 'two'",
    ),
    "clip_on_one_rank": (
        clip_on_one_rank,
        "the ranks called different collective methods at the same time (rank 0: clip_grad_norm_()",
    ),
    "momentum_not_a_number": (
        momentum_not_a_number,
        "param_groups[1]['momentum'] is None, not a number",
    ),
    "scaler_on_one_rank": (
        scaler_on_one_rank,
        "the ranks disagree on the GradScaler: whether "
        "a GradScaler calls step() is True on rank 0 but False on rank {odd}",
    ),
    "scales_differ": (scales_differ, "the ranks' GradScalers have different scales"),
    "replaced_on_one_rank": (
        replaced_on_one_rank,
        "the ranks disagree on the parameters "
        "replaced since the last step: whether parameter 3 (shape (64,)) "
        "was replaced (p.data = ...) is False on rank 0 but True on rank "
        "{odd}",
    ),
    "different_methods": (
        different_methods,
        "the ranks called different collective methods at the same time (rank 0: step()",
    ),
    "full_state_dict_to_differs": (
        full_state_dict_to_differs,
        "the ranks disagree on the arguments: to is 0 on rank 0 but 1 on rank {odd}",
    ),
    "full_state_dict_to_is_a_string": (
        full_state_dict_to_is_a_string,
        "to='1' is not a rank of a process group of size",
    ),
}


def disagreeing_ranks(rank: int, world_size: int) -> dict:
    odd = rank == world_size - 1
    results = {}
    for name, (case, _) in CASES.items():
        params = make_params()
        opt = ShardedRMSprop(groups(params), **OPTIONS, fused=False)
        reference = make_params()
        ref = torch.optim.RMSprop(groups(reference), **OPTIONS)
        set_grads(params, 0), set_grads(reference, 0)
        opt.step(), ref.step()
        set_grads(params, 1)
        before = snapshot(opt, params)
        try:
            case(params, opt, odd)
            error = ("no error", "")
        except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
            error = (type(exc).__name__, str(exc))
        untouched = unchanged(before, snapshot(opt, params))
        # afterwards the ranks agree again and continue as torch does
        opt.zero_grad()
        set_grads(params, 2), set_grads(reference, 2)
        opt.step(), ref.step()
        full = opt.full_state_dict(to=None)
        theirs = ref.state_dict()["state"]
        same_state = all(
            torch.equal(full["state"][i][key], value)
            for i, entry in theirs.items()
            for key, value in entry.items()
        )
        results[name] = {
            "error": error,
            "untouched": untouched,
            "continues_as_torch": all(torch.equal(p, q) for p, q in zip(params, reference)),
            "same_state": same_state,
        }
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def outcomes(request) -> tuple[int, list[dict]]:
    return request.param, run_ranks(request.param, disagreeing_ranks, timeout=240)


@pytest.mark.parametrize("case", list(CASES))
def test_a_disagreement_is_an_error_on_every_rank_and_changes_nothing(outcomes, case) -> None:
    world_size, results = outcomes
    expected = CASES[case][1].format(odd=world_size - 1)
    for rank, result in enumerate(results):
        outcome = result[case]
        kind, message = outcome["error"]
        assert kind in ("RuntimeError", "ValueError"), f"rank {rank}: {outcome['error']}"
        assert expected in message, f"rank {rank}: {message}"
        assert "nothing was changed on any rank" in message.lower() or rank == world_size - 1
        assert outcome["untouched"], rank
        assert outcome["continues_as_torch"], rank
        assert outcome["same_state"], rank


# -- skip_nonfinite: a NaN on one rank skips the step on every rank ------------------------------


def nan_on_one_rank(rank: int, world_size: int, element: int) -> dict:
    params = make_params()
    opt = ShardedRMSprop(groups(params), **OPTIONS, fused=False, skip_nonfinite=True)
    set_grads(params, 0)
    if rank == world_size - 1:
        params[0].grad[element] = math.nan
    before = snapshot(opt, params)
    opt.step()
    return {"skipped": opt.skipped_steps, "untouched": unchanged(before, snapshot(opt, params))}


@pytest.mark.parametrize("element", [0, 39], ids=["owned by rank 0", "owned by rank 1"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(element: int) -> None:
    """Whichever rank owns the element: each rank reads all of its own gradients."""
    for result in run_ranks(2, nan_on_one_rank, element):
        assert result == {"skipped": 1, "untouched": True}


# -- equal numbers of different types agree --------------------------------------------------------


def int_or_float_options(rank: int, world_size: int) -> list[torch.Tensor]:
    """weight_decay=0 on one rank, 0.0 on the other (torch computes alike with either)."""
    params = make_params()
    opt = ShardedRMSprop(params, lr=1e-2, momentum=0.9, weight_decay=0 if rank else 0.0)
    for step in range(2):
        set_grads(params, step)
        opt.step()
    return [p.detach().clone() for p in params]


def test_an_int_option_and_an_equal_float_agree() -> None:
    first, second = run_ranks(2, int_or_float_options)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# -- what the library cannot see: a collective of the user's called on one rank only ---------------


def own_collective_on_rank_0_only(rank: int, world_size: int) -> str:
    import torch.distributed as dist

    params = make_params()
    opt = ShardedRMSprop(params)
    set_grads(params, 0)
    try:
        if rank == 0:
            dist.all_reduce(torch.ones(3))  # the user's, not the optimizer's
        opt.step()
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_torch_distributed_debug_detail_finds_a_collective_called_on_one_rank(monkeypatch) -> None:
    """A collective of the user's on rank 0 alone pairs with the other rank's step(): the
    library cannot tell; TORCH_DISTRIBUTED_DEBUG=DETAIL (as docs/guarantees.md says) can. (The
    optimizer's own methods are told apart: see the clip_on_one_rank case.)"""
    monkeypatch.setitem(os.environ, "TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    for message in run_ranks(2, own_collective_on_rank_0_only, timeout=120):
        assert "Detected mismatch between collectives on ranks" in message


# -- an NCCL group's agreement goes through a gloo twin (host values, no GPU sync) ------------------


def through_a_gloo_twin(rank: int, world_size: int) -> dict:
    from sharded_rmsprop import comm

    comm._carries_cpu_tensors = lambda backend: False  # as for NCCL: CPU tensors need a twin
    params = make_params()
    opt = ShardedRMSprop(groups(params), **OPTIONS, fused=False)
    again = ShardedRMSprop(make_params(), fused=False)  # the same twin, not a second one
    set_grads(params, 0)
    if rank == 1:
        params[0].grad = None
    try:
        opt.step()
        error = "no error"
    except RuntimeError as exc:
        error = str(exc)
    return {
        "twin": opt.sharding.data_parallel.host_group is not opt.sharding.data_parallel.group,
        "shared_twin": opt.sharding.data_parallel.host_group is again.sharding.data_parallel.host_group,
        "error": error,
    }


def test_an_nccl_like_group_agrees_through_its_gloo_twin() -> None:
    for result in run_ranks(2, through_a_gloo_twin):
        assert result["twin"] and result["shared_twin"]
        assert "the ranks disagree on which parameters have a gradient" in result["error"]
