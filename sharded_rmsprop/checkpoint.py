"""Saving and loading ShardedRMSprop's state: torch's format, and sharded for DCP.

Two formats:

- **torch format**, ``{"state": {index: {"step", "square_avg", ...}}, "param_groups": [...]}``,
  exactly what ``torch.optim.RMSprop.state_dict()`` returns: full tensors shaped like the
  parameters. :func:`full_state_dict` assembles it on one rank (or all) chunk by chunk, so the
  receiving rank's extra memory is the output plus one chunk. It holds only tensors and plain
  containers: ``torch.load(..., weights_only=True)`` reads it.
- **sharded format**, what ``optimizer.state_dict()`` returns for
  ``torch.distributed.checkpoint`` (DCP): the same structure, but each buffer is a 1-D tensor
  of the parameter's ``numel`` of which this rank holds only the range it owns (a
  :class:`ShardView`, which tells DCP where its range lies). Each rank writes only its
  ranges, none is lost to DCP's deduplication of replicated tensors, and a load at another
  world size reads whatever saved ranges overlap the new owned ones.

:func:`load_state_dict` accepts both, validates everything first and only then copies, so a
bad state dict leaves the optimizer as it was. Run ``python -m sharded_rmsprop.checkpoint
DCP_DIR OUT.pt`` to turn a DCP checkpoint into one torch-format file offline.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from .agreement import Fact, agree
from .facts import state_facts
from .shards import MASTER_KEY, STATE_KEYS, ShardedBucket

if TYPE_CHECKING:
    from .optimizer import ShardedRMSprop

__all__ = ["ShardView", "full_state_dict", "load_state_dict", "sharded_state_dict", "dcp_to_torch_format"]

#: Elements streamed per message by :func:`full_state_dict` unless told otherwise (16 MiB fp32).
DEFAULT_CHUNK_NUMEL = 1 << 22

# Group entries torch.optim.RMSprop has beyond ours; written so torch's loader sees its own format.
_TORCH_ONLY_OPTIONS = {"capturable": False, "foreach": None, "differentiable": False}


class ShardView(torch.Tensor):
    """The range ``[offset, offset + local.numel())`` of a 1-D tensor of ``numel`` elements.

    Only DCP's checkpointing protocol (``__create_write_items__``, ``__create_chunk_list__``,
    ``__get_tensor_shard__``) is meant to touch it; its data is ``local``.
    """

    local: Tensor
    offset: int

    @staticmethod
    def __new__(cls, local: Tensor, offset: int, numel: int) -> ShardView:
        view = torch.Tensor._make_wrapper_subclass(
            cls, (numel,), dtype=local.dtype, device=local.device
        )
        view.local = local
        view.offset = offset
        return view

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(
            f"{func} was called on a ShardView: it holds one rank's range of an optimizer "
            "buffer for torch.distributed.checkpoint; use full_state_dict() for whole tensors"
        )

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(
            offsets=torch.Size([self.offset]), sizes=torch.Size([self.local.numel()])
        )

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        if self.local.numel() == 0:
            return []
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size([self.offset])),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=self._chunk(),
                    properties=TensorProperties.create_from_tensor(self.local),
                    size=self.size(),
                ),
            )
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()] if self.local.numel() else []

    def __get_tensor_shard__(self, index: MetadataIndex) -> Tensor:
        return self.local

    def __repr__(self) -> str:  # the default repr would dispatch an op
        return f"ShardView(numel={self.numel()}, offset={self.offset}, local={self.local.numel()})"


# -- what the optimizer holds, parameter by parameter ----------------------------------------------


def _homes(opt: ShardedRMSprop) -> list[tuple[ShardedBucket, int]]:
    """``(bucket, position)`` of every parameter, in the optimizer's parameter order."""
    homes = [(bucket, pos) for bucket in opt._buckets for pos in range(len(bucket.params))]
    homes.sort(key=lambda home: home[0].plan.slots[home[1]].index)
    return homes


def _param_shapes(opt: ShardedRMSprop) -> list[list[int]]:
    """Every parameter's shape, in the optimizer's parameter order."""
    return [list(bucket.plan.slots[position].shape) for bucket, position in _homes(opt)]


def _group_of(opt: ShardedRMSprop, bucket: ShardedBucket, position: int) -> dict[str, Any]:
    return opt.param_groups[bucket.plan.slots[position].group]


def _keys_for(group: Mapping[str, Any]) -> tuple[str, ...]:
    """The buffers torch.optim.RMSprop keeps for a parameter of ``group``."""
    return tuple(
        key
        for key, wanted in zip(STATE_KEYS, (True, group["momentum"] > 0, bool(group["centered"])))
        if wanted
    )


def _saved_keys(bucket: ShardedBucket, group: Mapping[str, Any]) -> tuple[str, ...]:
    """The buffers a checkpoint holds for a parameter of ``group`` in ``bucket``: torch's,
    and the master weights if the bucket keeps them."""
    return _keys_for(group) + ((MASTER_KEY,) if bucket.master_weights else ())


def _owned_copy(bucket: ShardedBucket, key: str, start: int, end: int) -> Tensor:
    """A copy of the shard range ``[start, end)`` of buffer ``key``, or of what it would
    hold if it is not allocated yet (allocating it here would fix the master weights
    before the model's weights are loaded)."""
    buffer = bucket.state.get(key)
    if buffer is not None:
        return buffer[start:end].clone()
    return bucket.new_state(key, start, end)


def _packed_groups(opt: ShardedRMSprop) -> list[dict[str, Any]]:
    """``param_groups`` as torch.optim.RMSprop.state_dict() writes them."""
    packed, index = [], 0
    for group in opt.param_groups:
        entry = {k: v for k, v in group.items() if k != "params"}
        for key, value in _TORCH_ONLY_OPTIONS.items():
            entry.setdefault(key, value)
        entry["params"] = list(range(index, index + len(group["params"])))
        index += len(group["params"])
        packed.append(entry)
    return packed


# -- sharded format (DCP) ------------------------------------------------------------------------


def sharded_state_dict(opt: ShardedRMSprop) -> dict[str, Any]:
    """This rank's state in the sharded format (see the module docstring); no collectives.

    Every parameter gets an entry, with ``step`` 0 where torch would have no state yet, so
    that the structure depends only on the parameters and options and a freshly built
    optimizer can receive a checkpoint. The tensors are copies; master weights are saved
    under ``master_weight``.
    """
    state: dict[int, dict[str, Tensor]] = {}
    for bucket, position in _homes(opt):
        slot = bucket.plan.slots[position]
        group = opt.param_groups[slot.group]
        entry: dict[str, Tensor] = {"step": bucket.steps[position].clone()}
        piece = bucket.owned_piece(position)
        start, end = (piece.shard_start, piece.shard_end) if piece else (0, 0)
        for key in _saved_keys(bucket, group):
            local = _owned_copy(bucket, key, start, end)
            if slot.numel == 0:  # nothing to shard: a replicated empty tensor, as torch has it
                entry[key] = torch.zeros(slot.shape, dtype=local.dtype)
            else:
                entry[key] = ShardView(local, piece.param_start if piece else 0, slot.numel)
        state[slot.index] = entry
    return {"state": state, "param_groups": _packed_groups(opt), "param_shapes": _param_shapes(opt)}


# -- torch format ------------------------------------------------------------------------------


def full_state_dict(
    opt: ShardedRMSprop, to: int | None = 0, *, chunk_numel: int = DEFAULT_CHUNK_NUMEL
) -> dict[str, Any] | None:
    """torch.optim.RMSprop's state dict on rank ``to`` (every rank if None); collective.

    Each bucket's buffers travel from their owners chunk by chunk; the receiver copies each
    chunk into CPU tensors shaped like the parameters. Other ranks return None. Master weights
    come under ``master_weight`` (torch.optim.RMSprop keeps the key but never reads it).
    """
    ranks = opt._ranks
    failure = None
    if to is not None and not 0 <= to < ranks.world_size:
        failure = ValueError(f"to={to} is not a rank of a process group of size {ranks.world_size}")
    if chunk_numel < 1:
        failure = ValueError(f"chunk_numel must be at least 1, got {chunk_numel}")
    arguments = Fact("the arguments", (to, chunk_numel), lambda i: ("to", "chunk_numel")[i])
    agree(ranks, "full_state_dict()", [arguments, *state_facts(opt)], failure)
    receiving = to is None or to == ranks.rank
    state: dict[int, dict[str, Tensor]] = {}
    for bucket in opt._buckets:
        stateful = [pos for pos in range(len(bucket.params)) if bucket.steps[pos] > 0]
        outputs = {pos: {"step": bucket.steps[pos].clone()} for pos in stateful}
        for key, buffer in bucket.state.items():
            targets = [
                (bucket.plan.slots[pos], _cpu_zeros(bucket, pos, outputs[pos], key, buffer.dtype))
                for pos in stateful
                if key in _saved_keys(bucket, _group_of(opt, bucket, pos))
            ]
            for flat_start, chunk in ranks.stream_shards(buffer, to, chunk_numel):
                _scatter_chunk(chunk, flat_start, targets)
        if receiving:
            for pos in stateful:
                state[bucket.plan.slots[pos].index] = outputs[pos]
    if not receiving:
        return None
    return {"state": dict(sorted(state.items())), "param_groups": _packed_groups(opt)}


def _cpu_zeros(
    bucket: ShardedBucket, position: int, entry: dict[str, Tensor], key: str, dtype: torch.dtype
) -> Tensor:
    slot = bucket.plan.slots[position]
    entry[key] = torch.zeros(slot.shape, dtype=dtype)
    return entry[key].view(-1)


def _scatter_chunk(chunk: Tensor, flat_start: int, targets: list) -> None:
    """Copy the elements of ``chunk`` (flat positions from ``flat_start``) into their params."""
    flat_end = flat_start + chunk.numel()
    for slot, flat_out in targets:
        start, end = max(slot.offset, flat_start), min(slot.end, flat_end)
        if start < end:
            flat_out[start - slot.offset : end - slot.offset].copy_(
                chunk[start - flat_start : end - flat_start]
            )


# -- loading -------------------------------------------------------------------------------------


def load_state_dict(opt: ShardedRMSprop, state_dict: Mapping[str, Any]) -> None:
    """Load either format on this rank (no collectives); validate fully, then copy.

    Group options come from ``state_dict`` (as in torch); each rank copies the ranges it owns.
    Parameters absent from ``state_dict["state"]`` get no state, as in torch. Master weights
    missing from ``state_dict`` (torch's own format has none) are taken from the parameters
    at the next step, so model weights loaded after the optimizer's state count.
    """
    groups, state = _validated(opt, state_dict)
    for group, saved in zip(opt.param_groups, groups):
        for key, value in saved.items():
            if key not in ("params", "param_names") and key not in _TORCH_ONLY_OPTIONS:
                group[key] = value
    opt.state.clear()
    for bucket, position in _homes(opt):
        entry = state.get(bucket.plan.slots[position].index)
        bucket.steps[position] = 0 if entry is None else float(entry["step"])
    for bucket in opt._buckets:
        if bucket.steps.gt(0).any():
            opt._allocate_state(bucket)
        for key, buffer in bucket.state.items():
            for piece in bucket.pieces:
                owned = buffer[piece.shard_start : piece.shard_end]
                source = state.get(piece.slot.index, {}).get(key)
                if source is None and key == MASTER_KEY:
                    bucket.master_pending.add(bucket.position_of(piece))
                elif source is None:
                    owned.zero_()
                else:
                    owned.copy_(_owned_values(source, piece.param_start, piece.param_end))
        for position, param in enumerate(bucket.params):
            if bucket.steps[position] > 0:
                opt.state[param] = bucket.param_state(position)


def _owned_values(source: Tensor, start: int, end: int) -> Tensor:
    """Elements ``[start, end)`` of a parameter's buffer, from either format."""
    if isinstance(source, ShardView):
        if source.offset != start or source.local.numel() != end - start:
            raise RuntimeError("a ShardView does not cover the range this rank owns")
        return source.local
    return source.reshape(-1)[start:end]


def _validated(
    opt: ShardedRMSprop, state_dict: Mapping[str, Any]
) -> tuple[list[Mapping[str, Any]], dict[int, Mapping[str, Any]]]:
    """Check ``state_dict`` against the optimizer; return its groups and its state by index."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(
            "not an optimizer state dict: expected a mapping with 'state' and 'param_groups', "
            f"got {type(state_dict).__name__}"
            + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, Mapping) else "")
        )
    groups, state = state_dict["param_groups"], state_dict["state"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"loaded state dict has a different number of parameter groups "
            f"({len(groups)}, the optimizer has {len(opt.param_groups)})"
        )
    for i, (saved, group) in enumerate(zip(groups, opt.param_groups)):
        lacking = [key for key in group if key not in saved and key not in ("params", "param_names")]
        if lacking:
            raise ValueError(
                f"parameter group {i} of the state dict lacks the RMSprop options {lacking}: "
                "is this a state dict of another optimizer?"
            )
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"loaded state dict contains a parameter group that doesn't match the size of "
                f"optimizer's group: group {i} has {len(saved['params'])} parameters in the "
                f"state dict and {len(group['params'])} in the optimizer"
            )
    shapes = _param_shapes(opt)
    saved_shapes = [list(shape) for shape in state_dict.get("param_shapes", shapes)]
    if saved_shapes != shapes:
        if len(saved_shapes) != len(shapes):
            detail = f"{len(saved_shapes)} parameters in the state dict, {len(shapes)} in the optimizer"
        else:
            i = next(i for i, (a, b) in enumerate(zip(saved_shapes, shapes)) if a != b)
            detail = (
                f"parameter {i} has shape {tuple(saved_shapes[i])} in the state dict and "
                f"{tuple(shapes[i])} in the optimizer"
            )
        raise ValueError(f"the state dict is for other parameters: {detail}")
    position_of = {  # saved parameter id -> (bucket, position), by order as torch does
        saved_id: home
        for saved_id, home in zip(
            (pid for saved in groups for pid in saved["params"]), _homes(opt)
        )
    }
    by_index: dict[int, Mapping[str, Any]] = {}
    for saved_id, entry in state.items():
        if saved_id not in position_of:
            raise ValueError(f"state dict has state for parameter {saved_id!r}, which no group lists")
        bucket, position = position_of[saved_id]
        slot = bucket.plan.slots[position]
        saved_group = groups[slot.group]
        _check_entry(saved_id, entry, slot.shape, bucket.plan.dtype, _keys_for(saved_group))
        by_index[slot.index] = entry
    return list(groups), by_index


def _check_entry(
    saved_id: Any, entry: Any, shape: tuple[int, ...], dtype: torch.dtype, keys: tuple[str, ...]
) -> None:
    name = f"parameter {saved_id!r}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"the state of {name} is a {type(entry).__name__}, not a mapping")
    unknown = set(entry) - {"step", *STATE_KEYS, MASTER_KEY}
    if unknown:
        raise ValueError(
            f"the state of {name} has keys {sorted(map(str, unknown))} that RMSprop does not "
            "have: is this a state dict of another optimizer?"
        )
    numel = 1
    for size in shape:
        numel *= size
    missing = {"step", *keys} - set(entry)
    if missing:
        raise ValueError(f"the state of {name} lacks {sorted(missing)}")
    for key in (*keys, MASTER_KEY) if MASTER_KEY in entry else keys:
        value = entry[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{key} of {name} is a {type(value).__name__}, not a tensor")
        expected = (numel,) if isinstance(value, ShardView) else shape
        if tuple(value.shape) != tuple(expected):
            raise ValueError(
                f"{key} of {name} has shape {tuple(value.shape)} but the parameter has shape {shape}"
            )
        if not (value.dtype.is_floating_point or value.dtype.is_complex) or (
            value.dtype.is_complex != dtype.is_complex
        ):
            raise ValueError(f"{key} of {name} has dtype {value.dtype}, the parameter {dtype}")


# -- offline conversion ----------------------------------------------------------------------------


def dcp_to_torch_format(checkpoint_dir: str, key: str = "optim") -> dict[str, Any]:
    """Read the optimizer of a DCP checkpoint into one torch-format state dict, offline.

    Runs in a single process without a process group and needs memory for the whole state.
    Parameters that had not stepped are left out, as torch leaves them out.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(checkpoint_dir, path)
        everything = torch.load(path, weights_only=False)
    if key not in everything:
        raise ValueError(f"the checkpoint has no {key!r} entry; it has {sorted(everything)}")
    saved = everything[key]
    shapes = saved["param_shapes"]
    state = {}
    for index, entry in saved["state"].items():
        if float(entry["step"]) > 0:
            shape = tuple(shapes[int(index)])
            state[int(index)] = {
                name: value if name == "step" else value.reshape(shape)
                for name, value in entry.items()
            }
    return {"state": dict(sorted(state.items())), "param_groups": saved["param_groups"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sharded_rmsprop.checkpoint",
        description="Convert the optimizer state of a DCP checkpoint into one torch.save file.",
    )
    parser.add_argument("checkpoint_dir")
    parser.add_argument("output")
    parser.add_argument("--key", default="optim", help="the optimizer's key in the checkpoint")
    args = parser.parse_args(argv)
    torch.save(dcp_to_torch_format(args.checkpoint_dir, args.key), args.output)


if __name__ == "__main__":
    main()
