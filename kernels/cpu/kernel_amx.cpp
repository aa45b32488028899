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
// all hit one L1 set) and multiplied with every token block.
//   v1 (FIDDLER_CPU_AMX_PIPE=0): per row group (32 rows), copy all of K into a
//     per-thread panel (K x 64 bytes, in L2), then multiply it, the C tiles
//     staying in registers over all of K.
//   v2 (default): k-chunked units, the copy of the next unit and an L2
//     prefetch of the one after it interleaved with the multiply of the
//     current one; see "Pipelined kernels" below.
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

// Software prefetch distance (bf16 elements) ahead of each weight row stream
// while packing a panel; 0 disables it. Tunable with FIDDLER_CPU_PREFETCH.
int64_t g_prefetch = 512;
// Experimental: prefetch the next row group's weight panel during the current
// multiply when the panel is at most this many KiB (FIDDLER_CPU_AMX_PF_NEXT_KB;
// a larger one would push the current panel out of L2). Off by default: not
// measured on AMX hardware yet.
int64_t g_pf_next_kb = 0;
// Pipelined kernels (see "Pipelined kernels" below); read once at load.
int g_pipe = 0;          // FIDDLER_CPU_AMX_PIPE: 1 pipelined kernels, 0 the v1 kernels (default)
int64_t g_kc = 32;       // FIDDLER_CPU_AMX_KC: k-steps (32 elements of K) per k-chunk
int g_direct = 0;        // FIDDLER_CPU_AMX_DIRECT: 1 = A tiles straight from the weight rows
int64_t g_groups = 4;    // FIDDLER_CPU_AMX_GROUPS: row groups sharing one pass over the activation
int64_t g_pf_ahead = 1;  // FIDDLER_CPU_AMX_PF_AHEAD: units prefetched (L2) ahead of the copy; 0 = none
int64_t g_ilv = 8;       // FIDDLER_CPU_AMX_ILV: weight rows streamed together (1, 2, 4, 8, 16 or 32)

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
  const int64_t pf = g_prefetch;
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
        if (pf) _mm_prefetch((const char*)(src[j] + s * 32 + pf), _MM_HINT_T0);
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
// Prefetcher (to L2) of the next group's weight panel, spread over the current
// panel's multiply so that DRAM keeps streaming while the tiles compute; rows in
// order, front to back (sequential streams).
struct NextPanel {
  const Group* g = nullptr;
  int64_t lda = 0, lines_per_row = 0, row = 0, line = 0;
  int per_iter = 0;
  inline __attribute__((always_inline)) void step() {
    for (int q = 0; q < per_iter && row < 32; ++q) {
      const uint16_t* base = (row < 16 ? g->a0 + row * lda : g->a1 + (row - 16) * lda);
      _mm_prefetch((const char*)(base + line * 32), _MM_HINT_T1);
      if (++line == lines_per_row) {
        line = 0;
        ++row;
      }
    }
  }
};

void amx_panel(const uint16_t* P, int64_t s_total, const uint16_t* xpack, int MB, float* c, const Group* next,
               int64_t lda) {
  NextPanel nx;
  const int passes = (MB + 1) / 2;
  if (next && s_total * 2 <= g_pf_next_kb) {  // panel KiB = s_total * 2
    nx.g = next;
    nx.lda = lda;
    nx.lines_per_row = s_total;
    nx.per_iter = (32 + passes - 1) / passes;
  }
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
        if (nx.g) nx.step();
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
        if (nx.g) nx.step();
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

void gate_up_v1(const MoeProblem* p, int32_t e, int64_t n0, int64_t n1) {
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
    const int64_t gn = g + 16 < n1 ? (g + 32 <= I ? g + 16 : I - 16) : -1;
    const Group nxt = {gn >= 0 ? ew.w13 + gn * H : nullptr, gn >= 0 ? ew.w13 + (I + gn) * H : nullptr};
    pack_panel(grp, H, H, P);
    amx_panel(P, S, ew.xpack, MB, c, gn >= 0 ? &nxt : nullptr, H);
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

void down_v1(const MoeProblem* p, int32_t e, int64_t h0, int64_t h1) {
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
    const int64_t gn = g + 32 < h1 ? (g + 64 <= H ? g + 32 : H - 32) : -1;
    const Group nxt = {gn >= 0 ? ew.w2 + gn * I : nullptr, gn >= 0 ? ew.w2 + (gn + 16) * I : nullptr};
    pack_panel(grp, I, I, P);
    amx_panel(P, S2, ew.act, MB, c, gn >= 0 ? &nxt : nullptr, I);
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

// ============================================================================
// Pipelined kernels (FIDDLER_CPU_AMX_PIPE=1, opt-in: no faster than v1 on the
// H100 host, see docs/cpu-kernel.md). The v1 kernels above (FIDDLER_CPU_AMX_PIPE=0,
// the default) copy a row group's whole panel, then multiply it:
// each thread alternates between a DRAM-bound copy and a compute/L2-bound
// multiply, so the weight stream stops during every multiply, and the down
// projection streams all of the packed activation (T x I x 2 bytes) again from
// L3 for every 32 output rows.
//
// Here an item (gate_up: act columns [n0, n1); down: output rows [h0, h1)) is
// cut into units of one row group (32 weight rows) x one k-chunk (g_kc k-steps),
// run in the order super-group (up to g_groups row groups) > k-chunk > group:
// one k-chunk of the packed activation (MB x g_kc KiB) is reused from L2 by
// every group of the super-group. A group's C tiles go to a per-thread fp32
// scratch between its chunks (exact: the same fp32 sums in the same order as
// one pass over K, so results are bit-identical to v1).
// While the tiles multiply unit u, the same k-step loop
//   - copies unit u+1's rows into the other half of a double-buffered panel
//     (the same contiguous tiles as pack_panel), a few 64-byte lines per k-step,
//     g_ilv rows at a time, each front to back;
//   - prefetches into L2, in the same order, the lines of the units after that
//     (g_pf_ahead units ahead),
// so each thread's share of the weight stream keeps flowing under its own
// multiply. FIDDLER_CPU_AMX_DIRECT=1 instead loads the A tiles straight from
// the weight rows (stride = row length; the rows are prefetched to L2
// g_pf_ahead >= 1 units ahead) and copies only the zero-padded K-tail step.

#define FIDDLER_AI inline __attribute__((always_inline))

struct PipeGeom {
  const uint16_t* w;   // the expert's w13 (gate/up) or w2 (down)
  int64_t lda;         // row length = K (elements)
  int64_t a1_rows;     // rows from A0's first row to A1's: I (gate -> up rows) or 16 (down)
  int64_t S, s_full;   // k-steps ceil(K / 32), full k-steps floor(K / 32)
  __mmask32 tail_msk;  // valid elements of the K-tail step
  int64_t N, n0, n1;   // the item is [n0, n1) of N (act columns or output rows)
  int64_t gw;          // group width in those units: 16 act columns or 32 rows
  int64_t NG, GS;      // groups in the item, groups per super-group
  int64_t KC, NC, U;   // k-steps per chunk, chunks per group, units
};

void finish_geom(PipeGeom& G, int64_t K) {
  G.S = (K + 31) / 32;
  G.s_full = K / 32;
  G.tail_msk = (__mmask32)((1ull << (K - G.s_full * 32)) - 1ull);
  G.NG = (G.n1 - G.n0 + G.gw - 1) / G.gw;
  G.GS = G.NG < g_groups ? G.NG : g_groups;
  G.KC = G.S < g_kc ? G.S : g_kc;
  G.NC = (G.S + G.KC - 1) / G.KC;
  G.U = G.NG * G.NC;
}

// First output row / act column of group g (the last one shifted back to end at N).
FIDDLER_AI int64_t group_start(const PipeGeom& G, int64_t g) {
  const int64_t s = G.n0 + g * G.gw;
  return s + G.gw <= G.N ? s : G.N - G.gw;
}

struct UnitPos {
  const uint16_t* a0;  // A0's first weight row (16 rows, stride lda), at k = 0
  const uint16_t* a1;  // A1's
  int64_t s0, s1;      // k-steps [s0, s1)
  int64_t g, gl;       // group in the item, its slot in the super-group
  bool first, last;    // first / last k-chunk of the group
};

UnitPos unit_pos(const PipeGeom& G, int64_t u) {
  const int64_t per_sg = G.GS * G.NC;
  const int64_t sg = u / per_sg, rem = u - sg * per_sg;
  const int64_t g0 = sg * G.GS;
  const int64_t gsz = G.NG - g0 < G.GS ? G.NG - g0 : G.GS;  // only the last super-group is smaller
  const int64_t c = rem / gsz;
  UnitPos p;
  p.gl = rem - c * gsz;
  p.g = g0 + p.gl;
  p.s0 = c * G.KC;
  p.s1 = p.s0 + G.KC < G.S ? p.s0 + G.KC : G.S;
  p.first = c == 0;
  p.last = c == G.NC - 1;
  p.a0 = G.w + group_start(G, p.g) * G.lda;
  p.a1 = p.a0 + G.a1_rows * G.lda;
  return p;
}

// Walks the lines of one unit's 32 rows x k-steps [s0, s1) in DRAM-friendly
// order: blocks of g_ilv rows (8 by default), each block front to back over the
// steps, the block's rows interleaved (as pack_panel: g_ilv concurrent
// sequential streams).
struct LineWalk {
  const uint16_t* a0 = nullptr;
  const uint16_t* a1 = nullptr;
  int64_t lda = 0, s0 = 0, s1 = 0;
  int R = 8, blk = 0;      // rows per block, current block
  int64_t s = 0, left = 0;  // next step of the block, lines left
  void init(const PipeGeom& G, const UnitPos& u) {
    a0 = u.a0;
    a1 = u.a1;
    lda = G.lda;
    s0 = u.s0;
    s1 = u.s1;
    R = (int)g_ilv;
    blk = 0;
    s = s0;
    left = 32 * (s1 - s0);
  }
  FIDDLER_AI const uint16_t* rowp(int r) const { return r < 16 ? a0 + r * lda : a1 + (r - 16) * lda; }
  // Steps of the current block to walk for about n more lines: [s, s + return).
  FIDDLER_AI int64_t run_for(int64_t n) const {
    const int64_t want = (n + R - 1) / R, have = s1 - s;
    return want < have ? want : have;
  }
  FIDDLER_AI void advance(int64_t run) {
    left -= run * R;
    s += run;
    if (s == s1) {
      s = s0;
      ++blk;
    }
  }
};

// Copies one unit into contiguous tiles (pack_panel's layout, one unit's steps):
//   P[((s - s0) * 2 + t) * 512 + r * 32 + k] = A_t[r][32 s + k]   (zero past K)
struct CopyStream {
  LineWalk w;
  int64_t s_full = 0;
  __mmask32 tail = 0;
  uint16_t* P = nullptr;
  int64_t left = 0;
  void init(const PipeGeom& G, const UnitPos& u, uint16_t* buf) {
    w.init(G, u);
    s_full = G.s_full;
    tail = G.tail_msk;
    P = buf;
    left = w.left;
  }
  void off() { left = 0; }
  // Copies about n lines (whole steps of a row block); with pf > 0 also
  // prefetches (L1) pf elements ahead in each row.
  FIDDLER_AI void copy(int64_t n, int64_t pf = 0) {
    while (n > 0 && left > 0) {
      const int64_t run = w.run_for(n);
      const int R = w.R, r0 = w.blk * R;
      const int64_t e = w.s + run, ef = e < s_full ? e : s_full;
      for (int j = 0; j < R; ++j) {
        const int r = r0 + j;
        const uint16_t* sp = w.rowp(r) + w.s * 32;
        uint16_t* d = P + (r >> 4) * 512 + (r & 15) * 32 + (w.s - w.s0) * 1024;
        for (int64_t k = w.s; k < ef; ++k, sp += 32, d += 1024) {
          if (pf) _mm_prefetch((const char*)(sp + pf), _MM_HINT_T0);
          _mm512_store_si512((void*)d, _mm512_loadu_si512((const void*)sp));
        }
        if (e > s_full)  // the K-tail step (always a row's last), zero-padded
          _mm512_store_si512((void*)d, _mm512_maskz_loadu_epi16(tail, (const void*)sp));
      }
      n -= run * R;
      w.advance(run);
      left = w.left;
    }
  }
};

// Prefetches (to L2) the lines of units u, u+1, ... in the same order.
struct PrefStream {
  const PipeGeom* G = nullptr;
  int64_t u = 0;  // the unit being prefetched (G->U: done)
  LineWalk w;
  void start(const PipeGeom& geom, int64_t u0) {
    G = &geom;
    u = u0;
    load();
  }
  void load() {
    if (u < G->U) w.init(*G, unit_pos(*G, u));
  }
  // Lines left up to the end of unit `target`.
  int64_t lines_until(int64_t target) const {
    if (u > target || u >= G->U) return 0;
    int64_t n = w.left;
    for (int64_t v = u + 1; v <= target; ++v) {
      const UnitPos p = unit_pos(*G, v);
      n += 32 * (p.s1 - p.s0);
    }
    return n;
  }
  // Prefetches about n lines, not past the end of unit `target`.
  FIDDLER_AI void fetch(int64_t n, int64_t target) {
    while (n > 0 && u <= target) {
      const int64_t run = w.run_for(n);
      const int R = w.R, r0 = w.blk * R;
      for (int j = 0; j < R; ++j) {
        const char* sp = (const char*)(w.rowp(r0 + j) + w.s * 32);
        for (int64_t k = 0; k < run; ++k) _mm_prefetch(sp + 64 * k, _MM_HINT_T1);
      }
      n -= run * R;
      w.advance(run);
      if (w.left == 0) {
        ++u;
        load();
      }
    }
  }
};

// The copy / prefetch work spread over the k-steps of a multiply.
struct Ticker {
  CopyStream* L;
  PrefStream* P;
  int64_t nL, nP;  // lines per k-step
  int64_t target;  // the prefetch stream stops after this unit
  FIDDLER_AI void tick() {
    if (nL) L->copy(nL);
    if (nP) P->fetch(nP, target);
  }
};

// n k-steps of two token blocks: C tiles 0..3 += (A0, A1) x (B0, B1). A tile i is
// at a0/a1 + i * inc with row stride sa bytes; B tile i at b0/b1 + i * 512.
FIDDLER_AI void kloop2(const uint16_t* a0, const uint16_t* a1, int64_t inc, int64_t sa, const uint16_t* b0,
                       const uint16_t* b1, int64_t n, Ticker& tk) {
  for (int64_t i = 0; i < n; ++i) {
    _tile_loadd(4, a0 + i * inc, sa);
    _tile_loadd(5, a1 + i * inc, sa);
    _tile_loadd(6, b0 + i * 512, 64);
    _tile_loadd(7, b1 + i * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    tk.tick();
  }
}

// The same for a single token block: C tiles 0 (A0 x B0) and 2 (A1 x B0).
FIDDLER_AI void kloop1(const uint16_t* a0, const uint16_t* a1, int64_t inc, int64_t sa, const uint16_t* b0,
                       int64_t n, Ticker& tk) {
  for (int64_t i = 0; i < n; ++i) {
    _tile_loadd(4, a0 + i * inc, sa);
    _tile_loadd(5, a1 + i * inc, sa);
    _tile_loadd(6, b0 + i * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    tk.tick();
  }
}

// Per-thread panel halves (2 x KC k-steps of 2 KiB) + the K-tail step (2 KiB).
thread_local uint16_t* tls_pipe = nullptr;
thread_local int64_t tls_pipe_kc = 0;

uint16_t* pipe_scratch(int64_t kc) {
  if (kc > tls_pipe_kc) {
    free(tls_pipe);
    tls_pipe = (uint16_t*)aligned_alloc(64, (size_t)(2 * kc + 1) * 2048);
    tls_pipe_kc = tls_pipe ? kc : 0;
  }
  return tls_pipe;
}

// Runs the units of one item: C = A x B over all K for every group, calling
// epi(g, c) with the group's fp32 C blocks (layout as in amx_panel) after its
// last k-chunk.
template <class Epi>
void run_pipe(const PipeGeom& G, const uint16_t* bpack, int MB, const Epi& epi) {
  const int64_t passes = (MB + 1) / 2;
  const bool direct = g_direct != 0;
  const int64_t pfa = direct ? (g_pf_ahead > 1 ? g_pf_ahead : 1) : g_pf_ahead;
  uint16_t* buf = pipe_scratch(G.KC);
  float* cbase = c_scratch((size_t)(G.GS * MB * 512));
  if (!buf || !cbase) abort();  // out of memory: nothing sane to do in a worker
  uint16_t* half[2] = {buf, buf + G.KC * 1024};
  uint16_t* tailbuf = buf + 2 * G.KC * 1024;

  CopyStream L;
  PrefStream P;
  UnitPos cur = unit_pos(G, 0);
  if (direct) {  // pipeline fill: unit 0 to L2 now
    P.start(G, 0);
    P.fetch(P.lines_until(0), 0);
  } else {  // pipeline fill: copy unit 0 now (demand loads, a prefetch ahead in each row)
    L.init(G, cur, half[0]);
    L.copy(L.left, g_prefetch);
    P.start(G, 2);  // unit 1 is copied during unit 0
  }
  compiler_fence();

  for (int64_t u = 0; u < G.U; ++u) {
    const bool has_next = u + 1 < G.U;
    UnitPos nxt = cur;
    if (has_next) nxt = unit_pos(G, u + 1);
    const int64_t steps = cur.s1 - cur.s0, iters = steps * passes;
    if (!direct && has_next)
      L.init(G, nxt, half[(u + 1) & 1]);
    else
      L.off();
    int64_t target = u + (direct ? pfa : 1 + pfa);
    if (target > G.U - 1) target = G.U - 1;
    Ticker tk;
    tk.L = &L;
    tk.P = &P;
    tk.target = target;
    tk.nL = (L.left + iters - 1) / iters;
    tk.nP = pfa > 0 ? (P.lines_until(target) + iters - 1) / iters : 0;

    const uint16_t* A0;
    const uint16_t* A1;
    int64_t inc, sa, nd = steps;  // nd: steps read through (A0, A1, inc, sa)
    if (direct) {
      A0 = cur.a0 + cur.s0 * 32;
      A1 = cur.a1 + cur.s0 * 32;
      inc = 32;
      sa = G.lda * 2;
      if (cur.s1 > G.s_full) {  // the K-tail step, zero-padded, from tailbuf
        nd = G.s_full - cur.s0;
        for (int r = 0; r < 32; ++r) {
          const uint16_t* src = (r < 16 ? cur.a0 + r * G.lda : cur.a1 + (r - 16) * G.lda) + G.s_full * 32;
          _mm512_store_si512((void*)(tailbuf + (r >> 4) * 512 + (r & 15) * 32),
                             _mm512_maskz_loadu_epi16(G.tail_msk, (const void*)src));
        }
        compiler_fence();
      }
    } else {
      A0 = half[u & 1];
      A1 = A0 + 512;
      inc = 1024;
      sa = 64;
    }
    float* cg = cbase + (size_t)(cur.gl * MB * 512);
    for (int mb = 0; mb < MB; mb += 2) {
      const uint16_t* b0 = bpack + ((int64_t)mb * G.S + cur.s0) * 512;
      float* c00 = cg + (mb * 2 + 0) * 256;  // A0 x B0
      float* c10 = cg + (mb * 2 + 1) * 256;  // A1 x B0
      float* c01 = cg + (mb * 2 + 2) * 256;  // A0 x B1
      float* c11 = cg + (mb * 2 + 3) * 256;  // A1 x B1
      if (mb + 1 < MB) {
        const uint16_t* b1 = b0 + G.S * 512;
        if (cur.first) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, c00, 64);
          _tile_loadd(1, c01, 64);
          _tile_loadd(2, c10, 64);
          _tile_loadd(3, c11, 64);
        }
        kloop2(A0, A1, inc, sa, b0, b1, nd, tk);
        if (nd < steps) kloop2(tailbuf, tailbuf + 512, 0, 64, b0 + nd * 512, b1 + nd * 512, 1, tk);
        _tile_stored(0, c00, 64);
        _tile_stored(1, c01, 64);
        _tile_stored(2, c10, 64);
        _tile_stored(3, c11, 64);
      } else {
        if (cur.first) {
          _tile_zero(0);
          _tile_zero(2);
        } else {
          _tile_loadd(0, c00, 64);
          _tile_loadd(2, c10, 64);
        }
        kloop1(A0, A1, inc, sa, b0, nd, tk);
        if (nd < steps) kloop1(tailbuf, tailbuf + 512, 0, 64, b0 + nd * 512, 1, tk);
        _tile_stored(0, c00, 64);
        _tile_stored(2, c10, 64);
      }
    }
    L.copy(L.left);  // leftovers (none: nL * iters >= lines)
    compiler_fence();
    if (cur.last) epi(cur.g, cg);
    cur = nxt;
  }
}

struct GateUpEpi {
  const PipeGeom* G;
  uint16_t* act;
  int64_t S2;
  int MB;
  void operator()(int64_t g, const float* c) const {
    const int64_t gfirst = G->n0 + g * 16, gs = group_start(*G, g);
    const int64_t wend = gfirst + 16 < G->n1 ? gfirst + 16 : G->n1;
    for (int mb = 0; mb < MB; ++mb) {
      const float* Gt = c + (mb * 2 + 0) * 256;
      const float* Ut = c + (mb * 2 + 1) * 256;
      uint16_t* act_mb = act + (int64_t)mb * S2 * 512;
      for (int64_t n = gfirst; n < wend; ++n) {
        const int r = (int)(n - gs);
        __m512 a = fiddler_swiglu512(_mm512_load_ps(Gt + r * 16), _mm512_load_ps(Ut + r * 16));
        alignas(32) uint16_t ab[16];
        _mm256_store_si256((__m256i*)ab, fiddler_cvt_bf16(a));
        uint16_t* d = act_mb + ((n / 32) * 16 + (n % 32) / 2) * 32 + (n & 1);  // VNNI, k = n
        for (int i = 0; i < 16; ++i) d[2 * i] = ab[i];
      }
    }
  }
};

struct DownEpi {
  const PipeGeom* G;
  const MoeProblem* p;
  const ExpertWork* ew;
  int MB;
  void operator()(int64_t g, const float* c) const {
    const int64_t gfirst = G->n0 + g * 32, gs = group_start(*G, g);
    const int64_t wend = gfirst + 32 < G->n1 ? gfirst + 32 : G->n1;
    const int r0 = (int)(gfirst - gs), r1 = (int)(wend - gs);
    const int m = ew->m;
    // out[tok, gs + r] += wt * C[r][i], 16 rows (one C tile's column) at a time:
    // a gather of the column, one fused multiply-add (v1's scalar loop compiles
    // to the same fma), masked to the rows [r0, r1) this group writes.
    const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
    for (int t = 0; t < 2; ++t) {
      const int lo = r0 > 16 * t ? r0 - 16 * t : 0, hi = r1 < 16 * t + 16 ? r1 - 16 * t : 16;
      if (lo >= hi) continue;
      const __mmask16 msk = (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
      for (int mb = 0; mb < MB; ++mb) {
        const int nv = m - mb * 16 < 16 ? m - mb * 16 : 16;
        const float* ct = c + (int64_t)mb * 512 + t * 256;
        for (int i = 0; i < nv; ++i) {
          const int tk = mb * 16 + i;
          float* o = p->out + (int64_t)ew->tok[tk] * p->ldo + gs + 16 * t;
          const __m512 v = _mm512_i32gather_ps(col, ct + i, 4);
          const __m512 ov = _mm512_maskz_loadu_ps(msk, o);
          _mm512_mask_storeu_ps(o, msk, _mm512_fmadd_ps(_mm512_set1_ps(ew->wt[tk]), v, ov));
        }
      }
    }
  }
};

void gate_up_v2(const MoeProblem* p, int32_t e, int64_t n0, int64_t n1) {
  const ExpertWork& ew = p->experts[e];
  const int64_t H = p->H, I = p->I;
  PipeGeom G;
  G.w = ew.w13;
  G.lda = H;
  G.a1_rows = I;  // up row of gate row n: I + n
  G.N = I;
  G.n0 = n0;
  G.n1 = n1;
  G.gw = 16;
  finish_geom(G, H);
  const int MB = (ew.m + 15) / 16;
  run_pipe(G, ew.xpack, MB, GateUpEpi{&G, ew.act, (I + 31) / 32, MB});
}

void down_v2(const MoeProblem* p, int32_t e, int64_t h0, int64_t h1) {
  const ExpertWork& ew = p->experts[e];
  const int64_t H = p->H, I = p->I;
  PipeGeom G;
  G.w = ew.w2;
  G.lda = I;
  G.a1_rows = 16;  // 32 consecutive output rows: A0 the first 16, A1 the next 16
  G.N = H;
  G.n0 = h0;
  G.n1 = h1;
  G.gw = 32;
  finish_geom(G, I);
  const int MB = (ew.m + 15) / 16;
  run_pipe(G, ew.act, MB, DownEpi{&G, p, &ew, MB});
}

void gate_up(const MoeProblem* p, int32_t e, int64_t n0, int64_t n1) {
  if (g_pipe)
    gate_up_v2(p, e, n0, n1);
  else
    gate_up_v1(p, e, n0, n1);
}

void down(const MoeProblem* p, int32_t e, int64_t h0, int64_t h1) {
  if (g_pipe)
    down_v2(p, e, h0, h1);
  else
    down_v1(p, e, h0, h1);
}

KernelTable kTable = {
    fiddler_cpu::kApiVersion, "amx", region_begin, region_end, pack_x, gate_up, down, /*down_rows=*/0,
};

long env_long(const char* name, long dflt, long lo, long hi) {
  const char* v = getenv(name);
  if (!v || !*v) return dflt;
  const long x = atol(v);
  return x < lo ? lo : x > hi ? hi : x;
}

}  // namespace

// Reads the tuning knobs (every time it is called: register_isa_library calls it
// once per registration; unset knobs go back to their defaults).
extern "C" __attribute__((visibility("default"))) const fiddler_cpu::KernelTable* fiddler_cpu_kernel_table(void) {
  const long pf = env_long("FIDDLER_CPU_PREFETCH", 512, 0, 1 << 20);
  g_prefetch = pf > 0 ? (pf + 31) / 32 * 32 : 0;
  g_pf_next_kb = env_long("FIDDLER_CPU_AMX_PF_NEXT_KB", 0, 0, 1 << 20);
  g_pipe = (int)env_long("FIDDLER_CPU_AMX_PIPE", 0, 0, 1);
  g_kc = env_long("FIDDLER_CPU_AMX_KC", 32, 1, 1 << 16);
  g_direct = (int)env_long("FIDDLER_CPU_AMX_DIRECT", 0, 0, 1);
  g_groups = env_long("FIDDLER_CPU_AMX_GROUPS", 4, 1, 32);
  g_pf_ahead = env_long("FIDDLER_CPU_AMX_PF_AHEAD", 1, 0, 8);
  g_ilv = env_long("FIDDLER_CPU_AMX_ILV", 8, 1, 32);
  while (32 % g_ilv) --g_ilv;  // a divisor of 32
  kTable.down_rows = g_pipe ? (int32_t)(32 * g_groups) : 0;
  return &kTable;
}
