// ATen CPU kernels for cross-attention that captures its maps or scores them against a reference
// with an L1 loss (DESIGN §2), and the fused backward of both (DESIGN §3).
//
// Work is cut into tiles: up to kTileRows query rows of one batch entry and one head group. A head
// group is a single head, or all H heads in head-mean mode, where the mean over heads couples them.
// A tile holds only its (rows, N) probabilities; the backward recomputes them from q and k (and, after a
// guided forward, from the two numbers per row it kept: no max or sum pass). Results
// that several tiles feed (the loss, dK, dV) are written per tile and summed in tile order, so
// results are bitwise reproducible and do not depend on how tiles are spread over threads.
//
// q, k, v and d_out are read in place with any batch/head/row strides as long as D is contiguous:
// diffusers hands over (B, H, M, D) views of (B, M, H * D) projections, and copying them to
// (B, H, M, D) order would cost a full pass. out and dQ are written in (B, M, H, D) memory order
// (returned as (B, H, M, D) views), which is the order the attention processor reshapes them to.
// The common case (per-head maps of every token) fuses the map, loss and map-gradient work into the
// probability rows instead of going through a separate (rows, T) map tile.
//
// The matrix products run through ATen's GEMMs in the compute dtype (float32 for half inputs), except
// for bfloat16 inputs on CPUs with AVX512-BF16 (AMX or not), which multiply bf16 operands in place with
// float32 accumulation (Bf16Products), and for float32 wherever oneDNN's micro-kernel beats MKL's GEMMs
// (BrgemmProducts: several threads, or a CPU that is not Intel's); softmax, maps, loss and the softmax
// backward are float32 on every path.
//
// Capture can keep maps for a range of batch rows only while computing every row's output: the
// conditional half of a classifier-free-guidance batch, in one call instead of a second attention
// for the unconditional half and a copy joining the two.
//
// Registered as ops in the `dreamblend_cpp` namespace with their autograd in C++ below: a Python
// autograd wrapper costs about 0.15 ms per layer and guided step (measured on the toy world's UNet,
// where that was a few percent of the step), and the backward needs nothing Python offers.

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

// Query rows per tile: a (256, N) probability tile stays in L2 (256 measured a few percent faster
// than 128 or 64 on an SD layer), and this count, not the thread count, groups the partial sums.
constexpr int64_t kTileRows = 256;

using OptTensor = std::optional<at::Tensor>;

struct Shape {
  int64_t B, H, M, N, D, T;
  bool head_mean;
  int64_t group;   // heads sharing one map: H in head-mean mode, else 1
  int64_t chunks;  // query tiles per (batch, head group)
  int64_t map_b0, map_b1;  // batch rows [map_b0, map_b1) have maps (all B but in a row-range capture)

  int64_t groups() const { return H / group; }
  int64_t tiles() const { return B * groups() * chunks; }
};

struct Tile {
  int64_t b, h0, chunk, r0, rows;
  bool mapped;         // the tile's batch row has maps
  int64_t map_offset;  // first element of the tile in maps, ref and d_maps, laid out (rows, H / group, M, T)
};

Tile locate(const Shape& s, int64_t index) {
  const int64_t chunk = index % s.chunks;
  const int64_t bg = index / s.chunks;  // b * groups + g
  const int64_t b = bg / s.groups(), g = bg % s.groups();
  const int64_t r0 = chunk * kTileRows;
  const bool mapped = b >= s.map_b0 && b < s.map_b1;
  return {b, g * s.group, chunk, r0, std::min(kTileRows, s.M - r0), mapped,
          (((b - s.map_b0) * s.groups() + g) * s.M + r0) * s.T};
}

// Row-major (rows, cols) matrix over existing memory. Read-only operands are cast from const: ATen
// views carry no constness, and these are only ever passed as matmul inputs.
template <typename T>
at::Tensor mat(const T* data, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(data), {rows, cols},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// The same with a leading dimension (row stride) `ld` >= cols: a BLAS operand read or written in place.
template <typename T>
at::Tensor mat(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// A (B, H, rows, D) operand with arbitrary batch/head/row strides and unit stride along D.
template <typename T>
struct Strided {
  T* data = nullptr;
  int64_t sb = 0, sh = 0, sr = 0;

  T* at(int64_t b, int64_t h, int64_t r) const { return data + b * sb + h * sh + r * sr; }
  explicit operator bool() const { return data != nullptr; }
};

template <typename T>
Strided<T> strided(const at::Tensor& t) {
  if (!t.defined()) return {};
  return {const_cast<T*>(t.const_data_ptr<T>()), t.stride(0), t.stride(1), t.stride(2)};
}

// What the tile loops need besides the operands: the shape, the softmax scale and the map's token columns
// as int64 indices (null: every token in order). `fused`: per-head maps of all N tokens in order, so a map
// row is a probability row and the map work runs on the probabilities directly.
template <typename T>
struct Problem {
  using Scalar = T;  // the compute dtype: probabilities, maps, loss
  Shape s;
  T scale;
  const int64_t* tokens;
  bool fused;

  int64_t column(int64_t c) const { return tokens ? tokens[c] : c; }  // of the map's column c in P
};

// Row kernels (csrc/row_kernels.h) for float tiles, in place of ATen's softmax and of loops the
// compiler vectorizes poorly: for N = 77, ATen's lastdim softmax took longer than the q k^T GEMM beside
// it (3.0 ms against 2.1 ms for 8 x 4096 rows on one Sapphire Rapids core). The extension is built for
// the baseline ISA, so the kernels are compiled once per instruction set below and the widest one the
// CPU runs is picked at load; `simd_level` lets tests run each of them.
enum SimdLevel : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

namespace portable {
using V = float;
using Tail = bool;  // one lane: never a tail
constexpr int64_t W = 1;
inline Tail tail_of(int64_t) { return false; }
inline V set1(float x) { return x; }
inline V load(const float* p) { return *p; }
inline void store(float* p, V x) { *p = x; }
inline V load_tail(const float*, Tail, float fill) { return fill; }
inline void store_tail(float*, Tail, V) {}
inline V where_tail(Tail, V, float fill) { return fill; }
inline V add(V a, V b) { return a + b; }
inline V sub(V a, V b) { return a - b; }
inline V mul(V a, V b) { return a * b; }
inline V fmadd(V a, V b, V c) { return a * b + c; }
inline V max(V a, V b) { return a > b ? a : b; }
inline V absolute(V a) { return std::fabs(a); }
inline V step(V a, V w) { return a > 0 ? w : (a < 0 ? -w : 0.0f); }
inline V round_even(V a) { return std::nearbyint(a); }
inline V pow2(V n) { return std::ldexp(1.0f, static_cast<int>(n)); }
inline V select_ge(V x, float cut, V a) { return x >= cut ? a : 0.0f; }
inline float hsum(V a) { return a; }
inline float hmax(V a) { return a; }
constexpr int64_t TB = 1;
inline void transpose_block(const float* src, int64_t, float* dst, int64_t) { std::memcpy(dst, src, sizeof(float)); }
#include "row_kernels.h"
}  // namespace portable

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define DREAMBLEND_X86_SIMD 1

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif
namespace x86 {
// dst's 8 rows (stride ld) = the transpose of the 8 x 8 float block at src (row stride lds): pairs of rows
// interleaved, then pairs of pairs, then the 128-bit halves swapped across. AVX2 and AVX-512 levels share it.
constexpr int64_t TB = 8;
inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ld) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);  // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int j = 0; j < 2; ++j) {
      r[i + 2 * j] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0x44);  // a0 b0 c0 d0 | a4 b4 c4 d4
      r[i + 2 * j + 1] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0xEE);
    }
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
}  // namespace x86
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f")
#endif
namespace avx512 {
using V = __m512;
using Tail = __mmask16;
constexpr int64_t W = 16;
inline Tail tail_of(int64_t t) { return static_cast<Tail>((1u << t) - 1); }
inline V set1(float x) { return _mm512_set1_ps(x); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, V x) { _mm512_storeu_ps(p, x); }
inline V load_tail(const float* p, Tail t, float fill) { return _mm512_mask_loadu_ps(set1(fill), t, p); }
inline void store_tail(float* p, Tail t, V x) { _mm512_mask_storeu_ps(p, t, x); }
inline V where_tail(Tail t, V a, float fill) { return _mm512_mask_blend_ps(t, set1(fill), a); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V max(V a, V b) { return _mm512_max_ps(a, b); }
inline V absolute(V a) { return _mm512_abs_ps(a); }
inline V step(V a, V w) {
  const V pos = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ), w);
  return _mm512_mask_sub_ps(pos, _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps(), w);
}
inline V round_even(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V pow2(V n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline V select_ge(V x, float cut, V a) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, set1(cut), _CMP_GE_OQ), a); }
inline float hsum(V a) { return _mm512_reduce_add_ps(a); }
inline float hmax(V a) { return _mm512_reduce_max_ps(a); }
using x86::TB;  // 8 x 8 blocks: one 256-bit register per row
using x86::transpose_block;
#include "row_kernels.h"
}  // namespace avx512
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
using V = __m256;
using Tail = __m256i;  // all-ones lanes are live
constexpr int64_t W = 8;
inline Tail tail_of(int64_t t) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(t)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V set1(float x) { return _mm256_set1_ps(x); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, V x) { _mm256_storeu_ps(p, x); }
inline V load_tail(const float* p, Tail t, float fill) {
  return _mm256_blendv_ps(set1(fill), _mm256_maskload_ps(p, t), _mm256_castsi256_ps(t));
}
inline void store_tail(float* p, Tail t, V x) { _mm256_maskstore_ps(p, t, x); }
inline V where_tail(Tail t, V a, float fill) { return _mm256_blendv_ps(set1(fill), a, _mm256_castsi256_ps(t)); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V max(V a, V b) { return _mm256_max_ps(a, b); }
inline V absolute(V a) { return _mm256_andnot_ps(set1(-0.0f), a); }
inline V step(V a, V w) {
  const V zero = _mm256_setzero_ps();
  return _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(a, zero, _CMP_GT_OQ), w),
                       _mm256_and_ps(_mm256_cmp_ps(a, zero, _CMP_LT_OQ), w));
}
inline V round_even(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V pow2(V n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline V select_ge(V x, float cut, V a) { return _mm256_and_ps(_mm256_cmp_ps(x, set1(cut), _CMP_GE_OQ), a); }
inline float hsum(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax(V a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
using x86::TB;
using x86::transpose_block;
#include "row_kernels.h"
}  // namespace avx2
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

SimdLevel detected_simd() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kPortable;
}
#else
SimdLevel detected_simd() { return kPortable; }
#endif

std::atomic<int64_t>& simd_setting() {
  static std::atomic<int64_t> level{detected_simd()};
  return level;
}

// Sets the level the float row kernels run at (tests run each one the CPU has); -1 only reads it.
int64_t simd_level(int64_t level) {
  TORCH_CHECK(level <= detected_simd(), "this CPU runs SIMD levels up to ", int64_t(detected_simd()),
              ", not ", level);
  return level < 0 ? simd_setting().load() : simd_setting().exchange(level);
}

// The active level's kernel `name` on the arguments that follow (a void call returns void).
#ifdef DREAMBLEND_X86_SIMD
#define DREAMBLEND_ROWS(name, ...)                                 \
  switch (simd_setting().load(std::memory_order_relaxed)) {        \
    case kAvx512: return avx512::name(__VA_ARGS__);                \
    case kAvx2: return avx2::name(__VA_ARGS__);                    \
    default: return portable::name(__VA_ARGS__);                   \
  }
#else
#define DREAMBLEND_ROWS(name, ...) return portable::name(__VA_ARGS__);
#endif

void softmax_rows(const float* scores, int64_t lds, float* probs, int64_t rows, int64_t n, float scale,
                  float* stats) {
  DREAMBLEND_ROWS(softmax_rows, scores, lds, probs, rows, n, scale, stats)
}
void exp_rows(const float* scores, int64_t lds, float* probs, int64_t rows, int64_t n, float scale,
              const float* stats) {
  DREAMBLEND_ROWS(exp_rows, scores, lds, probs, rows, n, scale, stats)
}
double l1_rows(const float* a, const float* b, int64_t rows, int64_t n) { DREAMBLEND_ROWS(l1_rows, a, b, rows, n) }
void transpose_rows(const float* src, int64_t lds, int64_t rows, int64_t n, float* dst, int64_t ld) {
  DREAMBLEND_ROWS(transpose_rows, src, lds, rows, n, dst, ld)
}
void softmax_grad_rows(const float* probs, float* d_probs, int64_t ldd, const float* ref, float w, float scale,
                       int64_t rows, int64_t n) {
  DREAMBLEND_ROWS(softmax_grad_rows, probs, d_probs, ldd, ref, w, scale, rows, n)
}

// float64 (the reference-precision path) keeps libm's exp.
void softmax_rows(const double* scores, int64_t lds, double* probs, int64_t rows, int64_t n, double scale,
                  double* stats) {
  for (int64_t r = 0; r < rows; ++r) {
    const double* x = scores + r * lds;
    double* y = probs + r * n;
    double top = -INFINITY;
    for (int64_t c = 0; c < n; ++c) top = std::max(top, scale * x[c]);
    double sum = 0;
    for (int64_t c = 0; c < n; ++c) sum += (y[c] = std::exp(scale * x[c] - top));
    const double inv = 1.0 / sum;
    for (int64_t c = 0; c < n; ++c) y[c] *= inv;
    if (stats) {
      stats[2 * r] = top;
      stats[2 * r + 1] = inv;
    }
  }
}

void exp_rows(const double* scores, int64_t lds, double* probs, int64_t rows, int64_t n, double scale,
              const double* stats) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < n; ++c) probs[r * n + c] = std::exp(scale * scores[r * lds + c] - stats[2 * r]) * stats[2 * r + 1];
  }
}

double l1_rows(const double* a, const double* b, int64_t rows, int64_t n) {
  double total = 0;
  for (int64_t x = 0; x < rows * n; ++x) total += std::abs(a[x] - b[x]);
  return total;
}

void softmax_grad_rows(const double* probs, double* d_probs, int64_t ldd, const double* ref, double w, double scale,
                       int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const double* p = probs + r * n;
    double* d = d_probs + r * ldd;
    double delta = 0;
    for (int64_t c = 0; c < n; ++c) {
      if (ref) {
        const double diff = p[c] - ref[r * n + c];
        d[c] += double((diff > 0) - (diff < 0)) * w;
      }
      delta += p[c] * d[c];
    }
    for (int64_t c = 0; c < n; ++c) d[c] = p[c] * (d[c] - delta) * scale;
  }
}

// ---- the matrix products of a tile ------------------------------------------------------------------
// Per head h of a tile: S = q k^T (unscaled: the softmax applies the scale), O = P V, dP = dO V^T,
// dQ = (scale dS) K, dK = (scale dS)^T Q and dV = P^T dO (the softmax backward writes scale dS). Two implementations behind one interface keep the
// tile loops below written once: ATen's GEMMs on compute-dtype operands, and brgemm on bfloat16 ones.
// `Store` is the element type of q, k, v, d_out and of the out and dQ rows written; `Scratch` is the
// per-thread working memory of one parallel chunk; score_ld() is the row stride of the S and dP rows it
// writes, and so of the dS rows that dQ and dK read (P's rows are N wide).

// ATen's GEMMs (MKL or oneDNN) on operands in the compute dtype T, read in place.
template <typename T>
struct AtenProducts {
  using Store = T;
  struct Scratch {
    explicit Scratch(const Shape&) {}
  };
  Shape s;
  Strided<T> q, k, v, d_out;

  // (rows, D) rows of a (B, H, rows, D) operand from the tile's first row, and one head's (N, D) keys/values.
  at::Tensor rows_of(const Strided<T>& x, const Tile& t, int64_t h) const {
    return mat(x.at(t.b, h, t.r0), t.rows, s.D, x.sr);
  }
  at::Tensor keys(const Tile& t, int64_t h) const { return mat(k.at(t.b, h, 0), s.N, s.D, k.sr); }
  int64_t score_ld() const { return s.N; }
  at::Tensor values(const Tile& t, int64_t h) const { return mat(v.at(t.b, h, 0), s.N, s.D, v.sr); }

  void scores(Scratch&, const Tile& t, int64_t h, T* out) const {
    auto o = mat(out, t.rows, s.N);
    at::mm_out(o, rows_of(q, t, h), keys(t, h).t());
  }
  void attend(Scratch&, const Tile& t, int64_t h, const T* p, const Strided<T>& out) const {
    auto o = rows_of(out, t, h);
    at::mm_out(o, mat(p, t.rows, s.N), values(t, h));
  }
  void d_probs(Scratch&, const Tile& t, int64_t h, T* dp) const {
    auto o = mat(dp, t.rows, s.N);
    at::mm_out(o, rows_of(d_out, t, h), values(t, h).t());
  }
  void grad_q(Scratch&, const Tile& t, int64_t h, const T* ds, const Strided<T>& dq) const {
    auto o = rows_of(dq, t, h);
    at::mm_out(o, mat(ds, t.rows, s.N), keys(t, h));
  }
  void grad_k(Scratch&, const Tile& t, int64_t h, const T* ds, T* part) const {
    auto o = mat(part, s.N, s.D);
    at::mm_out(o, mat(ds, t.rows, s.N).t(), rows_of(q, t, h));
  }
  void grad_v(Scratch&, const Tile& t, int64_t h, const T* p, T* part) const {
    auto o = mat(part, s.N, s.D);
    at::mm_out(o, mat(p, t.rows, s.N).t(), rows_of(d_out, t, h));
  }
};

#ifdef DREAMBLEND_X86_SIMD
// bfloat16 operands through oneDNN's batch-reduce GEMM micro-kernel, which ATen exports
// (at::native::cpublas::brgemm): bf16 x bf16 products accumulated in float32, as the Triton kernels'
// tl.dot. q k^T and dO V^T multiply the inputs as given, read in place; P V, dS K, dS^T Q and P^T dO take
// P and scale * dS rounded to bfloat16 (the Triton kernels round P and dS too). ATen's bf16 GEMMs would
// round their float32 results to bfloat16, and upcasting to float32 GEMMs cost twice the time: on one
// Sapphire Rapids core, (256 x 40) (40 x 77) took 5.8 us here against 12.7 us in float32 and 24.6 us
// through torch.mm in bf16. Without AMX, oneDNN runs the same calls on AVX512-BF16's dot products: on one
// AMD EPYC (Zen 4) core, 190-215 GFLOPS at (256 x 40) (40 x 77) and (256 x 64) (64 x 128), twice that
// core's float32 peak.
using BF16 = at::BFloat16;
namespace cpublas = at::native::cpublas;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// brgemm reads B packed (VNNI: row pairs interleaved) in column blocks 16, 32, 48 or 64 wide: 64-wide
// blocks and a last one rounded up to 16 columns. K comes in pairs: an odd K gets a zero row (in B) and a
// zero column (in A).
int64_t packed_cols(int64_t n) { return n / 64 * 64 + round_up(n % 64, 16); }
int64_t packed_size(int64_t k, int64_t n) { return round_up(k, 2) * packed_cols(n); }

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#endif
// dst[c] = bf16(src[c]), rounded to nearest even.
void to_bf16(const float* src, BF16* dst, int64_t n) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m256bh y = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), reinterpret_cast<const __m256i&>(y));
  }
  if (c < n) {
    const __mmask16 live = static_cast<__mmask16>((1u << (n - c)) - 1);
    const __m256bh y = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(live, src + c));
    _mm256_mask_storeu_epi16(dst + c, live, reinterpret_cast<const __m256i&>(y));
  }
}

// width / 16 runs of 16 (a[c], b[c]) pairs into out (2 width elements): a row pair of brgemm's B layout.
// Columns past `live`, and every b when b is null (the zero row of an odd K), are zero.
void interleave_rows(const BF16* a, const BF16* b, int64_t live, int64_t width, BF16* out) {
  for (int64_t c = 0; c < width; c += 16) {
    const __mmask16 m = static_cast<__mmask16>(live - c >= 16 ? 0xFFFF : live <= c ? 0 : (1u << (live - c)) - 1);
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + c));
    const __m512i hi = b ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b + c)), 16)
                         : _mm512_setzero_si512();
    _mm512_storeu_si512(out + 2 * c, _mm512_or_si512(lo, hi));
  }
}
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

bool cpu_has_avx512bf16() {
  static const bool cpu = (__builtin_cpu_init(), __builtin_cpu_supports("avx512bf16"));
  return cpu;
}

// ATen's brgemm takes oneDNN's micro-kernel only while oneDNN is enabled (torch.backends.mkldnn), which
// can change between calls; the CPU cannot.
bool bf16_products_supported() { return cpu_has_avx512bf16() && at::globalContext().userEnabledMkldnn(); }

// (rows, n) float rows of stride lds -> bf16 rows with row stride ld >= n; the columns past n are zeroed.
void round_rows(const float* src, int64_t lds, int64_t rows, int64_t n, BF16* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    to_bf16(src + r * lds, dst + r * ld, n);
    std::fill(dst + r * ld + n, dst + (r + 1) * ld, BF16(0.0f));
  }
}

// The transpose of (rows, n) float rows of stride lds in bf16, (n, ld) with ld >= rows; columns past rows
// zeroed. (Gathering 16 rows at a time and rounding them with one instruction ran no faster on an AMD EPYC
// core than this loop.)
void round_transposed(const float* src, int64_t lds, int64_t rows, int64_t n, BF16* dst, int64_t ld) {
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t r = 0; r < rows; ++r) dst[c * ld + r] = BF16(src[r * lds + c]);
    std::fill(dst + c * ld + rows, dst + (c + 1) * ld, BF16(0.0f));
  }
}

// Packs the (k, n) operand B for brgemm into dst (packed_size(k, n)): B's rows are src's rows (stride
// ld), or with `transposed` its columns (B = src^T for src (n, k)). Each column block of `width` holds row
// pairs interleaved, element (r, c) at ((r / 2) * width + c) * 2 + r % 2, zero past k and n: oneDNN's
// layout for bf16 B on AMX and AVX512-BF16 alike (ATen's cpublas::pack makes it only on AMX CPUs).
void pack_b(const BF16* src, int64_t ld, bool transposed, int64_t k, int64_t n, BF16* dst) {
  const int64_t kp = round_up(k, 2), np = packed_cols(n);
  const BF16 zero(0.0f);
  // Transposed, B's pair (r, r + 1) at column c is src's adjacent pair (c, r), (c, r + 1): a block is the
  // transpose of src's 32-bit words, where k and ld are even and src lies on a word boundary.
  const bool words = k % 2 == 0 && ld % 2 == 0 && reinterpret_cast<std::uintptr_t>(src) % sizeof(float) == 0;
  for (int64_t c0 = 0; c0 < np; c0 += 64) {
    const int64_t width = std::min<int64_t>(64, np - c0), live = std::max<int64_t>(0, std::min(width, n - c0));
    BF16* block = dst + kp * c0;
    if (!transposed) {  // rows of src are rows of B: pairs of them interleaved, 16 columns at a time
      for (int64_t r = 0; r < kp; r += 2) {
        interleave_rows(src + r * ld + c0, r + 1 < k ? src + (r + 1) * ld + c0 : nullptr, live, width,
                        block + r * width);
      }
      continue;
    }
    if (words) {
      transpose_rows(reinterpret_cast<const float*>(src + c0 * ld), ld / 2, live, k / 2,
                     reinterpret_cast<float*>(block), width);
      for (int64_t r = 0; r < k / 2; ++r) std::fill(block + 2 * (r * width + live), block + 2 * (r + 1) * width, zero);
      continue;
    }
    for (int64_t r = 0; r < kp; ++r) {
      BF16* out = block + (r / 2) * width * 2 + r % 2;
      int64_t c = 0;
      if (r < k) {
        for (; c < live; ++c) out[2 * c] = src[(c0 + c) * ld + r];
      }
      for (; c < width; ++c) out[2 * c] = zero;
    }
  }
}

// C (rows, n) = A (rows, k) B into float rows of stride ldc, for B packed by pack_b; A's row stride lda,
// with a zero column at k when k is odd.
void brgemm_rows(int64_t rows, int64_t k, int64_t n, const BF16* a, int64_t lda, const BF16* b, float* c,
                 int64_t ldc) {
  const int64_t kp = round_up(k, 2), np = packed_cols(n);
  for (int64_t c0 = 0; c0 < n; c0 += 64) {
    cpublas::brgemm(rows, std::min<int64_t>(64, n - c0), kp, lda, std::min<int64_t>(64, np - c0), ldc,
                    /*add_C=*/false, a, b + kp * c0, c + c0, /*is_vnni=*/true);
  }
}

// dK = (scale dS)^T Q and dV = P^T dO for products whose A operand must be transposed explicitly: each
// passes the tile's (rows, N) float rows (dS's of stride score_ld(), P's of N) and its q or dO rows to its
// own transposed_product.
template <typename Products>
struct TransposedGrads {
  template <typename Scratch>
  void grad_k(Scratch& w, const Tile& t, int64_t h, const float* ds, float* part) const {
    const Products& mm = static_cast<const Products&>(*this);
    mm.transposed_product(w, t, ds, mm.score_ld(), mm.q.at(t.b, h, t.r0), mm.q.sr, part);
  }
  template <typename Scratch>
  void grad_v(Scratch& w, const Tile& t, int64_t h, const float* p, float* part) const {
    const Products& mm = static_cast<const Products&>(*this);
    mm.transposed_product(w, t, p, mm.s.N, mm.d_out.at(t.b, h, t.r0), mm.d_out.sr, part);
  }
};

struct Bf16Products : TransposedGrads<Bf16Products> {
  using Store = BF16;
  // Working memory of one parallel chunk; its end hands back the AMX tile state the thread configured.
  struct Scratch {
    std::vector<BF16> a, packed;  // an A operand rounded to bf16; a tile operand packed as B
    std::vector<float> c;         // a product before it is rounded into bf16 rows
    explicit Scratch(const Shape& s)
        : a(std::max(kTileRows * round_up(s.N, 2), s.N * round_up(kTileRows, 2))),
          packed(packed_size(kTileRows, s.D)),
          c(kTileRows * s.D) {}
    ~Scratch() { cpublas::brgemm_release(/*is_vnni=*/true); }
  };
  Shape s;
  Strided<BF16> q, k, v, d_out;
  // Per (batch, head), packed once per call: k^T for S, v for O, v^T for dP, k for dQ (the ones needed).
  std::vector<BF16> keys_t, values, values_t, keys;

  Bf16Products(const Shape& shape, Strided<BF16> q_, Strided<BF16> k_, Strided<BF16> v_, Strided<BF16> d_out_,
               bool attend, bool grad_q)
      : s(shape), q(q_), k(k_), v(v_), d_out(d_out_) {
    const int64_t kt = packed_size(s.D, s.N), kv = packed_size(s.N, s.D), heads = s.B * s.H;
    keys_t.resize(heads * kt);
    values.resize(attend ? heads * kv : 0);
    values_t.resize(d_out ? heads * kt : 0);
    keys.resize(grad_q ? heads * kv : 0);
    at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / s.H, h = i % s.H;
        pack_b(k.at(b, h, 0), k.sr, /*transposed=*/true, s.D, s.N, keys_t.data() + i * kt);
        if (attend) pack_b(v.at(b, h, 0), v.sr, false, s.N, s.D, values.data() + i * kv);
        if (d_out) pack_b(v.at(b, h, 0), v.sr, true, s.D, s.N, values_t.data() + i * kt);
        if (grad_q) pack_b(k.at(b, h, 0), k.sr, false, s.N, s.D, keys.data() + i * kv);
      }
    });
  }

  // S and dP come out as wide as the packed k^T and v^T (N rounded up to 16 columns; the extra ones are
  // zero products, never read).
  int64_t score_ld() const { return packed_cols(s.N); }
  const BF16* packed(const std::vector<BF16>& all, const Tile& t, int64_t h) const {
    return all.data() + (t.b * s.H + h) * (all.size() / (s.B * s.H));
  }
  void scores(Scratch&, const Tile& t, int64_t h, float* out) const {
    brgemm_rows(t.rows, s.D, score_ld(), q.at(t.b, h, t.r0), q.sr, packed(keys_t, t, h), out, score_ld());
  }
  void attend(Scratch& w, const Tile& t, int64_t h, const float* p, const Strided<BF16>& out) const {
    rounded_product(w, t, h, p, s.N, packed(values, t, h), out);
  }
  void d_probs(Scratch&, const Tile& t, int64_t h, float* dp) const {
    brgemm_rows(t.rows, s.D, score_ld(), d_out.at(t.b, h, t.r0), d_out.sr, packed(values_t, t, h), dp, score_ld());
  }
  void grad_q(Scratch& w, const Tile& t, int64_t h, const float* ds, const Strided<BF16>& dq) const {
    rounded_product(w, t, h, ds, score_ld(), packed(keys, t, h), dq);
  }
  // O and dQ: bf16(x) for the tile's (rows, N) float rows x of stride lds, times a packed (N, D) operand,
  // rounded into the tile's bf16 rows of `rows`.
  void rounded_product(Scratch& w, const Tile& t, int64_t h, const float* x, int64_t lds, const BF16* b,
                       const Strided<BF16>& rows) const {
    const int64_t ld = round_up(s.N, 2);
    round_rows(x, lds, t.rows, s.N, w.a.data(), ld);
    brgemm_rows(t.rows, s.N, s.D, w.a.data(), ld, b, w.c.data(), s.D);
    for (int64_t r = 0; r < t.rows; ++r) to_bf16(w.c.data() + r * s.D, rows.at(t.b, h, t.r0 + r), s.D);
  }
  // dK and dV (TransposedGrads): (N, rows) A operands (transposed, rounded) against the tile's q or dO rows
  // packed as B.
  void transposed_product(Scratch& w, const Tile& t, const float* x, int64_t lds, const BF16* rows, int64_t ld,
                          float* part) const {
    const int64_t lda = round_up(t.rows, 2);
    round_transposed(x, lds, t.rows, s.N, w.a.data(), lda);
    pack_b(rows, ld, false, t.rows, s.D, w.packed.data());
    brgemm_rows(s.N, t.rows, s.D, w.a.data(), lda, w.packed.data(), part, s.D);
  }
};
// float32 operands through the same batch-reduce GEMM micro-kernel, for ops running on several threads.
// Inside our parallel region MKL's sgemm still plans for torch's thread count and takes its packing path
// on these small tile products: on 2 threads, q k^T for SD1.5's 256-query layer (8 heads of 256 x 160 x
// 77, one head per call) took 244 us through at::mm against 312 us on 1 thread, and 160 us (333 on 1
// thread) through brgemm. float32_brgemm says where it runs on one thread. Where oneDNN has no float32
// micro-kernel (no AVX-512), torch's brgemm runs its GEMM instead.
struct BrgemmProducts : TransposedGrads<BrgemmProducts> {
  using Store = float;
  // The (D, score_ld()) transposes of one operand (k or v) for the heads of the head group a chunk works on:
  // a chunk's tiles run group by group, so each head is transposed once per chunk. Columns N and up stay
  // zero (the buffer's size never changes within a call, and nothing writes them).
  struct Transposes {
    std::vector<float> data;
    std::vector<bool> made;
    int64_t group = -1;  // b * H + first head of the group they belong to
  };
  // Per parallel chunk: k^T for S, v^T for dP, and dS or P transposed (N, rows), the A operand of dK and dV.
  struct Scratch {
    Transposes keys_t, values_t;
    std::vector<float> t;
    explicit Scratch(const Shape&) {}
    ~Scratch() { cpublas::brgemm_release(/*is_vnni=*/false); }
  };
  Shape s;
  Strided<float> q, k, v, d_out;  // all read in place: K and V are the B operands of O and dQ

  // S and dP come out N rounded up to whole 16-float vectors wide, against zero columns of k^T and v^T:
  // oneDNN's kernel ran q k^T for SD1.5's 256-query layer at 97-101 GFLOPS so (80 columns), 93-95 at N = 77
  // on one AMD EPYC (Zen 4) core. The extra columns are never read.
  int64_t score_ld() const { return round_up(s.N, 16); }

  // Head h's (D, N) transpose of x (k or v), rows score_ld() apart, made the first time the chunk needs it
  // for the tile's group.
  const float* transposed(const Strided<float>& x, const Tile& t, int64_t h, Transposes& c) const {
    const int64_t ld = score_ld(), size = s.D * ld, group = t.b * s.H + t.h0, j = h - t.h0;
    if (c.group != group) {
      c.data.resize(s.group * size);
      c.made.assign(s.group, false);
      c.group = group;
    }
    float* dst = c.data.data() + j * size;
    if (!c.made[j]) {
      transpose_rows(x.at(t.b, h, 0), x.sr, s.N, s.D, dst, ld);
      c.made[j] = true;
    }
    return dst;
  }

  void scores(Scratch& w, const Tile& t, int64_t h, float* out) const {
    const int64_t ld = score_ld();
    cpublas::brgemm(t.rows, ld, s.D, q.sr, ld, ld, false, q.at(t.b, h, t.r0), transposed(k, t, h, w.keys_t), out);
  }
  void attend(Scratch&, const Tile& t, int64_t h, const float* p, const Strided<float>& out) const {
    cpublas::brgemm(t.rows, s.D, s.N, s.N, v.sr, out.sr, false, p, v.at(t.b, h, 0), out.at(t.b, h, t.r0));
  }
  void d_probs(Scratch& w, const Tile& t, int64_t h, float* dp) const {
    const int64_t ld = score_ld();
    cpublas::brgemm(t.rows, ld, s.D, d_out.sr, ld, ld, false, d_out.at(t.b, h, t.r0), transposed(v, t, h, w.values_t),
                    dp);
  }
  void grad_q(Scratch&, const Tile& t, int64_t h, const float* ds, const Strided<float>& dq) const {
    cpublas::brgemm(t.rows, s.D, s.N, score_ld(), k.sr, dq.sr, false, ds, k.at(t.b, h, 0), dq.at(t.b, h, t.r0));
  }
  // dK and dV (TransposedGrads): part (N, D) = x^T rows for the tile's (rows, N) float rows x of stride lds and
  // (rows, D) rows of stride ld.
  void transposed_product(Scratch& w, const Tile& t, const float* x, int64_t lds, const float* rows, int64_t ld,
                          float* part) const {
    w.t.resize(s.N * kTileRows);
    transpose_rows(x, lds, t.rows, s.N, w.t.data(), t.rows);
    cpublas::brgemm(s.N, s.D, t.rows, t.rows, ld, s.D, false, w.t.data(), rows, part);
  }
};
#endif

// ---- tile loops -------------------------------------------------------------------------------------

// P for every head of the tile's group, stacked (group * rows, N): softmax(scale * q k^T) per row. Row
// statistics, (B, H, M, 2) (shift, 1 / sum) pairs: the forward writes them to `stats_out` where the
// backward will need P; the backward rebuilds the same P from `stats_in` in one pass.
template <typename T, typename Products>
void tile_probs(const Problem<T>& in, const Products& mm, typename Products::Scratch& w, const Tile& t, T* scores,
                T* probs, typename Problem<T>::Scalar* stats_out, const typename Problem<T>::Scalar* stats_in) {
  const Shape& s = in.s;
  const int64_t lds = mm.score_ld();
  for (int64_t j = 0; j < s.group; ++j) {
    mm.scores(w, t, t.h0 + j, scores);
    const int64_t row_stats = ((t.b * s.H + t.h0 + j) * s.M + t.r0) * 2;
    T* p = probs + j * t.rows * s.N;
    if (stats_in) {
      exp_rows(scores, lds, p, t.rows, s.N, in.scale, stats_in + row_stats);
    } else {
      softmax_rows(scores, lds, p, t.rows, s.N, in.scale, stats_out ? stats_out + row_stats : nullptr);
    }
  }
}

// The tile's captured map (rows, T): P at the token columns, averaged over the group's heads.
template <typename T>
void tile_map(const Problem<T>& in, const Tile& t, const T* probs, T* map) {
  const Shape& s = in.s;
  const T inv_group = T(1) / T(s.group);
  for (int64_t r = 0; r < t.rows; ++r) {
    for (int64_t c = 0; c < s.T; ++c) {
      T acc = 0;
      for (int64_t j = 0; j < s.group; ++j) acc += probs[(j * t.rows + r) * s.N + in.column(c)];
      map[r * s.T + c] = acc * inv_group;
    }
  }
}

// Forward over all tiles: writes out, and either the maps (capture) or one L1 partial per tile
// against ref (guided; maps are never written) and the row statistics of P for the backward.
template <typename T, typename Products>
void forward(const Problem<T>& in, const Products& mm, const Strided<typename Products::Store>& out, T* maps,
             const T* ref, double* loss_parts, T* stats) {
  const Shape& s = in.s;
  at::parallel_for(0, s.tiles(), 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    typename Products::Scratch w(s);
    const bool map_tile = !in.fused && !maps;  // the guided loss reads a separate map tile
    // Fused capture: the probability rows are the map rows, so softmax writes into the maps (from scores
    // in a cache-resident tile: the softmax in place on the map rows was slower).
    const bool all_into_maps = in.fused && maps && s.map_b0 == 0 && s.map_b1 == s.B;
    std::vector<T> scores(kTileRows * mm.score_ld()), probs(all_into_maps ? 0 : s.group * kTileRows * s.N),
        map(map_tile ? kTileRows * s.T : 0);
    for (int64_t i = begin; i < end; ++i) {
      const Tile t = locate(s, i);
      T* p = in.fused && maps && t.mapped ? maps + t.map_offset : probs.data();
      tile_probs(in, mm, w, t, scores.data(), p, stats, nullptr);
      for (int64_t j = 0; j < s.group; ++j) mm.attend(w, t, t.h0 + j, p + j * t.rows * s.N, out);
      if (maps) {
        if (t.mapped && !in.fused) tile_map(in, t, p, maps + t.map_offset);
        continue;
      }
      const T* tile = p;  // fused: the map rows are the probability rows (T == N)
      if (!in.fused) {
        tile_map(in, t, p, map.data());
        tile = map.data();
      }
      loss_parts[i] = l1_rows(tile, ref + t.map_offset, t.rows, s.T);
    }
  });
}

// Gradients flowing into the backward (d_out is an operand of the products); null pointers for the
// ones that are absent or not wanted.
template <typename T, typename Store>
struct Grads {
  const T* d_maps;  // capture: gradient of the maps
  const T* ref;     // guided: reference maps, with d_loss (B,)
  const T* d_loss;
  const T* stats;     // the forward's row statistics of P, if it kept them
  Strided<Store> dq;  // (B, H, M, D), written in (B, M, H, D) memory order
  T* dk_parts;        // (B * H, chunks, N, D) per-tile partials
  T* dv_parts;
};

// DESIGN §3 per tile: dP = dO V^T + E, Delta = rowsum(P * dP), dS = P * (dP - Delta), then
// dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO. E (the map gradient scattered into the token
// columns) is formed here: from d_maps, or as the L1 sign against ref.
template <typename T, typename Products>
void backward(const Problem<T>& in, const Products& mm, const Grads<T, typename Products::Store>& g) {
  const Shape& s = in.s;
  at::parallel_for(0, s.tiles(), 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    typename Products::Scratch w(s);
    // Fused guided backward: the L1 sign is formed per probability row below, no map tile.
    const bool fused_l1 = in.fused && g.d_loss;
    const int64_t ldd = mm.score_ld();  // dP's and dS's row stride
    std::vector<T> scores(kTileRows * ldd), probs(s.group * kTileRows * s.N), d_probs(kTileRows * ldd),
        e(g.d_maps || (g.d_loss && !fused_l1) ? kTileRows * s.T : 0);
    for (int64_t i = begin; i < end; ++i) {
      const Tile t = locate(s, i);
      const int64_t elems = t.rows * s.T;
      tile_probs(in, mm, w, t, scores.data(), probs.data(), nullptr, g.stats);
      const bool has_map_grad = (g.d_maps || g.d_loss) && t.mapped;
      if (g.d_maps && t.mapped) {
        // A head-mean map spreads its gradient over the heads with weight 1/H.
        const T inv_group = T(1) / T(s.group);
        for (int64_t x = 0; x < elems; ++x) e[x] = g.d_maps[t.map_offset + x] * inv_group;
      } else if (g.d_loss && !fused_l1) {
        // d|A - ref|/dP = sign(A - ref) / H in both map modes (mean over heads of the loss, or of A).
        tile_map(in, t, probs.data(), e.data());
        const T w_sign = g.d_loss[t.b] / T(s.H);
        for (int64_t x = 0; x < elems; ++x) {
          const T diff = e[x] - g.ref[t.map_offset + x];
          e[x] = T((diff > 0) - (diff < 0)) * w_sign;
        }
      }
      for (int64_t j = 0; j < s.group; ++j) {
        const int64_t h = t.h0 + j;
        const T* p = probs.data() + j * t.rows * s.N;
        T* dp = d_probs.data();
        if (mm.d_out) {
          mm.d_probs(w, t, h, dp);
        } else {
          std::fill(d_probs.begin(), d_probs.end(), T(0));
        }
        if (has_map_grad && !fused_l1) {
          for (int64_t r = 0; r < t.rows; ++r) {
            for (int64_t c = 0; c < s.T; ++c) dp[r * ldd + in.column(c)] += e[r * s.T + c];  // repeats add up
          }
        }
        // Fused guided backward: dP += sign(P - ref) d_loss / H on the way; then scale dS = scale P (dP - Delta)
        // in place, the operand of both dQ and dK.
        softmax_grad_rows(p, dp, ldd, fused_l1 ? g.ref + t.map_offset : nullptr,
                          fused_l1 ? g.d_loss[t.b] / T(s.H) : T(0), in.scale, t.rows, s.N);
        const int64_t part = ((t.b * s.H + h) * s.chunks + t.chunk) * s.N * s.D;
        if (g.dq) mm.grad_q(w, t, h, dp, g.dq);
        if (g.dk_parts) mm.grad_k(w, t, h, dp, g.dk_parts + part);
        if (g.dv_parts) mm.grad_v(w, t, h, p, g.dv_parts + part);
      }
    }
  });
}

// (B * H, chunks, N, D) tile partials -> (B * H, N, D), summed in chunk order.
at::Tensor sum_chunks(const at::Tensor& parts) {
  const int64_t chunks = parts.size(1);
  if (chunks == 1) return parts.squeeze(1);
  const int64_t bh = parts.size(0), elems = parts.size(2) * parts.size(3);
  auto total = at::empty({bh, parts.size(2), parts.size(3)}, parts.options());
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "dreamblend_sum_chunks", [&] {
    const scalar_t* src = parts.const_data_ptr<scalar_t>();
    scalar_t* dst = total.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, bh, 1, [&](int64_t begin, int64_t end) {
      for (int64_t x = begin; x < end; ++x) {
        scalar_t* d = dst + x * elems;
        const scalar_t* p = src + x * chunks * elems;
        std::copy(p, p + elems, d);
        for (int64_t c = 1; c < chunks; ++c) {
          for (int64_t y = 0; y < elems; ++y) d[y] += p[c * elems + y];
        }
      }
    });
  });
  return total;
}

// Checked, converted op inputs; tensors kept alive here back the raw pointers the tile loops read.
struct Prepared {
  Shape shape;
  at::ScalarType compute;  // probabilities, maps, loss, dK and dV partials
  at::ScalarType store;    // q, k, v, d_out, out and dQ: bfloat16 on the bf16 path, else the compute dtype
  bool all_tokens;         // tokens are 0..N-1 in order
  at::Tensor q, k, v, tokens;  // tokens undefined: every token in order

  at::Tensor as_compute(const at::Tensor& t) const { return t.to(compute).contiguous(); }
  // (B, H, rows, D) operands are read in place when D is contiguous (and converted only for half inputs
  // off the bf16 path).
  at::Tensor as_operand(const at::Tensor& t) const {
    at::Tensor c = t.to(store);
    return c.stride(3) == 1 ? c : c.contiguous();
  }
  at::TensorOptions compute_options() const { return q.options().dtype(compute); }
  // (B, H, M, D) in (B, M, H, D) memory order: the layout the attention processor reshapes to.
  at::Tensor new_rows() const {
    const Shape& s = shape;
    return at::empty({s.B, s.M, s.H, s.D}, q.options()).transpose(1, 2);
  }
  std::vector<int64_t> stats_sizes() const { return {shape.B, shape.H, shape.M, 2}; }
  std::vector<int64_t> map_sizes() const {
    const Shape& s = shape;
    const int64_t rows = s.map_b1 - s.map_b0;
    return s.head_mean ? std::vector<int64_t>{rows, s.M, s.T} : std::vector<int64_t>{rows, s.H, s.M, s.T};
  }
  void check_map(const at::Tensor& t, const char* name) const {
    const std::vector<int64_t> expected = map_sizes();
    TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), name, " has shape ", t.sizes(), ", expected ",
                at::IntArrayRef(expected));
  }
  template <typename T>
  Problem<T> problem(double scale) const {
    return {shape, T(scale), tokens.defined() ? tokens.const_data_ptr<int64_t>() : nullptr,
            all_tokens && !shape.head_mean};
  }
};

bool bf16_products_available() {
#ifdef DREAMBLEND_X86_SIMD
  return bf16_products_supported();
#else
  return false;
#endif
}

// The CPU half of bf16_products_available (false where the SIMD kernels are not built).
bool cpu_has_bf16_products() {
#ifdef DREAMBLEND_X86_SIMD
  return cpu_has_avx512bf16();
#else
  return false;
#endif
}

// Whether bfloat16 inputs take the bf16 products where they are available: on where the CPU has them
// (tests switch it off to run the float32 ones too), off on a CPU without them.
std::atomic<bool>& bf16_setting() {
  static std::atomic<bool> enabled{cpu_has_bf16_products()};
  return enabled;
}

// -1 reads whether the bf16 products are in use (the setting, and available now). 1 or 0 switches the
// setting and returns the previous one, so that a caller restores it whether or not oneDNN was on in
// between; switching on is refused on a CPU without AVX512-BF16.
bool use_bf16_products(int64_t enable) {
  if (enable < 0) return bf16_setting().load() && bf16_products_available();
  TORCH_CHECK(enable == 0 || cpu_has_bf16_products(), "this CPU has no AVX512-BF16: no bfloat16 products");
  return bf16_setting().exchange(enable > 0);
}

// float32 products through oneDNN's micro-kernel (BrgemmProducts) rather than ATen's GEMMs: on several
// threads (see BrgemmProducts), and on one thread where MKL, which ATen's float32 GEMMs call, is not on
// its maker's CPU. One Sapphire Rapids core ran the op's q k^T shapes 3-8 % faster through MKL; one AMD
// EPYC (Zen 4) core ran the whole op 18-28 % faster through brgemm (SD1.5 and SDXL layers, both passes).
bool float32_brgemm() {
#ifdef DREAMBLEND_X86_SIMD
  static const bool intel = (__builtin_cpu_init(), __builtin_cpu_is("intel"));
  return at::get_num_threads() > 1 || !intel;
#else
  return false;
#endif
}

// Calls fn(problem, products) with the products that suit the prepared operands: brgemm for bfloat16 (an even
// D: q and dO are A operands read in place, whose K = D pairs up) and for float32 where float32_brgemm says,
// ATen's GEMMs otherwise. `attend`: the
// forward's O = P V is computed; `grad_q`: the backward's dQ. d_out may be undefined.
template <typename Fn>
void with_products(const Prepared& p, double scale, const at::Tensor& d_out, bool attend, bool grad_q, Fn&& fn) {
#ifdef DREAMBLEND_X86_SIMD
  if (p.store == at::kBFloat16) {
    const Bf16Products mm(p.shape, strided<BF16>(p.q), strided<BF16>(p.k), strided<BF16>(p.v), strided<BF16>(d_out),
                          attend, grad_q);
    fn(p.problem<float>(scale), mm);
    return;
  }
  if (p.compute == at::kFloat && float32_brgemm()) {
    const BrgemmProducts mm{{}, p.shape, strided<float>(p.q), strided<float>(p.k), strided<float>(p.v),
                            strided<float>(d_out)};
    fn(p.problem<float>(scale), mm);
    return;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(p.compute, "dreamblend_cpp", [&] {
    const AtenProducts<scalar_t> mm{p.shape, strided<scalar_t>(p.q), strided<scalar_t>(p.k), strided<scalar_t>(p.v),
                                    strided<scalar_t>(d_out)};
    fn(p.problem<scalar_t>(scale), mm);
  });
}

// float32 for half inputs, float64 kept: the reference's compute dtype.
at::ScalarType compute_type(const at::Tensor& q) { return c10::promoteTypes(q.scalar_type(), at::kFloat); }

// `map_rows`: [start, stop) of the batch rows that have maps; all of them by default.
Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& tokens,
                 bool head_mean, std::pair<int64_t, int64_t> map_rows = {0, -1}) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "expected q (B, H, M, D) and k, v (B, H, N, D)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "dreamblend_cpp runs on CPU tensors");
  TORCH_CHECK(q.is_floating_point() && q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share one floating dtype");
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), N = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == H && k.size(3) == D,
              "q, k, v must share B, H and D, and k and v must have the same shape");
  TORCH_CHECK(M > 0 && N > 0, "attention needs at least one query and one key position");
  // Every token (no index tensor) is the common case: no index checks, no index array, no reductions.
  at::Tensor idx;
  bool all_tokens = true;
  if (tokens.has_value()) {
    idx = tokens->to(at::kLong).contiguous();
    TORCH_CHECK(idx.dim() == 1 && idx.numel() > 0, "tokens must be a non-empty 1-D index tensor");
    all_tokens = idx.numel() == N;
    const int64_t* ids = idx.const_data_ptr<int64_t>();
    for (int64_t c = 0; c < idx.numel(); ++c) {
      TORCH_CHECK(ids[c] >= 0 && ids[c] < N, "token indices must lie in [0, ", N, ")");
      all_tokens = all_tokens && ids[c] == c;
    }
  }
  const int64_t map_columns = idx.defined() ? idx.numel() : N;
  const int64_t group = head_mean ? H : 1;
  const int64_t map_b1 = map_rows.second < 0 ? B : map_rows.second;
  TORCH_CHECK(0 <= map_rows.first && map_rows.first < map_b1 && map_b1 <= B, "map rows [", map_rows.first, ", ",
              map_b1, ") must be a non-empty range of the batch's ", B, " rows");
  const bool bf16 = q.scalar_type() == at::kBFloat16 && D % 2 == 0 && bf16_setting().load() &&
                    bf16_products_available();
  Prepared p{{B, H, M, N, D, map_columns, head_mean, group, (M + kTileRows - 1) / kTileRows, map_rows.first, map_b1},
             compute_type(q), bf16 ? at::kBFloat16 : compute_type(q), all_tokens};
  p.q = p.as_operand(q);
  p.k = p.as_operand(k);
  p.v = p.as_operand(v);
  p.tokens = idx;
  return p;
}

// out, and the maps (capture) or the per-tile loss partials and P's row statistics (guided).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& ref_in, const OptTensor& tokens,
    double scale, bool head_mean, std::pair<int64_t, int64_t> map_rows = {0, -1}) {
  const Prepared p = prepare(q, k, v, tokens, head_mean, map_rows);
  const Shape& s = p.shape;
  auto out = p.new_rows();
  at::Tensor maps, ref, loss_parts, stats;
  if (ref_in.has_value()) {
    p.check_map(*ref_in, "ref");
    ref = p.as_compute(*ref_in);
    loss_parts = at::empty({s.B, s.groups() * s.chunks}, p.compute_options().dtype(at::kDouble));
    stats = at::empty(p.stats_sizes(), p.compute_options());
  } else {
    maps = at::empty(p.map_sizes(), p.compute_options());
  }
  with_products(p, scale, at::Tensor(), /*attend=*/true, /*grad_q=*/false, [&](const auto& problem, const auto& mm) {
    using T = typename std::decay_t<decltype(problem)>::Scalar;
    using Store = typename std::decay_t<decltype(mm)>::Store;
    forward(problem, mm, strided<Store>(out), maps.defined() ? maps.mutable_data_ptr<T>() : nullptr,
            ref.defined() ? ref.const_data_ptr<T>() : nullptr,
            loss_parts.defined() ? loss_parts.mutable_data_ptr<double>() : nullptr,
            stats.defined() ? stats.mutable_data_ptr<T>() : nullptr);
  });
  return {out.to(q.scalar_type()), maps, loss_parts, stats};
}

// Maps of batch rows [map_start, map_stop) (map_stop -1: to the end); out of every row.
std::tuple<at::Tensor, at::Tensor> capture_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const OptTensor& tokens, double scale, bool head_mean,
                                                     int64_t map_start, int64_t map_stop) {
  auto [out, maps, no_loss, no_stats] =
      run_forward(q, k, v, std::nullopt, tokens, scale, head_mean, {map_start, map_stop});
  return {out, maps};
}

// out, the per-sample loss and P's row statistics, (B, H, M, 2), for attention_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> guided_attention(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& ref,
                                                                const OptTensor& tokens, double scale,
                                                                bool head_mean) {
  auto [out, no_maps, parts, stats] = run_forward(q, k, v, ref, tokens, scale, head_mean);
  // Per sample: sum the tile partials in order, then mean over head groups (a no-op in head-mean mode).
  const int64_t B = parts.size(0), per_sample = parts.size(1), groups = head_mean ? 1 : q.size(1);
  auto loss = at::empty({B}, parts.options());
  const double* src = parts.const_data_ptr<double>();
  double* dst = loss.mutable_data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    double acc = 0;
    for (int64_t x = 0; x < per_sample; ++x) acc += src[b * per_sample + x];
    dst[b] = acc / double(groups);
  }
  return {out, loss.to(compute_type(q)), stats};
}

// dQ, dK, dV; a gradient that was not asked for comes back as an empty tensor (ops cannot return None).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& tokens, const OptTensor& d_out,
    const OptTensor& d_maps, const OptTensor& ref, const OptTensor& d_loss, double scale, bool head_mean,
    bool need_dq, bool need_dk, bool need_dv, int64_t map_start, int64_t map_stop, const OptTensor& stats) {
  const Prepared p = prepare(q, k, v, tokens, head_mean, {map_start, map_stop});
  const Shape& s = p.shape;
  TORCH_CHECK(!(d_maps.has_value() && d_loss.has_value()),
              "pass d_maps (capture) or ref and d_loss (guided), not both");
  TORCH_CHECK(d_loss.has_value() == ref.has_value(), "the guided backward needs both ref and d_loss");
  TORCH_CHECK(!d_loss.has_value() || (s.map_b0 == 0 && s.map_b1 == s.B), "the guided backward covers every row");
  at::Tensor dout_c, dmaps_c, ref_c, dloss_c;
  if (d_out.has_value()) {
    TORCH_CHECK(d_out->sizes() == q.sizes(), "d_out has shape ", d_out->sizes(), ", expected ", q.sizes());
    dout_c = p.as_operand(*d_out);
  }
  if (d_maps.has_value()) {
    p.check_map(*d_maps, "d_maps");
    dmaps_c = p.as_compute(*d_maps);
  }
  if (d_loss.has_value()) {
    p.check_map(*ref, "ref");
    TORCH_CHECK(d_loss->dim() == 1 && d_loss->size(0) == s.B, "d_loss must have shape (B,)");
    ref_c = p.as_compute(*ref);
    dloss_c = p.as_compute(*d_loss);
  }
  at::Tensor stats_c;
  if (stats.has_value()) {
    // Converting them would not give back the forward's P: they must be its own.
    TORCH_CHECK(stats->sizes() == at::IntArrayRef(p.stats_sizes()) && stats->scalar_type() == p.compute,
                "stats must be the (B, H, M, 2) ", p.compute, " row statistics guided_attention returned for these "
                "q, k and scale; got ", stats->sizes(), " ", stats->scalar_type());
    stats_c = stats->contiguous();
  }
  const auto opts = p.compute_options();
  auto dq = need_dq ? p.new_rows() : at::Tensor();
  auto dk_parts = need_dk ? at::empty({s.B * s.H, s.chunks, s.N, s.D}, opts) : at::Tensor();
  // Without a gradient on out, dV = P^T dO is zero: nothing to compute.
  const bool run_dv = need_dv && dout_c.defined();
  auto dv_parts = run_dv ? at::empty({s.B * s.H, s.chunks, s.N, s.D}, opts) : at::Tensor();
  with_products(p, scale, dout_c, /*attend=*/false, need_dq, [&](const auto& problem, const auto& mm) {
    using T = typename std::decay_t<decltype(problem)>::Scalar;
    using Store = typename std::decay_t<decltype(mm)>::Store;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; };
    auto mut = [](at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<T>() : nullptr; };
    backward(problem, mm,
             Grads<T, Store>{ptr(dmaps_c), ptr(ref_c), ptr(dloss_c), ptr(stats_c), strided<Store>(dq), mut(dk_parts),
                             mut(dv_parts)});
  });
  auto none = q.new_empty({0});
  auto dq_out = need_dq ? dq.to(q.scalar_type()) : none;
  auto dk_out = need_dk ? sum_chunks(dk_parts).view(k.sizes()).to(k.scalar_type()) : none;
  at::Tensor dv_out = none;
  if (run_dv) {
    dv_out = sum_chunks(dv_parts).view(v.sizes()).to(v.scalar_type());
  } else if (need_dv) {
    dv_out = at::zeros_like(v);
  }
  return {dq_out, dk_out, dv_out};
}

// ---- autograd --------------------------------------------------------------------------------------
// Each Function calls its op through the dispatcher below the autograd key (so FakeTensor tracing under
// torch.compile reaches the registered fake kernels) and saves q, k, v, tokens (and ref and P's row
// statistics), never P.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

at::Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptTensor as_optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The backward op differentiated again (create_graph=True): refused with a message, not a silent zero.
struct BackwardFunction : torch::autograd::Function<BackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& tokens, const OptTensor& d_out, const OptTensor& d_maps,
                               const OptTensor& ref, const OptTensor& d_loss, double scale, bool head_mean,
                               bool need_dq, bool need_dk, bool need_dv, int64_t map_start, int64_t map_stop,
                               const OptTensor& stats) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<decltype(attention_backward)>("dreamblend_cpp::attention_backward");
    auto [dq, dk, dv] = op.call(q, k, v, tokens, d_out, d_maps, ref, d_loss, scale, head_mean, need_dq, need_dk, need_dv,
                                map_start, map_stop, stats);
    return {dq, dk, dv};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "the dreamblend C++ ops do not support double backward (create_graph=True)");
  }
};

// dQ, dK, dV for the saved q, k, v: the needed ones only (K and V of frozen text features get none).
variable_list input_grads(AutogradContext* ctx, const variable_list& saved, const at::Tensor& d_out,
                          const at::Tensor& d_maps, const at::Tensor& ref, const at::Tensor& d_loss,
                          const at::Tensor& stats = at::Tensor()) {
  const bool need[3] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
  auto grads = BackwardFunction::apply(saved[0], saved[1], saved[2], as_optional(saved[3]), as_optional(d_out),
                                       as_optional(d_maps), as_optional(ref), as_optional(d_loss),
                                       ctx->saved_data["scale"].toDouble(), ctx->saved_data["head_mean"].toBool(),
                                       need[0], need[1], need[2], ctx->saved_data["map_start"].toInt(),
                                       ctx->saved_data["map_stop"].toInt(), as_optional(stats));
  for (int i = 0; i < 3; ++i) {
    if (!need[i]) grads[i] = at::Tensor();
  }
  return grads;
}

void save(AutogradContext* ctx, variable_list tensors, double scale, bool head_mean, int64_t map_start = 0,
          int64_t map_stop = -1) {
  ctx->save_for_backward(std::move(tensors));
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["head_mean"] = head_mean;
  ctx->saved_data["map_start"] = map_start;
  ctx->saved_data["map_stop"] = map_stop;
  ctx->set_materialize_grads(false);  // an output without a gradient costs no work in the backward
}

struct CaptureFunction : torch::autograd::Function<CaptureFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& tokens, double scale, bool head_mean, int64_t map_start,
                               int64_t map_stop) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<decltype(capture_attention)>("dreamblend_cpp::capture_attention");
    auto [out, maps] = op.call(q, k, v, tokens, scale, head_mean, map_start, map_stop);
    save(ctx, {q, k, v, or_undefined(tokens)}, scale, head_mean, map_start, map_stop);
    return {out, maps};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto g = input_grads(ctx, ctx->get_saved_variables(), grads[0], grads[1], at::Tensor(), at::Tensor());
    return {g[0], g[1], g[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct GuidedFunction : torch::autograd::Function<GuidedFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& ref, const OptTensor& tokens, double scale, bool head_mean) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<decltype(guided_attention)>("dreamblend_cpp::guided_attention");
    auto [out, loss, stats] = op.call(q, k, v, ref, tokens, scale, head_mean);
    save(ctx, {q, k, v, or_undefined(tokens), ref, stats}, scale, head_mean);
    ctx->mark_non_differentiable({stats});
    return {out, loss, stats};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& d_loss = grads[1];
    auto g = input_grads(ctx, saved, grads[0], at::Tensor(), d_loss.defined() ? saved[4] : at::Tensor(), d_loss,
                         saved[5]);
    return {g[0], g[1], g[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> capture_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const OptTensor& tokens, double scale, bool head_mean,
                                                    int64_t map_start, int64_t map_stop) {
  auto r = CaptureFunction::apply(q, k, v, tokens, scale, head_mean, map_start, map_stop);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> guided_autograd(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& ref,
                                                               const OptTensor& tokens, double scale,
                                                               bool head_mean) {
  auto r = GuidedFunction::apply(q, k, v, ref, tokens, scale, head_mean);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& tokens, const OptTensor& d_out,
    const OptTensor& d_maps, const OptTensor& ref, const OptTensor& d_loss, double scale, bool head_mean,
    bool need_dq, bool need_dk, bool need_dv, int64_t map_start, int64_t map_stop, const OptTensor& stats) {
  auto r = BackwardFunction::apply(q, k, v, tokens, d_out, d_maps, ref, d_loss, scale, head_mean, need_dq, need_dk,
                                   need_dv, map_start, map_stop, stats);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY(dreamblend_cpp, m) {
  // map_start/map_stop: the batch rows [start, stop) that keep maps (stop -1: to the end).
  m.def("capture_attention(Tensor q, Tensor k, Tensor v, Tensor? tokens, float scale, bool head_mean, "
        "int map_start=0, int map_stop=-1) -> (Tensor, Tensor)");
  // guided_attention -> (out, loss, stats): P's (B, H, M, 2) row statistics, which attention_backward takes
  // to rebuild the same P without its max and sum passes.
  m.def("guided_attention(Tensor q, Tensor k, Tensor v, Tensor ref, Tensor? tokens, float scale, bool head_mean) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("attention_backward(Tensor q, Tensor k, Tensor v, Tensor? tokens, Tensor? d_out, Tensor? d_maps, "
        "Tensor? ref, Tensor? d_loss, float scale, bool head_mean, bool need_dq, bool need_dk, bool need_dv, "
        "int map_start=0, int map_stop=-1, Tensor? stats=None) -> (Tensor, Tensor, Tensor)");
  // The float row kernels' instruction set: 0 portable, 1 AVX2, 2 AVX-512; returns the previous one.
  m.def("simd_level(int level=-1) -> int", &simd_level);
  m.def("simd_detected() -> int", [] { return int64_t(detected_simd()); });
  // Whether bfloat16 inputs use the bf16 products: 1 on, 0 off, -1 only reads; returns the previous setting.
  m.def("use_bf16_products(int enable=-1) -> bool", &use_bf16_products);
  m.def("bf16_products_available() -> bool", &bf16_products_available);
}

TORCH_LIBRARY_IMPL(dreamblend_cpp, CPU, m) {
  m.impl("capture_attention", &capture_attention);
  m.impl("guided_attention", &guided_attention);
  m.impl("attention_backward", &attention_backward);
}

TORCH_LIBRARY_IMPL(dreamblend_cpp, Autograd, m) {
  m.impl("capture_attention", &capture_autograd);
  m.impl("guided_attention", &guided_autograd);
  m.impl("attention_backward", &backward_autograd);
}
