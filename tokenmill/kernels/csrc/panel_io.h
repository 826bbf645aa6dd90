// Shared by the panel kernels (dense_panels.cpp, quant_gemm_vnni.cpp): 16 activations in and 16
// results out as float32 vectors, and how a weight's panels are cut into tiles for the threads.
#pragma once
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <vector>
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

// Calls tile(m0, rows, p, width) for every tile of an (M rows of x) x (panels) product, split over the
// threads: rows in chunks of kRowChunk; at one or two rows, tiles 3-4 panels wide (independent weight
// streams) or `narrow_width` wide if given; at more, 2 panels x up to 6 rows (12 accumulators of the 32
// vector registers). The tile shape never changes the order of any output's sum, so a row's result
// does not depend on the batch.
template <typename TileFn>
void for_each_tile(int64_t M, int64_t panels, const TileFn& tile, int narrow_width = 0) {
  const int panels_per_tile = M <= 2 ? (narrow_width > 0 ? narrow_width : narrow_tile_panels(panels)) : 2;
  const int rows_per_tile = M <= 2 ? static_cast<int>(M) : 6;
  const int64_t tiles_n = (panels + panels_per_tile - 1) / panels_per_tile;
  const int64_t chunks_m = (M + kRowChunk - 1) / kRowChunk;
  const auto run = [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t m_begin = (t / tiles_n) * kRowChunk, m_end = std::min(M, m_begin + kRowChunk);
      const int64_t p0 = (t % tiles_n) * panels_per_tile, np = std::min<int64_t>(panels_per_tile, panels - p0);
      for (int64_t m0 = m_begin; m0 < m_end; m0 += rows_per_tile) {
        const int rows = static_cast<int>(std::min<int64_t>(rows_per_tile, m_end - m0));
        for (int64_t j = 0; j < np;) {  // the widest tile that fits what is left
          const int width = static_cast<int>(std::min<int64_t>(4, np - j));
          tile(m0, rows, p0 + j, width);
          j += width;
        }
      }
    }
  };
  const int64_t total = chunks_m * tiles_n, threads = at::get_num_threads();
  if (M > 2 || threads < 2 || at::in_parallel_region()) {
    at::parallel_for(0, total, 1, run);
    return;
  }
  // One or two rows: each thread reads its share of the tiles in order, as one stream; a thread done
  // with its own takes tiles from the end of another's (DRAM serves the two cores unevenly, and
  // the faster one would otherwise wait several microseconds at the end of every matrix).
  struct alignas(64) Range { std::atomic<uint64_t> packed; };  // next tile (low 32 bits), end (high); a line each
  thread_local std::vector<Range> ranges_buffer;  // the calling thread's, kept between calls
  if (static_cast<int64_t>(ranges_buffer.size()) < threads) ranges_buffer = std::vector<Range>(threads);
  std::vector<Range>& ranges = ranges_buffer;  // the workers reach it through this reference
  for (int64_t i = 0; i < threads; ++i) {
    const uint64_t begin = total * i / threads, stop = total * (i + 1) / threads;
    ranges[i].packed.store(begin | (stop << 32), std::memory_order_relaxed);
  }
  at::parallel_for(0, threads, 1, [&](int64_t self, int64_t) {
    for (int64_t k = 0; k < threads; ++k) {
      auto& range = ranges[(self + k) % threads].packed;
      const bool own = k == 0;
      uint64_t r = range.load(std::memory_order_relaxed);
      for (;;) {
        const uint64_t next = r & 0xFFFFFFFFu, stop = r >> 32;
        if (next >= stop) break;
        const uint64_t claimed = own ? (next + 1) | (stop << 32) : next | ((stop - 1) << 32);
        if (!range.compare_exchange_weak(r, claimed, std::memory_order_relaxed)) continue;
        const int64_t t = own ? static_cast<int64_t>(next) : static_cast<int64_t>(stop - 1);
        run(t, t + 1);
        r = range.load(std::memory_order_relaxed);
      }
    }
  });
}

}  // namespace tokenmill_panels
#endif
