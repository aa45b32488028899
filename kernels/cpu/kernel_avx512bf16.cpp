// AVX512-BF16 expert kernels (few tokens per expert: DRAM-bandwidth bound).
// Built as its own shared library with
//   -mavx512f -mavx512bf16 -mavx512bw -mavx512vl -fvisibility=hidden
// and only dlopen()ed by ops.cpp when CPUID reports AVX512-BF16.
// No torch / STL headers on purpose (see kernel_api.h).
//
// Weights are read in their load-time layout (row-major [N, K] bf16, no
// repacking). A register tile of NR weight rows x NM tokens is computed with
// _mm512_dpbf16_ps over K (32 bf16 per step, masked tail), each weight vector
// loaded once and multiplied with the NM token vectors; 16 fp32 partial sums
// per (row, token) are reduced at the end.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernel_api.h"
#include "vec_avx512.h"

namespace {

using fiddler_cpu::ExpertWork;
using fiddler_cpu::KernelTable;
using fiddler_cpu::MoeProblem;

// Distance (bf16 elements, a multiple of 32) of the software prefetch ahead of
// each weight row stream.
constexpr int64_t kPrefetch = 512;

// res[m * NR + r] = sum_k w[r][k] * x[m][k]
template <int NR, int NM>
__attribute__((noinline)) void dot_tile(const uint16_t* const* w, const uint16_t* const* x, int64_t K,
                                        float* res) {
  __m512 acc[NM][NR];
#pragma GCC unroll 8
  for (int m = 0; m < NM; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint16_t* wp[NR];
  const uint16_t* xp[NM];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) wp[r] = w[r];
#pragma GCC unroll 8
  for (int m = 0; m < NM; ++m) xp[m] = x[m];

  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch((const char*)(wp[r] + k + kPrefetch), _MM_HINT_T0);
      wv[r] = _mm512_loadu_si512((const void*)(wp[r] + k));
    }
#pragma GCC unroll 8
    for (int m = 0; m < NM; ++m) {
      __m512i xv = _mm512_loadu_si512((const void*)(xp[m] + k));
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r)
        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], fiddler_as_bh(xv), fiddler_as_bh(wv[r]));
    }
  }
  if (k < K) {  // K tail: masked (zero-filled) loads, nothing read past the row
    const __mmask32 msk = (__mmask32)((1ull << (K - k)) - 1ull);
    __m512i wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_epi16(msk, (const void*)(wp[r] + k));
#pragma GCC unroll 8
    for (int m = 0; m < NM; ++m) {
      __m512i xv = _mm512_maskz_loadu_epi16(msk, (const void*)(xp[m] + k));
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r)
        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], fiddler_as_bh(xv), fiddler_as_bh(wv[r]));
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < NM; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) res[m * NR + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// Register budget (32 zmm): NR * NM accumulators + NR weight vectors + 1.
void dot_dispatch(int nr, int nm, const uint16_t* const* w, const uint16_t* const* x, int64_t K,
                  float* res) {
#define FIDDLER_CASE(R, M) \
  if (nr == R && nm == M) return dot_tile<R, M>(w, x, K, res);
  FIDDLER_CASE(8, 1) FIDDLER_CASE(8, 2)
  FIDDLER_CASE(6, 1) FIDDLER_CASE(6, 2)
  FIDDLER_CASE(4, 1) FIDDLER_CASE(4, 2) FIDDLER_CASE(4, 3) FIDDLER_CASE(4, 4)
  FIDDLER_CASE(2, 1) FIDDLER_CASE(2, 2) FIDDLER_CASE(2, 3) FIDDLER_CASE(2, 4)
#undef FIDDLER_CASE
  // Not reached with the blockings below; keep a correct generic path anyway.
  for (int m = 0; m < nm; ++m)
    for (int r = 0; r < nr; ++r) dot_tile<1, 1>(w + r, x + m, K, res + m * nr + r);
}

// Token chunk (NM) and weight rows per register tile for m tokens.
inline int token_chunk(int m) { return m <= 2 ? m : 4; }
inline int rows_per_tile(int nm) { return nm <= 2 ? 8 : 4; }

void gate_up(const MoeProblem* p, int32_t e, int64_t n0, int64_t n1) {
  const ExpertWork& ew = p->experts[e];
  const int64_t H = p->H, I = p->I;
  const int m = ew.m;
  const int tm = token_chunk(m);
  const int rb = rows_per_tile(tm) / 2;  // act columns per register tile
  const uint16_t* w[8];
  const uint16_t* xs[4];
  float res[4 * 8];
  // Rows outer, tokens inner: the register tile's weight rows (a few KiB each)
  // stay in L1/L2 while every token chunk is multiplied with them, so each
  // weight byte comes from DRAM once whatever the number of tokens.
  for (int64_t n = n0; n < n1; n += rb) {
    const int nb = (int)(n1 - n < rb ? n1 - n : rb);
    for (int r = 0; r < nb; ++r) {
      w[r] = ew.w13 + (n + r) * H;            // gate row
      w[nb + r] = ew.w13 + (I + n + r) * H;   // up row
    }
    for (int m0 = 0; m0 < m; m0 += tm) {
      const int nm = m - m0 < tm ? m - m0 : tm;
      for (int i = 0; i < nm; ++i) xs[i] = p->x + (int64_t)ew.tok[m0 + i] * p->ldx;
      dot_dispatch(2 * nb, nm, w, xs, H, res);
      for (int i = 0; i < nm; ++i) {
        uint16_t* dst = ew.act + (int64_t)(m0 + i) * I + n;
        for (int r = 0; r < nb; ++r) {
          const float g = res[i * 2 * nb + r], u = res[i * 2 * nb + nb + r];
          dst[r] = fiddler_f32_to_bf16(fiddler_silu(g) * u);
        }
      }
    }
  }
}

void down(const MoeProblem* p, int32_t e, int64_t h0, int64_t h1) {
  const ExpertWork& ew = p->experts[e];
  const int64_t I = p->I;
  const int m = ew.m;
  const int tm = token_chunk(m);
  const int rb = rows_per_tile(tm);
  const uint16_t* w[8];
  const uint16_t* xs[4];
  float res[4 * 8];
  for (int64_t h = h0; h < h1; h += rb) {
    const int nb = (int)(h1 - h < rb ? h1 - h : rb);
    for (int r = 0; r < nb; ++r) w[r] = ew.w2 + (h + r) * I;
    for (int m0 = 0; m0 < m; m0 += tm) {
      const int nm = m - m0 < tm ? m - m0 : tm;
      for (int i = 0; i < nm; ++i) xs[i] = ew.act + (int64_t)(m0 + i) * I;
      if (nb == 8 || nb == 4 || nb == 2 || (nb == 6 && nm <= 2)) {
        dot_dispatch(nb, nm, w, xs, I, res);
      } else {  // odd tail rows: one at a time
        for (int r = 0; r < nb; ++r) {
          float tmp[4];
          dot_dispatch(1, nm, w + r, xs, I, tmp);  // generic path
          for (int i = 0; i < nm; ++i) res[i * nb + r] = tmp[i];
        }
      }
      for (int i = 0; i < nm; ++i) {
        float* o = p->out + (int64_t)ew.tok[m0 + i] * p->ldo + h;
        const float wt = ew.wt[m0 + i];
        for (int r = 0; r < nb; ++r) o[r] += wt * res[i * nb + r];
      }
    }
  }
}

const KernelTable kTable = {
    fiddler_cpu::kApiVersion, "avx512_bf16", nullptr, nullptr, nullptr, gate_up, down, /*down_rows=*/0,
};

}  // namespace

extern "C" __attribute__((visibility("default"))) const fiddler_cpu::KernelTable* fiddler_cpu_kernel_table(void) {
  return &kTable;
}
