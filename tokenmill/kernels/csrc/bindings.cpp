// Python bindings of tokenmill's CPU kernels (one extension module, built on first use).
#include <torch/extension.h>
#include "cpu_ops.h"
#include "decode_step.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention");
  m.def("paged_decode_attention_int8", &paged_decode_attention_int8, "paged decode attention, int8 KV cache");
  m.def("paged_decode_attention_fp8", &paged_decode_attention_fp8, "paged decode attention, fp8 e4m3 KV cache");
  m.def("write_kv", &write_kv, "float KV cache write: new rows to their slots");
  m.def("write_kv_int8", &write_kv_int8, "int8 KV cache write: quantize and store new rows");
  m.def("add_rms_norm", &add_rms_norm, "residual += delta; RMSNorm(residual) * weight");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("greedy_argmax", &greedy_argmax, "each row's first maximum (or first NaN), as Tensor.max(-1).indices");
  m.def("rotary_inplace", &rotary_inplace, "rotary embedding, in place");
  m.def("quant_linear", &quant_linear, "weight-only 8/4-bit linear");
  m.def("quant_panels_available", &quant_panels_available, "whether quantized panels can be multiplied (AVX2 or AVX-512 builds)");
  m.def("dense_panels_available", &dense_panels_available, "whether float weights of this dtype can be panels");
  m.def("dense_panel_linear", &dense_panel_linear, "float32/bf16 linear over weights in the panel layout");
  m.def("quant_dequantize", &quant_dequantize, "8/4-bit codes -> float weight");
  bind_decode_step(m);
}
