"""``ShardedRMSprop``: torch's RMSprop with its state partitioned across data-parallel ranks."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.distributed.algorithms.join import Join
from torch.optim import Optimizer

from . import checkpoint, grad_reduction, gradients, joining, param_overlap
from .accounting import MemoryAccounting
from .agreement import Agreement, Fact, plain, shares_failure
from .arguments import (
    check_grad,
    check_hyperparameters,
    check_numeric_options,
    check_params,
    check_torch_implementation,
    checked_settings,
)
from .comm import DataParallelGroup
from .facts import ParameterScan, construction_facts, step_facts
from .gradients import PendingClip, ScalerRequest
from .sharding import Sharding

__all__ = ["ShardedRMSprop"]

_log = logging.getLogger("sharded_rmsprop")


class ShardedRMSprop(
    checkpoint.StateDicts,
    grad_reduction.ReduceScatterSwitch,
    param_overlap.OverlapSwitch,
    MemoryAccounting,
    Optimizer,
    joining.Following,
):
    r"""RMSprop whose state is partitioned across data-parallel ranks (ZeRO stage 1).

    It computes exactly what :class:`torch.optim.RMSprop` computes:

    .. math::
       \begin{aligned}
            &g_t \leftarrow \nabla_{\theta} f_t (\theta_{t-1}), \quad
                g_t \leftarrow -g_t \text{ if maximize}, \quad
                g_t \leftarrow g_t + \lambda \theta_{t-1} \text{ if } \lambda \neq 0 \\
            &v_t \leftarrow \alpha v_{t-1} + (1 - \alpha) g^2_t, \quad
                \tilde{v}_t \leftarrow v_t \\
            &\text{if centered:} \quad g^{ave}_t \leftarrow \alpha g^{ave}_{t-1}
                + (1 - \alpha) g_t, \quad \tilde{v}_t \leftarrow \tilde{v}_t
                - \big(g^{ave}_t\big)^2 \\
            &\text{if } \mu > 0: \quad b_t \leftarrow \mu b_{t-1}
                + g_t / \big(\sqrt{\tilde{v}_t} + \epsilon\big), \quad
                \theta_t \leftarrow \theta_{t-1} - \gamma b_t \\
            &\text{else:} \quad \theta_t \leftarrow \theta_{t-1}
                - \gamma g_t / \big(\sqrt{\tilde{v}_t} + \epsilon\big)
       \end{aligned}

    but each of the ``N`` ranks of ``process_group`` keeps :math:`v`, :math:`b` and
    :math:`g^{ave}` for only ``1/N`` of the parameters. Parameters of one (dtype, device)
    are laid end to end in a flat buffer split into ``N`` equal ranges; each rank updates its
    range and then the ranges are exchanged so every rank holds all parameters again. The
    parameters become views of that buffer: ``p.data`` is replaced, ``p`` itself is not.

    Args:
        params (iterable): iterable of parameters or named parameters to optimize, or
            iterable of dicts defining parameter groups. Every rank must pass the same
            parameters in the same order (as ``model.parameters()`` does).
        lr (float, Tensor, optional): learning rate (default: 1e-2)
        alpha (float, optional): smoothing constant (default: 0.99)
        eps (float, optional): term added to the denominator to improve
            numerical stability (default: 1e-8)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        momentum (float, optional): momentum factor (default: 0)
        centered (bool, optional): if ``True``, compute the centered RMSProp, the gradient
            is normalized by an estimation of its variance (default: False)
        maximize (bool, optional): maximize the objective with respect to the params,
            instead of minimizing (default: False)
        process_group (ProcessGroup, optional): the data-parallel ranks that share the
            state; the default group if ``None``; a single process when
            ``torch.distributed`` is not initialized (default: None)
        fused (bool, optional): ``None`` picks the fastest update available for the
            parameters' device, ``False`` forces the reference update (bit for bit
            :class:`torch.optim.RMSprop`), ``True`` requires a fused kernel (default: None)
        master_weights (bool, optional): keep a float32 copy of this rank's shard of the
            bfloat16 and float16 parameters, run their update in float32 on it with float32
            state, and write the rounded result into the parameters; ``None`` means ``True``
            (parameters of other dtypes are their own masters) (default: None)
        skip_nonfinite (bool, optional): skip, on every rank, a step whose gradients hold
            an inf or a NaN on any rank: parameters and state stay as they are, and
            :attr:`skipped_steps` counts it (default: False). Each rank reads all of its
            gradients for the check, as ``GradScaler`` does.
        host_shared (bool, optional): when all ranks of the group run on one host, keep one
            copy of each CPU flat buffer in shared memory that every rank maps: the parameter
            sync becomes a barrier and the host holds the parameters once. The ranks then
            share that copy: a write to a parameter by one rank is seen by all, so an
            in-place change that every rank makes (``p.mul_(0.9)``, re-initialisation,
            noise) is applied once per rank; make such changes on one rank, between
            barriers. Sharing is verified first; where it cannot be had, every rank keeps
            private buffers and rank 0 warns once, saying why (default: False)
        bucket_numel (int, optional): lay parameters of one dtype and device out in
            consecutive flat buffers of at most this many elements (a larger parameter gets
            one of its own), each sharded across the ranks on its own, instead of one: each
            buffer's sync then starts while the next one is updated. Each buffer stages its
            gradients in a window of its own (up to 16 MiB). ``None``: one buffer
            (default: None)
        param_sync (str, optional): the collective that gives every rank the other ranks'
            updated shards of private buffers: ``"all_gather"`` (one per buffer),
            ``"broadcast"`` (one per rank and buffer), or ``"auto"``, the one measured
            fastest for the backend: broadcasts on gloo, the all-gather on NCCL and others.
            Host-shared buffers need none (default: "auto")

    Example::

        >>> model = DistributedDataParallel(model)
        >>> optimizer = ShardedRMSprop(model.parameters(), lr=1e-3, momentum=0.9)
        >>> optimizer.zero_grad()
        >>> loss_fn(model(input), target).backward()
        >>> optimizer.step()

        bfloat16 training with float32 master weights and global-norm clipping::

        >>> model = DistributedDataParallel(model.to(torch.bfloat16))
        >>> optimizer = ShardedRMSprop(model.parameters(), lr=1e-3, skip_nonfinite=True)
        >>> loss_fn(model(input), target).backward()
        >>> optimizer.clip_grad_norm_(1.0)  # returns the norm before clipping
        >>> optimizer.step()

    .. warning::
        The constructor, :meth:`step`, :meth:`add_param_group`, :meth:`clip_grad_norm_`,
        :meth:`load_state_dict`, :meth:`full_state_dict`, :meth:`consolidate_state_dict` and
        :meth:`close` are collective: every rank of ``process_group`` must call them, in the
        same order.

    .. note::
        Before it changes anything, each collective method checks that every rank is about
        to do the same thing: at each :meth:`step`, which parameters have a gradient, every
        param group's options, the pending clip, the GradScaler and the parameters replaced
        since the last step. A difference, or input that one rank rejects (a sparse
        gradient, say), raises a clear error on every rank and changes nothing. The check
        is one all-reduce of a few integers on the host (no GPU synchronisation). What it
        cannot see is a collective method called on some ranks only: run with
        ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` to find those.

    .. note::
        A parameter whose tensor is replaced after construction (``p.data = ...``,
        ``module.to_empty(...)``) is adopted at the next :meth:`step` if it keeps its shape,
        dtype and device: its values are copied into the flat buffer and it becomes a view
        of it again, with its state. Any other change (``model.to(torch.float64)``) is an
        error on every rank: build the optimizer after moving or casting the model. Built on
        the meta device, its buffers are made on the real one once every parameter is there
        (``module.to_empty(...)`` keeping the Parameter objects:
        ``torch.__future__.set_swap_module_params_on_conversion(True)``).

    .. note::
        ``optimizer.state[p]`` holds this rank's part of ``p``'s state: ``step`` and a 1-D
        slice (possibly empty) of each buffer, ``master_weight`` included.

    .. note::
        Master weights are copied from the parameters at the first step that updates them
        (or come from a checkpoint by :meth:`load_state_dict`), so weights loaded into the
        model before that are kept. From then on the master weights are the truth: the
        parameters are overwritten by the rounded master weights at every step (call
        :meth:`reload_master_weights` after changing the parameters yourself).

    .. note::
        Works with :class:`torch.amp.GradScaler`, including float16 parameters: the scaler
        hands the optimizer its scale, which is divided out inside the update (no pass over
        the gradients), and its finding of infs, which the ranks agree on, so the step is
        skipped on all of them or on none.
    """

    #: Tells torch.amp.GradScaler to pass its scale and inf finding to :meth:`step`.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        process_group: torch.distributed.ProcessGroup | None = None,
        fused: bool | None = None,
        master_weights: bool | None = None,
        skip_nonfinite: bool = False,
        host_shared: bool = False,
        bucket_numel: int | None = None,
        param_sync: str = "auto",
    ) -> None:
        joining.Following.__init__(self)
        #: Steps skipped because of inf or NaN gradients (``skip_nonfinite`` or GradScaler).
        self.skipped_steps = 0
        self._clip: PendingClip | None = None
        self._constructed = False
        options = dict(
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            maximize=maximize,
        )
        data_parallel = DataParallelGroup.resolve(process_group)
        with shares_failure(data_parallel, "__init__()"):
            check_hyperparameters(options)
            check_torch_implementation(capturable, foreach, differentiable)
            #: The settings every rank must share (compared at construction).
            self._settings = checked_settings(
                fused, master_weights, skip_nonfinite, host_shared, bucket_numel, param_sync
            )
            #: This rank's flat buckets and the ranks they are sharded over (read them; the
            #: optimizer changes them).
            self.sharding = Sharding(
                data_parallel,
                **{k: v for k, v in self._settings.items() if k != "skip_nonfinite"},
            )
            torch_only = dict(capturable=capturable, foreach=foreach, differentiable=differentiable)
            super().__init__(params, {**options, **torch_only})
        self._shard_new_groups("__init__()")
        self._constructed = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its parameters get flat buffers of their own.

        .. warning::
            Collective once the optimizer is constructed: every rank must add the same group.
        """
        count = len(self.param_groups)
        self._forget_consolidated()
        # (during construction, __init__ shares the failure)
        sharing = shares_failure(self._data_parallel, "add_param_group()")
        try:
            with sharing if self._constructed else contextlib.nullcontext():
                self.wait_for_params()
                if self._clip is not None:
                    raise RuntimeError(
                        "add_param_group() between clip_grad_norm_() and step(): the pending "
                        "clip covers the parameters there were; add the group before clipping"
                    )
                super().add_param_group(param_group)
                check_params(self.param_groups[-1]["params"])
        except Exception:
            del self.param_groups[count:]
            raise
        if self._constructed:
            self._shard_new_groups("add_param_group()")

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardedRMSprop:
        """A working copy over copies of the parameters (the same copies as a model copied
        with it, through ``memo``), with its own flat buffers (private even where these are
        shared by the host), state and step counts, on the same process group (a group is not
        copied). Every rank must copy alike, as for any collective object."""
        self.wait_for_params()
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for name, value in self.__dict__.items():
            if name not in ("sharding", "state"):
                setattr(twin, name, copy.deepcopy(value, memo))
        twin.sharding = self.sharding.copy(memo)
        twin.state = defaultdict(dict)
        twin.sharding.refresh_state(twin.state, twin.param_groups)
        return twin

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError(
            "a ShardedRMSprop cannot be pickled: it is bound to its process group and holds "
            "one rank's shard. Save its state with state_dict() (DCP) or full_state_dict(), "
            "or copy it with copy.deepcopy"
        )

    # -- construction ------------------------------------------------------------------------

    def _shard_new_groups(self, operation: str) -> None:
        """Lay the groups added since the last call out in flat buckets; collective.

        The ranks first agree that they were given the same parameters and options, so a
        mismatch is an error on every rank, raised before any parameter is touched.
        """
        first = len(self.sharding.laid_out)
        try:
            with Agreement(self._data_parallel, operation) as agreement:
                planned = self.sharding.plan(self.param_groups)
                agreement.facts = construction_facts(self.param_groups, first, self._settings)
        except Exception:
            del self.param_groups[first:]
            raise
        self.sharding.lay_out(planned, self.param_groups)

    # -- one step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.

        .. warning::
            Collective: every rank of the process group must call it.
        """
        Join.notify_join_context(self)  # (uneven inputs: see join_hook)
        self._forget_consolidated()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip = self._clip
        try:
            scan, followers, scaler = self._agree_on_step(clip)
            leading = joining.leads(self, followers)
            if leading:
                joining.send_records(self, followers, clip, scaler)
            skip = self._skip_this_step(scaler)
        except Exception:
            ScalerRequest.forget(self)  # or the scaler multiplies its next scale by this one
            raise
        self._clip = None
        self.sharding.adopt(scan, self.state)
        if skip:
            return loss
        self.sharding.begin_step(self.param_groups, self.state)
        self.sharding.sync.before_update()
        if leading:  # (after the barrier, which the followers reach before they receive)
            joining.send_gradients(self, followers)
        self.sharding.update(  # each bucket's sync starts while the next one is updated
            self.param_groups,
            lambda device: gradients.combined_scale(device, clip, scaler),
            after_each=self.sharding.sync.start,
        )
        self._end_param_sync()  # waited for here, or by what reads parameters next
        return loss

    @torch.no_grad()
    def clip_grad_norm_(
        self, max_norm: float, norm_type: float | str = 2.0, error_if_nonfinite: bool = False
    ) -> Tensor:
        """Clip the gradients of all parameters by their global norm, in the next :meth:`step`.

        Like :func:`torch.nn.utils.clip_grad_norm_` on every parameter of the optimizer: the
        norm is that of all gradients viewed as one vector, and they are scaled by
        ``min(1, max_norm / (total_norm + 1e-6))``. The ranks first agree on the arguments
        and on which parameters have a gradient; then each rank computes the norm of the
        gradient elements it owns and one scalar all-reduce combines them; the scale is
        applied inside the next :meth:`step`'s update, so ``p.grad`` is left as it is and
        no extra pass over the gradients is made. Calling it again before :meth:`step`
        scales again, as torch's would; :meth:`zero_grad` forgets a pending clip.

        With a ``torch.amp.GradScaler`` of scale ``S`` the gradients are ``S`` times the
        true ones: either ``scaler.unscale_(optimizer)`` first (float32 and bfloat16
        gradients; a pass over them), or, for float16 gradients, which ``unscale_`` refuses,
        clip the scaled ones to ``max_norm * S`` and divide the returned norm by ``S``; the
        step divides ``S`` out.

        Args:
            max_norm (float): max norm of the gradients
            norm_type (float, str): type of the used p-norm; positive, ``inf`` or ``-inf``
                (default: 2.0)
            error_if_nonfinite (bool): if ``True``, raise when the total norm is ``nan``,
                ``inf`` or ``-inf`` (on every rank) (default: False)

        Returns:
            Total norm of the gradients (viewed as a single vector), a 0-d tensor: float32, or
            float64 if some parameters are float64 or complex128. A NaN gradient makes the
            ``inf`` norm ``inf`` (torch's would be ``nan``).

        .. warning::
            Collective: every rank of the process group must call it.
        """
        with Agreement(self._data_parallel, "clip_grad_norm_()", followable=True) as agreement:
            self.wait_for_params()
            norm_type = gradients.check_norm_type(norm_type)
            scan = self.sharding.scan(self.param_groups, check_grad)
            self._check_reduced_grads()
            arguments = ("max_norm", "norm_type", "error_if_nonfinite")
            agreement.facts = [
                Fact(
                    "the arguments",
                    plain((max_norm, norm_type, error_if_nonfinite)),
                    lambda index: arguments[index],
                    "clip_grad_norm_() must be called on every rank, with the same arguments.",
                ),
                scan.has_grad_fact(self.param_groups),
                scan.replaced_fact(self.param_groups),
            ]
        followers = agreement.followers
        joining.check_followable(self, followers)
        self.sharding.adopt(scan, self.state)  # the norm of the gradients where they are now
        owned = self.sharding.owned_grads()
        if joining.leads(self, followers):  # and their part of the norm (see join_hook)
            joining.send_clip_request(self, followers, max_norm, norm_type, error_if_nonfinite)
            owned += joining.followers_grads(self, followers)
        total_norm = gradients.global_norm(
            owned,
            norm_type,
            self._data_parallel,
            self.sharding.home_device,
            gradients.norm_dtype(self.sharding.dtypes),
        )
        self._clip = PendingClip.after(
            self._clip, total_norm, max_norm, norm_type, error_if_nonfinite
        )
        return total_norm

    def reload_master_weights(self) -> None:
        """Take the float32 master weights from the parameters again, at the next step.

        Call it after writing to 16-bit parameters yourself once training has begun (loading
        weights into the model, say): otherwise the next step overwrites them with the
        rounded master weights. No collectives; a no-op without master weights.
        """
        self._forget_consolidated()
        self.sharding.reload_master_weights()

    def close(self) -> None:
        """Take this optimizer's hooks off the models it was attached to: the DDP model of
        :meth:`reduce_scatter_gradients` all-reduces its gradients as DDP does again, and the
        hooks of :meth:`overlap_param_sync` are removed after the sync in flight is waited
        for. The optimizer keeps working, on all-reduced gradients with a blocking sync; another
        optimizer can then attach to those models. Dropping the optimizer does the same once
        Python frees it (the ranks agree on that at the next backward). Idempotent. An error on
        every rank while ``p.grad`` holds reduce-scattered gradients (``zero_grad()`` first).

        .. warning::
            Collective: every rank must call it (the DDP models' collectives must match).
        """
        with Agreement(self._data_parallel, "close()"):
            self.wait_for_params()
            self._check_no_reduced_grads_held()
        self._detach_gradient_reduction()
        if self.sharding.param_overlap is not None:
            self.sharding.param_overlap.remove()
            self.sharding.param_overlap = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients (see :meth:`torch.optim.Optimizer.zero_grad`) and forget a
        clip that :meth:`clip_grad_norm_` left for the next step."""
        self._clip = None
        if self.sharding.grad_reduction is not None:
            self.sharding.grad_reduction.forget()
        super().zero_grad(set_to_none)

    @property
    def _data_parallel(self) -> DataParallelGroup:
        """The ranks that share the state (``process_group``, or this process alone)."""
        return self.sharding.data_parallel

    def _agree_on_step(
        self, clip: PendingClip | None
    ) -> tuple[ParameterScan, tuple[int, ...], ScalerRequest | None]:
        """Check this rank's gradients, parameters and what a GradScaler set, then agree with
        the other ranks on what the step is about to do
        (:func:`~sharded_rmsprop.facts.step_facts`); collective. Returns what the scan found
        (the parameters to adopt among it), the ranks that follow this step (out of data
        under Join; almost always none) and the scaler's request."""
        with Agreement(self._data_parallel, "step()", followable=True) as agreement:
            self.wait_for_params()  # (the sync the last step left running)
            for g, group in enumerate(self.param_groups):
                check_numeric_options(f"param_groups[{g}]", group)
            scaler = ScalerRequest.from_optimizer(self)
            scan = self.sharding.scan(self.param_groups, check_grad)
            self._check_reduced_grads()
            agreement.facts = step_facts(
                self.param_groups, self.sharding.buckets, clip, scaler, scan
            )
        joining.check_followable(self, agreement.followers)
        return scan, agreement.followers, scaler

    def _all_grads(self) -> list[Tensor]:
        """This rank's gradients, whole."""
        return [
            p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        ]

    def _skip_this_step(
        self, scaler: ScalerRequest | None, following: joining.Record | None = None
    ) -> bool:
        """Whether some rank has inf or NaN gradients this step (when that is checked):
        with ``skip_nonfinite`` (each rank reads all its gradients), or when a GradScaler
        reports its own finding. A rank ``following`` the others takes part without a say."""
        scaled = scaler is not None or (following is not None and following.scaled)
        if not (self._settings["skip_nonfinite"] or scaled):
            return False
        if not gradients.nonfinite_on_some_rank(
            self._data_parallel,
            self.sharding.home_device,
            scaler=scaler,
            grads=self._all_grads()
            if self._settings["skip_nonfinite"] and following is None
            else None,
            following=following is not None,
        ):
            return False
        self.skipped_steps += 1
        report = _log.info if scaled and not self._settings["skip_nonfinite"] else _log.warning
        if self._data_parallel.rank == 0:
            report(
                "ShardedRMSprop skipped a step: inf or NaN gradients (%d skipped so far)",
                self.skipped_steps,
            )
        return True
