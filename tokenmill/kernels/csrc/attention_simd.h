// Vector pieces of the CPU decode attention (paged_decode.cpp), for the shapes they unroll:
//   - sum16: the horizontal sums of 16 vectors at once, each equal to the bits _mm512_reduce_add_ps
//     gives for it (the same pairs added in the same order), so that sixteen q . k scores cost ~3
//     shuffles or adds each instead of ~8, and the scores do not change; sums16 is the same on Floats16,
//     for AVX2 too;
//   - score_keys: the q . k scores of a chunk's tokens for float32 queries (every cache type but bf16
//     keys on AVX512-BF16 CPUs, which paged_decode.cpp scores in bf16): each key row is read and converted
//     once for the query heads sharing it, and 16 tokens' dots are summed across lanes at once;
//   - accumulate_values: the probability-weighted sum of a chunk's values for the query heads sharing
//     one KV head, in registers: each value row is read and converted once for all of them, and each
//     output element still adds the tokens' products in token order, one fused multiply-add each.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#include "simd16.h"

namespace tokenmill_attention {

#if defined(TOKENMILL_AVX512)

// sum16(a)[t] == _mm512_reduce_add_ps(a[t]) bit for bit. That reduction adds the upper 256 bits to the
// lower, then the upper 128 of that to the lower, then lanes {2, 3} to {0, 1}, then lane 1 to lane 0;
// here the same additions run for 2, 4, 8 and 16 vectors side by side.
inline __m512 sum16(const __m512 (&a)[16]) {
  __m512 halves[8], quarters[4], pairs[2];
  for (int i = 0; i < 8; ++i)  // [a0 q0 q1 | a1 q0 q1] + [a0 q2 q3 | a1 q2 q3]
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                              _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)));
  for (int i = 0; i < 4; ++i)  // 128-bit lane l: vector 4 i + l's four partial sums
    quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)),
                                _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)));
  for (int i = 0; i < 2; ++i)  // lane l: [s0 + s2, s1 + s3] of vectors 8 i + l and 8 i + 4 + l
    pairs[i] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // Lane l, position p: vector 4 p + l, as (s0 + s2) + (s1 + s3).
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, sums);
}
#endif

#if defined(TOKENMILL_SIMD16)
using tokenmill_simd::Floats16;


// Whether score_keys and accumulate_values take this shape and cache type.
template <typename cache_t>
constexpr bool vector_path(int head_dim, int group) {
  return head_dim > 0 && head_dim % 16 == 0 && group > 0 &&
         (std::is_same_v<cache_t, float> || std::is_same_v<cache_t, at::BFloat16> ||
          std::is_same_v<cache_t, at::Half> || std::is_same_v<cache_t, int8_t>);
}

// Floats16 values the vector registers hold (AVX-512: 32 registers; AVX2: 16 of half the width), less one
// for a broadcast operand.
#if defined(TOKENMILL_AVX512)
constexpr int kRegisterUnits = 31;
#else
constexpr int kRegisterUnits = 7;
#endif

// Lane t of the result: the sum of a[t]'s 16 lanes. AVX-512: sum16, the bits of _mm512_reduce_add_ps;
// AVX2: each vector's two halves added, then its 8 lanes in a tree of horizontal adds, 8 vectors at a time.
inline Floats16 sums16(const Floats16 (&a)[16]) {
#if defined(TOKENMILL_AVX512)
  __m512 v[16];
  for (int t = 0; t < 16; ++t) v[t] = a[t].v;
  return {sum16(v)};
#else
  __m256 out[2];
  for (int half = 0; half < 2; ++half) {
    __m256 s[8];
    for (int t = 0; t < 8; ++t) s[t] = _mm256_add_ps(a[8 * half + t].lo, a[8 * half + t].hi);
    // Lanes [s0 0-3, s1 0-3, s2 0-3, s3 0-3 | s0 4-7, s1 4-7, s2 4-7, s3 4-7], and the same for s4-s7.
    const __m256 first = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
    const __m256 second = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
    out[half] = _mm256_add_ps(_mm256_permute2f128_ps(first, second, 0x20), _mm256_permute2f128_ps(first, second, 0x31));
  }
  return {out[0], out[1]};
#endif
}

// For the chunk's tokens t in [0, n_tokens) and each query head (h GROUP + g, sharing KV head h):
//   scores[(h GROUP + g) stride + t] = key_scale(t, h) * (query of that head) . (key row of t for h),
// and max_score[head] = max(max_score[head], those scores). query: the float32 query heads (nh, HEAD_DIM);
// key_row(t, h) gives the row (HEAD_DIM values of cache_t). Each dot adds its products lane-wise along the
// head's dims in order, then its 16 lanes (sums16), the same way for every token and batch. Tokens are read in
// address order (all KV heads of one, then the next), each row converted once for its GROUP query heads, and
// 16 tokens' dots are summed across lanes together.
template <int HEAD_DIM, int GROUP, typename cache_t, typename KeyFn, typename ScaleFn>
inline void score_keys(int64_t n_tokens, int64_t num_kv_heads, const KeyFn& key_row, const ScaleFn& key_scale,
                       const float* query, float* scores, int64_t stride, float* max_score) {
  constexpr int V = HEAD_DIM / 16;
  constexpr int SLICE = V <= kRegisterUnits - 1 ? V : (V % 4 == 0 ? 4 : 1);  // key vectors in registers at once
  const int64_t num_heads = num_kv_heads * GROUP;
  thread_local std::vector<Floats16> parked_buffer;  // (head, token in the window): the dot's 16 lane sums
  parked_buffer.resize(num_heads * 16);
  Floats16* parked = parked_buffer.data();
  alignas(64) float lanes[16];
  for (int64_t w = 0; w < n_tokens; w += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, n_tokens - w));
    for (int u = 0; u < n; ++u)
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const cache_t* k = key_row(w + u, h);
        const float* q = query + h * GROUP * HEAD_DIM;
        Floats16* dots = parked + h * GROUP * 16 + u;  // head h GROUP + g at dots[16 g]
        for (int s0 = 0; s0 < V; s0 += SLICE) {
          Floats16 keys[SLICE];
          for (int i = 0; i < SLICE; ++i) keys[i] = tokenmill_simd::load16(k + 16 * (s0 + i));
          for (int g = 0; g < GROUP; ++g) {
            Floats16 acc = s0 == 0 ? tokenmill_simd::zeros() : dots[16 * g];
            for (int i = 0; i < SLICE; ++i)
              acc = tokenmill_simd::fmadd(tokenmill_simd::load16(q + g * HEAD_DIM + 16 * (s0 + i)), keys[i], acc);
            dots[16 * g] = acc;
          }
        }
      }
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      for (int u = 0; u < 16; ++u) lanes[u] = u < n ? key_scale(w + u, h) : 0.f;
      const Floats16 token_scales = tokenmill_simd::load16(lanes);
      for (int g = 0; g < GROUP; ++g) {
        Floats16 (&window)[16] = *reinterpret_cast<Floats16(*)[16]>(parked + (h * GROUP + g) * 16);
        for (int u = n; u < 16; ++u) window[u] = tokenmill_simd::zeros();
        alignas(64) float dots[16];
        tokenmill_simd::store16(dots, tokenmill_simd::mul(sums16(window), token_scales));
        float* out = scores + (h * GROUP + g) * stride + w;
        float top = max_score[h * GROUP + g];  // a local: stores to out would otherwise reload it
        for (int u = 0; u < n; ++u) {
          out[u] = dots[u];
          top = std::max(top, dots[u]);
        }
        max_score[h * GROUP + g] = top;
      }
    }
  }
}

// The largest count of Floats16 per value row that divides the row's V and leaves room for `heads`
// accumulators of that width and the row itself.
constexpr int value_slice(int v, int heads) {
  for (int s = v; s > 1; --s)
    if (v % s == 0 && (heads + 1) * s <= kRegisterUnits) return s;
  return 1;
}

// out[g] (HEAD_DIM floats each, `out_stride` apart) += sum over tokens t in [t0, t1) of p[g][t] * v_scale * v[t]
// for the GROUP query heads g of one KV head. row(t, v_scale) gives token t's value row for this head and
// sets its scale (1 for float caches); p[g] = probs + g * probs_stride. first: out starts from zero.
// The accumulators of HEADS query heads x SLICE vectors of the row stay in registers over the tokens (a slice
// of the row at a time where all of it would not fit); any cut adds each output's products in token order.
template <int HEAD_DIM, int GROUP, typename cache_t, typename RowFn>
inline void accumulate_values(int64_t t0, int64_t t1, bool first, const RowFn& row, const float* probs,
                              int64_t probs_stride, float* out, int64_t out_stride) {
  constexpr int V = HEAD_DIM / 16;
  constexpr int HEADS = std::max(1, std::min(GROUP, kRegisterUnits - 1));
  constexpr int SLICE = value_slice(V, HEADS);
  for (int g0 = 0; g0 < GROUP; g0 += HEADS)
    for (int s0 = 0; s0 < V; s0 += SLICE) {
      Floats16 acc[HEADS][SLICE];
      for (int g = 0; g < HEADS; ++g)
        for (int i = 0; i < SLICE; ++i)
          acc[g][i] = first || g0 + g >= GROUP ? tokenmill_simd::zeros()
                                               : tokenmill_simd::load16(out + (g0 + g) * out_stride + 16 * (s0 + i));
      for (int64_t t = t0; t < t1; ++t) {
        float v_scale;
        const cache_t* v = row(t, v_scale);
        Floats16 values[SLICE];
        for (int i = 0; i < SLICE; ++i) values[i] = tokenmill_simd::load16(v + 16 * (s0 + i));
        for (int g = 0; g < HEADS; ++g) {
          if (g0 + g >= GROUP) break;
          const Floats16 p = tokenmill_simd::broadcast(probs[(g0 + g) * probs_stride + t] * v_scale);
          for (int i = 0; i < SLICE; ++i) acc[g][i] = tokenmill_simd::fmadd(p, values[i], acc[g][i]);
        }
      }
      for (int g = 0; g < HEADS && g0 + g < GROUP; ++g)
        for (int i = 0; i < SLICE; ++i)
          tokenmill_simd::store16(out + (g0 + g) * out_stride + 16 * (s0 + i), acc[g][i]);
    }
}

#endif

}  // namespace tokenmill_attention
