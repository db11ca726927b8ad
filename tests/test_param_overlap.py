"""The parameter sync left running behind the next forward (``opt.overlap_param_sync(model)``).

Every forward must see the parameters torch's RMSprop would have (its loss bit for bit the
replicated reference's), the parameters after training are the blocking sync's bit for bit,
and whatever reads parameters outside the forward either waits, reads NaN, or gets an error.

Each rank feeds DDP data of its own; the model has an ``nn.MultiheadAttention`` (whose forward
reads its child ``out_proj``'s weights directly), tied weights, a parameter of the root module
read by the root's own forward, and the optimizer has a parameter outside the model.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import re
import weakref
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from spawn import run_ranks
from test_buckets import counting_collectives
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from sharded_rmsprop import ShardedRMSprop

OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)
# The reference update in small buckets: several syncs in flight, bit for bit torch's numbers.
OURS = dict(OPTIONS, fused=False, bucket_numel=64)
STEPS = 5


class EvalShortcut(nn.Module):
    """Like torch's fast paths: in eval mode it reads its child's weights itself."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(12, 12)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.inner(h)
        return nn.functional.linear(h, self.inner.weight, self.inner.bias)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 12)
        self.attn = nn.MultiheadAttention(12, 2, batch_first=True)
        self.norm = nn.LayerNorm(12)
        self.mlp = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12))
        self.shortcut = EvalShortcut()
        self.head = nn.Linear(12, 16, bias=False)
        self.head.weight = self.embed.weight
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 12))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(h) * self.scale
        return self.head(self.shortcut(h + self.mlp(h)))


@contextlib.contextmanager
def collectives_that_land_when_waited_for():
    """The parameter sync's collectives, started, move their data only when waited for: a
    read that did not wait sees what the buffer held before (NaN where another rank owns it)
    every time, not only when it wins the race with the network."""
    names = [
        name
        for name in ("broadcast", "all_gather_single", "all_gather_into_tensor")
        if hasattr(dist, name)
    ]
    originals = {name: getattr(dist, name) for name in names}

    class Deferred:
        def __init__(self, start):
            self.start = start

        def wait(self, timeout=None):
            if self.start is not None:
                self.start().wait()
                self.start = None
            return True

    def deferred(name):
        def call(*args, async_op=False, **kwargs):
            if not async_op:
                return originals[name](*args, **kwargs)
            return Deferred(lambda: originals[name](*args, async_op=True, **kwargs))

        return call

    for name in names:
        setattr(dist, name, deferred(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def build(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Parameter]:
    torch.manual_seed(0)
    return Net().to(dtype), nn.Parameter(torch.randn(70, dtype=dtype))


def tokens(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, 16, (3, 5), generator=torch.Generator().manual_seed(100 * step + rank))


def loss_of(model: nn.Module, outside: list[nn.Parameter], step: int, rank: int) -> torch.Tensor:
    loss = model(tokens(step, rank)).float().square().mean()
    return loss + sum(p.float().square().sum() for p in outside)


def train(rank: int, overlap: bool, **kwargs) -> dict:
    with collectives_that_land_when_waited_for():
        return train_now(rank, overlap, **kwargs)


def train_now(rank: int, overlap: bool, dtype=torch.float32, reduce_scatter=False, closure=False):
    """Train our optimizer (overlapped or not) beside torch's replicated RMSprop on the same
    averaged gradients: each iteration's losses, what was in flight after each step, the
    parameters at the end, and the collectives called."""
    model, outside = build(dtype)
    # reduce-scattered gradients are all DDP's: no parameter outside the model then
    outside = [] if reduce_scatter else [outside]
    reference, ref_outside = copy.deepcopy((model, outside))
    ddp = DistributedDataParallel(model)
    opt = ShardedRMSprop([*model.parameters(), *outside], **OURS)
    ref_opt = torch.optim.RMSprop([*reference.parameters(), *ref_outside], **OPTIONS)
    if reduce_scatter:
        opt.reduce_scatter_gradients(ddp)
    if overlap:
        opt.overlap_param_sync(ddp)
    losses, references, in_flight, collectives = [], [], [], Counter()
    world_size = dist.get_world_size()
    for step in range(STEPS):
        opt.zero_grad()
        ref_opt.zero_grad()

        def forward_backward():
            loss = loss_of(ddp, outside, step, rank)
            loss.backward()
            for p in outside:  # (outside DDP: averaged by hand, as torch's below)
                dist.all_reduce(p.grad)
                p.grad /= world_size
            losses.append(loss.item())
            return loss

        if not closure:
            forward_backward()
        ref_loss = loss_of(reference, ref_outside, step, rank)
        references.append(ref_loss.item())
        ref_loss.backward()
        for q in [*reference.parameters(), *ref_outside]:  # DDP's average, torch's way
            dist.all_reduce(q.grad)
            q.grad /= world_size
        with counting_collectives(collectives):
            opt.step(forward_backward if closure else None)
        ref_opt.step()
        in_flight.append(len(opt.sharding.sync.pending))
    opt.wait_for_params()
    return {
        "losses": losses,
        "references": references,
        "in_flight": in_flight,
        "params": [p.detach().clone() for p in [*model.parameters(), *outside]],
        "reference": [p.detach().clone() for p in [*reference.parameters(), *ref_outside]],
        "collectives": dict(collectives),
    }


def compare_on_rank(rank: int, world_size: int, kwargs: dict) -> dict:
    blocking, overlapped = train(rank, False, **kwargs), train(rank, True, **kwargs)
    return {
        "blocking": blocking,
        "overlapped": overlapped,
        "same_params": all(
            torch.equal(p, q) for p, q in zip(blocking["params"], overlapped["params"])
        ),
    }


@pytest.mark.parametrize(
    "world_size, kwargs",
    [
        (2, {}),
        (3, {}),
        (2, {"closure": True}),
        (2, {"reduce_scatter": True}),
        (2, {"dtype": torch.bfloat16}),
    ],
    ids=["2 ranks", "3 ranks", "closure", "reduce-scattered gradients", "bf16 master weights"],
)
def test_every_forward_sees_torchs_parameters_and_the_end_is_the_blocking_syncs(
    world_size: int, kwargs: dict
) -> None:
    for result in run_ranks(world_size, compare_on_rank, kwargs, timeout=300):
        blocking, overlapped = result["blocking"], result["overlapped"]
        assert result["same_params"]
        assert blocking["in_flight"] == [0] * STEPS
        assert all(count > 1 for count in overlapped["in_flight"]), overlapped["in_flight"]
        assert overlapped["collectives"] == blocking["collectives"]
        # each forward read the parameters the previous step made, bit for bit
        assert overlapped["losses"] == blocking["losses"]
        # torch's replicated RMSprop on gradients averaged as DDP does: exact at 2 ranks (a sum
        # of two is the same in any order), and without master weights (torch has none)
        if world_size == 2 and kwargs.get("dtype") is None:
            assert overlapped["losses"] == overlapped["references"]
            assert all(
                torch.equal(p, q) for p, q in zip(overlapped["params"], overlapped["reference"])
            )


def overlapped_step(rank: int, ddp, opt, step: int) -> None:
    """A forward, backward and step that leaves the sync in flight."""
    opt.zero_grad()
    ddp(tokens(step, rank)).square().mean().backward()
    opt.step()
    assert opt.sharding.sync.pending


def has_nan(model: nn.Module) -> bool:
    return any(torch.isnan(p).any().item() for p in model.parameters())


def reads_on_rank(rank: int, world_size: int) -> dict:
    """What each way of reading or changing parameters after step() meets."""
    with collectives_that_land_when_waited_for():
        model, _ = build()
        ddp = DistributedDataParallel(model)
        opt = ShardedRMSprop(model.parameters(), **OURS)
        overlap = opt.overlap_param_sync(ddp)
        seen: dict = {}
        overlapped_step(rank, ddp, opt, 0)
        seen["unsynced reads NaN"] = has_nan(model)
        state = model.state_dict()
        seen["model.state_dict() waits"] = not any(t.isnan().any() for t in state.values())
        overlapped_step(rank, ddp, opt, 1)
        opt.wait_for_params()
        seen["wait_for_params() waits"] = not has_nan(model) and not opt.sharding.sync.pending
        for i, read in enumerate(
            [opt.state_dict, lambda: opt.full_state_dict(to=None), lambda: copy.deepcopy(opt)]
        ):
            overlapped_step(rank, ddp, opt, 2 + i)
            read()
            seen[f"optimizer read {i} waits"] = not has_nan(model)
        handle = opt.register_step_post_hook(lambda o, a, k: seen.update(hooked=not has_nan(model)))
        opt.step()
        seen["a step post-hook waits"] = seen.pop("hooked") and not opt.sharding.sync.pending
        handle.remove()
        try:
            Join([ddp, opt])
        except RuntimeError as error:
            seen["Join"] = str(error)
        overlap.remove()
        opt.step()
        seen["removed: step waits"] = not opt.sharding.sync.pending
        opt.overlap_param_sync(ddp)
        opt.step()
        seen["registered again"] = bool(opt.sharding.sync.pending)
        try:
            copy.deepcopy(model)
        except RuntimeError as error:
            seen["copied in flight"] = str(error)
        with torch.no_grad():
            model.mlp[0].weight.clamp_(-0.1, 0.1)  # WGAN's clip, without waiting first
        try:
            ddp(tokens(6, rank))
        except RuntimeError as error:
            seen["a change in flight"] = str(error)
        try:
            opt.step()  # the parameters raced with the sync: refused from now on
        except RuntimeError as error:
            seen["and then"] = str(error)
    return seen


def test_what_reads_or_changes_parameters_after_step_waits_sees_nan_or_fails() -> None:
    for seen in run_ranks(2, reads_on_rank):
        change = seen.pop("a change in flight")
        assert re.search(
            r"parameters \(shape \(24, 12\)\) were changed while the sync that step\(\) left "
            r"running .* Call optimizer.wait_for_params\(\) after step\(\)",
            change,
        ), change
        assert change in seen.pop("and then")  # on every rank, inside the step's agreement
        assert "call optimizer.wait_for_params() first" in seen.pop("copied in flight")
        assert "Join with overlap_param_sync()" in seen.pop("Join")
        assert seen == {
            "unsynced reads NaN": True,
            "model.state_dict() waits": True,
            "wait_for_params() waits": True,
            "optimizer read 0 waits": True,
            "optimizer read 1 waits": True,
            "optimizer read 2 waits": True,
            "a step post-hook waits": True,
            "removed: step waits": True,
            "registered again": True,
        }


def test_registration_errors_and_one_process() -> None:
    assert not dist.is_initialized()
    model, _ = build()
    opt = ShardedRMSprop(model.parameters(), **OURS)
    with pytest.raises(TypeError, match="overlap_param_sync\\(\\) takes an nn.Module, got list"):
        opt.overlap_param_sync(list(model.parameters()))
    with pytest.raises(ValueError, match="holds none of this optimizer's parameters"):
        opt.overlap_param_sync(nn.Linear(2, 2))
    opt.overlap_param_sync(model)
    with pytest.raises(RuntimeError, match="already called on this optimizer.*nn.ModuleList"):
        opt.overlap_param_sync(model)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.RMSprop(reference.parameters(), **OPTIONS)
    for step in range(3):  # one process: nothing to sync, torch's numbers
        for o, m in ((opt, model), (ref_opt, reference)):
            o.zero_grad()
            loss_of(m, [], step, 0).backward()
            o.step()
        assert not opt.sharding.sync.pending
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


def copies_on_rank(rank: int, world_size: int) -> dict:
    model, _ = build()
    ddp = DistributedDataParallel(model)
    opt = ShardedRMSprop(model.parameters(), **OURS)
    opt.overlap_param_sync(ddp)
    overlapped_step(rank, ddp, opt, 0)
    opt.wait_for_params()
    twin = copy.deepcopy(model)  # an EMA's copy, say: hooks that wait for nothing
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    overlapped_step(rank, ddp, opt, 1)
    outputs = [m(tokens(2, rank)) for m in (twin, loaded)]  # the sync still in flight
    still_pending = bool(opt.sharding.sync.pending)
    opt.wait_for_params()
    return {
        "copies run without waiting": still_pending,
        "copies agree": torch.equal(outputs[0], outputs[1]) and not outputs[0].isnan().any(),
        "copies are not the model": not any(
            p.data_ptr() == q.data_ptr() for p, q in zip(model.parameters(), twin.parameters())
        ),
    }


def test_a_copied_or_pickled_model_carries_hooks_that_do_nothing() -> None:
    for seen in run_ranks(2, copies_on_rank):
        assert seen == {
            "copies run without waiting": True,
            "copies agree": True,
            "copies are not the model": True,
        }


@contextlib.contextmanager
def broadcasts_that_send_at_start_and_land_when_waited_for():
    """The other order gloo may take: each owner's shard leaves when the broadcast starts and
    lands in the receivers' buffers only when they wait (so an owner's later write is lost
    on the others every time)."""
    original = dist.broadcast

    class Landing:
        def __init__(self, land=None):
            self.land = land

        def wait(self, timeout=None):
            if self.land is not None:
                self.land()
                self.land = None
            return True

    def broadcast(tensor, src, group=None, async_op=False, **kwargs):
        if not async_op:
            return original(tensor, src, group=group, **kwargs)
        sent = tensor.clone()
        original(sent, src, group=group)
        return Landing(None if dist.get_rank() == src else lambda: tensor.copy_(sent))

    dist.broadcast = broadcast
    try:
        yield
    finally:
        dist.broadcast = original


def wgan_on_rank(rank: int, world_size: int, overlap: bool, waits: bool) -> dict:
    """WGAN's weight clipping through ``p.data`` after each step."""
    with broadcasts_that_send_at_start_and_land_when_waited_for():
        model, _ = build()
        ddp = DistributedDataParallel(model)
        opt = ShardedRMSprop(model.parameters(), **dict(OURS, param_sync="broadcast"))
        if overlap:
            opt.overlap_param_sync(ddp)
        try:
            for step in range(3):
                opt.zero_grad()
                ddp(tokens(step, rank)).square().mean().backward()
                opt.step()
                if waits:
                    opt.wait_for_params()
                for p in model.parameters():
                    p.data.clamp_(-0.05, 0.05)
            opt.wait_for_params()
        except RuntimeError as error:
            return {"error": str(error)}
        return {"params": [p.detach().clone() for p in model.parameters()]}


def test_a_write_through_p_data_in_flight_is_an_error_and_after_waiting_torchs_result() -> None:
    blocking = run_ranks(2, wgan_on_rank, False, False)
    for result in run_ranks(2, wgan_on_rank, True, False):
        assert "through p.data, in the range this rank owns" in result["error"]
    for result, expected in zip(run_ranks(2, wgan_on_rank, True, True), blocking):
        assert all(torch.equal(p, q) for p, q in zip(result["params"], expected["params"]))


def three_steps(rank: int, overlap: bool) -> tuple:
    model, _ = build()
    ddp = DistributedDataParallel(model)
    opt = ShardedRMSprop(model.parameters(), **OURS)
    if overlap:
        opt.overlap_param_sync(ddp)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    # torch.func.functional_call's modules hold other tensors: waits still follow the
    # optimizer's parameters
    torch.func.functional_call(model, frozen, (tokens(0, rank),))
    losses = []
    for step in range(3):
        opt.zero_grad()
        loss = ddp(tokens(step, rank)).square().mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    return model, ddp, opt, losses


def lifecycle_on_rank(rank: int, world_size: int) -> dict:
    seen = {}
    with collectives_that_land_when_waited_for():
        seen["blocking losses"] = three_steps(rank, False)[-1]
        model, ddp, opt, seen["losses"] = three_steps(rank, True)
        model.eval()  # torch's fast paths read children's weights: everything is waited for
        with torch.no_grad():
            out = model(tokens(9, rank))
        seen["eval waits for all"] = not opt.sharding.sync.pending and not out.isnan().any()
        model.train()
        overlapped_step(rank, ddp, opt, 3)
        # a new optimizer over parameters still syncing waits for them first
        rebuilt = ShardedRMSprop(model.parameters(), **OURS)
        seen["rebuilt over synced values"] = not has_nan(model)
        gone = weakref.ref(opt)
        del opt
        gc.collect()
        seen["the old optimizer is freed"] = gone() is None
        rebuilt.overlap_param_sync(ddp)  # (the old hooks stay, waiting for nothing)
        overlapped_step(rank, ddp, rebuilt, 4)
        rebuilt.wait_for_params()
        seen["trains on"] = not has_nan(model)
    return seen


def test_functional_call_eval_and_a_rebuilt_optimizer() -> None:
    for seen in run_ranks(2, lifecycle_on_rank):
        assert seen.pop("losses") == seen.pop("blocking losses")
        assert seen == {
            "eval waits for all": True,
            "rebuilt over synced values": True,
            "the old optimizer is freed": True,
            "trains on": True,
        }
