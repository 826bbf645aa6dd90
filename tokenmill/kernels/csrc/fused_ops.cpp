// Fused elementwise CPU ops for the decoder layers. Each replaces 3-8 separate PyTorch ops (and
// their dispatch and temporary tensors) with one pass over the data. All math is in float32.
#include <torch/extension.h>
#include <algorithm>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include "simd16.h"

template <typename in_t, typename out_t>
static void add_rms_rows(float* residual, const in_t* delta, const float* weight, out_t* out, int64_t rows,
                         int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* x = residual + r * hidden;
      if (delta != nullptr) {
        const in_t* d = delta + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) x[i] += static_cast<float>(d[i]);
      }
      float sum = 0.f;
      for (int64_t i = 0; i < hidden; ++i) sum += x[i] * x[i];
      const float inv = 1.f / std::sqrt(sum / hidden + eps);
      out_t* o = out + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) o[i] = static_cast<out_t>(weight[i] * (x[i] * inv));
    }
  });
}

// residual (T, H) float32, updated in place to residual + delta when delta is given (contiguous, T x H);
// out (T, H) contiguous, any float dtype = RMSNorm(residual) * weight. Allocates nothing.
void add_rms_norm_out(const torch::Tensor& residual, const torch::Tensor* delta, const torch::Tensor& weight,
                      double eps, torch::Tensor& out) {
  TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous(), "residual must be contiguous float32");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "weight must be float32");
  TORCH_CHECK(out.is_contiguous() && out.numel() == residual.numel(), "add_rms_norm: out must match the residual");
  TORCH_CHECK(delta == nullptr || (delta->is_contiguous() && delta->numel() == residual.numel()),
              "add_rms_norm: delta must be contiguous and match the residual");
  const int64_t hidden = residual.size(-1), rows = residual.numel() / hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "add_rms_norm_out", [&] {
    using out_t = scalar_t;
    if (delta == nullptr) {
      add_rms_rows<float, out_t>(residual.data_ptr<float>(), nullptr, weight.data_ptr<float>(),
                                 out.data_ptr<out_t>(), rows, hidden, static_cast<float>(eps));
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, delta->scalar_type(), "add_rms_norm_in", [&] {
      add_rms_rows<scalar_t, out_t>(residual.data_ptr<float>(), delta->data_ptr<scalar_t>(), weight.data_ptr<float>(),
                                    out.data_ptr<out_t>(), rows, hidden, static_cast<float>(eps));
    });
  });
}

// residual (T, H) float32, updated in place to residual + delta when delta is given;
// returns RMSNorm(residual) * weight in out_dtype.
torch::Tensor add_rms_norm(torch::Tensor residual, c10::optional<torch::Tensor> delta, torch::Tensor weight,
                           double eps, at::ScalarType out_dtype) {
  auto out = torch::empty(residual.sizes(), residual.options().dtype(out_dtype));
  if (!delta.has_value()) {
    add_rms_norm_out(residual, nullptr, weight, eps, out);
    return out;
  }
  const torch::Tensor d = delta->contiguous();
  add_rms_norm_out(residual, &d, weight, eps, out);
  return out;
}

// gate_up (T, 2I) contiguous, holding [gate | up] -> out (T, I) contiguous = silu(gate) * up, same dtype.
// Allocates nothing.
void silu_and_mul_out(const torch::Tensor& gate_up, torch::Tensor& out) {
  TORCH_CHECK(gate_up.is_contiguous() && out.is_contiguous() && out.scalar_type() == gate_up.scalar_type() &&
                  2 * out.numel() == gate_up.numel(),
              "silu_and_mul: gate_up (T, 2I) and out (T, I) must be contiguous, of one dtype");
  const int64_t width = gate_up.size(-1) / 2, rows = gate_up.numel() / gate_up.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = in + r * 2 * width;
        const scalar_t* u = g + width;
        for (int64_t i = 0; i < width; ++i) {
          const float x = static_cast<float>(g[i]);
          // -ffast-math assumes no infinities: exp(-x) for x < -88 would overflow to one and the
          // vectorised division give NaN. exp(88) is finite and x / 1e38 rounds to silu's ~0.
          o[r * width + i] = static_cast<scalar_t>(x / (1.f + std::exp(std::min(-x, 88.f))) * static_cast<float>(u[i]));
        }
      }
    });
  });
}

// gate_up (T, 2I) holding [gate | up] -> (T, I) = silu(gate) * up, same dtype.
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  gate_up = gate_up.contiguous();
  auto sizes = gate_up.sizes().vec();
  sizes.back() /= 2;
  auto out = torch::empty(sizes, gate_up.options());
  silu_and_mul_out(gate_up, out);
  return out;
}

// Rotates, in place, the first num_rot_heads heads of each row of qkv (T, row_width): pairs
// (i, i + d/2) of a head turn by positions[t] * inv_freq[i]; cos/sin are (max_pos, d/2) float32.
void rotary_inplace(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                    int64_t num_rot_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.is_contiguous() && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "qkv must be contiguous; cos/sin float32");
  positions = positions.contiguous();
  const int64_t rows = qkv.size(0), row_width = qkv.size(1), half = head_dim / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rotary_inplace", [&] {
    scalar_t* data = qkv.data_ptr<scalar_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const float* cos_t = cos.data_ptr<float>();
    const float* sin_t = sin.data_ptr<float>();
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* c = cos_t + pos[r] * half;
        const float* s = sin_t + pos[r] * half;
        for (int64_t h = 0; h < num_rot_heads; ++h) {
          scalar_t* x = data + r * row_width + h * head_dim;
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
            x[i] = static_cast<scalar_t>(x1 * c[i] - x2 * s[i]);
            x[i + half] = static_cast<scalar_t>(x2 * c[i] + x1 * s[i]);
          }
        }
      }
    });
  });
}

// Whether a float is NaN, from its bits (-ffast-math lets the compiler assume x == x).
static inline bool is_nan(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7FFFFFFFu) > 0x7F800000u;
}

// Index of the first maximum of x[0, n), or of its first NaN, as Tensor.max(-1).indices gives them:
// one vector pass for the maximum (and NaNs), one for the first element equal to it.
template <typename scalar_t>
static int64_t first_argmax(const scalar_t* x, int64_t n) {
  float best = -INFINITY;
  int64_t i = 0;
#if defined(TOKENMILL_SIMD16)
  namespace simd = tokenmill_simd;
  {
    simd::Floats16 top = simd::broadcast(-INFINITY);
    for (; i + 16 <= n; i += 16) {
      const simd::Floats16 v = simd::load16(x + i);
      if (const uint32_t nan = simd::nan_lanes(v)) return i + __builtin_ctz(nan);
      top = simd::max(top, v);
    }
    best = simd::reduce_max(top);
  }
#endif
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (is_nan(v)) return i;
    best = std::max(best, v);
  }
  i = 0;
#if defined(TOKENMILL_SIMD16)
  {
    const simd::Floats16 target = simd::broadcast(best);
    for (; i + 16 <= n; i += 16)
      if (const uint32_t hit = simd::equal_lanes(simd::load16(x + i), target)) return i + __builtin_ctz(hit);
  }
#endif
  for (; i < n; ++i)
    if (static_cast<float>(x[i]) == best) return i;
  return 0;
}

// logits (M, V) float32/bf16/fp16 -> (M,) int64: each row's greedy token. Tensor.max(-1) reads ~1 ns per
// element on CPU (49152 logits: ~45 us per token); this reads them at vector speed.
torch::Tensor greedy_argmax(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2, "greedy_argmax: logits must be (rows, vocab), got ", logits.dim(), " dims");
  logits = logits.contiguous();
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto out = torch::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* tokens = out.data_ptr<int64_t>();
  const auto rows_of = [&](const auto* data) {
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) tokens[r] = first_argmax(data + r * vocab, vocab);
    });
  };
  switch (logits.scalar_type()) {
    case at::kFloat: rows_of(logits.data_ptr<float>()); break;
    case at::kBFloat16: rows_of(logits.data_ptr<at::BFloat16>()); break;
    case at::kHalf: rows_of(logits.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "greedy_argmax: logits must be float32, bf16 or fp16, got ", logits.scalar_type());
  }
  return out;
}
