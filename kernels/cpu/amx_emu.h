// Scalar emulation of the AMX tile intrinsics used by kernel_amx.cpp, for
// testing the AMX kernels' indexing (layouts, tails, blocking) on CPUs without
// AMX: kernel_amx.cpp is compiled with -DFIDDLER_AMX_EMULATE (and without
// -mamx-*), and vllm_fiddler.kernels.cpu registers the result as the "amx" path
// when FIDDLER_CPU_AMX_EMULATE=1. Slow; never used in production.
// Semantics follow the Intel SDM (palette 1: 8 tiles of up to 16 rows x 64 bytes).
#pragma once

#include <stdint.h>
#include <string.h>

namespace fiddler_amx_emu {

struct Tiles {
  uint8_t rows[8];
  uint16_t colsb[8];
  alignas(64) uint8_t data[8][16][64];
};
thread_local Tiles tls_tiles;

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline void loadconfig(const void* cfg) {
  const uint8_t* c = (const uint8_t*)cfg;
  for (int t = 0; t < 8; ++t) {
    uint16_t cb;
    memcpy(&cb, c + 16 + 2 * t, 2);
    tls_tiles.colsb[t] = cb;
    tls_tiles.rows[t] = c[48 + t];
  }
  memset(tls_tiles.data, 0, sizeof(tls_tiles.data));
}

inline void release() {
  memset(&tls_tiles, 0, sizeof(tls_tiles));
}

inline void loadd(int t, const void* base, long stride) {
  for (int r = 0; r < tls_tiles.rows[t]; ++r)
    memcpy(tls_tiles.data[t][r], (const uint8_t*)base + r * stride, tls_tiles.colsb[t]);
}

inline void stored(int t, void* base, long stride) {
  for (int r = 0; r < tls_tiles.rows[t]; ++r)
    memcpy((uint8_t*)base + r * stride, tls_tiles.data[t][r], tls_tiles.colsb[t]);
}

inline void zero(int t) { memset(tls_tiles.data[t], 0, sizeof(tls_tiles.data[t])); }

// C[m][n] += sum_k A[m][2k] * B[k][2n] + A[m][2k+1] * B[k][2n+1]
inline void dpbf16ps(int c, int a, int b) {
  const int M = tls_tiles.rows[c], N = tls_tiles.colsb[c] / 4, K = tls_tiles.colsb[a] / 4;
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float acc;
      memcpy(&acc, &tls_tiles.data[c][m][4 * n], 4);
      for (int k = 0; k < K; ++k) {
        uint16_t a0, a1, b0, b1;
        memcpy(&a0, &tls_tiles.data[a][m][4 * k], 2);
        memcpy(&a1, &tls_tiles.data[a][m][4 * k + 2], 2);
        memcpy(&b0, &tls_tiles.data[b][k][4 * n], 2);
        memcpy(&b1, &tls_tiles.data[b][k][4 * n + 2], 2);
        acc += bf16_to_f32(a0) * bf16_to_f32(b0) + bf16_to_f32(a1) * bf16_to_f32(b1);
      }
      memcpy(&tls_tiles.data[c][m][4 * n], &acc, 4);
    }
  }
}

}  // namespace fiddler_amx_emu

#undef _tile_loadconfig
#undef _tile_release
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig(cfg) fiddler_amx_emu::loadconfig(cfg)
#define _tile_release() fiddler_amx_emu::release()
#define _tile_loadd(t, base, stride) fiddler_amx_emu::loadd(t, base, (long)(stride))
#define _tile_stored(t, base, stride) fiddler_amx_emu::stored(t, (void*)(base), (long)(stride))
#define _tile_zero(t) fiddler_amx_emu::zero(t)
#define _tile_dpbf16ps(c, a, b) fiddler_amx_emu::dpbf16ps(c, a, b)
