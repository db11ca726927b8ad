"""The fused CPU update: torch's RMSprop in one pass over memory, as a small C++ loop.

:func:`rmsprop_cpu_fused_` has the signature and semantics of
:func:`~sharded_rmsprop.kernels.rmsprop_reference_` (``torch.optim.RMSprop``'s algorithm) on
1-D contiguous CPU shards of float32, bfloat16 or float16. It reads every input once and
writes every output once (``grad`` is only read): 20 bytes per float32 element plain, 28 with
momentum or centered, 36 with both, where the reference runs seven eager ops, each a pass of
its own with temporaries. All arithmetic is float32, rounded once on store.

Why a C++ extension: measured
-----------------------------
On this project's machine (2 cores, x86-64 AMD EPYC with AVX-512, torch 2.13 CPU, 2 intra-op
threads), one 12.5 M-element shard, lr 1e-3, alpha 0.99, weight_decay 0.01; ms per step,
the best call of 15 interleaved rounds, each started while the shared machine was idle;
speedup over the reference in brackets (bfloat16 and float16: their own reference rows):

=================  ===========  ===========  ===========  ============
float32            plain        momentum     centered     mom+centered
=================  ===========  ===========  ===========  ============
reference          27.6         36.3         36.3         40.6
C++, SSE2          3.9 (7.0x)   5.9 (6.1x)   5.4 (6.8x)   7.9 (5.2x)
C++, AVX2          3.9 (7.0x)   5.8 (6.2x)   4.5 (8.1x)   7.6 (5.3x)
C++, AVX-512       3.9 (7.0x)   6.0 (6.0x)   4.1 (8.9x)   7.6 (5.4x)
torch.compile      4.1 (6.7x)   6.2 (5.9x)   4.0 (9.0x)   7.6 (5.3x)
bfloat16 ref.      10.1         10.3         11.8         14.5
bf16 C++, SSE2     9.8 (1.0x)   14.4 (0.7x)  13.9 (0.9x)  18.2 (0.8x)
bf16 C++, AVX2     4.8 (2.1x)   7.0 (1.5x)   7.0 (1.7x)   9.0 (1.6x)
bf16 C++, AVX-512  3.2 (3.2x)   4.2 (2.4x)   4.5 (2.6x)   5.6 (2.6x)
float16 ref.       7.5          12.9         12.2         14.6
fp16 C++, SSE2     22.0 (0.3x)  30.2 (0.4x)  34.3 (0.4x)  40.0 (0.4x)
fp16 C++, AVX2     3.6 (2.1x)   4.4 (3.0x)   4.5 (2.7x)   6.0 (2.4x)
fp16 C++, AVX-512  4.3 (1.8x)   4.3 (3.0x)   4.0 (3.0x)   5.5 (2.6x)
=================  ===========  ===========  ===========  ============

The float32 reference's time was not stable on this shared virtual machine: the runs above
were the first hour's; an hour later it took 9.7 / 14.4 / 16.2 / 18.6 ms (then with no page
faults in its 50 MB temporaries; the earlier slowness was probably faulting them in on every
step) while the fused kernel took 3.0 / 3.6 / 5.8 / 7.2 ms: 2.4-3.3x. That is about the
ceiling against a reference at memory speed: counting each eager op's reads and writes, the
reference moves about 1350 MB per step on 12.5 M float32 elements with momentum, centered
and weight decay, the fused pass 450 MB, here at 62 GB/s, 90 % of a plain copy's 70 GB/s
(2.8 ms for 12.5 M elements). One thread takes 9.6 ms where two take 7.6.

Both fused candidates run at memory speed; what differs is the first use:

- C++ through ``torch.utils.cpp_extension.load_inline``, without torch headers, called with
  ctypes: 4-5 s to build, once per machine (three instruction-set copies of 24 loops); a
  later process loads the cached library in about 0.1 s. (A pybind11 extension including
  ``torch/extension.h`` takes 24 s to build one loop.) About 11 us per call at 1000 elements,
  against 22 us for the reference.
- ``torch.compile`` (inductor C++, ``dynamic=True``, hyperparameters as 0-d tensors, so a new
  LR or span length does not recompile): 12.9 s for the first call of a process with a cold
  cache, 1-2 s more for each further option set (weight_decay, momentum, centered, maximize
  and dtype make up to 48 graphs, past dynamo's default recompile limit of 8) and about 0.1 s
  per graph from a warm cache, in every process; plus dynamo's guards on every call.

So: the C++ kernel, as fast, with a smaller first-use cost paid once per machine.

Instruction sets: float32 is memory-bound, and the x86-64 baseline (SSE2) is as fast as AVX2
and AVX-512. The half types are not: their conversions make the SSE2 loop slower than torch's
own (vectorised) ops. So the loop is compiled three times through ``target`` attributes and
the library picks the best copy the CPU supports when it loads: no ``-march`` flag, one
binary for any x86-64 machine. :func:`cpu_fused_preferred` says whether the fused path is
the faster one for a dtype with the copy in use.

Build and cache
---------------
:func:`cpu_fused_available` builds on first use (needs a C++ compiler with OpenMP, ``$CXX``
or ``c++``, and the ``ninja`` executable on ``PATH``, as ``torch.utils.cpp_extension`` does)
into ``$TORCH_EXTENSIONS_DIR`` or torch's default ``~/.cache/torch_extensions``, in
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
import hashlib
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
from torch.autograd.graph import increment_version

try:
    import fcntl
except ImportError:  # not POSIX: rely on torch's own lock file alone
    fcntl = None  # type: ignore[assignment]

__all__ = ["SUPPORTED_DTYPES", "cpu_fused_available", "cpu_fused_preferred", "rmsprop_cpu_fused_"]

# The kernel: C++ with OpenMP and no torch headers (it compiles in a few seconds), reached
# from Python through ctypes (``extern "C"``). One loop, ``update_span``, does the whole
# update of a range of elements; the options are template parameters and the selections
# integer masks, so the compiler vectorises every variant. The loop is compiled three times,
# for the x86-64 baseline (SSE2), AVX2 and AVX-512, through ``target`` attributes, and the
# library picks the best one the CPU supports when it loads (``__builtin_cpu_supports``), so
# one binary runs on any x86-64 machine; elsewhere only the baseline copy exists. Float16 on
# AVX2 and AVX-512 converts blocks with the F16C instructions instead of bit manipulation.
# The arithmetic follows torch's op sequence in float32: the same operations in the same
# order (``addcmul`` is ``self + (value * t1) * t2``, ``addcdiv`` is ``self + (value * t1) /
# t2``, ``lerp`` switches formula at weight 0.5), each intermediate kept in float32 instead
# of being rounded to the storage dtype, and the result rounded once (to nearest even). No
# fused multiply-adds (-ffp-contract=off), so every instruction set gives the same bits.
_CPP_SOURCE = r"""
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// Selections are written as integer masks, not branches or ?:, so GCC vectorises every loop.
inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, sizeof f); return f; }
inline uint32_t to_bits(float f) { uint32_t u; std::memcpy(&u, &f, sizeof u); return u; }
inline uint32_t mask(bool c) { return 0u - uint32_t(c); }
inline uint32_t blend(uint32_t m, uint32_t a, uint32_t b) { return (a & m) | (b & ~m); }
// |x| is a NaN (signed compare: both sides are below 2^31).
inline uint32_t nan_mask(uint32_t u) { return mask(int32_t(u & 0x7FFFFFFFu) > 0x7F800000); }

struct Float32 {
  using storage_t = float;
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
};

// bfloat16: the top half of a float32; rounding as c10::BFloat16 (nearest even, NaN -> 0x7FC0).
struct BFloat16 {
  using storage_t = uint16_t;
  static inline float load(uint16_t h) { return from_bits(uint32_t(h) << 16); }
  static inline uint16_t store(float f) {
    const uint32_t u = to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return uint16_t(blend(nan_mask(u), 0x7FC0u, rounded));
  }
};

// IEEE half by integer and float bit manipulation (the branch-free method c10::Half uses),
// exact in both directions (round to nearest even) and vectorisable without F16C.
struct Float16 {
  using storage_t = uint16_t;
  static inline float load(uint16_t h) {
    const uint32_t w = uint32_t(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normal = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float subnormal = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t is_subnormal = mask(int32_t(h & 0x7FFFu) < 0x0400);  // exponent field 0
    return from_bits(sign | blend(is_subnormal, to_bits(subnormal), to_bits(normal)));
  }
  static inline uint16_t store(float f) {
    float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = to_bits(f);
    const uint32_t sign = w & 0x80000000u;
    const int32_t exp_byte = int32_t((w >> 23) & 0xFFu);              // (2 w) >> 24
    const uint32_t bias = uint32_t(exp_byte < 0x71 ? 0x71 : exp_byte) << 24;
    base = from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return uint16_t((sign >> 16) | blend(nan_mask(w), 0x7E00u, nonsign));
  }
};

struct Hyper {
  float neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum, grad_sign;
  bool lerp_small;  // |1 - alpha| < 0.5: torch's lerp computes start + w * (end - start)
};

// The whole update of elements [begin, end). Inlined into one function per instruction set
// (below), which the compiler vectorises for that set.
template <class S, bool WD, bool MOM, bool CEN>
__attribute__((always_inline)) inline void update_span(
    typename S::storage_t* __restrict param, const typename S::storage_t* __restrict grad,
    typename S::storage_t* __restrict square_avg, typename S::storage_t* __restrict momentum_buffer,
    typename S::storage_t* __restrict grad_avg, const Hyper& h, int64_t begin, int64_t end) {
  const float neg_lr = h.neg_lr, alpha = h.alpha, oma = h.one_minus_alpha, eps = h.eps;
  const float wd = h.weight_decay, mom = h.momentum, sign = h.grad_sign;
  const uint32_t lerp_from_start = mask(h.lerp_small);
  const float lerp_w = h.lerp_small ? oma : oma - 1.0f;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float p = S::load(param[i]);
    float g = S::load(grad[i]) * sign;                      // maximize: grad.neg_()
    if (WD) g = g + wd * p;                                 // grad.add_(param, alpha=wd)
    const float sq = S::load(square_avg[i]) * alpha + (oma * g) * g;
    square_avg[i] = S::store(sq);                           // mul_(alpha).addcmul_(g, g, 1-alpha)
    float avg;
    if (CEN) {
      const float ga0 = S::load(grad_avg[i]);
      const float base = from_bits(blend(lerp_from_start, to_bits(ga0), to_bits(g)));
      const float ga = base + lerp_w * (g - ga0);           // grad_avg.lerp_(g, 1 - alpha)
      grad_avg[i] = S::store(ga);
      avg = std::sqrt(sq + (-1.0f * ga) * ga);             // addcmul(ga, ga, -1).sqrt_()
    } else {
      avg = std::sqrt(sq);
    }
    avg = avg + eps;
    if (MOM) {
      const float buf = S::load(momentum_buffer[i]) * mom + g / avg;  // mul_(m).addcdiv_(g, avg)
      momentum_buffer[i] = S::store(buf);
      param[i] = S::store(p + neg_lr * buf);                // param.add_(buf, alpha=-lr)
    } else {
      param[i] = S::store(p + (neg_lr * g) / avg);          // param.addcdiv_(g, avg, -lr)
    }
  }
}

struct Args {
  void* param; const void* grad; void* square_avg; void* momentum_buffer; void* grad_avg;
  Hyper h;
};
using SpanFn = void (*)(const Args&, int64_t, int64_t);

// One copy of every (dtype, options) loop per instruction set, each compiled for its target.
#define SR_SPAN_FOR_TARGET(NAME, TARGET)                                                     \
  template <class S, bool WD, bool MOM, bool CEN>                                            \
  TARGET void span_##NAME(const Args& a, int64_t begin, int64_t end) {                       \
    using T = typename S::storage_t;                                                         \
    update_span<S, WD, MOM, CEN>(static_cast<T*>(a.param), static_cast<const T*>(a.grad),    \
                                 static_cast<T*>(a.square_avg),                              \
                                 static_cast<T*>(a.momentum_buffer),                         \
                                 static_cast<T*>(a.grad_avg), a.h, begin, end);              \
  }

SR_SPAN_FOR_TARGET(baseline, )  // x86-64 baseline (SSE2), or whatever the compiler targets

#if defined(__x86_64__) || defined(__i386__)
#define SR_X86 1
#define SR_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
SR_SPAN_FOR_TARGET(avx2, SR_AVX2)
SR_SPAN_FOR_TARGET(avx512, SR_AVX512)

// float16 with F16C: the compiler does not vectorise half conversions itself, so convert
// blocks of kBlock elements to float32 in L1-resident scratch with the F16C instructions
// (round to nearest even, as the bit-level version), run the float32 loop, convert back.
constexpr int64_t kBlock = 512;

SR_AVX2 inline void half_to_float(const uint16_t* src, float* dst, int64_t m) {
  int64_t i = 0;
  for (; i + 8 <= m; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < m; ++i) dst[i] = _cvtsh_ss(src[i]);
}

SR_AVX2 inline void float_to_half(const float* src, uint16_t* dst, int64_t m) {
  int64_t i = 0;
  for (; i + 8 <= m; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < m; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

#define SR_HALF_SPAN_FOR_TARGET(NAME, TARGET)                                                \
  template <class S, bool WD, bool MOM, bool CEN>                                            \
  TARGET void half_span_##NAME(const Args& a, int64_t begin, int64_t end) {                  \
    alignas(64) float p[kBlock], g[kBlock], sq[kBlock], mb[kBlock], ga[kBlock];              \
    uint16_t* P = static_cast<uint16_t*>(a.param);                                           \
    const uint16_t* G = static_cast<const uint16_t*>(a.grad);                                \
    uint16_t* SQ = static_cast<uint16_t*>(a.square_avg);                                     \
    uint16_t* MB = static_cast<uint16_t*>(a.momentum_buffer);                                \
    uint16_t* GA = static_cast<uint16_t*>(a.grad_avg);                                       \
    for (int64_t b = begin; b < end; b += kBlock) {                                          \
      const int64_t m = end - b < kBlock ? end - b : kBlock;                                 \
      half_to_float(P + b, p, m); half_to_float(G + b, g, m); half_to_float(SQ + b, sq, m);  \
      if (MOM) half_to_float(MB + b, mb, m);                                                 \
      if (CEN) half_to_float(GA + b, ga, m);                                                 \
      update_span<Float32, WD, MOM, CEN>(p, g, sq, mb, ga, a.h, 0, m);                       \
      float_to_half(p, P + b, m); float_to_half(sq, SQ + b, m);                              \
      if (MOM) float_to_half(mb, MB + b, m);                                                 \
      if (CEN) float_to_half(ga, GA + b, m);                                                 \
    }                                                                                        \
  }

SR_HALF_SPAN_FOR_TARGET(avx2, SR_AVX2)
SR_HALF_SPAN_FOR_TARGET(avx512, SR_AVX512)
#endif

// t[(wd << 2) | (momentum << 1) | centered] = FN<S, wd, momentum, centered>
#define SR_FILL(t, FN, S)                                                       \
  t[0] = FN<S, false, false, false>; t[1] = FN<S, false, false, true>;          \
  t[2] = FN<S, false, true, false>;  t[3] = FN<S, false, true, true>;           \
  t[4] = FN<S, true, false, false>;  t[5] = FN<S, true, false, true>;           \
  t[6] = FN<S, true, true, false>;   t[7] = FN<S, true, true, true>;

// fn[isa][dtype][options]; without x86 only the baseline row is filled (and ever selected).
struct Table {
  SpanFn fn[3][3][8] = {};
  Table() {
    SR_FILL(fn[0][0], span_baseline, Float32)
    SR_FILL(fn[0][1], span_baseline, BFloat16)
    SR_FILL(fn[0][2], span_baseline, Float16)
#ifdef SR_X86
    SR_FILL(fn[1][0], span_avx2, Float32)
    SR_FILL(fn[1][1], span_avx2, BFloat16)
    SR_FILL(fn[1][2], half_span_avx2, Float16)
    SR_FILL(fn[2][0], span_avx512, Float32)
    SR_FILL(fn[2][1], span_avx512, BFloat16)
    SR_FILL(fn[2][2], half_span_avx512, Float16)
#endif
  }
};
const Table kTable;

// The best instruction set this CPU (and OS) supports: 0 baseline, 1 AVX2, 2 AVX-512.
int detect_isa() {
#ifdef SR_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  return avx512 ? 2 : avx2 ? 1 : 0;
#else
  return 0;
#endif
}
const int kDetectedIsa = detect_isa();
std::atomic<int> g_isa{kDetectedIsa};

// Spans shorter than this run on the calling thread (torch's at::internal::GRAIN_SIZE).
constexpr int64_t kGrain = 32768;

}  // namespace

// The instruction set in use; a request >= 0 first selects min(request, best supported).
extern "C" int sharded_rmsprop_cpu_isa(int request) {
  if (request >= 0) g_isa.store(request < kDetectedIsa ? request : kDetectedIsa);
  return g_isa.load();
}

// dtype: 0 float32, 1 bfloat16, 2 float16. momentum_buffer / grad_avg are null when unused.
// Returns 0, or 1 for an unknown dtype.
extern "C" int sharded_rmsprop_cpu_update(
    int dtype, void* param, void* grad, void* square_avg, void* momentum_buffer, void* grad_avg,
    int64_t n, float neg_lr, float alpha, float one_minus_alpha, float eps, float weight_decay,
    int has_weight_decay, float momentum, int maximize, int threads) {
  if (dtype < 0 || dtype > 2) return 1;
  const Args a{param, grad, square_avg, momentum_buffer, grad_avg,
               Hyper{neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum,
                     maximize ? -1.0f : 1.0f, std::fabs(one_minus_alpha) < 0.5f}};
  const int k = (has_weight_decay ? 4 : 0) | (momentum_buffer ? 2 : 0) | (grad_avg ? 1 : 0);
  const SpanFn fn = kTable.fn[g_isa.load()][dtype][k];
  int64_t tasks = (n + kGrain - 1) / kGrain;
  if (tasks > threads) tasks = threads;
  if (tasks <= 1) {
    fn(a, 0, n);
    return 0;
  }
#pragma omp parallel num_threads(int(tasks))
  {
    // Contiguous chunks, one per thread, each a multiple of 64 elements (whole cache lines).
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t chunk = ((n + nt - 1) / nt + 63) / 64 * 64;
    const int64_t begin = t * chunk < n ? t * chunk : n;
    const int64_t end = begin + chunk < n ? begin + chunk : n;
    if (begin < end) fn(a, begin, end);
  }
  return 0;
}
"""

#: Compiler flags: no -march, so the binary runs on any machine of the architecture (the
#: AVX2 and AVX-512 copies are chosen at run time); -fno-math-errno lets sqrt vectorise;
#: -ffp-contract=off keeps every product and sum rounded on its own, as torch rounds them.
_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off")
_LDFLAGS = ("-fopenmp",)

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

#: The storage dtypes the kernel handles; the caller routes others (float64, complex) to the
#: reference update.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

#: How long a process waits for another one that is building the same library before it
#: gives up and falls back to the reference update (a build takes about 5 s).
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
    (about 5 s on 2 cores) unless a finished build is already cached, then loads it. A failure
    (no C++ compiler, no ninja, a broken build) emits one warning saying why and makes this
    return ``False`` from then on, so the caller can fall back to ``rmsprop_reference_``.
    """
    return _load_kernel() is not None


def cpu_fused_preferred(dtype: torch.dtype) -> bool:
    """Whether the fused kernel is available and the faster update for ``dtype`` here.

    float32 always (it is memory-bound: 5-7x the reference with any instruction set);
    bfloat16 and float16 with the AVX2 or AVX-512 copy (1.5-3.2x), not with the baseline
    copy, whose conversions make it slower than the reference (0.3-1.0x).
    """
    if dtype not in _DTYPE_CODE or _load_kernel() is None:
        return False
    return dtype == torch.float32 or _isa() != "baseline"


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
        + [ctypes.c_int64]  # n
        + [ctypes.c_float] * 5  # -lr, alpha, 1 - alpha, eps, weight_decay
        + [ctypes.c_int, ctypes.c_float]  # has_weight_decay, momentum
        + [ctypes.c_int, ctypes.c_int]  # maximize, threads
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


def _build_location() -> tuple[str, str]:
    """The library's name and build directory: a hash of everything the binary depends on."""
    key = hashlib.sha256(
        "\0".join(
            (_CPP_SOURCE, *_CFLAGS, *_LDFLAGS, torch.__version__, sys.version, platform.machine())
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
                    cpp_sources=[_CPP_SOURCE],
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


def _check(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    momentum_buffer: Tensor | None,
    grad_avg: Tensor | None,
    momentum: float,
    centered: bool,
) -> list[Tensor]:
    """Validate the tensors; return the ones the kernel reads or writes."""
    if momentum > 0 and momentum_buffer is None:
        raise ValueError("momentum_buffer is required when momentum > 0")
    if centered and grad_avg is None:
        raise ValueError("grad_avg is required when centered=True")
    named = [("param", param), ("grad", grad), ("square_avg", square_avg)]
    if momentum > 0:
        named.append(("momentum_buffer", momentum_buffer))
    if centered:
        named.append(("grad_avg", grad_avg))
    for label, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{label} must be a Tensor, got {type(t).__name__}")
    if param.dtype not in _DTYPE_CODE:
        raise TypeError(
            f"the fused CPU RMSprop kernel supports float32, bfloat16 and float16 "
            f"parameters, got {param.dtype}"
        )
    n = param.numel()
    for label, t in named:
        if t.device.type != "cpu":
            raise ValueError(
                f"the fused CPU RMSprop kernel needs CPU tensors, got {label} on {t.device}"
            )
        if t.dtype != param.dtype:
            raise TypeError(f"{label} has dtype {t.dtype}, expected the param's {param.dtype}")
        if t.dim() != 1 or t.numel() != n:
            raise ValueError(
                f"{label} has shape {tuple(t.shape)}, expected a 1-D tensor of {n} elements"
            )
        if not t.is_contiguous():
            raise ValueError(f"{label} must be contiguous")
    tensors = [t for _, t in named]
    if n:  # the kernel reads and writes through restrict pointers: no two may overlap
        size = n * param.element_size()
        starts = sorted((t.data_ptr(), i) for i, (_, t) in enumerate(named))
        for (a, i), (b, j) in zip(starts, starts[1:]):
            if b < a + size:
                first, second = sorted((i, j))
                raise ValueError(f"{named[first][0]} and {named[second][0]} overlap in memory")
    return tensors


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
) -> None:
    """Update ``param`` and the state in place, in one pass; ``grad`` is read, not written.

    Same signature and semantics as :func:`~sharded_rmsprop.kernels.rmsprop_reference_` on
    1-D contiguous CPU tensors of one dtype from :data:`SUPPORTED_DTYPES`; the arithmetic is
    float32 whatever the storage dtype, rounded once on store. ``momentum_buffer`` is
    required when ``momentum > 0`` and ``grad_avg`` when ``centered`` (otherwise they are
    ignored). Raises ``RuntimeError`` when :func:`cpu_fused_available` is ``False``.
    """
    tensors = _check(param, grad, square_avg, momentum_buffer, grad_avg, momentum, centered)
    kernel = _load_kernel()
    if kernel is None:
        raise RuntimeError(
            f"the fused CPU RMSprop kernel is unavailable ({_unavailable_reason}); "
            f"use rmsprop_reference_"
        )
    n = param.numel()
    if n == 0:
        return
    rc = kernel(
        _DTYPE_CODE[param.dtype],
        param.data_ptr(),
        grad.data_ptr(),
        square_avg.data_ptr(),
        momentum_buffer.data_ptr() if momentum > 0 else None,
        grad_avg.data_ptr() if centered else None,
        n,
        -float(lr),
        float(alpha),
        1.0 - float(alpha),
        float(eps),
        float(weight_decay),
        int(weight_decay != 0),
        float(momentum),
        int(bool(maximize)),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"the fused CPU RMSprop kernel failed with code {rc}")
    # What torch's in-place ops do: autograd sees that these tensors changed.
    for t in tensors:
        if t is not grad and not t.is_inference():
            increment_version(t)
