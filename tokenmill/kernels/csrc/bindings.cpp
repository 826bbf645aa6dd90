// Python bindings of tokenmill's CPU kernels (one extension module, built on first use).
#include <torch/extension.h>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor key_cache, torch::Tensor value_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale);
torch::Tensor add_rms_norm(torch::Tensor residual, c10::optional<torch::Tensor> delta, torch::Tensor weight,
                           double eps, at::ScalarType out_dtype);
torch::Tensor silu_and_mul(torch::Tensor gate_up);
void rotary_inplace(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                    int64_t num_rot_heads, int64_t head_dim);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention");
  m.def("add_rms_norm", &add_rms_norm, "residual += delta; RMSNorm(residual) * weight");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("rotary_inplace", &rotary_inplace, "rotary embedding, in place");
}
