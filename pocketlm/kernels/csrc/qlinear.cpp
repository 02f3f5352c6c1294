// The qdot ops (see qdot.h): pocketlm::qdot_int4 and pocketlm::qdot_int8 quantize their input rows to int8
// and multiply them with weights in qdot's layout; pocketlm::qdot_use and pocketlm::qdot_isa choose and
// name the instruction set. Also the activation quantizer and the run-time choice the whole decode step
// shares.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>

#include "kernels.h"
#include "qdot.h"

namespace pocketlm::qdot {

void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* qsum, float* xsum) {
  const int64_t nb = K / kBlock;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* v = x + m * K + b * kBlock;
      __m256 a[4], top = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        a[i] = _mm256_loadu_ps(v + 8 * i);
        top = _mm256_max_ps(top, _mm256_andnot_ps(sign, a[i]));
        sum = _mm256_add_ps(sum, a[i]);
      }
      __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
      t = _mm_max_ps(t, _mm_movehl_ps(t, t));
      const float amax = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
      // as the reference in tests/test_qdot.py: scale amax / 127, codes round(x * (127 / amax)), ties to even
      const __m256 inverse = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m256i c[4];
      for (int i = 0; i < 4; ++i) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(a[i], inverse));  // rounds to even
      // int32 -> int8 with saturation (|codes| <= 127 already); packs interleave 128-bit lanes, the permute undoes it
      const __m256i w16 = _mm256_packs_epi32(c[0], c[1]), w16b = _mm256_packs_epi32(c[2], c[3]);
      const __m256i w8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, w16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + m * K + b * kBlock), w8);
      const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      const float total = horizontal_sum(sum);
      // a NaN or infinity in the block: its scale is NaN, so the outputs are too (and the caller sees the
      // failure) instead of finite values from meaningless codes
      d[m * nb + b] = std::isfinite(total) ? amax / 127.f : NAN;
      qsum[m * nb + b] = _mm_cvtsi128_si32(s);
      xsum[m * nb + b] = total;
    }
}

bool supported(const Kernels& k) {
  __builtin_cpu_init();
  if (&k == &kAvx512Vnni)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  if (&k == &kAvxVnni) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

namespace {
const Kernels* const kAll[] = {&kAvx512Vnni, &kAvxVnni, &kAvx2};  // best first

const Kernels* best() {
  for (const Kernels* k : kAll)
    if (supported(*k)) return k;
  return &kAvx2;  // the library is only loaded on CPUs with AVX2
}

const Kernels*& chosen() {
  static const Kernels* k = best();
  return k;
}
}  // namespace

const Kernels& active() { return *chosen(); }

bool use(const char* name) {
  for (const Kernels* k : kAll)
    if (std::strcmp(k->name, name) == 0 && supported(*k)) {
      chosen() = k;
      return true;
    }
  return false;
}

// The input of one or more products, quantized once: the arrays behind `Acts`.
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d, xsum;
  std::vector<int32_t> qsum;
  Acts acts{};

  void quantize(const float* x, int64_t M, int64_t K) {
    q.resize(M * K);
    d.resize(M * K / kBlock), xsum.resize(M * K / kBlock), qsum.resize(M * K / kBlock);
    quantize_rows(x, M, K, q.data(), d.data(), qsum.data(), xsum.data());
    acts = Acts{q.data(), d.data(), qsum.data(), xsum.data(), K};
  }
};

}  // namespace pocketlm::qdot

namespace {

using namespace pocketlm;
using qdot::kRows;

void check_input(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && K % qdot::kBlock == 0, "pocketlm qdot: input must be (rows, ", K,
              ") with a multiple of 32 columns, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "pocketlm qdot: input must be a contiguous fp32 CPU tensor");
}

// x (M, K) quantized once, then block(acts, i, b, y, ldy) for every 16-row block b of matrix i (blocks[i] of
// them), across torch's threads, the matrices' outputs side by side -> (M, 16 * total blocks) fp32.
template <typename Block>
at::Tensor products(const at::Tensor& x, const std::vector<int64_t>& blocks, const Block& block) {
  const int64_t M = x.size(0), K = x.size(1);
  const Matrices mats(blocks);
  const int64_t N = kRows * mats.total();
  qdot::QuantizedRows in;
  in.quantize(x.data_ptr<float>(), M, K);
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, mats.total(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t i = mats.which(u);
      block(in.acts, i, u - mats.first[i], yp + kRows * u, N);
    }
  });
  return y;
}

// x (M, K) fp32; words[i] (N_i/16, K/8, 64) uint8; tables[i] (N_i/16, K/G, 2, 16) fp16 -> (M, sum N_i) fp32
at::Tensor qdot_int4(const at::Tensor& x, at::TensorList words, at::TensorList tables, int64_t G) {
  TORCH_CHECK(!words.empty() && words.size() == tables.size(), "pocketlm::qdot_int4: one table per code tensor");
  const int64_t M = x.size(0), K = 8 * words[0].size(1);
  check_input(x, K);
  TORCH_CHECK(G % qdot::kBlock == 0 && K % G == 0, "pocketlm::qdot_int4: group size ", G,
              " must divide ", K, " in multiples of 32");
  std::vector<int64_t> blocks;
  std::vector<const uint8_t*> wp;
  std::vector<const uint16_t*> tp;
  for (size_t i = 0; i < words.size(); ++i) {
    const at::Tensor &w = words[i], &t = tables[i];
    TORCH_CHECK(w.dim() == 3 && w.size(1) == K / 8 && w.size(2) == 64 && w.scalar_type() == at::kByte &&
                    w.is_contiguous(), "pocketlm::qdot_int4: words must be contiguous uint8 (out/16, in/8, 64)");
    TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.numel() == w.size(0) * (K / G) * 2 * kRows,
                "pocketlm::qdot_int4: tables must be contiguous fp16 (out/16, groups, 2, 16)");
    blocks.push_back(w.size(0));
    wp.push_back(w.data_ptr<uint8_t>());
    tp.push_back(reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()));
  }
  return products(x, blocks, [&](const qdot::Acts& a, int64_t i, int64_t b, float* y, int64_t ldy) {
    qdot::active().int4(a, M, wp[i] + b * (K / 8) * 64, tp[i] + b * (K / G) * 2 * kRows, y, ldy, G);
  });
}

// x (M, K) fp32; codes[i] (N_i/16, K/4, 64) uint8; scales[i] (N_i,) fp32 -> (M, sum N_i) fp32
at::Tensor qdot_int8(const at::Tensor& x, at::TensorList codes, at::TensorList scales) {
  TORCH_CHECK(!codes.empty() && codes.size() == scales.size(), "pocketlm::qdot_int8: one scale vector per code tensor");
  const int64_t M = x.size(0), K = 4 * codes[0].size(1);
  check_input(x, K);
  std::vector<int64_t> blocks;
  std::vector<const uint8_t*> cp;
  std::vector<const float*> sp;
  for (size_t i = 0; i < codes.size(); ++i) {
    const at::Tensor &c = codes[i], &s = scales[i];
    TORCH_CHECK(c.dim() == 3 && c.size(1) == K / 4 && c.size(2) == 64 && c.scalar_type() == at::kByte &&
                    c.is_contiguous(), "pocketlm::qdot_int8: codes must be contiguous uint8 (out/16, in/4, 64)");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == c.size(0) * kRows,
                "pocketlm::qdot_int8: scales must be contiguous fp32 (out,)");
    blocks.push_back(c.size(0));
    cp.push_back(c.data_ptr<uint8_t>());
    sp.push_back(s.data_ptr<float>());
  }
  return products(x, blocks, [&](const qdot::Acts& a, int64_t i, int64_t b, float* y, int64_t ldy) {
    qdot::active().int8(a, M, cp[i] + b * (K / 4) * 64, sp[i] + b * kRows, y, ldy);
  });
}

// x (M, K) fp32 -> (codes (M, K) int8, scales (M, K/32) fp32): the activations as the products see them
std::tuple<at::Tensor, at::Tensor> qdot_quantize(const at::Tensor& x) {
  check_input(x, x.size(1));
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar)), d = at::empty({M, K / qdot::kBlock}, x.options());
  std::vector<int32_t> qsum(M * K / qdot::kBlock);
  std::vector<float> xsum(M * K / qdot::kBlock);
  qdot::quantize_rows(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), d.data_ptr<float>(), qsum.data(), xsum.data());
  return {q, d};
}

// Giga multiply-adds per second of the active instruction set's dot products on every thread: the integer
// peak that batched decoding's figures are set against.
double qdot_peak(int64_t rounds) {
  const int64_t threads = at::get_num_threads();
  std::atomic<int64_t> macs{0};
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) macs += qdot::active().peak(rounds);
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return static_cast<double>(macs.load()) / seconds / 1e9;
}

bool qdot_use(c10::string_view name) { return qdot::use(std::string(name).c_str()); }

std::string qdot_isa() { return qdot::active().name; }

bool qdot_supported(c10::string_view name) {
  for (const qdot::Kernels* k : {&qdot::kAvx512Vnni, &qdot::kAvxVnni, &qdot::kAvx2})
    if (name == k->name) return qdot::supported(*k);
  return false;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pocketlm, m) {
  m.def("qdot_int4(Tensor x, Tensor[] words, Tensor[] tables, int group_size) -> Tensor");
  m.def("qdot_int8(Tensor x, Tensor[] codes, Tensor[] scales) -> Tensor");
  m.def("qdot_quantize(Tensor x) -> (Tensor, Tensor)");
  m.def("qdot_use(str name) -> bool", &qdot_use);  // no tensor arguments: kernels for every dispatch key
  m.def("qdot_isa() -> str", &qdot_isa);
  m.def("qdot_peak(int rounds) -> float", &qdot_peak);
  m.def("qdot_supported(str name) -> bool", &qdot_supported);
}

TORCH_LIBRARY_IMPL(pocketlm, CPU, m) {
  m.impl("qdot_int4", &qdot_int4);
  m.impl("qdot_int8", &qdot_int8);
  m.impl("qdot_quantize", &qdot_quantize);
}
