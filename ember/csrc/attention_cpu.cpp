// Decode attention on CPU straight from the paged KV cache: one query token per sequence, no gather.
//
// The torch path gathers every sequence's blocks into a contiguous copy (index_select), then runs SDPA; at
// decode sizes both are dominated by per-call overhead (a 30-layer model pays it 30 times a token). Here one
// task per (sequence, KV head) reads its K/V rows where they sit, through the block table: scores for the
// head's group of query heads (fp32), an exact softmax, then the weighted sum of V rows (fp32), written once
// in the query dtype. Positions past a sequence's length, or outside its sliding window, are never read.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16f(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void store16f(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16f(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

constexpr int kMaxVec = 16;  // head_dim up to 256

template <typename T>
void decode_impl(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                 const at::Tensor& seq_lens, double scale, int64_t window, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hk = cache.size(3), block_size = cache.size(2), G = Hq / Hk, nvec = D / 16;
  const int64_t s_kv = cache.stride(0), s_blk = cache.stride(1), s_off = cache.stride(2), s_h = cache.stride(3);
  const int64_t bt_stride = block_tables.stride(0);
  const T* qp = q.data_ptr<T>();
  const T* cp = cache.data_ptr<T>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * Hk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hk, h = t % Hk;
      const int64_t len = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - start;
      const int32_t* table = bt + b * bt_stride;
      __m512 qv[8][kMaxVec];  // up to 8 query heads per KV head
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < nvec; ++i)
          qv[g][i] = _mm512_mul_ps(load16f(qp + (b * Hq + h * G + g) * D + 16 * i), _mm512_set1_ps(sc));
      scores.resize(G * std::max<int64_t>(n, 1));
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = start + j;
        const T* k = cp + table[pos / block_size] * s_blk + (pos % block_size) * s_off + h * s_h;
        __m512 kv[kMaxVec];
        for (int64_t i = 0; i < nvec; ++i) kv[i] = load16f(k + 16 * i);
        for (int64_t g = 0; g < G; ++g) {
          __m512 acc = _mm512_mul_ps(qv[g][0], kv[0]);
          for (int64_t i = 1; i < nvec; ++i) acc = _mm512_fmadd_ps(qv[g][i], kv[i], acc);
          scores[g * n + j] = _mm512_reduce_add_ps(acc);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * n;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
        float sum = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
          s[j] = std::exp(s[j] - mx);
          sum += s[j];
        }
        const float inv = n > 0 ? 1.0f / sum : 0.0f;
        for (int64_t j = 0; j < n; ++j) s[j] *= inv;
      }
      __m512 acc[8][kMaxVec];
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < nvec; ++i) acc[g][i] = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = start + j;
        const T* v = cp + s_kv + table[pos / block_size] * s_blk + (pos % block_size) * s_off + h * s_h;
        __m512 vv[kMaxVec];
        for (int64_t i = 0; i < nvec; ++i) vv[i] = load16f(v + 16 * i);
        for (int64_t g = 0; g < G; ++g) {
          const __m512 p = _mm512_set1_ps(scores[g * n + j]);
          for (int64_t i = 0; i < nvec; ++i) acc[g][i] = _mm512_fmadd_ps(p, vv[i], acc[g][i]);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < nvec; ++i) store16f(op + (b * Hq + h * G + g) * D + 16 * i, acc[g][i]);
    }
  });
}

// k, v [B, Hk, D] -> the cache rows at slot_mapping [B] (block * block_size + offset), before attending.
template <typename T>
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& cache, const at::Tensor& slot_mapping) {
  const int64_t B = k.size(0), Hk = k.size(1), D = k.size(2), block_size = cache.size(2);
  const int64_t s_kv = cache.stride(0), s_blk = cache.stride(1), s_off = cache.stride(2), s_h = cache.stride(3);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  T* cp = cache.data_ptr<T>();
  const T* src[2] = {k.data_ptr<T>(), v.data_ptr<T>()};
  for (int64_t b = 0; b < B; ++b) {
    const int64_t blk = slots[b] / block_size, off = slots[b] % block_size;
    for (int kv = 0; kv < 2; ++kv)
      for (int64_t h = 0; h < Hk; ++h)
        std::memcpy(cp + kv * s_kv + blk * s_blk + off * s_off + h * s_h, src[kv] + (b * Hk + h) * D, D * sizeof(T));
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q: contiguous [B, Hq, D]");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && cache.stride(4) == 1 && cache.size(4) == q.size(2),
              "kv_cache: [2, num_blocks, block_size, Hk, D] with D contiguous");
  TORCH_CHECK(cache.scalar_type() == q.scalar_type(), "kv_cache and q: one dtype");
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) <= 16 * kMaxVec, "head_dim: a multiple of 16, at most 256");
  TORCH_CHECK(q.size(1) % cache.size(3) == 0 && q.size(1) / cache.size(3) <= 8, "at most 8 query heads per KV head");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.stride(1) == 1 &&
              block_tables.size(0) == q.size(0), "block_tables: int32 [B, nblk], rows contiguous");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous() && seq_lens.numel() == q.size(0),
              "seq_lens: int32 [B]");
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) decode_impl<float>(q, cache, block_tables, seq_lens, scale, window, out);
  else if (q.scalar_type() == at::kBFloat16) decode_impl<at::BFloat16>(q, cache, block_tables, seq_lens, scale, window, out);
  else TORCH_CHECK(false, "q: float32 or bfloat16");
  return out;
}

// A decode step's whole attention call: write each sequence's new K/V row, then attend (q, k, v: one token
// per sequence, in batch order).
at::Tensor decode_step_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& cache,
                                 const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                 const at::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == cache.size(3) &&
              k.size(2) == cache.size(4), "k, v: [B, Hk, D]");
  TORCH_CHECK(k.scalar_type() == cache.scalar_type() && v.scalar_type() == cache.scalar_type(), "k, v: the cache dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == q.size(0), "slot_mapping: int64 [B]");
  TORCH_CHECK(cache.stride(4) == 1, "kv_cache: D contiguous");
  const at::Tensor kc = k.contiguous(), vc = v.contiguous(), sc = slot_mapping.contiguous();
  if (cache.scalar_type() == at::kFloat) write_kv<float>(kc, vc, cache, sc);
  else if (cache.scalar_type() == at::kBFloat16) write_kv<at::BFloat16>(kc, vc, cache, sc);
  else TORCH_CHECK(false, "kv_cache: float32 or bfloat16");
  return decode_attention(q.contiguous(), cache, block_tables, seq_lens, scale, window);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, float scale, int window) -> Tensor");
  m.def("decode_step_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor seq_lens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_step_attention", &decode_step_attention);
}
