"""``ShardedRMSprop``: torch's RMSprop with its state partitioned across data-parallel ranks."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim import optimizer as torch_optimizer

from . import checkpoint, grad_reduction, joining, param_overlap
from . import options as schema
from .agreement import Agreement, shares_failure
from .arguments import (
    check_hyperparameters,
    check_params,
    check_torch_implementation,
    checked_settings,
)
from .clipping import clip_grad_norm
from .comm import DataParallelGroup
from .distributed_state_dict import full_state_dict_requested
from .facts import construction_facts
from .grad_sources import GradSource, agree_on_step
from .gradients import PendingClip
from .param_overlap import ParamSyncOverlap
from .sharding import Sharding

__all__ = ["ShardedRMSprop"]

_log = logging.getLogger("sharded_rmsprop")


class ShardedRMSprop(Optimizer, Joinable):
    """RMSprop whose state is partitioned across data-parallel ranks (ZeRO stage 1).

    It computes exactly what :class:`torch.optim.RMSprop` computes, but each of the ``N``
    ranks of ``process_group`` keeps the state (``square_avg``, ``momentum_buffer``,
    ``grad_avg``) for only ``1/N`` of the parameters. Parameters of one (dtype, device)
    are laid end to end in a flat buffer split into ``N`` equal ranges; each rank updates its
    range and then the ranges are exchanged so every rank holds all parameters again. The
    parameters become views of that buffer: ``p.data`` is replaced, ``p`` itself is not.

    Args:
        params (iterable): iterable of parameters or named parameters to optimize, or
            iterable of dicts defining parameter groups. Every rank must pass the same
            parameters in the same order (as ``model.parameters()`` does).
        ARGUMENTS (from sharded_rmsprop/options.py)

    Example::

        >>> model = DistributedDataParallel(model)
        >>> optimizer = ShardedRMSprop(model.parameters(), lr=1e-3, momentum=0.9)
        >>> optimizer.zero_grad()
        >>> loss_fn(model(input), target).backward()
        >>> optimizer.step()

    .. warning::
        The constructor, :meth:`step`, :meth:`add_param_group`, :meth:`clip_grad_norm_`,
        :meth:`load_state_dict`, :meth:`full_state_dict`, :meth:`consolidate_state_dict` and
        :meth:`close` are collective: every rank of ``process_group`` must call them, in the
        same order.

    .. note::
        Each collective method first checks, in one host all-reduce, that every rank is about
        to do the same thing: a difference, or input one rank rejects, is a clear error on
        every rank that changes nothing (``docs/guarantees.md``). ``optimizer.state[p]``
        holds this rank's part of ``p``'s state: ``step`` and a 1-D slice (possibly empty)
        of each buffer. Master weights are copied from the parameters at the first step that
        updates them, then are the truth (:meth:`reload_master_weights`). A GradScaler's
        scale is divided out inside the update; the ranks agree on its finding of infs.
    """

    #: Tells torch.amp.GradScaler to pass its scale and inf finding to :meth:`step`.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        # (torch.optim.RMSprop's arguments, then the library's settings, as options.py defines
        # them: see the signature at the end of this module)
        Joinable.__init__(self)
        #: Steps skipped because of inf or NaN gradients (``skip_nonfinite`` or GradScaler).
        self.skipped_steps = 0
        self._clip: PendingClip | None = None
        #: The torch-format state dict :meth:`consolidate_state_dict` assembled on this rank,
        #: for the next :meth:`state_dict` call unless the state changes first.
        self._consolidated: dict[str, Any] | None = None
        self._constructed = False
        data_parallel = DataParallelGroup.resolve(kwargs.get("process_group"))  # (bind: shared)
        with shares_failure(data_parallel, "__init__()"):
            options, switches, settings = schema.bind(args, kwargs)
            check_hyperparameters(options)
            check_torch_implementation(**switches)
            #: The settings every rank must share (compared at construction).
            self._settings = checked_settings(settings)
            #: This rank's flat buckets and the ranks they are sharded over (read them; the
            #: optimizer changes them).
            self.sharding = Sharding(
                data_parallel,
                **{k: v for k, v in self._settings.items() if k != "skip_nonfinite"},
            )
            super().__init__(params, {**options, **switches})
        self._shard_new_groups("__init__()")
        self._constructed = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its parameters get flat buffers of their own. Collective once
        the optimizer is constructed: every rank must add the same group."""
        count = len(self.param_groups)
        self._forget_consolidated()
        # (during construction, __init__ shares the failure)
        sharing = shares_failure(self._data_parallel, "add_param_group()")
        try:
            with sharing if self._constructed else contextlib.nullcontext():
                self.sharding.sync.wait_all(settle=True)
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
        """A working copy over copies of the parameters (those of a model copied with it,
        through ``memo``), with its own private flat buffers, state and step counts, on the
        same process group. Every rank must copy alike, as for any collective object."""
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

    def _shard_new_groups(self, operation: str) -> None:
        """Lay the groups added since the last call out in flat buckets, once the ranks
        agreed on them (collective); a group they disagree on is taken out again."""
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

        Collective: every rank of the process group must call it.
        """
        Join.notify_join_context(self)  # (uneven inputs: see join_hook)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_on(agree_on_step(self, self._clip))
        return loss

    def _step_on(self, gradients: GradSource) -> None:
        """Every step's phases once the ranks agreed on it (skip? → adopt → update and
        sync), on ``gradients``: this rank's own, or under Join, those its leader sends."""
        self._forget_consolidated()
        skip = self._skip_this_step(gradients)
        self._clip = None
        self.sharding.adopt(gradients.scan, self.state)
        if not skip:
            self._update_and_sync(gradients)

    def _skip_this_step(self, gradients: GradSource) -> bool:
        """Whether some rank has inf or NaN gradients, where that is checked: with
        ``skip_nonfinite`` (each rank reads all its gradients) or a GradScaler's finding."""
        read_grads = self._settings["skip_nonfinite"]
        if not (read_grads or gradients.scaled):
            return False
        dp = self._data_parallel
        if not gradients.nonfinite_on_some_rank(dp, self.sharding.home_device, read_grads):
            return False
        self.skipped_steps += 1
        if dp.rank == 0:
            (_log.warning if read_grads else _log.info)(
                "ShardedRMSprop skipped a step: inf or NaN gradients (%d skipped so far)",
                self.skipped_steps,
            )
        return True

    def _update_and_sync(self, gradients: GradSource) -> None:
        """Each bucket's update of its shard, its sync started while the next is updated."""
        self.sharding.begin_step(self.param_groups, self.state, gradients.has_grad)
        self.sharding.sync.before_update()
        gradients.before_update()
        self.sharding.update(
            self.param_groups,
            gradients.grad_scale,
            gradients.has_grad,
            gradients.receive,
            after_each=self.sharding.sync.start,
        )
        self._end_param_sync()  # waited for here, or by what reads parameters next

    def _end_param_sync(self) -> None:
        """The end of :meth:`step`'s sync: left running when it may be, waited for else."""
        post_hooks = self._optimizer_step_post_hooks or torch_optimizer._global_optimizer_post_hooks
        if self.sharding.overlapping and not post_hooks:  # (they may read parameters)
            self.sharding.sync.hand_over()
        else:
            self.sharding.sync.finish()

    @torch.no_grad()
    def clip_grad_norm_(
        self, max_norm: float, norm_type: float | str = 2.0, error_if_nonfinite: bool = False
    ) -> Tensor:
        """Clip the gradients of all parameters by their global norm, in the next :meth:`step`.

        Like :func:`torch.nn.utils.clip_grad_norm_` on every parameter of the optimizer, but
        the scale ``min(1, max_norm / (total_norm + 1e-6))`` is applied inside the next
        :meth:`step`'s update (``p.grad`` is left as it is; :meth:`zero_grad` forgets it).
        With a GradScaler of scale ``S``, ``scaler.unscale_(optimizer)`` first, or for
        float16 gradients clip the scaled ones to ``max_norm * S`` and divide the returned
        norm by ``S`` (``docs/usage.md``).

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

        Collective: every rank of the process group must call it.
        """
        total_norm, self._clip = clip_grad_norm(
            self, self._clip, max_norm, norm_type, error_if_nonfinite
        )
        return total_norm

    def reload_master_weights(self) -> None:
        """Take the float32 master weights from the parameters again, at the next step: after
        writing to 16-bit parameters yourself once training has begun (else the next step
        overwrites them with the rounded master weights). No collectives.
        """
        self._forget_consolidated()
        self.sharding.reload_master_weights()

    def close(self) -> None:
        """Take this optimizer's hooks off the models it was attached to: the DDP model of
        :meth:`reduce_scatter_gradients` all-reduces again, and the hooks of
        :meth:`overlap_param_sync` go once the sync in flight landed; the optimizer keeps
        working, and another can attach. Dropping the optimizer does the same. Idempotent.
        An error on every rank while ``p.grad`` holds reduce-scattered gradients.
        Collective: every rank must call it (the DDP models' collectives must match).
        """
        with Agreement(self._data_parallel, "close()"):
            self.sharding.sync.wait_all(settle=True)
            grad_reduction.check_no_reduced_grads_held(self.sharding, self.param_groups)
        grad_reduction.detach(self.sharding)
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

    # -- state dicts (formats and loading: checkpoint.py) --------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's state in the sharded format, for ``torch.distributed.checkpoint``; or,
        on the rank that :meth:`consolidate_state_dict` just gathered the state on, that whole
        state in torch's format (once, and only if the state has not changed since).

        ``dcp.save({"optim": optimizer}, ...)`` saves it (each rank writes only its ranges;
        a load at another world size reads those it owns); pickled on one rank of several it
        warns, once. Every tensor comes with checksums, which a load verifies. Asked for
        whole tensors by torch's distributed state-dict API (on every rank), it gives
        :meth:`full_state_dict`'s on every rank. No collectives otherwise. State-dict hooks
        run as torch runs them. See ``docs/checkpoints.md``.
        """
        self.sharding.sync.wait_all()
        whole = full_state_dict_requested()  # (torch's API, every rank: collective)
        consolidated, self._consolidated = self._consolidated, None
        if consolidated is not None and not whole and not self.sharding.any_replaced():
            current = checkpoint.with_current_groups(self, consolidated)
            return self._after_state_dict_hooks(current)
        self._state_dict_pre_hooks()
        if whole:
            state_dict = checkpoint.assembled_full_state_dict(
                self, None, operation="get_optimizer_state_dict(full_state_dict=True)"
            )
            return self._after_state_dict_hooks(state_dict)
        return self._after_state_dict_hooks(checkpoint.sharded_state_dict(self))

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the whole state on rank ``to`` (``None``: every rank), whose next
        :meth:`state_dict` call returns it in torch's format unless the state changed in
        between (then the sharded format again). As ``ZeroRedundancyOptimizer``'s, so code
        written for ZeRO works unchanged (Lightning, and this package's HF Trainer callback,
        call it on every rank, then ``state_dict()`` on rank 0 alone).
        Collective: every rank of the process group must call it.
        """
        self._consolidated = None
        with shares_failure(self.sharding.data_parallel, "consolidate_state_dict()"):
            self.sharding.sync.wait_all(settle=True)
            self._state_dict_pre_hooks()
        self._consolidated = checkpoint.assembled_full_state_dict(
            self, to, operation="consolidate_state_dict()"
        )

    def _forget_consolidated(self) -> None:
        """The state is about to change: a consolidated copy would be stale."""
        self._consolidated = None

    def full_state_dict(
        self, to: int | None = 0, *, chunk_numel: int = checkpoint.DEFAULT_CHUNK_NUMEL
    ) -> dict[str, Any] | None:
        """``torch.optim.RMSprop``'s state dict, assembled on rank ``to`` (all ranks if None;
        others get None): CPU tensors shaped like the parameters, with their checksums, that
        torch's and this ``load_state_dict`` and ``torch.load(..., weights_only=True)`` read.
        The receiving rank needs memory for it plus one chunk of ``chunk_numel`` elements.
        Collective: every rank of the process group must call it.
        """
        with shares_failure(self.sharding.data_parallel, "full_state_dict()"):
            self.sharding.sync.wait_all(settle=True)
            self._state_dict_pre_hooks()
        state_dict = checkpoint.assembled_full_state_dict(self, to, chunk_numel=chunk_numel)
        return None if state_dict is None else self._after_state_dict_hooks(state_dict)

    def _state_dict_pre_hooks(self) -> None:
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)

    def _after_state_dict_hooks(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch's format (from ``torch.optim.RMSprop`` or :meth:`full_state_dict`) or
        the sharded one (from :meth:`state_dict` through DCP).

        Every rank passes the same state dict and keeps the ranges it owns; the group
        options come from ``state_dict``, as in torch. Everything is checked (types, shapes,
        the checksums of what this rank loads) and agreed on before anything changes: a bad
        or damaged state dict raises ``ValueError`` on every rank, the optimizer as it was.
        Load-state-dict hooks run as torch runs them.

        Collective: every rank of the process group must call it.
        """
        self._forget_consolidated()
        with shares_failure(self.sharding.data_parallel, "load_state_dict()"):
            self.sharding.sync.wait_all(settle=True)
            if isinstance(state_dict, Mapping):
                state_dict = dict(state_dict)  # a shallow copy for the hooks, as torch's
            for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
                result = pre_hook(self, state_dict)
                if result is not None:
                    state_dict = result
        checkpoint.load_into(self, state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- communication modes (grad_reduction.py, param_overlap.py) ---------------------------

    def reduce_scatter_gradients(self, ddp_model: DistributedDataParallel) -> None:
        """Let ``ddp_model`` reduce-scatter the gradients into this optimizer's shards instead
        of all-reducing them: with the parameter sync, a step then moves the bytes of one
        all-reduce, as DDP alone does, instead of 1.5 times that.

        After a synchronised backward, ``p.grad`` holds the average over the ranks in the
        elements this rank owns and this rank's own gradient elsewhere. Accumulate under
        ``ddp_model.no_sync()``; a change of ``p.grad`` after the backward is refused at the
        next step (scale the loss instead; clip with :meth:`clip_grad_norm_`); not with
        Join. What ``ddp_model`` must be, and why: ``docs/communication.md``.

        Collective: every rank must call it, before the first backward.
        """
        grad_reduction.attach(self.sharding, ddp_model, self.param_groups)

    def overlap_param_sync(self, model: nn.Module) -> ParamSyncOverlap:
        """Leave the parameter sync running after :meth:`step` until ``model``'s forward
        needs each parameter, so it overlaps with the forward instead of ending the step.

        Each module's forward waits for the buckets that hold its parameters, and so do
        ``model.state_dict()``, ``model.load_state_dict()`` and every method of the optimizer.
        Anything else that reads or changes parameters after :meth:`step` (an EMA update,
        ``p.clamp_()``) must call :meth:`wait_for_params` first: until then the elements
        other ranks own read NaN, and a change is an error when the sync is waited for.
        Parameters are those of the blocking sync, bit for bit. Not with Join or
        ``torch.compile`` of the model; not a collective (``docs/communication.md``).

        Returns the hooks' owner, whose ``remove()`` makes :meth:`step` blocking again.
        """
        return param_overlap.overlap(self.sharding, model)

    def wait_for_params(self) -> None:
        """Wait for the parameter sync that :meth:`step` left running
        (:meth:`overlap_param_sync`): every parameter is whole on return. Call it before
        reading or changing parameters outside the model's forward. A no-op otherwise."""
        self.sharding.sync.wait_all()

    # -- what it holds --------------------------------------------------------------------------

    def memory(self) -> dict[str, list[Tensor]]:
        """This rank's own buffers by kind, parameters and gradients aside: ``state``,
        ``master`` (float32 master weights), ``steps``, ``grad_window`` (where the owned
        gradient slices are staged) and ``grad_reduction`` (:meth:`reduce_scatter_gradients`)."""
        return self.sharding.memory()

    def memory_bytes(self) -> dict[str, int]:
        """The bytes of :meth:`memory`, by kind."""
        return {
            kind: sum(t.numel() * t.element_size() for t in tensors)
            for kind, tensors in self.memory().items()
        }

    @property
    def shares_host_memory(self) -> bool:
        """Whether some flat buffer (parameters and shards) is mapped by every rank of the
        host (``host_shared=True``, where it could be had)."""
        return self.sharding.sync.shares_host_memory

    @property
    def sync_path(self) -> str:
        """How the updated shards reach every rank: "broadcast" or "all_gather" (``param_sync``
        resolved for the backend), "host_shared" (a barrier), both joined by "and" where
        buckets differ, or "none" (one rank)."""
        return self.sharding.sync.describe()

    # -- uneven inputs (joining.py) ------------------------------------------------------------

    def join_hook(self, **kwargs: Any) -> JoinHook:
        """The hook that lets a rank out of data follow the others' steps under
        ``Join([ddp_model, optimizer])``: it still updates the shard it owns, with the
        others' options and gradients (:mod:`sharded_rmsprop.joining`). Not with
        :meth:`overlap_param_sync`."""
        return joining.FollowHook(self, self._step_on)

    @property
    def join_device(self) -> torch.device:
        return self.sharding.data_parallel.control_device()

    @property
    def join_process_group(self) -> Any:
        return self.sharding.data_parallel.group


# The constructor's arguments as the schema defines them (options.py), for inspect.signature()
# and help().
ShardedRMSprop.__init__.__signature__ = schema.signature(ShardedRMSprop.__init__)
if ShardedRMSprop.__doc__ is not None:  # (None under python -OO)
    ShardedRMSprop.__doc__ = ShardedRMSprop.__doc__.replace(
        "        ARGUMENTS (from sharded_rmsprop/options.py)", schema.documented(indent=" " * 8)
    )
