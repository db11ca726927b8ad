"""The ranks agree on what they are about to do before any of them changes anything.

Every collective operation of the optimizer (construction, ``step()``, loading a state dict,
assembling a full one) starts with :func:`agree`: each rank describes what it is about to do as
a few :class:`Fact` s (which parameters have a gradient, each group's options, a pending clip,
...), and one all-reduce of their digests tells every rank whether all ranks described the same
thing. Only when they did not does a slower exchange find out which fact differs, on which
ranks, and how, so that every rank raises the same clear error. A rank that rejected its own
input (a sparse gradient, a bad state dict) takes part with its error, so the others raise too
instead of waiting in a later collective; it raises its own, more precise error.

Each agreement exchanges the same number of digests whatever the operation, and the first is
the operation's name: ranks that call different collective methods of the optimizer at the
same time pair their agreements and raise, instead of mixing unrelated collectives.

Everything here runs on the host (CPU tensors through ``DataParallelGroup.host_group``): no
host synchronisation with a GPU.
"""

from __future__ import annotations

import ast
import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Iterator, Sequence

from .comm import DataParallelGroup

__all__ = [
    "Agreement",
    "Fact",
    "agree",
    "cannot_follow",
    "digest_of",
    "first_problem",
    "follow",
    "plain",
    "shares_failure",
]

#: Digests per agreement: the operation, the local failure and up to this many minus two
#: facts (then each negated, then a flag saying whether this rank follows the others).
_SLOTS = 10

#: What a rank that follows the others contributes for each digest: less than any of them.
_FOLLOWER = -(1 << 63)

#: Error types a failing rank's error is re-raised as on the other ranks (else RuntimeError).
_ERROR_TYPES = {error.__name__: error for error in (ValueError, TypeError, RuntimeError)}


@dataclass(frozen=True)
class Fact:
    """Something every rank must see alike: ``values``, one per item.

    ``values`` holds plain data only (numbers, strings, booleans, None, tuples of them; see
    :func:`plain`): it is compared through its ``repr``. ``name`` turns an item's index into
    words for the error message, and ``advice`` says what to do about a difference.
    """

    subject: str
    values: tuple
    name: Callable[[int], str] = lambda index: f"item {index}"
    advice: str = ""


def plain(value: Any) -> Any:
    """``value`` as data whose ``repr`` reads back with :func:`ast.literal_eval` and is the same
    on every rank: one-element tensors as numbers, non-finite floats as strings."""
    if hasattr(value, "item") and callable(value.item):  # a tensor (an lr, say)
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return tuple(plain(item) for item in value)
    return value


def agree(
    data_parallel: DataParallelGroup,
    operation: str,
    facts: Sequence[Fact] = (),
    failure: BaseException | None = None,
    followable: bool = False,
) -> tuple[int, ...]:
    """Return if every rank of ``ranks`` is about to run ``operation`` on the same ``facts``
    and none failed; else raise on every rank. Collective.

    ``failure`` is this rank's own error, if its input was rejected: it is raised here, after
    the others have learnt of it (they raise an error of the same type naming this rank).
    Returns the ranks that :func:`follow` instead (they ran out of data under
    ``torch.distributed.algorithms.join.Join``): almost always none, and an error on every
    rank unless the operation is ``followable``.
    """
    if len(facts) > _SLOTS - 2:
        raise ValueError(f"at most {_SLOTS - 2} facts can be agreed on at once")
    if failure is not None:
        facts = ()  # what a failed rank found is moot; its failure is what the others learn
    followers: tuple[int, ...] = ()
    if data_parallel.is_distributed:
        texts = [operation, _describe(failure), *(repr(fact.values) for fact in facts)]
        digests = [_digest(text) for text in texts] + [0] * (_SLOTS - len(texts))
        followers, error, _ = _exchange(data_parallel, digests, texts, facts)
        if error is None and followers and not followable:
            error = cannot_follow(followers, operation)
        if error is not None and failure is None:
            raise error
    if failure is not None:
        raise failure
    return followers


class Agreement:
    """``with Agreement(data_parallel, operation) as agreement:`` runs this rank's checks
    (the body, which sets ``agreement.facts``), then :func:`agree`; collective. A body that
    raises still takes part, with its error (``translate`` may turn an unforeseen one into
    the error to report), so every rank raises. ``followers`` holds what :func:`agree`
    returned."""

    def __init__(
        self,
        data_parallel: DataParallelGroup,
        operation: str,
        *,
        followable: bool = False,
        translate: Callable[[Exception], Exception] | None = None,
    ) -> None:
        self.data_parallel, self.operation = data_parallel, operation
        self.followable, self.translate = followable, translate
        self.facts: Sequence[Fact] = ()
        self.followers: tuple[int, ...] = ()

    def __enter__(self) -> Agreement:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if error is not None and not isinstance(error, Exception):
            return False  # KeyboardInterrupt and the like: no agreement
        failure = error
        if isinstance(error, Exception) and self.translate is not None:
            failure = self.translate(error)
        self.followers = agree(
            self.data_parallel, self.operation, self.facts, failure, followable=self.followable
        )
        return False


@contextmanager
def shares_failure(data_parallel: DataParallelGroup, operation: str) -> Iterator[None]:
    """A preparation for ``operation`` whose failure the other ranks must learn of: if the
    body raises, this rank joins the agreement on ``operation`` that the others reach
    afterwards, with its error, and raises it once they know. Collective only on failure."""
    try:
        yield
    except Exception as error:
        agree(data_parallel, operation, failure=error)  # raises ``error``
        raise


def follow(data_parallel: DataParallelGroup) -> tuple[int, tuple[int, ...]]:
    """Take part in the other ranks' next agreement without a say (a rank that ran out of
    data follows the others' collectives): the digest of the operation they agreed on (see
    :func:`digest_of`) and the ranks that follow, or their error if they disagree.
    Collective."""
    followers, error, operation = _exchange(data_parallel, None, [], ())
    if error is not None:
        raise error
    return operation, followers


def cannot_follow(followers: tuple[int, ...], operation: str | None) -> RuntimeError:
    """The error of a collective method that ranks out of data under Join cannot follow."""
    return RuntimeError(
        f"ShardedRMSprop: rank(s) {', '.join(map(str, followers))} ran out of data under Join "
        "and follow only the others' clip_grad_norm_() and step(), but the others called "
        f"{operation or 'another collective method'}. Nothing was changed on any rank. Call "
        "the optimizer's other collective methods after the Join context."
    )


def digest_of(operation: str) -> int:
    """The digest an agreement on ``operation`` carries first."""
    return _digest(operation)


def _exchange(
    data_parallel: DataParallelGroup,
    digests: list[int] | None,
    texts: list[str],
    facts: Sequence[Fact],
) -> tuple[tuple[int, ...], Exception | None, int]:
    """One agreement's collectives: ``(followers, the error if the others disagree, the
    operation's digest)``. A follower (``digests`` None) gives the least int64 for every
    digest, so the maxima are the others'."""
    if digests is None:
        mine = [_FOLLOWER] * (2 * _SLOTS) + [1]
    else:
        mine = [*digests, *(-digest for digest in digests), 0]
    reduced = data_parallel.host_all_reduce_max(mine)
    followers: tuple[int, ...] = ()
    if reduced[-1] > 0:  # someone follows: who (every rank takes part, so all know)
        flags = data_parallel.host_all_gather([mine[-1]])
        followers = tuple(rank for rank, (flag,) in enumerate(flags) if flag)
    high, minus_low = reduced[:_SLOTS], reduced[_SLOTS : 2 * _SLOTS]
    error = None
    leaders_failed = bool(followers) and high[1] != _NO_FAILURE  # (followers must learn it)
    if leaders_failed or any(h != -m for h, m in zip(high, minus_low)):
        table = data_parallel.host_all_gather(mine[:_SLOTS])
        leading = [rank for rank in range(data_parallel.world_size) if rank not in followers]
        error = _explain(data_parallel, [table[rank] for rank in leading], leading, texts, facts)
    return followers, error, high[0]


def first_problem(data_parallel: DataParallelGroup, problem: str | None) -> str | None:
    """The first rank's problem, as ``"rank R: problem"``, or None if no rank has one.
    Collective: one all-reduce when there is none."""
    if not data_parallel.is_distributed:
        return None if problem is None else f"rank {data_parallel.rank}: {problem}"
    if data_parallel.all_true(problem is None):
        return None
    problems = data_parallel.host_all_gather_text(problem or "")
    rank = next(r for r, text in enumerate(problems) if text)
    return f"rank {rank}: {problems[rank]}"


def _digest(text: str) -> int:
    """62 bits of the text's hash: the digest and its negation both fit in an int64."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def _describe(failure: BaseException | None) -> str:
    return "" if failure is None else f"{type(failure).__name__}: {failure}"


#: The failure digest of a rank that did not fail.
_NO_FAILURE = _digest(_describe(None))


def _explain(
    data_parallel: DataParallelGroup,
    table: list[list[int]],
    leading: list[int],
    texts: list[str],
    facts: Sequence[Fact],
) -> Exception:
    """The error for a disagreement among the ranks ``leading`` (whose digests are ``table``);
    collective: every rank, followers too, sees the same table and so exchanges the same
    texts, and gets the same error."""
    differing = [slot for slot in range(_SLOTS) if len({row[slot] for row in table}) > 1]
    differing = differing or [1]  # they agree, but on a failure
    gather_text = data_parallel.host_all_gather_text
    said = lambda slot: gather_text(texts[slot] if slot < len(texts) else "")  # noqa: E731
    operations = said(0)
    if differing[0] == 0:
        return RuntimeError(
            "ShardedRMSprop: the ranks called different collective methods at the same time ("
            + "; ".join(f"rank {rank}: {operations[rank]}" for rank in leading)
            + "). Nothing was changed on any rank. Every rank must call the optimizer's "
            "collective methods in the same order."
        )
    operation = operations[leading[0]]
    if differing[0] == 1:
        failures = said(1)
        rank = next(rank for rank in leading if failures[rank])
        kind, _, message = failures[rank].partition(": ")
        return _ERROR_TYPES.get(kind, RuntimeError)(
            f"ShardedRMSprop.{operation} failed on rank {rank}: {message} "
            "(nothing was changed on any rank)"
        )
    slot = differing[0]
    everyone = said(slot)
    fact = facts[slot - 2] if slot - 2 < len(facts) else Fact(f"fact {slot - 2}", ())
    values = [(rank, _read(everyone[rank])) for rank in leading]
    return RuntimeError(
        f"ShardedRMSprop.{operation}: the ranks disagree on {fact.subject}: "
        f"{_first_difference(values, fact)}. Nothing was changed on any rank."
        + (f" {fact.advice}" if fact.advice else "")
    )


def _read(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _first_difference(values: list[tuple[int, Any]], fact: Fact) -> str:
    """Where the first rank that differs from the first one differs from it, in words."""
    # (compared as they were sent, by repr: 0 == 0.0, yet they may have been told apart)
    first, mine = values[0]
    rank, theirs = next((rank, value) for rank, value in values if repr(value) != repr(mine))
    if not (isinstance(mine, tuple) and isinstance(theirs, tuple)):
        return f"rank {first} has {mine!r}, rank {rank} has {theirs!r}"
    missing = object()
    for index in range(max(len(mine), len(theirs))):
        a = mine[index] if index < len(mine) else missing
        b = theirs[index] if index < len(theirs) else missing
        if repr(a) != repr(b):
            show = lambda value: "absent" if value is missing else repr(value)  # noqa: E731
            return f"{fact.name(index)} is {show(a)} on rank {first} but {show(b)} on rank {rank}"
    return f"rank {first} and rank {rank} differ"  # unreachable: the values differ somewhere
