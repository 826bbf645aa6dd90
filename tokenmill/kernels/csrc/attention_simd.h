// Vector pieces of the CPU decode attention (paged_decode.cpp), for the shapes they unroll:
//   - sum16: the horizontal sums of 16 vectors at once, each equal to the bits _mm512_reduce_add_ps
//     gives for it (the same pairs added in the same order), so that sixteen q . k scores cost ~3
//     shuffles or adds each instead of ~8, and the scores do not change;
//   - accumulate_values: the probability-weighted sum of a chunk's values for the query heads sharing
//     one KV head, in registers: each value row is read and converted once for all of them, and each
//     output element still adds the tokens' products in token order, one fused multiply-add each.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
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


template <typename cache_t>
constexpr bool values_in_registers(int head_dim, int group) {
  return head_dim > 0 && head_dim % 16 == 0 && group > 0 &&
         (std::is_same_v<cache_t, float> || std::is_same_v<cache_t, at::BFloat16> ||
          std::is_same_v<cache_t, at::Half> || std::is_same_v<cache_t, int8_t>);
}

// out[g] (HEAD_DIM floats each, `out_stride` apart) += sum over tokens t in [t0, t1) of p[g][t] * v_scale * v[t]
// for the GROUP query heads g of one KV head. row(t, v_scale) gives token t's value row for this head and
// sets its scale (1 for float caches); p[g] = probs + g * probs_stride. first: out starts from zero.
template <int HEAD_DIM, int GROUP, typename cache_t, typename RowFn>
inline void accumulate_values(int64_t t0, int64_t t1, bool first, const RowFn& row, const float* probs,
                              int64_t probs_stride, float* out, int64_t out_stride) {
  constexpr int V = HEAD_DIM / 16;
  // Query heads per pass: as many accumulators as the registers hold (AVX-512 32, AVX2 16 of half the width).
#if defined(TOKENMILL_AVX512)
  constexpr int kAccumulators = 24;
#else
  constexpr int kAccumulators = 12;
#endif
  constexpr int HEADS = std::max(1, std::min(GROUP, kAccumulators / V));
  for (int g0 = 0; g0 < GROUP; g0 += HEADS) {
    Floats16 acc[HEADS][V];
    for (int g = 0; g < HEADS; ++g)
      for (int i = 0; i < V; ++i)
        acc[g][i] = first || g0 + g >= GROUP ? tokenmill_simd::zeros()
                                             : tokenmill_simd::load16(out + (g0 + g) * out_stride + 16 * i);
    for (int64_t t = t0; t < t1; ++t) {
      float v_scale;
      const cache_t* v = row(t, v_scale);
      Floats16 values[V];
      for (int i = 0; i < V; ++i) values[i] = tokenmill_simd::load16(v + 16 * i);
      for (int g = 0; g < HEADS; ++g) {
        if (g0 + g >= GROUP) break;
        const Floats16 p = tokenmill_simd::broadcast(probs[(g0 + g) * probs_stride + t] * v_scale);
        for (int i = 0; i < V; ++i) acc[g][i] = tokenmill_simd::fmadd(p, values[i], acc[g][i]);
      }
    }
    for (int g = 0; g < HEADS && g0 + g < GROUP; ++g)
      for (int i = 0; i < V; ++i) tokenmill_simd::store16(out + (g0 + g) * out_stride + 16 * i, acc[g][i]);
  }
}

#endif

}  // namespace tokenmill_attention
