// int4 matmuls for x86 CPUs with AVX-512 VNNI, BF16 and VBMI (Sapphire Rapids and later, Zen 4 and later).
//
// Weights are on GGUF's grid, w = d * q + m with q in 0..15 and one (d, m) per 32 weights along the input
// dimension (larger groups are stored with their (d, m) repeated). Activations are rounded per row and per
// 32 values to two int8 digits (x ~= dx * (x1 + x2 / 256), dx = absmax / 127; see quantize_row), and the
// 4-bit codes multiply them as they are, with integer dot products (vpdpbusd: 64 multiply-adds per
// instruction, no conversion of the codes to floats):
//   sum_k w_k x_k  ~=  d * dx / 256 * sum_k q_k (256 x1_k + x2_k)  +  m * sum_k x_k   (per 32-weight group)
// The min term uses the exact float sum of the activations, so only the code term sees the rounding.
//
// Layout (`ember.layers.quant.int4_native.pack`): outputs in blocks of 16, one per zmm lane. For a block and a
// group g, four 64-byte vectors s = 0..3; lane i's 4 bytes hold the codes of output i at k = 32g + 4s + b
// (b = 0..3) in their low nibbles and at k = 32g + 16 + 4s + b in their high nibbles. One AND and one shift
// give two vpdpbusd operands, each multiplying a 4-byte broadcast of the activations. Scales and mins are
// stored [N / 16, G, 16] so a block's 16 come in one load.
//
// Each output row's arithmetic is the same whatever the number of rows in the call, so a request's result
// does not depend on what it is batched with. Many rows (prefill chunks, large decode batches) instead
// dequantize the weight to bf16 in one pass and run one GEMM (oneDNN's, AMX where the CPU has it).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace ember_amx {  // amx_linear_cpu.cpp
bool available();
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const at::Tensor& minimum);
}  // namespace ember_amx

namespace {

constexpr int64_t kBlock = 16;  // outputs per block (zmm lanes)
constexpr int64_t kGroup = 32;  // weights per (d, m)
constexpr int64_t kAmxMaxRows = 1024;  // int4 x bf16 on AMX below this many rows
#ifndef EMBER_PREFETCH
#define EMBER_PREFETCH 2048
#endif
constexpr int64_t kPrefetch = EMBER_PREFETCH;  // bytes ahead in a thread's stream of codes

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// One row of activations -> two int8 digits per value, scales dx [G] and exact sums sx [G]:
// x ~= dx * (x1 + x2 / 256), x1 = round(x / dx) with dx = absmax / 127, x2 = round((x - dx x1) * 256 / dx).
// One int8 digit alone (llama.cpp's Q8 activations) loses about 0.4% of a group's largest value on every
// value of the group; with an outlier in the group that is most of the small values, and on SmolLM2 it cost
// 1.8% perplexity. Two digits leave 1/64000 of it, less than bf16's own rounding, for twice the integer
// dot products (the codes are unpacked once for both).
// cx [G] = 128 * (256 * sum x1 + sum x2): what offset-binary (q + 128) weight codes add to a group's dot product.
template <typename X>
void quantize_row(const X* x, int64_t K, int8_t* xq, float* dx, float* sx, int32_t* cx) {
  for (int64_t g = 0; g < K / kGroup; ++g) {
    const __m512 a = load16(x + g * kGroup), b = load16(x + g * kGroup + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    sx[g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    dx[g] = amax / 127.0f;
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m512 inv2 = _mm512_set1_ps(amax > 0.0f ? 256.0f * 127.0f / amax : 0.0f);
    const __m512 step = _mm512_set1_ps(dx[g]);
    const __m512 v[2] = {a, b};
    __m512i sum1 = _mm512_setzero_si512(), sum2 = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      const __m512 q1 = _mm512_roundscale_ps(_mm512_mul_ps(v[h], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 rest = _mm512_fnmadd_ps(q1, step, v[h]);  // x - dx * x1, |rest| <= dx / 2
      // saturate first: |rest| * 256 / dx can reach 128 by rounding, one past int8
      const __m512i q2 = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(rest, inv2)),
                                                           _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
      const __m512i q1i = _mm512_cvtps_epi32(q1);
      sum1 = _mm512_add_epi32(sum1, q1i);
      sum2 = _mm512_add_epi32(sum2, q2);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + g * kGroup + 16 * h), _mm512_cvtsepi32_epi8(q1i));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + K + g * kGroup + 16 * h), _mm512_cvtsepi32_epi8(q2));
    }
    cx[g] = 128 * (256 * _mm512_reduce_add_epi32(sum1) + _mm512_reduce_add_epi32(sum2));
  }
}

// One block of 16 outputs x R activation rows.
template <int R, typename S, typename Y>
inline void tile(const uint8_t* w, const S* d, const S* m, int64_t groups, const int8_t* xq, const float* dx,
                 const float* sx, int64_t K, Y* out, int64_t ldo) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i lo[4], hi[4];
    for (int s = 0; s < 4; ++s) {
      // software prefetch ahead of the stream: each call reads a few hundred KB, too little for the hardware
      // prefetchers to ramp up (they also stop at every 4 KB page)
      _mm_prefetch(reinterpret_cast<const char*>(w + (g * 4 + s) * 64 + kPrefetch), _MM_HINT_T0);
      const __m512i p = _mm512_loadu_si512(w + (g * 4 + s) * 64);
      lo[s] = _mm512_and_si512(p, low4);
      hi[s] = _mm512_and_si512(_mm512_srli_epi16(p, 4), low4);
    }
    const __m512 dg = load16(d + g * kBlock), mg = load16(m + g * kBlock);
    for (int r = 0; r < R; ++r) {
      const int32_t* xr = reinterpret_cast<const int32_t*>(xq + r * 2 * K + g * kGroup);  // first digits
      const int32_t* xr2 = reinterpret_cast<const int32_t*>(xq + r * 2 * K + K + g * kGroup);  // second
      __m512i qa = _mm512_setzero_si512(), qb = _mm512_setzero_si512();
      __m512i qa2 = _mm512_setzero_si512(), qb2 = _mm512_setzero_si512();
      for (int s = 0; s < 4; ++s) {
        qa = _mm512_dpbusd_epi32(qa, lo[s], _mm512_set1_epi32(xr[s]));
        qb = _mm512_dpbusd_epi32(qb, hi[s], _mm512_set1_epi32(xr[4 + s]));
        qa2 = _mm512_dpbusd_epi32(qa2, lo[s], _mm512_set1_epi32(xr2[s]));
        qb2 = _mm512_dpbusd_epi32(qb2, hi[s], _mm512_set1_epi32(xr2[4 + s]));
      }
      // 256 * digit-1 sum + digit-2 sum: at most 256 * 32 * 15 * 127 + ..., far inside int32
      qa = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(qa, qb), 8), _mm512_add_epi32(qa2, qb2));
      const float* dxr = dx + r * groups;
      const float* sxr = sx + r * groups;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qa), _mm512_mul_ps(dg, _mm512_set1_ps(dxr[g] * (1.0f / 256))),
                               acc[r]);
      acc[r] = _mm512_fmadd_ps(mg, _mm512_set1_ps(sxr[g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(64) float v[kBlock];
    _mm512_store_ps(v, acc[r]);
    for (int i = 0; i < kBlock; ++i) out[r * ldo + i] = static_cast<Y>(v[i]);
  }
}

// int8 weights (GGUF's Q8_0 grid, w = d * q, q in -127..127), stored offset-binary (q + 128) in blocks of 16
// outputs: for a block and a group g, eight 64-byte vectors s = 0..7, lane i's 4 bytes the codes of output i
// at k = 32g + 4s .. 32g + 4s + 3. The offset comes back out through cx.
template <int R, typename Y>
inline void tile8(const uint8_t* w, const float* d, int64_t groups, const int8_t* xq, const float* dx,
                  const int32_t* cx, int64_t K, Y* out, int64_t ldo) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i p[8];
    for (int s = 0; s < 8; ++s) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (g * 8 + s) * 64 + kPrefetch), _MM_HINT_T0);
      p[s] = _mm512_loadu_si512(w + (g * 8 + s) * 64);
    }
    const __m512 dg = _mm512_loadu_ps(d + g * kBlock);
    for (int r = 0; r < R; ++r) {
      const int32_t* xr = reinterpret_cast<const int32_t*>(xq + r * 2 * K + g * kGroup);
      const int32_t* xr2 = reinterpret_cast<const int32_t*>(xq + r * 2 * K + K + g * kGroup);
      __m512i a[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
      __m512i b[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
      for (int s = 0; s < 8; ++s) {
        a[s & 1] = _mm512_dpbusd_epi32(a[s & 1], p[s], _mm512_set1_epi32(xr[s]));
        b[s & 1] = _mm512_dpbusd_epi32(b[s & 1], p[s], _mm512_set1_epi32(xr2[s]));
      }
      // 256 * digit-1 sum + digit-2 sum - the offset's share: |.| < 256 * 32 * 255 * 127 * 1.01, inside int32
      const __m512i t = _mm512_sub_epi32(
          _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(a[0], a[1]), 8), _mm512_add_epi32(b[0], b[1])),
          _mm512_set1_epi32(cx[r * groups + g]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(dg, _mm512_set1_ps(dx[r * groups + g] * (1.0f / 256))),
                               acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(64) float v[kBlock];
    _mm512_store_ps(v, acc[r]);
    for (int i = 0; i < kBlock; ++i) out[r * ldo + i] = static_cast<Y>(v[i]);
  }
}

void check_args(const at::Tensor& codes, const at::Tensor& d, const at::Tensor& m) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "codes: uint8 [N, K/2]");
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK(N % kBlock == 0 && K % kGroup == 0, "codes: N a multiple of 16 and K of 32");
  TORCH_CHECK(d.sizes() == m.sizes() && d.scalar_type() == m.scalar_type() && d.is_contiguous() && m.is_contiguous(),
              "scale and min: one dtype and shape");
  TORCH_CHECK(d.numel() == N * (K / kGroup), "scale: [N / 16, K / 32, 16]");
  TORCH_CHECK(d.scalar_type() == at::kFloat || d.scalar_type() == at::kHalf, "scale: float32 or float16");
}

// A call's activations, rounded once (quantize_row, row by row) for every block of outputs to read.
struct RoundedRows {
  std::vector<int8_t> xq;  // [M, 2K]: first digits, then second digits, per row
  std::vector<float> dx, sx;  // [M, G]
  std::vector<int32_t> cx;  // [M, G]

  template <typename X>
  RoundedRows(const X* x, int64_t M, int64_t K)
      : xq(2 * M * K), dx(M * (K / kGroup)), sx(M * (K / kGroup)), cx(M * (K / kGroup)) {
    const int64_t groups = K / kGroup;
    for (int64_t r = 0; r < M; ++r)
      quantize_row(x + r * K, K, xq.data() + r * 2 * K, dx.data() + r * groups, sx.data() + r * groups,
                   cx.data() + r * groups);
  }
};

template <typename X, typename S>
void linear_impl(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& dt, const at::Tensor& mt, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), groups = K / kGroup;
  const RoundedRows a(x.data_ptr<X>(), M, K);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const S* dp = dt.data_ptr<S>();
  const S* mp = mt.data_ptr<S>();
  X* op = out.data_ptr<X>();
  at::parallel_for(0, N / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* w = cp + b * kBlock * (K / 2);
      const S* d = dp + b * groups * kBlock;
      const S* m = mp + b * groups * kBlock;
      int64_t r = 0;
      for (; r + 4 <= M; r += 4)
        tile<4>(w, d, m, groups, a.xq.data() + r * 2 * K, a.dx.data() + r * groups, a.sx.data() + r * groups, K,
                op + r * N + b * kBlock, N);
      for (; r + 2 <= M; r += 2)
        tile<2>(w, d, m, groups, a.xq.data() + r * 2 * K, a.dx.data() + r * groups, a.sx.data() + r * groups, K,
                op + r * N + b * kBlock, N);
      for (; r < M; ++r)
        tile<1>(w, d, m, groups, a.xq.data() + r * 2 * K, a.dx.data() + r * groups, a.sx.data() + r * groups, K,
                op + r * N + b * kBlock, N);
    }
  });
}

template <typename X>
void linear8_impl(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& dt, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), groups = K / kGroup;
  const RoundedRows a(x.data_ptr<X>(), M, K);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* dp = dt.data_ptr<float>();
  X* op = out.data_ptr<X>();
  at::parallel_for(0, N / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* w = cp + b * kBlock * K;
      const float* d = dp + b * groups * kBlock;
      int64_t r = 0;
      for (; r + 4 <= M; r += 4)
        tile8<4>(w, d, groups, a.xq.data() + r * 2 * K, a.dx.data() + r * groups, a.cx.data() + r * groups, K,
                 op + r * N + b * kBlock, N);
      for (; r < M; ++r)
        tile8<1>(w, d, groups, a.xq.data() + r * 2 * K, a.dx.data() + r * groups, a.cx.data() + r * groups, K,
                 op + r * N + b * kBlock, N);
    }
  });
}

// One output row's 32 weights of group g, from the byte lane of a transposed block vector: low nibbles are
// k = 0..15, high nibbles k = 16..31; fma(q, d, m) in fp32, rounded once to bf16, one 64-byte store.
template <int L>
inline void dequantize_lane(__m512i r, int j, __m512 dg, __m512 mg, at::BFloat16* row) {
  const __m128i bytes = _mm512_extracti32x4_epi32(r, L);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m512i lane = _mm512_set1_epi32(4 * L + j);
  const __m512 d = _mm512_permutexvar_ps(lane, dg), m = _mm512_permutexvar_ps(lane, mg);
  const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low4))), d, m);
  const __m512 hi = _mm512_fmadd_ps(
      _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4))), d, m);
  _mm512_storeu_si512(row, _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(lo)),
                                              (__m256i)_mm512_cvtneps_pbh(hi), 1));
}

// The weight [N, K] in bf16, row-major (for at::linear). A block's four 64-byte vectors of a group hold, in
// dword i, output i's codes for k = 4s..4s+3 (and 16 + ...): a 4 x 4 dword transpose within each 128-bit lane
// gives each output's 16 bytes in one lane, in k order.
template <typename S>
void dequantize_impl(const at::Tensor& codes, const at::Tensor& dt, const at::Tensor& mt, at::Tensor& out) {
  const int64_t N = codes.size(0), K = codes.size(1) * 2, groups = K / kGroup;
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const S* dp = dt.data_ptr<S>();
  const S* mp = mt.data_ptr<S>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* w = cp + b * kBlock * (K / 2);
      for (int64_t g = 0; g < groups; ++g) {
        const __m512i p0 = _mm512_loadu_si512(w + (g * 4 + 0) * 64), p1 = _mm512_loadu_si512(w + (g * 4 + 1) * 64);
        const __m512i p2 = _mm512_loadu_si512(w + (g * 4 + 2) * 64), p3 = _mm512_loadu_si512(w + (g * 4 + 3) * 64);
        const __m512i t0 = _mm512_unpacklo_epi32(p0, p1), t1 = _mm512_unpackhi_epi32(p0, p1);
        const __m512i t2 = _mm512_unpacklo_epi32(p2, p3), t3 = _mm512_unpackhi_epi32(p2, p3);
        const __m512i r[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                              _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};  // r[j]: outputs 4L + j
        const __m512 dg = load16(dp + (b * groups + g) * kBlock), mg = load16(mp + (b * groups + g) * kBlock);
        at::BFloat16* base = op + b * kBlock * K + g * kGroup;
        for (int j = 0; j < 4; ++j) {
          dequantize_lane<0>(r[j], j, dg, mg, base + (0 + j) * K);
          dequantize_lane<1>(r[j], j, dg, mg, base + (4 + j) * K);
          dequantize_lane<2>(r[j], j, dg, mg, base + (8 + j) * K);
          dequantize_lane<3>(r[j], j, dg, mg, base + (12 + j) * K);
        }
      }
    }
  });
}

at::Tensor int4_dequantize(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minimum) {
  check_args(codes, scale, minimum);
  at::Tensor out = at::empty({codes.size(0), codes.size(1) * 2}, codes.options().dtype(at::kBFloat16));
  if (scale.scalar_type() == at::kHalf) dequantize_impl<at::Half>(codes, scale, minimum, out);
  else dequantize_impl<float>(codes, scale, minimum, out);
  return out;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const at::Tensor& minimum, int64_t gemm_rows) {
  check_args(codes, scale, minimum);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == codes.size(1) * 2, "x: contiguous [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x: bfloat16 or float32");
  if (x.size(0) >= gemm_rows) {
    // AMX with the weight dequantized tile by tile; from kAmxMaxRows rows (long prefill chunks) a bf16 copy and
    // oneDNN's GEMM are faster (0.65x at 2048 rows on SmolLM2's shapes): the copy's cost is spread over the rows
    if (x.scalar_type() == at::kBFloat16 && x.size(0) < kAmxMaxRows && ember_amx::available())
      return ember_amx::int4_linear(x, codes, scale, minimum);
    return at::linear(x, int4_dequantize(codes, scale, minimum).to(x.scalar_type()));
  }
  at::Tensor out = at::empty({x.size(0), codes.size(0)}, x.options());
  if (x.size(0) == 0) return out;
  const bool half = scale.scalar_type() == at::kHalf;
  if (x.scalar_type() == at::kFloat) {
    if (half) linear_impl<float, at::Half>(x, codes, scale, minimum, out);
    else linear_impl<float, float>(x, codes, scale, minimum, out);
  } else {
    if (half) linear_impl<at::BFloat16, at::Half>(x, codes, scale, minimum, out);
    else linear_impl<at::BFloat16, float>(x, codes, scale, minimum, out);
  }
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "codes: uint8 [N, K]");
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(N % kBlock == 0 && K % kGroup == 0, "codes: N a multiple of 16 and K of 32");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N * (K / kGroup),
              "scale: float32 [N / 16, K / 32, 16]");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == K, "x: contiguous [M, K]");
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0) return out;
  if (x.scalar_type() == at::kFloat) linear8_impl<float>(x, codes, scale, out);
  else if (x.scalar_type() == at::kBFloat16) linear8_impl<at::BFloat16>(x, codes, scale, out);
  else TORCH_CHECK(false, "x: bfloat16 or float32");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scale) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scale, Tensor minimum, int gemm_rows) -> Tensor");
  m.def("int4_dequantize(Tensor codes, Tensor scale, Tensor minimum) -> Tensor");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_dequantize", &int4_dequantize);
}
