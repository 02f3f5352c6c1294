// Causal self-attention for training on the CPU, forward and backward, each in one call:
// RoPE on the queries and keys, scores, softmax and the weighted sum of values, per (batch row,
// key/value head), with the queries, keys and values read where the projections wrote them
// ((batch, seq, heads, head_dim) views, no transposes) and the output written where o_proj reads it.
//
// Why: a shakespeare-char training step spent about 4 ms of 24 in attention as PyTorch ops (six small
// batched matmuls a layer, the softmax and its backward, RoPE, the transposes and copies between
// them, each a parallel region of its own); with a free attention the step took 19.6 ms (BENCHMARKS.md).
//
// Like flash attention, the backward recomputes the probabilities from the saved log-sum-exp of each
// query's scores instead of keeping them. Everything is computed in fp32 whatever the input dtype (fp32
// or bf16), and masked (future) positions are never computed. Registered as
// pocketlm::causal_attention and pocketlm::causal_attention_backward; pocketlm/train_attention.py gives
// them autograd and shapes for torch.compile.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;  // score columns computed together: two AVX2 vectors

int64_t padded(int64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

// 8 values as fp32, from fp32 or bf16 (bf16 is the top half of an fp32)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// 8 fp32 values stored as fp32, or as bf16 rounded to nearest even (as c10::BFloat16 rounds)
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
  __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m128i halves = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), halves);
}

// RoPE, rotate-half layout: x[d] cos[d] - x[d + h] sin[d] for d < h, x[d] cos[d] + x[d - h] sin[d] after;
// times scale.
template <typename T>
inline void rope(const T* x, const float* cos, const float* sin, int64_t D, float scale, float* out) {
  const int64_t h = D / 2;
  if (h % 8 == 0) {
    const __m256 sc = _mm256_set1_ps(scale);
    for (int64_t d = 0; d < h; d += 8) {
      const __m256 x1 = load8(x + d), x2 = load8(x + d + h);
      const __m256 lo = _mm256_fmsub_ps(x1, _mm256_loadu_ps(cos + d), _mm256_mul_ps(x2, _mm256_loadu_ps(sin + d)));
      const __m256 hi = _mm256_fmadd_ps(x2, _mm256_loadu_ps(cos + d + h), _mm256_mul_ps(x1, _mm256_loadu_ps(sin + d + h)));
      _mm256_storeu_ps(out + d, _mm256_mul_ps(lo, sc));
      _mm256_storeu_ps(out + d + h, _mm256_mul_ps(hi, sc));
    }
    return;
  }
  for (int64_t d = 0; d < h; ++d) out[d] = scale * (float(x[d]) * cos[d] - float(x[d + h]) * sin[d]);
  for (int64_t d = h; d < D; ++d) out[d] = scale * (float(x[d]) * cos[d] + float(x[d - h]) * sin[d]);
}

// The transpose of `rope`: the gradient of its input from the gradient of its output (times scale).
template <typename T>
inline void rope_backward(const float* g, const float* cos, const float* sin, int64_t D, float scale, T* out) {
  const int64_t h = D / 2;
  if (h % 8 == 0) {
    const __m256 sc = _mm256_set1_ps(scale);
    for (int64_t d = 0; d < h; d += 8) {
      const __m256 g1 = _mm256_loadu_ps(g + d), g2 = _mm256_loadu_ps(g + d + h);
      const __m256 lo = _mm256_fmadd_ps(g1, _mm256_loadu_ps(cos + d), _mm256_mul_ps(g2, _mm256_loadu_ps(sin + d + h)));
      const __m256 hi = _mm256_fmsub_ps(g2, _mm256_loadu_ps(cos + d + h), _mm256_mul_ps(g1, _mm256_loadu_ps(sin + d)));
      store8(out + d, _mm256_mul_ps(lo, sc));
      store8(out + d + h, _mm256_mul_ps(hi, sc));
    }
    return;
  }
  for (int64_t d = 0; d < h; ++d) out[d] = T(scale * (g[d] * cos[d] + g[d + h] * sin[d + h]));
  for (int64_t d = h; d < D; ++d) out[d] = T(scale * (g[d] * cos[d] - g[d - h] * sin[d - h]));
}

// n values converted between fp32 and T (fp32 or bf16)
template <typename From, typename To>
inline void convert(const From* x, int64_t n, To* out) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) store8(out + j, load8(x + j));
  for (; j < n; ++j) out[j] = To(float(x[j]));
}

// exp(x) of 8 lanes for x <= 0 (softmax arguments): 2^m e^r with m = round(x / ln 2), |r| <= ln(2) / 2,
// and e^r by its Taylor series to degree 7 (relative error under 1e-8, below fp32's rounding). Arguments
// are clamped to [-87, 0]: below -87 the true value is under 1e-38.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_setzero_ps()), _mm256_set1_ps(-87.f));
  const __m256 m = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(m, _mm256_set1_ps(0.693359375f), x);  // x - m ln 2, ln 2 split for exactness
  r = _mm256_fmadd_ps(m, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 e = _mm256_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(c));
  const __m256i two_m = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(m), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(e, _mm256_castsi256_ps(two_m));
}

// p[j] = exp(p[j] - shift) for j < n, where p[j] <= shift; p holds padded(n) floats (those past n are
// overwritten with junk).
inline void exp_shifted(float* p, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  for (int64_t j = 0; j < n; j += 8) _mm256_storeu_ps(p + j, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + j), s)));
}

// the 8 x 8 block at x (rows ldx apart) transposed into out (rows ldo apart)
inline void transpose8(const float* x, int64_t ldx, float* out, int64_t ldo) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(x + i * ldx);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // r[0..3] hold columns 0, 1, 2, 3 of rows 0-3 (low lanes) and 4-7 of rows 0-3 (high); r[4..7] the same of rows 4-7
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

inline float horizontal_sum(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// sum_{j < n} x[j] y[j] (y = nullptr: sum of x), vectorized (the compiler keeps float sums in order)
inline float row_dot(const float* x, const float* y, int64_t n) {
  __m256 a = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    a = y ? _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j), a) : _mm256_add_ps(a, _mm256_loadu_ps(x + j));
  float total = horizontal_sum(a);
  for (; j < n; ++j) total += y ? x[j] * y[j] : x[j];
  return total;
}

inline float row_max(const float* x, int64_t n) {
  __m256 a = _mm256_set1_ps(x[0]);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) a = _mm256_max_ps(a, _mm256_loadu_ps(x + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, a);
  float m = *std::max_element(lanes, lanes + 8);
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// C (rows x cols) (+)= A (rows x K) B (K x cols) for rows <= 4 and cols = 16, on register blocks: 8
// accumulators, enough independent FMAs to keep both FMA units busy (each waits 4 cycles for the last).
// A(r, k) is A[r * ar + k * ak] (so a transposed A needs no copy); B's rows are contiguous, ldb apart;
// k runs over [k0, k1).
template <int R>
inline void block(const float* A, int64_t ar, int64_t ak, const float* B, int64_t ldb, float* C, int64_t ldc,
                  int64_t k0, int64_t k1, bool accumulate) {
  __m256 c[R][2];
  for (int r = 0; r < R; ++r) {
    c[r][0] = accumulate ? _mm256_loadu_ps(C + r * ldc) : _mm256_setzero_ps();
    c[r][1] = accumulate ? _mm256_loadu_ps(C + r * ldc + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = k0; k < k1; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * ar + k * ak);
      c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(C + r * ldc, c[r][0]);
    _mm256_storeu_ps(C + r * ldc + 8, c[r][1]);
  }
}

// Which products of a causal attention a row block needs, for rows m0..m1-1 of an M-row product:
//   Full:    k over [0, K), all columns          (S = Q K^T, dP = dO V^T: columns cut by `causal_cols`)
//   Lower:   k over [0, m1)                       (P V, dS K: P and dS are zero past the diagonal)
//   Upper:   k over [m0, K)                       (P^T dO, dS^T Q: their transposes are zero before it)
enum class Range { Full, Lower, Upper };

// C (M x N) (+)= A (M x K) B (K x N), N a multiple of 16. With causal_cols, row block m0..m1 computes
// only the columns up to m1 (rounded up to 16): the rest are above the diagonal.
inline void product(const float* A, int64_t ar, int64_t ak, const float* B, int64_t ldb, float* C, int64_t ldc,
                    int64_t M, int64_t N, int64_t K, Range range, bool causal_cols, bool accumulate) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t rows = std::min<int64_t>(4, M - m0), m1 = m0 + rows;
    const int64_t k0 = range == Range::Upper ? m0 : 0, k1 = range == Range::Lower ? std::min(K, m1) : K;
    const int64_t n1 = causal_cols ? std::min(N, padded(m1)) : N;
    for (int64_t n0 = 0; n0 < n1; n0 += 16) {
      const float* a = A + m0 * ar;
      float* c = C + m0 * ldc + n0;
      switch (rows) {
        case 4: block<4>(a, ar, ak, B + n0, ldb, c, ldc, k0, k1, accumulate); break;
        case 3: block<3>(a, ar, ak, B + n0, ldb, c, ldc, k0, k1, accumulate); break;
        case 2: block<2>(a, ar, ak, B + n0, ldb, c, ldc, k0, k1, accumulate); break;
        default: block<1>(a, ar, ak, B + n0, ldb, c, ldc, k0, k1, accumulate);
      }
    }
  }
}

struct Shape {
  int64_t B, T, H, G, D;  // batch, positions, query heads, key/value heads, head dim
  int64_t group() const { return H / G; }
};

Shape check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
            const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "causal_attention: q, k, v must be (batch, seq, heads, head_dim)");
  Shape s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == s.B && k.size(1) == s.T && k.size(3) == s.D,
              "causal_attention: k and v must be (batch, seq, kv_heads, head_dim) like q, got ", k.sizes(),
              " and ", v.sizes(), " for q ", q.sizes());
  TORCH_CHECK(s.G > 0 && s.H % s.G == 0, "causal_attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(s.D % 2 == 0, "causal_attention: head_dim must be even (RoPE)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "causal_attention: q, k, v must share one dtype, fp32 or bf16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "causal_attention: head_dim must be the innermost, contiguous dimension");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == s.T && cos.size(1) == s.D &&
                  sin.sizes() == cos.sizes(),
              "causal_attention: cos and sin must be contiguous fp32 (seq, head_dim)");
  return s;
}

// One task's working matrices, fp32, for a (batch row, kv head): its keys and values, and per query head
// the queries, the scores / probabilities and, backward, their gradients. Rows of D values are padded to
// Dp (a multiple of 16) and rows of positions to Tp, with zeros, so products run on whole blocks.
struct Workspace {
  int64_t T, D, Tp, Dp;
  // (T, Dp) but kt, vt (D, Tp); p, dp (T, Tp); o (the forward's output) (T, Dp)
  std::vector<float> q, k, v, kt, vt, p, dp, go, dq, dk, dv, o;

  Workspace(int64_t T, int64_t D, bool backward)
      : T(T), D(D), Tp(padded(T)), Dp(padded(D)), q(T * Dp, 0.f), k(T * Dp, 0.f),
        v(T * Dp, 0.f), kt(D * Tp, 0.f), vt(backward ? D * Tp : 0, 0.f), p(T * Tp, 0.f),
        dp(backward ? T * Tp : 0, 0.f), go(backward ? T * Dp : 0, 0.f), dq(backward ? T * Dp : 0, 0.f),
        dk(backward ? T * Dp : 0, 0.f), dv(backward ? T * Dp : 0, 0.f), o(backward ? 0 : T * Dp, 0.f) {}

  // This thread's workspace for the shape, kept between calls: a training step calls the kernels 8 times
  // a thread, and fresh zeroed vectors each time went through malloc's slow paths. Every call writes what
  // it reads except the zero padding, which no call writes.
  static Workspace& cached(int64_t T, int64_t D, bool backward) {
    thread_local std::unique_ptr<Workspace> forward_space, backward_space;
    auto& w = backward ? backward_space : forward_space;
    if (!w || w->T != T || w->D != D) w = std::make_unique<Workspace>(T, D, backward);
    return *w;
  }

  // keys (RoPE applied) and values of one kv head, rows kst / vst apart, both also transposed (the values
  // only for the backward: vt is empty in the forward)
  template <typename T_>
  void load_keys_values(const T_* kp, int64_t kst, const T_* vp, int64_t vst, const float* cos, const float* sin) {
    for (int64_t j = 0; j < T; ++j) {
      rope(kp + j * kst, cos + j * D, sin + j * D, D, 1.f, &k[j * Dp]);
      convert(vp + j * vst, D, &v[j * Dp]);
    }
    transpose(k.data(), kt.data());
    if (!vt.empty()) transpose(v.data(), vt.data());
  }

  // (T, Dp) -> (D, Tp), 8 x 8 blocks at a time in registers (strided scalar copies were a quarter of the
  // forward's time)
  void transpose(const float* x, float* xt) const {
    int64_t j0 = 0;
    for (; j0 + 8 <= T; j0 += 8) {
      int64_t d0 = 0;
      for (; d0 + 8 <= D; d0 += 8) transpose8(x + j0 * Dp + d0, Dp, xt + d0 * Tp + j0, Tp);
      for (; d0 < D; ++d0)
        for (int64_t j = j0; j < j0 + 8; ++j) xt[d0 * Tp + j] = x[j * Dp + d0];
    }
    for (; j0 < T; ++j0)
      for (int64_t d = 0; d < D; ++d) xt[d * Tp + j0] = x[j0 * Dp + d];
  }

  // queries of one head, RoPE applied and scaled by 1/sqrt(D)
  template <typename T_>
  void load_queries(const T_* qp, int64_t qst, const float* cos, const float* sin, float scale) {
    for (int64_t i = 0; i < T; ++i) rope(qp + i * qst, cos + i * D, sin + i * D, D, scale, &q[i * Dp]);
  }

  // Forward: p = softmax of the causal scores q k^T, row by row from each row's maximum; writes each row's
  // log-sum-exp to lse. Backward (saved_lse given, lse null): p again, from the log-sum-exp saved then.
  // Zero past the diagonal either way.
  void probabilities(const float* saved_lse, float* lse) {
    product(q.data(), Dp, 1, kt.data(), Tp, p.data(), Tp, T, Tp, D, Range::Full, true, false);
    for (int64_t i = 0; i < T; ++i) {
      float* row = &p[i * Tp];
      const int64_t n = i + 1;
      const float shift = saved_lse ? saved_lse[i] : row_max(row, n);
      exp_shifted(row, n, shift);
      std::fill(row + n, row + Tp, 0.f);
      if (lse) {
        const float total = row_dot(row, nullptr, n), inverse = 1.f / total;
        for (int64_t j = 0; j < n; ++j) row[j] *= inverse;
        lse[i] = shift + std::log(total);
      }
    }
  }
};

template <typename T>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* cos, const float* sin,
             const Shape s, at::Tensor& out, at::Tensor& lse) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const float scale = 1.f / std::sqrt(float(s.D));
  at::parallel_for(0, s.B * s.G, 1, [&](int64_t begin, int64_t end) {
    Workspace& w = Workspace::cached(s.T, s.D, false);
    std::vector<float>& o = w.o;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.G, g = task % s.G;
      w.load_keys_values(kp + b * k.stride(0) + g * k.stride(2), k.stride(1), vp + b * v.stride(0) + g * v.stride(2),
                         v.stride(1), cos, sin);
      for (int64_t h = g * s.group(); h < (g + 1) * s.group(); ++h) {
        w.load_queries(qp + b * q.stride(0) + h * q.stride(2), q.stride(1), cos, sin, scale);
        w.probabilities(nullptr, lp + (b * s.H + h) * s.T);
        product(w.p.data(), w.Tp, 1, w.v.data(), w.Dp, o.data(), w.Dp, s.T, w.Dp, s.T, Range::Lower, false, false);
        for (int64_t i = 0; i < s.T; ++i) {
          convert(&o[i * w.Dp], s.D, op + ((b * s.T + i) * s.H + h) * s.D);
        }
      }
    }
  });
}

template <typename T>
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const float* cos, const float* sin, const float* lp, const Shape s, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv) {
  const T* gp = dout.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  const float scale = 1.f / std::sqrt(float(s.D));
  at::parallel_for(0, s.B * s.G, 1, [&](int64_t begin, int64_t end) {
    Workspace& w = Workspace::cached(s.T, s.D, true);
    const int64_t Tp = w.Tp, Dp = w.Dp, D = s.D;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.G, g = task % s.G;
      w.load_keys_values(kp + b * k.stride(0) + g * k.stride(2), k.stride(1), vp + b * v.stride(0) + g * v.stride(2),
                         v.stride(1), cos, sin);
      for (int64_t h = g * s.group(); h < (g + 1) * s.group(); ++h) {
        const bool first = h == g * s.group();
        w.load_queries(qp + b * q.stride(0) + h * q.stride(2), q.stride(1), cos, sin, scale);
        w.probabilities(lp + (b * s.H + h) * s.T, nullptr);
        for (int64_t i = 0; i < s.T; ++i) {
          convert(gp + ((b * s.T + i) * s.H + h) * D, D, &w.go[i * Dp]);
        }
        // dL/dp = dout v^T, then dL/dscores = p (dL/dp - rowsum(p dL/dp)) (that rowsum is dout . out)
        product(w.go.data(), Dp, 1, w.vt.data(), Tp, w.dp.data(), Tp, s.T, Tp, D, Range::Full, true, false);
        for (int64_t i = 0; i < s.T; ++i) {
          const float* pi = &w.p[i * Tp];
          float* di = &w.dp[i * Tp];
          const float dot = row_dot(pi, di, i + 1);
          for (int64_t j = 0; j <= i; ++j) di[j] = pi[j] * (di[j] - dot);
          std::fill(di + i + 1, di + Tp, 0.f);
        }
        // the scaled, rotated queries' gradient dS k; keys' dS^T q; values' p^T dout (summed over the group)
        product(w.dp.data(), Tp, 1, w.k.data(), Dp, w.dq.data(), Dp, s.T, Dp, s.T, Range::Lower, false, false);
        product(w.dp.data(), 1, Tp, w.q.data(), Dp, w.dk.data(), Dp, s.T, Dp, s.T, Range::Upper, false, !first);
        product(w.p.data(), 1, Tp, w.go.data(), Dp, w.dv.data(), Dp, s.T, Dp, s.T, Range::Upper, false, !first);
        for (int64_t i = 0; i < s.T; ++i)
          rope_backward(&w.dq[i * Dp], cos + i * D, sin + i * D, D, scale, dqp + ((b * s.T + i) * s.H + h) * D);
      }
      for (int64_t j = 0; j < s.T; ++j) {
        const int64_t at = ((b * s.T + j) * s.G + g) * D;
        rope_backward(&w.dk[j * Dp], cos + j * D, sin + j * D, D, 1.f, dkp + at);
        convert(&w.dv[j * Dp], D, dvp + at);
      }
    }
  });
}

// -> (out (batch, seq, heads, head_dim) contiguous, lse (batch, heads, seq) fp32)
std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& cos, const at::Tensor& sin) {
  const Shape s = check(q, k, v, cos, sin);
  at::Tensor out = at::empty({s.B, s.T, s.H, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.T}, q.options().dtype(at::kFloat));
  if (q.scalar_type() == at::kBFloat16)
    forward<c10::BFloat16>(q, k, v, cos.data_ptr<float>(), sin.data_ptr<float>(), s, out, lse);
  else
    forward<float>(q, k, v, cos.data_ptr<float>(), sin.data_ptr<float>(), s, out, lse);
  return {out, lse};
}

// -> (dq, dk, dv), each contiguous in its input's shape
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
    const at::Tensor& sin, const at::Tensor& lse) {
  const Shape s = check(q, k, v, cos, sin);
  const at::Tensor g = dout.to(q.scalar_type()).contiguous();
  const at::Tensor l = lse.contiguous();
  TORCH_CHECK(g.sizes() == q.sizes() && l.scalar_type() == at::kFloat,
              "causal_attention_backward: dout must be shaped like q and lse fp32");
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.scalar_type() == at::kBFloat16)
    backward<c10::BFloat16>(g, q, k, v, cos.data_ptr<float>(), sin.data_ptr<float>(), l.data_ptr<float>(), s, dq, dk, dv);
  else
    backward<float>(g, q, k, v, cos.data_ptr<float>(), sin.data_ptr<float>(), l.data_ptr<float>(), s, dq, dk, dv);
  return {dq, dk, dv};
}

// Autograd for causal_attention in C++, not Python (torch.library.register_autograd): a compiled graph
// calls the op through the dispatcher's Autograd key, so a Python autograd kernel took the GIL four times
// a forward (once a layer), in the middle of a batch thread's compiled forward. Both ops are called
// through the dispatcher, so torch.compile traces them as ops.
class CausalAttention : public torch::autograd::Function<CausalAttention> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                                const at::Tensor& sin) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("pocketlm::causal_attention", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                          const at::Tensor&, const at::Tensor&,
                                                                          const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = op.call(q, k, v, cos, sin);
    ctx->save_for_backward({q, k, v, cos, sin, lse});
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("pocketlm::causal_attention_backward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    const auto saved = ctx->get_saved_variables();
    auto [dq, dk, dv] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5]);
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> causal_attention_autograd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cos,
                                                             const at::Tensor& sin) {
  auto outs = CausalAttention::apply(q, k, v, cos, sin);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pocketlm, m) {
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, "
        "Tensor lse) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pocketlm, CPU, m) {
  m.impl("causal_attention", &causal_attention);
  m.impl("causal_attention_backward", &causal_attention_backward);
}

TORCH_LIBRARY_IMPL(pocketlm, Autograd, m) { m.impl("causal_attention", &causal_attention_autograd); }
