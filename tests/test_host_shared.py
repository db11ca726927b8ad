"""``host_shared=True``: verified, reserved, private to the user, gone when the ranks are.

Before, ranks of one host mapped a named ``/dev/shm`` file by default: "one host" was judged by
the hostname (containers that share it but not memory trained silently apart), a model larger
than ``/dev/shm`` died of SIGBUS, the file took the umask's mode, and a rank killed during
construction left it behind.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import tempfile
import time
import warnings

import pytest
import torch
import torch.distributed as dist

from sharded_rmsprop import ShardedRMSprop, host_shared
from spawn import run_ranks


def params_of(numel: int, dtypes=(torch.float32,)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(numel, generator=generator).to(d).requires_grad_() for d in dtypes]


def train_and_compare(params: list[torch.Tensor], opt: ShardedRMSprop) -> bool:
    """Three steps against torch.optim.RMSprop fed the same gradients."""
    reference = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.RMSprop(reference, lr=1e-2, momentum=0.9)
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        for p, q in zip(params, reference):
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    return all(torch.equal(p, q) for p, q in zip(params, reference))


def build(rank: int, world_size: int, sabotage: str | None, numel: int = 1000, dtypes=(torch.float32,)) -> dict:
    """Build with host_shared=True after breaking what ``sabotage`` names on the last rank."""
    last = rank == world_size - 1
    if sabotage == "other_memory" and last:  # a container with its own memory
        def other_memory(pid, fd, nbytes):
            own = os.open(host_shared._SHM_DIR, os.O_TMPFILE | os.O_RDWR, 0o600)
            os.posix_fallocate(own, 0, nbytes)
            return mmap.mmap(own, nbytes)
        host_shared._map_rank0 = other_memory
    if sabotage == "hidden_proc" and last:  # another pid namespace, or hidepid
        def hidden(pid, fd, nbytes):
            raise PermissionError(errno.EACCES, "Permission denied")
        host_shared._map_rank0 = hidden
    if sabotage == "full" and rank == 0:  # /dev/shm smaller than the buffer
        def no_space(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        host_shared.os.posix_fallocate = no_space
    if sabotage is not None and sabotage.startswith("/"):
        host_shared._SHM_DIR = sabotage  # a real small tmpfs
    params = params_of(numel, dtypes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = ShardedRMSprop(params, lr=1e-2, momentum=0.9, fused=False, host_shared=True)
        buckets = len(opt.sharding.buckets)
        opt.add_param_group({"params": [torch.randn(100, requires_grad=True)]})  # tries again
    return {
        "shared": [bucket.sync.shares_host_memory for bucket in opt.sharding.buckets[:buckets]],
        "later_group_shared": opt.sharding.buckets[-1].sync.shares_host_memory,
        "warnings": [str(w.message) for w in caught],
        "as_torch": train_and_compare(params, opt),
    }


def test_host_shared_is_off_by_default_and_on_when_asked() -> None:
    results = run_ranks(2, build, None)
    for result in results:
        assert result == {"shared": [True], "later_group_shared": True, "warnings": [], "as_torch": True}
    by_default = ShardedRMSprop(params_of(10)).sharding.sync.preferred
    assert [type(strategy).__name__ for strategy in by_default] == ["CollectiveSync"]


@pytest.mark.parametrize(
    "sabotage, reason",
    [
        ("other_memory", "rank 1: its mapping does not show what rank 0 wrote (not the same host memory)"),
        ("hidden_proc", "rank 1: could not map rank 0's memory: Permission denied"),
        ("full", "rank 0: could not reserve 4096 bytes in /dev/shm: No space left on device"),
    ],
)
def test_sharing_that_fails_falls_back_on_every_rank_with_one_warning(sabotage, reason) -> None:
    # two buckets (float32 and float64), then a param group added: after the first fallback
    # nothing tries again
    results = run_ranks(2, build, sabotage, 1024, (torch.float32, torch.float64))
    for rank, result in enumerate(results):
        assert result["shared"] == [False, False] and not result["later_group_shared"]
        assert result["as_torch"]
        expected = [
            "ShardedRMSprop(host_shared=True): the ranks keep private buffers, because on " + reason
        ]
        assert result["warnings"] == (expected if rank == 0 else [])


@pytest.fixture
def small_tmpfs():
    """A 1 MiB tmpfs, like a container's small /dev/shm (needs root to mount)."""
    path = tempfile.mkdtemp()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", path], capture_output=True
    ).returncode == 0
    if not mounted:
        os.rmdir(path)
        pytest.skip("cannot mount a tmpfs here (not root); the ENOSPC path is covered by 'full'")
    yield path
    subprocess.run(["umount", path], check=True)
    os.rmdir(path)


def test_a_model_larger_than_the_shared_memory_falls_back_instead_of_sigbus(small_tmpfs) -> None:
    results = run_ranks(2, build, small_tmpfs, 1 << 19)  # 2 MiB of float32 in 1 MiB
    for rank, result in enumerate(results):
        assert result["shared"] == [False] and result["as_torch"]
        assert len(result["warnings"]) == (1 if rank == 0 else 0)
    assert "No space left on device" in results[0]["warnings"][0]


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_the_shared_memory_is_0600_whatever_the_umask(umask: int) -> None:
    old = os.umask(umask)
    try:
        fd = host_shared._reserve(4096)
    finally:
        os.umask(old)
    try:
        assert os.fstat(fd).st_mode & 0o777 == 0o600
        assert os.readlink(f"/proc/self/fd/{fd}").endswith("(deleted)")  # it never had a name
    finally:
        os.close(fd)


# -- a rank killed during construction leaves nothing behind -------------------------------------


def killed_during_construction(rank: int, world_size: int, victim: int) -> None:
    def kill_self():
        os.kill(os.getpid(), signal.SIGKILL)

    if rank == victim == 0:
        reserve = host_shared._reserve
        host_shared._reserve = lambda nbytes: (reserve(nbytes), kill_self())[0]
    if rank == victim != 0:
        map_rank0 = host_shared._map_rank0
        host_shared._map_rank0 = lambda *args: (map_rank0(*args), kill_self())[0]
    ShardedRMSprop(params_of(16 << 20), host_shared=True)  # 64 MiB


def shm_used_bytes() -> int:
    info = os.statvfs(host_shared._SHM_DIR)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


@pytest.mark.parametrize("victim", [0, 1], ids=["rank 0 after reserving", "rank 1 after mapping"])
def test_a_rank_killed_during_construction_leaves_no_shared_memory_behind(victim: int) -> None:
    names, used = set(os.listdir(host_shared._SHM_DIR)), shm_used_bytes()
    with pytest.raises(Exception, match="terminated with signal SIGKILL"):
        run_ranks(2, killed_during_construction, victim, timeout=60)
    deadline = time.monotonic() + 10
    while shm_used_bytes() > used + (1 << 20) and time.monotonic() < deadline:
        time.sleep(0.1)  # the other rank is being terminated
    assert shm_used_bytes() <= used + (1 << 20)  # the 64 MiB are free again
    assert set(os.listdir(host_shared._SHM_DIR)) <= names


# -- what sharing one copy means --------------------------------------------------------------------


def in_place_writes(rank: int, world_size: int, shared: bool) -> dict:
    param = torch.ones(100, requires_grad=True)
    opt = ShardedRMSprop([param], host_shared=shared)
    for turn in range(world_size):  # each rank in turn halves the parameter
        if turn == rank:
            with torch.no_grad():
                param.mul_(0.5)
        dist.barrier()
    seen_by_all = param.detach().clone()
    dist.barrier()  # every rank has read it before rank 0 writes again
    if rank == 0:
        with torch.no_grad():
            param.fill_(7.0)  # rank 0 alone
    dist.barrier()
    return {"halved": seen_by_all[0].item(), "after_rank0_fill": param[0].item(), "opt": opt is not None}


@pytest.mark.parametrize("shared", [False, True], ids=["private", "host_shared"])
def test_in_place_writes_with_host_shared_hit_the_one_shared_copy(shared: bool) -> None:
    """Documented: with host_shared=True the ranks share one copy of the parameters, so a write
    made by every rank is applied once per rank, and a write by one rank is seen by all."""
    results = run_ranks(2, in_place_writes, shared)
    for rank, result in enumerate(results):
        assert result["halved"] == (0.25 if shared else 0.5)
        assert result["after_rank0_fill"] == (7.0 if shared or rank == 0 else 0.5)
