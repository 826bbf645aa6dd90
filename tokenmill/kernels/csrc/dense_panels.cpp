// Float weights (float32, bf16) in a panel layout, for every batch size on CPU.
//
// Layout: float32 (N / 16, K, 16): [p, k, j] is W[16 p + j, k]; bf16 (N / 16, K / 2, 16, 2): [p, k2, j, i]
// is W[16 p + j, 2 k2 + i]. Each 64-byte load is 16 outputs (x 2 inputs in bf16), which one FMA (bf16:
// one vdpbf16ps, 2 products per lane) applies to one broadcast activation (bf16: a pair). A panel is one
// contiguous stream, so a row of x reads the weights front to back at the memory's speed: oneDNN's
// prepacked GEMV reached ~18-21 GB/s on this model's small matrices, these panels ~31 GB/s.
//
// Sums run over k in order for every output, whatever the tile, so a row's result does not depend
// on the other rows in the batch.
#include <torch/extension.h>
#include <algorithm>
#include <type_traits>
#include <vector>
#include "panel_io.h"

#if defined(TOKENMILL_PANEL_IO)
namespace {

using tokenmill_panels::kLanes;
using namespace tokenmill_simd;

// Inputs per partial sum: each output sums blocks of kSumBlock products, then the blocks, so float32
// rounding grows with K / kSumBlock + kSumBlock rather than with K (as oneDNN's blocked sums do).
constexpr int64_t kSumBlock = 64;

// acc[m][j] += x[m] . W over inputs [k0, k1) of the panel tile: float32 weights, one input per step.
template <int MR, int NP>
inline void accumulate(const float* x, int64_t K, int64_t k0, int64_t k1, const float* w, int64_t panel_elems,
                       Floats16 (&acc)[MR][NP]) {
#pragma GCC unroll 4
  for (int64_t k = k0; k < k1; ++k) {
    Floats16 wv[NP];
    for (int j = 0; j < NP; ++j) wv[j] = load16(w + j * panel_elems + k * kLanes);
    for (int m = 0; m < MR; ++m) {
      const Floats16 xv = broadcast(x[m * K + k]);
      for (int j = 0; j < NP; ++j) acc[m][j] = fmadd(wv[j], xv, acc[m][j]);
    }
  }
}

// Whether bf16 panels multiply bf16 activations directly (AVX512-BF16: one vdpbf16ps takes both products
// of a lane) or float32 copies of them (converted exactly, once per call, so that each broadcast is one
// load rather than a conversion per row and input; on an AVX2 Zen 3: 1.37x the tokens/s at 64 rows, 0.89x
// the time per token at one row).
#if defined(TOKENMILL_AVX512) && defined(__AVX512BF16__)
constexpr bool kBf16Dots = true;

template <int MR, int NP>
inline void accumulate(const at::BFloat16* x, int64_t K, int64_t k0, int64_t k1, const at::BFloat16* w,
                       int64_t panel_elems, Floats16 (&acc)[MR][NP]) {
  const int32_t* pairs = reinterpret_cast<const int32_t*>(x);
#pragma GCC unroll 4
  for (int64_t k2 = k0 / 2; k2 < k1 / 2; ++k2) {
    __m512bh wv[NP];
    for (int j = 0; j < NP; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * panel_elems + k2 * 2 * kLanes);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pairs[m * K / 2 + k2]);
      for (int j = 0; j < NP; ++j) acc[m][j].v = _mm512_dpbf16_ps(acc[m][j].v, wv[j], xv);
    }
  }
}
#else
constexpr bool kBf16Dots = false;
#endif

// bf16 weights and float32 activations: the pair becomes two float vectors and two FMAs, the first
// input's product first.
template <int MR, int NP>
inline void accumulate(const float* x, int64_t K, int64_t k0, int64_t k1, const at::BFloat16* w,
                       int64_t panel_elems, Floats16 (&acc)[MR][NP]) {
#pragma GCC unroll 2
  for (int64_t k2 = k0 / 2; k2 < k1 / 2; ++k2) {
    Floats16 first[NP], second[NP];
    for (int j = 0; j < NP; ++j) tokenmill_panels::prefetch_ahead(w + j * panel_elems + k2 * 2 * kLanes);
    for (int j = 0; j < NP; ++j) load_bf16_pairs(w + j * panel_elems + k2 * 2 * kLanes, first[j], second[j]);
    for (int m = 0; m < MR; ++m) {
      const Floats16 x0 = broadcast(x[m * K + 2 * k2]), x1 = broadcast(x[m * K + 2 * k2 + 1]);
      for (int j = 0; j < NP; ++j) acc[m][j] = fmadd(second[j], x1, fmadd(first[j], x0, acc[m][j]));
    }
  }
}

template <int MR, int NP, typename x_t, typename scalar_t>
void tile(const x_t* x, int64_t K, const scalar_t* w, const scalar_t* bias, scalar_t* out, int64_t ld) {
  Floats16 total[MR][NP], acc[MR][NP];
  for (int j = 0; j < NP; ++j) {
    const Floats16 b = bias == nullptr ? zeros() : load16(bias + j * kLanes);
    for (int m = 0; m < MR; ++m) total[m][j] = b;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kSumBlock) {
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NP; ++j) acc[m][j] = zeros();
    accumulate<MR, NP>(x, K, k0, std::min(K, k0 + kSumBlock), w, K * kLanes, acc);
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NP; ++j) total[m][j] = add(total[m][j], acc[m][j]);
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) store16(out + m * ld + j * kLanes, total[m][j]);
}

template <int NP, typename x_t, typename scalar_t>
void tile_rows(int mr, const x_t* x, int64_t K, const scalar_t* w, const scalar_t* bias, scalar_t* out,
               int64_t ld) {
  switch (mr) {
    case 6: return tile<6, NP>(x, K, w, bias, out, ld);
    case 5: return tile<5, NP>(x, K, w, bias, out, ld);
    case 4: return tile<4, NP>(x, K, w, bias, out, ld);
    case 3: return tile<3, NP>(x, K, w, bias, out, ld);
    case 2: return tile<2, NP>(x, K, w, bias, out, ld);
    default: return tile<1, NP>(x, K, w, bias, out, ld);
  }
}

template <typename x_t, typename scalar_t>
void panel_linear_typed(const x_t* x, int64_t M, int64_t K, const scalar_t* w, int64_t N, const scalar_t* bias,
                        scalar_t* out) {
  const int64_t panel_elems = K * kLanes;
  tokenmill_panels::for_each_tile(M, N / kLanes, [&](int64_t m0, int rows, int64_t p, int width) {
    const x_t* xm = x + m0 * K;
    const scalar_t* b = bias == nullptr ? nullptr : bias + p * kLanes;
    scalar_t* o = out + m0 * N + p * kLanes;
    const scalar_t* wp = w + p * panel_elems;
    switch (width) {
#if defined(TOKENMILL_AVX512)
      case 4: return tile_rows<4>(rows, xm, K, wp, b, o, N);
      case 3: return tile_rows<3>(rows, xm, K, wp, b, o, N);
#endif
      case 2: return tile_rows<2>(rows, xm, K, wp, b, o, N);
      default: return tile_rows<1>(rows, xm, K, wp, b, o, N);
    }
  });
}

template <typename scalar_t>
void panel_linear(const scalar_t* x, int64_t M, int64_t K, const scalar_t* w, int64_t N, const scalar_t* bias,
                  scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16> && !kBf16Dots) {
    thread_local std::vector<float> x_buffer;  // the calling thread's, kept between calls
    if (static_cast<int64_t>(x_buffer.size()) < M * K) x_buffer.resize(M * K);
    float* xf = x_buffer.data();
    int64_t i = 0;
    for (; i + kLanes <= M * K; i += kLanes) store16(xf + i, load16(x + i));
    for (; i < M * K; ++i) xf[i] = static_cast<float>(x[i]);
    panel_linear_typed(static_cast<const float*>(xf), M, K, w, N, bias, out);
  } else {
    panel_linear_typed(x, M, K, w, N, bias, out);
  }
}

}  // namespace
#endif

bool dense_panels_available(at::ScalarType dtype) {
#if defined(TOKENMILL_PANEL_IO)
  return dtype == at::kFloat || dtype == at::kBFloat16;
#else
  (void)dtype;
  return false;
#endif
}

// x (M, K) contiguous -> out (M, N) contiguous, both in the panels' dtype; panels as packed by
// packing.pack_dense_panels. Allocates nothing (unless bias needs a cast).
void dense_panel_linear_out(const torch::Tensor& x, const torch::Tensor& panels,
                            const c10::optional<torch::Tensor>& bias, torch::Tensor& out) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dense_panels_available(dtype), "dense panels: no kernel for ", dtype, " in this build");
  TORCH_CHECK(panels.scalar_type() == dtype && panels.is_contiguous(), "dense panels must be contiguous ", dtype);
  const bool bf16 = dtype == at::kBFloat16;
  TORCH_CHECK(panels.dim() == (bf16 ? 4 : 3) && panels.size(2) == 16 && (!bf16 || panels.size(3) == 2),
              "dense panels must be (N / 16, K, 16) float32 or (N / 16, K / 2, 16, 2) bf16");
  const int64_t K = x.size(-1), N = panels.size(0) * 16, M = x.numel() / K;
  TORCH_CHECK(panels.size(1) * (bf16 ? 2 : 1) == K, "dense panels hold ", panels.size(1) * (bf16 ? 2 : 1),
              " inputs; x has ", K);
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.scalar_type() == dtype && out.numel() == M * N,
              "dense panels: x (M, K) and out (M, ", N, ") must be contiguous, of one dtype");
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->to(dtype).contiguous();
    TORCH_CHECK(b.numel() == N, "bias has ", b.numel(), " values for ", N, " outputs");
  }
#if defined(TOKENMILL_PANEL_IO)
  if (!bf16) {
    panel_linear(x.data_ptr<float>(), M, K, panels.data_ptr<float>(), N, b.defined() ? b.data_ptr<float>() : nullptr,
                 out.data_ptr<float>());
  } else {
    using bf = at::BFloat16;
    panel_linear(x.data_ptr<bf>(), M, K, panels.data_ptr<bf>(), N, b.defined() ? b.data_ptr<bf>() : nullptr,
                 out.data_ptr<bf>());
  }
#endif
}

// x (..., K) -> (..., N) in x's dtype; panels as packed by packing.pack_dense_panels, in x's dtype.
torch::Tensor dense_panel_linear(torch::Tensor x, torch::Tensor panels, c10::optional<torch::Tensor> bias) {
  const int64_t K = x.size(-1), N = panels.dim() >= 3 ? panels.size(0) * 16 : 0, M = x.numel() / K;
  const auto x2 = x.reshape({M, K}).contiguous();
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  auto out = torch::empty({M, N}, x.options());
  dense_panel_linear_out(x2, panels, bias, out);
  return out.view(out_sizes);
}
