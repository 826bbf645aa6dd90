// A decode step of a Llama-family model driven from C++, for CPU decode-only steps.
//
// The Python forward of a 30-layer model makes ~300 calls per step (norms, projections, rotary,
// cache write, attention, activation), each paying ~5-10 us of module dispatch, tensor checks and
// environment lookups: at batch 1 that is several milliseconds beside ~10 ms of weight streaming.
// This loop calls the very kernels the Python path calls (add_rms_norm, quant_linear, the oneDNN
// prepacked linear, rotary_inplace, paged decode attention), in the same order and dtypes, and
// write_kv copies the rows index_copy_ copies there, so its output is bit-identical to the Python
// forward; only the interpreter is gone.
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

torch::Tensor linear(const LinearSpec& spec, const torch::Tensor& x) {
  if (spec.kind == "quantized")
    return quant_linear(x.contiguous(), spec.codes, spec.scales, spec.zeros, spec.group_size, spec.bits,
                        spec.scale_unit, spec.bias);
  if (spec.kind == "packed") return packed_linear(x, spec.weight, spec.bias);
  if (spec.kind == "panels") return dense_panel_linear(x, spec.weight, spec.bias);
  return at::linear(x, spec.weight, spec.bias);
}

void check_linear(const LinearSpec& spec, const char* name) {
  TORCH_CHECK(spec.kind == "quantized" || spec.kind == "packed" || spec.kind == "panels" || spec.kind == "dense",
              name, ": linear kind must be quantized, packed, panels or dense, got ", spec.kind);
  TORCH_CHECK(spec.kind == "quantized" ? spec.codes.defined() : spec.weight.defined(), name, ": weights missing");
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
  for (const auto& layer : layers_) {
    check_linear(layer.qkv, "qkv_proj");
    check_linear(layer.o, "o_proj");
    check_linear(layer.gate_up, "gate_up_proj");
    check_linear(layer.down, "down_proj");
    TORCH_CHECK(layer.kv_cache.dim() == 5 && layer.kv_cache.size(0) == 2, "kv_cache must be (2, blocks, bs, nkv, d)");
    key_caches_.push_back(layer.kv_cache.select(0, 0));  // (blocks, bs, nkv, d)
    value_caches_.push_back(layer.kv_cache.select(0, 1));
  }
}

// Layer `index`'s attention for qkv (M, (nh + 2 nkv) d): the new K/V rows written to the cache, then
// each row's query is read in place from its qkv row (the float cache's K/V rows too) -> (M, nh d).
torch::Tensor DecodeStep::attend(size_t index, const torch::Tensor& qkv, const torch::Tensor& slot_mapping,
                                 const torch::Tensor& block_tables, const torch::Tensor& seq_lens) const {
  const int64_t M = qkv.size(0);
  const auto heads = qkv.view({M, num_heads_ + 2 * num_kv_heads_, head_dim_});
  const auto q = heads.narrow(1, 0, num_heads_);
  const auto k = heads.narrow(1, num_heads_, num_kv_heads_);
  const auto v = heads.narrow(1, num_heads_ + num_kv_heads_, num_kv_heads_);
  const auto& key_cache = key_caches_[index];
  const auto& value_cache = value_caches_[index];
  const auto& kv_scales = layers_[index].kv_scales;
  if (kv_scales.defined()) {  // int8: quantize-and-write, then read codes and scales in place
    const auto key_scales = kv_scales.select(0, 0), value_scales = kv_scales.select(0, 1);
    write_kv_int8(k, v, key_cache, value_cache, key_scales, value_scales, slot_mapping);
    return paged_decode_attention_int8(q, key_cache, value_cache, key_scales, value_scales, block_tables, seq_lens,
                                       scale_).view({M, -1});
  }
  write_kv(k, v, key_cache, value_cache, slot_mapping);
  return paged_decode_attention(q, key_cache, value_cache, block_tables, seq_lens, scale_).view({M, -1});
}

std::tuple<torch::Tensor, c10::optional<torch::Tensor>> DecodeStep::forward(
    torch::Tensor input_ids, torch::Tensor positions, torch::Tensor slot_mapping, torch::Tensor block_tables,
    torch::Tensor seq_lens) const {
  TORCH_CHECK(input_ids.dim() == 1 && positions.size(0) == input_ids.size(0) && seq_lens.size(0) == input_ids.size(0),
              "input_ids must be (M,) with one position, slot and sequence length per row");
  const auto embedded = at::embedding(embedding_, input_ids);  // (M, H), as F.embedding
  const auto dtype = embedded.scalar_type();
  auto residual = embedded.to(at::kFloat);  // (M, H) the float32 residual stream, updated in place
  c10::optional<torch::Tensor> hidden;      // the previous block's output, not yet added to the residual
  block_tables = block_tables.contiguous();  // once for all layers
  seq_lens = seq_lens.contiguous();
  slot_mapping = slot_mapping.contiguous();
  for (size_t i = 0; i < layers_.size(); ++i) {
    const auto& layer = layers_[i];
    const auto h = add_rms_norm(residual, hidden, layer.input_norm, eps_, dtype);
    const auto qkv = linear(layer.qkv, h);  // (M, (nh + 2 nkv) d)
    rotary_inplace(qkv, positions, cos_, sin_, num_heads_ + num_kv_heads_, head_dim_);
    const auto attn = attend(i, qkv, slot_mapping, block_tables, seq_lens);  // (M, nh d)
    const auto h2 = add_rms_norm(residual, linear(layer.o, attn), layer.post_attention_norm, eps_, dtype);
    hidden = linear(layer.down, silu_and_mul(linear(layer.gate_up, h2)));  // (M, H)
  }
  auto out = add_rms_norm(residual, hidden, final_norm_, eps_, dtype);  // (M, H)
  if (head_.kind.empty()) return {out, c10::nullopt};
  return {out, linear(head_, out)};  // (M, V): every row is a request's last token
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
      .def("forward", &DecodeStep::forward, py::call_guard<py::gil_scoped_release>());
}
