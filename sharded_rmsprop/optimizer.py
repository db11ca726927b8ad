"""``ShardedRMSprop``: torch's RMSprop with its state partitioned across data-parallel ranks."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import checkpoint
from .comm import DataParallelGroup
from .host_shared import host_shared_zeros
from .kernels import UpdateFn, select_update
from .layout import ParamSpec, plan_buckets
from .shards import ShardedBucket, Span

__all__ = ["ShardedRMSprop"]

_OPTION_KEYS = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")


def _check_hyperparameters(
    lr: float | Tensor, alpha: float, eps: float, weight_decay: float, momentum: float
) -> None:
    """torch.optim.RMSprop's checks, in its order and with its messages."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= momentum:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= alpha:
        raise ValueError(f"Invalid alpha value: {alpha}")


def _check_params(params: list[Tensor]) -> None:
    """What sharding needs beyond torch's own checks: distinct, floating-point tensors."""
    if len(params) != len({id(p) for p in params}):
        raise ValueError(
            "ShardedRMSprop got the same parameter twice in one param group; each parameter "
            "gets one place in the flat buffer, so pass each once"
        )
    for param in params:
        if not (param.is_floating_point() or param.is_complex()):
            raise TypeError(
                f"ShardedRMSprop can only optimize floating-point or complex parameters, "
                f"but one of the params has dtype {param.dtype}"
            )
        if param.is_sparse:
            raise TypeError("ShardedRMSprop cannot shard sparse parameters")


def _as_float(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else value


class ShardedRMSprop(Optimizer):
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

    Example::

        >>> model = DistributedDataParallel(model)
        >>> optimizer = ShardedRMSprop(model.parameters(), lr=1e-3, momentum=0.9)
        >>> optimizer.zero_grad()
        >>> loss_fn(model(input), target).backward()
        >>> optimizer.step()

    .. warning::
        The constructor, :meth:`step` and :meth:`add_param_group` are collective: every
        rank of ``process_group`` must call them, in the same order.

    .. note::
        ``optimizer.state[p]`` holds this rank's part of ``p``'s state: ``step`` and a 1-D
        slice (possibly empty) of each buffer.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        maximize: bool = False,
        *,
        process_group: torch.distributed.ProcessGroup | None = None,
        fused: bool | None = None,
    ) -> None:
        self._ranks = DataParallelGroup.resolve(process_group)
        self._fused = fused
        self._buckets: list[ShardedBucket] = []
        self._kernels: dict[tuple[torch.device, torch.dtype], UpdateFn] = {}  # chosen once
        self._sharded_groups = 0
        self._constructed = False
        try:
            _check_hyperparameters(lr, alpha, eps, weight_decay, momentum)
            if fused not in (None, True, False):
                raise TypeError(f"fused must be None, True or False, got {fused!r}")
            defaults = dict(
                lr=lr,
                alpha=alpha,
                eps=eps,
                weight_decay=weight_decay,
                momentum=momentum,
                centered=centered,
                maximize=maximize,
            )
            super().__init__(params, defaults)
        except (TypeError, ValueError, RuntimeError):
            self._ranks.check_same_layout("parameters", None)
            raise
        self._shard_new_groups()
        self._constructed = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its parameters get flat buffers of their own.

        .. warning::
            Collective once the optimizer is constructed: every rank must add the same group.
        """
        count = len(self.param_groups)
        try:
            super().add_param_group(param_group)
            _check_params(self.param_groups[-1]["params"])
        except (TypeError, ValueError):
            del self.param_groups[count:]
            if self._constructed:
                self._ranks.check_same_layout("parameters", None)
            raise
        if self._constructed:
            self._shard_new_groups()

    # -- construction ------------------------------------------------------------------------

    def _shard_new_groups(self) -> None:
        """Lay the groups added since the last call out in flat buckets; collective.

        The ranks first agree that they were given the same parameters and options, so a
        mismatch is an error on every rank, raised before any parameter is touched.
        """
        first = self._sharded_groups
        try:
            specs, params, description = self._describe_groups(first)
            plans = plan_buckets(specs, self._ranks.world_size)
            for plan in plans:
                self._kernels[plan.device, plan.dtype] = select_update(
                    self._fused, plan.device, plan.dtype
                )
        except (TypeError, ValueError, RuntimeError):
            del self.param_groups[first:]
            self._ranks.check_same_layout("parameters", None)
            raise
        try:
            self._ranks.check_same_layout("parameters", description)
        except RuntimeError:
            del self.param_groups[first:]
            raise
        offset = specs[0].index if specs else 0
        for plan in plans:
            members = [params[slot.index - offset] for slot in plan.slots]
            shared = (
                host_shared_zeros(self._ranks, plan.padded_numel, plan.dtype)
                if plan.device.type == "cpu"
                else None
            )
            self._buckets.append(ShardedBucket(plan, self._ranks.rank, members, shared))
        if self._host_shared:
            self._ranks.barrier()  # rank 0 has filled the shared buffers
        self._sharded_groups = len(self.param_groups)

    def _describe_groups(self, first: int) -> tuple[list[ParamSpec], list[Tensor], list[Any]]:
        """Specs and tensors of the parameters in groups ``first:``, and what ranks compare."""
        index = sum(len(group["params"]) for group in self.param_groups[:first])
        specs, params, description = [], [], [("fused", self._fused)]
        for g in range(first, len(self.param_groups)):
            group = self.param_groups[g]
            description.append(tuple((key, repr(group[key])) for key in _OPTION_KEYS))
            for param in group["params"]:
                spec = ParamSpec(index, g, tuple(param.shape), param.dtype, param.device)
                description.append((g, spec.shape, str(spec.dtype), spec.device.type))
                specs.append(spec)
                params.append(param)
                index += 1
        return specs, params, description

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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        work = [(bucket, self._gather_grads(bucket)) for bucket in self._buckets]
        if self._host_shared:
            self._ranks.barrier()  # no rank still reads parameters that the update writes
        for bucket, spans in work:
            self._update(bucket, spans)
        self._ranks.sync_shards(
            [bucket.flat for bucket in self._buckets],
            [bucket.plan.shard_numel for bucket in self._buckets],
            [bucket.host_shared for bucket in self._buckets],
        )
        return loss

    @property
    def _host_shared(self) -> bool:
        """Whether some flat buffer is mapped by every rank of the host."""
        return any(bucket.host_shared for bucket in self._buckets)

    def _check_grads(self) -> None:
        """Reject gradients torch would reject, before anything is modified."""
        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("RMSprop does not support sparse gradients")
                if grad.shape != param.shape:
                    raise RuntimeError(
                        f"a gradient has shape {tuple(grad.shape)} but its parameter has "
                        f"shape {tuple(param.shape)}"
                    )

    def _gather_grads(self, bucket: ShardedBucket) -> list[Span]:
        """Count the step of every parameter with a gradient and copy the owned slices.

        Every rank sees the same gradients (DDP), so every rank allocates the same state
        buffers at the same step, whatever it owns.
        """
        stepped = bucket.positions_with_grad()
        if not stepped:
            return []
        bucket.steps[stepped] += 1
        if self._allocate_state(bucket):
            self._refresh_state_views(bucket)
        for position in stepped:
            param = bucket.params[position]
            if param not in self.state:
                self.state[param] = bucket.param_state(position)
        return bucket.gather_grads()

    def _allocate_state(self, bucket: ShardedBucket) -> bool:
        """Create the buffers the bucket's param groups need; True if any was new."""
        groups = [self.param_groups[g] for g in bucket.group_indices]
        needed = {
            "square_avg": True,
            "momentum_buffer": any(group["momentum"] > 0 for group in groups),
            "grad_avg": any(group["centered"] for group in groups),
        }
        created = False
        for key, need in needed.items():
            if need and key not in bucket.state:
                bucket.ensure_state(key)
                created = True
        return created

    def _update(self, bucket: ShardedBucket, spans: list[Span]) -> None:
        """Run the update kernel on each span with its param group's current options."""
        update = self._kernels[bucket.plan.device, bucket.plan.dtype]
        for span in spans:
            group = self.param_groups[span.group]
            window = slice(span.start, span.end)
            momentum_buffer = bucket.state["momentum_buffer"] if group["momentum"] > 0 else None
            grad_avg = bucket.state["grad_avg"] if group["centered"] else None
            update(
                bucket.shard[window],
                bucket.grad_shard[window],
                bucket.state["square_avg"][window],
                None if momentum_buffer is None else momentum_buffer[window],
                None if grad_avg is None else grad_avg[window],
                lr=_as_float(group["lr"]),
                alpha=group["alpha"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                centered=group["centered"],
                maximize=group["maximize"],
            )

    def _refresh_state_views(self, bucket: ShardedBucket) -> None:
        for position, param in enumerate(bucket.params):
            if param in self.state:
                self.state[param] = bucket.param_state(position)

    # -- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's state in the sharded format, for ``torch.distributed.checkpoint``.

        ``dcp.save({"optim": optimizer}, ...)`` and ``dcp.load(...)`` use it (the optimizer is
        a DCP ``Stateful``): each rank writes only its ranges, and a load at another world size
        reads the ranges it now owns. For torch's own single-file format use
        :meth:`full_state_dict`. No collectives.
        """
        return checkpoint.sharded_state_dict(self)

    def full_state_dict(
        self, to: int | None = 0, *, chunk_numel: int = checkpoint.DEFAULT_CHUNK_NUMEL
    ) -> dict[str, Any] | None:
        """``torch.optim.RMSprop``'s state dict, assembled on rank ``to`` (all ranks if None).

        Its tensors are on the CPU, shaped like the parameters; other ranks get None.
        ``torch.optim.RMSprop.load_state_dict`` and :meth:`load_state_dict` accept it, and
        ``torch.load(..., weights_only=True)`` reads it back. The receiving rank needs memory
        for the output plus one chunk of ``chunk_numel`` elements.

        .. warning::
            Collective: every rank of the process group must call it.
        """
        return checkpoint.full_state_dict(self, to, chunk_numel=chunk_numel)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch's format (from ``torch.optim.RMSprop`` or :meth:`full_state_dict`) or
        the sharded one (from :meth:`state_dict` through DCP).

        Every rank passes the same state dict and keeps the ranges it owns; the group
        options come from ``state_dict``, as in torch. Everything is checked before anything
        is changed: a bad state dict raises ``ValueError`` and leaves the optimizer as it was.
        No collectives.
        """
        checkpoint.load_state_dict(self, state_dict)
