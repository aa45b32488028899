// AMX-BF16 expert kernels (many tokens per expert: compute bound).
// Built as its own shared library with
//   -mamx-tile -mamx-bf16 -mavx512f -mavx512bf16 -mavx512bw -mavx512vl -fvisibility=hidden
// and only dlopen()ed by ops.cpp when CPUID reports AMX-TILE + AMX-BF16 and the
// kernel granted XTILEDATA (arch_prctl(ARCH_REQ_XCOMP_PERM)).
// No torch / STL headers on purpose (see kernel_api.h).
//
// No load-time weight repacking (the host weights stay in vLLM's layout, the
// same copy that goes to the GPU): we compute the transposed product
//   C^T[n, m] = sum_k W[n, k] * X[m, k]
// with weight rows as the A tile (16 rows x 32 bf16 = 64 bytes of K: W's own
// row-major layout needs no VNNI transform for A) and the small activation X
// packed per call into the VNNI B-tile layout (see kernel_api.h). Each
// TDPBF16PS yields a 16(n) x 16(m) fp32 block.
//
// Tile registers (palette 1, every tile 16 rows x 64 bytes):
//   tmm0..3: C  (A0xB0, A0xB1, A1xB0, A1xB1)
//   tmm4,5 : A0, A1 (two 16-row weight slices: gate+up rows, or 32 down rows)
//   tmm6,7 : B0, B1 (two 16-token blocks of packed activation)
// Weight rows are copied into contiguous tiles (transient, per call: sequential
// streams for DRAM, and tile loads straight from rows 8 or 28 KiB apart would
// all hit one L1 set) and multiplied with every token block: per row group
// (32 rows), all of K is copied into a per-thread panel (K x 64 bytes, in L2),
// then the panel is multiplied, the C tiles staying in registers over all of K.
// K tail (K % 32 != 0): the last k-step is copied zero-padded (masked loads),
// and the packed activations are zero-padded, so nothing is read past a weight
// row. N tail (N % 16 or % 32 != 0): the last row group is shifted back to end
// at N (overlapping the previous group) and only the rows not written yet are
// stored. Requires H >= 32 and I >= 32
// (ops.cpp sends smaller experts to the AVX512-BF16 kernels).

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_api.h"
#include "vec_avx512.h"
#ifdef FIDDLER_AMX_EMULATE
#include "amx_emu.h"
#endif

namespace {

using fiddler_cpu::ExpertWork;
using fiddler_cpu::KernelTable;
using fiddler_cpu::MoeProblem;

// Software prefetch distance (bf16 elements, a multiple of 32) ahead of each
// weight row stream while packing a panel.
constexpr int64_t kPrefetch = 512;

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];  // bytes per row of each tile
  uint8_t rows[16];    // rows of each tile
};
static_assert(sizeof(TileConfig) == 64, "AMX tile config must be 64 bytes");

// The gcc tile intrinsics are asm statements without a memory clobber: fence
// the compiler around them where normal code reads/writes the same memory.
FIDDLER_INLINE void compiler_fence() { __asm__ __volatile__("" ::: "memory"); }

// ldtilecfg with the whole 64-byte config as the asm's input. gcc 12's _tile_loadconfig
// names only the config's first 8 bytes (`"m"(*(const void**)p)`), so gcc 12.2 at -O3
// dropped the stores of rows[] and colsb[] as dead: the config loaded had every tile
// unconfigured, and the first tilezero raised #UD (SIGILL, the whole process) on a CPU
// with AMX. CI's CPU has no AMX (its AMX runs are emulated); an AMX dev box caught it.
FIDDLER_INLINE void load_tile_config(const TileConfig& cfg) {
#ifdef FIDDLER_AMX_EMULATE
  _tile_loadconfig(&cfg);
#else
  __asm__ __volatile__("ldtilecfg %0" : : "m"(cfg));
#endif
}

void region_begin(void) {
  TileConfig cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  load_tile_config(cfg);
}

void region_end(void) { _tile_release(); }

// Per-thread fp32 scratch for the C tiles: [MB][2][16][16].
thread_local float* tls_c = nullptr;
thread_local size_t tls_c_cap = 0;

float* c_scratch(size_t floats) {
  if (floats > tls_c_cap) {
    free(tls_c);
    size_t bytes = (floats * sizeof(float) + 63) & ~size_t(63);
    tls_c = (float*)aligned_alloc(64, bytes);
    tls_c_cap = tls_c ? floats : 0;
  }
  return tls_c;
}

// Two 16-row weight slices (A0, A1) of one row group.
struct Group {
  const uint16_t* a0;
  const uint16_t* a1;
};

// Per-thread buffer for one packed weight panel (all K of 32 rows): 2 KiB per k-step.
thread_local uint16_t* tls_pack = nullptr;
thread_local int64_t tls_pack_steps = 0;

uint16_t* pack_scratch(int64_t steps) {
  if (steps > tls_pack_steps) {
    free(tls_pack);
    tls_pack = (uint16_t*)aligned_alloc(64, (size_t)steps * 2048);
    tls_pack_steps = tls_pack ? steps : 0;
  }
  return tls_pack;
}

// Copies all K of the group's 2 x 16 weight rows into contiguous tiles:
//   P[(s * 2 + t) * 512 + r * 32 + k] = A_t[r][32 * s + k]   (zero past K: the K tail)
// Rows are read front to back, 8 at a time, with a software prefetch ahead:
// long sequential streams, as DRAM likes them (the AVX512-BF16 kernel's access
// pattern). Tile loads straight from the weights would touch 16 rows whose
// stride (H*2 or I*2 bytes, a multiple of 4 KiB in every real model) maps them
// to one L1 set, and would fetch only 64 bytes of each row at a time.
void pack_panel(const Group& g, int64_t lda, int64_t K, uint16_t* P) {
  const int64_t s_full = K / 32;
  const __mmask32 tail_msk = (__mmask32)((1ull << (K - s_full * 32)) - 1ull);
  for (int q = 0; q < 32; q += 8) {
    const uint16_t* src[8];
    uint16_t* dst[8];
    for (int j = 0; j < 8; ++j) {
      const int row = q + j, t = row >> 4, r = row & 15;
      src[j] = (t ? g.a1 : g.a0) + r * lda;
      dst[j] = P + t * 512 + r * 32;
    }
    int64_t s = 0;
    for (; s < s_full; ++s) {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        _mm_prefetch((const char*)(src[j] + s * 32 + kPrefetch), _MM_HINT_T0);
        _mm512_store_si512((void*)(dst[j] + s * 1024), _mm512_loadu_si512((const void*)(src[j] + s * 32)));
      }
    }
    if (s * 32 < K) {  // the K tail step, zero-padded
      for (int j = 0; j < 8; ++j)
        _mm512_store_si512((void*)(dst[j] + s * 1024),
                           _mm512_maskz_loadu_epi16(tail_msk, (const void*)(src[j] + s * 32)));
    }
  }
  compiler_fence();
}

// c[(mb * 2 + t) * 256 + n * 16 + i] = sum_k A_t[n][k] * X[16 mb + i][k], for all
// token blocks mb < MB, from the packed panel P (s_total k-steps) and the packed
// activations xpack. C stays in tile registers over all of K.
void amx_panel(const uint16_t* P, int64_t s_total, const uint16_t* xpack, int MB, float* c) {
  for (int mb = 0; mb < MB; mb += 2) {
    const uint16_t* b0 = xpack + (int64_t)mb * s_total * 512;
    const uint16_t* b1 = b0 + s_total * 512;
    float* c00 = c + (mb * 2 + 0) * 256;  // A0 x B0
    float* c10 = c + (mb * 2 + 1) * 256;  // A1 x B0
    float* c01 = c + (mb * 2 + 2) * 256;  // A0 x B1
    float* c11 = c + (mb * 2 + 3) * 256;  // A1 x B1
    if (mb + 1 < MB) {  // two token blocks: tiles 0..3
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t s = 0; s < s_total; ++s) {
        _tile_loadd(4, P + s * 1024, 64);
        _tile_loadd(5, P + s * 1024 + 512, 64);
        _tile_loadd(6, b0 + s * 512, 64);
        _tile_loadd(7, b1 + s * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c00, 64);
      _tile_stored(1, c01, 64);
      _tile_stored(2, c10, 64);
      _tile_stored(3, c11, 64);
    } else {  // a single token block left: tiles 0 and 2
      _tile_zero(0);
      _tile_zero(2);
      for (int64_t s = 0; s < s_total; ++s) {
        _tile_loadd(4, P + s * 1024, 64);
        _tile_loadd(5, P + s * 1024 + 512, 64);
        _tile_loadd(6, b0 + s * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
      }
      _tile_stored(0, c00, 64);
      _tile_stored(2, c10, 64);
    }
  }
  compiler_fence();
}

void pack_x(const MoeProblem* p, int32_t e, int32_t mb) {
  const ExpertWork& ew = p->experts[e];
  const int64_t H = p->H, I = p->I;
  const int64_t S = (H + 31) / 32;
  uint32_t* dst = (uint32_t*)(ew.xpack + (int64_t)mb * S * 512);  // pairs of bf16
  const int m = ew.m;
  for (int i = 0; i < 16; ++i) {
    const int t = mb * 16 + i;
    if (t >= m) {
      for (int64_t s = 0; s < S; ++s)
        for (int kk = 0; kk < 16; ++kk) dst[s * 256 + kk * 16 + i] = 0;
      continue;
    }
    const uint16_t* src = p->x + (int64_t)ew.tok[t] * p->ldx;
    const int64_t sf = H / 32;
    for (int64_t s = 0; s < sf; ++s) {
      uint32_t pairs[16];
      memcpy(pairs, src + s * 32, 64);
      uint32_t* d = dst + s * 256 + i;
      for (int kk = 0; kk < 16; ++kk) d[kk * 16] = pairs[kk];
    }
    if (sf < S) {  // K tail, zero-padded
      uint16_t tmp[32];
      memset(tmp, 0, sizeof(tmp));
      memcpy(tmp, src + sf * 32, (H - sf * 32) * sizeof(uint16_t));
      uint32_t pairs[16];
      memcpy(pairs, tmp, 64);
      uint32_t* d = dst + sf * 256 + i;
      for (int kk = 0; kk < 16; ++kk) d[kk * 16] = pairs[kk];
    }
  }
  // The activation's k-padding (I % 32 != 0) of this token block must be zero.
  if (I % 32) {
    const int64_t S2 = (I + 31) / 32;
    memset(ew.act + ((int64_t)mb * S2 + (S2 - 1)) * 512, 0, 512 * sizeof(uint16_t));
  }
}

void gate_up(const MoeProblem* p, int32_t e, int64_t n0, int64_t n1) {
  const ExpertWork& ew = p->experts[e];
  const int64_t H = p->H, I = p->I;
  const int MB = (ew.m + 15) / 16;
  const int64_t S = (H + 31) / 32, S2 = (I + 31) / 32;
  uint16_t* P = pack_scratch(S);
  float* c = c_scratch((size_t)MB * 512);
  // Groups of 16 act columns: gate rows gs..gs+15 (A0) and the up rows (A1);
  // the last one shifted back to end at I (N tail), writing only new columns.
  for (int64_t g = n0; g < n1; g += 16) {
    const int64_t gs = g + 16 <= I ? g : I - 16;
    const Group grp = {ew.w13 + gs * H, ew.w13 + (I + gs) * H};
    pack_panel(grp, H, H, P);
    amx_panel(P, S, ew.xpack, MB, c);
    const int64_t wend = g + 16 < n1 ? g + 16 : n1;
    for (int mb = 0; mb < MB; ++mb) {
      const float* G = c + (mb * 2 + 0) * 256;
      const float* U = c + (mb * 2 + 1) * 256;
      uint16_t* act_mb = ew.act + (int64_t)mb * S2 * 512;
      for (int64_t n = g; n < wend; ++n) {
        const int r = (int)(n - gs);
        __m512 a = fiddler_swiglu512(_mm512_load_ps(G + r * 16), _mm512_load_ps(U + r * 16));
        alignas(32) uint16_t ab[16];
        _mm256_store_si256((__m256i*)ab, fiddler_cvt_bf16(a));
        // packed (VNNI) layout for the down projection: k = n
        uint16_t* d = act_mb + ((n / 32) * 16 + (n % 32) / 2) * 32 + (n & 1);
        for (int i = 0; i < 16; ++i) d[2 * i] = ab[i];
      }
    }
  }
}

void down(const MoeProblem* p, int32_t e, int64_t h0, int64_t h1) {
  const ExpertWork& ew = p->experts[e];
  const int64_t H = p->H, I = p->I;
  const int m = ew.m;
  const int MB = (m + 15) / 16;
  const int64_t S2 = (I + 31) / 32;
  uint16_t* P = pack_scratch(S2);
  float* c = c_scratch((size_t)MB * 512);
  // Groups of 32 output rows (A0: 16 rows, A1: the next 16); the last one
  // shifted back to end at H, writing only rows not written yet.
  for (int64_t g = h0; g < h1; g += 32) {
    const int64_t gs = g + 32 <= H ? g : H - 32;
    const Group grp = {ew.w2 + gs * I, ew.w2 + (gs + 16) * I};
    pack_panel(grp, I, I, P);
    amx_panel(P, S2, ew.act, MB, c);
    const int64_t wend = g + 32 < h1 ? g + 32 : h1;
    const int r0 = (int)(g - gs), r1 = (int)(wend - gs);
    for (int mb = 0; mb < MB; ++mb) {
      const int nv = m - mb * 16 < 16 ? m - mb * 16 : 16;
      const float* cm = c + (int64_t)mb * 512;
      for (int i = 0; i < nv; ++i) {
        const int t = mb * 16 + i;
        float* o = p->out + (int64_t)ew.tok[t] * p->ldo + gs;
        const float wt = ew.wt[t];
        for (int r = r0; r < r1; ++r) o[r] += wt * cm[(r >> 4) * 256 + (r & 15) * 16 + i];
      }
    }
  }
}

const KernelTable kTable = {
    fiddler_cpu::kApiVersion, "amx", region_begin, region_end, pack_x, gate_up, down, /*down_rows=*/0,
};

}  // namespace

extern "C" __attribute__((visibility("default"))) const fiddler_cpu::KernelTable* fiddler_cpu_kernel_table(void) {
  return &kTable;
}
