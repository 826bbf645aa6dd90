// Writes of a step's new keys and values into the paged CPU KV cache (float rows copied, int8 rows
// quantized), for the Python attention backends and the C++ decode step.
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include "cpu_ops.h"

void copy_kv_rows(const char* k, int64_t k_stride, const char* v, int64_t v_stride, int64_t row_bytes, int64_t T,
                  const int64_t* slot, int64_t num_slots, char* keys, char* values) {
  for (int64_t t = 0; t < T; ++t) {
    if (slot[t] < 0) continue;
    TORCH_CHECK(slot[t] < num_slots, "write_kv: slot ", slot[t], " is past the cache's ", num_slots, " slots");
    std::memcpy(keys + slot[t] * row_bytes, k + t * k_stride, row_bytes);
    std::memcpy(values + slot[t] * row_bytes, v + t * v_stride, row_bytes);
  }
}

// The float KV cache's write: each new token's K and V rows (all KV heads) copied to its slot in
// key_cache/value_cache (blocks, bs, nkv, d); slots < 0 (padding) are skipped. What index_copy_ does,
// without its per-call dispatch and checks.
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor key_cache, torch::Tensor value_cache,
              torch::Tensor slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && key_cache.dim() == 4 && k.scalar_type() == key_cache.scalar_type() &&
                  v.scalar_type() == value_cache.scalar_type() &&
                  k.size(1) * k.size(2) == key_cache.size(2) * key_cache.size(3),
              "write_kv: k, v (T, nkv, d) and caches (blocks, bs, nkv, d) of one dtype expected");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "KV caches must be contiguous");
  // Rows may sit apart (k and v are slices of the fused qkv output); each row's heads must be packed.
  const auto packed_rows = [](const torch::Tensor& x) {
    return x.stride(2) == 1 && x.stride(1) == x.size(2) ? x : x.contiguous();
  };
  k = packed_rows(k);
  v = packed_rows(v);
  slot_mapping = slot_mapping.contiguous();
  const int64_t row_bytes = k.size(1) * k.size(2) * k.element_size();
  copy_kv_rows(static_cast<const char*>(k.data_ptr()), k.stride(0) * k.element_size(),
               static_cast<const char*>(v.data_ptr()), v.stride(0) * v.element_size(), row_bytes, k.size(0),
               slot_mapping.data_ptr<int64_t>(), key_cache.size(0) * key_cache.size(1),
               static_cast<char*>(key_cache.data_ptr()), static_cast<char*>(value_cache.data_ptr()));
}

// Quantizes T rows of nkv heads x d values (row t at src + t * stride) into codes (num_slots, nkv, d) and
// float16 scales (num_slots, nkv) at each row's slot: per head, scale = max|x| / 127 rounded to float16 (at
// least 2^-14), codes rounded half to even. Slots < 0 (padding) are skipped.
template <typename scalar_t>
static void quantize_kv_rows(const scalar_t* src, int64_t stride, int64_t T, int64_t nkv, int64_t d,
                             const int64_t* slots, int64_t num_slots, int8_t* codes, at::Half* scales) {
  for (int64_t t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    TORCH_CHECK(slots[t] < num_slots, "write_kv_int8: slot ", slots[t], " is past the cache's ", num_slots, " slots");
    for (int64_t h = 0; h < nkv; ++h) {
      const scalar_t* x = src + t * stride + h * d;
      float amax = 0.f;
      for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(static_cast<float>(x[i])));
      const at::Half stored = static_cast<at::Half>(std::max(amax / 127.f, 6.103515625e-05f));
      const float scale = static_cast<float>(stored);
      int8_t* out = codes + (slots[t] * nkv + h) * d;
      for (int64_t i = 0; i < d; ++i)
        out[i] = static_cast<int8_t>(
            std::max(-127.f, std::min(127.f, std::nearbyint(static_cast<float>(x[i]) / scale))));
      scales[slots[t] * nkv + h] = stored;
    }
  }
}

static void check_int8_cache(const torch::Tensor& key_codes, const torch::Tensor& value_codes,
                             const torch::Tensor& key_scales, const torch::Tensor& value_scales) {
  TORCH_CHECK(key_codes.scalar_type() == at::kChar && value_codes.scalar_type() == at::kChar &&
                  key_scales.scalar_type() == at::kHalf && value_scales.scalar_type() == at::kHalf,
              "write_kv_int8: int8 codes and float16 scales expected");
  for (const auto* t : {&key_codes, &value_codes, &key_scales, &value_scales})
    TORCH_CHECK(t->is_contiguous(), "int8 KV cache tensors must be contiguous");
}

// The int8 KV cache's write: each new token's K and V rows, per KV head, into codes (blocks, bs, nkv, d)
// int8 and scales (blocks, bs, nkv) float16 at slot_mapping (T,). One pass instead of ~20 small tensor ops.
void write_kv_int8(torch::Tensor k, torch::Tensor v, torch::Tensor key_codes, torch::Tensor value_codes,
                   torch::Tensor key_scales, torch::Tensor value_scales, torch::Tensor slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
              "write_kv_int8: k and v (T, nkv, d) of one dtype expected");
  check_int8_cache(key_codes, value_codes, key_scales, value_scales);
  k = k.contiguous();
  v = v.contiguous();
  slot_mapping = slot_mapping.contiguous();
  const int64_t T = k.size(0), nkv = k.size(1), d = k.size(2), num_slots = key_codes.numel() / (nkv * d);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "write_kv_int8", [&] {
    quantize_kv_rows(k.data_ptr<scalar_t>(), nkv * d, T, nkv, d, slots, num_slots, key_codes.data_ptr<int8_t>(),
                     key_scales.data_ptr<at::Half>());
    quantize_kv_rows(v.data_ptr<scalar_t>(), nkv * d, T, nkv, d, slots, num_slots, value_codes.data_ptr<int8_t>(),
                     value_scales.data_ptr<at::Half>());
  });
}

void write_kv_int8_from_qkv(const torch::Tensor& qkv, int64_t num_heads, const torch::Tensor& key_codes,
                            const torch::Tensor& value_codes, const torch::Tensor& key_scales,
                            const torch::Tensor& value_scales, const torch::Tensor& slot_mapping) {
  check_int8_cache(key_codes, value_codes, key_scales, value_scales);
  TORCH_CHECK(key_codes.dim() == 4, "int8 KV codes must be (blocks, bs, nkv, d)");
  const int64_t T = qkv.size(0), nkv = key_codes.size(2), d = key_codes.size(3);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (num_heads + 2 * nkv) * d,
              "write_kv_int8: qkv must be contiguous (T, (nh + 2 nkv) d)");
  TORCH_CHECK(slot_mapping.is_contiguous() && slot_mapping.numel() == T, "slot_mapping must be contiguous (T,)");
  const int64_t num_slots = key_codes.numel() / (nkv * d);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "write_kv_int8_from_qkv", [&] {
    const scalar_t* rows = qkv.data_ptr<scalar_t>();
    quantize_kv_rows(rows + num_heads * d, qkv.size(1), T, nkv, d, slots, num_slots, key_codes.data_ptr<int8_t>(),
                     key_scales.data_ptr<at::Half>());
    quantize_kv_rows(rows + (num_heads + nkv) * d, qkv.size(1), T, nkv, d, slots, num_slots,
                     value_codes.data_ptr<int8_t>(), value_scales.data_ptr<at::Half>());
  });
}
