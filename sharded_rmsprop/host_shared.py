"""Flat parameter buffers in memory shared by the ranks of one host (``host_shared=True``).

When every rank of a group runs on one machine, a bucket's flat buffer can live in one shared
mapping: each rank updates its shard in place and every other rank sees it, so the parameter
sync is a barrier instead of ``N`` broadcasts through the loopback network, and the host holds
one copy of the parameters instead of one per rank. The ranks then share that one copy: a
write to a parameter by any rank is a write for all of them.

The memory is safe to ask for:

- **Nameless.** Rank 0 creates it with ``O_TMPFILE`` in ``/dev/shm``: it never has a name, is
  ``0600`` whatever the umask, and the kernel frees it once the last rank holding it exits,
  however that rank dies. The others open it through ``/proc/<rank 0's pid>/fd/<fd>``.
- **Reserved.** ``posix_fallocate`` reserves all of it before anything is mapped, so a model
  larger than ``/dev/shm`` (Docker's default is 64 MiB) is a fallback, never a ``SIGBUS``.
- **Verified.** "One host" is not guessed from the hostname: rank 0 writes a random token,
  every rank reads it back through its own mapping, and all must see it. Containers that share
  a hostname but not memory, or a ``/proc`` that hides rank 0, fail the check.

Whatever fails, on whichever rank, every rank falls back to private buffers and rank 0 warns
once, saying why.
"""

from __future__ import annotations

import mmap
import os
import secrets
import stat
import warnings

import torch
from torch import Tensor

from .agreement import first_problem
from .comm import DataParallelGroup

__all__ = ["host_shared_zeros"]

_SHM_DIR = "/dev/shm"
_TOKEN_BYTES = 8


def host_shared_zeros(
    data_parallel: DataParallelGroup, numel: int, dtype: torch.dtype
) -> Tensor | None:
    """A zero CPU tensor of ``numel`` elements that every rank of ``ranks`` maps, or None on
    every rank (rank 0 warns why); collective. None at once for a single rank."""
    if not data_parallel.is_distributed or numel == 0:
        return None
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    problem, mapping, fd = None, None, -1
    token = secrets.randbits(62)
    if data_parallel.rank == 0:
        try:
            fd = _reserve(nbytes)
            mapping = mmap.mmap(fd, nbytes)
            mapping[:_TOKEN_BYTES] = token.to_bytes(_TOKEN_BYTES, "little")
        except OSError as error:
            problem = f"could not reserve {nbytes} bytes in {_SHM_DIR}: {error.strerror or error}"
    pid, fd_of_rank0, token = data_parallel.host_broadcast([os.getpid(), fd, token])
    if data_parallel.rank != 0 and fd_of_rank0 >= 0:
        try:
            mapping = _map_rank0(pid, fd_of_rank0, nbytes)
            if int.from_bytes(mapping[:_TOKEN_BYTES], "little") != token:
                problem = "its mapping does not show what rank 0 wrote (not the same host memory)"
        except OSError as error:
            problem = f"could not map rank 0's memory: {error.strerror or error}"
    problem = first_problem(data_parallel, problem)
    if fd >= 0:
        os.close(fd)  # every rank has mapped it or given up; the mappings keep the memory
    if problem is not None:
        if data_parallel.rank == 0:
            warnings.warn(
                f"ShardedRMSprop(host_shared=True): the ranks keep private buffers, because on "
                f"{problem}",
                stacklevel=4,
            )
        return None
    if data_parallel.rank == 0:
        mapping[:_TOKEN_BYTES] = bytes(_TOKEN_BYTES)  # zeros again, before anyone reads them
    return torch.frombuffer(mapping, dtype=dtype, count=numel)  # keeps the mapping alive


def _reserve(nbytes: int) -> int:
    """A nameless ``0600`` file of ``nbytes`` in ``/dev/shm``, its pages reserved; its fd."""
    if not hasattr(os, "O_TMPFILE"):
        raise OSError("this platform has no O_TMPFILE")
    fd = os.open(_SHM_DIR, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen 0600, but an odd one could narrow it
        os.posix_fallocate(fd, 0, nbytes)
    except OSError:
        os.close(fd)
        raise
    return fd


def _map_rank0(pid: int, fd: int, nbytes: int) -> mmap.mmap:
    """Map rank 0's file through ``/proc``, after checking it is one of ours of the right size
    (never creating or resizing anything)."""
    own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        info = os.fstat(own)
        if not stat.S_ISREG(info.st_mode) or info.st_size != nbytes or info.st_uid != os.getuid():
            raise OSError(f"/proc/{pid}/fd/{fd} is not rank 0's buffer")
        return mmap.mmap(own, nbytes)
    finally:
        os.close(own)
