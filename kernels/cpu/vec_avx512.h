// AVX-512 helpers shared by the ISA-specific kernel files (kernel_avx512bf16.cpp,
// kernel_amx.cpp). Include ONLY from files compiled with the AVX-512 flags.
// Everything is `static inline` (internal linkage), see kernel_api.h for why.
#pragma once

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define FIDDLER_INLINE static inline __attribute__((always_inline))

// Round-to-nearest-even fp32 -> bf16 (what VCVTNEPS2BF16 does; NaN stays NaN).
FIDDLER_INLINE uint16_t fiddler_f32_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

FIDDLER_INLINE float fiddler_silu(float g) { return g / (1.0f + expf(-g)); }

// exp(x) for fp32 lanes: Cody-Waite range reduction + degree-6 polynomial,
// rel. error ~2e-7 (well below the bf16 rounding the result goes through).
FIDDLER_INLINE __m512 fiddler_exp512(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
  const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// silu(g) * u on 16 lanes.
FIDDLER_INLINE __m512 fiddler_swiglu512(__m512 g, __m512 u) {
  __m512 e = fiddler_exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
  __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  return _mm512_mul_ps(s, u);
}

// 16 fp32 -> 16 bf16 (round to nearest even), as raw 16-bit lanes.
FIDDLER_INLINE __m256i fiddler_cvt_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

FIDDLER_INLINE __m512bh fiddler_as_bh(__m512i v) { return (__m512bh)v; }
