// Plain C ABI between the dispatcher (ops.cpp, built without ISA flags) and the
// ISA-specific kernel libraries (kernel_avx512bf16.cpp, kernel_amx.cpp, each
// built as its own shared library with its own -m flags).
//
// Nothing in here may be an inline function or a template: the ISA libraries
// are compiled with -mavx512*/-mamx-*, and any COMDAT (inline/template) code
// shared with the dispatcher could be picked by the linker for both and crash a
// CPU without those instructions. The ISA libraries are only dlopen()ed after
// CPUID says the CPU has the ISA, and they are built with -fvisibility=hidden so
// that only `fiddler_cpu_kernel_table` is exported.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace fiddler_cpu {

enum { kApiVersion = 5 };

// AMX packed ("VNNI") activation layout, used for x before the gate/up
// projection and for the SwiGLU activation before the down projection of every
// expert that runs on AMX. For a matrix X[m][K] (tokens x reduction dim):
//   S = ceil(K / 32) k-steps, MB = ceil(m / 16) token blocks,
//   block(mb, s) = 16 rows x 32 bf16 (1 KiB), at element offset (mb * S + s) * 512,
//   block(mb, s)[kk][2 * i + j] = X[16 * mb + i][32 * s + 2 * kk + j]   (0 outside X)
// i.e. exactly the AMX B-tile format for a 32(k) x 16(m) slice of X^T.
enum { kPackBlockElems = 512 };

// One expert's work in one moe_forward call.
struct ExpertWork {
  const uint16_t* w13;  // [2I, H] bf16 row-major: gate rows [0, I), up rows [I, 2I)
  const uint16_t* w2;   // [H, I]  bf16 row-major
  const int32_t* tok;   // [m] row of x / out for each of the expert's tokens
  const float* wt;      // [m] routing weight of each of those tokens
  uint16_t* xpack;      // AMX: x of the tokens, packed (see above, K = H); else null
  uint16_t* act;        // AVX512: [m][I] row-major bf16; AMX: packed (K = I)
  int32_t m;            // number of tokens (> 0)
  int32_t amx;          // 1: the AMX kernels handle this expert
  // Quantized experts (kernel_quant_avx512.cpp; null for bf16 ones), by MoeProblem.fmt:
  //   FP8:   q13 [2I, H] e4m3fn, s13 fp32 [ceil(2I / bn), ceil(H / bk)] block scales;
  //          q2 [H, I], s2 fp32 [ceil(H / bn), ceil(I / bk)]
  //   MXFP4: q13 [2I, H / 2] two e2m1 codes a byte (low nibble first), s13 uint8
  //          [2I, H / 32] e8m0 exponents; q2 [H, I / 2], s2 uint8 [H, I / 32]
  //   INT4:  q13 [2I, H / 2] two codes a byte (value + 8, low nibble first: int32 words
  //          of eight), s13 [2I, H / g] a scale per group of g = bk (bf16, or fp16 where
  //          MoeProblem.f16); q2 [H, I / 2], s2 [H, I / g]
  const uint8_t* q13;
  const void* s13;
  const uint8_t* q2;
  const void* s2;
  const uint16_t* b13;  // [2I] biases, gate then up (bf16, or fp16 where MoeProblem.f16); null: none
  const uint16_t* b2;   // [H] biases, as b13; null: none
  float* actf;          // [m][I] fp32 activation
};

struct MoeProblem {
  const uint16_t* x;  // [T, H] bf16 (quantized experts: or fp16, f16), row stride ldx (elements)
  int64_t ldx;
  float* out;  // [T, H] fp32, row stride ldo (elements)
  int64_t ldo;
  int64_t H, I;
  int32_t n_experts;
  const ExpertWork* experts;
  int64_t bn, bk;  // FP8 scale block (rows, columns); 0 for bf16 experts
  int32_t fmt;     // quantized experts: kFmtFp8Block, kFmtMxfp4, kFmtInt4Group or kFmtInt4Zp
  int32_t act;     // quantized experts: kActSilu or kActSwigluOai
  float alpha, limit;  // kActSwigluOai: (up + 1) * g * sigmoid(alpha * g), g <= limit, |up| <= limit
  int32_t f16;         // quantized experts: x, biases and INT4 scales are fp16 (0: bf16), the model's dtype
};

enum { kFmtFp8Block = 0, kFmtMxfp4 = 1, kFmtInt4Group = 2, kFmtInt4Zp = 3 };
enum { kActSilu = 0, kActSwigluOai = 1 };

struct KernelTable {
  int32_t api_version;
  const char* name;
  // Called once per worker thread before its first / after its last item of a
  // parallel region that runs items of this table (AMX: tile config / release).
  // May be null.
  void (*region_begin)(void);
  void (*region_end)(void);
  // Packs x rows of expert e, token block mb (16 tokens), into ExpertWork.xpack
  // (and zeroes the k-padding of ExpertWork.act for that block). AMX only; may be null.
  void (*pack_x)(const MoeProblem* p, int32_t e, int32_t mb);
  // act[:, n0:n1] = silu(x w1[n0:n1]^T) * (x w3[n0:n1]^T), rounded to bf16.
  void (*gate_up)(const MoeProblem* p, int32_t e, int64_t n0, int64_t n1);
  // out[tok, h0:h1] += wt * (act w2[h0:h1]^T), fp32.
  void (*down)(const MoeProblem* p, int32_t e, int64_t h0, int64_t h1);
  // Output rows per down item this kernel would like (a multiple of 32; 0: the
  // dispatcher's default split). The dispatcher takes it, or fewer rows when
  // that balances the items over the threads better, for calls with AMX experts.
  int32_t down_rows;
};

}  // namespace fiddler_cpu

extern "C" const fiddler_cpu::KernelTable* fiddler_cpu_kernel_table(void);
