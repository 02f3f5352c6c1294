// The building blocks of pocketlm's fp32-activation (AVX2) kernels, shared by the single ops (cpu_kernels.cpp) and the
// whole decode step (decode_step.cpp): the int4 and int8 products of one input row, and attention of
// one query over the positions a mask lets through.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace pocketlm {

constexpr int64_t kLanes = 8;  // output rows per int4 block: one AVX2 vector of fp32

// The input row in the form the int4 loop reads: x[8w + k] / 16^k for k < 7 (the code at bits 4k..4k+3
// is used in place, as code * 16^k, so the product needs no shift; 16^-k is a power of two, so exact)
// and x[8w + 7] as is (that code is shifted down: masked in place it would make the int32 negative).
// Also the sum of x over each group, for the groups' mins.
inline void prescale_row(const float* x, int64_t K, int64_t G, float* scaled, float* group_sums) {
  static const float kNibble[8] = {1.f, 1.f / 16, 1.f / 256, 1.f / 4096, 1.f / 65536, 1.f / 1048576,
                                   1.f / 16777216, 1.f};
  for (int64_t i = 0; i < K; ++i) scaled[i] = x[i] * kNibble[i % 8];
  for (int64_t g = 0; g < K / G; ++g) {
    float s = 0.f;
    for (int64_t i = g * G; i < (g + 1) * G; ++i) s += x[i];
    group_sums[g] = s;
  }
}

// One block of 8 output rows times one prescaled input row. words: (K/8, 8) int32, word [w][l] holding
// the codes of row l at columns 8w..8w+7 (column 8w+k in bits 4k..4k+3). tables: (groups, 2, 8) fp16,
// the 8 rows' scales then mins of each group. w = code * scale + min.
inline void int4_block(const float* xs, const float* group_sums, const int32_t* words, const uint16_t* tables,
                       float* y, int64_t K, int64_t G) {
  const __m256i m0 = _mm256_set1_epi32(0xF), m1 = _mm256_set1_epi32(0xF0), m2 = _mm256_set1_epi32(0xF00),
                m3 = _mm256_set1_epi32(0xF000), m4 = _mm256_set1_epi32(0xF0000),
                m5 = _mm256_set1_epi32(0xF00000), m6 = _mm256_set1_epi32(0xF000000);
  const int64_t words_per_group = G / 8;
  __m256 total = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / G; ++g) {
    // one accumulator per code position: a single one would chain 8 dependent FMAs per word
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t w = g * words_per_group; w < (g + 1) * words_per_group; ++w) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + kLanes * w));
      const float* x = xs + 8 * w;
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m0)), _mm256_broadcast_ss(x + 0), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m1)), _mm256_broadcast_ss(x + 1), a1);
      a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m2)), _mm256_broadcast_ss(x + 2), a2);
      a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m3)), _mm256_broadcast_ss(x + 3), a3);
      a4 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m4)), _mm256_broadcast_ss(x + 4), a4);
      a5 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m5)), _mm256_broadcast_ss(x + 5), a5);
      a6 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m6)), _mm256_broadcast_ss(x + 6), a6);
      a7 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28)), _mm256_broadcast_ss(x + 7), a7);
    }
    const __m256 dots = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                      _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    const uint16_t* t = tables + g * 2 * kLanes;
    const __m256 scales = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
    const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + kLanes)));
    total = _mm256_fmadd_ps(scales, dots, total);
    total = _mm256_fmadd_ps(mins, _mm256_set1_ps(group_sums[g]), total);
  }
  _mm256_storeu_ps(y, total);
}

// Several weight matrices of one input (q, k, v or gate, up) run as one: their outputs side by side.
// Work units are row blocks numbered across the matrices; `first[i]` is matrix i's first unit.
struct Matrices {
  std::vector<int64_t> first;
  explicit Matrices(const std::vector<int64_t>& units) : first{0} {
    for (int64_t u : units) first.push_back(first.back() + u);
  }
  int64_t total() const { return first.back(); }
  int64_t which(int64_t unit) const {  // the matrix a unit belongs to (a linear scan: 1-3 matrices)
    int64_t i = 0;
    while (unit >= first[i + 1]) ++i;
    return i;
  }
};

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 int8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One int8 weight row times one input row (four accumulators, so the FMAs do not wait on each other).
inline float int8_dot(const float* x, const int8_t* w, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(int8x8(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(int8x8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(int8x8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(int8x8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  float s = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; ++k) s += x[k] * static_cast<float>(w[k]);
  return s;
}

// R >= 2 input rows times one block of 8 output rows: each word's codes are converted once and used
// for every row (converting them per row made batch 8 slower than batch 1). Per row r: xs + r * xs_stride,
// group_sums + r * gs_stride, y + r * y_stride.
template <int R>
inline void int4_block_rows(const float* xs, int64_t xs_stride, const float* group_sums, int64_t gs_stride,
                            const int32_t* words, const uint16_t* tables, float* y, int64_t y_stride, int64_t K,
                            int64_t G) {
  const int64_t words_per_group = G / 8;
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / G; ++g) {
    __m256 even[R], odd[R];  // two accumulators per row: one would chain 8 dependent FMAs per word
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
    for (int64_t w = g * words_per_group; w < (g + 1) * words_per_group; ++w) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + kLanes * w));
      const float* x = xs + 8 * w;
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const __m256i bits = k < 7 ? _mm256_and_si256(v, _mm256_set1_epi32(0xF << (4 * k))) : _mm256_srli_epi32(v, 28);
        const __m256 codes = _mm256_cvtepi32_ps(bits);
        for (int r = 0; r < R; ++r) {
          __m256& acc = (k & 1) ? odd[r] : even[r];
          acc = _mm256_fmadd_ps(codes, _mm256_broadcast_ss(x + r * xs_stride + k), acc);
        }
      }
    }
    const uint16_t* t = tables + g * 2 * kLanes;
    const __m256 scales = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
    const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + kLanes)));
    for (int r = 0; r < R; ++r) {
      total[r] = _mm256_fmadd_ps(scales, _mm256_add_ps(even[r], odd[r]), total[r]);
      total[r] = _mm256_fmadd_ps(mins, _mm256_set1_ps(group_sums[r * gs_stride + g]), total[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * y_stride, total[r]);
}

// M prescaled input rows (K values each, K / G group sums each) times one block of 8 output rows, in
// tiles of up to 4 rows; row m's 8 outputs go to y + m * y_stride.
inline void int4_rows(const float* xs, const float* group_sums, int64_t M, const int32_t* words,
                      const uint16_t* tables, float* y, int64_t y_stride, int64_t K, int64_t G) {
  const int64_t gs = K / G;
  for (int64_t m = 0; m < M;) {
    const float* x = xs + m * K;
    const float* s = group_sums + m * gs;
    float* out = y + m * y_stride;
    switch (std::min<int64_t>(4, M - m)) {
      case 1: int4_block(x, s, words, tables, out, K, G); m += 1; break;
      case 2: int4_block_rows<2>(x, K, s, gs, words, tables, out, y_stride, K, G); m += 2; break;
      case 3: int4_block_rows<3>(x, K, s, gs, words, tables, out, y_stride, K, G); m += 3; break;
      default: int4_block_rows<4>(x, K, s, gs, words, tables, out, y_stride, K, G); m += 4;
    }
  }
}

// R input rows (x + r * K) times one int8 weight row: the codes are converted once for all rows.
template <int R>
inline void int8_dot_rows(const float* x, const int8_t* w, int64_t K, float* out) {
  __m256 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 c0 = int8x8(w + k), c1 = int8x8(w + k + 8);
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm256_fmadd_ps(c0, _mm256_loadu_ps(x + r * K + k), a[r][0]);
      a[r][1] = _mm256_fmadd_ps(c1, _mm256_loadu_ps(x + r * K + k + 8), a[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = horizontal_sum(_mm256_add_ps(a[r][0], a[r][1]));
    for (int64_t j = k; j < K; ++j) s += x[r * K + j] * static_cast<float>(w[j]);
    out[r] = s;
  }
}

// M input rows (K values each) times one int8 weight row, unscaled: row m's product in out[m * out_stride].
inline void int8_rows(const float* x, int64_t M, const int8_t* w, int64_t K, float* out, int64_t out_stride) {
  float dots[4];
  for (int64_t m = 0; m < M;) {
    const int64_t n = std::min<int64_t>(4, M - m);
    switch (n) {
      case 1: dots[0] = int8_dot(x + m * K, w, K); break;
      case 2: int8_dot_rows<2>(x + m * K, w, K, dots); break;
      case 3: int8_dot_rows<3>(x + m * K, w, K, dots); break;
      default: int8_dot_rows<4>(x + m * K, w, K, dots);
    }
    for (int64_t r = 0; r < n; ++r) out[(m + r) * out_stride] = dots[r];
    m += n;
  }
}

// y[0 .. 8C) = inverse * sum over i of weights[i] * values[rows[i] * stride + (0 .. 8C)]: C vector
// accumulators, which stay in registers because C is a constant.
template <int C>
inline void weighted_rows(const float* weights, const int64_t* rows, int64_t n, const float* values, int64_t stride,
                          __m256 inverse, float* y) {
  __m256 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const __m256 w = _mm256_set1_ps(weights[i]);
    const float* row = values + rows[i] * stride;
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8 * c), acc[c]);
  }
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(y + 8 * c, _mm256_mul_ps(acc[c], inverse));
}

// e^x for 8 floats (Cephes' polynomial, relative error about 1e-7; inputs below -87 count as -87, whose
// e^x is 1.6e-38): the softmax's exponentials, one at a time through std::exp a large part of attention.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n ln 2, in two parts for accuracy
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

// The sums of eight vectors' lanes, as one vector: [sum(v0), ..., sum(v7)].
inline __m256 sums_of_8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// query . key / sqrt(D) as 8 lanes to be summed (D % 8 == 0)
inline __m256 score_lanes(const float* query, const float* key, int64_t D) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), _mm256_loadu_ps(key + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(query + d + 8), _mm256_loadu_ps(key + d + 8), a1);
  }
  if (d < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), _mm256_loadu_ps(key + d), a0);
  return _mm256_add_ps(a0, a1);
}

// softmax(query . keys / sqrt(D)) . values over the positions `live` lists, for one query of D values
// (D % 8 == 0); keys and values advance by their strides ks, vs per position. p is scratch of at least
// live.size() + 8 floats. Scores are made 8 positions at a time, so their lanes are summed together.
inline void attend(const float* query, const float* keys, int64_t ks, const float* values, int64_t vs, int64_t D,
                   const std::vector<int64_t>& live, float* p, float* y) {
  const __m256 scale = _mm256_set1_ps(1.0f / std::sqrt(static_cast<float>(D)));
  const int64_t n = static_cast<int64_t>(live.size());
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  __m256 lanes[8];
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t count = std::min<int64_t>(8, n - i);
    for (int64_t j = 0; j < 8; ++j)
      lanes[j] = j < count ? score_lanes(query, keys + live[i + j] * ks, D) : _mm256_set1_ps(-INFINITY);
    const __m256 scores = _mm256_mul_ps(sums_of_8(lanes), scale);  // -inf lanes stay -inf past the end
    _mm256_storeu_ps(p + i, scores);
    top8 = _mm256_max_ps(top8, scores);
  }
  float top = -INFINITY;
  alignas(32) float tops[8];
  _mm256_store_ps(tops, top8);
  for (float t : tops) top = std::max(top, t);
  __m256 total8 = _mm256_setzero_ps();
  const __m256 top_v = _mm256_set1_ps(top);
  for (int64_t i = 0; i < n; i += 8) {  // lanes past the end hold -inf: e^-inf = 0, summed harmlessly
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + i), top_v));
    _mm256_storeu_ps(p + i, e);
    total8 = _mm256_add_ps(total8, e);
  }
  const __m256 inverse = _mm256_set1_ps(1.0f / horizontal_sum(total8));
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    switch (std::min<int64_t>(8, (D - d0) / 8)) {  // the accumulators in registers need a fixed count
      case 1: weighted_rows<1>(p, live.data(), n, values + d0, vs, inverse, y + d0); break;
      case 2: weighted_rows<2>(p, live.data(), n, values + d0, vs, inverse, y + d0); break;
      case 3: weighted_rows<3>(p, live.data(), n, values + d0, vs, inverse, y + d0); break;
      case 4: weighted_rows<4>(p, live.data(), n, values + d0, vs, inverse, y + d0); break;
      case 5: weighted_rows<5>(p, live.data(), n, values + d0, vs, inverse, y + d0); break;
      case 6: weighted_rows<6>(p, live.data(), n, values + d0, vs, inverse, y + d0); break;
      case 7: weighted_rows<7>(p, live.data(), n, values + d0, vs, inverse, y + d0); break;
      default: weighted_rows<8>(p, live.data(), n, values + d0, vs, inverse, y + d0);
    }
  }
}

}  // namespace pocketlm
