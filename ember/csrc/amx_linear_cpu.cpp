// Matmuls on AMX tiles (Sapphire Rapids and later) for bf16 activations: bf16 weights (`ember_cpu::bf16_linear`)
// and int4 weights dequantized tile by tile (`ember_amx::int4_linear`, called by ember_cpu::int4_linear from
// int4_native.GEMM_ROWS rows).
//
// bf16: the weight is laid out once at load time as AMX's B operand: w [N, K] -> [N / 16][K / 32][16 pairs]
// [16 outputs][2] (`ember.layers.cpu_pack.tile_bf16`), so each
// 1 KB tile of 16 outputs x 32 k is contiguous and the weight is one sequential stream.
//
// A = 16 activation rows x 32 k, loaded straight from x (a partial last block from a zero-padded copy); each
// A tile is multiplied by up to 4 weight tiles into four 16 x 16 fp32 accumulators (16 rows x 64 outputs),
// then rounded to bf16 with the bias added. One row or hundreds, the same code: a decode step (one row, memory-
// bound) streams the weight at ~24 GB/s on this machine where oneDNN's packed bf16 gemv reached ~15, and a
// 64-row decode batch takes 0.7x oneDNN's time.
//
// Every output is the same chain of tile products over k in fp32, whatever the other rows of the call: a row's
// result does not depend on its batch (tested), unlike a GEMM library that picks its blocking by shape.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include <sys/syscall.h>
#include <unistd.h>

namespace {

constexpr int64_t kBlockN = 16;   // outputs per tile column block / zmm lanes
constexpr int64_t kBlockK = 32;   // k per tile (16 pairs)
constexpr int64_t kTile = kBlockN * kBlockK;  // bf16 values per 1 KB weight tile
// 16 fp32 (+ bias) -> 16 bf16, round to nearest even
inline void store_row(__m512 v, const float* bias, at::BFloat16* out) {
  if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// ---- AMX ------------------------------------------------------------------------------------------------

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The kernel must be asked for AMX's register state once per process (Linux >= 5.16).
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqPerm = 0x1023, kXtiledata = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return __builtin_cpu_supports("amx-bf16") && syscall(SYS_arch_prctl, kReqPerm, kXtiledata) == 0;
  }();
  return ok;
}

// tmm0-3: C (16 rows x 16 fp32), tmm4: A (16 rows x 32 bf16), tmm5-7: B (16 pairs x 16 outputs x 2)
inline void load_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
}

// 16 rows of x (a, stride lda bf16) x NT weight blocks of 16 outputs -> rows of out
template <int NT>
inline void amx_tile(const uint16_t* a, int64_t lda, const uint16_t* w, int64_t K, int64_t rows, const float* bias,
                     at::BFloat16* out, int64_t N, float* scratch) {
  const int64_t Kb = K / kBlockK, wstride = kBlockN * K;  // bf16 between consecutive output blocks
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (NT > 2) _tile_zero(2);
  if constexpr (NT > 3) _tile_zero(3);
  for (int64_t kb = 0; kb < Kb; ++kb) {
    _tile_loadd(4, a + kb * kBlockK, lda * 2);
    const uint16_t* wk = w + kb * kTile;
    _tile_loadd(5, wk, 64);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NT > 1) { _tile_loadd(6, wk + wstride, 64); _tile_dpbf16ps(1, 4, 6); }
    if constexpr (NT > 2) { _tile_loadd(7, wk + 2 * wstride, 64); _tile_dpbf16ps(2, 4, 7); }
    if constexpr (NT > 3) { _tile_loadd(5, wk + 3 * wstride, 64); _tile_dpbf16ps(3, 4, 5); }
  }
  _tile_stored(0, scratch, 64);
  if constexpr (NT > 1) _tile_stored(1, scratch + 256, 64);
  if constexpr (NT > 2) _tile_stored(2, scratch + 512, 64);
  if constexpr (NT > 3) _tile_stored(3, scratch + 768, 64);
  for (int t = 0; t < NT; ++t)
    for (int64_t m = 0; m < rows; ++m)
      store_row(_mm512_load_ps(scratch + t * 256 + m * 16), bias ? bias + t * kBlockN : nullptr,
                out + m * N + t * kBlockN);
}

// x is taken 512 rows (32 blocks of 16) at a time, so a chunk of it stays in L2 while every output block of a
// thread passes over it: with all of a 2048-row prefill chunk at once, x was read from memory again for every
// group of outputs, and the GEMM took twice oneDNN's time (now 1.0-1.2x of it; at 512 rows and less, 0.6-1.0x).
constexpr int64_t kChunkBlocks = 32;

// x's rows in blocks of 16, the A tiles' height. A tile load reads all 16 rows, so a last, partial block is
// read from a zero-padded copy.
struct RowBlocks {
  const uint16_t* x;
  int64_t M, K, count;
  std::vector<uint16_t> tail;

  RowBlocks(const uint16_t* x, int64_t M, int64_t K) : x(x), M(M), K(K), count((M + 15) / 16) {
    if (M % 16) {
      tail.assign(16 * K, 0);
      std::memcpy(tail.data(), x + (count - 1) * 16 * K, (M % 16) * K * 2);
    }
  }
  bool partial(int64_t mb) const { return mb == count - 1 && M % 16; }
  const uint16_t* block(int64_t mb) const { return partial(mb) ? tail.data() : x + mb * 16 * K; }
  int64_t rows(int64_t mb) const { return partial(mb) ? M % 16 : 16; }
};

// out = x @ w.T over 4-block groups of outputs (64 each), split across threads
void amx(const uint16_t* w, const uint16_t* x, int64_t M, int64_t N, int64_t K, const float* bias,
         at::BFloat16* out) {
  const RowBlocks xb(x, M, K);
  const int64_t Mb = xb.count, Nb = N / kBlockN, groups = (Nb + 3) / 4;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    load_config();
    alignas(64) float scratch[4 * 256];
    // rows in chunks of kChunkRows, so that a chunk of x stays in L2 while every output group passes over it
    for (int64_t c0 = 0; c0 < Mb; c0 += kChunkBlocks)
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t nb0 = g * 4, nt = std::min<int64_t>(4, Nb - nb0);
      const uint16_t* wg = w + nb0 * kBlockN * K;
      const float* bg = bias ? bias + nb0 * kBlockN : nullptr;
      for (int64_t mb = c0; mb < std::min(Mb, c0 + kChunkBlocks); ++mb) {
        const uint16_t* a = xb.block(mb);
        const int64_t rows = xb.rows(mb);
        at::BFloat16* o = out + mb * 16 * N + nb0 * kBlockN;
        switch (nt) {
          case 4: amx_tile<4>(a, K, wg, K, rows, bg, o, N, scratch); break;
          case 3: amx_tile<3>(a, K, wg, K, rows, bg, o, N, scratch); break;
          case 2: amx_tile<2>(a, K, wg, K, rows, bg, o, N, scratch); break;
          default: amx_tile<1>(a, K, wg, K, rows, bg, o, N, scratch); break;
        }
      }
    }
    _tile_release();
  });
}

// ---- int4 weights, dequantized into tiles -------------------------------------------------------------------
// ember.layers.quant.int4_native's layout: per block of 16 outputs and group g of 32 k, four 64-byte vectors
// s; lane i's 4 bytes hold output i's codes at k = 32 g + 4 s + b in their low nibbles and 32 g + 16 + 4 s + b
// in their high ones. A lane's bytes 0, 1 (and 2, 3) are one k-pair: one dword of a tile row. w = fma(q, d, m)
// in fp32, rounded once to bf16, as ember_cpu::int4_dequantize does.

inline __m512 load_scale(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_scale(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 outputs' (even, odd) codes -> one tile row: dword i = (bf16 w_even, bf16 w_odd)
inline void pair_row(__m512i even, __m512i odd, __m512 d, __m512 m, __m512i interleave, uint16_t* row) {
  const __m512 fe = _mm512_fmadd_ps(_mm512_cvtepi32_ps(even), d, m);
  const __m512 fo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(odd), d, m);
  const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(fo, fe));  // [even 0..15, odd 0..15]
  _mm512_storeu_si512(row, _mm512_permutexvar_epi16(interleave, both));
}

// One 1 KB tile: block w (16 outputs' codes, all groups), group g, scales d and mins m of the block.
template <typename S>
inline void int4_tile(const uint8_t* w, const S* d, const S* m, int64_t g, __m512i interleave, uint16_t* tile) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), byte = _mm512_set1_epi32(0xFF);
  const __m512 dg = load_scale(d + g * kBlockN), mg = load_scale(m + g * kBlockN);
  for (int s = 0; s < 4; ++s) {
    const __m512i p = _mm512_loadu_si512(w + (g * 4 + s) * 64);
    const __m512i half[2] = {_mm512_and_si512(p, low4), _mm512_and_si512(_mm512_srli_epi16(p, 4), low4)};
    for (int h = 0; h < 2; ++h) {
      const __m512i q = half[h];
      uint16_t* row = tile + (8 * h + 2 * s) * 32;  // k-pairs 8h + 2s and 8h + 2s + 1
      pair_row(_mm512_and_si512(q, byte), _mm512_and_si512(_mm512_srli_epi32(q, 8), byte), dg, mg, interleave, row);
      pair_row(_mm512_and_si512(_mm512_srli_epi32(q, 16), byte), _mm512_srli_epi32(q, 24), dg, mg, interleave,
               row + 32);
    }
  }
}

inline __m512i pair_interleave() {
  alignas(64) int16_t idx[32];
  for (int i = 0; i < 16; ++i) { idx[2 * i] = static_cast<int16_t>(i); idx[2 * i + 1] = static_cast<int16_t>(16 + i); }
  return _mm512_load_si512(idx);
}

// One block of 16 outputs times MT blocks of 16 rows (a[j]), over all of K. On the first pass over the rows
// (`dequantize`) each k-step's weight tile is dequantized into wbuf just before its tile products, so the
// vector work of the next tile overlaps the AMX work of this one; later passes (more than 64 rows) reuse wbuf.
template <int MT, typename S>
inline void int4_block(const uint16_t* const* a, int64_t K, const uint8_t* w, const S* d, const S* m, bool dequantize,
                       uint16_t* wbuf, const int64_t* rows, at::BFloat16* const* out, int64_t N, float* scratch) {
  const int64_t Kb = K / kBlockK, lda = K * 2;
  const __m512i interleave = pair_interleave();
  _tile_zero(0);
  if constexpr (MT > 1) _tile_zero(1);
  if constexpr (MT > 2) _tile_zero(2);
  if constexpr (MT > 3) _tile_zero(3);
  for (int64_t kb = 0; kb < Kb; ++kb) {
    uint16_t* t = wbuf + kb * kTile;
    if (dequantize) int4_tile(w, d, m, kb, interleave, t);
    _tile_loadd(4, t, 64);
    _tile_loadd(5, a[0] + kb * kBlockK, lda);
    _tile_dpbf16ps(0, 5, 4);
    if constexpr (MT > 1) { _tile_loadd(6, a[1] + kb * kBlockK, lda); _tile_dpbf16ps(1, 6, 4); }
    if constexpr (MT > 2) { _tile_loadd(7, a[2] + kb * kBlockK, lda); _tile_dpbf16ps(2, 7, 4); }
    if constexpr (MT > 3) { _tile_loadd(5, a[3] + kb * kBlockK, lda); _tile_dpbf16ps(3, 5, 4); }
  }
  _tile_stored(0, scratch, 64);
  if constexpr (MT > 1) _tile_stored(1, scratch + 256, 64);
  if constexpr (MT > 2) _tile_stored(2, scratch + 512, 64);
  if constexpr (MT > 3) _tile_stored(3, scratch + 768, 64);
  for (int j = 0; j < MT; ++j)
    for (int64_t r = 0; r < rows[j]; ++r)
      store_row(_mm512_load_ps(scratch + j * 256 + r * 16), nullptr, out[j] + r * N);
}

template <typename S>
void int4_amx(const uint16_t* x, int64_t M, int64_t N, int64_t K, const uint8_t* codes, const S* d, const S* m,
              at::BFloat16* out) {
  const RowBlocks xb(x, M, K);
  const int64_t Mb = xb.count, groups = K / kBlockK;
  at::parallel_for(0, N / kBlockN, 1, [&](int64_t b0, int64_t b1) {
    load_config();
    alignas(64) float scratch[4 * 256];
    std::vector<uint16_t> wbuf(groups * kTile);
    for (int64_t c0 = 0; c0 < Mb; c0 += kChunkBlocks) {  // a chunk of rows, each block dequantized once in it
      const int64_t c1 = std::min(Mb, c0 + kChunkBlocks);
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* w = codes + b * kBlockN * (K / 2);
        const S* db = d + b * groups * kBlockN;
        const S* mb = m + b * groups * kBlockN;
        for (int64_t mg = c0; mg < c1; mg += 4) {
          const int64_t mt = std::min<int64_t>(4, c1 - mg);
          const uint16_t* a[4];
          int64_t rows[4];
          at::BFloat16* o[4];
          for (int64_t j = 0; j < mt; ++j) {
            a[j] = xb.block(mg + j);
            rows[j] = xb.rows(mg + j);
            o[j] = out + (mg + j) * 16 * N + b * kBlockN;
          }
          const bool first = mg == c0;
          switch (mt) {
            case 4: int4_block<4>(a, K, w, db, mb, first, wbuf.data(), rows, o, N, scratch); break;
            case 3: int4_block<3>(a, K, w, db, mb, first, wbuf.data(), rows, o, N, scratch); break;
            case 2: int4_block<2>(a, K, w, db, mb, first, wbuf.data(), rows, o, N, scratch); break;
            default: int4_block<1>(a, K, w, db, mb, first, wbuf.data(), rows, o, N, scratch); break;
          }
        }
      }
    }
    _tile_release();
  });
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x: bfloat16 [M, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.size(1) == x.size(1),
              "weight: bfloat16 [N, K] in the tile layout");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(K % kBlockK == 0 && N % kBlockN == 0, "bf16_linear: K % 32 and N % 16 must be 0");
  TORCH_CHECK(weight.is_contiguous(), "bf16_linear: weight must be contiguous");
  TORCH_CHECK(amx_permitted(), "bf16_linear: this CPU (or kernel) gives no AMX");
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  amx(wp, xp, M, N, K, bp, op);
  return out;
}

bool bf16_amx_available() { return amx_permitted(); }

}  // namespace

namespace ember_amx {

bool available() { return amx_permitted(); }

// x (bf16 [M, K]) @ the int4 weight (codes [N, K/2] in int4_native's layout, scale and min [N/16, K/32, 16]),
// each 1 KB weight tile dequantized in cache just before its tile products (int4_block): for prefill chunks and
// decode batches, where a GEMM on a bf16 copy would write the copy and read it back, and oneDNN would re-lay
// it out on every call.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const at::Tensor& minimum) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && amx_permitted(), "int4 on AMX: bf16 x");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  if (scale.scalar_type() == at::kHalf)
    int4_amx(xp, M, N, K, cp, scale.data_ptr<at::Half>(), minimum.data_ptr<at::Half>(), op);
  else int4_amx(xp, M, N, K, cp, scale.data_ptr<float>(), minimum.data_ptr<float>(), op);
  return out;
}

}  // namespace ember_amx

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("bf16_amx_available() -> bool");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
TORCH_LIBRARY_IMPL(ember_cpu, CompositeExplicitAutograd, m) { m.impl("bf16_amx_available", &bf16_amx_available); }
