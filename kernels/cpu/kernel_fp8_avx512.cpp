// FP8 (e4m3fn) block-scaled experts on AVX-512 (F, BW, VL: no BF16 or AMX needed).
// Built as its own shared library with those -m flags (see kernel_api.h).
//
// Weights stay as stored: one byte a weight, one fp32 scale per bn x bk block
// (ExpertWork.q13 / s13, q2 / s2; MoeProblem.bn / bk). Each 32-weight chunk is
// widened to fp32 in registers (through fp16, fp8x32_to_fp16), multiplied with the tokens' fp32
// activations into a per-block accumulator, and the block's scale is applied
// once per block: W = q * s exactly as kernels/quant.py's dequant_fp8_block, with
// fp32 accumulation. x arrives in bf16 and is widened per item; the SwiGLU
// activation stays fp32 (ExpertWork.actf, [m][I]) for the down projection.
//
// Shape legend: H hidden, I intermediate, m tokens of an expert, bn x bk scale blocks.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "kernel_api.h"

namespace {

using fiddler_cpu::ExpertWork;
using fiddler_cpu::MoeProblem;


// 32 e4m3fn codes -> 32 fp16 with the same bits shifted: sign to bit 15, exponent and
// mantissa to bits 7..13. The fp16 value is the e4m3 value / 2^8 (exponent bias 15, not 7),
// subnormals included, so VCVTPH2PS widens it exactly and the 2^8 goes into the block
// scale.
static inline __m512i fp8x32_to_fp16(const uint8_t* q, __mmask32 mask) {
  // t << 7: exponent and mantissa at bits 7..13, the sign at 14; adding bit 14 to itself
  // carries the sign into bit 15 (bit 15 is clear) and clears 14
  const __m512i v = _mm512_slli_epi16(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mask, q)), 7);
  return _mm512_add_epi16(v, _mm512_and_si512(v, _mm512_set1_epi16(0x4000)));
}

static inline __mmask32 tail_mask32(int64_t n) { return n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1); }

static inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// acc[t] = sum_k q[k] * srow[k / bk] * X[t][k], t < M; X fp32 rows of ldx. M is a template
// argument so that the accumulators stay in registers.
template <int M>
static inline void row_dot(const uint8_t* q, const float* srow, int64_t K, int64_t bk, const float* X, int64_t ldx,
                           float* acc) {
  __m512 tot[M], blk[M];
  for (int t = 0; t < M; ++t) tot[t] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += bk) {
    const int64_t k1 = std::min(k0 + bk, K);
    for (int t = 0; t < M; ++t) blk[t] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; k += 32) {
      const __mmask32 mask = tail_mask32(k1 - k);
      const __m512i h = fp8x32_to_fp16(q + k, mask);
      const __m512 w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
      const __m512 w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
      const __mmask16 m0 = __mmask16(mask), m1 = __mmask16(mask >> 16);
      for (int t = 0; t < M; ++t) {
        const float* xr = X + t * ldx + k;
        blk[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, xr), blk[t]);
        blk[t] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, xr + 16), blk[t]);
      }
    }
    const __m512 s = _mm512_set1_ps(srow[k0 / bk] * 256.0f);  // the fp16 decode's 2^-8 back
    for (int t = 0; t < M; ++t) tot[t] = _mm512_fmadd_ps(blk[t], s, tot[t]);
  }
  for (int t = 0; t < M; ++t) acc[t] = _mm512_reduce_add_ps(tot[t]);
}

// Many tokens: kRows rows decoded once (block scales applied) into fp32 (L2), then a
// kRows x kToks register tile of FMAs, so each activation load feeds kRows rows and each
// weight load kToks tokens (one decoded row at a time re-read every token's activations
// from L2 per row: 1.1 GB/s at 16 tokens on a 2-core VM, under torch's bf16 matmul).
constexpr int kRows = 4, kToks = 4;

static inline void decode_row(const uint8_t* q, const float* srow, int64_t K, int64_t bk, float* w) {
  for (int64_t k0 = 0; k0 < K; k0 += bk) {
    const int64_t k1 = std::min(k0 + bk, K);
    const __m512 s = _mm512_set1_ps(srow[k0 / bk] * 256.0f);
    for (int64_t k = k0; k < k1; k += 32) {
      const __mmask32 mask = tail_mask32(k1 - k);
      const __m512i h = fp8x32_to_fp16(q + k, mask);
      _mm512_mask_storeu_ps(w + k, __mmask16(mask), _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), s));
      _mm512_mask_storeu_ps(w + k + 16, __mmask16(mask >> 16),
                            _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), s));
    }
  }
}

// acc[r * ldo + t] = sum_k W[r * K + k] * X[t * ldx + k], r < R, t < M.
template <int R, int M>
static inline void tile_dot(const float* W, int64_t K, const float* X, int64_t ldx, float* acc, int64_t ldo) {
  __m512 a[R][M];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < M; ++t) a[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = tail_mask(K - k);
    __m512 w[R];
    for (int r = 0; r < R; ++r) w[r] = _mm512_maskz_loadu_ps(mask, W + r * K + k);
    for (int t = 0; t < M; ++t) {
      const __m512 x = _mm512_maskz_loadu_ps(mask, X + t * ldx + k);
      for (int r = 0; r < R; ++r) a[r][t] = _mm512_fmadd_ps(w[r], x, a[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < M; ++t) acc[r * ldo + t] = _mm512_reduce_add_ps(a[r][t]);
}

template <int R>
static inline void tile_rows(const float* W, int64_t K, const float* X, int64_t ldx, int32_t m, float* acc) {
  int32_t t0 = 0;
  for (; t0 + kToks <= m; t0 += kToks) tile_dot<R, kToks>(W, K, X + int64_t(t0) * ldx, ldx, acc + t0, m);
  for (; t0 < m; ++t0) tile_dot<R, 1>(W, K, X + int64_t(t0) * ldx, ldx, acc + t0, m);
}

// acc[r * m + t] for rows row0 .. row0 + nr - 1 (nr <= kRows) of q ([rows][K], scales s of
// sk columns a bn-row block) and every token t < m.
static void rows_dot(const uint8_t* q, const float* s, int64_t row0, int nr, int64_t K, int64_t bn, int64_t bk,
                     int64_t sk, const float* X, int64_t ldx, int32_t m, float* acc) {
  if (m <= 4) {
    for (int r = 0; r < nr; ++r) {
      const uint8_t* qr = q + (row0 + r) * K;
      const float* sr = s + ((row0 + r) / bn) * sk;
      float* ar = acc + int64_t(r) * m;
      switch (m) {
        case 1: row_dot<1>(qr, sr, K, bk, X, ldx, ar); break;
        case 2: row_dot<2>(qr, sr, K, bk, X, ldx, ar); break;
        case 3: row_dot<3>(qr, sr, K, bk, X, ldx, ar); break;
        default: row_dot<4>(qr, sr, K, bk, X, ldx, ar); break;
      }
    }
    return;
  }
  thread_local std::vector<float> W;
  W.resize(size_t(kRows) * size_t(K));
  for (int r = 0; r < nr; ++r) decode_row(q + (row0 + r) * K, s + ((row0 + r) / bn) * sk, K, bk, W.data() + r * K);
  if (nr == kRows) {
    tile_rows<kRows>(W.data(), K, X, ldx, m, acc);
    return;
  }
  for (int r = 0; r < nr; ++r) tile_rows<1>(W.data() + r * K, K, X, ldx, m, acc + int64_t(r) * m);
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

// The expert's tokens' x rows, bf16 -> fp32 [m][H] (thread-local scratch).
static const float* widen_x(const MoeProblem* p, const ExpertWork& ew) {
  thread_local std::vector<float> xs;
  const int64_t H = p->H;
  xs.resize(size_t(ew.m) * size_t(H));
  for (int32_t t = 0; t < ew.m; ++t) {
    const uint16_t* src = p->x + int64_t(ew.tok[t]) * p->ldx;
    float* dst = xs.data() + int64_t(t) * H;
    for (int64_t h = 0; h < H; h += 16) {
      const __mmask16 mask = tail_mask(H - h);
      const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src + h));
      _mm512_mask_storeu_ps(dst + h, mask, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
  }
  return xs.data();
}

// actf[:, n0:n1] = silu(x w1[n0:n1]^T) * (x w3[n0:n1]^T), fp32.
void gate_up(const MoeProblem* p, int32_t e, int64_t n0, int64_t n1) {
  const ExpertWork& ew = p->experts[e];
  const int64_t H = p->H, I = p->I, bn = p->bn, bk = p->bk, sk = (H + bk - 1) / bk;
  const float* xs = widen_x(p, ew);
  thread_local std::vector<float> g, u;
  g.resize(size_t(kRows) * ew.m);
  u.resize(size_t(kRows) * ew.m);
  for (int64_t n = n0; n < n1; n += kRows) {
    const int nr = int(std::min<int64_t>(kRows, n1 - n));
    rows_dot(ew.q13, ew.s13, n, nr, H, bn, bk, sk, xs, H, ew.m, g.data());
    rows_dot(ew.q13, ew.s13, n + I, nr, H, bn, bk, sk, xs, H, ew.m, u.data());
    for (int r = 0; r < nr; ++r)
      for (int32_t t = 0; t < ew.m; ++t)
        ew.actf[int64_t(t) * I + n + r] = silu(g[size_t(r) * ew.m + t]) * u[size_t(r) * ew.m + t];
  }
}

// out[tok, h0:h1] += wt * (actf w2[h0:h1]^T), fp32.
void down(const MoeProblem* p, int32_t e, int64_t h0, int64_t h1) {
  const ExpertWork& ew = p->experts[e];
  const int64_t I = p->I, bn = p->bn, bk = p->bk, sk = (I + bk - 1) / bk;
  thread_local std::vector<float> y;
  y.resize(size_t(kRows) * ew.m);
  for (int64_t h = h0; h < h1; h += kRows) {
    const int nr = int(std::min<int64_t>(kRows, h1 - h));
    rows_dot(ew.q2, ew.s2, h, nr, I, bn, bk, sk, ew.actf, I, ew.m, y.data());
    for (int r = 0; r < nr; ++r)
      for (int32_t t = 0; t < ew.m; ++t)
        p->out[int64_t(ew.tok[t]) * p->ldo + h + r] += ew.wt[t] * y[size_t(r) * ew.m + t];
  }
}

const fiddler_cpu::KernelTable kTable = {
    fiddler_cpu::kApiVersion, "avx512_fp8", nullptr, nullptr, nullptr, gate_up, down, /*down_rows=*/0,
};

}  // namespace

extern "C" __attribute__((visibility("default"))) const fiddler_cpu::KernelTable* fiddler_cpu_kernel_table(void) {
  return &kTable;
}
