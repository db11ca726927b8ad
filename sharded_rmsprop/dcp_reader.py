"""Reading a ``torch.distributed.checkpoint`` (DCP) directory without running code from it.

A DCP checkpoint holds two kinds of pickles, and torch's ``FileSystemReader`` and default
planner unpickle both with plain ``pickle``, which runs whatever code a crafted file asks for:

- the ``.metadata`` file (or ``__{rank}.metadata``), which every rank reads at the start of
  each ``dcp.load``;
- the non-tensor ("bytes") entries of the ``.distcp`` files, which DCP's default planner
  reads with ``torch.load(..., weights_only=False)``. (Tensors are read with
  ``weights_only=True``.)

:class:`SafeFileSystemReader` reads both as data only. Use it wherever a directory might
not be trusted::

    dcp.load(state_dict, storage_reader=SafeFileSystemReader("ckpt/step_1000"))

It admits in ``.metadata`` only the objects that DCP's own metadata is made of
(:data:`METADATA_GLOBALS`: DCP's metadata classes, ``torch.Size``, dtypes, layouts, the path
the checkpoint was written to) and refuses anything else with :class:`UnsafeMetadataError`,
naming the file and what it asked for, before anything runs. It hands the planner each bytes
entry only after reading it with ``torch.load(..., weights_only=True)`` (plain Python data,
tensors) and pickling it again, so any planner, DCP's default one included, reads plain data.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
from typing import IO, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

__all__ = [
    "METADATA_GLOBALS",
    "SafeFileSystemReader",
    "UnsafeMetadataError",
    "plain_bytes",
    "read_metadata_file",
]

_DCP = "torch.distributed.checkpoint"

#: Every ``(module, name)`` a ``.metadata`` written by torch's ``FileSystemWriter`` refers to
#: (found by unpickling the metadata of real checkpoints: tensors of every kind, sharded
#: optimizer states at 1 and 2 ranks, plain Python entries). Each only builds data.
METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        *(
            (f"{_DCP}.metadata", name)
            for name in (
                "Metadata",
                "StorageMeta",
                "MetadataIndex",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "_MEM_FORMAT_ENCODING",  # (how TensorProperties pickles its memory format)
            )
        ),
        (f"{_DCP}.filesystem", "_StorageInfo"),  # where each entry lies in the .distcp files
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a layout from its name (torch.strided)
        *(("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)),
        # StorageMeta.checkpoint_id: the directory it was written to (pickled as pathlib's up
        # to Python 3.12, as pathlib._local's from 3.13: a checkpoint from either reads)
        *(
            (module, cls.__name__)
            for cls in (pathlib.PosixPath, pathlib.WindowsPath)
            for module in ("pathlib", "pathlib._local")
        ),
    }
)


class UnsafeMetadataError(pickle.UnpicklingError):
    """A DCP ``.metadata`` file asks for something DCP's metadata never holds (or holds no
    metadata at all): it was refused before anything in it ran."""


class _MetadataUnpickler(pickle.Unpickler):
    """Python's unpickler, restricted to :data:`METADATA_GLOBALS`."""

    def __init__(self, file: IO[bytes], path: str) -> None:
        super().__init__(file, fix_imports=False)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in METADATA_GLOBALS:
            raise UnsafeMetadataError(
                f"refusing to load {self.path}: it asks for {module}.{name}, which a DCP "
                "checkpoint's metadata never holds"
            )
        if module.startswith("pathlib"):  # either Python's name for it resolves here
            return getattr(pathlib, name)
        return super().find_class(module, name)


def read_metadata_file(path: str | os.PathLike) -> Metadata:
    """The :class:`~torch.distributed.checkpoint.metadata.Metadata` pickled in ``path``,
    unpickled with only :data:`METADATA_GLOBALS` admitted (:class:`UnsafeMetadataError`
    otherwise)."""
    with open(path, "rb") as file:
        metadata = _MetadataUnpickler(file, str(path)).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeMetadataError(
            f"refusing to load {path}: it holds a {type(metadata).__name__}, not DCP metadata"
        )
    return metadata


def plain_bytes(value: io.BytesIO) -> io.BytesIO:
    """A DCP bytes entry read with ``torch.load(..., weights_only=True)`` and pickled again:
    the same plain data, in a pickle that any reader may unpickle."""
    plain = io.BytesIO()
    torch.save(torch.load(value, weights_only=True), plain)
    plain.seek(0)
    return plain


class _PlainBytesPlanner:
    """``planner`` as :meth:`FileSystemReader.read_data` uses it, given plain bytes entries."""

    def __init__(self, planner: LoadPlanner) -> None:
        self.planner = planner

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.planner.load_bytes(read_item, plain_bytes(value))

    def __getattr__(self, name: str) -> Any:  # resolve_tensor, commit_tensor
        return getattr(self.planner, name)


class SafeFileSystemReader(FileSystemReader):
    """torch's ``FileSystemReader``, reading the checkpoint's pickles as data only (see the
    module docstring): ``dcp.load(..., storage_reader=SafeFileSystemReader(path))``.

    A crafted ``.metadata`` raises :class:`UnsafeMetadataError` when read; in a ``dcp.load``
    every rank reads it, so every rank raises DCP's ``CheckpointException``, whose message
    names the file and what it asked for.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")  # DCP asks for __{rank}.metadata when .metadata is missing
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = read_metadata_file(os.path.join(self.path, name))
        if metadata.storage_meta is None:  # as torch's reader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        return super().read_data(plan, _PlainBytesPlanner(planner))
