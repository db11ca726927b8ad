"""Uneven inputs under ``Join([ddp_model, optimizer])``: no hang, and torch's numbers.

Rank ``r`` has ``3 + 2r`` batches. Ranks out of data follow the others' steps (their DDP hook
all-reduces zeros, ours updates the shard they own with the leaders' gradients and options).
The truth: torch.optim.RMSprop on the rank with the most batches, fed the same DDP-averaged
gradients (scaled by our clip coefficient where the run clips, and skipping the steps ours
skips), with the same LR schedule. Every rank must end with exactly its parameters.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks

OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-3)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(rank: int, i: int) -> torch.Tensor:
    return torch.randn(4, 7, generator=torch.Generator().manual_seed(100 * rank + i))


def uneven_on_rank(
    rank: int,
    world_size: int,
    clip: bool,
    scaled: bool = False,
    host_shared: bool = False,
    bucket_numel: int | None = None,
) -> dict:
    batches = 3 + 2 * rank
    # a power-of-two loss scale: scaled gradients unscale to exactly the plain ones
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
    nan_at = 3 + 2 * (world_size - 1) - 1  # the last rank's last batch: the others have joined
    model, twin = DDP(tiny_model()), DDP(tiny_model())
    opt = ShardedRMSprop(
        model.parameters(),
        **OPTIONS,
        fused=False,
        skip_nonfinite=clip,
        host_shared=host_shared,
        bucket_numel=bucket_numel,
    )
    ref = torch.optim.RMSprop(twin.parameters(), **OPTIONS)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    norms = []
    with Join([model, opt]):
        for i in range(batches):
            opt.zero_grad()
            loss = model(batch(rank, i)).pow(2).mean()
            (scaler.scale(loss) if scaled else loss).backward()
            if clip and i == nan_at:
                next(model.parameters()).grad[0, 0] = float("nan")
            if clip:
                norms.append(opt.clip_grad_norm_(0.5))
            if scaled:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            schedules[0].step()
    with Join([twin]):  # the truth, replicated: each rank steps while it has data
        for i in range(batches):
            ref.zero_grad()
            twin(batch(rank, i)).pow(2).mean().backward()
            if clip and i == nan_at:
                next(twin.parameters()).grad[0, 0] = float("nan")
            grads = [p.grad for p in twin.parameters()]
            if clip and not all(g.isfinite().all() for g in grads):
                schedules[1].step()  # ours skipped this step (every rank agreed)
                continue
            if clip:
                coefficient = torch.clamp(0.5 / (norms[i] + 1e-6), max=1.0)
                for g in grads:
                    g.mul_(coefficient)
            ref.step()
            schedules[1].step()
    return {
        "ours": [p.detach().clone() for p in model.parameters()],
        "truth": [p.detach().clone() for p in twin.parameters()],
        "skipped": opt.skipped_steps,
        "steps": [float(opt.state[p]["step"]) for p in model.parameters()],
    }


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "clip+skip_nonfinite"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_uneven_inputs_under_join_end_as_torch_on_the_longest_rank(
    world_size: int, clip: bool
) -> None:
    results = run_ranks(world_size, uneven_on_rank, clip, timeout=120)
    check_against_truth(results, world_size, clip)


def test_uneven_inputs_under_join_with_a_grad_scaler() -> None:
    """The followers take part in the scaler's inf check and unscale with the leaders'
    scale; with a power-of-two scale the result is the unscaled run's, bit for bit."""
    check_against_truth(run_ranks(2, uneven_on_rank, False, True, timeout=120), 2, False)


def test_uneven_inputs_under_join_with_host_shared_buffers() -> None:
    """The leader sends after the barrier that the followers wait at before they receive."""
    check_against_truth(run_ranks(2, uneven_on_rank, True, False, True, timeout=120), 2, True)


def test_uneven_inputs_under_join_with_several_flat_buffers() -> None:
    results = run_ranks(3, uneven_on_rank, True, False, False, 40, timeout=120)
    check_against_truth(results, 3, True)


def epochs_with_default_options(rank: int, world_size: int) -> list[torch.Tensor]:
    """Two epochs under Join with torch's default options (the ints momentum=0 and
    weight_decay=0): a follower's options must still agree with the leaders' afterwards."""
    model = DDP(tiny_model())
    opt = ShardedRMSprop(model.parameters(), lr=1e-2)
    for epoch in range(2):
        with Join([model, opt]):
            for i in range(1 + 2 * rank):
                opt.zero_grad()
                model(batch(rank, 10 * epoch + i)).pow(2).mean().backward()
                opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_a_second_epoch_after_a_join_trains() -> None:
    first, second = run_ranks(2, epochs_with_default_options, timeout=120)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def check_against_truth(results: list[dict], world_size: int, clip: bool) -> None:
    longest = results[-1]
    total = 3 + 2 * (world_size - 1)
    for rank, result in enumerate(results):
        assert all(torch.equal(a, b) for a, b in zip(result["ours"], longest["truth"])), rank
        assert result["skipped"] == int(clip), rank
        # every rank counted every step the longest rank took
        assert result["steps"] == [float(total - int(clip))] * 4, rank


def misuse_under_join(rank: int, world_size: int, misuse: str) -> str:
    """Rank 0 has one batch, rank 1 two; in rank 1's second iteration it misuses the
    optimizer while rank 0 follows. Returns the error each rank got."""
    model = DDP(tiny_model())
    opt = ShardedRMSprop(model.parameters(), **OPTIONS)
    try:
        with Join([model, opt]):
            for i in range(1 + rank):
                opt.zero_grad()
                model(batch(rank, i)).pow(2).mean().backward()
                if i == 1 and misuse == "full_state_dict":
                    opt.full_state_dict()
                if i == 1 and misuse == "bad_gradient":
                    p = next(model.parameters())
                    p.grad = p.grad.to_sparse()
                if i == 1 and misuse == "nonfinite_norm":
                    next(model.parameters()).grad[0, 0] = float("inf")
                    opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
                opt.step()
    except RuntimeError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize(
    "misuse, words",
    [
        ("full_state_dict", "rank(s) 0 ran out of data under Join"),
        ("bad_gradient", "sparse gradients"),
        (
            "nonfinite_norm",
            "The total norm of order 2.0 for gradients from `parameters` is non-finite",
        ),
    ],
)
def test_misuse_while_a_rank_follows_is_an_error_on_every_rank(misuse: str, words: str) -> None:
    errors = run_ranks(2, misuse_under_join, misuse, timeout=60)
    for rank, error in enumerate(errors):
        assert words in error, (rank, error)
