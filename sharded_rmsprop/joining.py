"""Uneven inputs under ``torch.distributed.algorithms.join.Join``: ranks out of data follow.

With ``Join([ddp_model, optimizer])``, a rank that has no batches left runs each joinable's
join hook once per iteration that the others still run. DDP's hook matches their gradient
all-reduces with zeros, and leaves the rank's own ``.grad`` as it was. This optimizer's hook
makes the rank *follow*: it takes part in the others' agreements without a say (so it learns
which method they call), and it still updates the shard it owns exactly as the others would
have. The lowest-ranked leading rank sends it what that takes: every param group's options
(a follower's LR scheduler no longer steps), the clip coefficient and loss scale, which
parameters have a gradient, and the gradients of the elements it owns; and for
``clip_grad_norm_()`` that leading rank adds the follower's part of the norm. The follower
then takes part in the skip decision and the parameter sync, so every rank's copy of the
parameters stays the same, and its shard goes on as if it had had the data. (torch's
ZeroRedundancyOptimizer leaves a joined rank's update to its own ``.grad``.)

As with torch's ZeRO, the others must call ``step()`` once per iteration (and may call
``clip_grad_norm_()`` before it); a loop that accumulates gradients over several iterations
between steps cannot be followed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.join import JoinHook

from . import gradients
from .agreement import cannot_follow, digest_of, follow
from .gradients import PendingClip
from .memory_order import in_order
from .options import OPTION_KEYS
from .windows import pack

if TYPE_CHECKING:
    from .comm import DataParallelGroup
    from .shards import ShardedBucket
    from .gradients import ScalerRequest
    from .sharding import ShardedOptimizer

__all__ = [
    "FollowHook",
    "LeaderGradients",
    "check_followable",
    "check_joinable",
    "Record",
    "followers_grads",
    "leader_of",
    "leads",
    "receiver",
    "send_gradients",
    "send_clip_request",
    "send_records",
]

_STEP, _CLIP = digest_of("step()"), digest_of("clip_grad_norm_()")

#: The kinds of an option's value, by the code a Record carries.
_KINDS = (float, int, bool, Tensor)


def _kind_of(value: object) -> int:
    for index, kind in enumerate(_KINDS[::-1]):  # bool before int: a bool is an int
        if isinstance(value, kind):
            return len(_KINDS) - 1 - index
    return _KINDS.index(float)  # any other number


#: The dtypes of a gradient factor, by the code a Record carries (0: no factor).
_DTYPES = (None, torch.float32, torch.float64)


class FollowHook(JoinHook):
    """The join hook of a ShardedRMSprop: once per iteration of the others, follow them;
    ``step_on(gradients)`` runs the optimizer's step phases on a follower's gradients."""

    def __init__(self, opt: ShardedOptimizer, step_on: Callable[[LeaderGradients], None]) -> None:
        check_joinable(opt)
        self.opt = opt
        self.step_on = step_on

    def main_hook(self) -> None:
        data_parallel = self.opt.sharding.data_parallel
        while True:  # the others' clip_grad_norm_() calls, then their step()
            operation, followers = follow(data_parallel)
            leader = dist.get_global_rank(
                data_parallel.host_group, leader_of(followers, data_parallel.world_size)
            )
            if operation in (_CLIP, _STEP):
                check_followable(self.opt, followers)
            if operation == _CLIP:
                _follow_clip(self.opt, leader)
            elif operation == _STEP:
                record = Record.receive(self.opt, leader)
                record.apply_options(self.opt)
                self.step_on(LeaderGradients(self.opt, record, leader))
                return
            else:  # the others raise too (agree)
                raise cannot_follow(followers, None)


def check_joinable(opt: ShardedOptimizer) -> None:
    """``RuntimeError`` if the optimizer cannot follow under Join: not with
    ``overlap_param_sync()``, since DDP's join hook reads and writes the parameters when the
    last rank joins, with no forward to wait for their sync."""
    if opt.sharding.overlapping:
        raise RuntimeError(
            "Join with overlap_param_sync(): DDP's join hook syncs the parameters when the "
            "last rank joins, which may be while the optimizer's sync is in flight; call "
            "remove() on what overlap_param_sync() returned to use Join"
        )


class LeaderGradients:
    """A follower's gradients (a :class:`~sharded_rmsprop.grad_sources.GradSource`): those
    of the elements it owns as its ``leader`` (a global rank) sends them, window by window,
    with the leaders' clip and loss scale (``record``). It adopts nothing and has no say in
    the skip decision."""

    scan = None

    def __init__(self, opt: ShardedOptimizer, record: Record, leader: int) -> None:
        self.record = record
        self.scaled = record.scaled
        self.receive = receiver(opt, leader)

    def has_grad(self, bucket: ShardedBucket, position: int) -> bool:
        return self.record.has_grad[bucket.plan.slots[position].index]

    def grad_scale(self, device: torch.device) -> Tensor | None:
        return self.record.grad_scale(device)

    def nonfinite_on_some_rank(
        self, data_parallel: DataParallelGroup, device: torch.device, read_grads: bool
    ) -> bool:
        return gradients.nonfinite_on_some_rank(
            data_parallel, device, scaler=None, grads=None, following=True
        )

    def before_update(self) -> None:
        pass


def check_followable(opt: ShardedOptimizer, followers: tuple[int, ...]) -> None:
    """``RuntimeError``, on the followers and the others alike, if ``followers`` cannot be
    followed: with reduce-scattered gradients no rank holds the averages a follower owns."""
    if followers and opt.sharding.grad_reduction is not None:
        raise RuntimeError(
            f"ShardedRMSprop: rank(s) {', '.join(map(str, followers))} ran out of data under "
            "Join, but the gradients are reduce-scattered (reduce_scatter_gradients()): each "
            "rank holds the averaged gradient of the elements it owns only, so no rank can "
            "give a follower its own. Nothing was changed on any rank. Under Join, let DDP "
            "all-reduce the gradients."
        )


def leader_of(followers: tuple[int, ...], world_size: int) -> int:
    """The rank (in the group) that leads the followers: the lowest that still has data."""
    return next(rank for rank in range(world_size) if rank not in followers)


def leads(opt: ShardedOptimizer, followers: tuple[int, ...]) -> bool:
    """Whether this rank leads ``followers`` (there are some, and it is their leader)."""
    return bool(followers) and opt.sharding.data_parallel.rank == leader_of(
        followers, opt.sharding.data_parallel.world_size
    )


def send_records(
    opt: ShardedOptimizer,
    followers: tuple[int, ...],
    clip: PendingClip | None,
    scaler: ScalerRequest | None,
) -> None:
    """The leader sends each follower its step's :class:`Record`."""
    values = Record.of(opt, clip, scaler).to_tensor()
    for follower in followers:
        dist.send(
            values, _global(opt, follower, host=True), group=opt.sharding.data_parallel.host_group
        )


def send_gradients(opt: ShardedOptimizer, followers: tuple[int, ...]) -> None:
    """The leader sends each follower the gradients of the elements it owns, window by
    window, as the follower's update stages them."""
    for follower in followers:
        for bucket in opt.sharding.buckets:
            has_grad = lambda position, b=bucket: b.params[position].grad is not None  # noqa: E731
            for window in bucket.windows_of(follower):
                parts, _ = window.present(has_grad)
                if parts:
                    pack(parts, bucket.params)
                    window_values = bucket.grad_window[: window.length]
                    dist.send(
                        window_values,
                        _global(opt, follower),
                        group=opt.sharding.data_parallel.group,
                    )


def followers_grads(opt: ShardedOptimizer, followers: tuple[int, ...]) -> list[Tensor]:
    """For their leader: the slices of its gradients that the followers own (their part of
    a gradient norm)."""
    owned = []
    for follower in followers:
        for bucket in opt.sharding.buckets:
            for piece in bucket.plan.pieces(follower):
                grad = bucket.params[bucket.position_of(piece)].grad
                if grad is not None:
                    flat = in_order(grad, piece.slot.order)
                    owned.append(flat[piece.param_start : piece.param_end])
    return owned


def send_clip_request(
    opt: ShardedOptimizer,
    followers: tuple[int, ...],
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
) -> None:
    """The leader tells the followers the arguments of its ``clip_grad_norm_()``."""
    message = torch.tensor([max_norm, norm_type, float(error_if_nonfinite)], dtype=torch.float64)
    for follower in followers:
        dist.send(
            message, _global(opt, follower, host=True), group=opt.sharding.data_parallel.host_group
        )


def _follow_clip(opt: ShardedOptimizer, leader: int) -> None:
    """clip_grad_norm_() on a follower: the identity of the norm's reduction (the leader
    adds the follower's part), then the leaders' check of the norm, so that a non-finite one
    with ``error_if_nonfinite`` raises here too; the clip itself reaches the follower in the
    step's record."""
    message = torch.zeros(3, dtype=torch.float64)
    dist.recv(message, leader, group=opt.sharding.data_parallel.host_group)
    max_norm, norm_type, error_if_nonfinite = message.tolist()
    sharding = opt.sharding
    dtype = gradients.norm_dtype(sharding.dtypes)
    total = gradients.global_norm(
        [], norm_type, sharding.data_parallel, sharding.home_device, dtype
    )
    PendingClip.after(None, total, max_norm, norm_type, bool(error_if_nonfinite))


@dataclass(frozen=True)
class Record:
    """What a follower's step needs from its leader."""

    options: list[float]  # every group's OPTION_KEYS, in order
    kinds: list[int]  # what each option is: an index into _KINDS
    scale: float  # what the update multiplies the gradients by (clip, unscaling)
    scale_dtype: int  # that factor's: 0 none, 1 float32, 2 float64
    scaled: bool  # whether a GradScaler steps
    has_grad: list[bool]  # by parameter index

    @classmethod
    def of(
        cls, opt: ShardedOptimizer, clip: PendingClip | None, scaler: ScalerRequest | None
    ) -> Record:
        scale = gradients.combined_scale(opt.sharding.home_device, clip, scaler)
        values = [group[key] for group in opt.param_groups for key in OPTION_KEYS]
        return cls(
            options=[float(value) for value in values],
            kinds=[_kind_of(value) for value in values],
            scale=0.0 if scale is None else float(scale),
            scale_dtype=0 if scale is None else _DTYPES.index(scale.dtype),
            scaled=scaler is not None,
            has_grad=[p.grad is not None for group in opt.param_groups for p in group["params"]],
        )

    def to_tensor(self) -> Tensor:
        scalars = [self.scale, float(self.scale_dtype), float(self.scaled)]
        values = [*self.options, *map(float, self.kinds), *scalars, *map(float, self.has_grad)]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def receive(cls, opt: ShardedOptimizer, leader: int) -> Record:
        options = len(opt.param_groups) * len(OPTION_KEYS)
        count = sum(len(group["params"]) for group in opt.param_groups)
        values = torch.zeros(2 * options + 3 + count, dtype=torch.float64)
        dist.recv(values, leader, group=opt.sharding.data_parallel.host_group)
        values = values.tolist()
        kinds = [int(kind) for kind in values[options : 2 * options]]
        scale, scale_dtype, scaled = values[2 * options : 2 * options + 3]
        has_grad = [value > 0 for value in values[2 * options + 3 :]]
        return cls(values[:options], kinds, scale, int(scale_dtype), scaled > 0, has_grad)

    def apply_options(self, opt: ShardedOptimizer) -> None:
        """The leaders' options, into the follower's param groups, each of the kind the
        leaders' is (an int stays an int: the ranks compare their options)."""
        values = zip(self.options, self.kinds)
        for group in opt.param_groups:
            for key in OPTION_KEYS:
                value, kind = next(values)
                if _KINDS[kind] is not Tensor:
                    group[key] = _KINDS[kind](value)
                elif isinstance(group[key], Tensor):
                    group[key].fill_(value)
                else:
                    group[key] = torch.tensor(value)

    def grad_scale(self, device: torch.device) -> Tensor | None:
        """The leaders' gradient factor, the same bits on ``device``."""
        if not self.scale_dtype:
            return None
        return torch.full((), self.scale, dtype=_DTYPES[self.scale_dtype], device=device)


def receiver(opt: ShardedOptimizer, leader: int) -> Callable[[Tensor], None]:
    """For a follower's update: fill a gradient window with what ``leader`` (a global rank)
    sends for it."""
    return lambda window: dist.recv(window, leader, group=opt.sharding.data_parallel.group)


def _global(opt: ShardedOptimizer, rank: int, host: bool = False) -> int:
    group = opt.sharding.data_parallel.host_group if host else opt.sharding.data_parallel.group
    return dist.get_global_rank(group, rank)
