// bf16 x @ w.T with AMX tiles (Sapphire Rapids and later), on a weight laid out once at load time as AMX's
// B operand: w [N, K] -> [N / 16][K / 32][16 pairs][16 outputs][2] (`ember.layers.cpu_pack.tile_bf16`), so each
// 1 KB tile of 16 outputs x 32 k is contiguous and the weight is one sequential stream.
//
// A = 16 activation rows x 32 k, loaded straight from x (a partial last block from a zero-padded copy); each
// A tile is multiplied by up to 4 weight tiles into four 16 x 16 fp32 accumulators (16 rows x 64 outputs),
// then rounded to bf16 with the bias added. One row or hundreds, the same code: a decode step (one row, memory-
// bound) streams the weight at ~24 GB/s on this machine where oneDNN's packed bf16 gemv reached ~15, and a
// 64-row decode batch takes 0.7x oneDNN's time (`ember bench bf16`).
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

void amx(const uint16_t* w, const uint16_t* x, int64_t M, int64_t N, int64_t K, const float* bias,
         at::BFloat16* out) {
  const int64_t Mb = (M + 15) / 16, Nb = N / kBlockN, groups = (Nb + 3) / 4;
  // the last, partial block of rows is read from a zero-padded copy (a tile load reads all 16 rows)
  std::vector<uint16_t> tail;
  if (M % 16) {
    tail.assign(16 * K, 0);
    std::memcpy(tail.data(), x + (Mb - 1) * 16 * K, (M % 16) * K * 2);
  }
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    load_config();
    alignas(64) float scratch[4 * 256];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t nb0 = g * 4, nt = std::min<int64_t>(4, Nb - nb0);
      const uint16_t* wg = w + nb0 * kBlockN * K;
      const float* bg = bias ? bias + nb0 * kBlockN : nullptr;
      for (int64_t mb = 0; mb < Mb; ++mb) {
        const bool partial = mb == Mb - 1 && M % 16;
        const uint16_t* a = partial ? tail.data() : x + mb * 16 * K;
        const int64_t rows = partial ? M % 16 : 16;
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

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("bf16_amx_available() -> bool");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
TORCH_LIBRARY_IMPL(ember_cpu, CompositeExplicitAutograd, m) { m.impl("bf16_amx_available", &bf16_amx_available); }
