// The fused CPU RMSprop update of sharded_rmsprop (sharded_rmsprop/kernels/cpu_fused.py
// builds it on first use and calls it through ctypes).
//
// The kernel: C++ with OpenMP and no torch headers (it compiles in a few seconds), reached
// from Python through ctypes (``extern "C"``). One loop, ``update_span``, does the whole
// update of a range of elements; the options are template parameters and the selections
// integer masks, so the compiler vectorises every variant. The loop is compiled three times,
// for the x86-64 baseline (SSE2), AVX2 and AVX-512, through ``target`` attributes, and the
// library picks the best one the CPU supports when it loads (``__builtin_cpu_supports``), so
// one binary runs on any x86-64 machine; elsewhere only the baseline version exists. Float16
// on AVX2 and AVX-512 converts blocks with the F16C instructions instead of bit manipulation.
// The arithmetic follows torch's op sequence in float32 (float64 for float64 storage, as
// torch computes float64 tensors): the same operations in the same order (``addcmul`` is
// ``self + (value * t1) * t2``, ``addcdiv`` is ``self + (value * t1) / t2``, ``lerp``
// switches formula at weight 0.5), each intermediate kept in the compute type instead of
// being rounded to the storage dtype, and the result rounded once (to nearest even). No
// fused multiply-adds (-ffp-contract=off), so every instruction set gives the same bits.
//
// Two options ride along in the same pass: a gradient scale (clipping, unscaling) is one
// more factor of the gradient, and float32 master weights can also be stored rounded to a
// bfloat16 or float16 copy (the model's weights): 2 more bytes written per element, with the
// bits of torch's .to(dtype) (nearest even).

#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

// Selections are written as integer masks, not branches or ?:, so GCC vectorises every loop.
inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, sizeof f); return f; }
inline uint32_t to_bits(float f) { uint32_t u; std::memcpy(&u, &f, sizeof u); return u; }
inline uint32_t mask(bool c) { return 0u - uint32_t(c); }
inline uint32_t blend(uint32_t m, uint32_t a, uint32_t b) { return (a & m) | (b & ~m); }
// |x| is a NaN (signed compare: both sides are below 2^31).
inline uint32_t nan_mask(uint32_t u) { return mask(int32_t(u & 0x7FFFFFFFu) > 0x7F800000); }

// a if c else b, for the compute types, through an integer mask of their width.
inline float pick(bool c, float a, float b) {
  return from_bits(blend(mask(c), to_bits(a), to_bits(b)));
}
inline double pick(bool c, double a, double b) {
  uint64_t ua, ub;
  std::memcpy(&ua, &a, sizeof a);
  std::memcpy(&ub, &b, sizeof b);
  const uint64_t m = 0ull - uint64_t(c);
  const uint64_t u = (ua & m) | (ub & ~m);
  double r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

// A storage dtype: how its values are loaded into the compute type and stored back.
struct Float32 {
  using storage_t = float;
  using compute_t = float;
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
};

struct Float64 {
  using storage_t = double;
  using compute_t = double;
  static inline double load(double x) { return x; }
  static inline double store(double x) { return x; }
};

// bfloat16: the top half of a float32; rounding as c10::BFloat16 (nearest even, NaN -> 0x7FC0).
struct BFloat16 {
  using storage_t = uint16_t;
  using compute_t = float;
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
  using compute_t = float;
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

// The low-precision copy's policy when there is none (only float32 master weights have one).
struct NoCopy {};

// The hyperparameters as Python gave them (double); each loop rounds them to its compute
// type, as torch rounds a Python number to the type its kernel computes in.
struct Hyper {
  // grad_factor: grad_scale, negated for maximize (1 or -1 without a scale); see update_span.
  double neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum, grad_factor;
};

// The whole update of elements [begin, end). Inlined into one function per instruction set
// (below), which the compiler vectorises for that set. LP is NoCopy, or BFloat16 / Float16
// for float32 master weights whose result is also stored, rounded, in low_precision_param.
//
// The gradient scale needs no template flag of its own: torch's grad.mul_(scale) and, for
// maximize, grad.neg_() are one product here, grad * (+-scale), bit for bit the same since
// rounding to nearest is symmetric (x * -s == -(x * s)). Without a scale the factor is 1 or
// -1, the multiply that maximize needs anyway (x * 1 == x for every x, NaN stays NaN): so
// a scale costs no instruction and no loop version of its own.
template <class S, class LP, bool WD, bool MOM, bool CEN>
__attribute__((always_inline)) inline void update_span(
    typename S::storage_t* __restrict param, const typename S::storage_t* __restrict grad,
    typename S::storage_t* __restrict square_avg, typename S::storage_t* __restrict momentum_buffer,
    typename S::storage_t* __restrict grad_avg, uint16_t* __restrict low_precision_param,
    const Hyper& h, int64_t begin, int64_t end) {
  constexpr bool kCopy = !std::is_same<LP, NoCopy>::value;
  static_assert(!kCopy || std::is_same<S, Float32>::value, "copies need float32 master weights");
  using C = typename S::compute_t;
  const C neg_lr = C(h.neg_lr), alpha = C(h.alpha), oma = C(h.one_minus_alpha), eps = C(h.eps);
  const C wd = C(h.weight_decay), mom = C(h.momentum), factor = C(h.grad_factor);
  // |1 - alpha| < 0.5: torch's lerp computes start + w * (end - start), else end - ...
  const bool lerp_from_start = std::fabs(oma) < C(0.5);
  const C lerp_w = lerp_from_start ? oma : oma - C(1);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const C p = S::load(param[i]);
    C g = S::load(grad[i]) * factor;                        // grad.mul_(scale), maximize: neg_()
    if (WD) g = g + wd * p;                                 // grad.add_(param, alpha=wd)
    const C sq = S::load(square_avg[i]) * alpha + (oma * g) * g;
    square_avg[i] = S::store(sq);                           // mul_(alpha).addcmul_(g, g, 1-alpha)
    C avg;
    if (CEN) {
      const C ga0 = S::load(grad_avg[i]);
      const C base = pick(lerp_from_start, ga0, g);
      const C ga = base + lerp_w * (g - ga0);               // grad_avg.lerp_(g, 1 - alpha)
      grad_avg[i] = S::store(ga);
      avg = std::sqrt(sq + (C(-1) * ga) * ga);              // addcmul(ga, ga, -1).sqrt_()
    } else {
      avg = std::sqrt(sq);
    }
    avg = avg + eps;
    C updated;
    if (MOM) {
      const C buf = S::load(momentum_buffer[i]) * mom + g / avg;  // mul_(m).addcdiv_(g, avg)
      momentum_buffer[i] = S::store(buf);
      updated = p + neg_lr * buf;                           // param.add_(buf, alpha=-lr)
    } else {
      updated = p + (neg_lr * g) / avg;                     // param.addcdiv_(g, avg, -lr)
    }
    param[i] = S::store(updated);
    // low_precision_param.copy_(param): S is Float32 here, so `updated` is param's new value
    if constexpr (kCopy) low_precision_param[i] = LP::store(updated);
  }
}

struct Args {
  void* param; const void* grad; void* square_avg; void* momentum_buffer; void* grad_avg;
  uint16_t* low_precision_param;  // null without a copy
  Hyper h;
};
using SpanFn = void (*)(const Args&, int64_t, int64_t);

// One version of every (dtype, low-precision copy, options) loop per instruction set, each
// compiled for its target.
#define SR_SPAN_FOR_TARGET(NAME, TARGET)                                                     \
  template <class S, class LP, bool WD, bool MOM, bool CEN>                                  \
  TARGET void span_##NAME(const Args& a, int64_t begin, int64_t end) {                       \
    using T = typename S::storage_t;                                                         \
    update_span<S, LP, WD, MOM, CEN>(                                                        \
        static_cast<T*>(a.param), static_cast<const T*>(a.grad),                             \
        static_cast<T*>(a.square_avg), static_cast<T*>(a.momentum_buffer),                   \
        static_cast<T*>(a.grad_avg), a.low_precision_param, a.h, begin, end);                \
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
  template <class S, class LP, bool WD, bool MOM, bool CEN>                                  \
  TARGET void half_span_##NAME(const Args& a, int64_t begin, int64_t end) {                  \
    static_assert(std::is_same<LP, NoCopy>::value, "float16 params have no copy");          \
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
      update_span<Float32, NoCopy, WD, MOM, CEN>(p, g, sq, mb, ga, nullptr, a.h, 0, m);      \
      float_to_half(p, P + b, m); float_to_half(sq, SQ + b, m);                              \
      if (MOM) float_to_half(mb, MB + b, m);                                                 \
      if (CEN) float_to_half(ga, GA + b, m);                                                 \
    }                                                                                        \
  }

SR_HALF_SPAN_FOR_TARGET(avx2, SR_AVX2)
SR_HALF_SPAN_FOR_TARGET(avx512, SR_AVX512)

// float32 master weights with a float16 copy, with F16C: update a block of kBlock elements
// in place, then round its params, still in L1, to the copy: one pass over memory.
#define SR_COPY16_SPAN_FOR_TARGET(NAME, TARGET)                                              \
  template <class S, class LP, bool WD, bool MOM, bool CEN>                                  \
  TARGET void copy16_span_##NAME(const Args& a, int64_t begin, int64_t end) {                \
    static_assert(std::is_same<S, Float32>::value && std::is_same<LP, Float16>::value,       \
                  "float32 params with a float16 copy");                                     \
    float* P = static_cast<float*>(a.param);                                                 \
    for (int64_t b = begin; b < end; b += kBlock) {                                          \
      const int64_t m = end - b < kBlock ? end - b : kBlock;                                 \
      update_span<Float32, NoCopy, WD, MOM, CEN>(                                            \
          P, static_cast<const float*>(a.grad), static_cast<float*>(a.square_avg),           \
          static_cast<float*>(a.momentum_buffer), static_cast<float*>(a.grad_avg), nullptr,  \
          a.h, b, b + m);                                                                    \
      float_to_half(P + b, a.low_precision_param + b, m);                                    \
    }                                                                                        \
  }

SR_COPY16_SPAN_FOR_TARGET(avx2, SR_AVX2)
SR_COPY16_SPAN_FOR_TARGET(avx512, SR_AVX512)
#endif

// t[(wd << 2) | (momentum << 1) | centered] = FN<S, LP, wd, momentum, centered>
#define SR_FILL(t, FN, S, LP)                                                           \
  t[0] = FN<S, LP, false, false, false>; t[1] = FN<S, LP, false, false, true>;          \
  t[2] = FN<S, LP, false, true, false>;  t[3] = FN<S, LP, false, true, true>;           \
  t[4] = FN<S, LP, true, false, false>;  t[5] = FN<S, LP, true, false, true>;           \
  t[6] = FN<S, LP, true, true, false>;   t[7] = FN<S, LP, true, true, true>;

// The table's second index: the storage dtype's code (0 float32, 1 bfloat16, 2 float16,
// 3 float64), or float32 master weights with a copy: 4 for a bfloat16 copy, 5 for a float16
// one.
constexpr int kVariants = 6;

// fn[isa][variant][options]; without x86 only the baseline row is filled (and ever selected).
struct Table {
  SpanFn fn[3][kVariants][8] = {};
  Table() {
    SR_FILL(fn[0][0], span_baseline, Float32, NoCopy)
    SR_FILL(fn[0][1], span_baseline, BFloat16, NoCopy)
    SR_FILL(fn[0][2], span_baseline, Float16, NoCopy)
    SR_FILL(fn[0][3], span_baseline, Float64, NoCopy)
    SR_FILL(fn[0][4], span_baseline, Float32, BFloat16)
    SR_FILL(fn[0][5], span_baseline, Float32, Float16)
#ifdef SR_X86
    SR_FILL(fn[1][0], span_avx2, Float32, NoCopy)
    SR_FILL(fn[1][1], span_avx2, BFloat16, NoCopy)
    SR_FILL(fn[1][2], half_span_avx2, Float16, NoCopy)
    SR_FILL(fn[1][3], span_avx2, Float64, NoCopy)
    SR_FILL(fn[1][4], span_avx2, Float32, BFloat16)
    SR_FILL(fn[1][5], copy16_span_avx2, Float32, Float16)
    SR_FILL(fn[2][0], span_avx512, Float32, NoCopy)
    SR_FILL(fn[2][1], span_avx512, BFloat16, NoCopy)
    SR_FILL(fn[2][2], half_span_avx512, Float16, NoCopy)
    SR_FILL(fn[2][3], span_avx512, Float64, NoCopy)
    SR_FILL(fn[2][4], span_avx512, Float32, BFloat16)
    SR_FILL(fn[2][5], copy16_span_avx512, Float32, Float16)
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

// dtype: 0 float32, 1 bfloat16, 2 float16, 3 float64; copy_dtype: 1 bfloat16, 2 float16;
// momentum_buffer / grad_avg are null when unused; low_precision_param is null without a copy, else a buffer of n elements of
// copy_dtype (1 or 2) that receives the updated float32 (dtype 0) params rounded. grad_scale
// multiplies the gradient first (1 without a scale). Returns 0, 1 for an unknown dtype, 2
// for a copy the kernel cannot make.
extern "C" int sharded_rmsprop_cpu_update(
    int dtype, void* param, void* grad, void* square_avg, void* momentum_buffer, void* grad_avg,
    void* low_precision_param, int copy_dtype, int64_t n, double neg_lr, double alpha,
    double one_minus_alpha, double eps, double weight_decay, int has_weight_decay,
    double momentum, int maximize, double grad_scale, int threads) {
  if (dtype < 0 || dtype > 3) return 1;
  if ((low_precision_param != nullptr) != (copy_dtype == 1 || copy_dtype == 2)) return 2;
  if (low_precision_param != nullptr && dtype != 0) return 2;
  const double grad_factor = maximize ? -grad_scale : grad_scale;  // exact: see update_span
  const Args a{param, grad, square_avg, momentum_buffer, grad_avg,
               static_cast<uint16_t*>(low_precision_param),
               Hyper{neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum, grad_factor}};
  const int k = (has_weight_decay ? 4 : 0) | (momentum_buffer ? 2 : 0) | (grad_avg ? 1 : 0);
  const int variant = low_precision_param != nullptr ? 3 + copy_dtype : dtype;
  const SpanFn fn = kTable.fn[g_isa.load()][variant][k];
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
