// A decode step of a Llama-family model driven from C++, for CPU decode-only steps.
//
// The Python forward of a 30-layer model makes ~300 calls per step (norms, projections, rotary,
// cache write, attention, activation), each paying ~5-10 us of module dispatch, tensor checks and
// environment lookups: at batch 1 that is several milliseconds beside ~10 ms of weight streaming.
// This loop calls the very kernels the Python path calls (add_rms_norm, quant_linear, the oneDNN
// prepacked linear, rotary_inplace, paged decode attention), in the same order and dtypes, and
// write_kv copies the rows index_copy_ copies there, so its output is bit-identical to the Python
// forward; only the interpreter is gone. The activations between the kernels stay in buffers kept from
// step to step (the kernels' `_out` forms write into them; oneDNN-packed and plain dense weights, which
// have none, still allocate their products), which took int4 batch-1 decode from 5.52 to
// 4.78 ms per token and bf16 from 10.83 to 10.11 (medians of paired runs, 2026-11-27): a fresh tensor per
// op cost allocator work, page faults and cache lines at every one of the ~300 ops of a step.
#include "decode_step.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include "cpu_ops.h"

namespace {

// oneDNN's prepacked linear (what UnquantizedLinearMethod.apply calls from Python), through the dispatcher.
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, bias.has_value() ? c10::IValue(*bias) : c10::IValue(), c10::IValue("none"),
                          c10::IValue(c10::List<c10::optional<at::Scalar>>()), c10::IValue(std::string(""))};
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

// The allocating product (kinds without an in-place form, and the LM head, whose logits are returned).
torch::Tensor linear(const LinearSpec& spec, const torch::Tensor& x) {
  if (spec.kind == "quantized")
    return quant_linear(x.contiguous(), spec.codes, spec.scales, spec.zeros, spec.group_size, spec.bits,
                        spec.scale_unit, spec.bias);
  if (spec.kind == "packed") return packed_linear(x, spec.weight, spec.bias);
  if (spec.kind == "panels") return dense_panel_linear(x, spec.weight, spec.bias);
  return at::linear(x, spec.weight, spec.bias);
}

// Output width of a product that writes into a buffer.
int64_t out_features(const LinearSpec& spec) {
  return spec.kind == "quantized" ? spec.quant_view.out_features : spec.weight.size(0) * 16;
}

void check_linear(const LinearSpec& spec, const char* name) {
  TORCH_CHECK(spec.kind == "quantized" || spec.kind == "packed" || spec.kind == "panels" || spec.kind == "dense",
              name, ": linear kind must be quantized, packed, panels or dense, got ", spec.kind);
  TORCH_CHECK(spec.kind == "quantized" ? spec.codes.defined() : spec.weight.defined(), name, ": weights missing");
}

// Checks the spec and notes whether its product can write into a buffer (dense or quantized panels).
void prepare_linear(LinearSpec& spec, const char* name) {
  check_linear(spec, name);
  if (spec.kind == "quantized" && spec.codes.dim() == 4 && quant_panels_available()) {
    spec.quant_view = tokenmill_quant::view_weight(spec.codes, spec.scales, spec.zeros,
                                                   spec.codes.size(1) * (spec.bits == 8 ? 4 : 8), spec.group_size,
                                                   spec.bits, spec.scale_unit);
    spec.writes_into = true;
  }
  spec.writes_into = spec.writes_into || spec.kind == "panels";
}

}  // namespace

DecodeStep::DecodeStep(std::vector<DecodeLayer> layers, torch::Tensor final_norm, torch::Tensor cos,
                       torch::Tensor sin, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
                       double scale, torch::Tensor embedding, LinearSpec head)
    : layers_(std::move(layers)), final_norm_(std::move(final_norm)), cos_(std::move(cos)), sin_(std::move(sin)),
      embedding_(std::move(embedding)), head_(std::move(head)), num_heads_(num_heads), num_kv_heads_(num_kv_heads),
      head_dim_(head_dim), eps_(eps), scale_(scale) {
  TORCH_CHECK(!layers_.empty(), "DecodeStep needs at least one layer");
  TORCH_CHECK(embedding_.dim() == 2, "embedding must be (V, H)");
  if (!head_.kind.empty()) check_linear(head_, "lm_head");
  for (auto& layer : layers_) {
    prepare_linear(layer.qkv, "qkv_proj");
    prepare_linear(layer.o, "o_proj");
    prepare_linear(layer.gate_up, "gate_up_proj");
    prepare_linear(layer.down, "down_proj");
    TORCH_CHECK(layer.kv_cache.dim() == 5 && layer.kv_cache.size(0) == 2, "kv_cache must be (2, blocks, bs, nkv, d)");
    key_caches_.push_back(layer.kv_cache.select(0, 0));  // (blocks, bs, nkv, d)
    value_caches_.push_back(layer.kv_cache.select(0, 1));
    const bool int8 = layer.kv_scales.defined();  // (2, blocks, bs, nkv) float16
    key_scales_.push_back(int8 ? layer.kv_scales.select(0, 0) : torch::Tensor());
    value_scales_.push_back(int8 ? layer.kv_scales.select(0, 1) : torch::Tensor());
  }
}

torch::Tensor& DecodeStep::buffer(Slot slot, int64_t rows, int64_t cols, at::ScalarType dtype) const {
  auto& b = buffers_[slot];
  if (!b.defined() || b.size(0) != rows || b.size(1) != cols || b.scalar_type() != dtype)
    b = torch::empty({rows, cols}, torch::TensorOptions().dtype(dtype));
  return b;
}

// x (M, K) -> (M, N) in the slot's buffer (panels), or the allocating product's result kept there.
const torch::Tensor& DecodeStep::linear(const LinearSpec& spec, const torch::Tensor& x, Slot slot) const {
  if (!spec.writes_into) return buffers_[slot] = ::linear(spec, x);
  auto& out = buffer(slot, x.size(0), out_features(spec), x.scalar_type());
  if (spec.kind == "quantized")
    tokenmill_quant::panel_linear_out(x, spec.quant_view, spec.bias, out);
  else
    dense_panel_linear_out(x, spec.weight, spec.bias, out);
  return out;
}

// Layer `index`'s attention for qkv (M, (nh + 2 nkv) d): the new K/V rows written to the cache (int8: quantized),
// then each row's query read in place from its qkv row -> (M, nh d).
const torch::Tensor& DecodeStep::attend(size_t index, const torch::Tensor& qkv, const torch::Tensor& slot_mapping,
                                        const torch::Tensor& block_tables, const torch::Tensor& seq_lens) const {
  auto& out = buffer(kAttention, qkv.size(0), num_heads_ * head_dim_, qkv.scalar_type());
  paged_decode_attention_from_qkv(qkv, num_heads_, key_caches_[index], value_caches_[index], key_scales_[index],
                                  value_scales_[index], slot_mapping, block_tables, seq_lens, scale_, out);
  return out;
}

std::tuple<torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>> DecodeStep::forward(
    torch::Tensor input_ids, torch::Tensor positions, torch::Tensor slot_mapping, torch::Tensor block_tables,
    torch::Tensor seq_lens) const {
  TORCH_CHECK(input_ids.dim() == 1 && positions.size(0) == input_ids.size(0) && seq_lens.size(0) == input_ids.size(0),
              "input_ids must be (M,) with one position, slot and sequence length per row");
  const auto embedded = at::embedding(embedding_, input_ids);  // (M, H), as F.embedding
  const auto dtype = embedded.scalar_type();
  const int64_t M = embedded.size(0), H = embedded.size(1);
  auto residual = embedded.to(at::kFloat);  // (M, H) the float32 residual stream, updated in place
  const torch::Tensor* hidden = nullptr;     // the previous block's output, not yet added to the residual
  block_tables = block_tables.contiguous();  // once for all layers
  seq_lens = seq_lens.contiguous();
  slot_mapping = slot_mapping.contiguous();
  for (size_t i = 0; i < layers_.size(); ++i) {
    const auto& layer = layers_[i];
    auto& h = buffer(kNormed, M, H, dtype);
    add_rms_norm_out(residual, hidden, layer.input_norm, eps_, h);
    const auto& qkv = linear(layer.qkv, h, kQkv);  // (M, (nh + 2 nkv) d)
    rotary_inplace(qkv, positions, cos_, sin_, num_heads_ + num_kv_heads_, head_dim_);
    const auto& attn = attend(i, qkv, slot_mapping, block_tables, seq_lens);  // (M, nh d)
    const auto& attn_out = linear(layer.o, attn, kAttentionOut);  // (M, H)
    add_rms_norm_out(residual, &attn_out, layer.post_attention_norm, eps_, h);
    const auto& gate_up = linear(layer.gate_up, h, kGateUp);  // (M, 2I)
    auto& act = buffer(kActivation, M, gate_up.size(1) / 2, dtype);
    silu_and_mul_out(gate_up, act);
    hidden = &linear(layer.down, act, kDown);  // (M, H)
  }
  auto out = torch::empty({M, H}, embedded.options());  // fresh: returned to the caller
  add_rms_norm_out(residual, hidden, final_norm_, eps_, out);
  if (head_.kind.empty()) return {out, c10::nullopt, c10::nullopt};
  auto logits = ::linear(head_, out);  // (M, V): every row is a request's last token
  // The greedy tokens while the logits are still in cache: a few microseconds here, where the sampler's call
  // after the step paid ~100 us at batch 1, most of it in code the step's weight stream had evicted.
  return {out, logits, greedy_argmax(logits)};
}

torch::Tensor DecodeStep::forward_steps(torch::Tensor input_ids, torch::Tensor positions, torch::Tensor block_tables,
                                        torch::Tensor seq_lens, int64_t num_steps) const {
  TORCH_CHECK(!head_.kind.empty(), "forward_steps needs the LM head in the step (its greedy tokens feed the next)");
  TORCH_CHECK(num_steps >= 1, "num_steps must be at least 1, got ", num_steps);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == input_ids.size(0), "block_tables must be (M, W)");
  const int64_t M = input_ids.size(0), width = block_tables.size(1), block_size = key_caches_[0].size(1);
  const auto options = torch::TensorOptions().dtype(at::kLong);
  block_tables = block_tables.to(at::kLong).contiguous();
  auto ids = input_ids.to(at::kLong).clone();  // (M,): each step's inputs, then its greedy tokens
  auto pos = positions.to(at::kLong).clone(), lens = seq_lens.to(at::kLong).clone(), slots = torch::empty({M}, options);
  auto tokens = torch::empty({num_steps, M}, options);
  const int64_t* table = block_tables.data_ptr<int64_t>();
  int64_t *p = pos.data_ptr<int64_t>(), *len = lens.data_ptr<int64_t>(), *slot = slots.data_ptr<int64_t>();
  for (int64_t s = 0; s < num_steps; ++s) {
    for (int64_t m = 0; m < M; ++m) {
      const int64_t block = p[m] / block_size;
      TORCH_CHECK(p[m] >= 0 && block < width, "row ", m, ": position ", p[m], " is past its ", width,
                  " blocks of ", block_size, " tokens (allocate the slots of every step first)");
      slot[m] = table[m * width + block] * block_size + p[m] % block_size;
    }
    auto stepped = forward(ids, pos, slots, block_tables, lens);
    ids = *std::get<2>(stepped);  // (M,) int64: the next step's inputs
    std::copy_n(ids.data_ptr<int64_t>(), M, tokens.data_ptr<int64_t>() + s * M);
    for (int64_t m = 0; m < M; ++m) ++p[m], ++len[m];
  }
  return tokens;
}

void bind_decode_step(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<LinearSpec>(m, "LinearSpec")
      .def(py::init<>())
      .def_readwrite("kind", &LinearSpec::kind)
      .def_readwrite("weight", &LinearSpec::weight)
      .def_readwrite("bias", &LinearSpec::bias)
      .def_readwrite("codes", &LinearSpec::codes)
      .def_readwrite("scales", &LinearSpec::scales)
      .def_readwrite("zeros", &LinearSpec::zeros)
      .def_readwrite("scale_unit", &LinearSpec::scale_unit)
      .def_readwrite("group_size", &LinearSpec::group_size)
      .def_readwrite("bits", &LinearSpec::bits);
  py::class_<DecodeLayer>(m, "DecodeLayer")
      .def(py::init<>())
      .def_readwrite("input_norm", &DecodeLayer::input_norm)
      .def_readwrite("post_attention_norm", &DecodeLayer::post_attention_norm)
      .def_readwrite("qkv", &DecodeLayer::qkv)
      .def_readwrite("o", &DecodeLayer::o)
      .def_readwrite("gate_up", &DecodeLayer::gate_up)
      .def_readwrite("down", &DecodeLayer::down)
      .def_readwrite("kv_cache", &DecodeLayer::kv_cache)
      .def_readwrite("kv_scales", &DecodeLayer::kv_scales);
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<std::vector<DecodeLayer>, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t,
                    double, double, torch::Tensor, LinearSpec>())
      .def("forward", &DecodeStep::forward, py::call_guard<py::gil_scoped_release>())
      .def("forward_steps", &DecodeStep::forward_steps, py::call_guard<py::gil_scoped_release>());
}
