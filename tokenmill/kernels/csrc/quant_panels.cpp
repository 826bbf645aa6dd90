// 8- and 4-bit weights in a panel layout, multiplied by int8 activations: one kernel for every batch
// size, from decode (1 row) to prompts (thousands), on AVX-512 (with or without VNNI) and AVX2 (simd16.h).
//
// Layout ("panels"), 8-bit: codes (N / 16, K / 4, 16, 4) uint8 holding code + 128, so that byte
// [p, k4, j, i] is the weight of output 16 p + j, input 4 k4 + i. One 64-byte load is 16 outputs x 4
// inputs, which is exactly what vpdpbusd multiplies with 4 activation bytes broadcast to every lane:
// 64 multiply-adds per instruction, accumulated in 16 int32 lanes, one lane per output.
// 4-bit: (N / 16, K / 8, 16, 4) uint8 holding code + 8 (the stored nibble); byte [p, k8, j, i] has input
// 8 k8 + i in its low nibble and 8 k8 + 4 + i in its high one, so one 64-byte load masked and shifted
// gives two vpdpbusd operands (16 outputs x 4 inputs each). Without VNNI each vpdpbusd becomes
// vpmaddubsw + vpmaddwd + vpaddd on each half (AVX2) or the whole (AVX-512). A block of 64 inputs takes 16 of them; then the block's int32 sums become float and are scaled by the
// activation's block scale, so the conversion costs 2 instructions per 16 products (the row layout of
// quant_linear_vnni.cpp pays 2 per product, and reduces across lanes at the end).
//
// Weight groups are 32 inputs or a multiple of 64: a group of 32 is half an activation block, and the
// integer dots then run over each half, each taking its own weight scale (groups of 32 came to panels on
// 2026-11-27: before, they ran the row layout, with int8 activations only up to 16 rows on VNNI CPUs).
// x is quantized per block of 64 inputs: x[m, k] ~ xs[m, b] * xq[m, k]. With u the stored unsigned code
// (code + 128 for 8 bits, the nibble for 4) and z the zero point on the same unsigned scale, W = s (u - z) and
//   y[m, n] = sum_g s[g, n] * sum_{b in g} xs[m, b] * dot_b(u[n], xq[m])  -  sum_g s[g, n] z[g, n] * xc[m, g]
// (8-bit dots without VNNI sum (u - 128) x instead, and z - 128 takes z's place: simd16.h).
//   xc[m, g] = sum_{b in g} xs[m, b] * sum(xq[m, b])
// Scales are float16 in units of a power of two per matrix (scale_unit, applied to each output at the
// end, so that any matrix's scales sit in float16's normal range) and zero points uint8, both in panel
// order (N / 16, G, 16): 16 outputs' scales are one 32-byte load, their zeros one 16-byte load, and a
// panel's groups follow each other, so a row of x reads them as one stream too. That is 3 bytes per
// group and output where float32 scales and zeros took 8: 4-bit codes in groups of 64 read 12.5% fewer bytes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>
#include "panel_io.h"
#include "quant_weight.h"

namespace tokenmill_quant {

namespace {
constexpr int64_t kBlock = 64;  // inputs per activation scale
}  // namespace

bool panel_gemm_available() {
#if defined(TOKENMILL_PANEL_IO)
  return true;
#else
  return false;
#endif
}

#if defined(TOKENMILL_PANEL_IO)
namespace {

using tokenmill_panels::kLanes;
using namespace tokenmill_simd;

struct QuantizedRows {  // x quantized per block of 64 inputs
  std::vector<int8_t> xq;  // (M, K)
  std::vector<float> xs;   // (M, B): block scales
  std::vector<float> xc;   // (M, G): sum over the group's blocks of xs * sum(xq)
};

// Fills q (its buffers are reused from call to call: fresh ones cost malloc work at every matrix).
template <typename in_t>
void quantize_rows(const in_t* x, int64_t M, int64_t K, int64_t group, QuantizedRows& q) {
  const int64_t B = K / kBlock, G = K / group;  // group: 32 or a multiple of 64 inputs
  q.xq.resize(M * K);
  q.xs.resize(M * B);
  q.xc.assign(M * G, 0.f);
  at::parallel_for(0, M, 16, [&](int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; ++m)
      for (int64_t b = 0; b < B; ++b) {
        const in_t* xb = x + m * K + b * kBlock;
        Floats16 v[4], amax = zeros();
        for (int i = 0; i < 4; ++i) {
          v[i] = load16(xb + 16 * i);
          amax = max(amax, abs(v[i]));
        }
        const float a = reduce_max(amax);
        const Floats16 inv = broadcast(a > 0.f ? 127.f / a : 0.f);
        Ints16 halves[2] = {zero_ints(), zero_ints()};  // code sums of inputs 0-31 and 32-63
        for (int i = 0; i < 4; ++i) {
          const Ints16 codes = round_to_ints(mul(v[i], inv));  // to nearest even
          halves[i / 2] = add(halves[i / 2], codes);
          store_saturated_bytes(q.xq.data() + m * K + b * kBlock + 16 * i, codes);
        }
        const float scale = a / 127.f;
        q.xs[m * B + b] = scale;
        const int32_t first = reduce_add(halves[0]), second = reduce_add(halves[1]);
        if (group >= kBlock) {
          q.xc[m * G + b * kBlock / group] += scale * static_cast<float>(first + second);
        } else {  // groups of 32: the block's halves belong to two groups
          q.xc[m * G + 2 * b] += scale * static_cast<float>(first);
          q.xc[m * G + 2 * b + 1] += scale * static_cast<float>(second);
        }
      }
  });
}

// MR rows of x times NP panels (16 NP outputs) into out (MR rows, ld apart).
// acc[m][j] += dot(u, xq[m]) over INPUTS inputs (a block of 64, or half of one where weight groups have
// 32 inputs); block: the panel tile's codes of those inputs.
// A tile of one or two accumulators (one panel at decode) splits each into two chains, even and odd
// steps, so that vpdpbusd's latency does not bound the stream; integer sums are exact in any order.
template <int MR, int NP, int BITS, int INPUTS>
inline void block_dot(const int8_t* xq, int64_t K, const uint8_t* block, int64_t panel_bytes, Ints16 (&acc)[MR][NP]) {
  constexpr bool kSplit = MR * NP <= 2;
  Ints16 odd_steps[MR][NP];
  if constexpr (kSplit)
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NP; ++j) odd_steps[m][j] = zero_ints();
  auto& odd = [&]() -> Ints16 (&)[MR][NP] {
    if constexpr (kSplit) return odd_steps;
    else return acc;
  }();
  if constexpr (BITS == 8) {
#pragma GCC unroll 2
    for (int k4 = 0; k4 < INPUTS / 4; k4 += 2) {
      Bytes64 even_w[NP], odd_w[NP];
      for (int j = 0; j < NP; ++j) {
        tokenmill_panels::prefetch_ahead(block + j * panel_bytes + k4 * 64);
        tokenmill_panels::prefetch_ahead(block + j * panel_bytes + (k4 + 1) * 64);
        even_w[j] = load_bytes(block + j * panel_bytes + k4 * 64);
        odd_w[j] = load_bytes(block + j * panel_bytes + (k4 + 1) * 64);
      }
      for (int m = 0; m < MR; ++m) {
        const int32_t* quads = reinterpret_cast<const int32_t*>(xq + m * K + k4 * 4);
        const Bytes64 x_even = broadcast_quad(quads[0]), x_odd = broadcast_quad(quads[1]);
        for (int j = 0; j < NP; ++j) {
          acc[m][j] = dot_bytes(acc[m][j], even_w[j], x_even);
          odd[m][j] = dot_bytes(odd[m][j], odd_w[j], x_odd);
        }
      }
    }
  } else {
    // Low and high nibbles in two chains of small sums (one when the tile has more accumulators),
    // widened into acc / odd whenever a chain has taken kSmallSumSteps steps, and at the end.
    constexpr int kSteps = kSplit ? 1 : 2;  // small dots a chain takes per pass of 8 inputs
    constexpr int kPasses = INPUTS / 8, kFlushEvery = std::min(kPasses, kSmallSumSteps / kSteps);
    static_assert(kPasses % kFlushEvery == 0, "a block's passes split evenly between widenings");
    SmallSums lo_sums[MR][NP], hi_sums_storage[MR][NP];
    auto& hi_sums = [&]() -> SmallSums (&)[MR][NP] {
      if constexpr (kSplit) return hi_sums_storage;
      else return lo_sums;
    }();
    for (int pass0 = 0; pass0 < kPasses; pass0 += kFlushEvery) {
      for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NP; ++j) lo_sums[m][j] = hi_sums[m][j] = small_zero();
#pragma GCC unroll 2
      for (int k8 = pass0; k8 < pass0 + kFlushEvery; ++k8) {
        Bytes64 lo[NP], hi[NP];
        for (int j = 0; j < NP; ++j) {
          tokenmill_panels::prefetch_ahead(block + j * panel_bytes + k8 * 64);
          const Bytes64 bytes = load_bytes(block + j * panel_bytes + k8 * 64);
          lo[j] = low_nibbles(bytes);
          hi[j] = high_nibbles(bytes);
        }
        for (int m = 0; m < MR; ++m) {
          const int32_t* pairs = reinterpret_cast<const int32_t*>(xq + m * K + k8 * 8);
          const Bytes64 x_lo = broadcast_quad(pairs[0]), x_hi = broadcast_quad(pairs[1]);
          for (int j = 0; j < NP; ++j) {
            lo_sums[m][j] = small_dot(lo_sums[m][j], lo[j], x_lo);
            hi_sums[m][j] = small_dot(hi_sums[m][j], hi[j], x_hi);
          }
        }
      }
      for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NP; ++j) {
          acc[m][j] = widen_add(acc[m][j], lo_sums[m][j]);
          if constexpr (kSplit) odd[m][j] = widen_add(odd[m][j], hi_sums[m][j]);
        }
    }
  }
  if constexpr (kSplit)
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NP; ++j) acc[m][j] = add(acc[m][j], odd_steps[m][j]);
}

template <int MR, int NP, int BITS, typename out_t>
void tile(const QuantizedRows& q, int64_t m0, const QuantWeight& w, int64_t p0, out_t* out, int64_t ld) {
  const int64_t K = w.in_features, B = K / kBlock;
  // Integer dots run over `dot_inputs` inputs: a 64-input block (one activation scale), or each half of
  // one where groups have 32 inputs (each half then takes its own weight scale and zero).
  const int64_t group = std::min(w.group_size, K), dot_inputs = std::min(group, kBlock), G = w.num_groups;
  const int64_t panel_bytes = K * kLanes * BITS / 8;
  const uint8_t* panels = w.codes + p0 * panel_bytes;
  const int8_t* xq = q.xq.data() + m0 * K;
  const float* xs = q.xs.data() + m0 * B;
  Floats16 total[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) total[m][j] = zeros();
  for (int64_t g = 0; g < G; ++g) {
    Floats16 group_acc[MR][NP];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NP; ++j) group_acc[m][j] = zeros();
    for (int64_t k = g * group; k < (g + 1) * group; k += dot_inputs) {
      const int64_t b = k / kBlock;
      Ints16 acc[MR][NP];
      for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NP; ++j) acc[m][j] = zero_ints();
      const uint8_t* codes = panels + k * kLanes * BITS / 8;
      if (dot_inputs == kBlock) block_dot<MR, NP, BITS, kBlock>(xq + k, K, codes, panel_bytes, acc);
      else block_dot<MR, NP, BITS, kBlock / 2>(xq + k, K, codes, panel_bytes, acc);
      for (int m = 0; m < MR; ++m) {
        const Floats16 scale = broadcast(xs[m * B + b]);
        for (int j = 0; j < NP; ++j) group_acc[m][j] = fmadd(to_floats(acc[m][j]), scale, group_acc[m][j]);
      }
    }
    for (int j = 0; j < NP; ++j) {
      const int64_t at = ((p0 + j) * G + g) * kLanes;  // scales in panel order: a panel's groups in a row
      const Floats16 s = load16(w.panel_scales + at);
      Floats16 zero = load16(w.panel_zeros + at);
      // 8-bit dots sum (u - kBytesOffset) x (simd16.h): the zero points move with the codes.
      if constexpr (BITS == 8 && kBytesOffset != 0) zero = add(zero, broadcast(-static_cast<float>(kBytesOffset)));
      const Floats16 off = mul(s, zero);
      for (int m = 0; m < MR; ++m) {
        const Floats16 xc = broadcast(q.xc[(m0 + m) * G + g]);
        total[m][j] = fnmadd(off, xc, fmadd(s, group_acc[m][j], total[m][j]));
      }
    }
  }
  const Floats16 unit = broadcast(w.scale_unit);
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) store16(out + m * ld + j * kLanes, mul(total[m][j], unit));
}

template <int NP, int BITS, typename out_t>
void tile_rows(int mr, const QuantizedRows& q, int64_t m0, const QuantWeight& w, int64_t p0, out_t* out, int64_t ld) {
  switch (mr) {
    case 6: return tile<6, NP, BITS, out_t>(q, m0, w, p0, out, ld);
    case 5: return tile<5, NP, BITS, out_t>(q, m0, w, p0, out, ld);
    case 4: return tile<4, NP, BITS, out_t>(q, m0, w, p0, out, ld);
    case 3: return tile<3, NP, BITS, out_t>(q, m0, w, p0, out, ld);
    case 2: return tile<2, NP, BITS, out_t>(q, m0, w, p0, out, ld);
    default: return tile<1, NP, BITS, out_t>(q, m0, w, p0, out, ld);
  }
}

template <int BITS, typename scalar_t>
void panel_gemm_typed(const scalar_t* x, int64_t M, const QuantWeight& w, scalar_t* out) {
  const int64_t K = w.in_features, N = w.out_features, panels = N / kLanes;
  thread_local QuantizedRows rows_buffer;  // the calling thread's; the tiles read it through this reference
  QuantizedRows& q = rows_buffer;
  quantize_rows(x, M, K, std::min(w.group_size, K), q);
  // One or two rows: one panel per tile, so that each thread reads its panels as one stream in address
  // order. Several panels side by side restart several short streams per tile (a 4-bit panel of 576
  // inputs is 4.6 KB, an 8-bit one 9.2 KB): in a decode step's 120 small matrices that cost ~17% of
  // the time at 4 bits and, once threads steal each other's last tiles, ~8-13% at 8 bits.
  tokenmill_panels::for_each_tile(M, panels, [&](int64_t m0, int rows, int64_t p, int width) {
    scalar_t* o = out + m0 * N + p * kLanes;
    switch (width) {
#if defined(TOKENMILL_AVX512)
      case 4: return tile_rows<4, BITS>(rows, q, m0, w, p, o, N);
      case 3: return tile_rows<3, BITS>(rows, q, m0, w, p, o, N);
#endif
      case 2: return tile_rows<2, BITS>(rows, q, m0, w, p, o, N);
      default: return tile_rows<1, BITS>(rows, q, m0, w, p, o, N);
    }
  }, 1);
}

}  // namespace

template <typename scalar_t>
void panel_gemm_bits(const scalar_t* x, int64_t M, const QuantWeight& w, scalar_t* out) {
  if (w.bits == 8) return panel_gemm_typed<8>(x, M, w, out);
  return panel_gemm_typed<4>(x, M, w, out);
}

void panel_gemm(const torch::Tensor& x, const QuantWeight& w, torch::Tensor& out) {
  const int64_t M = x.size(0);
  switch (x.scalar_type()) {
    case at::kFloat: return panel_gemm_bits(x.data_ptr<float>(), M, w, out.data_ptr<float>());
    case at::kBFloat16: return panel_gemm_bits(x.data_ptr<at::BFloat16>(), M, w, out.data_ptr<at::BFloat16>());
    case at::kHalf: return panel_gemm_bits(x.data_ptr<at::Half>(), M, w, out.data_ptr<at::Half>());
    default: TORCH_CHECK(false, "quantized panels multiply float32, bf16 or fp16 activations, got ", x.scalar_type());
  }
}
#else
void panel_gemm(const torch::Tensor&, const QuantWeight&, torch::Tensor&) {
  TORCH_CHECK(false, "this build of the kernels has no AVX512-VNNI: quantized panels cannot be multiplied");
}
#endif

}  // namespace tokenmill_quant
