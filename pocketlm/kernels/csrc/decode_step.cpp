// The whole decode step of a quantized Llama-family model as one op (pocketlm::decode_step): every
// layer's RMSNorm, q/k/v products, RoPE, KV-cache write, attention, output projection, SwiGLU MLP and
// residuals, then the final norm and the output head, for a few rows of one new token each.
//
// Why one op: called one kernel at a time (120 product calls, 30 attention calls and inductor's glue), a
// compiled int4 SmolLM2 step on 2 cores took 9.4 ms, of which the products 6-7, inductor's Python wrapper
// about 2, and the token loop around it 1-2 ms more (BENCHMARKS.md). Here the threads start once per
// step (in pocketlm's own spinning pool, spin_pool.h) and meet at six barriers per layer; residual adds and
// the SiLU run in the products' last loop.
//
// A windowed layer (sliding-window attention) attends only to each row's `window` latest positions: in a
// rolling cache of `window` slots (position p in slot p % window) or in a whole one.
//
// A mixture-of-experts layer (Mixtral's) routes each row in every thread (softmax over the router's logits, the
// top k, renormalised or not) and runs each expert in use over the rows that chose it, reading only those
// experts' weights.
//
// Numerics are those of the Python step with the same kernels: with the fp32-activation kernels, exact
// products of the quantized weights; with qdot's, activations quantized to int8 per block of 32 (qdot.h).
// Only the order of sums differs.
#include <map>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "kernels.h"
#include "qdot.h"
#include "spin_pool.h"

namespace {

using namespace pocketlm;

// A quantized linear layer as the step reads it. With fp32 activations: int4 codes in `int4_words`'s
// layout, 8 output rows per work unit, or int8 codes with one output row per unit. With int8 activations
// (`qdot`, see qdot.h): int4 or int8 codes in qdot's layout, 16 output rows per unit.
struct Linear {
  bool int4 = false, qdot = false;
  int64_t N = 0, K = 0, G = 0;
  const int32_t* words = nullptr;
  const uint16_t* tables = nullptr;
  const int8_t* codes = nullptr;
  const uint8_t* packed = nullptr;  // qdot's words or codes
  const float* scales = nullptr;
  const float* bias = nullptr;

  int64_t rows_per_unit() const { return qdot ? qdot::kRows : int4 ? kLanes : 1; }
  int64_t units() const { return N / rows_per_unit(); }
};

Linear read_linear(const at::Tensor& w, const at::Tensor& t, const at::Tensor& b, const char* name) {
  Linear L;
  if (w.scalar_type() == at::kByte) {  // qdot: int4 words (N/16, K/8, 64) with fp16 tables, or int8 (N/16, K/4, 64)
    TORCH_CHECK(w.dim() == 3 && w.size(2) == 64 && w.is_contiguous(), "pocketlm::decode_step: ", name,
                ": qdot weights must be contiguous uint8 (out/16, chunks, 64)");
    L.qdot = true;
    L.N = qdot::kRows * w.size(0);
    L.packed = w.data_ptr<uint8_t>();
    L.int4 = t.scalar_type() == at::kHalf;
    if (L.int4) {
      L.K = 8 * w.size(1);
      TORCH_CHECK(t.is_contiguous() && t.dim() == 4 && t.size(0) == w.size(0) && t.size(2) == 2 &&
                      t.size(3) == qdot::kRows && L.K % t.size(1) == 0,
                  "pocketlm::decode_step: ", name, ": qdot int4 tables must be contiguous fp16 (out/16, groups, 2, 16)");
      L.G = L.K / t.size(1);
      L.tables = reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>());
    } else {
      L.K = 4 * w.size(1);
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == L.N, "pocketlm::decode_step: ",
                  name, ": qdot int8 scales must be contiguous fp32 (out,)");
      L.scales = t.data_ptr<float>();
    }
    TORCH_CHECK(L.K % qdot::kBlock == 0 && L.G % qdot::kBlock == 0, "pocketlm::decode_step: ", name,
                ": qdot needs inputs and groups in multiples of 32");
  } else if (w.scalar_type() == at::kInt) {  // int4: words (N/8, K/8, 8) int32, tables (N/8, groups, 2, 8) fp16
    TORCH_CHECK(w.dim() == 3 && w.size(2) == kLanes && w.is_contiguous(), "pocketlm::decode_step: ", name,
                ": int4 words must be contiguous (out/8, in/8, 8)");
    L.int4 = true;
    L.N = kLanes * w.size(0);
    L.K = 8 * w.size(1);
    TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.dim() == 4 && t.size(0) == w.size(0) &&
                    t.size(2) == 2 && t.size(3) == kLanes && L.K % t.size(1) == 0,
                "pocketlm::decode_step: ", name, ": int4 tables must be contiguous fp16 (out/8, groups, 2, 8)");
    L.G = L.K / t.size(1);
    TORCH_CHECK(L.G % 8 == 0, "pocketlm::decode_step: ", name, ": group size ", L.G, " is not a multiple of 8");
    L.words = w.data_ptr<int32_t>();
    L.tables = reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>());
  } else {  // int8: codes (N, K), scales (N,) fp32
    TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous(), "pocketlm::decode_step: ", name,
                ": weights must be int4 words (int32) or contiguous int8 codes (out, in)");
    L.N = w.size(0);
    L.K = w.size(1);
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == L.N, "pocketlm::decode_step: ",
                name, ": int8 scales must be contiguous fp32 (out,)");
    L.codes = w.data_ptr<int8_t>();
    L.scales = t.data_ptr<float>();
  }
  if (b.numel() > 0) {
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == L.N, "pocketlm::decode_step: ",
                name, ": bias must be contiguous fp32 (out,) or empty");
    L.bias = b.data_ptr<float>();
  }
  return L;
}

const float* read_vector(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, "pocketlm::decode_step: ", name,
              " must be contiguous fp32 with ", n, " values");
  return t.data_ptr<float>();
}

// M input rows in the forms the products read: as given (int8), prescaled with group sums (int4), and
// quantized to int8 (qdot). Each thread keeps its own, so preparing an input needs no barrier.
struct Input {
  const float* x = nullptr;
  int64_t K = 0, G = 0;
  std::vector<float> scaled, group_sums;
  std::vector<int8_t> q;
  std::vector<float> d, xsum;
  std::vector<int32_t> qsum;
  qdot::Acts acts{};

  // group: int4's group size for the fp32-activation kernel (0: no such layer reads it); quantize: a qdot
  // layer reads it
  void prepare(const float* rows, int64_t M, int64_t width, int64_t group, bool quantize) {
    x = rows, K = width, G = group;
    if (quantize) {
      q.resize(M * K);
      d.resize(M * K / qdot::kBlock), xsum.resize(M * K / qdot::kBlock), qsum.resize(M * K / qdot::kBlock);
      qdot::quantize_rows(x, M, K, q.data(), d.data(), qsum.data(), xsum.data());
      acts = qdot::Acts{q.data(), d.data(), qsum.data(), xsum.data(), K};
    }
    if (G == 0) return;
    scaled.resize(M * K);
    group_sums.resize(M * (K / G));
    for (int64_t m = 0; m < M; ++m) prescale_row(x + m * K, K, G, &scaled[m * K], &group_sums[m * (K / G)]);
  }
};

// Unit u of L for the M input rows: rows_per_unit() outputs per row, bias included, row m's at
// y + m * ldy.
inline void unit_outputs(const Linear& L, int64_t u, const Input& in, int64_t M, float* y, int64_t ldy) {
  const int64_t n = L.rows_per_unit();
  if (L.qdot && L.int4) {
    qdot::active().int4(in.acts, M, L.packed + u * (L.K / 8) * 64, L.tables + u * (L.K / L.G) * 2 * qdot::kRows, y,
                        ldy, L.G);
  } else if (L.qdot) {
    qdot::active().int8(in.acts, M, L.packed + u * (L.K / 4) * 64, L.scales + u * qdot::kRows, y, ldy);
  } else if (L.int4) {
    int4_rows(in.scaled.data(), in.group_sums.data(), M, L.words + u * L.K, L.tables + u * (L.K / L.G) * 2 * kLanes,
              y, ldy, L.K, L.G);
  } else {
    int8_rows(in.x, M, L.codes + u * L.K, L.K, y, ldy);
    for (int64_t m = 0; m < M; ++m) y[m * ldy] *= L.scales[u];
  }
  if (L.bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < n; ++r) y[m * ldy + r] += L.bias[u * n + r];
}

// Several layers of one input (q, k, v), their outputs side by side in out (M rows of `ld`). Work is
// split by units across the layers; the loop ends at a barrier.
void project(const Team& team, const Linear* const* layers, int n, const Input& in, int64_t M, float* out, int64_t ld) {
  int64_t first[4] = {0}, column[4] = {0};
  for (int i = 0; i < n; ++i) {
    first[i + 1] = first[i] + layers[i]->units();
    column[i + 1] = column[i] + layers[i]->N;
  }
  for (int64_t unit = team.begin(first[n]); unit < team.end(first[n]); ++unit) {
    int i = 0;
    while (unit >= first[i + 1]) ++i;
    const Linear& L = *layers[i];
    const int64_t u = unit - first[i];
    unit_outputs(L, u, in, M, out + column[i] + u * L.rows_per_unit(), ld);
  }
  team.barrier();
}

// x (M, L.N) += L(in): the residual add in the product's loop. scratch: M * 16 floats.
void add_product(const Team& team, const Linear& L, const Input& in, int64_t M, float* x, float* scratch) {
  const int64_t n = L.rows_per_unit();
  for (int64_t u = team.begin(L.units()); u < team.end(L.units()); ++u) {
    unit_outputs(L, u, in, M, scratch, n);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < n; ++r) x[m * L.N + u * n + r] += scratch[m * n + r];
  }
  team.barrier();
}

// out (M, N) = silu(gate(in)) * up(in): SwiGLU's input to the down projection. scratch: 2 * M * 16 floats.
void gated_product(const Team& team, const Linear& gate, const Linear& up, const Input& in, int64_t M, float* out,
                   float* scratch) {
  const int64_t n = gate.rows_per_unit();
  float *g = scratch, *v = scratch + M * n;
  for (int64_t u = team.begin(gate.units()); u < team.end(gate.units()); ++u) {
    unit_outputs(gate, u, in, M, g, n);
    unit_outputs(up, u, in, M, v, n);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < n; ++r) {
        const float a = g[m * n + r];
        out[m * gate.N + u * n + r] = a / (1.0f + std::exp(-a)) * v[m * n + r];
      }
  }
  team.barrier();
}

// moe (M, N) at the M rows `rows` = (fresh[m] ? 0 : moe) + weight[m] * L(in): one expert's weighted share of
// a mixture's output, accumulated in expert order as the Python step's index_add_ does. scratch: M * 16 floats.
void add_weighted_product(const Team& team, const Linear& L, const Input& in, int64_t M, const int64_t* rows,
                          const float* weight, const bool* fresh, float* moe, float* scratch) {
  const int64_t n = L.rows_per_unit();
  for (int64_t u = team.begin(L.units()); u < team.end(L.units()); ++u) {
    unit_outputs(L, u, in, M, scratch, n);
    for (int64_t m = 0; m < M; ++m) {
      float* out = moe + rows[m] * L.N + u * n;
      for (int64_t r = 0; r < n; ++r) out[r] = (fresh[m] ? 0.0f : out[r]) + scratch[m * n + r] * weight[m];
    }
  }
  team.barrier();
}

// Each of M rows' top k of E experts and their weights, from the router's fp32 logits (E, K) of the normed
// rows x (M, K): softmax, the k largest (a tie to the lower index), renormalised to sum to 1
// where `renormalise`. choice and weight are (M, k).
void route(const float* x, const float* router, int64_t M, int64_t K, int64_t E, int64_t k, bool renormalise,
           int64_t* choice, float* weight) {
  std::vector<float> prob(E);
  for (int64_t m = 0; m < M; ++m) {
    float top = -INFINITY;
    for (int64_t e = 0; e < E; ++e) {
      float acc = 0.0f;
      for (int64_t i = 0; i < K; ++i) acc += x[m * K + i] * router[e * K + i];
      prob[e] = acc;
      top = std::max(top, acc);
    }
    float total = 0.0f;
    for (int64_t e = 0; e < E; ++e) total += (prob[e] = std::exp(prob[e] - top));
    for (int64_t e = 0; e < E; ++e) prob[e] /= total;
    float chosen_sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (prob[e] >= 0.0f && (best < 0 || prob[e] > prob[best])) best = e;
      choice[m * k + j] = best;
      weight[m * k + j] = prob[best];
      chosen_sum += prob[best];
      prob[best] = -1.0f;  // taken
    }
    if (renormalise)
      for (int64_t j = 0; j < k; ++j) weight[m * k + j] /= chosen_sum;
  }
}

// out = weight * x / sqrt(mean(x^2) + eps), each of M rows of K values
void rms_norm(const float* x, const float* weight, double eps, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(row + k), acc);
    float squares = horizontal_sum(acc);
    for (; k < K; ++k) squares += row[k] * row[k];
    const float inverse = 1.0f / std::sqrt(squares / K + static_cast<float>(eps));
    for (k = 0; k < K; ++k) out[m * K + k] = weight[k] * (row[k] * inverse);
  }
}

// rotate-half RoPE of one head vector in place: x * cos + (-x[D/2:], x[:D/2]) * sin
inline void rope(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

inline bool fp32_int4(const Linear& L) { return L.int4 && !L.qdot; }  // reads the prescaled input

constexpr int64_t kPerLayer = 23;  // tensors per layer of a dense model in `weights` (see the schema below)

// x (B, hidden) fp32: the new tokens' embeddings. pos (B,) int64: each row's cache position. mask (B, S)
// bool: the cache positions each row attends to (S <= the cache length). rows (B,) int64, optional: the
// cache row of each input row (default row b for input b); logit_rows: how many leading input rows get
// logits (-1: all). cos, sin (positions, head_dim).
// weights: per layer input norm, then q, k, v, o as (weights, scales or tables, bias or empty), the
// post-attention norm, gate, up, down likewise; then the final norm and the head. With `experts` > 0 every
// layer is a mixture: after the post-attention norm come the router (experts, hidden) fp32 and each expert's
// gate, up, down; each row takes its `top_k` experts (weights renormalised where `renormalise`). caches: per
// layer k, v (rows, kv_heads, length, head_dim) fp32 contiguous, written at pos. windows: per layer the attention
// window in positions (0: none; the mask alone says what a row sees); a windowed layer whose cache is the
// window long is a rolling cache, written at pos % window, whose slots up to pos are seen whatever the mask
// (one input row per cache row there). Returns logits (logit rows, vocab).
at::Tensor decode_step(const at::Tensor& x_in, const at::Tensor& pos, const at::Tensor& mask, const at::Tensor& cos,
                       const at::Tensor& sin, at::TensorList weights, at::TensorList caches, int64_t heads,
                       int64_t kv_heads, double eps, const std::optional<at::Tensor>& rows_in, int64_t logit_rows,
                       int64_t experts, int64_t top_k, bool renormalise, at::IntArrayRef windows) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.is_cpu(),
              "pocketlm::decode_step: x must be fp32 (rows, hidden) on the CPU");
  const int64_t B = x_in.size(0), hidden = x_in.size(1);
  TORCH_CHECK(experts >= 0 && (experts == 0 || (1 <= top_k && top_k <= experts)), "pocketlm::decode_step: top_k (",
              top_k, ") must be between 1 and experts (", experts, ")");
  const int64_t E = experts, mlps = std::max<int64_t>(E, 1);  // a dense layer: one MLP
  const int64_t per_layer = E ? 15 + 9 * E : kPerLayer, lin_per_layer = 4 + 3 * mlps;
  TORCH_CHECK(weights.size() >= 4 && (weights.size() - 4) % per_layer == 0,
              "pocketlm::decode_step: expected ", per_layer, " tensors per layer and 4 for the head, got ",
              weights.size());
  const int64_t n_layers = (weights.size() - 4) / per_layer;
  TORCH_CHECK(static_cast<int64_t>(caches.size()) == 2 * n_layers,
              "pocketlm::decode_step: expected a key and a value cache for each of ", n_layers, " layers, got ",
              caches.size(), " tensors");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "pocketlm::decode_step: heads (", heads,
              ") must be a multiple of kv_heads (", kv_heads, ")");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.numel() == B,
              "pocketlm::decode_step: pos must be contiguous int64 with one position per row");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.dim() == 2 && mask.size(0) == B,
              "pocketlm::decode_step: mask must be contiguous bool (rows, positions)");
  const int64_t S = mask.size(1);

  std::vector<Linear> lin;  // per layer q, k, v, o, then gate, up, down of the MLP or of each expert
  std::vector<const float*> norms;  // per layer input and post-attention norms, then the final norm
  std::vector<const float*> routers;  // per layer of a mixture
  static const char* kNames[7] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor* t = weights.data() + l * per_layer;
    norms.push_back(read_vector(t[0], hidden, "input_layernorm"));
    for (int i = 0; i < 4; ++i) lin.push_back(read_linear(t[1 + 3 * i], t[2 + 3 * i], t[3 + 3 * i], kNames[i]));
    norms.push_back(read_vector(t[13], hidden, "post_attention_layernorm"));
    if (E) routers.push_back(read_vector(t[14], E * hidden, "router"));
    const at::Tensor* ffn = t + (E ? 15 : 14);
    for (int64_t i = 0; i < 3 * mlps; ++i)
      lin.push_back(read_linear(ffn[3 * i], ffn[3 * i + 1], ffn[3 * i + 2], kNames[4 + i % 3]));
  }
  const at::Tensor* last = weights.data() + n_layers * per_layer;
  norms.push_back(read_vector(last[0], hidden, "norm"));
  const Linear head = read_linear(last[1], last[2], last[3], "lm_head");
  TORCH_CHECK(head.K == hidden, "pocketlm::decode_step: lm_head takes ", head.K, " inputs, the model has ", hidden);

  const Linear& q0 = lin[0];
  const int64_t D = q0.N / heads, Nq = q0.N, Nkv = kv_heads * D, I = lin[4].N;
  TORCH_CHECK(D % 8 == 0 && Nq == heads * D, "pocketlm::decode_step: head_dim must be a multiple of 8");
  int64_t G = 0;  // the group size of int4 layers (0 when all are int8)
  for (int64_t l = 0; l < n_layers; ++l) {
    const Linear* L = &lin[lin_per_layer * l];
    TORCH_CHECK(L[0].K == hidden && L[0].N == Nq && L[1].K == hidden && L[1].N == Nkv && L[2].K == hidden &&
                    L[2].N == Nkv && L[3].K == Nq && L[3].N == hidden,
                "pocketlm::decode_step: layer ", l, " does not have the shapes of layer 0");
    for (int64_t j = 0; j < mlps; ++j) {
      const Linear* M = L + 4 + 3 * j;  // one MLP: gate, up, down
      TORCH_CHECK(M[0].K == hidden && M[1].K == hidden && M[0].N == I && M[1].N == I && M[2].K == I &&
                      M[2].N == hidden && M[0].int4 == M[1].int4 && M[0].qdot == M[1].qdot,
                  "pocketlm::decode_step: layer ", l, "'s MLP ", j, " does not have the shapes of layer 0's");
    }
    for (int64_t i = 0; i < lin_per_layer; ++i) {
      if (!L[i].int4 || L[i].qdot) continue;
      TORCH_CHECK(G == 0 || L[i].G == G, "pocketlm::decode_step: int4 layers must share one group size");
      G = L[i].G;
    }
  }
  const int64_t Gh = head.int4 && !head.qdot ? head.G : 0;
  TORCH_CHECK(G == 0 || Gh == 0 || Gh == G, "pocketlm::decode_step: the head's group size differs from the layers'");
  TORCH_CHECK(windows.empty() || static_cast<int64_t>(windows.size()) == n_layers, "pocketlm::decode_step: ",
              windows.size(), " windows for ", n_layers, " layers");
  std::vector<int64_t> window(n_layers, 0), cache_len(n_layers);
  std::vector<char> rolling(n_layers, 0);
  bool any_rolling = false, any_whole = false;
  for (int64_t l = 0; l < n_layers; ++l) {
    if (!windows.empty()) window[l] = windows[l];
    TORCH_CHECK(window[l] >= 0, "pocketlm::decode_step: layer ", l, "'s window is negative");
    cache_len[l] = caches[2 * l].size(2);
    rolling[l] = window[l] > 0 && cache_len[l] == window[l];
    any_rolling |= rolling[l] != 0, any_whole |= rolling[l] == 0;
    for (int64_t i = 2 * l; i < 2 * l + 2; ++i) {
      const at::Tensor& c = caches[i];
      TORCH_CHECK(c.scalar_type() == at::kFloat && c.is_contiguous() && c.dim() == 4 && c.size(0) == caches[0].size(0) &&
                      c.size(1) == kv_heads && (rolling[l] || c.size(2) >= S) && c.size(3) == D &&
                      c.sizes() == caches[2 * l].sizes(),
                  "pocketlm::decode_step: caches must be contiguous fp32 (rows, ", kv_heads, ", positions >= ", S, ", ",
                  D, "), a layer's key and value alike, a rolling cache its window long");
    }
  }
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "pocketlm::decode_step: cos and sin must be contiguous fp32 (positions, head_dim)");
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pp[b] >= 0 && (pp[b] < S || !any_whole) && pp[b] < cos.size(0), "pocketlm::decode_step: row ", b,
                "'s position ", pp[b], " is outside the ", S, " cache positions attended to");
  // the cache row each input row reads and writes: row b's own, or `rows` (several input rows may be one
  // prompt's positions in one cache row: a prompt prefilled within the step)
  std::vector<int64_t> cache_row(B);
  for (int64_t b = 0; b < B; ++b) cache_row[b] = b;
  if (rows_in.has_value()) {
    const at::Tensor& r = *rows_in;
    TORCH_CHECK(r.scalar_type() == at::kLong && r.is_contiguous() && r.numel() == B,
                "pocketlm::decode_step: rows must be contiguous int64 with one cache row per input row");
    std::copy(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + B, cache_row.begin());
    std::vector<std::pair<int64_t, int64_t>> places;
    for (int64_t b = 0; b < B; ++b) places.emplace_back(cache_row[b], pp[b]);
    std::sort(places.begin(), places.end());
    TORCH_CHECK(std::adjacent_find(places.begin(), places.end()) == places.end(),
                "pocketlm::decode_step: two input rows write the same cache row and position");
    // a later position of the row would overwrite a slot an earlier one still attends to
    TORCH_CHECK(!any_rolling || std::adjacent_find(places.begin(), places.end(), [](auto& a, auto& b) {
                  return a.first == b.first; }) == places.end(),
                "pocketlm::decode_step: a rolling cache takes one input row per cache row");
  }
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(cache_row[b] >= 0 && cache_row[b] < caches[0].size(0), "pocketlm::decode_step: input row ", b,
                " uses cache row ", cache_row[b], " but the cache has ", caches[0].size(0));
  // logits for the first `logit_rows` input rows only (-1: all): a prompt's rows need none
  const int64_t L_out = logit_rows < 0 ? B : logit_rows;
  TORCH_CHECK(L_out <= B, "pocketlm::decode_step: logits asked for ", L_out, " rows of ", B);

  const at::Tensor x_t = x_in.contiguous().clone();  // the residual stream, updated in place
  float* x = x_t.data_ptr<float>();
  at::Tensor logits = at::empty({L_out, head.N}, x_in.options());
  std::vector<float> qkv(B * (Nq + 2 * Nkv)), att(B * Nq), gated(B * I), moe(E ? B * hidden : 0);
  const int64_t ld = Nq + 2 * Nkv, longest = *std::max_element(cache_len.begin(), cache_len.end());
  const bool* mp = mask.data_ptr<bool>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t group = heads / kv_heads;

  SpinPool& pool = SpinPool::get(at::get_num_threads());
  pool.run(at::get_num_threads(), [&](int thread, int threads) {
    const Team team{pool, thread, threads};
    Input in;
    std::vector<float> normed(B * hidden), p(std::max(S, longest) + 8), scratch(2 * B * qdot::kRows);
    // a mixture's routing, and one expert's rows: their indices, weights, whether it is their first expert,
    // and their normed inputs gathered
    std::vector<int64_t> choice(E ? B * top_k : 0), expert_rows(B);
    std::vector<float> choice_weight(E ? B * top_k : 0), row_weight(B), gathered(E ? B * hidden : 0);
    std::vector<char> fresh(B), started(B);
    std::vector<std::vector<int64_t>> live(B);  // per row, the positions its mask lets through
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < S; ++j)
        if (mp[b * S + j]) live[b].push_back(j);
    // per row and window, the positions or slots a windowed layer attends to
    std::map<std::pair<int64_t, bool>, std::vector<std::vector<int64_t>>> seen;
    for (int64_t l = 0; l < n_layers; ++l) {
      if (window[l] == 0 || seen.count({window[l], rolling[l] != 0})) continue;
      auto& rows = seen[{window[l], rolling[l] != 0}];
      rows.resize(B);
      for (int64_t b = 0; b < B; ++b)
        if (rolling[l])  // the slots written so far: all of them from position window - 1 on
          for (int64_t j = 0; j <= std::min(pp[b], window[l] - 1); ++j) rows[b].push_back(j);
        else
          for (int64_t j : live[b])
            if (j > pp[b] - window[l]) rows[b].push_back(j);
    }

    for (int64_t l = 0; l < n_layers; ++l) {
      const Linear* L = &lin[lin_per_layer * l];
      float* k_cache = caches[2 * l].data_ptr<float>();
      float* v_cache = caches[2 * l + 1].data_ptr<float>();
      const int64_t len = cache_len[l], cache_rows_stride = kv_heads * len * D;
      const std::vector<std::vector<int64_t>>& sees = window[l] ? seen[{window[l], rolling[l] != 0}] : live;

      rms_norm(x, norms[2 * l], eps, B, hidden, normed.data());
      in.prepare(normed.data(), B, hidden, fp32_int4(L[0]) || fp32_int4(L[1]) || fp32_int4(L[2]) ? G : 0,
                 L[0].qdot || L[1].qdot || L[2].qdot);
      const Linear* qkv_layers[3] = {&L[0], &L[1], &L[2]};
      project(team, qkv_layers, 3, in, B, qkv.data(), ld);

      // RoPE on q and k, and the new key and value into the cache at each row's position
      for (int64_t item = team.begin(B * (heads + kv_heads)); item < team.end(B * (heads + kv_heads)); ++item) {
        const int64_t b = item / (heads + kv_heads), h = item % (heads + kv_heads);
        const float* c = cp + pp[b] * D;
        const float* s = sp + pp[b] * D;
        float* row = qkv.data() + b * ld;
        if (h < heads) {
          rope(row + h * D, c, s, D);
        } else {
          const int64_t kh = h - heads;
          float* k = row + Nq + kh * D;
          rope(k, c, s, D);
          const int64_t slot = rolling[l] ? pp[b] % len : pp[b];
          const int64_t at_pos = cache_row[b] * cache_rows_stride + (kh * len + slot) * D;
          std::copy(k, k + D, k_cache + at_pos);
          std::copy(row + Nq + Nkv + kh * D, row + Nq + Nkv + (kh + 1) * D, v_cache + at_pos);
        }
      }

      team.barrier();

      for (int64_t item = team.begin(B * heads); item < team.end(B * heads); ++item) {
        const int64_t b = item / heads, h = item % heads, kh = h / group;
        const int64_t at_head = cache_row[b] * cache_rows_stride + kh * len * D;
        attend(qkv.data() + b * ld + h * D, k_cache + at_head, D, v_cache + at_head, D, D, sees[b], p.data(),
               att.data() + b * Nq + h * D);
      }
      team.barrier();

      in.prepare(att.data(), B, Nq, fp32_int4(L[3]) ? G : 0, L[3].qdot);
      add_product(team, L[3], in, B, x, scratch.data());

      rms_norm(x, norms[2 * l + 1], eps, B, hidden, normed.data());
      if (E == 0) {
        in.prepare(normed.data(), B, hidden, fp32_int4(L[4]) ? G : 0, L[4].qdot);
        gated_product(team, L[4], L[5], in, B, gated.data(), scratch.data());

        in.prepare(gated.data(), B, I, fp32_int4(L[6]) ? G : 0, L[6].qdot);
        add_product(team, L[6], in, B, x, scratch.data());
        continue;
      }
      // every thread routes every row (E dot products a row: cheaper than a barrier), then each expert in
      // use runs over its rows, in expert order
      route(normed.data(), routers[l], B, hidden, E, top_k, renormalise, choice.data(), choice_weight.data());
      std::fill(started.begin(), started.end(), 0);
      for (int64_t e = 0; e < E; ++e) {
        int64_t M = 0;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t j = 0; j < top_k; ++j)
            if (choice[b * top_k + j] == e) {
              expert_rows[M] = b, row_weight[M] = choice_weight[b * top_k + j], fresh[M] = !started[b];
              started[b] = 1;
              std::copy(normed.data() + b * hidden, normed.data() + (b + 1) * hidden, gathered.data() + M * hidden);
              ++M;
            }
        if (M == 0) continue;
        const Linear* X = L + 4 + 3 * e;
        in.prepare(gathered.data(), M, hidden, fp32_int4(X[0]) ? G : 0, X[0].qdot);
        gated_product(team, X[0], X[1], in, M, gated.data(), scratch.data());
        in.prepare(gated.data(), M, I, fp32_int4(X[2]) ? G : 0, X[2].qdot);
        add_weighted_product(team, X[2], in, M, expert_rows.data(), row_weight.data(),
                             reinterpret_cast<const bool*>(fresh.data()), moe.data(), scratch.data());
      }
      for (int64_t i = team.begin(B * hidden); i < team.end(B * hidden); ++i) x[i] += moe[i];
      team.barrier();
    }

    if (L_out > 0) {
      rms_norm(x, norms.back(), eps, L_out, hidden, normed.data());
      in.prepare(normed.data(), L_out, hidden, Gh, head.qdot);
      const Linear* head_layer[1] = {&head};
      project(team, head_layer, 1, in, L_out, logits.data_ptr<float>(), head.N);
    }
  });
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pocketlm, m) {
  m.def("decode_step(Tensor x, Tensor pos, Tensor mask, Tensor cos, Tensor sin, Tensor[] weights, "
        "Tensor(a!)[] caches, int heads, int kv_heads, float eps, Tensor? rows=None, int logit_rows=-1, "
        "int experts=0, int top_k=0, bool renormalise=True, int[] windows=[]) -> Tensor");
}

TORCH_LIBRARY_IMPL(pocketlm, CPU, m) { m.impl("decode_step", &decode_step); }
