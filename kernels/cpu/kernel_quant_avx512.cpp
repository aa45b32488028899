// Quantized experts on AVX-512 (F, BW, VL: no BF16 or AMX needed): FP8 (e4m3fn)
// block-scaled, MXFP4 and INT4 (groups, or groups with zero points). Built as its own
// shared library with those -m flags (see kernel_api.h).
//
// Weights stay as stored (ExpertWork.q13 / s13, q2 / s2; MoeProblem.fmt):
// - FP8: one byte a weight, one fp32 scale per bn x bk block (MoeProblem.bn / bk). Each
//   32-weight chunk is widened to fp32 in registers (through fp16, fp8x32_to_fp16),
//   multiplied with the tokens' fp32 activations into a per-block accumulator, and the
//   block's scale is applied once per block: W = q * s exactly as kernels/quant.py's
//   dequant_fp8_block.
// - MXFP4: two e2m1 codes a byte, an e8m0 exponent per 32 weights; INT4: two codes a byte
//   (value + 8), a scale per group of bk weights (the model's bf16 or fp16); INT4 with zero
//   points: unsigned codes and a word per group (that scale, 4-bit zero point z). Each code
//   becomes fp32 by a 16-entry table lookup in a register, the table scaled by the group's
//   scale (and offset by -z * scale) first (exact, as kernels/quant.py's dequant_mxfp4 /
//   dequant_int4_group / dequant_int4_zp). Up to 4 tokens multiply the values in registers
//   (row_dot_4bit); more go through a decoded row, as FP8's many-token path does.
// Accumulation is fp32. x arrives in the model's 16-bit float (bf16, or fp16: MoeProblem.f16,
// as GPTQ and AWQ checkpoints run) and is widened exactly per item; biases (same dtype) are
// added to each projection's fp32 result; the activation (SiLU-gated, or gpt-oss's clamped
// SwiGLU) stays fp32 (ExpertWork.actf, [m][I]) for the down projection.
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
  // sign-extended to 16 bits and shifted by 7: the sign lands on bits 15 and 14; clear 14
  const __m512i v = _mm512_slli_epi16(_mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, q)), 7);
  return _mm512_and_si512(v, _mm512_set1_epi16(int16_t(0xBFFF)));
}

static inline __mmask32 tail_mask32(int64_t n) { return n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1); }

static inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// acc[t] = sum_k q[k] * srow[k / bk] * X[t][k], t < M; X fp32 rows of ldx. M is a template
// argument so that the accumulators stay in registers; each chunk's two halves accumulate
// in separate registers (two chains of dependent FMAs a token, not one).
template <int M>
__attribute__((always_inline)) static inline void chunk_dot_fp8(const uint8_t* q, __mmask32 mask, const float* X,
                                                                int64_t ldx, __m512 (&b0)[M], __m512 (&b1)[M]) {
  const __m512i h = fp8x32_to_fp16(q, mask);
  const __m512 w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  const __m512 w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
  const __mmask16 m0 = __mmask16(mask), m1 = __mmask16(mask >> 16);
  for (int t = 0; t < M; ++t) {
    b0[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, X + t * ldx), b0[t]);
    b1[t] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, X + t * ldx + 16), b1[t]);
  }
}

template <int M>
static inline void row_dot(const uint8_t* q, const float* srow, int64_t K, int64_t bk, const float* X, int64_t ldx,
                           float* acc) {
  __m512 tot[M], b0[M], b1[M];
  for (int t = 0; t < M; ++t) tot[t] = _mm512_setzero_ps();
  for (int64_t k0 = 0, blk = 0; k0 < K; k0 += bk, ++blk) {
    const int64_t k1 = std::min(k0 + bk, K);
    for (int t = 0; t < M; ++t) b0[t] = b1[t] = _mm512_setzero_ps();
    int64_t k = k0;
    // full chunks with a constant mask, then the block's tail: a mask computed every chunk
    // costs three moves to mask registers, on the port the conversions need (1024x1024
    // expert, 1 token, one thread, weights in cache, 2-core VM: 9.4 -> 12.8 GB/s)
    for (; k + 32 <= k1; k += 32) chunk_dot_fp8<M>(q + k, ~__mmask32(0), X + k, ldx, b0, b1);
    if (k < k1) chunk_dot_fp8<M>(q + k, tail_mask32(k1 - k), X + k, ldx, b0, b1);
    const __m512 s = _mm512_set1_ps(srow[blk] * 256.0f);  // the fp16 decode's 2^-8 back
    for (int t = 0; t < M; ++t) tot[t] = _mm512_fmadd_ps(_mm512_add_ps(b0[t], b1[t]), s, tot[t]);
  }
  for (int t = 0; t < M; ++t) acc[t] = _mm512_reduce_add_ps(tot[t]);
}

// Many tokens: kRows rows decoded once (block scales applied) into fp32 (L2), then a
// kRows x kToks register tile of FMAs, so each activation load feeds kRows rows and each
// weight load kToks tokens (one decoded row at a time re-read every token's activations
// from L2 per row: 1.1 GB/s at 16 tokens on a 2-core VM, under torch's bf16 matmul).
constexpr int kRows = 4, kToks = 4;

static inline void decode_row(const uint8_t* q, const float* srow, int64_t K, int64_t bk, float* w) {
  for (int64_t k0 = 0, blk = 0; k0 < K; k0 += bk, ++blk) {
    const int64_t k1 = std::min(k0 + bk, K);
    const __m512 s = _mm512_set1_ps(srow[blk] * 256.0f);
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

// e2m1 values by 4-bit code (kernels/quant.py's E2M1_VALUES); INT4 values (code - 8); the
// codes themselves (INT4 with zero points: the offset subtracts z * scale)
alignas(64) const float kE2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
alignas(64) const float kInt4[16] = {-8.0f, -7.0f, -6.0f, -5.0f, -4.0f, -3.0f, -2.0f, -1.0f,
                                     0.0f,  1.0f,  2.0f,  3.0f,  4.0f,  5.0f,  6.0f,  7.0f};
alignas(64) const float kU4[16] = {0.0f, 1.0f, 2.0f,  3.0f,  4.0f,  5.0f,  6.0f,  7.0f,
                                   8.0f, 9.0f, 10.0f, 11.0f, 12.0f, 13.0f, 14.0f, 15.0f};

static inline float bf16_to_float(uint16_t b) {
  uint32_t bits = uint32_t(b) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// A value of the model's 16-bit float (bias, INT4 scale): fp16 where p->f16, else bf16.
static inline float half_to_float(const MoeProblem* p, uint16_t b) { return p->f16 ? _cvtsh_ss(b) : bf16_to_float(b); }

// sc[c] = the scale of 32-weight chunk c of one row of a 4-bit format, fp32, and sc[C + c]
// its offset (C = K / 32 chunks): a weight is lut[code] * scale + offset. MXFP4: 2^(e - 127)
// from its e8m0 byte (a byte of 0, 2^-127, gives 0); INT4: its group's scale (the model's
// 16-bit float); both offset 0. INT4 with zero points: the scale from bits 0..15 of the
// group's word (the model's 16-bit float too) and offset -z * scale from its zero point z in
// bits 16..19, on the code table 0..15, so (q - z) * scale, exact in fp32 as the others are.
// Computed once per row, so the inner loops broadcast a float from memory (a load, no
// shuffle) and divide nothing.
static inline void chunk_scales(const MoeProblem* p, const void* srow, int64_t K, float* sc) {
  const int64_t C = K / 32;
  float* off = sc + C;
  if (p->fmt == fiddler_cpu::kFmtInt4Zp) {
    const auto* w = static_cast<const uint32_t*>(srow);
    const int64_t per = p->bk / 32;  // chunks a group
    for (int64_t g = 0; g < K / p->bk; ++g) {
      const float s = half_to_float(p, uint16_t(w[g] & 0xFFFFu)), o = -float((w[g] >> 16) & 0xFu) * s;
      std::fill(sc + g * per, sc + (g + 1) * per, s);
      std::fill(off + g * per, off + (g + 1) * per, o);
    }
    return;
  }
  std::fill(off, off + C, 0.0f);
  if (p->fmt == fiddler_cpu::kFmtMxfp4) {
    const auto* e = static_cast<const uint8_t*>(srow);
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 mask = tail_mask(C - c);
      const __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, e + c));
      _mm512_mask_storeu_ps(sc + c, mask, _mm512_castsi512_ps(_mm512_slli_epi32(v, 23)));
    }
    return;
  }
  const auto* s = static_cast<const uint16_t*>(srow);
  const int64_t per = p->bk / 32;  // chunks a group
  for (int64_t g = 0; g < K / p->bk; ++g) std::fill(sc + g * per, sc + (g + 1) * per, half_to_float(p, s[g]));
}

// 32 weights from 16 bytes of 4-bit codes (low nibble first): w[k] = lut[code k] * s + o.
static inline void decode_nibbles32(const uint8_t* q, __m512 lut, __m512 s, __m512 o, float* w) {
  // natural order from the low-nibble values (a) and high-nibble values (b): a0 b0 a1 b1 ...
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m512 ls = _mm512_fmadd_ps(lut, s, o);  // the scaled table
  const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)), ls);
  const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), ls);
  _mm512_storeu_ps(w, _mm512_permutex2var_ps(lo, first, hi));
  _mm512_storeu_ps(w + 16, _mm512_permutex2var_ps(lo, second, hi));
}

// One 4-bit row in natural order: w[k] = lut[code k] * sc[k / 32] + sc[C + k / 32], k < K (K
// a multiple of 32; sc from chunk_scales).
static inline void decode_row_4bit(const uint8_t* q, const float* sc, int64_t K, __m512 lut, float* w) {
  const int64_t C = K / 32;
  for (int64_t c = 0; c < C; ++c)
    decode_nibbles32(q + 16 * c, lut, _mm512_set1_ps(sc[c]), _mm512_set1_ps(sc[C + c]), w + 32 * c);
}

// One 32-weight chunk c of a 4-bit row against M tokens: the table is scaled first (one
// fused multiply-add for 32 weights, sc[C + c] the offset), then looked up for the low and
// the high nibbles, whose values meet 16 contiguous activations each in Xd (see row_dot_4bit).
template <int M>
__attribute__((always_inline)) static inline void chunk_dot_4bit(const uint8_t* q, const float* sc, int64_t c,
                                                                 __m512 lut, const float* Xd, int64_t K,
                                                                 __m512 (&a)[M][2]) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * c)));
  const __m512 ls = _mm512_fmadd_ps(lut, _mm512_set1_ps(sc[c]), _mm512_set1_ps(sc[K / 32 + c]));
  const __m512 lo = _mm512_permutexvar_ps(b, ls);  // VPERMPS reads an index's low 4 bits only
  const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), ls);
  for (int t = 0; t < M; ++t) {
    const float* xr = Xd + t * K + 32 * c;
    a[t][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), a[t][0]);
    a[t][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), a[t][1]);
  }
}

// Few tokens, 4-bit formats: the row's codes meet the tokens' activations in registers, no
// decoded row in memory. Xd holds each 32-input chunk of X with its even inputs first, then its
// odd ones (deinterleave), so a chunk's low-nibble values (inputs 2j) and high-nibble values
// (2j + 1) each multiply 16 contiguous activations: no reordering of the weights. Up to 2
// tokens, two chunks are in flight (four accumulator chains a token), so that FMA latency is
// hidden.
template <int M>
static inline void row_dot_4bit(const uint8_t* q, const float* sc, int64_t K, __m512 lut, const float* Xd,
                                float* acc) {
  constexpr int U = M <= 2 ? 2 : 1;
  __m512 a[U][M][2];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < M; ++t) a[u][t][0] = a[u][t][1] = _mm512_setzero_ps();
  const int64_t C = K / 32;
  int64_t c = 0;
  for (; c + U <= C; c += U)
    for (int u = 0; u < U; ++u) chunk_dot_4bit<M>(q, sc, c + u, lut, Xd, K, a[u]);
  for (; c < C; ++c) chunk_dot_4bit<M>(q, sc, c, lut, Xd, K, a[0]);
  for (int t = 0; t < M; ++t) {
    __m512 v = _mm512_add_ps(a[0][t][0], a[0][t][1]);
    for (int u = 1; u < U; ++u) v = _mm512_add_ps(v, _mm512_add_ps(a[u][t][0], a[u][t][1]));
    acc[t] = _mm512_reduce_add_ps(v);
  }
}

// Xd [m][K] from X [m][K] (rows of ldx): each 32-input chunk's even inputs, then its odd ones
// (row_dot_4bit); K a multiple of 32. Thread-local scratch.
static const float* deinterleave(const float* X, int64_t ldx, int32_t m, int64_t K) {
  thread_local std::vector<float> xd;
  xd.resize(size_t(m) * size_t(K));
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  for (int32_t t = 0; t < m; ++t)
    for (int64_t k = 0; k < K; k += 32) {
      const __m512 a = _mm512_loadu_ps(X + t * ldx + k), b = _mm512_loadu_ps(X + t * ldx + k + 16);
      _mm512_storeu_ps(xd.data() + t * K + k, _mm512_permutex2var_ps(a, even, b));
      _mm512_storeu_ps(xd.data() + t * K + k + 16, _mm512_permutex2var_ps(a, odd, b));
    }
  return xd.data();
}

static inline bool four_bit(const MoeProblem* p) {
  return p->fmt == fiddler_cpu::kFmtMxfp4 || p->fmt == fiddler_cpu::kFmtInt4Group || p->fmt == fiddler_cpu::kFmtInt4Zp;
}

// Row r's chunk scales and offsets (chunk_scales) from a 4-bit format's scale tensor
// ([rows][K / group]: e8m0 bytes, bf16 scales or scale / zero words), in thread-local scratch.
static inline const float* row_scales_4bit(const MoeProblem* p, const void* scales, int64_t r, int64_t K) {
  thread_local std::vector<float> sc;
  sc.resize(size_t(2 * (K / 32)));
  const void* srow = p->fmt == fiddler_cpu::kFmtMxfp4
                         ? static_cast<const void*>(static_cast<const uint8_t*>(scales) + r * (K / 32))
                     : p->fmt == fiddler_cpu::kFmtInt4Zp
                         ? static_cast<const void*>(static_cast<const uint32_t*>(scales) + r * (K / p->bk))
                         : static_cast<const void*>(static_cast<const uint16_t*>(scales) + r * (K / p->bk));
  chunk_scales(p, srow, K, sc.data());
  return sc.data();
}

static inline __m512 lut_4bit(const MoeProblem* p) {
  return _mm512_load_ps(p->fmt == fiddler_cpu::kFmtMxfp4 ? kE2M1 : p->fmt == fiddler_cpu::kFmtInt4Zp ? kU4 : kInt4);
}

// acc[r * m + t] for rows row0 .. row0 + nr - 1 of a 4-bit format, m <= 4, Xd deinterleaved.
static void rows_dot_4bit(const MoeProblem* p, const uint8_t* q, const void* scales, int64_t row0, int nr, int64_t K,
                          const float* Xd, int32_t m, float* acc) {
  const __m512 lut = lut_4bit(p);
  for (int r = 0; r < nr; ++r) {
    const float* sc = row_scales_4bit(p, scales, row0 + r, K);
    const uint8_t* qr = q + (row0 + r) * (K / 2);
    float* ar = acc + int64_t(r) * m;
    switch (m) {
      case 1: row_dot_4bit<1>(qr, sc, K, lut, Xd, ar); break;
      case 2: row_dot_4bit<2>(qr, sc, K, lut, Xd, ar); break;
      case 3: row_dot_4bit<3>(qr, sc, K, lut, Xd, ar); break;
      default: row_dot_4bit<4>(qr, sc, K, lut, Xd, ar); break;
    }
  }
}

// acc[r * m + t] for rows row0 .. row0 + nr - 1 (nr <= kRows) of one projection ([rows][K]
// as stored, see the file's comment) and every token t < m.
static void rows_dot(const MoeProblem* p, const uint8_t* q, const void* scales, int64_t row0, int nr, int64_t K,
                     const float* X, int64_t ldx, int32_t m, float* acc) {
  thread_local std::vector<float> W;
  W.resize(size_t(kRows) * size_t(K));
  if (four_bit(p)) {
    const __m512 lut = lut_4bit(p);
    for (int r = 0; r < nr; ++r)
      decode_row_4bit(q + (row0 + r) * (K / 2), row_scales_4bit(p, scales, row0 + r, K), K, lut, W.data() + r * K);
  } else {
    const int64_t bn = p->bn, bk = p->bk, sk = (K + bk - 1) / bk;
    const auto* s = static_cast<const float*>(scales);
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
    for (int r = 0; r < nr; ++r) decode_row(q + (row0 + r) * K, s + ((row0 + r) / bn) * sk, K, bk, W.data() + r * K);
  }
  if (nr == kRows) {
    tile_rows<kRows>(W.data(), K, X, ldx, m, acc);
    return;
  }
  for (int r = 0; r < nr; ++r) tile_rows<1>(W.data() + r * K, K, X, ldx, m, acc + int64_t(r) * m);
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

// The expert's tokens' x rows, bf16 or fp16 -> fp32 [m][H] (exact; thread-local scratch).
static const float* widen_x(const MoeProblem* p, const ExpertWork& ew) {
  thread_local std::vector<float> xs;
  const int64_t H = p->H;
  xs.resize(size_t(ew.m) * size_t(H));
  for (int32_t t = 0; t < ew.m; ++t) {
    const uint16_t* src = p->x + int64_t(ew.tok[t]) * p->ldx;
    float* dst = xs.data() + int64_t(t) * H;
    for (int64_t h = 0; h < H; h += 16) {
      const __mmask16 mask = tail_mask(H - h);
      const __m256i v = _mm256_maskz_loadu_epi16(mask, src + h);
      const __m512 f = p->f16 ? _mm512_cvtph_ps(v)
                              : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
      _mm512_mask_storeu_ps(dst + h, mask, f);
    }
  }
  return xs.data();
}

// The expert's activation of gate and up (biases added), fp32.
static inline float activate(const MoeProblem* p, float g, float u) {
  if (p->act == fiddler_cpu::kActSwigluOai) {
    g = std::min(g, p->limit);
    u = std::max(std::min(u, p->limit), -p->limit);
    return (u + 1.0f) * (g / (1.0f + expf(-p->alpha * g)));
  }
  return silu(g) * u;
}

// actf[:, n0:n1] = act(x w1[n0:n1]^T + b1, x w3[n0:n1]^T + b3), fp32.
void gate_up(const MoeProblem* p, int32_t e, int64_t n0, int64_t n1) {
  const ExpertWork& ew = p->experts[e];
  const int64_t H = p->H, I = p->I;
  const float* xs = widen_x(p, ew);
  const bool direct = four_bit(p) && ew.m <= 4;  // rows_dot_4bit on deinterleaved activations
  const float* xd = direct ? deinterleave(xs, H, ew.m, H) : nullptr;
  thread_local std::vector<float> g, u;
  g.resize(size_t(kRows) * ew.m);
  u.resize(size_t(kRows) * ew.m);
  for (int64_t n = n0; n < n1; n += kRows) {
    const int nr = int(std::min<int64_t>(kRows, n1 - n));
    if (direct) {
      rows_dot_4bit(p, ew.q13, ew.s13, n, nr, H, xd, ew.m, g.data());
      rows_dot_4bit(p, ew.q13, ew.s13, n + I, nr, H, xd, ew.m, u.data());
    } else {
      rows_dot(p, ew.q13, ew.s13, n, nr, H, xs, H, ew.m, g.data());
      rows_dot(p, ew.q13, ew.s13, n + I, nr, H, xs, H, ew.m, u.data());
    }
    for (int r = 0; r < nr; ++r) {
      const float bg = ew.b13 ? half_to_float(p, ew.b13[n + r]) : 0.0f;
      const float bu = ew.b13 ? half_to_float(p, ew.b13[I + n + r]) : 0.0f;
      for (int32_t t = 0; t < ew.m; ++t)
        ew.actf[int64_t(t) * I + n + r] = activate(p, g[size_t(r) * ew.m + t] + bg, u[size_t(r) * ew.m + t] + bu);
    }
  }
}

// out[tok, h0:h1] += wt * (actf w2[h0:h1]^T + b2), fp32.
void down(const MoeProblem* p, int32_t e, int64_t h0, int64_t h1) {
  const ExpertWork& ew = p->experts[e];
  const int64_t I = p->I;
  const bool direct = four_bit(p) && ew.m <= 4;  // rows_dot_4bit on deinterleaved activations
  const float* ad = direct ? deinterleave(ew.actf, I, ew.m, I) : nullptr;
  thread_local std::vector<float> y;
  y.resize(size_t(kRows) * ew.m);
  for (int64_t h = h0; h < h1; h += kRows) {
    const int nr = int(std::min<int64_t>(kRows, h1 - h));
    if (direct)
      rows_dot_4bit(p, ew.q2, ew.s2, h, nr, I, ad, ew.m, y.data());
    else
      rows_dot(p, ew.q2, ew.s2, h, nr, I, ew.actf, I, ew.m, y.data());
    for (int r = 0; r < nr; ++r) {
      const float b = ew.b2 ? half_to_float(p, ew.b2[h + r]) : 0.0f;
      for (int32_t t = 0; t < ew.m; ++t)
        p->out[int64_t(ew.tok[t]) * p->ldo + h + r] += ew.wt[t] * (y[size_t(r) * ew.m + t] + b);
    }
  }
}

const fiddler_cpu::KernelTable kTable = {
    fiddler_cpu::kApiVersion, "avx512_quant", nullptr, nullptr, nullptr, gate_up, down, /*down_rows=*/0,
};

}  // namespace

extern "C" __attribute__((visibility("default"))) const fiddler_cpu::KernelTable* fiddler_cpu_kernel_table(void) {
  return &kTable;
}
