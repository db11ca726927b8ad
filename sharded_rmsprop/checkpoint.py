"""Saving and loading ShardedRMSprop's state: torch's format, and sharded for DCP.

Two formats:

- **torch format**, ``{"state": {index: {"step", "square_avg", ...}}, "param_groups": [...],
  "checksums": {...}}``: what ``torch.optim.RMSprop.state_dict()`` returns (full tensors shaped
  like the parameters), plus the checksums of its tensors, which torch ignores.
  :func:`assembled_full_state_dict` assembles it on one rank (or all) chunk by chunk, so the
  receiving rank's extra memory is the output plus one chunk. It holds only tensors and plain
  containers: ``torch.load(..., weights_only=True)`` reads it.
- **sharded format**, what ``optimizer.state_dict()`` returns for
  ``torch.distributed.checkpoint`` (DCP): the same structure, but each buffer, and its
  checksums, is a :class:`~sharded_rmsprop.shard_view.ShardView` of which this rank holds
  only the range it owns, so each rank writes only its ranges and a load at another world
  size reads whatever saved ranges overlap the new owned ones. ``param_shapes`` says which
  parameters it was saved for.

Every tensor written carries checksums (:mod:`sharded_rmsprop.checksums`). :func:`load_into`
accepts both formats: it checks everything (:mod:`sharded_rmsprop.validation`), checksums of
what this rank loads included, then the ranks agree, and only then does it copy, so a bad or
damaged state dict is an error on every rank that leaves the optimizer as it was.

Run ``python -m sharded_rmsprop.checkpoint DCP_DIR OUT.pt`` to turn a DCP checkpoint into one
torch-format file offline. Nothing here unpickles arbitrary objects: non-tensor entries are
plain data read with ``weights_only=True`` (:class:`SafeLoadPlanner`), and DCP's ``.metadata``
file, a pickle that torch's own reader unpickles whatever it holds, is read through
:class:`~sharded_rmsprop.dcp_reader.SafeFileSystemReader`, which admits only what DCP's
metadata is made of. Pass that reader to ``dcp.load`` to load an untrusted directory.
"""

from __future__ import annotations

import argparse
import io
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from .agreement import Agreement, Fact
from .checksums import BLOCK_NUMEL, block_checksums, block_count
from .dcp_reader import SafeFileSystemReader, plain_bytes
from .memory_order import flat_source, in_order, parse_layout_entry, shaped
from .facts import TORCH_ONLY_OPTIONS, state_facts
from .shard_view import ShardView, new_origin
from .shards import MASTER_KEY, ShardedBucket
from .validation import validated

if TYPE_CHECKING:
    from .sharding import ShardedOptimizer

__all__ = [
    "DEFAULT_CHUNK_NUMEL",
    "SafeLoadPlanner",
    "assembled_full_state_dict",
    "dcp_to_torch_format",
    "load_into",
    "sharded_state_dict",
    "with_current_groups",
]

#: Elements streamed per message by :func:`full_state_dict` unless told otherwise (16 MiB fp32).
DEFAULT_CHUNK_NUMEL = 1 << 22

# -- what the optimizer holds, parameter by parameter ----------------------------------------------


def _saved_buffers(bucket: ShardedBucket, keys: Sequence[str]) -> dict[str, Tensor]:
    """The shard-sized buffers a checkpoint holds for ``bucket``: each allocated one (master
    weights as :meth:`~ShardedBucket.saved_master` has them), and for one not allocated yet
    what it would hold (allocating it here would fix the master weights before the model's
    weights are loaded)."""
    saved = {}
    for key in keys:
        if key == MASTER_KEY:
            saved[key] = bucket.saved_master()
        else:
            saved[key] = bucket.state.get(key)
            if saved[key] is None:
                saved[key] = bucket.new_state(key, 0, bucket.shard.numel())
    return saved


def user_entries(opt: ShardedOptimizer) -> dict[Any, Any]:
    """The entries of ``optimizer.state`` under keys that are not parameters (a state-dict
    hook's, say): saved and loaded as they are, as torch does, in both formats."""
    return {key: value for key, value in opt.state.items() if not isinstance(key, Tensor)}


def _packed_groups(opt: ShardedOptimizer) -> list[dict[str, Any]]:
    """``param_groups`` as torch.optim.RMSprop.state_dict() writes them."""
    packed: list[dict[str, Any]] = []
    ids: dict[int, int] = {}  # a parameter listed again (groups repeated) keeps its id, as in torch
    for group in opt.param_groups:
        # copies: DCP loads into this dict in place, and a tensor lr is the group's own
        entry = {
            k: v.clone() if isinstance(v, Tensor) else v for k, v in group.items() if k != "params"
        }
        for key, value in TORCH_ONLY_OPTIONS.items():  # so that torch sees its own format
            entry.setdefault(key, value)
        entry["params"] = [ids.setdefault(id(p), len(ids)) for p in group["params"]]
        packed.append(entry)
    return packed


# -- sharded format (DCP) ------------------------------------------------------------------------


def sharded_state_dict(opt: ShardedOptimizer) -> dict[str, Any]:
    """This rank's state in the sharded format (see the module docstring); no collectives.

    Every parameter gets an entry, with ``step`` 0 where torch would have no state yet, so
    that the structure depends only on the parameters and options and a freshly built
    optimizer can receive a checkpoint. The tensors are copies; master weights are saved
    under ``master_weight``. Each rank's range of a parameter is made of whole checksum
    blocks, so its checksums are a range of the parameter's too. At world size 1 the one
    rank's range is the whole of every buffer: plain (flat) tensors, nothing to shard.
    """
    state: dict[int, dict[str, Tensor]] = {}
    checksums: dict[int, dict[str, Tensor]] = {}
    sharding = opt.sharding
    origin = new_origin()  # (its ShardViews warn once if the dict is pickled on one rank)
    whole = sharding.data_parallel.world_size == 1
    buffers = {
        id(bucket): _saved_buffers(bucket, bucket.needed_keys(opt.param_groups))
        for bucket in sharding.buckets
    }
    for bucket, position in sharding.positions_by_index():
        slot = bucket.plan.slots[position]
        step = bucket.steps[position].clone()
        entry, sums = {"step": step}, {"step": block_checksums(step)}
        piece = bucket.owned_piece(position)
        start, end = (piece.shard_start, piece.shard_end) if piece else (0, 0)
        offset = piece.param_start if piece else 0
        for key in bucket.keys_for(opt.param_groups[slot.group]):
            local = buffers[id(bucket)][key][start:end].clone()
            if slot.numel == 0:  # nothing to shard: a replicated empty tensor, as torch has it
                entry[key] = torch.zeros(slot.shape, dtype=local.dtype)
                sums[key] = block_checksums(entry[key])
            elif whole:
                entry[key], sums[key] = local, block_checksums(local)
            else:
                entry[key] = ShardView(local, offset, slot.numel, origin)
                sums[key] = ShardView(
                    block_checksums(local), offset // BLOCK_NUMEL, block_count(slot.numel), origin
                )
        state[slot.index], checksums[slot.index] = entry, sums
    return {
        "state": {**state, **user_entries(opt)},
        "param_groups": _packed_groups(opt),
        "param_shapes": sharding.param_layouts(),
        "checksums": checksums,
    }


# -- torch format ------------------------------------------------------------------------------


def assembled_full_state_dict(
    opt: ShardedOptimizer,
    to: int | None = 0,
    *,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    operation: str = "full_state_dict()",
) -> dict[str, Any] | None:
    """torch.optim.RMSprop's state dict on rank ``to`` (every rank if None); collective.

    Each bucket's buffers travel from their owners chunk by chunk; the receiver copies each
    chunk into CPU tensors shaped like the parameters. Other ranks return None. Master weights
    come under ``master_weight`` (torch.optim.RMSprop keeps the key but never reads it), and
    the checksums of every tensor under ``checksums`` (torch.optim.RMSprop ignores the key).
    The ranks first agree on the arguments and on every parameter's step count.
    """
    data_parallel = opt.sharding.data_parallel
    with Agreement(data_parallel, operation) as agreement:
        if to is not None and not (isinstance(to, int) and 0 <= to < data_parallel.world_size):
            raise ValueError(
                f"to={to!r} is not a rank of a process group of size {data_parallel.world_size}"
            )
        if not (isinstance(chunk_numel, int) and chunk_numel >= 1):
            raise ValueError(f"chunk_numel must be an integer of at least 1, got {chunk_numel!r}")
        arguments = Fact("the arguments", (to, chunk_numel), lambda i: ("to", "chunk_numel")[i])
        # (replaced parameters are saved as they are now)
        replaced = opt.sharding.scan(opt.param_groups).replaced_fact(opt.param_groups)
        agreement.facts = [
            arguments,
            *state_facts(opt.param_groups, opt.sharding.buckets),
            replaced,
        ]
    receiving = to is None or to == data_parallel.rank
    state: dict[int, dict[str, Tensor]] = {}
    for bucket in opt.sharding.buckets:
        stateful = [pos for pos in range(len(bucket.params)) if bucket.steps[pos] > 0]
        outputs = {pos: {"step": bucket.steps[pos].clone()} for pos in stateful}
        for key, buffer in _saved_buffers(bucket, list(bucket.state)).items():  # (alike on all)
            targets = [
                (bucket.plan.slots[pos], _cpu_zeros(bucket, pos, outputs[pos], key, buffer.dtype))
                for pos in stateful
                if key in bucket.keys_for(opt.param_groups[bucket.plan.slots[pos].group])
            ]
            for flat_start, chunk in data_parallel.stream_shards(buffer, to, chunk_numel):
                _scatter_chunk(chunk, flat_start, targets)
        if receiving:
            for pos in stateful:
                state[bucket.plan.slots[pos].index] = outputs[pos]
    if not receiving:
        return None
    state = dict(sorted(state.items()))
    checksums = {
        index: {key: block_checksums(value) for key, value in entry.items()}
        for index, entry in state.items()
    }
    state.update(user_entries(opt))
    return {"state": state, "param_groups": _packed_groups(opt), "checksums": checksums}


def with_current_groups(opt: ShardedOptimizer, consolidated: Mapping[str, Any]) -> dict[str, Any]:
    """A consolidated torch-format state dict with the optimizer's param groups and non-parameter
    state entries as they are now (a scheduler may have changed ``lr`` since), as torch's
    ZeroRedundancyOptimizer gives them."""
    state = {index: consolidated["state"][index] for index in consolidated["checksums"]}
    return {
        "state": {**state, **user_entries(opt)},
        "param_groups": _packed_groups(opt),
        "checksums": consolidated["checksums"],
    }


def _cpu_zeros(
    bucket: ShardedBucket, position: int, entry: dict[str, Tensor], key: str, dtype: torch.dtype
) -> Tensor:
    slot = bucket.plan.slots[position]
    # with the parameter's strides, as torch's zeros_like(param) state has them
    entry[key] = torch.empty_strided(slot.shape, slot.strides, dtype=dtype).zero_()
    return in_order(entry[key], slot.order)


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


def load_into(opt: ShardedOptimizer, state_dict: Mapping[str, Any]) -> None:
    """Load either format (see the module docstring); collective.

    Group options come from ``state_dict`` (as in torch); each rank copies the ranges it owns.
    Parameters absent from ``state_dict["state"]`` get no state, as in torch. Master weights
    missing from ``state_dict`` (torch's own format has none) are taken from the parameters
    at the next step, so model weights loaded after the optimizer's state count.
    """
    sharding = opt.sharding
    with Agreement(sharding.data_parallel, "load_state_dict()", translate=_unreadable) as agreement:
        scan = sharding.scan(opt.param_groups)
        loaded = validated(opt, state_dict)
        agreement.facts = [*loaded.facts(), scan.replaced_fact(opt.param_groups)]
    sharding.adopt(scan, opt.state)  # first: the master weights loaded below are not theirs
    for group, saved in zip(opt.param_groups, loaded.groups):
        # torch's rule: the saved group, with the optimizer's parameters (and their names,
        # unless the saved group names them)
        params, names = group["params"], group.get("param_names")
        group.clear()
        group.update(saved, params=params)
        if names is not None and "param_names" not in saved:
            group["param_names"] = names
    opt.state.clear()
    for bucket, position in sharding.positions_by_index():
        bucket.steps[position] = loaded.steps[bucket.plan.slots[position].index]
    for bucket in sharding.buckets:
        if bucket.steps.gt(0).any():
            bucket.allocate_state(opt.param_groups)
        if bucket.master_weights:  # those the state dict lacks come from the parameters
            for position, slot in enumerate(bucket.plan.slots):  # (alike on every rank)
                if MASTER_KEY in loaded.state.get(slot.index, {}):
                    bucket.master_pending.discard(position)
                else:
                    bucket.master_pending.add(position)
        for key, buffer in bucket.state.items():
            for piece in bucket.pieces:
                owned = buffer[piece.shard_start : piece.shard_end]
                source = loaded.state.get(piece.slot.index, {}).get(key)
                if source is None:
                    if key != MASTER_KEY:  # (missing master weights: see above)
                        owned.zero_()
                elif isinstance(source, ShardView):  # validated: exactly the owned range
                    owned.copy_(source.local)
                else:
                    flat = flat_source(source, piece.slot.order)
                    owned.copy_(flat[piece.param_start : piece.param_end])
    sharding.refresh_state(opt.state, opt.param_groups)
    opt.state.update(loaded.extras)


def _unreadable(error: Exception) -> Exception:
    """A check that failed in an unforeseen way, as the error a bad state dict gets."""
    if isinstance(error, (ValueError, RuntimeError)):
        return error
    return ValueError(f"the state dict cannot be read: {type(error).__name__}: {error}")


# -- offline conversion ----------------------------------------------------------------------------


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor entries are read with
    ``torch.load(..., weights_only=True)``: plain Python data loads, and a pickled object
    that would run code is refused. Pass it to ``dcp.load(..., planner=SafeLoadPlanner())``
    with another storage reader than :class:`~sharded_rmsprop.dcp_reader.SafeFileSystemReader`
    (which has any planner read them so).
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        super().load_bytes(read_item, plain_bytes(value))


def dcp_to_torch_format(checkpoint_dir: str, key: str = "optim") -> dict[str, Any]:
    """Read the optimizer of a DCP checkpoint into one torch-format state dict, offline.

    Runs in a single process without a process group and needs memory for the whole state.
    Every tensor is checked against its checksums; non-tensor entries are read as plain data
    only, and a ``.metadata`` holding anything DCP's metadata is not made of is refused
    (:class:`~sharded_rmsprop.dcp_reader.UnsafeMetadataError`) before any of it runs.
    Parameters that had not stepped are left out, as torch leaves them out.
    """
    reader = SafeFileSystemReader(checkpoint_dir)
    metadata = reader.read_metadata()  # (DCP's objects only: see sharded_rmsprop.dcp_reader)
    prefix = f"{key}."
    template = {
        fqn: torch.empty(meta.size, dtype=meta.properties.dtype)
        if isinstance(meta, TensorStorageMetadata)
        else None
        for fqn, meta in metadata.state_dict_metadata.items()
        if fqn.startswith(prefix)
    }
    if not template:
        keys = sorted({fqn.split(".")[0] for fqn in metadata.state_dict_metadata})
        raise ValueError(f"the checkpoint has no {key!r} entry; it has {keys}")
    planner = SafeLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    dcp.load(template, storage_reader=reader, planner=planner, no_dist=True)  # fills template
    paths = getattr(metadata, "planner_data", None) or {}
    saved = _nested(
        {tuple(paths.get(fqn, fqn.split(".")))[1:]: value for fqn, value in template.items()}
    )
    if not {"state", "param_groups", "param_shapes"} <= set(saved):
        raise ValueError(
            f"the checkpoint's {key!r} entry is not a ShardedRMSprop state dict (it has "
            f"{sorted(saved)}, not state, param_groups and param_shapes)"
        )
    groups = [saved["param_groups"][i] for i in sorted(saved["param_groups"])]
    layouts = [parse_layout_entry(entry) for entry in saved["param_shapes"]]
    full: dict[str, Any] = {"state": {}, "param_groups": groups}
    params = sorted((key for key in saved["state"] if str(key).isdigit()), key=int)
    stepped = [index for index in params if float(saved["state"][index]["step"]) > 0]
    if "checksums" in saved:  # the saved (flat) values against their checksums
        _verify_whole(
            {
                "state": {index: saved["state"][index] for index in stepped},
                "checksums": {index: saved["checksums"][str(index)] for index in stepped},
            }
        )
    for index in stepped:
        shape, order = layouts[int(index)]
        full["state"][int(index)] = {  # with the parameter's strides, as torch's state has
            name: value if name == "step" else shaped(value, shape, order)
            for name, value in saved["state"][index].items()
        }
    if "checksums" in saved:  # torch's format: checksums of the shaped tensors
        full["checksums"] = {
            index: {name: block_checksums(value) for name, value in entry.items()}
            for index, entry in full["state"].items()
        }
    else:
        warnings.warn(
            f"{checkpoint_dir} was written before checkpoints carried checksums: its values "
            "are not verified, and the converted file carries none",
            stacklevel=2,
        )
    full["state"].update({key: saved["state"][key] for key in saved["state"] if key not in params})
    return full


def _nested(flat: Mapping[tuple, Any]) -> dict[Any, Any]:
    """``{("state", "0", "step"): t}`` as ``{"state": {"0": {"step": t}}}`` (list indices
    become keys too)."""
    root: dict[Any, Any] = {}
    for path, value in flat.items():
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return root


def _verify_whole(full: Mapping[str, Any]) -> None:
    """Every element of a torch-format state dict against its checksums."""
    for index, entry in full["state"].items():
        for name, value in entry.items():
            sums = full["checksums"].get(index, {}).get(name)
            if sums is None or not torch.equal(block_checksums(value), sums):
                raise ValueError(
                    f"the checkpoint is damaged: state[{index}][{name!r}] does not match its "
                    "checksum"
                )


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
