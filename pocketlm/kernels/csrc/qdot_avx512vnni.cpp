// The qdot kernels for CPUs with AVX-512 VNNI (see qdot.h): one 64-byte chunk feeds one dpbusd for all
// 16 rows of a block. Built with -mavx512f -mavx512bw -mavx512vl -mavx512vnni; internal linkage
// throughout (see qdot.h).
#include <immintrin.h>

#include <cstring>

#include "qdot.h"

namespace {

using pocketlm::qdot::Acts;

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Split: two accumulator chains per row (a few rows have too few independent dpbusd to hide its latency);
// with 8 rows the rows' own chains suffice and the registers are needed for them.
template <int R, bool Split = true>
void int4_tile(const Acts& a, int64_t m0, const uint8_t* words, const uint16_t* tables, float* y, int64_t ldy,
               int64_t G) {
  const int64_t K = a.K, nb = K / 32, per_group = G / 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / G; ++g) {
    __m512 part[R];
    float xs[R];
    for (int r = 0; r < R; ++r) part[r] = _mm512_setzero_ps(), xs[r] = 0.f;
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      __m512i even[R], odd[R];  // two chains: dpbusd's latency would otherwise serialise one row's 8
      for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_si512();
      for (int64_t c = 4 * b; c < 4 * b + 4; ++c) {
        const __m512i v = _mm512_loadu_si512(words + c * 64);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          const int8_t* x = a.q + (m0 + r) * K + 8 * c;
          even[r] = _mm512_dpbusd_epi32(even[r], lo, broadcast4(x));
          if (Split) {
            odd[r] = _mm512_dpbusd_epi32(odd[r], hi, broadcast4(x + 4));
          } else {
            even[r] = _mm512_dpbusd_epi32(even[r], hi, broadcast4(x + 4));
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const int64_t at = (m0 + r) * nb + b;
        const __m512i sum = Split ? _mm512_add_epi32(even[r], odd[r]) : even[r];
        part[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a.d[at]), part[r]);
        xs[r] += a.xsum[at];
      }
    }
    const uint16_t* t = tables + g * 32;
    const __m512 scales = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)));
    const __m512 mins = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 16)));
    for (int r = 0; r < R; ++r) {
      total[r] = _mm512_fmadd_ps(scales, part[r], total[r]);
      total[r] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xs[r]), total[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (m0 + r) * ldy, total[r]);
}

template <int R, bool Split = true>
void int8_tile(const Acts& a, int64_t m0, const uint8_t* codes, const float* scales, float* y, int64_t ldy) {
  const int64_t K = a.K, nb = K / 32;
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_si512();
    for (int64_t c = 8 * b; c < 8 * b + 8; c += 2) {
      const __m512i v0 = _mm512_loadu_si512(codes + c * 64), v1 = _mm512_loadu_si512(codes + (c + 1) * 64);
      for (int r = 0; r < R; ++r) {
        const int8_t* x = a.q + (m0 + r) * K + 4 * c;
        even[r] = _mm512_dpbusd_epi32(even[r], v0, broadcast4(x));
        if (Split) {
          odd[r] = _mm512_dpbusd_epi32(odd[r], v1, broadcast4(x + 4));
        } else {
          even[r] = _mm512_dpbusd_epi32(even[r], v1, broadcast4(x + 4));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * nb + b;
      const __m512i both = Split ? _mm512_add_epi32(even[r], odd[r]) : even[r];
      const __m512i sum = _mm512_sub_epi32(both, _mm512_set1_epi32(128 * a.qsum[at]));
      total[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a.d[at]), total[r]);
    }
  }
  const __m512 s = _mm512_loadu_ps(scales);
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (m0 + r) * ldy, _mm512_mul_ps(total[r], s));
}

void int4_block(const Acts& a, int64_t M, const uint8_t* words, const uint16_t* tables, float* y, int64_t ldy,
                int64_t G) {
  for (int64_t m = 0; m < M;) {
    if (M - m >= 8) {
      int4_tile<8, false>(a, m, words, tables, y, ldy, G);
      m += 8;
      continue;
    }
    switch (M - m) {
      case 1: int4_tile<1>(a, m, words, tables, y, ldy, G); m += 1; break;
      case 2: int4_tile<2>(a, m, words, tables, y, ldy, G); m += 2; break;
      case 3: int4_tile<3>(a, m, words, tables, y, ldy, G); m += 3; break;
      default: int4_tile<4>(a, m, words, tables, y, ldy, G); m += 4;
    }
  }
}

void int8_block(const Acts& a, int64_t M, const uint8_t* codes, const float* scales, float* y, int64_t ldy) {
  for (int64_t m = 0; m < M;) {
    if (M - m >= 8) {
      int8_tile<8, false>(a, m, codes, scales, y, ldy);
      m += 8;
      continue;
    }
    switch (M - m) {
      case 1: int8_tile<1>(a, m, codes, scales, y, ldy); m += 1; break;
      case 2: int8_tile<2>(a, m, codes, scales, y, ldy); m += 2; break;
      case 3: int8_tile<3>(a, m, codes, scales, y, ldy); m += 3; break;
      default: int8_tile<4>(a, m, codes, scales, y, ldy); m += 4;
    }
  }
}

int64_t peak(int64_t rounds) {
  constexpr int kChains = 12;  // enough independent chains to cover dpbusd's latency
  __m512i acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_epi32(i);
  const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
  for (int64_t r = 0; r < rounds; ++r)
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
  __m512i total = acc[0];
  for (int i = 1; i < kChains; ++i) total = _mm512_add_epi32(total, acc[i]);
  volatile int32_t sink = _mm512_reduce_add_epi32(total);  // keeps the loop from being optimised away
  (void)sink;
  return rounds * kChains * 64;
}

}  // namespace

namespace pocketlm::qdot {
const Kernels kAvx512Vnni = {"avx512vnni", &int4_block, &int8_block, &peak};
}
