// Shared by the panel kernels (dense_panels.cpp, quant_panels.cpp): how a weight's panels are cut into
// tiles for the threads (the vectors themselves: simd16.h).
#pragma once
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>
#include "simd16.h"
#if defined(TOKENMILL_SIMD16)
#define TOKENMILL_PANEL_IO 1

namespace tokenmill_panels {

constexpr int64_t kLanes = 16;     // outputs per panel: one Floats16
constexpr int64_t kRowChunk = 96;  // rows of x per task at large batches (a multiple of every tile height used)
// Tiles at three or more rows: kWideRows rows x kWidePanels panels, as many accumulators as the vector
// registers hold (AVX-512: 32 registers of 16 lanes; AVX2: 16 of 8).
// At one or two rows, tiles are up to kMaxPanels panels wide (independent weight streams).
#if defined(TOKENMILL_AVX512)
constexpr int kWideRows = 6, kWidePanels = 2, kMaxPanels = 4;
#else
constexpr int kWideRows = 3, kWidePanels = 1, kMaxPanels = 2;
#endif

// Software prefetch of a stream of 1- or 2-byte weights (codes, bf16), this many bytes ahead of its loads.
// Measured on an AVX2 machine (Zen 3, 2 vCPUs), where the hardware prefetcher alone left the kernels waiting
// on DRAM (two thirds of the 4-bit kernel's samples on its loads): 1 KB ahead took decode to 0.82x (int4),
// 0.85x (int8) and 0.86x (bf16) of the time without it (512 B: the same; 2 KB: 5% slower than 1 KB). float32
// panels ran 13-15% slower with it (1 or 4 KB) and take none. AVX-512 builds, tuned on Zen 4 where the
// panels streamed at ~34 GB/s without it, take none (not measured there). The non-temporal hint (NTA rather
// than T0) keeps the stream from evicting what the step's other code and the interpreter use between steps:
// on the same machine decode took 0.95-1.0x (int4), 0.92-0.94x (int8) and 0.95-0.97x (bf16) of T0's time.
#if defined(TOKENMILL_AVX512)
constexpr int64_t kPrefetchBytes = 0;
#else
constexpr int64_t kPrefetchBytes = 1024;
#endif
inline void prefetch_ahead(const void* p) {
  if constexpr (kPrefetchBytes > 0) _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_NTA);
}

// Panels per tile at one or two rows of x: kMaxPanels (4 or 2) independent streams of weights where that
// splits the panels evenly over the threads, else fewer (an uneven split leaves a core idle at the end).
inline int narrow_tile_panels(int64_t panels) {
  const int64_t threads = at::get_num_threads();
  for (int per_tile : {4, 3, 2})
    if (per_tile <= kMaxPanels && panels % (per_tile * threads) == 0) return per_tile;
  return kMaxPanels;
}

// Calls tile(m0, rows, p, width) for every tile of an (M rows of x) x (panels) product, split over the
// threads: rows in chunks of kRowChunk; at one or two rows, tiles 3-4 panels wide (independent weight
// streams) or `narrow_width` wide if given; at more, kWidePanels panels x up to kWideRows rows. The tile shape never changes the order of any output's sum, so a row's result
// does not depend on the batch.
template <typename TileFn>
void for_each_tile(int64_t M, int64_t panels, const TileFn& tile, int narrow_width = 0) {
  const int panels_per_tile = M <= 2 ? (narrow_width > 0 ? narrow_width : narrow_tile_panels(panels)) : kWidePanels;
  const int rows_per_tile = M <= 2 ? static_cast<int>(M) : kWideRows;
  const int64_t tiles_n = (panels + panels_per_tile - 1) / panels_per_tile;
  const int64_t chunks_m = (M + kRowChunk - 1) / kRowChunk;
  const auto run = [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t m_begin = (t / tiles_n) * kRowChunk, m_end = std::min(M, m_begin + kRowChunk);
      const int64_t p0 = (t % tiles_n) * panels_per_tile, np = std::min<int64_t>(panels_per_tile, panels - p0);
      for (int64_t m0 = m_begin; m0 < m_end; m0 += rows_per_tile) {
        const int rows = static_cast<int>(std::min<int64_t>(rows_per_tile, m_end - m0));
        for (int64_t j = 0; j < np;) {  // the widest tile that fits what is left
          const int width = static_cast<int>(std::min<int64_t>(kMaxPanels, np - j));
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
