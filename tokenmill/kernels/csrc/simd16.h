// Sixteen 32-bit lanes as one value, so that the panel kernels (16 outputs per panel: dense_panels.cpp,
// quant_panels.cpp) are written once for AVX-512 (one 512-bit register) and AVX2 (two 256-bit ones).
//
// Every operation is lane-wise, so a kernel written with them computes the same bits on either ISA (the
// sums run over the same inputs in the same order in every lane), with one exception named below: bf16
// pair products (vdpbf16ps on AVX512-BF16, two FMAs elsewhere).
//
// Byte dot products: dot_small(acc, u, x) adds, in each lane j, sum_i u[4 j + i] * x[i] for 64 unsigned
// bytes u <= 127 (16 lanes x 4) and 4 signed bytes x (|x| <= 127) broadcast to every lane. AVX512-VNNI does
// it in one vpdpbusd; without it byte pairs are multiplied into int16 (vpmaddubsw) and pairs of those into
// int32 (vpmaddwd). vpmaddubsw saturates a pair sum above 32767, which 4-bit codes (u <= 15) never reach
// but 8-bit ones (u <= 255) can, so dot_bytes, for any u, adds sum_i (u - kBytesOffset) x_i: with VNNI
// the plain sum (offset 0), without it the sum of (u - 128) x, as |u - 128| times x carrying the sign of
// u - 128 (at most 2 * 128 * 127 = 32512 per pair). Integer sums are exact, so only the offset differs.
//
// SmallSums add up small-code dots (u <= 15) over several steps the way each ISA does it fastest: with
// VNNI one vpdpbusd per step into int32 lanes; without it the int16 pair sums of vpmaddubsw are added as
// they are (vpaddw), each at most 2 * 15 * 127 = 3810, so kSmallSumSteps = 8 steps stay below 32767, and
// widen_add turns them into int32 lane sums (one vpmaddwd) only then: two instructions a step, not three.
#pragma once
#include <cstdint>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TOKENMILL_SIMD16 1
#define TOKENMILL_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TOKENMILL_SIMD16 1
#define TOKENMILL_AVX2 1
#endif

#if defined(TOKENMILL_SIMD16)
namespace tokenmill_simd {

#if defined(TOKENMILL_AVX512)
struct Floats16 { __m512 v; };
struct Ints16 { __m512i v; };    // 16 int32
struct Bytes64 { __m512i v; };   // 64 bytes: 4 per lane

inline Floats16 zeros() { return {_mm512_setzero_ps()}; }
inline Floats16 broadcast(float x) { return {_mm512_set1_ps(x)}; }
inline Floats16 add(Floats16 a, Floats16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Floats16 mul(Floats16 a, Floats16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Floats16 fmadd(Floats16 a, Floats16 b, Floats16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Floats16 fnmadd(Floats16 a, Floats16 b, Floats16 c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
inline Floats16 abs(Floats16 a) { return {_mm512_abs_ps(a.v)}; }
inline Floats16 max(Floats16 a, Floats16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline float reduce_max(Floats16 a) { return _mm512_reduce_max_ps(a.v); }
// Lane masks (bit j: lane j). NaN lanes from the bits, since -ffast-math lets the compiler assume x == x.
inline uint32_t nan_lanes(Floats16 a) {
  const __m512i magnitude = _mm512_and_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(0x7FFFFFFF));
  return _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7F800000));
}
inline uint32_t equal_lanes(Floats16 a, Floats16 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }

inline Floats16 load16(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Floats16 load16(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
}
inline Floats16 load16(const at::Half* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
inline Floats16 load16(const uint8_t* p) {  // 16 bytes, as float
  return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
inline Floats16 load16(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
// 16 bytes of nibbles as two centred code vectors: lane j of lo is (p[j] & 15) - 8, of hi (p[j] >> 4) - 8.
inline void load_nibbles16(const uint8_t* p, Floats16& lo, Floats16& hi) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i eight = _mm512_set1_epi32(8);
  lo = {_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0xF)), eight))};
  hi = {_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), eight))};
}
inline float reduce_add(Floats16 a) { return _mm512_reduce_add_ps(a.v); }
inline void store16(float* p, Floats16 v) { _mm512_storeu_ps(p, v.v); }
// Rounded to nearest even, as Tensor.to rounds.
inline void store16(at::BFloat16* p, Floats16 v) {
  const __m512i bits = _mm512_castps_si512(v.v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
inline void store16(at::Half* p, Floats16 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// A pair of bf16 inputs per lane (32 values, [lane][2]) as two float vectors: the first and the second input.
inline void load_bf16_pairs(const at::BFloat16* p, Floats16& first, Floats16& second) {
  const __m512i both = _mm512_loadu_si512(p);
  first = {_mm512_castsi512_ps(_mm512_slli_epi32(both, 16))};
  second = {_mm512_castsi512_ps(_mm512_and_si512(both, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}

inline Ints16 zero_ints() { return {_mm512_setzero_si512()}; }
inline Ints16 add(Ints16 a, Ints16 b) { return {_mm512_add_epi32(a.v, b.v)}; }
inline Floats16 to_floats(Ints16 a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline Ints16 round_to_ints(Floats16 a) { return {_mm512_cvtps_epi32(a.v)}; }  // to nearest even
inline int32_t reduce_add(Ints16 a) { return _mm512_reduce_add_epi32(a.v); }
inline void store_saturated_bytes(int8_t* p, Ints16 a) {  // 16 int8, saturating
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(a.v));
}

inline Bytes64 load_bytes(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }
inline Bytes64 broadcast_quad(int32_t quad) { return {_mm512_set1_epi32(quad)}; }
inline Bytes64 low_nibbles(Bytes64 b) { return {_mm512_and_si512(b.v, _mm512_set1_epi8(0x0F))}; }
inline Bytes64 high_nibbles(Bytes64 b) { return {_mm512_and_si512(_mm512_srli_epi16(b.v, 4), _mm512_set1_epi8(0x0F))}; }

#if defined(__AVX512VNNI__)
constexpr int kBytesOffset = 0;
inline Ints16 dot_small(Ints16 acc, Bytes64 u, Bytes64 x) { return {_mm512_dpbusd_epi32(acc.v, u.v, x.v)}; }
inline Ints16 dot_bytes(Ints16 acc, Bytes64 u, Bytes64 x) { return {_mm512_dpbusd_epi32(acc.v, u.v, x.v)}; }
struct SmallSums { Ints16 v; };
constexpr int kSmallSumSteps = 1 << 20;
inline SmallSums small_zero() { return {zero_ints()}; }
inline SmallSums small_dot(SmallSums s, Bytes64 u, Bytes64 x) { return {dot_small(s.v, u, x)}; }
inline Ints16 widen_add(Ints16 acc, SmallSums s) { return add(acc, s.v); }
#else
constexpr int kBytesOffset = 128;
inline Ints16 dot_small(Ints16 acc, Bytes64 u, Bytes64 x) {
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(_mm512_maddubs_epi16(u.v, x.v), _mm512_set1_epi16(1)))};
}
struct SmallSums { __m512i v; };  // int16 pair sums (see kSmallSumSteps)
constexpr int kSmallSumSteps = 8;
inline SmallSums small_zero() { return {_mm512_setzero_si512()}; }
inline SmallSums small_dot(SmallSums s, Bytes64 u, Bytes64 x) {
  return {_mm512_add_epi16(s.v, _mm512_maddubs_epi16(u.v, x.v))};
}
inline Ints16 widen_add(Ints16 acc, SmallSums s) {
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(s.v, _mm512_set1_epi16(1)))};
}
inline Ints16 dot_bytes(Ints16 acc, Bytes64 u, Bytes64 x) {
  const __m512i codes = _mm512_xor_si512(u.v, _mm512_set1_epi8(static_cast<char>(0x80)));  // u - 128, signed
  const __m512i signed_x = _mm512_mask_sub_epi8(x.v, _mm512_movepi8_mask(codes), _mm512_setzero_si512(), x.v);
  return dot_small(acc, {_mm512_abs_epi8(codes)}, {signed_x});
}
#endif

#else  // AVX2: each value is two 256-bit halves, lanes 0-7 and 8-15
struct Floats16 { __m256 lo, hi; };
struct Ints16 { __m256i lo, hi; };
struct Bytes64 { __m256i lo, hi; };

inline Floats16 zeros() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Floats16 broadcast(float x) { const __m256 v = _mm256_set1_ps(x); return {v, v}; }
inline Floats16 add(Floats16 a, Floats16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline Floats16 mul(Floats16 a, Floats16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline Floats16 fmadd(Floats16 a, Floats16 b, Floats16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline Floats16 fnmadd(Floats16 a, Floats16 b, Floats16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline Floats16 abs(Floats16 a) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_and_ps(a.lo, mask), _mm256_and_ps(a.hi, mask)};
}
inline Floats16 max(Floats16 a, Floats16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline float reduce_max(Floats16 a) {
  __m256 m = _mm256_max_ps(a.lo, a.hi);
  __m128 q = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  q = _mm_max_ps(q, _mm_movehl_ps(q, q));
  q = _mm_max_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
inline uint32_t lane_bits(__m256 lo, __m256 hi) {  // the sign bits of two halves as a 16-lane mask
  return static_cast<uint32_t>(_mm256_movemask_ps(lo)) | (static_cast<uint32_t>(_mm256_movemask_ps(hi)) << 8);
}
inline uint32_t nan_lanes(Floats16 a) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), inf_bits = _mm256_set1_epi32(0x7F800000);
  const auto nan = [&](__m256 x) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_and_si256(_mm256_castps_si256(x), abs_mask), inf_bits));
  };
  return lane_bits(nan(a.lo), nan(a.hi));
}
inline uint32_t equal_lanes(Floats16 a, Floats16 b) {
  return lane_bits(_mm256_cmp_ps(a.lo, b.lo, _CMP_EQ_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_EQ_OQ));
}

inline Floats16 load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __m256 bf16x8_to_floats(__m128i bits) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline Floats16 load16(const at::BFloat16* p) {
  const __m128i* q = reinterpret_cast<const __m128i*>(p);
  return {bf16x8_to_floats(_mm_loadu_si128(q)), bf16x8_to_floats(_mm_loadu_si128(q + 1))};
}
inline Floats16 load16(const at::Half* p) {
  const __m128i* q = reinterpret_cast<const __m128i*>(p);
  return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
}
inline Floats16 load16(const uint8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)))};
}
inline Floats16 load16(const int8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)))};
}
inline void load_nibbles16(const uint8_t* p, Floats16& lo, Floats16& hi) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i first = _mm256_cvtepu8_epi32(bytes), second = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
  const __m256i mask = _mm256_set1_epi32(0xF), eight = _mm256_set1_epi32(8);
  const auto low = [&](__m256i b) { return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, mask), eight)); };
  const auto high = [&](__m256i b) { return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight)); };
  lo = {low(first), low(second)};
  hi = {high(first), high(second)};
}
inline float reduce_add(Floats16 a) {
  const __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
inline void store16(float* p, Floats16 v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
// Rounded to nearest even, as Tensor.to rounds.
inline __m128i floats_to_bf16x8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  // 8 int32 holding 16-bit values -> 8 uint16 (packus keeps 128-bit lanes apart: gather them after)
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}
inline void store16(at::BFloat16* p, Floats16 v) {
  __m128i* q = reinterpret_cast<__m128i*>(p);
  _mm_storeu_si128(q, floats_to_bf16x8(v.lo));
  _mm_storeu_si128(q + 1, floats_to_bf16x8(v.hi));
}
inline void store16(at::Half* p, Floats16 v) {
  __m128i* q = reinterpret_cast<__m128i*>(p);
  _mm_storeu_si128(q, _mm256_cvtps_ph(v.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  _mm_storeu_si128(q + 1, _mm256_cvtps_ph(v.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline void load_bf16_pairs(const at::BFloat16* p, Floats16& first, Floats16& second) {
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p) + 1);
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  first = {_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16))};
  second = {_mm256_castsi256_ps(_mm256_and_si256(lo, top)), _mm256_castsi256_ps(_mm256_and_si256(hi, top))};
}

inline Ints16 zero_ints() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline Ints16 add(Ints16 a, Ints16 b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
inline Floats16 to_floats(Ints16 a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline Ints16 round_to_ints(Floats16 a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
inline int32_t reduce_add(Ints16 a) {
  const __m256i s = _mm256_add_epi32(a.lo, a.hi);
  __m128i q = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  q = _mm_add_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(1, 0, 3, 2)));
  q = _mm_add_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(q);
}
inline void store_saturated_bytes(int8_t* p, Ints16 a) {
  const __m256i words = _mm256_packs_epi32(a.lo, a.hi);               // [lo 0-3, hi 0-3 | lo 4-7, hi 4-7]
  const __m256i bytes = _mm256_packs_epi16(words, words);             // per 128-bit lane, the 8 above, twice
  const __m256i order = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(order));
}

inline Bytes64 load_bytes(const uint8_t* p) {
  const __m256i* q = reinterpret_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
}
inline Bytes64 broadcast_quad(int32_t quad) { const __m256i v = _mm256_set1_epi32(quad); return {v, v}; }
inline Bytes64 low_nibbles(Bytes64 b) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(b.lo, mask), _mm256_and_si256(b.hi, mask)};
}
inline Bytes64 high_nibbles(Bytes64 b) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(_mm256_srli_epi16(b.lo, 4), mask), _mm256_and_si256(_mm256_srli_epi16(b.hi, 4), mask)};
}
inline __m256i dot_half(__m256i acc, __m256i u, __m256i x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
}
inline Ints16 dot_small(Ints16 acc, Bytes64 u, Bytes64 x) { return {dot_half(acc.lo, u.lo, x.lo), dot_half(acc.hi, u.hi, x.hi)}; }
struct SmallSums { __m256i lo, hi; };  // int16 pair sums (see kSmallSumSteps)
constexpr int kSmallSumSteps = 8;
inline SmallSums small_zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline SmallSums small_dot(SmallSums s, Bytes64 u, Bytes64 x) {
  return {_mm256_add_epi16(s.lo, _mm256_maddubs_epi16(u.lo, x.lo)), _mm256_add_epi16(s.hi, _mm256_maddubs_epi16(u.hi, x.hi))};
}
inline Ints16 widen_add(Ints16 acc, SmallSums s) {
  const __m256i ones = _mm256_set1_epi16(1);
  return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(s.lo, ones)), _mm256_add_epi32(acc.hi, _mm256_madd_epi16(s.hi, ones))};
}
constexpr int kBytesOffset = 128;
inline Ints16 dot_bytes(Ints16 acc, Bytes64 u, Bytes64 x) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i lo = _mm256_xor_si256(u.lo, flip), hi = _mm256_xor_si256(u.hi, flip);  // u - 128, signed
  return {dot_half(acc.lo, _mm256_abs_epi8(lo), _mm256_sign_epi8(x.lo, lo)),
          dot_half(acc.hi, _mm256_abs_epi8(hi), _mm256_sign_epi8(x.hi, hi))};
}
#endif

}  // namespace tokenmill_simd
#endif
