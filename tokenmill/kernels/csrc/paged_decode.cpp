// Paged decode attention on CPU: one query token per request, K/V read in place from the block
// pool through each request's block table (no gathered copy of the context).
//
// Work is split over chunks of each request's context (below); each chunk is scored for all heads (the
// GROUP query heads of a KV head share its keys), exponentiated in float32 against the chunk's maximum,
// and the weighted values are accumulated; the chunks are then merged as in FlashDecoding.
// HEAD_DIM and GROUP are compile-time constants for the common shapes (the loops unroll and the
// accumulators stay in registers); other shapes use the generic instantiation (0 = runtime).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#include "attention_simd.h"
#include "cpu_ops.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

// Whether q . k runs in bf16: bf16 keys (then q is bf16 too) on CPUs with AVX512-BF16, where the
// query meets the keys in vdpbf16ps: products of bf16 values are exact in float32, sums are float32.
template <typename cache_t, int HEAD_DIM>
constexpr bool dots_in_bf16() {
#if defined(__AVX512BF16__)
  return std::is_same_v<cache_t, at::BFloat16> && HEAD_DIM > 0 && HEAD_DIM % 32 == 0;
#else
  return false;
#endif
}

// q . k for one head: the query as float32 (q) or, when dots_in_bf16, as the model's bf16 (q_bf16).
template <typename cache_t, int HEAD_DIM>
static inline float dot_qk(const float* q, const at::BFloat16* q_bf16, const cache_t* k, int64_t head_dim) {
#if defined(__AVX512BF16__)
  if constexpr (dots_in_bf16<cache_t, HEAD_DIM>()) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < HEAD_DIM; i += 32)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q_bf16 + i), (__m512bh)_mm512_loadu_si512(k + i));
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float dot = 0.f;
  for (int64_t i = 0; i < head_dim; ++i) dot += q[i] * static_cast<float>(k[i]);
  return dot;
}

// A sequence's context is cut into chunks of whole blocks, each scored by one work item (one
// thread): an even number of chunks (one for a context under 2 kMinChunkTokens tokens, at most
// kMaxChunks) whose block counts differ by at most one, so that at batch 1 two threads get the same
// work. The cut depends only on the sequence's length, and the chunks are merged in order, so a
// request's output does not depend on the batch or on the number of threads.
constexpr int64_t kMinChunkTokens = 64, kMaxChunks = 16;

static int64_t num_chunks(int64_t len, int64_t block_size) {
  if (len <= 0) return 0;  // an empty context: no chunk, zeros out
  const int64_t blocks = (len + block_size - 1) / block_size;
  const int64_t min_blocks = (kMinChunkTokens + block_size - 1) / block_size;
  const int64_t chunks = std::min(kMaxChunks, std::max<int64_t>(1, blocks / min_blocks));
  return chunks > 1 ? chunks - chunks % 2 : 1;
}

// cache_t is scalar_t, or int8_t for the int8 KV cache, whose rows carry a float16 scale per token
// and KV head (k_scales/v_scales (blocks, block_size, nkv); null for float caches). Sequence s's query
// heads start at q + s * q_stride (a fused qkv row is read in place).
template <typename scalar_t, typename cache_t, int HEAD_DIM, int GROUP>
static void decode_kernel(const scalar_t* q, int64_t q_stride, const cache_t* key_cache, const cache_t* value_cache,
                          const at::Half* k_scales, const at::Half* v_scales,
                          const int64_t* block_tables, const int64_t* seq_lens, scalar_t* out,
                          int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim_rt,
                          int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : head_dim_rt;
  const int64_t group = GROUP > 0 ? GROUP : num_heads / num_kv_heads;
  const int64_t token_stride = num_kv_heads * head_dim;  // one token's K (or V) row, all KV heads
  const int64_t part_size = head_dim + 2;  // per chunk and head: max score, sum of exp, the chunk's output (d)
  static_assert(!dots_in_bf16<cache_t, HEAD_DIM>() || std::is_same_v<scalar_t, at::BFloat16>,
                "bf16 keys come with bf16 queries");
  // Work items (chunks) of sequence s: [first_item[s], first_item[s + 1]). Kept per calling thread
  // between calls: a fresh allocation of the partial results costs page faults every step.
  // (The worker threads see them through these references: a thread_local named in the lambda
  // would be each worker's own.)
  thread_local std::vector<int64_t> first_item_buffer;
  thread_local std::vector<float> parts_buffer;
  std::vector<int64_t>& first_item = first_item_buffer;
  std::vector<float>& parts = parts_buffer;
  first_item.assign(num_seqs + 1, 0);
  for (int64_t s = 0; s < num_seqs; ++s) first_item[s + 1] = first_item[s] + num_chunks(seq_lens[s], block_size);
  parts.resize(first_item[num_seqs] * num_heads * part_size);  // (items, nh, d + 2)
  // One chunk per work item, all its heads together: every cache line of a token's K/V row that is
  // fetched is used at once.
  at::parallel_for(0, first_item[num_seqs], 1, [&](int64_t begin, int64_t end) {
    // Each thread's own scratch (thread_locals named here are per thread), kept between calls.
    thread_local std::vector<float> query, max_score, scores;
    thread_local std::vector<int64_t> slots;  // the chunk's tokens' cache slots
    query.resize(num_heads * head_dim);
    max_score.resize(num_heads);
    int64_t seq = std::upper_bound(first_item.begin(), first_item.end(), begin) - first_item.begin() - 1;
    int64_t loaded = -1;  // the sequence whose query is in `query`
    for (int64_t item = begin; item < end; ++item) {
      while (item >= first_item[seq + 1]) ++seq;
      // Chunk c of n holds blocks [c B / n, (c + 1) B / n) of the sequence's B.
      const int64_t len = seq_lens[seq], blocks = (len + block_size - 1) / block_size;
      const int64_t c = item - first_item[seq], n = first_item[seq + 1] - first_item[seq];
      const int64_t t0 = c * blocks / n * block_size, n_tokens = std::min((c + 1) * blocks / n * block_size, len) - t0;
      const int64_t* table = block_tables + seq * max_blocks;
      if (!dots_in_bf16<cache_t, HEAD_DIM>() && seq != loaded) {
        for (int64_t j = 0; j < num_heads * head_dim; ++j)
          query[j] = static_cast<float>(q[seq * q_stride + j]);
        loaded = seq;
      }
      const auto* query_bf16 = reinterpret_cast<const at::BFloat16*>(q + seq * q_stride);  // read if bf16
      scores.resize(num_heads * n_tokens);
      slots.resize(n_tokens);
      for (int64_t start = 0; start < n_tokens; start += block_size) {
        const int64_t first_slot = table[(t0 + start) / block_size] * block_size;
        for (int64_t j = 0; j < std::min(block_size, n_tokens - start); ++j) slots[start + j] = first_slot + j;
      }
      std::fill(max_score.begin(), max_score.end(), -INFINITY);
      int64_t scored = 0;  // tokens scored 16 at a time; the rest one by one
#if defined(TOKENMILL_AVX512) && defined(__AVX512BF16__)
      if constexpr (dots_in_bf16<cache_t, HEAD_DIM>() && GROUP > 0) {
        // 16 tokens at a time, read in address order: each (token, head) product vector is parked in L1,
        // then each head's 16 are summed side by side (the bits of dot_qk's products and sums).
        thread_local std::vector<__m512> parked_buffer;
        std::vector<__m512>& parked = parked_buffer;  // (nh, 16)
        parked.resize(num_heads * 16);
        for (; scored + 16 <= n_tokens; scored += 16) {
          for (int u = 0; u < 16; ++u) {
            const cache_t* row = key_cache + slots[scored + u] * token_stride;
            for (int64_t h = 0; h < num_kv_heads; ++h) {
              __m512bh k[HEAD_DIM / 32];
              for (int i = 0; i < HEAD_DIM / 32; ++i) k[i] = (__m512bh)_mm512_loadu_si512(row + h * HEAD_DIM + 32 * i);
              for (int g = 0; g < GROUP; ++g) {
                const at::BFloat16* q_head = query_bf16 + (h * GROUP + g) * HEAD_DIM;
                __m512 acc = _mm512_setzero_ps();
                for (int i = 0; i < HEAD_DIM / 32; ++i)
                  acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q_head + 32 * i), k[i]);
                parked[(h * GROUP + g) * 16 + u] = acc;
              }
            }
          }
          for (int64_t head = 0; head < num_heads; ++head) {
            __m512 dots[16];
            for (int u = 0; u < 16; ++u) dots[u] = parked[head * 16 + u];
            const __m512 dot = _mm512_mul_ps(tokenmill_attention::sum16(dots), _mm512_set1_ps(scale));
            _mm512_storeu_ps(scores.data() + head * n_tokens + scored, dot);
            max_score[head] = std::max(max_score[head], _mm512_reduce_max_ps(dot));
          }
        }
      }
#endif
      for (int64_t t = scored; t < n_tokens; ++t)
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          const cache_t* k = key_cache + slots[t] * token_stride + h * head_dim;
          const float k_scale = k_scales ? scale * static_cast<float>(k_scales[slots[t] * num_kv_heads + h]) : scale;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t head = h * group + g;
            const float dot = dot_qk<cache_t, HEAD_DIM>(query.data() + head * head_dim,
                                                        query_bf16 + head * head_dim, k, head_dim) * k_scale;
            scores[head * n_tokens + t] = dot;
            max_score[head] = std::max(max_score[head], dot);
          }
        }
      float* part = parts.data() + item * num_heads * part_size;
      for (int64_t head = 0; head < num_heads; ++head) {
        float* s = scores.data() + head * n_tokens;
        float total = 0.f;
        for (int64_t t = 0; t < n_tokens; ++t) { s[t] = std::exp(s[t] - max_score[head]); total += s[t]; }
        const float inv = 1.f / total;  // the chunk's own softmax: one chunk alone is the whole answer
        for (int64_t t = 0; t < n_tokens; ++t) s[t] *= inv;
        part[head * part_size] = max_score[head];
        part[head * part_size + 1] = total;
      }
#if defined(TOKENMILL_SIMD16)
      if constexpr (tokenmill_attention::values_in_registers<cache_t>(HEAD_DIM, GROUP)) {
        // Windows of 16 tokens (their rows stay in L1), each visited one KV head at a time.
        for (int64_t w = 0; w < n_tokens; w += 16) {
          const int64_t w_end = std::min(n_tokens, w + 16);
          for (int64_t h = 0; h < num_kv_heads; ++h) {
            const auto row = [&](int64_t t, float& v_scale) {
              v_scale = v_scales ? static_cast<float>(v_scales[slots[t] * num_kv_heads + h]) : 1.f;
              return value_cache + slots[t] * token_stride + h * HEAD_DIM;
            };
            tokenmill_attention::accumulate_values<HEAD_DIM, GROUP, cache_t>(
                w, w_end, w == 0, row, scores.data() + h * GROUP * n_tokens, n_tokens, part + h * GROUP * part_size + 2,
                part_size);
          }
        }
        continue;
      }
#endif
      for (int64_t head = 0; head < num_heads; ++head) std::fill_n(part + head * part_size + 2, head_dim, 0.f);
      for (int64_t t = 0; t < n_tokens; ++t)
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          const cache_t* v = value_cache + slots[t] * token_stride + h * head_dim;
          const float v_scale = v_scales ? static_cast<float>(v_scales[slots[t] * num_kv_heads + h]) : 1.f;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t head = h * group + g;
            const float p = scores[head * n_tokens + t] * v_scale;
            float* __restrict__ a = part + head * part_size + 2;
            for (int64_t i = 0; i < head_dim; ++i) a[i] += p * static_cast<float>(v[i]);
          }
        }
    }
  });
  // Merge each sequence's chunks in order: out = sum_c (w_c / W) out_c with w_c = l_c e^(m_c - m), W = sum_c w_c.
  // A single chunk has weight exactly 1: short contexts get the bits of one softmax over them.
  at::parallel_for(0, num_seqs, 16, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> acc, weights;
    acc.resize(head_dim);
    for (int64_t seq = begin; seq < end; ++seq)
      for (int64_t head = 0; head < num_heads; ++head) {
        const int64_t first = first_item[seq], count = first_item[seq + 1] - first;
        float m = -INFINITY, total = 0.f;
        for (int64_t c = 0; c < count; ++c) m = std::max(m, parts[((first + c) * num_heads + head) * part_size]);
        weights.resize(count);
        for (int64_t c = 0; c < count; ++c) {
          const float* part = parts.data() + ((first + c) * num_heads + head) * part_size;
          weights[c] = part[1] * std::exp(part[0] - m);
          total += weights[c];
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t c = 0; c < count; ++c) {  // an empty context (no chunks) gives zeros
          const float* part = parts.data() + ((first + c) * num_heads + head) * part_size;
          const float weight = weights[c] / total;
          for (int64_t i = 0; i < head_dim; ++i) acc[i] += weight * part[2 + i];
        }
        scalar_t* o = out + (seq * num_heads + head) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) o[i] = static_cast<scalar_t>(acc[i]);
      }
  });
}

template <typename scalar_t, typename cache_t>
static void dispatch(const scalar_t* q, int64_t q_stride, const cache_t* kc, const cache_t* vc, const at::Half* ks,
                     const at::Half* vs, const int64_t* bt, const int64_t* sl, scalar_t* out, int64_t D, int64_t nh,
                     int64_t nkv, int64_t d, int64_t bs, int64_t W, float scale) {
  const int64_t g = nh / nkv;
#define TM_CASE(HD, G)                                                                                         \
  if (d == HD && g == G)                                                                                       \
    return decode_kernel<scalar_t, cache_t, HD, G>(q, q_stride, kc, vc, ks, vs, bt, sl, out, D, nh, nkv, d, bs, W, \
                                                   scale);
  TM_CASE(64, 1) TM_CASE(64, 2) TM_CASE(64, 3) TM_CASE(64, 4) TM_CASE(64, 8)
  TM_CASE(128, 1) TM_CASE(128, 2) TM_CASE(128, 4) TM_CASE(128, 8)
#undef TM_CASE
  decode_kernel<scalar_t, cache_t, 0, 0>(q, q_stride, kc, vc, ks, vs, bt, sl, out, D, nh, nkv, d, bs, W, scale);
}

// q with each row's heads packed (the q part of a fused qkv row is read in place), else a contiguous copy.
static torch::Tensor packed_heads(const torch::Tensor& q) {
  return q.stride(2) == 1 && q.stride(1) == q.size(2) ? q : q.contiguous();
}

// q (D, nh, d), rows may sit apart; key_cache/value_cache (num_blocks, block_size, nkv, d); block_tables
// (D, W) int64; seq_lens (D,) int64 -> out (D, nh, d).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor key_cache, torch::Tensor value_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 4, "q must be (D, nh, d) and the caches (blocks, bs, nkv, d)");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == key_cache.scalar_type(), "q and the KV cache must have one dtype");
  q = packed_heads(q);
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());  // (D, nh, d) contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    dispatch<scalar_t, scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), key_cache.data_ptr<scalar_t>(),
                       value_cache.data_ptr<scalar_t>(), nullptr, nullptr,
                       block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                       q.size(0), q.size(1), key_cache.size(2), q.size(2), key_cache.size(1), block_tables.size(1),
                       static_cast<float>(scale));
  });
  return out;
}

// The int8 KV cache: codes (num_blocks, block_size, nkv, d) int8 and scales (num_blocks, block_size, nkv)
// float16 for K and for V; q (D, nh, d) in the model's dtype -> out (D, nh, d).
torch::Tensor paged_decode_attention_int8(torch::Tensor q, torch::Tensor key_codes, torch::Tensor value_codes,
                                          torch::Tensor key_scales, torch::Tensor value_scales,
                                          torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && key_codes.dim() == 4 && key_scales.dim() == 3, "bad shapes for the int8 KV cache");
  TORCH_CHECK(key_codes.scalar_type() == at::kChar && key_scales.scalar_type() == at::kHalf,
              "int8 KV cache: codes must be int8 and scales float16");
  for (const auto* t : {&key_codes, &value_codes, &key_scales, &value_scales})
    TORCH_CHECK(t->is_contiguous(), "int8 KV cache tensors must be contiguous");
  q = packed_heads(q);
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());  // (D, nh, d) contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention_int8", [&] {
    dispatch<scalar_t, int8_t>(q.data_ptr<scalar_t>(), q.stride(0), key_codes.data_ptr<int8_t>(),
                               value_codes.data_ptr<int8_t>(), key_scales.data_ptr<at::Half>(),
                               value_scales.data_ptr<at::Half>(),
                               block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                               q.size(0), q.size(1), key_codes.size(2), q.size(2), key_codes.size(1),
                               block_tables.size(1), static_cast<float>(scale));
  });
  return out;
}

// The float8 e4m3 KV cache: bytes (num_blocks, block_size, nkv, d) uint8 for K and for V, one scale
// each; q (D, nh, d) in the model's dtype -> out (D, nh, d).
torch::Tensor paged_decode_attention_fp8(torch::Tensor q, torch::Tensor key_bytes, torch::Tensor value_bytes,
                                         double k_scale, double v_scale, torch::Tensor block_tables,
                                         torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && key_bytes.dim() == 4, "bad shapes for the fp8 KV cache");
  TORCH_CHECK(key_bytes.scalar_type() == at::kByte && value_bytes.scalar_type() == at::kByte,
              "fp8 KV cache: bytes must be uint8");
  TORCH_CHECK(key_bytes.is_contiguous() && value_bytes.is_contiguous(), "fp8 KV cache tensors must be contiguous");
  q = packed_heads(q);
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());  // (D, nh, d) contiguous
  const auto* keys = reinterpret_cast<const c10::Float8_e4m3fn*>(key_bytes.data_ptr<uint8_t>());
  const auto* values = reinterpret_cast<const c10::Float8_e4m3fn*>(value_bytes.data_ptr<uint8_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention_fp8", [&] {
    dispatch<scalar_t, c10::Float8_e4m3fn>(q.data_ptr<scalar_t>(), q.stride(0), keys, values, nullptr, nullptr,
                                           block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                                           out.data_ptr<scalar_t>(), q.size(0), q.size(1), key_bytes.size(2),
                                           q.size(2), key_bytes.size(1), block_tables.size(1),
                                           static_cast<float>(scale * k_scale));
  });
  if (v_scale != 1.0) out.mul_(v_scale);
  return out;
}

// The C++ decode step's attention, allocating nothing: qkv (M, (nh + 2 nkv) d) contiguous holds each token's
// query, key and value heads; its keys and values are written to their slots (as write_kv, or as
// write_kv_int8 when key_scales/value_scales (blocks, bs, nkv) are given for an int8 cache), then out
// (M, nh d) contiguous gets paged_decode_attention (or _int8) of its queries, read in place.
void paged_decode_attention_from_qkv(const torch::Tensor& qkv, int64_t num_heads, const torch::Tensor& key_cache,
                                     const torch::Tensor& value_cache, const torch::Tensor& key_scales,
                                     const torch::Tensor& value_scales, const torch::Tensor& slot_mapping,
                                     const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale,
                                     torch::Tensor& out) {
  const bool int8 = key_scales.defined();
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  value_cache.sizes() == key_cache.sizes(), "KV caches must be contiguous (blocks, bs, nkv, d)");
  const int64_t M = qkv.size(0), nkv = key_cache.size(2), d = key_cache.size(3);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (num_heads + 2 * nkv) * d,
              "qkv must be contiguous (M, (nh + 2 nkv) d)");
  const auto cache_dtype = int8 ? at::kChar : qkv.scalar_type();
  TORCH_CHECK(key_cache.scalar_type() == cache_dtype && value_cache.scalar_type() == cache_dtype,
              "the KV cache must hold qkv's dtype, or int8 codes with scales");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == qkv.scalar_type() && out.numel() == M * num_heads * d,
              "attention out must be contiguous (M, nh d) in qkv's dtype");
  TORCH_CHECK(slot_mapping.is_contiguous() && block_tables.is_contiguous() && seq_lens.is_contiguous() &&
                  slot_mapping.numel() == M && seq_lens.numel() == M && block_tables.size(0) == M,
              "slot_mapping, seq_lens (M,) and block_tables (M, W) must be contiguous int64");
  if (int8) {
    write_kv_int8_from_qkv(qkv, num_heads, key_cache, value_cache, key_scales, value_scales, slot_mapping);
  } else {
    const int64_t row_bytes = nkv * d * qkv.element_size(), stride = qkv.size(1) * qkv.element_size();
    const char* rows = static_cast<const char*>(qkv.data_ptr());
    copy_kv_rows(rows + num_heads * d * qkv.element_size(), stride, rows + (num_heads + nkv) * d * qkv.element_size(),
                 stride, row_bytes, M, slot_mapping.data_ptr<int64_t>(), key_cache.size(0) * key_cache.size(1),
                 static_cast<char*>(key_cache.data_ptr()), static_cast<char*>(value_cache.data_ptr()));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "paged_decode_attention_from_qkv", [&] {
    const auto run = [&](const auto* keys, const auto* values, const at::Half* ks, const at::Half* vs) {
      using cache_t = std::remove_const_t<std::remove_pointer_t<decltype(keys)>>;
      dispatch<scalar_t, cache_t>(qkv.data_ptr<scalar_t>(), qkv.size(1), keys, values, ks, vs,
                                  block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                                  out.data_ptr<scalar_t>(), M, num_heads, nkv, d, key_cache.size(1),
                                  block_tables.size(1), static_cast<float>(scale));
    };
    if (int8)
      run(key_cache.data_ptr<int8_t>(), value_cache.data_ptr<int8_t>(), key_scales.data_ptr<at::Half>(),
          value_scales.data_ptr<at::Half>());
    else
      run(key_cache.data_ptr<scalar_t>(), value_cache.data_ptr<scalar_t>(), nullptr, nullptr);
  });
}
