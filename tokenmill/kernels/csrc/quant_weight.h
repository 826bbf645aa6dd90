// Shared by the quantized linear kernels (quant_linear.cpp, quant_linear_vnni.cpp): a view of one
// quantized weight matrix. See quant_linear.cpp for the formula and the layouts.
#pragma once
#include <torch/extension.h>
#include <cstdint>

namespace tokenmill_quant {

struct QuantWeight {
  const uint8_t* codes;      // int8 for 8-bit, viewed as bytes; panels: see quant_panels.cpp
  const float* scales;       // rows: (N, G) float32; panels: null
  const float* scaled_zeros; // rows: (N, G) float32 scale * (zero - centre); panels: null
  int64_t out_features, in_features, group_size, num_groups, bits;
  const at::Half* panel_scales = nullptr;  // panels: (N / 16, G, 16) float16, in units of scale_unit
  const uint8_t* panel_zeros = nullptr;    // panels: (N / 16, G, 16) zero points (uncentred codes)
  float scale_unit = 1.f;                  // panels: a power of two multiplying every scale
  int64_t row_bytes() const { return bits == 8 ? in_features : in_features / 2; }
};

// Code of input k of one row, centred (scalar path: tails and non-AVX-512 builds).
inline float code_at(const uint8_t* row, int64_t k, int64_t bits) {
  if (bits == 8) return static_cast<float>(static_cast<int8_t>(row[k]));
  const int64_t chunk = k / 32, lane = k % 32;
  const uint8_t byte = row[chunk * 16 + (lane % 16)];
  return static_cast<float>((lane < 16 ? (byte & 0xF) : (byte >> 4)) - 8);
}

// A view of codes, scales and zeros as quant_linear receives them (checked: layout, dtypes, shapes). Rows:
// scales and zeros float32 (N, G), zeros holding scale * (zero - centre); panels (codes 4-D): see
// quant_panels.cpp. The tensors must outlive the view.
QuantWeight view_weight(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& zeros,
                        int64_t in_features, int64_t group_size, int64_t bits, double scale_unit);

// out (M, N) = x (M, K) W^T (+ bias) for codes in the panel layout: quant_linear's panel path with the
// view and the output given (the C++ decode step keeps both between steps). x, out contiguous, one dtype.
void panel_linear_out(const torch::Tensor& x, const QuantWeight& w, const c10::optional<torch::Tensor>& bias,
                      torch::Tensor& out);

// Whether the int8-activation (AVX512-VNNI) path can run this weight: this build has VNNI, and
// activation blocks of 64 inputs fit the weight's groups.
bool vnni_supported(const QuantWeight& w);

// out (M, N) float32 = x (M, K) W^T with x quantized to int8 per block of 64 inputs.
void vnni_linear(const float* x, int64_t M, const QuantWeight& w, float* out);

// Whether this build can multiply codes in the panel layout (quant_panels.cpp).
bool panel_gemm_available();

// out (M, N) = x (M, K) W^T for 8- or 4-bit codes in the panel layout, x quantized to int8 per block of 64
// inputs (K and the group size multiples of 64, N of 16). x and out: contiguous, one dtype (float32,
// bf16 or fp16).
void panel_gemm(const torch::Tensor& x, const QuantWeight& w, torch::Tensor& out);

}  // namespace tokenmill_quant
