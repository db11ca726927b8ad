"""Flat parameter buffers in memory shared by the ranks of one host.

When every rank of a gloo group runs on the same machine, a bucket's flat buffer can live in
one shared mapping (a file in ``/dev/shm``, unlinked as soon as every rank has mapped it):
each rank updates its shard in place and every other rank sees it, so the parameter sync is a
barrier instead of N broadcasts through the loopback network (measured 30 ms for 96 MB at 2
ranks on gloo, against well under 1 ms), and the host holds one copy of the parameters instead
of one per rank. Where anything is missing (no ``/dev/shm``, ranks on several hosts, a mapping
that fails on any rank), every rank agrees to fall back to private buffers and collectives.
"""

from __future__ import annotations

import os
import secrets
import socket
import zlib

import torch
from torch import Tensor

from .comm import DataParallelGroup

__all__ = ["host_shared_zeros"]

_SHM_DIR = "/dev/shm"


def host_shared_zeros(ranks: DataParallelGroup, numel: int, dtype: torch.dtype) -> Tensor | None:
    """A zero CPU tensor that all ranks of ``ranks`` map, or None on every rank; collective.

    Only for gloo groups of more than one rank; None at once (no collective) otherwise.
    """
    if not ranks.is_distributed or ranks.backend != "gloo" or numel == 0:
        return None
    one_host = ranks.all_equal(zlib.crc32(socket.gethostname().encode()))
    if not (ranks.all_true(os.path.isdir(_SHM_DIR)) and one_host):
        return None
    token = secrets.randbits(62) if ranks.rank == 0 else 0
    path = os.path.join(_SHM_DIR, f"sharded_rmsprop_{ranks.broadcast_int(token):016x}")
    created = True
    if ranks.rank == 0:
        try:
            with open(path, "xb") as f:
                f.truncate(numel * torch.empty((), dtype=dtype).element_size())
        except OSError:
            created = False
    if not ranks.all_true(created):
        return None
    try:
        flat = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    except (OSError, RuntimeError):
        flat = None
    everyone_mapped = ranks.all_true(flat is not None)
    if ranks.rank == 0:
        os.unlink(path)  # every rank has mapped it, or given up: the mappings outlive the name
    return flat if everyone_mapped else None
