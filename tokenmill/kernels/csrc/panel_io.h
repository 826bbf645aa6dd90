// Shared by the panel kernels (dense_panels.cpp, quant_gemm_vnni.cpp): 16 activations in and 16
// results out as float32 vectors, and how a weight's panels are cut into tiles for the threads.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TOKENMILL_PANEL_IO 1

namespace tokenmill_panels {

constexpr int64_t kLanes = 16;     // outputs per panel: one float32 vector
constexpr int64_t kRowChunk = 96;  // rows of x per task at large batches (a multiple of every tile height used)

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// Rounded to nearest even, as Tensor.to rounds.
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
inline void store16(at::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Panels per tile at one or two rows of x: 4 independent streams of weights where that splits the
// panels evenly over the threads, else 3 or 2 (an uneven split leaves a core idle at the end).
inline int narrow_tile_panels(int64_t panels) {
  const int64_t threads = at::get_num_threads();
  for (int per_tile : {4, 3, 2})
    if (panels % (per_tile * threads) == 0) return per_tile;
  return 4;
}

}  // namespace tokenmill_panels
#endif
