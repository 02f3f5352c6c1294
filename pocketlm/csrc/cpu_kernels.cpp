// pocketlm's AVX2 kernels for decoding: weight-only quantized linear layers with a few input rows, and
// attention of one query over the KV cache.
//
// Built on first use by pocketlm/cpu_kernels.py and registered as torch ops (pocketlm::int4_linear,
// pocketlm::int8_linear, pocketlm::decode_attention), so eager code and torch.compile'd graphs call them
// alike. Why they exist: on CPUs without AVX-512, inductor cannot load 8 int8 codes into a vector without
// a stack copy, and its int4 loop was bound by arithmetic (a compiled int4 SmolLM2 step took 15.8 ms with
// it, 11.4-12.0 with these). Products are fp32 and exact, as in the dequantized matmul; only the order of
// the sums differs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kLanes = 8;  // output rows per int4 block: one AVX2 vector of fp32

// The input row in the form the int4 loop reads: x[8w + k] / 16^k for k < 7 (the code at bits 4k..4k+3
// is used in place, as code * 16^k, so the product needs no shift; 16^-k is a power of two, so exact)
// and x[8w + 7] as is (that code is shifted down: masked in place it would make the int32 negative).
// Also the sum of x over each group, for the groups' mins.
void prescale_row(const float* x, int64_t K, int64_t G, float* scaled, float* group_sums) {
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

void check_input(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "pocketlm kernels: input must be (rows, ", K, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "pocketlm kernels: input must be a contiguous fp32 CPU tensor");
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

// x (M, K) fp32; words[i] (N_i/8, K/8, 8) int32; tables[i] (N_i/8, K/G, 2, 8) fp16 -> (M, sum N_i) fp32
at::Tensor int4_linear(const at::Tensor& x, at::TensorList words, at::TensorList tables, int64_t G) {
  TORCH_CHECK(!words.empty() && words.size() == tables.size(), "pocketlm::int4_linear: one table per code tensor");
  const int64_t M = x.size(0), K = 8 * words[0].size(1);
  check_input(x, K);
  TORCH_CHECK(G % 8 == 0 && K % G == 0, "pocketlm::int4_linear: group size ", G, " must divide ", K, " in multiples of 8");
  std::vector<int64_t> blocks;
  std::vector<const int32_t*> wp;
  std::vector<const uint16_t*> tp;
  for (size_t i = 0; i < words.size(); ++i) {
    const at::Tensor &w = words[i], &t = tables[i];
    TORCH_CHECK(w.dim() == 3 && w.size(1) == K / 8 && w.size(2) == kLanes && w.scalar_type() == at::kInt &&
                    w.is_contiguous(), "pocketlm::int4_linear: words must be contiguous int32 (blocks, in/8, 8)");
    TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.numel() == w.size(0) * (K / G) * 2 * kLanes,
                "pocketlm::int4_linear: tables must be contiguous fp16 (blocks, groups, 2, 8)");
    blocks.push_back(w.size(0));
    wp.push_back(w.data_ptr<int32_t>());
    tp.push_back(reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()));
  }
  const Matrices mats(blocks);
  const int64_t N = kLanes * mats.total();
  std::vector<float> scaled(M * K), group_sums(M * (K / G));
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) prescale_row(xp + m * K, K, G, &scaled[m * K], &group_sums[m * (K / G)]);
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, mats.total(), 4, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t i = mats.which(u), b = u - mats.first[i];
      for (int64_t m = 0; m < M; ++m)  // the block's codes stay in L1 for the other rows
        int4_block(&scaled[m * K], &group_sums[m * (K / G)], wp[i] + b * K, tp[i] + b * (K / G) * 2 * kLanes,
                   yp + m * N + kLanes * u, K, G);
    }
  });
  return y;
}

// x (M, K) fp32; codes[i] (N_i, K) int8 with scales[i] (N_i,) fp32 -> (M, sum N_i) fp32
at::Tensor int8_linear(const at::Tensor& x, at::TensorList codes, at::TensorList scales) {
  TORCH_CHECK(!codes.empty() && codes.size() == scales.size(), "pocketlm::int8_linear: one scale vector per code tensor");
  const int64_t M = x.size(0), K = codes[0].size(1);
  check_input(x, K);
  std::vector<int64_t> rows;
  std::vector<const int8_t*> wp;
  std::vector<const float*> sp;
  for (size_t i = 0; i < codes.size(); ++i) {
    const at::Tensor &c = codes[i], &s = scales[i];
    TORCH_CHECK(c.dim() == 2 && c.size(1) == K && c.scalar_type() == at::kChar && c.is_contiguous(),
                "pocketlm::int8_linear: codes must be contiguous int8 (out, in)");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == c.size(0),
                "pocketlm::int8_linear: scales must be contiguous fp32 (out,)");
    rows.push_back(c.size(0));
    wp.push_back(c.data_ptr<int8_t>());
    sp.push_back(s.data_ptr<float>());
  }
  const Matrices mats(rows);
  const int64_t N = mats.total();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 32, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t i = mats.which(n), r = n - mats.first[i];
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = int8_dot(xp + m * K, wp[i] + r * K, K) * sp[i][r];
    }
  });
  return y;
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

// Attention of one query per (row, head) over a key/value cache: the decode step's attention.
// q (B, Hkv, G, D) fp32 contiguous, G query heads per key/value head; k, v (B, Hkv, S, D) fp32 with
// unit stride in D (views of the cache's first S positions); mask (B, S) bool, true where a position
// may be attended to. Masked positions are skipped, not computed. Returns (B, Hkv, G, D).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous() && q.size(3) % 8 == 0,
              "pocketlm::decode_attention: q must be contiguous fp32 (rows, kv_heads, group, head_dim % 8 == 0)");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), S = k.size(2);
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == H && t->size(2) == S && t->size(3) == D &&
                    t->stride(3) == 1 && t->scalar_type() == at::kFloat,
                "pocketlm::decode_attention: k and v must be fp32 (rows, kv_heads, positions, head_dim)");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.numel() == B * S,
              "pocketlm::decode_attention: mask must be contiguous bool with rows * positions elements");
  at::Tensor y = at::empty(q.sizes(), q.options());
  const float* qp = q.data_ptr<float>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* yp = y.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t ks = k.stride(2), vs = v.stride(2), kb = k.stride(0), kh = k.stride(1), vb = v.stride(0),
                vh = v.stride(1);
  // one work item per query head: SmolLM2 has 3 key/value heads, which 2 threads would split 2:1
  at::parallel_for(0, B * H * G, 1, [=](int64_t begin, int64_t end) {  // by value: no reloads through references
    std::vector<float> p(S);
    std::vector<int64_t> live;  // the positions the mask lets through
    for (int64_t item = begin; item < end; ++item) {
      const int64_t u = item / G, b = u / H, h = u % H;
      const float* keys = kp + b * kb + h * kh;
      const float* values = vp + b * vb + h * vh;
      const float* query = qp + item * D;
      live.clear();
      for (int64_t j = 0; j < S; ++j)
        if (mp[b * S + j]) live.push_back(j);
      const int64_t n = static_cast<int64_t>(live.size());
      float top = -INFINITY, total = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        const float* key = keys + live[i] * ks;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        int64_t d = 0;
        for (; d + 16 <= D; d += 16) {
          a0 = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), _mm256_loadu_ps(key + d), a0);
          a1 = _mm256_fmadd_ps(_mm256_loadu_ps(query + d + 8), _mm256_loadu_ps(key + d + 8), a1);
        }
        if (d < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), _mm256_loadu_ps(key + d), a0);
        p[i] = horizontal_sum(_mm256_add_ps(a0, a1)) * scale;  // packed: the i-th live position
        top = std::max(top, p[i]);
      }
      for (int64_t i = 0; i < n; ++i) total += (p[i] = std::exp(p[i] - top));
      const __m256 inverse = _mm256_set1_ps(1.0f / total);
      float* y_row = yp + item * D;
      for (int64_t d0 = 0; d0 < D; d0 += 64) {
        float* y_chunk = y_row + d0;
        const float* v_chunk = values + d0;
        switch (std::min<int64_t>(8, (D - d0) / 8)) {  // the accumulators in registers need a fixed count
          case 1: weighted_rows<1>(p.data(), live.data(), n, v_chunk, vs, inverse, y_chunk); break;
          case 2: weighted_rows<2>(p.data(), live.data(), n, v_chunk, vs, inverse, y_chunk); break;
          case 3: weighted_rows<3>(p.data(), live.data(), n, v_chunk, vs, inverse, y_chunk); break;
          case 4: weighted_rows<4>(p.data(), live.data(), n, v_chunk, vs, inverse, y_chunk); break;
          case 5: weighted_rows<5>(p.data(), live.data(), n, v_chunk, vs, inverse, y_chunk); break;
          case 6: weighted_rows<6>(p.data(), live.data(), n, v_chunk, vs, inverse, y_chunk); break;
          case 7: weighted_rows<7>(p.data(), live.data(), n, v_chunk, vs, inverse, y_chunk); break;
          default: weighted_rows<8>(p.data(), live.data(), n, v_chunk, vs, inverse, y_chunk);
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(pocketlm, m) {
  m.def("int4_linear(Tensor x, Tensor[] words, Tensor[] tables, int group_size) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor[] codes, Tensor[] scales) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(pocketlm, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("decode_attention", &decode_attention);
}
