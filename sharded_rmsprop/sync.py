"""How the updated shards reach every rank: the sync strategies, and the phases that run them.

After each rank updates the shard it owns, every rank needs the whole of every flat buffer.
Each bucket has a strategy (:mod:`sharded_rmsprop.buffer_sync`: private buffers synced by
collectives, or one buffer the host's ranks share), which decides where its flat buffer lives
and how the other ranks' shards reach it. The optimizer calls the phases of :class:`ShardSync`,
which runs each bucket's strategy and never asks which kind it is.

A bucket's collectives start as soon as its shard is updated (:meth:`ShardSync.start`), while
the next bucket is updated, and ``step()`` returns once all have ended
(:meth:`ShardSync.finish`), or, with the sync left running behind the next forward
(:mod:`sharded_rmsprop.param_overlap`), as soon as all have started (:meth:`ShardSync.hand_over`):
then each bucket is waited for when something is about to read it (:meth:`ShardSync.wait`).
While a bucket's sync is in flight, the elements other ranks own read NaN (they are written
over before it starts), and a change of one of its parameters is an error when it is waited
for, from then on: the sync raced with it. Changes are seen by each parameter's version
counter and, for this rank's own range, by a fingerprint taken when the sync started (writes
through ``p.data``, which no counter sees).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import DataParallelGroup
from .distributed import finish_before_teardown
from .buffer_sync import BufferSync, preferred_strategies

if TYPE_CHECKING:
    from .layout import BucketPlan
    from .shards import ShardedBucket

__all__ = ["ShardSync", "wait_for_every_sync"]

#: The syncs with collectives left in flight, whatever optimizer they belong to.
_IN_FLIGHT: weakref.WeakSet[ShardSync] = weakref.WeakSet()


def wait_for_every_sync() -> None:
    """Let every sync left in flight in this process land (before parameters are read to
    build another optimizer over them, say). Its checks stay for its own optimizer to make."""
    for sync in list(_IN_FLIGHT):
        for works in sync.pending.values():
            for work in works:
                work.wait()


finish_before_teardown(wait_for_every_sync)  # (a sync left running lands before exit)


def _fingerprint(shard: Tensor) -> Tensor:
    """The sum of ``shard``'s bit patterns as integers of their own width, wrapping: a write
    that changes values changes it (short of changes that cancel exactly). Summed in that
    width, it runs at memory speed (3 ms for 12.5 M float32 on this project's CPU; a sum in
    int64 took 70 ms)."""
    if shard.is_complex():
        shard = torch.view_as_real(shard)
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[shard.element_size()]
    return torch.sum(shard.view(bits), dtype=bits)


class ShardSync:
    """The sync of a list of buckets (``buckets``, the list itself: buckets added to it later
    are synced too), each by its own strategy (``bucket.sync``), in phases: see the module
    docstring. ``host_shared`` asks for host-shared buffers first; ``param_sync`` names the
    collective of private ones."""

    def __init__(
        self,
        data_parallel: DataParallelGroup,
        host_shared: bool,
        buckets: Sequence[ShardedBucket],
        param_sync: str = "auto",
    ) -> None:
        self.data_parallel = data_parallel
        self.buckets = buckets
        #: The strategies to try for a new bucket, in order (the last, private buffers,
        #: always has one).
        self.preferred = preferred_strategies(data_parallel, host_shared, param_sync)
        self.param_sync = param_sync
        #: The collectives started for each bucket and not yet waited for (from :meth:`start`
        #: to :meth:`wait`).
        self.pending: dict[ShardedBucket, list[dist.Work]] = {}
        #: Whether :meth:`start` first writes NaN where other ranks own the bucket (set while
        #: the sync may be left running behind the next forward).
        self.marks_stale = False
        #: Each parameter's version counter when its bucket's sync was handed over, and a
        #: fingerprint of this rank's shard when it started (both checked when waited for).
        self._versions: dict[ShardedBucket, list[int]] = {}
        self._fingerprints: dict[ShardedBucket, Tensor] = {}
        #: Why the parameters cannot be trusted any more (a change raced with the sync).
        self.raced: str | None = None
        #: Fingerprint comparisons on their way to the host (see :meth:`_check_landed`).
        self._unread: list[_OnTheWay] = []

    def place(self, plan: BucketPlan) -> tuple[BufferSync, Tensor]:
        """The strategy of a new bucket for ``plan``, and its zero flat buffer: the first of
        :attr:`preferred` that has one. Collective where one allocates shared memory."""
        for strategy in self.preferred:
            flat = strategy.new_flat(plan)
            if flat is not None:
                return strategy, flat
        raise AssertionError("the private strategy always has a buffer")

    def _strategies(self) -> list[BufferSync]:
        """The strategies of the buckets, each once, in bucket order (alike on every rank)."""
        found: dict[int, BufferSync] = {}
        for bucket in self.buckets:
            found.setdefault(id(bucket.sync), bucket.sync)
        return list(found.values())

    def _all_written(self) -> None:
        for strategy in self._strategies():
            strategy.all_written()

    def describe(self) -> str:
        """How the shards reach every rank, in words: "host_shared" (barriers),
        "broadcast" or "all_gather", both for a mixture, "none" at one rank."""
        if not self.data_parallel.is_distributed:
            return "none"
        kinds = {strategy.describe() for strategy in self._strategies()}
        return " and ".join(sorted(kinds)) or self.preferred[-1].describe()

    @property
    def shares_host_memory(self) -> bool:
        """Whether some flat buffer is mapped by every rank of the host."""
        return any(strategy.shares_host_memory for strategy in self._strategies())

    def written_by_one(self) -> None:
        """After one rank wrote whole new buffers (built, or parameters adopted): the others
        wait for it where it matters (shared buffers). Collective."""
        self._all_written()

    def before_update(self) -> None:
        """Before the update writes the shards: no rank still reads parameters there (a
        shared buffer is every rank's parameters), and no sync is still in flight. Collective
        where buffers are shared."""
        self.wait_all()
        self._all_written()

    def start(self, bucket: ShardedBucket) -> None:
        """Start bringing ``bucket``'s other shards, once its own shard is updated (while the
        next bucket is). Collective, in bucket order on every rank."""
        # (of this rank's own range, which the start leaves as it is)
        fingerprint = _fingerprint(bucket.shard) if self.marks_stale else None
        works = bucket.sync.start(bucket.flat, bucket.plan, self.marks_stale)
        if works:  # (none at one rank, or for a shared buffer)
            self.pending[bucket] = works
            if fingerprint is not None:
                self._fingerprints[bucket] = fingerprint

    def finish(self) -> None:
        """After every bucket was :meth:`start` ed: every rank holds the whole of each flat
        buffer when it returns. Collective."""
        self.wait_all()
        self._all_written()

    def hand_over(self) -> None:
        """After every bucket was :meth:`start` ed: like :meth:`finish`, but the collectives of
        private buffers are left running, to be waited for by :meth:`wait`. Collective."""
        self._all_written()
        self._versions = {
            bucket: [param._version for param in bucket.params] for bucket in self.pending
        }
        if self.pending:
            _IN_FLIGHT.add(self)

    def wait(self, buckets: Iterable[ShardedBucket]) -> None:
        """Wait for the sync of ``buckets`` where it is still in flight: their parameters are
        whole on return. Raises if a parameter was changed meanwhile (it raced with the
        sync), and from then on at every wait: the parameters are not to be trusted."""
        self._check_landed()
        for bucket in buckets:
            works = self.pending.pop(bucket, None)
            if works is None:
                continue
            for work in works:
                work.wait()
            self._check_unchanged(
                bucket, self._versions.pop(bucket, None), self._fingerprints.pop(bucket, None)
            )
        self._check_landed()

    def wait_all(self, settle: bool = False) -> None:
        """:meth:`wait` for every bucket (not a collective: the collectives were started).
        ``settle``, inside a collective method's agreement: also wait for the race checks
        still on their way to the host, so that a race is found there, on every rank (on a
        GPU an event recorded in the forward, long complete by then)."""
        self.wait(list(self.pending))
        _IN_FLIGHT.discard(self)
        if settle:
            for flag in self._unread:
                flag.land()
            self._check_landed()

    def _check_unchanged(
        self, bucket: ShardedBucket, versions: list[int] | None, fingerprint: Tensor | None
    ) -> None:
        """Raise if one of ``bucket``'s parameters was changed in place (its version counter
        moved) since its sync started; send the comparison of this rank's own shard with its
        fingerprint (a change through ``p.data``, which no counter sees) on its way to the
        host, where :meth:`_check_landed` reads it."""
        changed = [
            f"shape {tuple(param.shape)}"
            for param, version in zip(bucket.params, versions or ())
            if param._version != version
        ]
        if changed:
            self._raise_raced("; ".join(changed))
        if fingerprint is not None:
            self._unread.append(_OnTheWay.of(_fingerprint(bucket.shard) != fingerprint))

    def _check_landed(self) -> None:
        """Raise if a parameter raced with the sync: once found, at every wait from then on
        (the parameters are not to be trusted). A fingerprint comparison is read once it has
        reached the host: at once on a CPU; on a GPU, when its copy has landed, so the host
        never waits for the device (a change through ``p.data`` is then reported at a later
        wait, at the latest at the next collective method's agreement, which settles them:
        :meth:`wait_all`, so that method refuses on every rank)."""
        if self.raced is None and self._unread:
            arrived = [flag for flag in self._unread if flag.landed()]
            self._unread = [flag for flag in self._unread if flag not in arrived]
            if any(flag.value() for flag in arrived):
                self._raise_raced("through p.data, in the range this rank owns")
        if self.raced is not None:
            raise RuntimeError(self.raced)

    def _raise_raced(self, what: str) -> None:
        self.raced = (
            f"ShardedRMSprop: parameters ({what}) were changed while the sync that step() "
            "left running behind the forward (overlap_param_sync) was in flight: their values "
            "are a race between the two, and may differ between ranks. Call "
            "optimizer.wait_for_params() after step() before reading or changing parameters "
            "outside the model's forward; restore the parameters from a checkpoint (this "
            "optimizer keeps raising this error)"
        )
        raise RuntimeError(self.raced)


class _OnTheWay:
    """A 0-d bool on its way from the device to the host: on a GPU, copied into pinned memory
    behind the work queued so far, readable once that copy's event has completed."""

    def __init__(self, host: Tensor, copied: torch.cuda.Event | None) -> None:
        self.host = host
        self.copied = copied

    @classmethod
    def of(cls, flag: Tensor) -> _OnTheWay:
        if flag.device.type != "cuda":
            return cls(flag, None)
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        stream = torch.cuda.current_stream(flag.device)  # (the copy's: the flag's device's)
        host.copy_(flag, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(stream)
        return cls(host, copied)

    def landed(self) -> bool:
        return self.copied is None or self.copied.query()

    def land(self) -> None:
        """Wait until it has reached the host."""
        if self.copied is not None:
            self.copied.synchronize()

    def value(self) -> bool:
        return bool(self.host)
