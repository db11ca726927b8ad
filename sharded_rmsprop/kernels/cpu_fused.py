"""The fused CPU update: torch's RMSprop in one pass over memory, as a small C++ loop.

:func:`rmsprop_cpu_fused_` has the signature and semantics of
:func:`~sharded_rmsprop.kernels.rmsprop_reference_` (``torch.optim.RMSprop``'s algorithm) on
1-D contiguous CPU shards of float32, bfloat16, float16 or float64. It reads every input once
and writes every output once (``grad`` is only read): 20 bytes per float32 element plain, 28
with momentum or centered, 36 with both (twice that for float64), where the reference runs
seven eager ops, each a pass of its own with temporaries. The arithmetic is float32 (float64
for float64 shards, as torch computes them), rounded once on store. Float32 master
weights with a bfloat16 or float16 ``low_precision_param`` write 2 bytes more per element
(22 / 30 / 38), the new value rounded in the same pass. A ``grad_scale`` costs nothing: it
joins the factor the gradient is already multiplied by (1, or -1 for ``maximize``).

Why a C++ loop: the update is memory-bound, so what matters is one pass over memory and a
small first-use cost. A C++ loop built once per machine (``load_inline`` without torch's
headers, called through ctypes: a few seconds to build, about 0.1 s to load from the cache)
runs at memory speed; ``torch.compile`` runs as fast but pays its compile time in every
process and for every option set, plus dynamo's guards on every call. The measurements behind
this choice are in ``benchmarks/results/kernels_cpu_design.md``.

Instruction sets: float32 is memory-bound and the x86-64 baseline (SSE2) is as fast as AVX2
and AVX-512, but the 16-bit conversions make an SSE2 loop slower than torch's own vectorised
ops. So the loop is compiled three times through ``target`` attributes and the library picks
the best version the CPU supports when it loads: no ``-march`` flag, one binary for any
x86-64 machine. :func:`cpu_fused_preferred` says whether the fused path is the faster one for
a dtype with the instruction set in use.

Build and cache
---------------
:func:`cpu_fused_available` builds ``cpu_fused.cpp`` (next to this module, shipped as
package data) on first use (needs a C++ compiler with OpenMP, ``$CXX`` or ``c++``, and the
``ninja`` executable on ``PATH``, as ``torch.utils.cpp_extension`` does) into
``$TORCH_EXTENSIONS_DIR`` or torch's default ``~/.cache/torch_extensions``, in
``sharded_rmsprop_cpu_<hash>``: the hash covers the source, the flags, the torch and Python
versions and the machine type, so versions never share a build. Concurrent first uses (the
ranks of one machine) take turns on an ``flock``: one builds, the others wait and load its
result. A failed build emits one ``RuntimeWarning`` with the compiler's message and makes
:func:`cpu_fused_available` return ``False``, for the caller to fall back to the reference.

Threads: ``torch.get_num_threads()`` OpenMP threads (torch's own OpenMP runtime), one
contiguous chunk each; spans shorter than 32768 elements run on the calling thread. The
result does not depend on the thread count nor on the instruction set.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.resources
import logging
import os
import platform
import sys
import threading
import time
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor

from .contract import KernelRules, check_update_arguments, mark_written

try:
    import fcntl
except ImportError:  # not POSIX: rely on torch's own lock file alone
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "RULES",
    "SUPPORTED_DTYPES",
    "cpu_fused_available",
    "cpu_fused_preferred",
    "rmsprop_cpu_fused_",
]

#: The kernel's C++ source, next to this module and shipped with it as package data.
_CPP_FILE = "cpu_fused.cpp"

#: Compiler flags: no -march, so the binary runs on any machine of the architecture (the
#: AVX2 and AVX-512 copies are chosen at run time); -fno-math-errno lets sqrt vectorise;
#: -ffp-contract=off keeps every product and sum rounded on its own, as torch rounds them.
_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off")
_LDFLAGS = ("-fopenmp",)

#: The kernel's code for each storage dtype, and for the dtype of ``low_precision_param``.
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

#: The storage dtypes the kernel handles; the caller routes others (complex) to the
#: reference update.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_DTYPE_CODE)

#: What the kernel takes: 1-D contiguous shards of :data:`SUPPORTED_DTYPES`, and a
#: ``grad_scale`` tensor of float32 or float64 (a float64 model's clipping factor; read once
#: with ``float()``: on the CPU, no sync).
RULES = KernelRules(
    "rmsprop_cpu_fused_",
    dtypes=SUPPORTED_DTYPES,
    flat=True,
    scale_dtypes=(torch.float32, torch.float64),
)

#: How long a process waits for another one that is building the same library before it
#: gives up and falls back to the reference update (a build takes about 6 s).
_BUILD_LOCK_TIMEOUT_S = 300.0

_load_lock = threading.Lock()
_tried = False
_kernel: Callable[..., int] | None = None
_isa_fn: Callable[[int], int] | None = None
_unavailable_reason: str | None = None
#: How many times this process ran the build step (tests check that it is at most once).
_build_attempts = 0


def cpu_fused_available() -> bool:
    """Whether the fused CPU kernel can run here; builds (or loads) it on the first call.

    The first call in a process compiles the C++ source with ``torch.utils.cpp_extension``
    (about 6 s on 2 cores) unless a finished build is already cached, then loads it. A failure
    (no C++ compiler, no ninja, a broken build) emits one warning saying why and makes this
    return ``False`` from then on, so the caller can fall back to ``rmsprop_reference_``.
    """
    return _load_kernel() is not None


def cpu_fused_preferred(dtype: torch.dtype) -> bool:
    """Whether the fused kernel is available and the faster update for ``dtype`` here.

    float32 and float64 always (memory-bound: 5-7x the reference with any instruction set);
    bfloat16 and float16 with the AVX2 or AVX-512 loops (1.5-3.2x), not with the baseline
    ones, whose conversions make them slower than the reference (0.3-1.0x).
    """
    if dtype not in _DTYPE_CODE or _load_kernel() is None:
        return False
    return dtype in (torch.float32, torch.float64) or _isa() != "baseline"


def _load_kernel() -> Callable[..., int] | None:
    """The kernel's ctypes function, or ``None`` when it cannot be built; tried once."""
    global _tried, _kernel, _unavailable_reason
    if _tried:
        return _kernel
    with _load_lock:
        if not _tried:
            try:
                _kernel = _bind(ctypes.CDLL(_build_library()))
            except Exception as exc:  # any failure means "not available", never a crash
                _unavailable_reason = _describe(exc)
                warnings.warn(
                    f"sharded_rmsprop: the fused CPU RMSprop kernel is unavailable "
                    f"({_unavailable_reason}); falling back to the reference update",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _tried = True
    return _kernel


def _build_error(exc: BaseException) -> str:
    """The informative lines of a failed build: the compiler's and ninja's messages, without
    the echoed command lines that torch's error text also holds."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [
        line
        for line in lines
        if line
        and not line.startswith(("[", "FAILED:"))
        and " -MMD " not in line
        and " -shared " not in line
    ]
    return " | ".join(kept) if kept else str(exc)


def _describe(exc: BaseException, limit: int = 1500) -> str:
    """A one-paragraph reason: the exception's type and the tail of its message."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = "..." + text[-limit:]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _bind(lib: ctypes.CDLL) -> Callable[..., int]:
    global _isa_fn
    isa = lib.sharded_rmsprop_cpu_isa
    isa.restype = ctypes.c_int
    isa.argtypes = [ctypes.c_int]
    fn = lib.sharded_rmsprop_cpu_update
    fn.restype = ctypes.c_int
    fn.argtypes = (
        [ctypes.c_int]  # dtype code
        + [ctypes.c_void_p] * 5  # param, grad, square_avg, momentum_buffer, grad_avg
        + [ctypes.c_void_p, ctypes.c_int]  # low_precision_param, its dtype code
        + [ctypes.c_int64]  # n
        + [ctypes.c_double] * 5  # -lr, alpha, 1 - alpha, eps, weight_decay
        + [ctypes.c_int, ctypes.c_double]  # has_weight_decay, momentum
        + [ctypes.c_int, ctypes.c_double, ctypes.c_int]  # maximize, grad_scale, threads
    )
    _isa_fn = isa
    return fn


#: The kernel's instruction sets, by the number the library uses for them.
_ISA_NAMES = ("baseline", "avx2", "avx512")


def _isa(request: str | None = None) -> str:
    """The instruction set the loaded kernel uses (``baseline``, ``avx2`` or ``avx512``).

    ``request`` selects a lower one than the CPU's best (for tests and benchmarks); the
    result is the one actually in use. Requires :func:`cpu_fused_available`.
    """
    if _load_kernel() is None or _isa_fn is None:
        raise RuntimeError("the fused CPU RMSprop kernel is unavailable")
    return _ISA_NAMES[_isa_fn(-1 if request is None else _ISA_NAMES.index(request))]


def _build_root() -> str:
    """torch's root for JIT extensions: ``$TORCH_EXTENSIONS_DIR`` or its per-user cache."""
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


@functools.lru_cache(maxsize=None)
def _cpp_source() -> str:
    """The kernel's C++ source, read once per process.

    Once, so that the text the build directory's hash covers is the text that is compiled,
    even if the file changes while the process runs. Through ``importlib.resources``, which
    finds package data in a normal install, an editable one and a zip alike.
    """
    return importlib.resources.files(__package__).joinpath(_CPP_FILE).read_text("utf-8")


def _build_location() -> tuple[str, str]:
    """The library's name and build directory: a hash of everything the binary depends on."""
    key = hashlib.sha256(
        "\0".join(
            (_cpp_source(), *_CFLAGS, *_LDFLAGS, torch.__version__, sys.version, platform.machine())
        ).encode()
    ).hexdigest()[:16]
    name = f"sharded_rmsprop_cpu_{key}"
    return name, os.path.join(_build_root(), name)


def _build_library() -> str:
    """Build the shared library once per machine and return its path.

    The build directory's name is a hash of everything that affects the binary (source,
    flags, torch, Python, machine), so versions never share one and a finished build is
    reused by every later process. Concurrent first uses are serialised by an ``flock`` on
    a file in that directory: the kernel releases it when its holder exits or dies, so a
    rank killed in the middle of a build cannot leave the others waiting, unlike the lock
    *file* that ``torch.utils.cpp_extension`` creates (left behind by a killed builder, it
    makes every later process wait forever; under our lock any such file is stale and is
    removed). A waiter gives up after ``_BUILD_LOCK_TIMEOUT_S`` seconds.
    """
    global _build_attempts
    name, build_dir = _build_location()
    library = os.path.join(build_dir, f"{name}.so")
    done = library + ".done"  # written after a complete build
    if os.path.exists(done) and os.path.exists(library):
        return library
    os.makedirs(build_dir, exist_ok=True)
    with _exclusive(os.path.join(build_dir, "sharded_rmsprop.lock"), _BUILD_LOCK_TIMEOUT_S):
        if os.path.exists(done) and os.path.exists(library):  # another process built it
            return library
        _build_attempts += 1
        stale = os.path.join(build_dir, "lock")  # torch's FileBaton, left by a killed build
        if os.path.exists(stale):
            os.remove(stale)
        from torch.utils.cpp_extension import load_inline

        # torch's warnings and log messages about the compiler (its name, its C++ ABI) do not
        # matter to a library whose only entry points are C functions: on success they are
        # dropped, on failure the compiler's own output says what went wrong.
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_inline(
                    name,
                    cpp_sources=[_cpp_source()],
                    extra_cflags=list(_CFLAGS),
                    extra_ldflags=list(_LDFLAGS),
                    build_directory=build_dir,
                    is_python_module=False,
                    no_implicit_headers=True,
                )
        except Exception as exc:
            reason = _build_error(exc)
            raise RuntimeError(f"building the C++ kernel in {build_dir} failed: {reason}") from exc
        finally:
            log.setLevel(level)
        with open(done + ".tmp", "w") as f:
            f.write(name)
        os.replace(done + ".tmp", done)
    return library


@contextlib.contextmanager
def _exclusive(path: str, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, polling for at most ``timeout_s`` seconds."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"waited {timeout_s:.0f} s for another process building in "
                        f"{os.path.dirname(path)} (lock {path})"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def rmsprop_cpu_fused_(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    momentum_buffer: Tensor | None,
    grad_avg: Tensor | None,
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    grad_scale: Tensor | float | None = None,
    low_precision_param: Tensor | None = None,
) -> None:
    """Update ``param`` and the state in place, in one pass; ``grad`` is read, not written.

    The :class:`~sharded_rmsprop.kernels.contract.UpdateFn` contract under :data:`RULES`:
    1-D contiguous CPU tensors of one dtype from :data:`SUPPORTED_DTYPES`; the arithmetic is
    float32 for the 32- and 16-bit dtypes, float64 for float64, rounded once on store.
    ``grad_scale``, a number or a 0-d float32 or float64 tensor, and the hyperparameters are
    rounded to
    that type, as torch's ``grad.mul_(number)`` rounds the number. ``low_precision_param`` receives the new ``param`` rounded to nearest
    even: the bits of ``low_precision_param.copy_(param)``. ``RuntimeError`` when
    :func:`cpu_fused_available` is ``False`` or the tensors are not on the CPU.
    """
    copy = low_precision_param
    written = check_update_arguments(
        RULES,
        param,
        grad,
        square_avg,
        momentum_buffer,
        grad_avg,
        momentum,
        centered,
        grad_scale,
        copy,
    )
    kernel = _load_kernel()
    if kernel is None:
        raise RuntimeError(
            f"the fused CPU RMSprop kernel is unavailable ({_unavailable_reason}); "
            f"use rmsprop_reference_"
        )
    if param.device.type != "cpu":
        raise RuntimeError(f"rmsprop_cpu_fused_ runs on CPU tensors, got tensors on {param.device}")
    n = param.numel()
    if n == 0:
        return
    # In the order of _bind's argument types.
    rc = kernel(
        _DTYPE_CODE[param.dtype],
        param.data_ptr(),
        grad.data_ptr(),
        square_avg.data_ptr(),
        None if momentum_buffer is None else momentum_buffer.data_ptr(),
        None if grad_avg is None else grad_avg.data_ptr(),
        None if copy is None else copy.data_ptr(),
        0 if copy is None else _DTYPE_CODE[copy.dtype],
        n,
        -float(lr),
        float(alpha),
        1.0 - float(alpha),
        float(eps),
        float(weight_decay),
        int(weight_decay != 0),
        float(momentum),
        int(bool(maximize)),
        1.0 if grad_scale is None else float(grad_scale),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"the fused CPU RMSprop kernel failed with code {rc}")
    mark_written(written)
