// A whole decode step of a Llama-family model, driven from C++ (see decode_step.cpp).
#pragma once
#include <torch/extension.h>
#include <string>
#include <vector>
#include "quant_weight.h"

// One linear layer as its linear method holds it: "dense" (weight (N, K)), "packed" (a oneDNN-prepacked
// weight), "panels" (weight in dense_panels.cpp's layout) or "quantized" (codes, scales, zeros and
// scale_unit as QuantizedMatrix stores them).
struct LinearSpec {
  std::string kind;
  torch::Tensor weight;
  c10::optional<torch::Tensor> bias;
  torch::Tensor codes, scales, zeros;
  int64_t group_size = 0, bits = 0;
  double scale_unit = 1.0;
  // Filled by DecodeStep: whether the product can be written into a given buffer (panels), and the
  // quantized codes' checked view.
  bool writes_into = false;
  tokenmill_quant::QuantWeight quant_view{};
};

struct DecodeLayer {
  torch::Tensor input_norm, post_attention_norm;  // (H,) float32
  LinearSpec qkv, o, gate_up, down;
  torch::Tensor kv_cache;   // float (2, blocks, block_size, nkv, d), or the int8 cache's codes
  torch::Tensor kv_scales;  // the int8 cache's (2, blocks, block_size, nkv) float16 scales; undefined otherwise
};

// Not reentrant: one step at a time (the engine's runner steps sequentially). A step's intermediate
// activations live in buffers kept between steps (reallocated when the batch size changes), so the ~10
// allocations per layer that the Python ops make are gone (but for the products of "packed" and "dense"
// weights); the two outputs are fresh tensors.
class DecodeStep {
 public:
  // embedding (V, H); head: the LM head, or kind "" where the model's own compute_logits must run.
  DecodeStep(std::vector<DecodeLayer> layers, torch::Tensor final_norm, torch::Tensor cos, torch::Tensor sin,
             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
             torch::Tensor embedding, LinearSpec head);
  // input_ids, positions, slot_mapping (M,) int64, block_tables (M, W) int64, seq_lens (M,) int64 ->
  // (final-normed hidden (M, H), logits (M, V) or None without a head, both in the model's dtype; each row's
  // greedy token (M,) int64 as greedy_argmax gives it, or None without a head).
  std::tuple<torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>> forward(
      torch::Tensor input_ids, torch::Tensor positions, torch::Tensor slot_mapping, torch::Tensor block_tables,
      torch::Tensor seq_lens) const;
  // num_steps greedy decode steps in one call (multi-step scheduling): step s runs at positions + s, its
  // input being step s - 1's greedy tokens (step 0's: input_ids), its K/V written at the slots block_tables
  // gives those positions (they must already be allocated) -> the tokens (num_steps, M) int64, row s
  // bit-identical to what forward's greedy tokens would be, step after step. Needs the LM head.
  torch::Tensor forward_steps(torch::Tensor input_ids, torch::Tensor positions, torch::Tensor block_tables,
                              torch::Tensor seq_lens, int64_t num_steps) const;

 private:
  // The step's buffers, one per intermediate activation (the layers share them).
  enum Slot { kNormed, kQkv, kAttention, kAttentionOut, kGateUp, kActivation, kDown, kNumSlots };
  torch::Tensor& buffer(Slot slot, int64_t rows, int64_t cols, at::ScalarType dtype) const;
  const torch::Tensor& linear(const LinearSpec& spec, const torch::Tensor& x, Slot slot) const;
  const torch::Tensor& attend(size_t index, const torch::Tensor& qkv, const torch::Tensor& slot_mapping,
                              const torch::Tensor& block_tables, const torch::Tensor& seq_lens) const;
  mutable torch::Tensor buffers_[kNumSlots];
  std::vector<DecodeLayer> layers_;
  std::vector<torch::Tensor> key_caches_, value_caches_;  // each layer's kv_cache[0] and [1], viewed once
  std::vector<torch::Tensor> key_scales_, value_scales_;  // the int8 cache's kv_scales[0] and [1]; undefined otherwise
  torch::Tensor final_norm_, cos_, sin_, embedding_;
  LinearSpec head_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
};

void bind_decode_step(pybind11::module& m);
