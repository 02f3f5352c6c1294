// pocketlm's integer-activation products (the "qdot" kernels): input rows quantized to int8 in blocks of
// 32 values, as llama.cpp does for its Q4/Q8 products, times int4 or int8 weights by integer dot products.
//
// One weight layout serves every instruction set. Weights come in blocks of 16 output rows; within a
// block, each chunk of input columns is 64 bytes, byte 4r + s of it belonging to row r:
//   int4: chunk c covers columns 8c..8c+7; byte 4r + s holds row r's code at column 8c + s in its low
//         nibble and at 8c + 4 + s in its high nibble (codes 0..15, w = code * scale + min per group).
//   int8: chunk c covers columns 4c..4c+3; byte 4r + s holds row r's code at column 4c + s plus 128
//         (codes -127..127 stored unsigned, w = code * scale per row).
// So one 64-byte load feeds a 512-bit dot-product instruction (VNNI's u8 x s8 -> s32 over 4 bytes per
// lane) for 16 rows, or two 256-bit ones for 8 rows each.
//
// The implementations are compiled once per instruction set (qdot_avx2.cpp, qdot_avxvnni.cpp,
// qdot_avx512vnni.cpp), each with its own compiler flags, and the op picks one at run time. This header
// must stay free of inline code: a function compiled in two of those files with different flags
// would be merged by the linker, and the AVX-512 copy could then run on a CPU without AVX-512.
#pragma once

#include <cstdint>

namespace pocketlm::qdot {

constexpr int64_t kRows = 16;   // output rows per weight block
constexpr int64_t kBlock = 32;  // input values per activation scale

// M input rows quantized to int8: row m's codes at q + m * K; per block of 32 values its scale
// (x ~ d * code), the sum of its codes and the sum of its values (exact, for int4's mins) at
// d, qsum, xsum + m * (K / 32).
struct Acts {
  const int8_t* q;
  const float* d;
  const int32_t* qsum;
  const float* xsum;
  int64_t K;
};

// One instruction set's products of M input rows with one 16-row weight block; row m's 16 outputs go
// to y + m * ldy. int4: words (K/8, 64) bytes, tables (K/G, 2, 16) fp16 (each group's 16 scales, then
// 16 mins). int8: codes (K/4, 64) bytes, scales the block's 16 row scales.
struct Kernels {
  const char* name;
  void (*int4)(const Acts& a, int64_t M, const uint8_t* words, const uint16_t* tables, float* y, int64_t ldy,
               int64_t G);
  void (*int8)(const Acts& a, int64_t M, const uint8_t* codes, const float* scales, float* y, int64_t ldy);
  // The instruction set's peak: `rounds` rounds of independent u8 x s8 dot products in registers; returns the
  // multiply-adds done (the measure of "the machine's limit" beside batched decoding's figures).
  int64_t (*peak)(int64_t rounds);
};

extern const Kernels kAvx2, kAvxVnni, kAvx512Vnni;

// Quantize M rows of K values (K % 32 == 0) into the arrays of `Acts` (q: M * K, the others M * K / 32).
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* qsum, float* xsum);

// The kernels in use: the instruction set chosen by `use` (by name), at first the best this CPU has.
const Kernels& active();
bool use(const char* name);        // false where the name is unknown or the CPU lacks it
bool supported(const Kernels& k);  // whether this CPU can run them

}  // namespace pocketlm::qdot
