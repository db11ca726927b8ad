"""``ShardView``: one rank's range of an optimizer buffer, as DCP sees it.

In the sharded state dict every buffer of a parameter is a 1-D tensor of the parameter's
``numel`` elements of which this rank holds only the range it owns. :class:`ShardView` is
that tensor: it tells ``torch.distributed.checkpoint`` where its range lies
(``__create_write_items__``, ``__create_chunk_list__``, ``__get_tensor_shard__``), so each
rank writes only its ranges and a load at another world size reads whatever saved ranges
overlap the ranges it now owns. Its data is ``local``; no other operation is allowed on it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

__all__ = ["ShardView"]


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
