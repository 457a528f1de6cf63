// float32 x @ w.T for a few rows (decode and speculative verification steps), row-invariant by construction.
//
// The BLAS call behind F.linear picks its kernel by the number of rows: one row streams the weight once
// (memory-bound), but 4-16 rows (a lookahead or prompt-lookup verification step) took 1.5-2x the time of one
// on this machine, which made speculation slower than plain decoding in float32. Here a tile of 4 weight rows
// is read once and multiplied by up to 5 activation rows at a time (the tile stays in L1 for the next rows),
// so 10 rows cost little more than 1. Every output is the same sequence of fp32 FMAs over K in chunks of 16
// and the same final reduction, whatever the number of rows: a row's result does not depend on its batch.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

namespace {

constexpr int kOut = 4;  // weight rows per tile
constexpr int64_t kMaxRows = 32;  // more rows: the BLAS call (ember.layers.cpu_kernels.F32_MAX_ROWS)

template <int NB, int R>
inline void tile(const float* const* w, const float* x, int64_t K, const float* bias, float* out, int64_t ldo) {
  __m512 acc[NB][R];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w[j] + k + 256), _MM_HINT_T0);
      wv[j] = _mm512_loadu_ps(w[j] + k);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * K + k);
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm512_fmadd_ps(wv[j], xv, acc[j][r]);
    }
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_ps(m, w[j] + k);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + r * K + k);
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm512_fmadd_ps(wv[j], xv, acc[j][r]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) out[r * ldo + j] = _mm512_reduce_add_ps(acc[j][r]) + (bias ? bias[j] : 0.0f);
}

template <int NB>
inline void rows(const float* const* w, const float* x, int64_t M, int64_t K, const float* bias, float* out, int64_t N) {
  int64_t r = 0;
  for (; r + 5 <= M; r += 5) tile<NB, 5>(w, x + r * K, K, bias, out + r * N, N);
  switch (M - r) {
    case 4: tile<NB, 4>(w, x + r * K, K, bias, out + r * N, N); break;
    case 3: tile<NB, 3>(w, x + r * K, K, bias, out + r * N, N); break;
    case 2: tile<NB, 2>(w, x + r * K, K, bias, out + r * N, N); break;
    case 1: tile<NB, 1>(w, x + r * K, K, bias, out + r * N, N); break;
    default: break;
  }
}

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x: float32 [M, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.size(1) == x.size(1),
              "weight: float32 [N, K]");
  // a compiled graph calls this op whatever the (dynamic) row count; past kMaxRows the BLAS GEMM is faster
  if (x.size(0) > kMaxRows) return at::linear(x, weight, bias.has_value() ? *bias : at::Tensor());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, (N + kOut - 1) / kOut, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kOut, nb = std::min<int64_t>(kOut, N - n0);
      const float* w[kOut];
      for (int j = 0; j < nb; ++j) w[j] = wp + (n0 + j) * K;
      if (nb == kOut) {
        rows<kOut>(w, xp, M, K, bp ? bp + n0 : nullptr, op + n0, N);
      } else {
        for (int j = 0; j < nb; ++j) rows<1>(w + j, xp, M, K, bp ? bp + n0 + j : nullptr, op + n0 + j, N);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("f32_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) { m.impl("f32_linear", &f32_linear); }
