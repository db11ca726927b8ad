"""Where a step's gradients come from: the one difference between a rank with data and a rank
that ran out of it under Join.

``ShardedRMSprop`` writes the phases of a step once (agree → skip? → adopt → update and sync)
and runs them on a :class:`GradSource`. A rank with data runs them on its own ``p.grad``
(:class:`OwnGradients`, made by :func:`agree_on_step`, the agreement phase). A rank that
follows the others under Join runs them on what its leader sends
(:class:`~sharded_rmsprop.joining.LeaderGradients`): the leader's options, clip and loss scale,
and the gradients of the elements it owns. Nothing else in the step tells the two apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import Tensor

from . import gradients, joining
from .agreement import Agreement
from .arguments import check_grad, check_numeric_options
from .facts import ParameterScan, step_facts
from .grad_reduction import check_reduced_grads
from .gradients import PendingClip, ScalerRequest

if TYPE_CHECKING:
    from .comm import DataParallelGroup
    from .shards import ShardedBucket
    from .sharding import ShardedOptimizer

__all__ = ["GradSource", "OwnGradients", "agree_on_step"]


class GradSource(Protocol):
    """A step's gradients, once the ranks agreed on the step."""

    #: The replaced parameters to adopt (None: none).
    scan: ParameterScan | None
    #: Whether a GradScaler steps (its finding of infs counts for the skip decision).
    scaled: bool
    #: Whether the parameter at a bucket position has a gradient; None: its ``.grad``.
    has_grad: Callable[[ShardedBucket, int], bool] | None
    #: Fills a gradient window with the gradients (None: the update reads ``p.grad``).
    receive: Callable[[Tensor], None] | None

    def grad_scale(self, device: torch.device) -> Tensor | None:
        """What the update multiplies the gradients by on ``device`` (clip, unscaling)."""

    def nonfinite_on_some_rank(
        self, data_parallel: DataParallelGroup, device: torch.device, read_grads: bool
    ) -> bool:
        """Whether some rank has inf or NaN gradients (collective); ``read_grads``: each
        rank reads all of its gradients for them (``skip_nonfinite``)."""

    def before_update(self) -> None:
        """Once every rank passed :meth:`ShardSync.before_update`, before the update."""


class OwnGradients:
    """The gradients in this rank's ``p.grad``, with a pending clip and a GradScaler's
    request; this rank leads ``followers`` under Join where it is the lowest with data."""

    has_grad = None
    receive = None

    def __init__(
        self,
        opt: ShardedOptimizer,
        scan: ParameterScan,
        clip: PendingClip | None,
        scaler: ScalerRequest | None,
        followers: tuple[int, ...],
    ) -> None:
        self.opt = opt
        self.scan = scan
        self.clip = clip
        self.scaler = scaler
        self.scaled = scaler is not None
        self.followers = followers
        self.leading = joining.leads(opt, followers)

    def grad_scale(self, device: torch.device) -> Tensor | None:
        return gradients.combined_scale(device, self.clip, self.scaler)

    def nonfinite_on_some_rank(
        self, data_parallel: DataParallelGroup, device: torch.device, read_grads: bool
    ) -> bool:
        grads = None
        if read_grads:
            groups = self.opt.param_groups
            grads = [p.grad for group in groups for p in group["params"] if p.grad is not None]
        try:
            return gradients.nonfinite_on_some_rank(
                data_parallel, device, scaler=self.scaler, grads=grads
            )
        except Exception:
            ScalerRequest.forget(self.opt)  # or the scaler multiplies its next scale by this one
            raise

    def before_update(self) -> None:
        if self.leading:  # (after the barrier, which the followers reach before they receive)
            joining.send_gradients(self.opt, self.followers)


def agree_on_step(opt: ShardedOptimizer, clip: PendingClip | None) -> OwnGradients:
    """The agreement phase of a step on this rank's gradients: check them, the parameters and
    what a GradScaler set, then agree with the other ranks on what the step is about to do
    (:func:`~sharded_rmsprop.facts.step_facts`); collective. A leader under Join then sends
    its followers their step's record."""
    sharding = opt.sharding
    try:
        with Agreement(sharding.data_parallel, "step()", followable=True) as agreement:
            sharding.sync.wait_all(settle=True)  # (the sync the last step left running)
            for g, group in enumerate(opt.param_groups):
                check_numeric_options(f"param_groups[{g}]", group)
            scaler = ScalerRequest.from_optimizer(opt)
            scan = sharding.scan(opt.param_groups, check_grad)
            check_reduced_grads(sharding, opt.param_groups)
            agreement.facts = step_facts(opt.param_groups, sharding.buckets, clip, scaler, scan)
        joining.check_followable(opt, agreement.followers)
        own = OwnGradients(opt, scan, clip, scaler, agreement.followers)
        if own.leading:
            joining.send_records(opt, own.followers, clip, scaler)
    except Exception:
        ScalerRequest.forget(opt)
        raise
    return own
