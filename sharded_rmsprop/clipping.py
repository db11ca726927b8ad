"""``ShardedRMSprop.clip_grad_norm_``: the global norm of gradients held in shards.

The ranks agree on the arguments and on which parameters have a gradient; each rank then
computes the norm of the gradient elements it owns (its leader adds those of ranks that follow
under Join), and one scalar all-reduce combines them. The clip itself is a factor that the next
step's update applies (:class:`~sharded_rmsprop.gradients.PendingClip`): ``p.grad`` is left as
it is and no pass is made over the gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from . import gradients, joining
from .agreement import Agreement, Fact, plain
from .arguments import check_grad
from .grad_reduction import check_reduced_grads
from .gradients import PendingClip

if TYPE_CHECKING:
    from .sharding import ShardedOptimizer

__all__ = ["clip_grad_norm"]

_ARGUMENTS = ("max_norm", "norm_type", "error_if_nonfinite")


def clip_grad_norm(
    opt: ShardedOptimizer,
    pending: PendingClip | None,
    max_norm: float,
    norm_type: float | str,
    error_if_nonfinite: bool,
) -> tuple[Tensor, PendingClip]:
    """The total norm of ``opt``'s gradients and the clip the next step applies (after
    ``pending``, a clip not applied yet); collective."""
    sharding = opt.sharding
    with Agreement(sharding.data_parallel, "clip_grad_norm_()", followable=True) as agreement:
        sharding.sync.wait_all(settle=True)
        norm_type = gradients.check_norm_type(norm_type)
        scan = sharding.scan(opt.param_groups, check_grad)
        check_reduced_grads(sharding, opt.param_groups)
        agreement.facts = [
            Fact(
                "the arguments",
                plain((max_norm, norm_type, error_if_nonfinite)),
                lambda index: _ARGUMENTS[index],
                "clip_grad_norm_() must be called on every rank, with the same arguments.",
            ),
            scan.has_grad_fact(opt.param_groups),
            scan.replaced_fact(opt.param_groups),
        ]
    followers = agreement.followers
    joining.check_followable(opt, followers)
    sharding.adopt(scan, opt.state)  # the norm of the gradients where they are now
    owned = sharding.owned_grads()
    if joining.leads(opt, followers):  # and their part of the norm (see joining.py)
        joining.send_clip_request(opt, followers, max_norm, norm_type, error_if_nonfinite)
        owned += joining.followers_grads(opt, followers)
    total_norm = gradients.global_norm(
        owned,
        norm_type,
        sharding.data_parallel,
        sharding.home_device,
        gradients.norm_dtype(sharding.dtypes),
    )
    return total_norm, PendingClip.after(
        pending, total_norm, max_norm, norm_type, error_if_nonfinite
    )
