// Paged decode attention on CPU: one query token per request, K/V read in place from the block
// pool through each request's block table (no gathered copy of the context).
//
// Work is split over (request, KV head) pairs; each pair scores its context for the GROUP query
// heads that share the KV head, takes a softmax in float32, and accumulates the weighted values.
// HEAD_DIM and GROUP are compile-time constants for the common shapes (the loops unroll and the
// accumulators stay in registers); other shapes use the generic instantiation (0 = runtime).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

template <typename scalar_t, int HEAD_DIM, int GROUP>
static void decode_kernel(const scalar_t* q, const scalar_t* key_cache, const scalar_t* value_cache,
                          const int64_t* block_tables, const int64_t* seq_lens, scalar_t* out,
                          int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim_rt,
                          int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : head_dim_rt;
  const int64_t group = GROUP > 0 ? GROUP : num_heads / num_kv_heads;
  const int64_t token_stride = num_kv_heads * head_dim;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * head_dim), acc(group * head_dim), scores;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t seq = work / num_kv_heads, kv_head = work % num_kv_heads;
      const int64_t len = seq_lens[seq];
      const int64_t* table = block_tables + seq * max_blocks;
      scores.resize(group * len);
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < head_dim; ++i)
          query[g * head_dim + i] = static_cast<float>(q[(seq * num_heads + kv_head * group + g) * head_dim + i]) * scale;
      float max_score[GROUP > 0 ? GROUP : 64];
      for (int64_t g = 0; g < group; ++g) max_score[g] = -INFINITY;
      for (int64_t t = 0; t < len; ++t) {
        const scalar_t* k = key_cache + (table[t / block_size] * block_size + t % block_size) * token_stride + kv_head * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = query.data() + g * head_dim;
          float dot = 0.f;
          for (int64_t i = 0; i < head_dim; ++i) dot += qg[i] * static_cast<float>(k[i]);
          scores[g * len + t] = dot;
          max_score[g] = std::max(max_score[g], dot);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        float total = 0.f;
        for (int64_t t = 0; t < len; ++t) { s[t] = std::exp(s[t] - max_score[g]); total += s[t]; }
        const float inv = 1.f / total;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      float* a0 = acc.data();
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const scalar_t* v = value_cache + (table[t / block_size] * block_size + t % block_size) * token_stride + kv_head * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + t];
          float* a = a0 + g * head_dim;
          for (int64_t i = 0; i < head_dim; ++i) a[i] += p * static_cast<float>(v[i]);
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < head_dim; ++i)
          out[(seq * num_heads + kv_head * group + g) * head_dim + i] = static_cast<scalar_t>(a0[g * head_dim + i]);
    }
  });
}

template <typename scalar_t>
static void dispatch(const scalar_t* q, const scalar_t* kc, const scalar_t* vc, const int64_t* bt, const int64_t* sl,
                     scalar_t* out, int64_t D, int64_t nh, int64_t nkv, int64_t d, int64_t bs, int64_t W, float scale) {
  const int64_t g = nh / nkv;
#define TM_CASE(HD, G) \
  if (d == HD && g == G) return decode_kernel<scalar_t, HD, G>(q, kc, vc, bt, sl, out, D, nh, nkv, d, bs, W, scale);
  TM_CASE(64, 1) TM_CASE(64, 2) TM_CASE(64, 3) TM_CASE(64, 4) TM_CASE(64, 8)
  TM_CASE(128, 1) TM_CASE(128, 2) TM_CASE(128, 4) TM_CASE(128, 8)
#undef TM_CASE
  TORCH_CHECK(g <= 64, "at most 64 query heads per KV head");
  decode_kernel<scalar_t, 0, 0>(q, kc, vc, bt, sl, out, D, nh, nkv, d, bs, W, scale);
}

// q (D, nh, d); key_cache/value_cache (num_blocks, block_size, nkv, d); block_tables (D, W) int64;
// seq_lens (D,) int64 -> out (D, nh, d).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor key_cache, torch::Tensor value_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 4, "q must be (D, nh, d) and the caches (blocks, bs, nkv, d)");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == key_cache.scalar_type(), "q and the KV cache must have one dtype");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    dispatch<scalar_t>(q.data_ptr<scalar_t>(), key_cache.data_ptr<scalar_t>(), value_cache.data_ptr<scalar_t>(),
                       block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                       q.size(0), q.size(1), key_cache.size(2), q.size(2), key_cache.size(1), block_tables.size(1),
                       static_cast<float>(scale));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
}
