// Decode and verification attention on CPU straight from the paged KV cache, no gather: one query token per
// sequence (decode_attention), or a few per sequence with a visibility mask (masked_attention: speculative
// chains and trees).
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
#include <type_traits>
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

// e^x for 16 floats: x = n ln2 + f, |f| <= ln2 / 2 (ln2 in two parts), e^f by its degree-6 Taylor polynomial
// (relative error < 2e-7 on that range), times 2^n by vscalefps; e^-inf = 0. The softmax of many query rows
// (verification) spent most of its time in scalar std::exp.
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), f);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512 r = _mm512_scalef_ps(p, n);
  // -inf (a masked position) and anything below e^-104: exactly 0
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_GT_OQ), r);
}


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


// Several query slots per sequence (speculative verification: a chain or a tree of draft tokens), each seeing
// the positions its row of `visible` [B, Q, S] (uint8) allows: the step's plan (ember.layers.batched_attention)
// builds it once for every layer. One task per (sequence, KV head) handles all its R = Q x G query vectors at
// once, 16 to a zmm register, so no score needs a horizontal sum: scores[j][r] = sum_d k[j][d] q[r][d] as
// broadcast-k FMAs over the transposed queries; the softmax runs across positions for 16 rows at a time; the
// output, transposed, as broadcast-v FMAs over the probabilities. K and V rows are read once, in fp32.
template <typename T>
void masked_impl(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                 const at::Tensor& seq_lens, const at::Tensor& visible, double scale, at::Tensor& out) {
  const int64_t B = block_tables.size(0), Q = q.size(0) / B, Hq = q.size(1), D = q.size(2);
  const int64_t Hk = cache.size(3), block_size = cache.size(2), G = Hq / Hk, S = visible.size(2);
  const int64_t s_kv = cache.stride(0), s_blk = cache.stride(1), s_off = cache.stride(2), s_h = cache.stride(3);
  const int64_t bt_stride = block_tables.stride(0), R = Q * G, nc = (R + 15) / 16, Rp = nc * 16;
  const T* qp = q.data_ptr<T>();
  const T* cp = cache.data_ptr<T>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const uint8_t* vis = visible.data_ptr<uint8_t>();
  T* op = out.data_ptr<T>();
  const float sc = static_cast<float>(scale), ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * Hk, 1, [=](int64_t t0, int64_t t1) {  // by value: no reloads through the closure
    std::vector<float> qt(D * Rp), kf, vf, st;  // qt [D][Rp]; kf, vf [n][D] (bf16 only); st [n][Rp]
    std::vector<const float*> kr, vr;  // [n] K and V rows
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hk, h = t % Hk, n = std::min<int64_t>(lens[b], S);
      const int32_t* table = bt + b * bt_stride;
      const uint8_t* vb = vis + b * Q * S;
      std::fill(qt.begin(), qt.end(), 0.0f);
      for (int64_t i = 0; i < Q; ++i)  // row r = i * G + g: slot i, query head h * G + g
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < D; ++d)
            qt[d * Rp + i * G + g] = static_cast<float>(qp[((b * Q + i) * Hq + h * G + g) * D + d]) * sc;
      // each position's K and V row in fp32: in the cache itself (float32), or converted once (bf16)
      kr.resize(n);
      vr.resize(n);
      if constexpr (!std::is_same_v<T, float>) {
        kf.resize(n * D);
        vf.resize(n * D);
      }
      for (int64_t j0 = 0; j0 < n; j0 += block_size) {  // block by block: no division per position
        const T* blk = cp + table[j0 / block_size] * s_blk + h * s_h;
        for (int64_t j = j0; j < std::min(n, j0 + block_size); ++j) {
          const T* row = blk + (j - j0) * s_off;
          if constexpr (std::is_same_v<T, float>) {
            kr[j] = row;
            vr[j] = row + s_kv;
          } else {
            float* kj = kf.data() + j * D;
            float* vj = vf.data() + j * D;
            for (int64_t d = 0; d < D; d += 16) {
              _mm512_storeu_ps(kj + d, load16f(row + d));
              _mm512_storeu_ps(vj + d, load16f(row + s_kv + d));
            }
            kr[j] = kj;
            vr[j] = vj;
          }
        }
      }
      st.resize(std::max<int64_t>(n, 1) * Rp);
      for (int64_t c = 0; c < nc; ++c) {  // 8 positions at a time: 8 independent FMA chains over d
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {
          __m512 a[8];
#pragma GCC unroll 8
          for (int jj = 0; jj < 8; ++jj) a[jj] = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; ++d) {
            const __m512 qd = _mm512_loadu_ps(qt.data() + d * Rp + c * 16);
  #pragma GCC unroll 8
          for (int jj = 0; jj < 8; ++jj) a[jj] = _mm512_fmadd_ps(_mm512_set1_ps(kr[j + jj][d]), qd, a[jj]);
          }
#pragma GCC unroll 8
          for (int jj = 0; jj < 8; ++jj) _mm512_storeu_ps(st.data() + (j + jj) * Rp + c * 16, a[jj]);
        }
        for (; j < n; ++j) {
          __m512 a = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; ++d)
            a = _mm512_fmadd_ps(_mm512_set1_ps(kr[j][d]), _mm512_loadu_ps(qt.data() + d * Rp + c * 16), a);
          _mm512_storeu_ps(st.data() + j * Rp + c * 16, a);
        }
      }
      for (int64_t i = 0; i < Q; ++i)
        for (int64_t j = 0; j < n; ++j)
          if (!vb[i * S + j])
            for (int64_t g = 0; g < G; ++g) st[j * Rp + i * G + g] = ninf;
      for (int64_t c = 0; c < nc; ++c) {  // softmax over j, 16 rows at a time
        float* col = st.data() + c * 16;
        __m512 mx = _mm512_set1_ps(ninf);
        for (int64_t j = 0; j < n; ++j) mx = _mm512_max_ps(mx, _mm512_loadu_ps(col + j * Rp));
        // a row that sees nothing (never a real one) gets zeros, not NaN
        mx = _mm512_mask_mov_ps(mx, _mm512_cmp_ps_mask(mx, _mm512_set1_ps(ninf), _CMP_EQ_OQ), _mm512_setzero_ps());
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; ++j) {
          const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(col + j * Rp), mx));
          _mm512_storeu_ps(col + j * Rp, e);
          sum = _mm512_add_ps(sum, e);
        }
        const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(sum, _mm512_setzero_ps(), _CMP_GT_OQ),
                                               _mm512_set1_ps(1.0f), sum);
        for (int64_t j = 0; j < n; ++j)
          _mm512_storeu_ps(col + j * Rp, _mm512_mul_ps(_mm512_loadu_ps(col + j * Rp), inv));
      }
      for (int64_t c = 0; c < nc; ++c) {  // out^T[d][r] = sum_j v[j][d] p[j][r], 8 d at a time
        for (int64_t d0 = 0; d0 < D; d0 += 8) {
          __m512 acc[8];
#pragma GCC unroll 8
          for (int dd = 0; dd < 8; ++dd) acc[dd] = _mm512_setzero_ps();
          const float* pc = st.data() + c * 16;
          for (int64_t j = 0; j < n; ++j) {
            const __m512 pj = _mm512_loadu_ps(pc + j * Rp);
            const float* v = vr[j] + d0;
  #pragma GCC unroll 8
          for (int dd = 0; dd < 8; ++dd) acc[dd] = _mm512_fmadd_ps(_mm512_set1_ps(v[dd]), pj, acc[dd]);
          }
          alignas(64) float lanes[16];
#pragma GCC unroll 8
          for (int dd = 0; dd < 8; ++dd) {
            _mm512_store_ps(lanes, acc[dd]);
            for (int64_t l = 0; l < 16 && c * 16 + l < R; ++l) {
              const int64_t r = c * 16 + l, i = r / G, g = r % G;
              op[((b * Q + i) * Hq + h * G + g) * D + d0 + dd] = static_cast<T>(lanes[l]);
            }
          }
        }
      }
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


// q [B * Q, Hq, D]: Q query slots per sequence, slot-major; visible [B, Q, S] uint8 (S >= every length).
at::Tensor masked_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, const at::Tensor& visible, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q: contiguous [B * Q, Hq, D]");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && cache.stride(4) == 1 && cache.size(4) == q.size(2),
              "kv_cache: [2, num_blocks, block_size, Hk, D] with D contiguous");
  TORCH_CHECK(cache.scalar_type() == q.scalar_type(), "kv_cache and q: one dtype");
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) <= 16 * kMaxVec, "head_dim: a multiple of 16, at most 256");
  TORCH_CHECK(q.size(1) % cache.size(3) == 0, "query heads: a multiple of the KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.stride(1) == 1,
              "block_tables: int32 [B, nblk], rows contiguous");
  const int64_t B = block_tables.size(0);
  TORCH_CHECK(B > 0 && q.size(0) % B == 0, "q: B * Q rows");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous() && seq_lens.numel() == B,
              "seq_lens: int32 [B]");
  TORCH_CHECK(visible.scalar_type() == at::kByte && visible.is_contiguous() && visible.dim() == 3 &&
              visible.size(0) == B && visible.size(1) == q.size(0) / B, "visible: uint8 [B, Q, S]");
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) masked_impl<float>(q, cache, block_tables, seq_lens, visible, scale, out);
  else if (q.scalar_type() == at::kBFloat16)
    masked_impl<at::BFloat16>(q, cache, block_tables, seq_lens, visible, scale, out);
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
  m.def("masked_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, Tensor visible, "
        "float scale) -> Tensor");
  m.def("decode_step_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor seq_lens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_step_attention", &decode_step_attention);
  m.impl("masked_attention", &masked_attention);
}
