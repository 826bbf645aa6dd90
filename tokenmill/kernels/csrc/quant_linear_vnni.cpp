// Quantized linear layers with int8 activations: AVX512-VNNI integer dot products, as llama.cpp
// multiplies its q8_0/q4 weights.
//
// Converting every code to float and multiplying in float32 costs ~3 instructions per 16 weights,
// which on a 2-core machine is slower than memory. Here x is quantized per block of 64 inputs,
// x[k] ~ xs[b] * xq[k] (xq int8, xs = max|x_b| / 127), and one vpdpbusd multiplies 64 codes by 64
// activations, accumulating into 16 int32 lanes. vpdpbusd takes unsigned bytes on one side, so the
// codes are used offset to unsigned (8-bit: c + 128 via XOR 0x80; 4-bit: the stored nibble, c + 8),
// and the offset times sum(xq) is subtracted afterwards, together with the zero points:
//
//   y[m, n] = sum_g s[n, g] * sum_{b in g} xs[m, b] * dpbusd_b  -  sum_g (s[n, g] * off + sz[n, g]) * xc[m, g]
//   xc[m, g] = sum_{b in g} xs[m, b] * sum(xq[m, b])
//
// The 4-bit layout unpacks 32 bytes into [inputs 0-15, 32-47 | 16-31, 48-63] of a 64-input block;
// xq is stored in that same order, so the products pair up.
//
// This path serves bf16/fp16 models (whose activations are already rounded to 8 significant bits);
// float32 models keep the exact float path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include "quant_weight.h"
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TOKENMILL_VNNI 1
#endif

namespace tokenmill_quant {

constexpr int64_t kBlock = 64;
constexpr int64_t kPrefetchRows = 8;  // how far ahead (in weight rows) codes are prefetched

bool vnni_supported(const QuantWeight& w) {
#if defined(TOKENMILL_VNNI)
  const int64_t group = std::min(w.group_size, w.in_features);
  return w.in_features % kBlock == 0 && group % kBlock == 0;
#else
  (void)w;
  return false;
#endif
}

#if defined(TOKENMILL_VNNI)
namespace {

// Position within a 64-input block at which input i is stored for 4-bit weights.
inline int64_t nibble_order(int64_t i) {
  const int64_t chunk = i / 32, lane = i % 32;  // chunk 0/1 of the two 32-input packing chunks
  return (lane < 16 ? 0 : 32) + chunk * 16 + lane % 16;
}

// 64 codes of one row's block b, offset to unsigned bytes.
template <int BITS>
inline __m512i load_codes(const uint8_t* row, int64_t b) {
  if constexpr (BITS == 8) {
    return _mm512_xor_si512(_mm512_loadu_si512(row + b * kBlock), _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock / 2));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(packed, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
}

template <int MR, int NR, int BITS>
void tile(const int8_t* xq, const float* xs, int64_t K, const uint8_t* const* rows, const QuantWeight& w,
          int64_t n0, float* out_tile /* MR x NR */) {
  const int64_t B = K / kBlock, G = w.num_groups, blocks_per_group = std::min(w.group_size, K) / kBlock;
  const int64_t prefetch_ahead = kPrefetchRows * w.row_bytes();
  __m512 total[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) total[m][n] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 group_acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) group_acc[m][n] = _mm512_setzero_ps();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      __m512i xv[MR];
      __m512 xscale[MR];
      for (int m = 0; m < MR; ++m) {
        xv[m] = _mm512_loadu_si512(xq + m * K + b * kBlock);
        xscale[m] = _mm512_set1_ps(xs[m * B + b]);
      }
      for (int n = 0; n < NR; ++n) {
        // DRAM latency, not arithmetic, limits a stream of codes: fetch the tile after next now.
        _mm_prefetch(reinterpret_cast<const char*>(rows[n] + prefetch_ahead + b * kBlock * BITS / 8), _MM_HINT_T0);
        const __m512i codes = load_codes<BITS>(rows[n], b);
        for (int m = 0; m < MR; ++m) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xv[m]);
          group_acc[m][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), xscale[m], group_acc[m][n]);
        }
      }
    }
    for (int n = 0; n < NR; ++n) {
      const __m512 scale = _mm512_set1_ps(w.scales[(n0 + n) * G + g]);
      for (int m = 0; m < MR; ++m) total[m][n] = _mm512_fmadd_ps(scale, group_acc[m][n], total[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out_tile[m * NR + n] = _mm512_reduce_add_ps(total[m][n]);
}

template <int BITS, int MR>
void tile_rows(int NR, const int8_t* xq, const float* xs, int64_t K, const uint8_t* const* rows,
               const QuantWeight& w, int64_t n0, float* out_tile) {
  switch (NR) {
    case 4: return tile<MR, 4, BITS>(xq, xs, K, rows, w, n0, out_tile);
    case 3: return tile<MR, 3, BITS>(xq, xs, K, rows, w, n0, out_tile);
    case 2: return tile<MR, 2, BITS>(xq, xs, K, rows, w, n0, out_tile);
    default: return tile<MR, 1, BITS>(xq, xs, K, rows, w, n0, out_tile);
  }
}

template <int BITS>
void tile_dispatch(int MR, int NR, const int8_t* xq, const float* xs, int64_t K, const uint8_t* const* rows,
                   const QuantWeight& w, int64_t n0, float* out_tile) {
  switch (MR) {
    case 4: return tile_rows<BITS, 4>(NR, xq, xs, K, rows, w, n0, out_tile);
    case 3: return tile_rows<BITS, 3>(NR, xq, xs, K, rows, w, n0, out_tile);
    case 2: return tile_rows<BITS, 2>(NR, xq, xs, K, rows, w, n0, out_tile);
    default: return tile_rows<BITS, 1>(NR, xq, xs, K, rows, w, n0, out_tile);
  }
}

}  // namespace

void vnni_linear(const float* x, int64_t M, const QuantWeight& w, float* out) {
  constexpr int kMaxRowsPerPass = 4;
  // Weight rows per tile: 4-bit unpacking is arithmetic-heavy, so four rows share each x load; 8-bit
  // rows stream fastest one at a time (interleaving four rows halved the DRAM bandwidth reached).
  const int kTileRows = w.bits == 8 ? 1 : 4;
  const int64_t N = w.out_features, K = w.in_features, B = K / kBlock, G = w.num_groups;
  const int64_t blocks_per_group = std::min(w.group_size, K) / kBlock;
  // Quantize x: xq (M, K) int8 in the weight's block order, xs (M, B) scales, xc (M, G).
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M * B), xc(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + m * K + b * kBlock;
      float amax = 0.f;
      for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      for (int64_t i = 0; i < kBlock; ++i) {
        const int8_t q = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
        xq[m * K + b * kBlock + (w.bits == 4 ? nibble_order(i) : i)] = q;
        sum += q;
      }
      xs[m * B + b] = scale;
      xc[m * G + b / blocks_per_group] += scale * static_cast<float>(sum);
    }
  const float offset = w.bits == 8 ? 128.f : 8.f;
  const int64_t grain = std::max<int64_t>(2, 2048 / std::max<int64_t>(1, w.row_bytes()));
  at::parallel_for(0, (N + kTileRows - 1) / kTileRows, grain, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t n0 = t * kTileRows, nr = std::min<int64_t>(kTileRows, N - n0);
      const uint8_t* rows[4];
      for (int n = 0; n < nr; ++n) rows[n] = w.codes + (n0 + n) * w.row_bytes();
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerPass) {
        const int mr = static_cast<int>(std::min<int64_t>(kMaxRowsPerPass, M - m0));
        float tile_out[kMaxRowsPerPass * 4];
        if (w.bits == 8)
          tile_dispatch<8>(mr, nr, xq.data() + m0 * K, xs.data() + m0 * B, K, rows, w, n0, tile_out);
        else
          tile_dispatch<4>(mr, nr, xq.data() + m0 * K, xs.data() + m0 * B, K, rows, w, n0, tile_out);
        for (int m = 0; m < mr; ++m)
          for (int n = 0; n < nr; ++n) {
            const float* scales = w.scales + (n0 + n) * G;
            const float* scaled_zeros = w.scaled_zeros + (n0 + n) * G;
            const float* corr = xc.data() + (m0 + m) * G;
            float zero_part = 0.f;
            for (int64_t g = 0; g < G; ++g) zero_part += (scales[g] * offset + scaled_zeros[g]) * corr[g];
            out[(m0 + m) * N + n0 + n] = tile_out[m * nr + n] - zero_part;
          }
      }
    }
  });
}
#else
void vnni_linear(const float*, int64_t, const QuantWeight&, float*) {
  TORCH_CHECK(false, "this build of the kernels has no AVX512-VNNI");
}
#endif

}  // namespace tokenmill_quant
