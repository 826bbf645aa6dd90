// The CPU kernels' entry points, shared by the Python bindings and the C++ decode step
// (decode_step.cpp), which calls the very functions the Python path calls.
#pragma once
#include <torch/extension.h>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor key_cache, torch::Tensor value_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale);
torch::Tensor paged_decode_attention_int8(torch::Tensor q, torch::Tensor key_codes, torch::Tensor value_codes,
                                          torch::Tensor key_scales, torch::Tensor value_scales,
                                          torch::Tensor block_tables, torch::Tensor seq_lens, double scale);
torch::Tensor paged_decode_attention_fp8(torch::Tensor q, torch::Tensor key_bytes, torch::Tensor value_bytes,
                                         double k_scale, double v_scale, torch::Tensor block_tables,
                                         torch::Tensor seq_lens, double scale);
void paged_decode_attention_from_qkv(const torch::Tensor& qkv, int64_t num_heads, const torch::Tensor& key_cache,
                                     const torch::Tensor& value_cache, const torch::Tensor& key_scales,
                                     const torch::Tensor& value_scales, const torch::Tensor& slot_mapping,
                                     const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale,
                                     torch::Tensor& out);
// Copies T rows of row_bytes each (source rows k_stride / v_stride bytes apart) to their slots' rows of
// keys / values (num_slots rows each); slots < 0 are skipped (kv_write.cpp).
void copy_kv_rows(const char* k, int64_t k_stride, const char* v, int64_t v_stride, int64_t row_bytes, int64_t T,
                  const int64_t* slot, int64_t num_slots, char* keys, char* values);
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor key_cache, torch::Tensor value_cache,
              torch::Tensor slot_mapping);
void write_kv_int8_from_qkv(const torch::Tensor& qkv, int64_t num_heads, const torch::Tensor& key_codes,
                            const torch::Tensor& value_codes, const torch::Tensor& key_scales,
                            const torch::Tensor& value_scales, const torch::Tensor& slot_mapping);
void write_kv_int8(torch::Tensor k, torch::Tensor v, torch::Tensor key_codes, torch::Tensor value_codes,
                   torch::Tensor key_scales, torch::Tensor value_scales, torch::Tensor slot_mapping);
torch::Tensor add_rms_norm(torch::Tensor residual, c10::optional<torch::Tensor> delta, torch::Tensor weight,
                           double eps, at::ScalarType out_dtype);
void add_rms_norm_out(const torch::Tensor& residual, const torch::Tensor* delta, const torch::Tensor& weight,
                      double eps, torch::Tensor& out);
torch::Tensor silu_and_mul(torch::Tensor gate_up);
void silu_and_mul_out(const torch::Tensor& gate_up, torch::Tensor& out);
torch::Tensor greedy_argmax(torch::Tensor logits);
void rotary_inplace(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                    int64_t num_rot_heads, int64_t head_dim);
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros,
                           int64_t group_size, int64_t bits, double scale_unit, c10::optional<torch::Tensor> bias);
bool quant_panels_available();
bool dense_panels_available(at::ScalarType dtype);
torch::Tensor dense_panel_linear(torch::Tensor x, torch::Tensor panels, c10::optional<torch::Tensor> bias);
void dense_panel_linear_out(const torch::Tensor& x, const torch::Tensor& panels,
                            const c10::optional<torch::Tensor>& bias, torch::Tensor& out);
torch::Tensor quant_dequantize(torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros,
                               int64_t in_features, int64_t group_size, int64_t bits);
