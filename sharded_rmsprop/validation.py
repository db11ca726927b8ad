"""Everything a state dict must be before :meth:`ShardedRMSprop.load_state_dict` changes anything.

:func:`validated` checks a state dict of either format (torch's, or the sharded one DCP
loads) against the optimizer: its structure, the type and value of every entry, every tensor's
shape, dtype and device kind, and, when it carries checksums, that the elements this rank is
about to load match them. Anything wrong is a ``ValueError`` that names the entry, raised
before the optimizer is touched.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .agreement import Fact
from .arguments import check_hyperparameters, check_numeric_options, is_real
from .checksums import BLOCK_NUMEL, block_checksums, block_count, first_mismatch
from .facts import TORCH_ONLY_OPTIONS, options_fact
from .memory_order import flat_source, is_row_major, parse_layout_entry
from .options import FLAG_KEYS, IMPLIED, OPTION_KEYS
from .shard_view import ShardView, from_plain
from .shards import MASTER_KEY, STATE_KEYS, ShardedBucket, state_keys_for

if TYPE_CHECKING:
    from .sharding import ShardedOptimizer

__all__ = ["Validated", "validated", "verify_checksums"]

#: Group entries that are not options to load.
_NOT_OPTIONS = ("params", "param_names", *TORCH_ONLY_OPTIONS)

_DELETE_CHECKSUMS = " (if you changed the state dict on purpose, delete its 'checksums' entry)"


@dataclass(frozen=True)
class Validated:
    """A state dict that passed every check: what to load, and what the ranks compare."""

    groups: list[dict[str, Any]]  # per param group: the options and other entries to set
    state: dict[int, Mapping[str, Any]]  # each parameter's entry, by its index in the optimizer
    extras: dict[Any, Any]  # entries under other keys than a parameter's (see user_entries)
    steps: tuple[float, ...]  # every parameter's step count (0 without an entry)
    checksums_digest: str  # of the checksums of a torch-format dict, "" otherwise

    def facts(self) -> list[Fact]:
        """What every rank must have loaded alike."""
        return [
            options_fact(self.groups, subject="the loaded param-group options"),
            Fact("the loaded step counts", self.steps, lambda i: f"the step of parameter {i}"),
            Fact("the loaded checksums", (self.checksums_digest,), lambda _: "their digest"),
        ]


def validated(opt: ShardedOptimizer, state_dict: Any) -> Validated:
    """``state_dict`` checked against ``opt`` (see the module docstring); ``ValueError`` if
    anything is wrong."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(
            "not an optimizer state dict: expected a mapping with 'state' and 'param_groups', "
            f"got {type(state_dict).__name__}"
            + (
                f" with keys {sorted(map(str, state_dict))}"
                if isinstance(state_dict, Mapping)
                else ""
            )
        )
    state_dict = _with_shard_views(state_dict)
    groups = _checked_groups(opt, state_dict["param_groups"])
    _check_shapes(opt, state_dict)
    places = _places_by_saved_id(opt, state_dict["param_groups"])
    state = state_dict["state"]
    if not isinstance(state, Mapping):
        raise ValueError(f"state_dict['state'] is of type {type(state).__name__}, not a mapping")
    # torch's rule: the ids the groups list (integers, or names as torch's distributed
    # state-dict API writes them) are parameters, other keys are entries of the user's
    extras = {key: entry for key, entry in state.items() if key not in places}
    state = {key: entry for key, entry in state.items() if key in places}
    unlisted = [key for key in extras if isinstance(key, int) and not isinstance(key, bool)]
    if unlisted:
        raise ValueError(
            f"state dict has state for parameter {unlisted[0]!r}, which no group lists"
        )
    # the sharded format (its shapes checked above) holds flat tensors at world size 1
    flat = "param_shapes" in state_dict
    by_index: dict[int, Mapping[str, Any]] = {}
    for saved_id, entry in state.items():
        bucket, position = places[saved_id]
        slot = bucket.plan.slots[position]
        _check_entry(f"state[{saved_id!r}]", entry, bucket, position, groups[slot.group], flat)
        by_index[slot.index] = entry
    checksums = state_dict.get("checksums")
    if checksums is not None:
        verify_checksums(checksums, state, places)
    steps = [0.0] * len(places)
    for index, entry in by_index.items():
        steps[index] = _number(entry["step"])
    digest = _torch_format_digest(checksums, state)
    return Validated(groups, by_index, extras, tuple(steps), digest)


def _with_shard_views(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the shards that ``torch.save`` wrote as plain data (a state dict
    of :meth:`ShardedRMSprop.state_dict` saved and loaded) made ShardViews again."""
    normal = dict(state_dict)
    for section in ("state", "checksums"):
        entries = state_dict.get(section)
        if isinstance(entries, Mapping):
            normal[section] = {
                key: {name: from_plain(value) for name, value in entry.items()}
                if isinstance(entry, Mapping)
                else entry
                for key, entry in entries.items()
            }
    return normal


# -- param groups ---------------------------------------------------------------------------------


def _checked_groups(opt: ShardedOptimizer, saved_groups: Any) -> list[dict[str, Any]]:
    """The entries to set on each of ``opt``'s groups, checked."""
    if not isinstance(saved_groups, Sequence) or isinstance(saved_groups, (str, bytes)):
        raise ValueError(
            f"state_dict['param_groups'] is of type {type(saved_groups).__name__}, not a list of "
            "param groups"
        )
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"loaded state dict has a different number of parameter groups "
            f"({len(saved_groups)}, the optimizer has {len(opt.param_groups)})"
        )
    checked, seen = [], set()
    for i, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        where = f"param_groups[{i}]"
        if not isinstance(saved, Mapping):
            raise ValueError(f"{where} is of type {type(saved).__name__}, not a mapping")
        ids = saved.get("params")
        if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
            raise ValueError(
                f"{where}['params'] is of type {type(ids).__name__}, not a list of parameter ids"
            )
        if len(ids) != len(group["params"]):
            raise ValueError(
                f"loaded state dict contains a parameter group that doesn't match the size of "
                f"optimizer's group: group {i} has {len(ids)} parameters in the state dict "
                f"and {len(group['params'])} in the optimizer"
            )
        for saved_id in ids:
            if (
                not isinstance(saved_id, (int, str))
                or isinstance(saved_id, bool)
                or saved_id in seen
            ):
                raise ValueError(
                    f"{where}['params'] holds {saved_id!r}: ids must be distinct integers"
                )
            seen.add(saved_id)
        lacking = [key for key in OPTION_KEYS if key not in saved and key not in IMPLIED]
        if lacking:
            raise ValueError(
                f"parameter group {i} of the state dict lacks the RMSprop options {lacking}: "
                "is this a state dict of another optimizer?"
            )
        options = {**IMPLIED, **{k: v for k, v in saved.items() if k not in _NOT_OPTIONS}}
        _check_options(where, options)
        names = saved.get("param_names")
        if names is not None:
            if not (
                isinstance(names, Sequence)
                and len(names) == len(ids)
                and all(isinstance(name, str) for name in names)
            ):
                raise ValueError(f"{where}['param_names'] must be {len(ids)} strings")
            options["param_names"] = list(names)
        checked.append(options)
    return checked


def _check_options(where: str, options: Mapping[str, Any]) -> None:
    check_numeric_options(where, options)
    for key in FLAG_KEYS:
        if not isinstance(options[key], bool):
            raise ValueError(f"{where}['{key}'] is {options[key]!r}, not True or False")
    try:
        check_hyperparameters(options)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _check_shapes(opt: ShardedOptimizer, state_dict: Mapping[str, Any]) -> None:
    """The sharded format says which shapes it was saved for, and in which memory order its
    flat tensors lie (:func:`~sharded_rmsprop.memory_order.layout_entry`): both must be ours,
    or elements would land elsewhere."""
    if "param_shapes" not in state_dict:
        return  # torch's format: whole tensors, checked one by one
    layouts = [parse_layout_entry(entry) for entry in opt.sharding.param_layouts()]
    try:
        saved = [parse_layout_entry(entry) for entry in state_dict["param_shapes"]]
    except (TypeError, ValueError):
        raise ValueError("state_dict['param_shapes'] must be a list of shapes") from None
    if len(saved) != len(layouts):
        detail = f"{len(saved)} parameters in the state dict, {len(layouts)} in the optimizer"
        raise ValueError(f"the state dict is for other parameters: {detail}")
    for i, ((saved_shape, was), (shape, now)) in enumerate(zip(saved, layouts)):
        if saved_shape != shape:
            raise ValueError(
                f"the state dict is for other parameters: parameter {i} has shape "
                f"{saved_shape} in the state dict and {shape} in the optimizer"
            )
        if was != now:
            raise ValueError(
                f"the state dict holds parameter {i}'s state in memory order {was} "
                f"(outermost dimension first), but the parameter is laid out in order "
                f"{now} now (its memory format changed, e.g. to or from channels_last): "
                "give it the memory format it had, or load a torch-format state dict "
                "(full_state_dict()), which holds whole tensors"
            )


def _places_by_saved_id(
    opt: ShardedOptimizer, saved_groups: Sequence[Mapping[str, Any]]
) -> dict[Any, tuple[ShardedBucket, int]]:
    """Saved parameter id -> (bucket, position), by order as torch matches them."""
    saved_ids = [saved_id for saved in saved_groups for saved_id in saved["params"]]
    return dict(zip(saved_ids, opt.sharding.positions_by_index()))


# -- per-parameter state ------------------------------------------------------------------------


def _check_entry(
    where: str,
    entry: Any,
    bucket: ShardedBucket,
    position: int,
    options: Mapping[str, Any],
    flat: bool,
) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} is of type {type(entry).__name__}, not a mapping")
    unknown = set(entry) - {"step", *STATE_KEYS, MASTER_KEY}
    if unknown:
        raise ValueError(
            f"{where} has keys {sorted(map(str, unknown))} that RMSprop does not have: is "
            "this a state dict of another optimizer?"
        )
    needed = state_keys_for(options)
    missing = {"step", *needed} - set(entry)
    if missing:
        raise ValueError(f"{where} lacks {sorted(missing)}")
    step = entry["step"]
    if isinstance(step, Tensor):
        if (
            step.numel() != 1
            or step.is_meta
            or step.is_sparse
            or step.is_complex()
            or step.dtype == torch.bool
        ):
            raise ValueError(
                f"{where}['step'] must be a number or a one-element real tensor, got "
                f"{_describe(step)}"
            )
    elif not is_real(step):
        raise ValueError(f"{where}['step'] is {step!r}, not a number")
    if not (math.isfinite(_number(step)) and _number(step) >= 0):
        raise ValueError(f"{where}['step'] is {_number(step)}, not a count of steps")
    slot = bucket.plan.slots[position]
    for key in (*STATE_KEYS, MASTER_KEY):  # every buffer there, needed or not: all are loaded
        if key in entry:
            _check_buffer(f"{where}[{key!r}]", entry[key], slot.shape, bucket, position, flat)


def _check_buffer(
    where: str,
    value: Any,
    shape: tuple[int, ...],
    bucket: ShardedBucket,
    position: int,
    flat: bool,
) -> None:
    """``flat``: a plain tensor may also be flat (the sharded format at world size 1)."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{where} is of type {type(value).__name__}, not a tensor")
    numel = math.prod(shape)
    local = value.local if isinstance(value, ShardView) else value
    if isinstance(value, ShardView):
        expected = {(numel,)}
    else:
        expected = {tuple(shape), (numel,)} if flat else {tuple(shape)}
    if tuple(value.shape) not in expected:
        raise ValueError(
            f"{where} has shape {tuple(value.shape)} but the parameter has shape {shape}"
        )
    if local.is_meta or local.is_sparse:
        raise ValueError(f"{where} is {_describe(local)}, which holds no values to load")
    kind = bucket.plan.dtype
    if (
        not (local.dtype.is_floating_point or local.dtype.is_complex)
        or local.dtype.is_complex != kind.is_complex
    ):
        raise ValueError(f"{where} has dtype {local.dtype}, the parameter {kind}")
    if isinstance(value, ShardView):
        start, end = _owned_range(bucket, position)
        if (value.offset, local.numel()) != (start, end - start):
            raise ValueError(
                f"{where} holds elements [{value.offset}, {value.offset + local.numel()}) but "
                f"this rank owns [{start}, {end}): state_dict() holds the ranges of the rank "
                "that made it, so each rank must load its own (at the same world size); "
                "full_state_dict() or torch.distributed.checkpoint load at any world size"
            )


def _owned_range(bucket: ShardedBucket, position: int) -> tuple[int, int]:
    """The elements of the parameter at ``position`` that this rank owns."""
    piece = bucket.owned_piece(position)
    return (piece.param_start, piece.param_end) if piece else (0, 0)


def _describe(tensor: Tensor) -> str:
    device = "meta" if tensor.is_meta else tensor.device.type
    return (
        f"a {'sparse ' if tensor.is_sparse else ''}{device} tensor of shape {tuple(tensor.shape)}"
    )


def _number(step: Any) -> float:
    return float(step.item()) if isinstance(step, Tensor) else float(step)


# -- checksums ----------------------------------------------------------------------------------


def verify_checksums(checksums: Any, state: Mapping[Any, Any], places: Mapping[Any, tuple]) -> None:
    """Every tensor of ``state`` has its checksums, and the blocks this rank loads match them
    (the step counts: all of them)."""
    if not isinstance(checksums, Mapping):
        raise ValueError(
            f"state_dict['checksums'] is of type {type(checksums).__name__}, not a mapping"
        )
    for saved_id, sums in checksums.items():  # nothing the checkpoint held is missing
        missing = [
            key
            for key in (sums if isinstance(sums, Mapping) else ())
            if key not in state.get(saved_id, {})
        ]
        if saved_id not in state or missing:
            what = f"state[{saved_id!r}]" + (f"[{missing[0]!r}]" if saved_id in state else "")
            raise ValueError(
                f"the checkpoint is damaged: {what} is missing, its checksums are not"
                f"{_DELETE_CHECKSUMS}"
            )
    for saved_id, entry in state.items():
        bucket, position = places[saved_id]
        sums = checksums.get(saved_id)
        for key, value in entry.items():
            where = f"state[{saved_id!r}][{key!r}]"
            expected = sums.get(key) if isinstance(sums, Mapping) else None
            if not isinstance(value, Tensor):
                continue  # a plain step number carries no checksum
            if not isinstance(expected, Tensor):
                raise ValueError(f"the checkpoint has no checksum for {where}{_DELETE_CHECKSUMS}")
            # a tensor shaped like a parameter laid out in another order than row-major:
            # its checksums are of the row-major flattening (torch's format), so all of it
            shaped_out_of_order = value.dim() > 1 and not is_row_major(
                bucket.plan.slots[position].order
            )
            whole = key == "step" or (not isinstance(value, ShardView) and shaped_out_of_order)
            _verify(where, value, expected, bucket, position, whole)


def _verify(
    where: str, value: Tensor, expected: Tensor, bucket: ShardedBucket, position: int, whole: bool
) -> None:
    if whole:
        values, start = value, 0
    elif isinstance(value, ShardView):
        values, start = value.local, value.offset
    else:
        start, end = _owned_range(bucket, position)
        values = flat_source(value, bucket.plan.slots[position].order)[start:end]
    first_block = start // BLOCK_NUMEL
    blocks = block_count(values.numel())
    if isinstance(expected, ShardView):
        if expected.offset != first_block or expected.local.numel() != blocks:
            raise ValueError(f"the checksums of {where} do not cover the elements this rank loads")
        sums = expected.local
    else:
        sums = expected.reshape(-1)[first_block : first_block + blocks]
    if sums.dtype != torch.int64 or sums.is_meta:
        raise ValueError(
            f"the checksums of {where} are {_describe(sums)} of {sums.dtype}, not int64"
        )
    block = first_mismatch(values, sums)
    if block is not None:
        first = start + block * BLOCK_NUMEL
        last = min(first + BLOCK_NUMEL, start + values.numel()) - 1
        raise ValueError(
            f"the checkpoint is damaged: {where} (parameter of shape "
            f"{bucket.plan.slots[position].shape}) does not match its checksum at elements "
            f"{first} to {last}; nothing was loaded{_DELETE_CHECKSUMS}"
        )


def _torch_format_digest(checksums: Any, state: Mapping[Any, Any]) -> str:
    """A digest of the checksums of a torch-format state dict (the same file on every rank),
    or "" for the sharded format (each rank holds its own part) and for none."""
    if checksums is None:
        return ""
    digest = hashlib.blake2b(digest_size=16)
    for saved_id in state:
        for key in sorted(checksums.get(saved_id, {})):
            sums = checksums[saved_id][key]
            if isinstance(sums, ShardView) or not isinstance(sums, Tensor):
                return ""
            digest.update(f"{saved_id}/{key}".encode())
            digest.update(repr(block_checksums(sums).tolist()).encode())
    return digest.hexdigest()
