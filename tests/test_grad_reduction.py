"""Gradients reduce-scattered into the shards (``reduce_scatter_gradients``) against DDP's
all-reduce, with the same optimizer on the same data.

Each rank feeds different data to two copies of a model: one whose DDP reduce-scatters into
a ShardedRMSprop (the mode under test), one whose DDP all-reduces for another (ZeRO-1, the
default). At 2 ranks the parameters, the state and the owned gradient elements must be bit
for bit the same (a sum of two is the same in any order); at 3 and 4 ranks the sums are
added in another order, so they agree within float32 rounding.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.distributed as dist
from spawn import run_ranks
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from sharded_rmsprop import ShardedRMSprop

OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)


def model_of(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    # 3 + 97 + ... elements: parameters straddle the shard boundaries at every world size
    return nn.Sequential(
        nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 97), nn.Tanh(), nn.Linear(97, 3)
    ).to(dtype)


def batch(rank: int, step: int, micro: int, dtype: torch.dtype, inf: bool = False) -> torch.Tensor:
    seed = 1000 * step + 10 * rank + micro
    data = torch.randn(5, 7, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return data.index_fill_(0, torch.tensor([0]), math.inf) if inf else data


def pair(dtype: torch.dtype, bucket_cap_mb: float, **options):
    """(DDP reduce-scattering into its optimizer, DDP all-reducing for its own)."""
    model = model_of(dtype)
    twin = copy.deepcopy(model)
    ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
    ddp_twin = DistributedDataParallel(twin, bucket_cap_mb=bucket_cap_mb)
    opt = ShardedRMSprop(model.parameters(), **options)
    opt.reduce_scatter_gradients(ddp)
    twin_opt = ShardedRMSprop(twin.parameters(), **options)
    return ddp, opt, ddp_twin, twin_opt


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit the same values, NaNs where the other has NaNs."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def owned_grads(opt: ShardedRMSprop) -> list[torch.Tensor]:
    return [grad.clone() for grad in opt.sharding.owned_grads()]


def backward(ddp, rank: int, step: int, micros: int, dtype, scaler=None, inf=False) -> None:
    """``micros`` micro-batches, all but the last under no_sync(); ``inf`` in the first."""
    for micro in range(micros):
        with ddp.no_sync() if micro < micros - 1 else contextlib.nullcontext():
            loss = ddp(batch(rank, step, micro, dtype, inf and micro == 0)).square().mean()
            (loss if scaler is None else scaler.scale(loss)).backward()


POISON_STEP: list[int] = []  # the step under way, for ``poisoned``


def poisoned(grad: torch.Tensor, at: int, rank: int, world_size: int) -> torch.Tensor:
    if rank != world_size - 1 or POISON_STEP != [2]:
        return grad
    return grad.flatten().index_fill(0, torch.tensor([at]), math.inf).view_as(grad)


def parity_on_rank(rank: int, world_size: int, case: str) -> dict:
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    options = dict(OPTIONS, fused=False)
    if case == "skip":
        options["skip_nonfinite"] = True
    if case == "fused, host-shared":
        options.update(fused=None, host_shared=True)
    ddp, opt, ddp_twin, twin_opt = pair(dtype, bucket_cap_mb=0.001, bucket_numel=700, **options)
    assert opt.shares_host_memory == options.get("host_shared", False)
    scaler = twin_scaler = None
    if case.startswith("scaler") or case == "unscale_ and clip":
        scaler, twin_scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2))
    if case == "scaler, inf in one rank's own range":
        # At step 2 the last rank's own gradient gets an inf in an element that rank owns:
        # only its average holds one, yet every rank's GradScaler must find it, skip the step
        # and halve its scale, as with DDP's all-reduce
        piece = opt.sharding.buckets[-1].pieces[-1]
        index, at = piece.slot.index, piece.param_start
        for model in (ddp.module, ddp_twin.module):
            param = list(model.parameters())[index]
            param.register_hook(lambda grad, at=at: poisoned(grad, at, rank, world_size))
    found = {"owned": [], "local": [], "norms": [], "skipped": 0}
    for step in range(4):
        POISON_STEP[:] = [step]
        for model, optimizer, sc in ((ddp, opt, scaler), (ddp_twin, twin_opt, twin_scaler)):
            optimizer.zero_grad()
            # in the skip case, an inf in one rank's data at step 2: both skip on every rank
            inf = case == "skip" and step == 2 and rank == world_size - 1
            micros = 2 if case != "bf16" else 1
            backward(model, rank, step, micros, dtype, scaler=sc, inf=inf)
        found["owned"].append(all(map(identical, owned_grads(opt), owned_grads(twin_opt))))
        if case == "unscale_ and clip":  # p.grad changed in place, alike on every rank
            scaler.unscale_(opt)
            twin_scaler.unscale_(twin_opt)
        norms = [o.clip_grad_norm_(0.05) for o in (opt, twin_opt)]
        found["norms"].append(identical(*norms))
        if scaler is not None:
            for sc, o in ((scaler, opt), (twin_scaler, twin_opt)):
                sc.step(o)
                sc.update()
            found["scales"] = (scaler.get_scale(), twin_scaler.get_scale())
        else:
            opt.step()
            twin_opt.step()
    found["skipped"] = (opt.skipped_steps, twin_opt.skipped_steps)
    found["params"] = [p.detach().clone() for p in ddp.module.parameters()]
    found["twin_params"] = [p.detach().clone() for p in ddp_twin.module.parameters()]
    found["state"] = opt.full_state_dict(to=None)
    found["twin_state"] = twin_opt.full_state_dict(to=None)
    return found


def same_state(ours: dict, theirs: dict) -> bool:
    return all(
        torch.equal(ours["state"][index][key], value)
        for index, entry in theirs["state"].items()
        for key, value in entry.items()
    )


CASES = (
    "fp32",
    "bf16",
    "scaler",
    "scaler, inf in one rank's own range",
    "unscale_ and clip",
    "skip",
    "fused, host-shared",
)


def parities_on_rank(rank: int, world_size: int) -> dict[str, dict]:
    return {case: parity_on_rank(rank, world_size, case) for case in CASES}


def test_bit_for_bit_the_all_reduce_at_two_ranks() -> None:
    for rank, by_case in enumerate(run_ranks(2, parities_on_rank)):
        for case, found in by_case.items():
            where = f"rank {rank}, {case}"
            assert all(found["owned"]), f"{where}: owned gradient elements differ"
            assert all(found["norms"]), f"{where}: clip_grad_norm_ differs"
            for ours, theirs in zip(found["params"], found["twin_params"]):
                assert torch.equal(ours, theirs), f"{where}: parameters differ"
            assert same_state(found["state"], found["twin_state"]), f"{where}: state differs"
            skips = case in ("skip", "scaler, inf in one rank's own range")
            assert found["skipped"] == ((1, 1) if skips else (0, 0)), where
            if "scales" in found:
                assert found["scales"][0] == found["scales"][1], where


class WithUnused(nn.Module):
    """A model whose first parameters get no gradient (DDP leaves their p.grad None)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.unused = nn.Linear(5, 5)
        self.body = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def unused_on_rank(rank: int, world_size: int) -> list[tuple[float, float]]:
    model = WithUnused()
    twin = copy.deepcopy(model)
    ddp, ddp_twin = (DistributedDataParallel(m, find_unused_parameters=True) for m in (model, twin))
    opt = ShardedRMSprop(model.parameters(), fused=False, **OPTIONS)
    opt.reduce_scatter_gradients(ddp)
    twin_opt = ShardedRMSprop(twin.parameters(), fused=False, **OPTIONS)
    piece = opt.sharding.buckets[-1].pieces[-1]  # the last rank's: an inf in its own range
    for m in (model, twin):
        param = list(m.parameters())[piece.slot.index]
        param.register_hook(lambda g, at=piece.param_start: poisoned(g, at, rank, world_size))
    scaler, twin_scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2))
    scales = []
    for step in range(4):
        POISON_STEP[:] = [step]
        for wrapped, optimizer, sc in ((ddp, opt, scaler), (ddp_twin, twin_opt, twin_scaler)):
            optimizer.zero_grad()
            sc.scale(wrapped(batch(rank, step, 0, torch.float32)).square().mean()).backward()
            sc.step(optimizer)
            sc.update()
        scales.append((scaler.get_scale(), twin_scaler.get_scale()))
    return scales


def test_every_gradient_carries_the_mark_of_an_inf_elsewhere() -> None:
    """The inf of step 2 is in the last rank's own range; the mark that lets the other ranks'
    GradScalers see it must not sit in a gradient DDP leaves out (an unused parameter)."""
    for scales in run_ranks(2, unused_on_rank):
        assert scales == [(1024.0, 1024.0), (1024.0, 1024.0), (512.0, 512.0), (512.0, 512.0)]


def tolerance_on_rank(rank: int, world_size: int) -> dict:
    ddp, opt, ddp_twin, twin_opt = pair(torch.float32, bucket_cap_mb=0.001, **OPTIONS)
    local_elsewhere, within_rounding = True, True
    for step in range(3):
        for model, optimizer in ((ddp, opt), (ddp_twin, twin_opt)):
            optimizer.zero_grad()
            backward(model, rank, step, micros=2, dtype=torch.float32)
        # outside the owned elements p.grad is this rank's own gradient: compute it alone
        local = copy.deepcopy(ddp.module)
        for micro in range(2):
            local(batch(rank, step, micro, torch.float32)).square().mean().backward()
        owned = torch.zeros(sum(p.numel() for p in local.parameters()), dtype=torch.bool)
        starts = [0]
        for p in local.parameters():
            starts.append(starts[-1] + p.numel())
        for bucket in opt.sharding.buckets:
            for piece in bucket.pieces:
                start = starts[piece.slot.index] + piece.param_start
                owned[start : start + piece.numel] = True
        ours = torch.cat([p.grad.reshape(-1) for p in ddp.module.parameters()])
        theirs = torch.cat([p.grad.reshape(-1) for p in local.parameters()])
        local_elsewhere &= torch.equal(ours[~owned], theirs[~owned])
        # In the owned elements both hold the sum of the same N terms (each rank's gradient
        # divided by N, rounded alike), added in another order: N - 1 float32 additions
        # each, so they differ by at most 2 (N - 1) units of rounding of the terms' sum of
        # magnitudes. (A bound on the parameters would not hold: where the ranks' gradients
        # nearly cancel, RMSprop's division by sqrt(square_avg) magnifies any rounding.)
        magnitudes = theirs.abs() / world_size
        dist.all_reduce(magnitudes)
        averaged = torch.cat([p.grad.reshape(-1) for p in ddp_twin.module.parameters()])
        bound = 2 * (world_size - 1) * 2.0**-24 * magnitudes[owned]
        within_rounding &= bool(((ours[owned] - averaged[owned]).abs() <= bound).all())
        # given the same gradients, the steps are bit for bit the same
        for mine, twins in zip(opt.sharding.owned_grads(), twin_opt.sharding.owned_grads()):
            twins.copy_(mine)
        opt.step()
        twin_opt.step()
    # memory(): the buffers the reduction keeps, on gloo with the other ranks' chunks
    plans = [bucket.plan for bucket in opt.sharding.buckets]
    kept = sum((p.padded_numel + world_size * p.shard_numel) * 4 for p in plans)
    return {
        "kept": (opt.memory_bytes()["grad_reduction"], kept),
        "local_elsewhere": local_elsewhere,
        "within_rounding": within_rounding,
        "params": [p.detach().clone() for p in ddp.module.parameters()],
        "twin_params": [p.detach().clone() for p in ddp_twin.module.parameters()],
    }


@pytest.mark.parametrize("world_size", [3, 4])
def test_within_float32_rounding_at_three_and_four_ranks(world_size: int) -> None:
    for found in run_ranks(world_size, tolerance_on_rank):
        assert found["local_elsewhere"]
        assert found["within_rounding"]
        assert found["kept"][0] == found["kept"][1]
        for ours, theirs in zip(found["params"], found["twin_params"]):
            assert torch.equal(ours, theirs)


def snapshot(opt: ShardedRMSprop, model: nn.Module) -> list[torch.Tensor]:
    state = [t.clone() for entry in opt.state.values() for t in entry.values()]
    return [p.detach().clone() for p in model.parameters()] + state


def unchanged(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return len(before) == len(after) and all(map(torch.equal, before, after))


def misuse_on_rank(rank: int, world_size: int, case: str) -> str:
    """The error ``case`` raises on this rank (with nothing changed), or "" if none."""
    model = model_of()
    ddp = DistributedDataParallel(model)
    opt = ShardedRMSprop(model.parameters(), **OPTIONS)
    opt.reduce_scatter_gradients(ddp)
    ddp(batch(rank, 0, 0, torch.float32)).sum().backward()
    opt.step()  # state exists: "unchanged" compares it too
    opt.zero_grad()
    if case == "second synchronised backward":
        for micro in range(2):
            ddp(batch(rank, 1, micro, torch.float32)).sum().backward()
    elif case == "no_sync only":
        with ddp.no_sync():
            ddp(batch(rank, 1, 0, torch.float32)).sum().backward()
    elif case == "gradient set by hand on one rank":
        ddp(batch(rank, 1, 0, torch.float32)).sum().backward()
        if rank == 1:
            model[0].weight.grad = torch.ones_like(model[0].weight)
    elif case == "model.zero_grad() between":  # allowed: new gradients, reduced once
        ddp(batch(rank, 1, 0, torch.float32)).sum().backward()
        model.zero_grad()
        ddp(batch(rank, 1, 1, torch.float32)).sum().backward()
    else:
        ddp(batch(rank, 1, 0, torch.float32)).sum().backward()
        grads = [p.grad for p in model.parameters()]
        if case == "torch.nn.utils.clip_grad_norm_":  # each rank's own norm: own factor
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        elif case == "torch.nn.utils.clip_grad_norm_ that clips nothing":  # factor 1, yet
            # the average's norm may be over the threshold: refused all the same
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        elif case == "torch.nn.utils.clip_grad_value_":
            torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
        elif case == "halved on every rank" or case == "halved on one rank" and rank == 0:
            torch._foreach_mul_(grads, 0.5)
        elif case == "p.grad.zero_() instead of zero_grad()":  # the same tensors, reduced again
            for grad in grads:
                grad.zero_()
            ddp(batch(rank, 1, 1, torch.float32)).sum().backward()
    before = snapshot(opt, model)
    try:
        opt.clip_grad_norm_(1.0) if case.endswith("clip") else opt.step()
    except RuntimeError as error:
        assert unchanged(before, snapshot(opt, model))
        opt.zero_grad()  # and the optimizer goes on as before
        ddp(batch(rank, 2, 0, torch.float32)).sum().backward()
        opt.step()
        return str(error)
    return ""


MISUSES = {  # what each case raises on every rank at the next step(), "" for nothing
    "second synchronised backward": "reduced twice without a reset",
    "no_sync only": "was not reduced by DDP since it was last reset",
    "gradient set by hand on one rank": "was not reduced by DDP",
    "model.zero_grad() between": "",
    "torch.nn.utils.clip_grad_norm_": "was changed in place after DDP reduce-scattered it",
    "torch.nn.utils.clip_grad_norm_ that clips nothing": "was changed in place after DDP",
    "torch.nn.utils.clip_grad_value_": "was changed in place after DDP reduce-scattered it",
    "halved on every rank": "was changed in place after DDP reduce-scattered it",
    "halved on one rank": "was changed in place after DDP reduce-scattered it",
    "p.grad.zero_() instead of zero_grad()": "reduced twice without a reset",
}


def misuses_on_rank(rank: int, world_size: int) -> dict[str, str]:
    return {case: misuse_on_rank(rank, world_size, case) for case in MISUSES}


def test_gradients_that_were_not_reduced_once_are_refused() -> None:
    for messages in run_ranks(2, misuses_on_rank):
        for case, error in MISUSES.items():
            message = messages[case]
            assert error in message if error else message == "", (case, message)


def registration_on_rank(rank: int, world_size: int, case: str) -> str:
    """The error registering for ``case`` raises on this rank, "" if none; then the
    optimizer must still train with DDP's all-reduce."""
    model = model_of(torch.complex64 if case == "complex parameters" else torch.float32)
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=case == "bucket views")
    params = model[0].parameters() if case == "a parameter DDP holds is missing" else None
    group = None
    if case == "another process group":
        group = dist.new_group([rank], use_local_synchronization=True)
    opt = ShardedRMSprop(params or model.parameters(), process_group=group, **OPTIONS)
    if case == "DDP has a hook already on one rank" and rank == 0:
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    target = (
        ddp.module
        if case == "the module, not DDP" or (case == "one rank passes the module" and rank == 1)
        else ddp
    )
    error = ""
    try:
        opt.reduce_scatter_gradients(target)
        if case == "twice":
            opt.reduce_scatter_gradients(ddp)
    except (TypeError, ValueError, RuntimeError) as raised:
        error = f"{type(raised).__name__}: {raised}"
    if case != "twice":
        assert opt.sharding.grad_reduction is None
        dtype = next(model.parameters()).dtype
        ddp(batch(rank, 0, 0, torch.float32).to(dtype)).abs().sum().backward()
        opt.step()
    return error


REGISTRATIONS = {
    "the module, not DDP": "TypeError: reduce_scatter_gradients() takes the DistributedDataParallel",
    "one rank passes the module": "TypeError",
    "bucket views": "ValueError: reduce_scatter_gradients() needs DDP(..., gradient_as_bucket_view=False)",
    "a parameter DDP holds is missing": "are not in this optimizer",
    "twice": "ValueError: reduce_scatter_gradients() was called already",
    "DDP has a hook already on one rank": "can only be called once",
    "another process group": "the DDP model averages over ranks [0, 1], the optimizer shards over",
    "complex parameters": "ValueError: reduce_scatter_gradients() does not take complex parameters",
}


def registrations_on_rank(rank: int, world_size: int) -> dict[str, str]:
    return {case: registration_on_rank(rank, world_size, case) for case in REGISTRATIONS}


def test_what_cannot_be_reduce_scattered_is_refused_on_every_rank() -> None:
    for messages in run_ranks(2, registrations_on_rank):
        for case, error in REGISTRATIONS.items():
            assert error in messages[case], (case, messages[case])


def join_on_rank(rank: int, world_size: int) -> str:
    from torch.distributed.algorithms.join import Join

    model = model_of()
    ddp = DistributedDataParallel(model)
    opt = ShardedRMSprop(model.parameters(), **OPTIONS)
    opt.reduce_scatter_gradients(ddp)
    try:
        with Join([ddp, opt]):
            for step in range(2 - rank):  # rank 1 runs out of data first
                opt.zero_grad()
                ddp(batch(rank, step, 0, torch.float32)).sum().backward()
                opt.step()
    except RuntimeError as error:
        return str(error)
    return ""


def test_join_is_refused_on_every_rank_without_a_hang() -> None:
    for message in run_ranks(2, join_on_rank, timeout=120):
        assert "ran out of data under Join, but the gradients are reduce-scattered" in message


class Wire:
    """Bytes of floating-point data this rank receives through the collectives it calls, as
    the bandwidth-optimal algorithms move them: ``2 (N-1)/N`` of the buffer for an all-reduce,
    ``(N-1)/N`` for a reduce-scatter's input or an all-gather's output, the whole tensor for a
    broadcast from another rank or a receive. Integer values (the ranks' agreements) are
    left out."""

    NAMES = ("broadcast", "irecv", "all_reduce", "all_gather_single", "reduce_scatter_single")

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.received = 0.0
        for name in self.NAMES:
            original = getattr(dist, name)
            setattr(dist, name, self._counting(name, original))

    def _counting(self, name, original):
        share = (self.world_size - 1) / self.world_size

        def counted(*args, **kwargs):
            tensor = args[0]
            if tensor.is_floating_point():
                size = tensor.numel() * tensor.element_size()
                if name == "broadcast":
                    src = args[1] if len(args) > 1 else kwargs["src"]
                    size *= src != dist.get_rank()
                elif name == "all_reduce":
                    size *= 2 * share
                elif name == "all_gather_single":
                    size *= share
                elif name == "reduce_scatter_single":
                    size = args[1].numel() * args[1].element_size() * share
                self.received += size
            return original(*args, **kwargs)

        return counted


def wire_on_rank(rank: int, world_size: int) -> dict[str, float]:
    wire = Wire(world_size)
    per_step = {}
    for mode in ("reduce-scatter", "all-reduce"):
        torch.manual_seed(0)  # 1024 + 2048 float32 elements: no padding at 2 or 4 ranks
        model = nn.Sequential(nn.Linear(16, 64, bias=False), nn.Linear(64, 32, bias=False))
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.004)
        opt = ShardedRMSprop(model.parameters(), **OPTIONS)
        if mode == "reduce-scatter":
            opt.reduce_scatter_gradients(ddp)
        else:
            # DDP's all-reduce, through torch.distributed.all_reduce, where Wire sees it
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        for step in range(5):
            if step == 2:  # (after DDP's first iteration, which rebuilds its buckets)
                wire.received = 0.0
            opt.zero_grad()
            ddp(torch.randn(4, 16)).sum().backward()
            opt.step()
        per_step[mode] = wire.received / 3
    return per_step


@pytest.mark.parametrize("world_size", [2, 4])
def test_bytes_on_the_wire(world_size: int) -> None:
    param_bytes = 3072 * 4
    share = (world_size - 1) / world_size
    for per_step in run_ranks(world_size, wire_on_rank):
        assert per_step["reduce-scatter"] == pytest.approx(2 * share * param_bytes)
        assert per_step["all-reduce"] == pytest.approx(3 * share * param_bytes)
