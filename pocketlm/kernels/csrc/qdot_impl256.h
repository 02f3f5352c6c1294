// The 256-bit qdot kernels (see qdot.h), included by qdot_avx2.cpp (QDOT_VNNI 0: maddubs and madd) and
// qdot_avxvnni.cpp (QDOT_VNNI 1: AVX-VNNI's dpbusd). A 16-row block is done as two halves of 8 rows,
// bytes 0..31 and 32..63 of each chunk. Everything here has internal linkage (see qdot.h).
#include <immintrin.h>

#include <cstring>

#include "qdot.h"

namespace {

using pocketlm::qdot::Acts;

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// M rows (R at a time) times 8 rows of an int4 block (half h of each 64-byte chunk).
template <int R>
void int4_half(const Acts& a, int64_t m0, const uint8_t* words, const uint16_t* tables, float* y, int64_t ldy,
               int64_t G, int h) {
  const int64_t K = a.K, nb = K / 32, per_group = G / 32;
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / G; ++g) {
    __m256 part[R];
    float xs[R];
    for (int r = 0; r < R; ++r) part[r] = _mm256_setzero_ps(), xs[r] = 0.f;
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      for (int64_t c = 4 * b; c < 4 * b + 4; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + c * 64 + 32 * h));
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          const int8_t* x = a.q + (m0 + r) * K + 8 * c;
#if QDOT_VNNI
          acc[r] = _mm256_dpbusd_avx_epi32(acc[r], lo, broadcast4(x));
          acc[r] = _mm256_dpbusd_avx_epi32(acc[r], hi, broadcast4(x + 4));
#else
          // 16-bit sums: codes <= 15 and |x| <= 127 keep the block's 8 pair sums within 8 * 3810
          acc[r] = _mm256_add_epi16(acc[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(x)),
                                                             _mm256_maddubs_epi16(hi, broadcast4(x + 4))));
#endif
        }
      }
      for (int r = 0; r < R; ++r) {
#if !QDOT_VNNI
        acc[r] = _mm256_madd_epi16(acc[r], _mm256_set1_epi16(1));
#endif
        const int64_t at = (m0 + r) * nb + b;
        part[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(a.d[at]), part[r]);
        xs[r] += a.xsum[at];
      }
    }
    const uint16_t* t = tables + g * 32 + 8 * h;
    const __m256 scales = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
    const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16)));
    for (int r = 0; r < R; ++r) {
      total[r] = _mm256_fmadd_ps(scales, part[r], total[r]);
      total[r] = _mm256_fmadd_ps(mins, _mm256_set1_ps(xs[r]), total[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + (m0 + r) * ldy + 8 * h, total[r]);
}

// M rows (R at a time) times 8 rows of an int8 block (half h).
template <int R>
void int8_half(const Acts& a, int64_t m0, const uint8_t* codes, const float* scales, float* y, int64_t ldy, int h) {
  const int64_t K = a.K, nb = K / 32;
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t c = 8 * b; c < 8 * b + 8; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c * 64 + 32 * h));
#if QDOT_VNNI
      for (int r = 0; r < R; ++r) acc[r] = _mm256_dpbusd_avx_epi32(acc[r], v, broadcast4(a.q + (m0 + r) * K + 4 * c));
#else
      // the codes signed again, and llama.cpp's sign trick: |w| * (x with w's sign) = w * x, as u8 x s8
      const __m256i w = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
      const __m256i magnitude = _mm256_sign_epi8(w, w);
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_sign_epi8(broadcast4(a.q + (m0 + r) * K + 4 * c), w);
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, x), _mm256_set1_epi16(1)));
      }
#endif
    }
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * nb + b;
#if QDOT_VNNI
      acc[r] = _mm256_sub_epi32(acc[r], _mm256_set1_epi32(128 * a.qsum[at]));  // the codes' +128
#endif
      total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(a.d[at]), total[r]);
    }
  }
  const __m256 s = _mm256_loadu_ps(scales + 8 * h);
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + (m0 + r) * ldy + 8 * h, _mm256_mul_ps(total[r], s));
}

void int4_block(const Acts& a, int64_t M, const uint8_t* words, const uint16_t* tables, float* y, int64_t ldy,
                int64_t G) {
  for (int h = 0; h < 2; ++h)
    for (int64_t m = 0; m < M;) {
      switch (M - m) {
        case 1: int4_half<1>(a, m, words, tables, y, ldy, G, h); m += 1; break;
        case 2: int4_half<2>(a, m, words, tables, y, ldy, G, h); m += 2; break;
        case 3: int4_half<3>(a, m, words, tables, y, ldy, G, h); m += 3; break;
        default: int4_half<4>(a, m, words, tables, y, ldy, G, h); m += 4;
      }
    }
}

void int8_block(const Acts& a, int64_t M, const uint8_t* codes, const float* scales, float* y, int64_t ldy) {
  for (int h = 0; h < 2; ++h)
    for (int64_t m = 0; m < M;) {
      switch (M - m) {
        case 1: int8_half<1>(a, m, codes, scales, y, ldy, h); m += 1; break;
        case 2: int8_half<2>(a, m, codes, scales, y, ldy, h); m += 2; break;
        case 3: int8_half<3>(a, m, codes, scales, y, ldy, h); m += 3; break;
        default: int8_half<4>(a, m, codes, scales, y, ldy, h); m += 4;
      }
    }
}

int64_t peak(int64_t rounds) {
  constexpr int kChains = 12;  // enough independent chains to cover the instructions' latency
  __m256i acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_epi32(i);
  const __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2);
  for (int64_t r = 0; r < rounds; ++r)
    for (int i = 0; i < kChains; ++i) {
#if QDOT_VNNI
      acc[i] = _mm256_dpbusd_avx_epi32(acc[i], a, b);
#else
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
    }
  __m256i total = acc[0];
  for (int i = 1; i < kChains; ++i) total = _mm256_add_epi32(total, acc[i]);
  volatile int32_t sink = _mm256_extract_epi32(total, 0);  // keeps the loop from being optimised away
  (void)sink;
  return rounds * kChains * 32;
}

}  // namespace
