// pocketlm's fp32-activation kernels (AVX2) for decoding: weight-only quantized linear layers with a few input rows, and
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
#include <torch/library.h>

#include "kernels.h"

namespace {

using namespace pocketlm;

void check_input(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "pocketlm kernels: input must be (rows, ", K, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "pocketlm kernels: input must be a contiguous fp32 CPU tensor");
}

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
      int4_rows(scaled.data(), group_sums.data(), M, wp[i] + b * K, tp[i] + b * (K / G) * 2 * kLanes,
                yp + kLanes * u, N, K, G);
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
      int8_rows(xp, M, wp[i] + r * K, K, yp + n, N);
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] *= sp[i][r];
    }
  });
  return y;
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
  const int64_t ks = k.stride(2), vs = v.stride(2), kb = k.stride(0), kh = k.stride(1), vb = v.stride(0),
                vh = v.stride(1);
  // one work item per query head: SmolLM2 has 3 key/value heads, which 2 threads would split 2:1
  at::parallel_for(0, B * H * G, 1, [=](int64_t begin, int64_t end) {  // by value: no reloads through references
    std::vector<float> p(S + 8);
    std::vector<int64_t> live;  // the positions the mask lets through
    for (int64_t item = begin; item < end; ++item) {
      const int64_t u = item / G, b = u / H, h = u % H;
      live.clear();
      for (int64_t j = 0; j < S; ++j)
        if (mp[b * S + j]) live.push_back(j);
      attend(qp + item * D, kp + b * kb + h * kh, ks, vp + b * vb + h * vh, vs, D, live, p.data(), yp + item * D);
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
