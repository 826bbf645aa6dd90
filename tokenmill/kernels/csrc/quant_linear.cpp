// Weight-only quantized linear layers on CPU: y = x W^T (+ b) with W held as 8- or 4-bit codes.
//
// W[n, k] = scale[n, g] * (c[n, k] - zero[n, g]) for k in group g = k / group_size (the last group
// may be shorter). Codes c are centred on 0 (8-bit: -128..127, 4-bit: stored nibble - 8, -8..7) and
// zeros likewise, so a symmetric weight has zero 0 and the sums below cancel nothing large. The
// kernel never materialises W: per group it accumulates dot(x_g, c_g) in float32, then
// y[n] = sum_g scale * dot_g - sum_g (scale * zero) * sum(x_g). The second sum needs only the
// per-group sums of x, computed once per call, so the inner loop is convert + FMA.
//
// Layouts:
//   8-bit: codes (N, K) int8, code of W[n, k] at [n, k].
//   4-bit: codes (N, K / 2) uint8 in chunks of 32 inputs: byte 16 * c + j of a row holds input 32c + j in
//          its low nibble and input 32c + 16 + j in its high nibble (K must be a multiple of 32), so one
//          16-byte load unpacks into two 16-lane vectors with an AND and a shift.
//
// Small batches (decode) stream the codes once and keep up to 4 rows of x in registers; larger
// batches (prompts) dequantize a panel of rows at a time into the activation dtype and hand it to
// the BLAS GEMM, which is compute-bound there anyway. Small batches of bf16/fp16 activations take
// the int8-activation path of quant_linear_vnni.cpp instead, on CPUs with AVX512-VNNI. Codes of
// bf16/fp16 models held in the panel layout (codes 4-D) take quant_panels.cpp at every batch size.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>
#include "quant_weight.h"
#include "simd16.h"

namespace {

using tokenmill_quant::QuantWeight;
using tokenmill_quant::code_at;

constexpr int64_t kMaxRowsPerPass = 4;   // rows of x sharing one pass over the codes
constexpr int64_t kGemvMaxRows = 16;      // above this, dequantize panels and call the GEMM

// Tiles of MR rows of x times NR rows of W. Per group, MR * NR vector accumulators collect
// x * code; at the group's end they are scaled into MR * NR running totals (still vectors), so a
// horizontal sum happens once per output, not once per group, and the NR independent FMA chains
// hide the FMA latency even for one row of x.
#if defined(TOKENMILL_AVX512)
constexpr int kTileRows = 4;  // NR: weight rows per tile
#else
constexpr int kTileRows = 2;  // AVX2: half the registers, each holding half the lanes
#endif

#if defined(TOKENMILL_SIMD16)
// One tile in vectors of 16 lanes (AVX-512, or two AVX2 halves: simd16.h).
template <int MR, int NR>
inline void tile_simd(const float* x, int64_t K, const uint8_t* const* rows, const QuantWeight& w, int64_t n0,
                      float* out_tile /* MR x NR */) {
  using namespace tokenmill_simd;
  const int64_t G = w.num_groups, group = w.group_size;
  Floats16 total[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) total[m][n] = zeros();
  const int64_t step = w.bits == 8 ? 16 : 32;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * group, k1 = std::min(K, k0 + group), vec_end = k0 + (k1 - k0) / step * step;
    Floats16 acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) acc[m][n] = zeros();
    if (w.bits == 8) {
      for (int64_t k = k0; k < vec_end; k += 16) {
        Floats16 xv[MR];
        for (int m = 0; m < MR; ++m) xv[m] = load16(x + m * K + k);
        for (int n = 0; n < NR; ++n) {
          const Floats16 wv = load16(reinterpret_cast<const int8_t*>(rows[n]) + k);
          for (int m = 0; m < MR; ++m) acc[m][n] = fmadd(xv[m], wv, acc[m][n]);
        }
      }
    } else {
      for (int64_t k = k0; k < vec_end; k += 32) {
        Floats16 xlo[MR], xhi[MR];
        for (int m = 0; m < MR; ++m) {
          xlo[m] = load16(x + m * K + k);
          xhi[m] = load16(x + m * K + k + 16);
        }
        for (int n = 0; n < NR; ++n) {
          Floats16 lo, hi;
          load_nibbles16(rows[n] + k / 2, lo, hi);
          for (int m = 0; m < MR; ++m) acc[m][n] = fmadd(xhi[m], hi, fmadd(xlo[m], lo, acc[m][n]));
        }
      }
    }
    for (int n = 0; n < NR; ++n) {
      const Floats16 scale = broadcast(w.scales[(n0 + n) * G + g]);
      for (int m = 0; m < MR; ++m) total[m][n] = fmadd(scale, acc[m][n], total[m][n]);
    }
    if (vec_end < k1) {  // a tail shorter than one vector (8-bit codes only: 4-bit groups are multiples of 32)
      for (int n = 0; n < NR; ++n) {
        const float scale = w.scales[(n0 + n) * G + g];
        for (int m = 0; m < MR; ++m) {
          float dot = 0.f;
          for (int64_t k = vec_end; k < k1; ++k) dot += x[m * K + k] * code_at(rows[n], k, w.bits);
          out_tile[m * NR + n] += scale * dot;
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out_tile[m * NR + n] += reduce_add(total[m][n]);
}
#endif

// Scalar version of one tile (builds without AVX2 or AVX-512).
inline void tile_scalar(int MR, int NR, const float* x, int64_t K, const uint8_t* const* rows, const QuantWeight& w,
                        int64_t n0, float* out_tile) {
  const int64_t G = w.num_groups;
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n)
      for (int64_t g = 0; g < G; ++g) {
        float dot = 0.f;
        const int64_t k1 = std::min(K, (g + 1) * w.group_size);
        for (int64_t k = g * w.group_size; k < k1; ++k) dot += x[m * K + k] * code_at(rows[n], k, w.bits);
        out_tile[m * NR + n] += w.scales[(n0 + n) * G + g] * dot;
      }
}

template <int MR>
void tile(int NR, const float* x, int64_t K, const uint8_t* const* rows, const QuantWeight& w, int64_t n0,
          float* out_tile) {
#if defined(TOKENMILL_SIMD16)
  switch (NR) {
    case 4: return tile_simd<MR, 4>(x, K, rows, w, n0, out_tile);
    case 3: return tile_simd<MR, 3>(x, K, rows, w, n0, out_tile);
    case 2: return tile_simd<MR, 2>(x, K, rows, w, n0, out_tile);
    default: return tile_simd<MR, 1>(x, K, rows, w, n0, out_tile);
  }
#else
  tile_scalar(MR, NR, x, K, rows, w, n0, out_tile);
#endif
}

// out (M, N) = x (M, K) W^T for small M: each task streams its rows of codes once, applying them
// to every row of x (in tiles of up to 4) while they are in L1.
void gemv(const float* x, const float* x_group_sums, int64_t M, const QuantWeight& w, float* out) {
  const int64_t N = w.out_features, K = w.in_features, G = w.num_groups;
  const int64_t grain = std::max<int64_t>(kTileRows * 2, 8192 / std::max<int64_t>(1, w.row_bytes()));
  at::parallel_for(0, (N + kTileRows - 1) / kTileRows, grain / kTileRows, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t n0 = t * kTileRows, nr = std::min<int64_t>(kTileRows, N - n0);
      const uint8_t* rows[kTileRows];
      for (int n = 0; n < nr; ++n) rows[n] = w.codes + (n0 + n) * w.row_bytes();
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerPass) {
        const int64_t mr = std::min(kMaxRowsPerPass, M - m0);
        float tile_out[kMaxRowsPerPass * kTileRows] = {};
        const float* xm = x + m0 * K;
        switch (mr) {
          case 1: tile<1>(nr, xm, K, rows, w, n0, tile_out); break;
          case 2: tile<2>(nr, xm, K, rows, w, n0, tile_out); break;
          case 3: tile<3>(nr, xm, K, rows, w, n0, tile_out); break;
          default: tile<4>(nr, xm, K, rows, w, n0, tile_out); break;
        }
        for (int64_t m = 0; m < mr; ++m)
          for (int64_t n = 0; n < nr; ++n) {
            // The zero points' share: sum over groups of (scale * zero) * sum(x over the group).
            const float* sz = w.scaled_zeros + (n0 + n) * G;
            const float* xs = x_group_sums + (m0 + m) * G;
            float zero_part = 0.f;
            for (int64_t g = 0; g < G; ++g) zero_part += sz[g] * xs[g];
            out[(m0 + m) * N + n0 + n] = tile_out[m * nr + n] - zero_part;
          }
      }
    }
  });
}

// W[n_begin:n_end] in float, into panel (n_end - n_begin, K), then cast by the caller.
template <typename out_t>
void dequantize_rows(const QuantWeight& w, int64_t n_begin, int64_t n_end, out_t* panel) {
  const int64_t K = w.in_features, G = w.num_groups;
  at::parallel_for(n_begin, n_end, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = w.codes + n * w.row_bytes();
      out_t* dst = panel + (n - n_begin) * K;
      for (int64_t g = 0; g < G; ++g) {
        const float s = w.scales[n * G + g], sz = w.scaled_zeros[n * G + g];
        const int64_t k0 = g * w.group_size, k1 = std::min(K, k0 + w.group_size);
        if (w.bits == 8) {
          const int8_t* codes = reinterpret_cast<const int8_t*>(row);
          for (int64_t k = k0; k < k1; ++k) dst[k] = static_cast<out_t>(s * static_cast<float>(codes[k]) - sz);
        } else {  // whole 32-input chunks (4-bit groups are multiples of 32): simple loops that vectorize
          for (int64_t c = k0 / 32; c < k1 / 32; ++c) {
            const uint8_t* bytes = row + c * 16;
            out_t* out = dst + c * 32;
            for (int j = 0; j < 16; ++j) {
              out[j] = static_cast<out_t>(s * static_cast<float>((bytes[j] & 0xF) - 8) - sz);
              out[j + 16] = static_cast<out_t>(s * static_cast<float>((bytes[j] >> 4) - 8) - sz);
            }
          }
        }
      }
    }
  });
}

}  // namespace

// Rows: scales and zeros are float32 (N, G), zeros holding scale * (zero - centre). Panels: (N / 16, G, 16)
// float16 scales in units of scale_unit and uint8 zero points (quant_panels.cpp).
QuantWeight tokenmill_quant::view_weight(const torch::Tensor& codes, const torch::Tensor& scales,
                                         const torch::Tensor& zeros, int64_t in_features, int64_t group_size,
                                         int64_t bits, double scale_unit) {
  TORCH_CHECK(bits == 4 || bits == 8, "quant_linear: bits must be 4 or 8, got ", bits);
  const bool panels = codes.dim() == 4;
  const int64_t N = panels ? codes.size(0) * codes.size(2) : codes.size(0), G = (in_features + group_size - 1) / group_size;
  if (panels) {
    const int64_t inputs_per_step = bits == 8 ? 4 : 8;
    TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(1) * inputs_per_step == in_features &&
                    codes.size(2) == 16 && codes.size(3) == 4,
                bits, "-bit panels must be contiguous (N / 16, K / ", inputs_per_step, ", 16, 4) uint8 with K = ", in_features);
    const int64_t group = std::min(group_size, in_features);
    TORCH_CHECK(in_features % 64 == 0 && (group == 32 || group % 64 == 0),
                "panels need inputs in multiples of 64 and groups of 32 or multiples of 64, got ", in_features,
                " and ", group_size);
    const std::vector<int64_t> shape{N / 16, G, 16};
    TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.sizes() == shape &&
                    zeros.scalar_type() == at::kByte && zeros.is_contiguous() && zeros.sizes() == shape,
                "panel scales and zeros must be contiguous (N / 16, num_groups, 16) float16 and uint8");
    QuantWeight w{static_cast<const uint8_t*>(codes.data_ptr()), nullptr, nullptr, N, in_features, group_size, G, bits};
    w.panel_scales = scales.data_ptr<at::Half>();
    w.panel_zeros = zeros.data_ptr<uint8_t>();
    w.scale_unit = static_cast<float>(scale_unit);
    return w;
  }
  TORCH_CHECK(codes.scalar_type() == (bits == 8 ? at::kChar : at::kByte) && codes.is_contiguous() && codes.dim() == 2,
              "codes must be contiguous: (N, K) int8 for 8 bits, (N, K/2) uint8 for 4 bits");
  TORCH_CHECK(bits == 8 || in_features % 32 == 0, "4-bit codes need in_features divisible by 32, got ", in_features);
  TORCH_CHECK(bits == 8 || group_size % 32 == 0 || group_size >= in_features, "4-bit group_size must be a multiple of 32");
  TORCH_CHECK(codes.size(1) == (bits == 8 ? in_features : in_features / 2), "codes have ", codes.size(1), " bytes per row");
  TORCH_CHECK(scale_unit == 1.0, "the row layout's scales are float32 (scale_unit 1), got ", scale_unit);
  for (const auto* t : {&scales, &zeros})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == at::IntArrayRef({N, G}),
                "scales and zeros (scale * (zero - centre)) must be contiguous float32 (N, num_groups)");
  return {static_cast<const uint8_t*>(codes.data_ptr()), scales.data_ptr<float>(), zeros.data_ptr<float>(), N,
          in_features, group_size, G, bits};
}

void tokenmill_quant::panel_linear_out(const torch::Tensor& x, const QuantWeight& w,
                                       const c10::optional<torch::Tensor>& bias, torch::Tensor& out) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.scalar_type() == x.scalar_type() &&
                  x.size(-1) == w.in_features && out.numel() == x.numel() / w.in_features * w.out_features,
              "quantized panels: x (M, ", w.in_features, ") and out (M, ", w.out_features,
              ") must be contiguous, of one dtype");
  tokenmill_quant::panel_gemm(x, w, out);
  if (bias.has_value()) out.add_(*bias);
}

// x (..., K) float32/bfloat16/float16 -> (..., N) in x's dtype.
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros,
                           int64_t group_size, int64_t bits, double scale_unit, c10::optional<torch::Tensor> bias) {
  const int64_t K = x.size(-1);
  const QuantWeight w = tokenmill_quant::view_weight(codes, scales, zeros, K, group_size, bits, scale_unit);
  const int64_t M = x.numel() / K, N = w.out_features;
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  torch::Tensor out;
  if (codes.dim() == 4) {  // panels: int8 activations at every batch size
    const auto x2 = x.reshape({M, K}).contiguous();  // (M, K)
    out = torch::empty({M, N}, x.options());
    tokenmill_quant::panel_linear_out(x2, w, bias, out);
    return out.view(out_sizes);
  } else if (M > kGemvMaxRows) {
    const auto x2 = x.reshape({M, K});
    out = torch::empty({M, N}, x.options());
    // Panels of ~1 MiB in the activation dtype: they stay in L2 while the GEMM reads them.
    const int64_t panel_rows = std::max<int64_t>(64, (1 << 20) / (K * x.element_size()));
    auto panel = torch::empty({std::min(panel_rows, N), K}, x.options());
    for (int64_t n0 = 0; n0 < N; n0 += panel_rows) {
      const int64_t n1 = std::min(N, n0 + panel_rows);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dequantize_panel", [&] {
        dequantize_rows<scalar_t>(w, n0, n1, panel.data_ptr<scalar_t>());
      });
      out.narrow(1, n0, n1 - n0).copy_(at::mm(x2, panel.narrow(0, 0, n1 - n0).t()));
    }
  } else {
    const auto xf = x.reshape({M, K}).to(at::kFloat).contiguous();  // (M, K) float32
    auto out_f = torch::empty({M, N}, xf.options());
    if (x.scalar_type() != at::kFloat && tokenmill_quant::vnni_supported(w)) {
      tokenmill_quant::vnni_linear(xf.data_ptr<float>(), M, w, out_f.data_ptr<float>());
      out = out_f.to(x.scalar_type());
      if (bias.has_value()) out.add_(*bias);
      return out.view(out_sizes);
    }
    const int64_t G = w.num_groups;
    auto group_sums = torch::empty({M, G}, xf.options());  // (M, G): x summed over each group
    const float* xp = xf.data_ptr<float>();
    float* gs = group_sums.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float sum = 0.f;
        for (int64_t k = g * group_size; k < std::min(K, (g + 1) * group_size); ++k) sum += xp[m * K + k];
        gs[m * G + g] = sum;
      }
    gemv(xp, gs, M, w, out_f.data_ptr<float>());
    out = x.scalar_type() == at::kFloat ? out_f : out_f.to(x.scalar_type());
  }
  if (bias.has_value()) out.add_(*bias);
  return out.view(out_sizes);
}

// The float weight (N, K) the codes stand for (tests, and layers that fall back to dense).
bool quant_panels_available() { return tokenmill_quant::panel_gemm_available(); }

torch::Tensor quant_dequantize(torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros,
                               int64_t in_features, int64_t group_size, int64_t bits) {
  TORCH_CHECK(codes.dim() == 2, "quant_dequantize reads the row layout; panels are unpacked in Python");
  const QuantWeight w = tokenmill_quant::view_weight(codes, scales, zeros, in_features, group_size, bits, 1.0);
  auto out = torch::empty({w.out_features, in_features}, scales.options());
  dequantize_rows<float>(w, 0, w.out_features, out.data_ptr<float>());
  return out;
}
