// Dispatcher for the CPU expert kernels: torch ops (namespace fiddler_cpu),
// CPUID / AMX permission, the persistent worker thread pool, token grouping
// and work splitting. Built WITHOUT any ISA flags (it must run on any x86-64
// CPU); the ISA-specific kernels live in separately built shared libraries
// that are dlopen()ed through register_isa_library once CPUID allows it.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cpuid.h>
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernel_api.h"

// Error checks that build their message without iostreams. TORCH_CHECK with
// several arguments formats them through std::ostringstream instantiated in
// this library, and that crashed (SIGSEGV in libstdc++'s locale code, seen on
// the H100 host's toolchain) the moment a check failed; one std::string goes
// straight to c10::Error.
#define FCHECK(cond, msg)                                                                              \
  do {                                                                                                 \
    if (!(cond)) ::c10::detail::torchCheckFail(__func__, __FILE__, static_cast<uint32_t>(__LINE__), \
                                               std::string(msg));                                     \
  } while (0)
#define FSTR(v) std::to_string(v)

namespace fiddler_cpu {
namespace {

// ---------------------------------------------------------------- CPU features
enum : int64_t {
  kFeatAvx512Bf16 = 1,  // AVX512F/BW/VL + AVX512_BF16, zmm state enabled by the OS
  kFeatAmx = 2,         // AMX-TILE + AMX-BF16 and XTILEDATA permission granted
  kFeatAmxCpuid = 4,    // AMX in CPUID (whether or not usable)
  kFeatAmxNoPerm = 8,   // AMX in CPUID but arch_prctl(ARCH_REQ_XCOMP_PERM) failed
  kFeatAvx512 = 16,     // AVX512F/BW/VL and F16C, zmm state enabled by the OS (the quantized-expert kernels)
};

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ __volatile__("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

int64_t detect_features() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  if (!(c & (1u << 27))) return 0;  // OSXSAVE
  const bool f16c = c & (1u << 29);
  const uint64_t xcr0 = xgetbv0();
  if (__get_cpuid_max(0, nullptr) < 7) return 0;
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned max_sub = a;
  const bool f = b & (1u << 16), bw = b & (1u << 30), vl = b & (1u << 31);
  const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
  bool bf16 = false;
  if (max_sub >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    bf16 = a & (1u << 5);
  }
  const bool zmm_os = (xcr0 & 0xE6) == 0xE6;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
  int64_t feats = 0;
  if (zmm_os && f && bw && vl && f16c) feats |= kFeatAvx512;
  if (zmm_os && f && bw && vl && bf16) feats |= kFeatAvx512Bf16;
  if (amx_tile && amx_bf16) {
    feats |= kFeatAmxCpuid;
    bool ok = (xcr0 & (3ull << 17)) == (3ull << 17);  // XTILECFG, XTILEDATA enabled by the OS
#ifdef SYS_arch_prctl
    if (ok) {
      // Linux >= 5.16: AMX state must be requested per process before use.
      constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
      syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata);
      unsigned long perm = 0;
      ok = syscall(SYS_arch_prctl, kArchGetXcompPerm, &perm) == 0 && (perm & (1ul << kXfeatureXtiledata));
    }
#else
    ok = false;
#endif
    if (ok && (feats & kFeatAvx512Bf16)) feats |= kFeatAmx;
    if (!ok) feats |= kFeatAmxNoPerm;
  }
  return feats;
}

int64_t features() {
  static const int64_t f = detect_features();
  return f;
}

// ---------------------------------------------------------------- thread pool
// Named so that `top -H` and /proc/<pid>/task/*/comm tell the expert threads
// apart; vllm_fiddler.runtime.cpu_experts.thread_counters reads their CPU time
// and preemptions by these names.
void name_this_thread(const char* name) { pthread_setname_np(pthread_self(), name); }

// Persistent workers; the calling thread takes part as worker 0. A job is a
// number of items handed out through an atomic counter. After a job, workers
// spin for a while (FIDDLER_CPU_SPIN_US, default 1000 us) waiting for the next
// one (the down phase follows the gate/up phase right away, and a layer's call
// follows the previous layer's), then sleep: waking sleeping threads costs tens
// of microseconds each in a VM, more than a small expert's whole computation.
class ThreadPool {
 public:
  using Body = void (*)(void* ctx, int64_t item);
  using Fini = void (*)(void* ctx);

  explicit ThreadPool(int n_threads) : pid_(getpid()) {
    const char* s = std::getenv("FIDDLER_CPU_SPIN_US");
    spin_us_ = s ? std::max(0, std::atoi(s)) : 1000;
    n_threads = std::max(1, n_threads);
    // Workers must start from the generation at construction: one that starts
    // late must still take part in the first job.
    const uint64_t g0 = gen_.load();
    for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this, g0] { worker_loop(g0); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return int(workers_.size()) + 1; }
  pid_t pid() const { return pid_; }

  void run(int64_t n_items, Body body, Fini fini, void* ctx) {
    if (n_items <= 0) return;
    if (workers_.empty() || n_items == 1) {
      for (int64_t i = 0; i < n_items; ++i) body(ctx, i);
      if (fini) fini(ctx);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      body_ = body;
      fini_ = fini;
      ctx_ = ctx;
      n_items_ = n_items;
      next_.store(0, std::memory_order_relaxed);
      pending_.store(int(workers_.size()), std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work();
    // Wait for the workers (spin first, they usually finish together with us).
    const auto t0 = std::chrono::steady_clock::now();
    while (pending_.load(std::memory_order_acquire) != 0) {
      __builtin_ia32_pause();
      if (std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(spin_us_)) {
        std::unique_lock<std::mutex> lk(mu_);
        done_cv_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
        break;
      }
    }
  }

 private:
  void work() {
    int64_t i;
    while ((i = next_.fetch_add(1, std::memory_order_relaxed)) < n_items_) body_(ctx_, i);
    if (fini_) fini_(ctx_);
  }

  void worker_loop(uint64_t seen) {
    name_this_thread("fiddler-cpu");
    for (;;) {
      const auto t0 = std::chrono::steady_clock::now();
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        __builtin_ia32_pause();
        if ((++spins & 63) == 0 &&
            std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(spin_us_)) {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
          break;
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_) return;
      work();
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(mu_);
        done_cv_.notify_one();
      }
    }
  }

  const pid_t pid_;
  int spin_us_ = 1000;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> pending_{0};
  int64_t n_items_ = 0;
  Body body_ = nullptr;
  Fini fini_ = nullptr;
  void* ctx_ = nullptr;
  bool stop_ = false;
};

std::mutex g_mu;  // serializes moe_forward calls and pool changes
ThreadPool* g_pool = nullptr;
int g_threads = 0;  // 0: not set yet -> hardware concurrency

int default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

ThreadPool* pool_locked() {
  if (g_pool && g_pool->pid() != getpid()) g_pool = nullptr;  // forked child: the parent's threads are gone; leak
  const int want = g_threads > 0 ? g_threads : default_threads();
  if (g_pool && g_pool->size() != want) {
    delete g_pool;
    g_pool = nullptr;
  }
  if (!g_pool) g_pool = new ThreadPool(want);
  return g_pool;
}

void set_num_threads(int64_t n) {
  FCHECK(n >= 1, "fiddler_cpu.set_num_threads: n must be >= 1, got " + FSTR(n));
  std::lock_guard<std::mutex> lk(g_mu);
  g_threads = int(n);
  pool_locked();
}

int64_t get_num_threads() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_threads > 0 ? g_threads : default_threads();
}

// ---------------------------------------------------------------- ISA libraries
const KernelTable* g_tables[3] = {nullptr, nullptr, nullptr};  // 0: avx512_bf16, 1: amx, 2: avx512_quant

bool register_isa_library(std::string isa, std::string path) {
  int slot;
  if (isa == "avx512_bf16") {
    slot = 0;
    if (!(features() & kFeatAvx512Bf16)) return false;
  } else if (isa == "amx") {
    slot = 1;
    if (!(features() & kFeatAmx) || !g_tables[0]) return false;
  } else if (isa == "avx512_quant") {
    slot = 2;
    if (!(features() & kFeatAvx512)) return false;
  } else if (isa == "amx_emulated") {  // test hook: kernel_amx.cpp built with -DFIDDLER_AMX_EMULATE
    slot = 1;
    if (!(features() & kFeatAvx512Bf16) || !g_tables[0]) return false;
  } else {
    FCHECK(false, "fiddler_cpu: unknown ISA '" + isa + "'");
  }
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  FCHECK(h, "fiddler_cpu: dlopen(" + path + ") failed: " + std::string(dlerror()));
  using Fn = const KernelTable* (*)();
  auto fn = reinterpret_cast<Fn>(dlsym(h, "fiddler_cpu_kernel_table"));
  FCHECK(fn, "fiddler_cpu: " + path + " has no fiddler_cpu_kernel_table");
  const KernelTable* t = fn();
  FCHECK(t && t->api_version == kApiVersion && t->gate_up && t->down,
         "fiddler_cpu: " + path + " has an incompatible kernel table");
  FCHECK(slot != 1 || (t->pack_x && t->region_begin && t->region_end), "fiddler_cpu: bad AMX table");
  std::lock_guard<std::mutex> lk(g_mu);
  g_tables[slot] = t;
  return true;
}

// ---------------------------------------------------------------- moe_forward
struct Item1 {  // gate/up work item
  int32_t e;
  int64_t n0, n1;
};

struct Ctx {
  MoeProblem prob{};
  const std::vector<ExpertWork>* experts;
  const std::vector<int32_t>* amx_experts = nullptr;
  const std::vector<int32_t>* active;  // experts with tokens, in order
  const std::vector<Item1>* items1;
  int64_t rows2;  // down phase: output rows per item
  // Per expert: its gate/up items not finished yet (a down item waits for 0).
  int32_t* gate_up_left = nullptr;
};

thread_local bool tls_amx_on = false;

inline const KernelTable* table_for(const ExpertWork& ew) {
  return ew.q13 ? g_tables[2] : ew.amx ? g_tables[1] : g_tables[0];
}

inline void amx_on() {
  if (!tls_amx_on) {
    g_tables[1]->region_begin();
    tls_amx_on = true;
  }
}

void fini_amx(void*) {
  if (tls_amx_on) {
    g_tables[1]->region_end();
    tls_amx_on = false;
  }
}

void body_pack(void* vctx, int64_t item) {
  auto* ctx = static_cast<Ctx*>(vctx);
  // item -> (amx expert, token block)
  int64_t i = item;
  for (int32_t e : *ctx->amx_experts) {
    const int64_t mbs = ((*ctx->experts)[e].m + 15) / 16;
    if (i < mbs) {
      g_tables[1]->pack_x(&ctx->prob, e, int32_t(i));
      return;
    }
    i -= mbs;
  }
}

void body_gate_up(void* vctx, int64_t item) {
  auto* ctx = static_cast<Ctx*>(vctx);
  const Item1& it = (*ctx->items1)[item];
  const ExpertWork& ew = (*ctx->experts)[it.e];
  if (ew.amx) amx_on();
  table_for(ew)->gate_up(&ctx->prob, it.e, it.n0, it.n1);
  // release: this item's act stores before a down item sees the count drop
  __atomic_fetch_sub(&ctx->gate_up_left[it.e], 1, __ATOMIC_RELEASE);
}

void body_down(void* vctx, int64_t item) {
  auto* ctx = static_cast<Ctx*>(vctx);
  const int64_t h0 = item * ctx->rows2;
  const int64_t h1 = std::min(h0 + ctx->rows2, ctx->prob.H);
  for (int32_t e : *ctx->active) {
    // Every gate/up item was handed out before any down item, and none of them
    // waits, so this spin ends; it is short because the experts' gate/up items
    // come in the order this loop visits them.
    while (__atomic_load_n(&ctx->gate_up_left[e], __ATOMIC_ACQUIRE) != 0) __builtin_ia32_pause();
    const ExpertWork& ew = (*ctx->experts)[e];
    if (ew.amx) amx_on();
    table_for(ew)->down(&ctx->prob, e, h0, h1);
  }
}

// Both projections in one pool run: the gate/up items, then the down items.
void body_gate_up_then_down(void* vctx, int64_t item) {
  auto* ctx = static_cast<Ctx*>(vctx);
  const int64_t n1 = int64_t(ctx->items1->size());
  if (item < n1)
    body_gate_up(vctx, item);
  else
    body_down(vctx, item - n1);
}

// Grow-only 64-byte aligned scratch.
struct Scratch {
  void* p = nullptr;
  size_t cap = 0;
  void* get(size_t bytes) {
    if (bytes > cap) {
      std::free(p);
      cap = (bytes + 4095) & ~size_t(4095);
      p = std::aligned_alloc(64, cap);
      FCHECK(p, "fiddler_cpu: out of memory (" + FSTR(cap) + " bytes)");
    }
    return p;
  }
};

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Output rows per down item: the default split (multiples of 32 rows, about 8
// items per thread) or, when the AMX kernel asks for larger items (`want`: it
// reuses each chunk of the packed activation for all the rows of an item), the
// largest multiple of 32 up to `want` whose items spread over the threads
// nearly as evenly as the best choice (15 threads, H = 4096: 96, not 128 rows).
int64_t down_item_rows(int64_t H, int nthreads, int64_t want) {
  const int64_t base = std::clamp<int64_t>(round_up(H / (int64_t(nthreads) * 8), 32), 32, 1024);
  want = std::min<int64_t>(want / 32 * 32, 1024);
  if (want <= base) return base;
  auto balance = [&](int64_t r) {  // ideal rows per thread / rows of the busiest thread
    const int64_t items = (H + r - 1) / r, rounds = (items + nthreads - 1) / nthreads;
    return double(H) / double(nthreads) / double(rounds * r);
  };
  double best = 0;
  for (int64_t r = base; r <= want; r += 32) best = std::max(best, balance(r));
  for (int64_t r = want; r > base; r -= 32)
    if (balance(r) >= best - 0.03) return r;
  return base;
}

// (token, weight) pairs grouped by expert, in token order: expert e's tokens are
// g_toks[g_offs[e] : g_offs[e + 1]] (g_counts[e] of them). Callers hold g_mu.
std::vector<int32_t> g_counts, g_offs, g_toks;
std::vector<float> g_wlist;

int64_t group_pairs(const int32_t* idp, const float* wtp, int64_t T, int64_t K, int64_t E) {
  g_counts.assign(E, 0);
  for (int64_t i = 0; i < T * K; ++i) {
    const int32_t e = idp[i];
    FCHECK(e >= -1 && e < E,
           "fiddler_cpu.moe_forward: topk_ids value " + FSTR(e) + " out of range [-1, " + FSTR(E) + ")");
    if (e >= 0) ++g_counts[e];
  }
  g_offs.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) g_offs[e + 1] = g_offs[e] + g_counts[e];
  const int64_t total = g_offs[E];
  g_toks.resize(total);
  g_wlist.resize(total);
  static std::vector<int32_t> fill;
  fill.assign(g_offs.begin(), g_offs.end() - 1);
  for (int64_t i = 0; i < T * K; ++i) {
    const int32_t e = idp[i];
    if (e < 0) continue;
    g_toks[fill[e]] = int32_t(i / K);
    g_wlist[fill[e]] = wtp[i];
    ++fill[e];
  }
  return total;
}

// Gate/up items: row ranges of each expert, multiples of 16 rows, about 16 per
// thread so that the last round's imbalance is small.
void split_gate_up(const std::vector<int32_t>& active, int64_t I, int nthreads, std::vector<Item1>& items1) {
  items1.clear();
  const int64_t rows_total = int64_t(active.size()) * I;
  const int64_t rows1 = std::clamp<int64_t>(round_up(rows_total / (int64_t(nthreads) * 16), 16), 16, 1024);
  for (int32_t e : active)
    for (int64_t n0 = 0; n0 < I; n0 += rows1) items1.push_back(Item1{e, n0, std::min(n0 + rows1, I)});
}

// The call's problem and work lists (the ISA tables read them through ctx.prob).
void set_problem(Ctx& ctx, const at::Tensor& x, const at::Tensor& out, int64_t H, int64_t I, int64_t E,
                 const std::vector<ExpertWork>& experts, const std::vector<int32_t>& active,
                 const std::vector<Item1>& items1, int64_t rows2) {
  ctx.prob.x = static_cast<const uint16_t*>(x.data_ptr());  // bf16 (or fp16 for quantized experts: prob.f16)
  ctx.prob.ldx = x.stride(0);
  ctx.prob.out = out.data_ptr<float>();
  ctx.prob.ldo = out.stride(0);
  ctx.prob.H = H;
  ctx.prob.I = I;
  ctx.prob.n_experts = int32_t(E);
  ctx.prob.experts = experts.data();
  ctx.experts = &experts;
  ctx.active = &active;
  ctx.items1 = &items1;
  ctx.rows2 = rows2;
}

// Both projections in one pool run, not one per projection: a barrier between them left
// every thread idle for the tail of the last gate/up items, once per layer; now a down item
// waits only for the experts it is about to read (body_down).
void run_projections(ThreadPool* pool, Ctx& ctx, int64_t E, void (*fini)(void*)) {
  static std::vector<int32_t> gate_up_left;
  gate_up_left.assign(E, 0);
  for (const Item1& it : *ctx.items1) ++gate_up_left[it.e];
  ctx.gate_up_left = gate_up_left.data();
  const int64_t n_down = (ctx.prob.H + ctx.rows2 - 1) / ctx.rows2;
  pool->run(int64_t(ctx.items1->size()) + n_down, body_gate_up_then_down, fini, &ctx);
}

// mode: 1 = AVX512-BF16 for every expert; 2 = AMX for every expert (where the
// shape allows, H >= 32 and I >= 32); 3 = AMX for experts with at least
// amx_min_tokens tokens, AVX512-BF16 for the others.
void moe_forward(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& topk_ids,
                 const at::Tensor& topk_weights, const at::Tensor& out, int64_t mode, int64_t amx_min_tokens) {
  FCHECK(x.device().is_cpu() && w13.device().is_cpu() && w2.device().is_cpu() &&
                  topk_ids.device().is_cpu() && topk_weights.device().is_cpu() && out.device().is_cpu(),
              "fiddler_cpu.moe_forward: all tensors must be on the CPU");
  FCHECK(x.scalar_type() == at::kBFloat16 && w13.scalar_type() == at::kBFloat16 &&
                  w2.scalar_type() == at::kBFloat16,
              "fiddler_cpu.moe_forward: x, w13, w2 must be bfloat16");
  FCHECK(topk_ids.scalar_type() == at::kInt, "fiddler_cpu.moe_forward: topk_ids must be int32");
  FCHECK(topk_weights.scalar_type() == at::kFloat, "fiddler_cpu.moe_forward: topk_weights must be float32");
  FCHECK(out.scalar_type() == at::kFloat, "fiddler_cpu.moe_forward: out must be float32");
  FCHECK(x.dim() == 2 && w13.dim() == 3 && w2.dim() == 3 && topk_ids.dim() == 2 && topk_weights.dim() == 2 &&
                  out.dim() == 2,
              "fiddler_cpu.moe_forward: expected x [T,H], w13 [E,2I,H], w2 [E,H,I], topk_ids/topk_weights [T,K], "
              "out [T,H]");
  const int64_t T = x.size(0), H = x.size(1), E = w13.size(0), I2 = w13.size(1), I = I2 / 2;
  const int64_t K = topk_ids.size(1);
  FCHECK(I2 % 2 == 0 && w13.size(2) == H, "fiddler_cpu.moe_forward: w13 must be [E, 2I, H]");
  FCHECK(w2.size(0) == E && w2.size(1) == H && w2.size(2) == I, "fiddler_cpu.moe_forward: w2 must be [E, H, I]");
  FCHECK(topk_ids.size(0) == T && topk_weights.size(0) == T && topk_weights.size(1) == K,
              "fiddler_cpu.moe_forward: topk_ids/topk_weights must be [T, K]");
  FCHECK(out.size(0) == T && out.size(1) == H, "fiddler_cpu.moe_forward: out must be [T, H]");
  FCHECK(mode >= 1 && mode <= 3, "fiddler_cpu.moe_forward: bad mode " + FSTR(mode));
  if (T == 0 || E == 0 || K == 0 || H == 0 || I == 0) return;
  FCHECK(x.stride(1) == 1 && out.stride(1) == 1, "fiddler_cpu.moe_forward: x and out rows must be contiguous");
  FCHECK(w13.stride(2) == 1 && w13.stride(1) == H && w2.stride(2) == 1 && w2.stride(1) == I,
              "fiddler_cpu.moe_forward: each expert's w13 / w2 must be contiguous (row-major)");

  const at::Tensor ids = topk_ids.contiguous();
  const at::Tensor wts = topk_weights.contiguous();
  const int32_t* idp = ids.data_ptr<int32_t>();
  const float* wtp = wts.data_ptr<float>();

  std::lock_guard<std::mutex> lk(g_mu);
  FCHECK(g_tables[0], "fiddler_cpu.moe_forward: the AVX512-BF16 kernels are not loaded");
  FCHECK(mode == 1 || g_tables[1], "fiddler_cpu.moe_forward: the AMX kernels are not loaded");
  ThreadPool* pool = pool_locked();
  const int nthreads = pool->size();

  if (group_pairs(idp, wtp, T, K, E) == 0) return;
  const std::vector<int32_t>&counts = g_counts, &offs = g_offs, &toks = g_toks;
  const std::vector<float>& wlist = g_wlist;

  // Per-expert work and scratch layout.
  static std::vector<ExpertWork> experts;
  static std::vector<int32_t> active, amx_experts;
  experts.assign(E, ExpertWork{});
  active.clear();
  amx_experts.clear();
  const bool amx_shape_ok = H >= 32 && I >= 32;
  const int64_t S1 = (H + 31) / 32, S2 = (I + 31) / 32;
  size_t act_elems = 0, xpack_elems = 0;
  std::vector<size_t> act_off(E), xp_off(E);
  for (int64_t e = 0; e < E; ++e) {
    const int32_t m = counts[e];
    if (m == 0) continue;
    ExpertWork& ew = experts[e];
    ew.w13 = reinterpret_cast<const uint16_t*>(w13.data_ptr<at::BFloat16>()) + e * w13.stride(0);
    ew.w2 = reinterpret_cast<const uint16_t*>(w2.data_ptr<at::BFloat16>()) + e * w2.stride(0);
    ew.tok = toks.data() + offs[e];
    ew.wt = wlist.data() + offs[e];
    ew.m = m;
    ew.amx = (mode == 2 || (mode == 3 && m >= amx_min_tokens)) && amx_shape_ok ? 1 : 0;
    active.push_back(int32_t(e));
    act_off[e] = act_elems;
    if (ew.amx) {
      amx_experts.push_back(int32_t(e));
      const int64_t MB = (m + 15) / 16;
      act_elems += size_t(MB * S2 * kPackBlockElems);
      xp_off[e] = xpack_elems;
      xpack_elems += size_t(MB * S1 * kPackBlockElems);
    } else {
      act_elems += size_t(round_up(int64_t(m) * I, 32));
    }
  }
  static Scratch act_buf, xp_buf;
  uint16_t* act = static_cast<uint16_t*>(act_buf.get(act_elems * 2 + 64));
  uint16_t* xp = xpack_elems ? static_cast<uint16_t*>(xp_buf.get(xpack_elems * 2 + 64)) : nullptr;
  for (int32_t e : active) {
    experts[e].act = act + act_off[e];
    experts[e].xpack = experts[e].amx ? xp + xp_off[e] : nullptr;
  }

  static std::vector<Item1> items1;
  split_gate_up(active, I, nthreads, items1);
  // Down items: output row ranges (each over all experts), multiples of 32 rows,
  // about 8 per thread, or what the AMX kernel asks for (down_item_rows).
  const int64_t rows2 = down_item_rows(H, nthreads, amx_experts.empty() ? 0 : g_tables[1]->down_rows);

  Ctx ctx;
  set_problem(ctx, x, out, H, I, E, experts, active, items1, rows2);
  ctx.amx_experts = &amx_experts;

  if (!amx_experts.empty()) {
    int64_t n_pack = 0;
    for (int32_t e : amx_experts) n_pack += (experts[e].m + 15) / 16;
    pool->run(n_pack, body_pack, nullptr, &ctx);
  }
  run_projections(pool, ctx, E, fini_amx);
}

// Quantized experts (kernel_quant_avx512.cpp), by fmt (kernel_api.h):
//   FP8 block-scaled: w13 [E, 2I, H] and w2 [E, H, I] float8_e4m3fn, s13 [E, ceil(2I / bn),
//     ceil(H / bk)] and s2 [E, ceil(H / bn), ceil(I / bk)] fp32;
//   MXFP4: w13 [E, 2I, H / 2] and w2 [E, H, I / 2] uint8 (two e2m1 codes a byte), s13
//     [E, 2I, H / 32] and s2 [E, H, I / 32] uint8 e8m0 exponents (bn, bk ignored);
//   INT4 groups: w13 [E, 2I, H / 8] and w2 [E, H, I / 8] int32 (eight codes a word), s13
//     [E, 2I, H / bk] and s2 [E, H, I / bk] in x's dtype, a scale per group of bk (a
//     multiple of 32);
//   INT4 with zero points: as INT4 groups, unsigned codes, s13 / s2 int32 words (the scale's
//     bits, x's dtype, in bits 0..15, zero point in bits 16..19);
// b13 [E, 2I] and b2 [E, H] biases in x's dtype (gate then up) or none; act / alpha / limit
// the activation (kActSilu, kActSwigluOai); otherwise as moe_forward (out fp32 accumulated
// into), except that x may be bf16 or fp16 (the model's dtype: GPTQ and AWQ checkpoints run
// in fp16).
// The experts a call reads: moe_forward's bf16 ones (s13 / s2 undefined), or
// moe_forward_quant's quantized ones with their scales, biases and activation. Queued jobs
// and graph-step layers hold one.
struct ExpertSet {
  at::Tensor w13, w2, s13, s2;
  c10::optional<at::Tensor> b13, b2;
  int64_t fmt = 0, bn = 0, bk = 0, act = kActSilu;
  double alpha = 0, limit = 0;
  bool quantized() const { return s13.defined(); }
};

// Checks a quantized ExpertSet's tensors against each other (layouts above); `op` prefixes
// the messages.
void check_quant(const ExpertSet& w, const std::string& op) {
  const at::Tensor &w13 = w.w13, &s13 = w.s13, &w2 = w.w2, &s2 = w.s2;
  const int64_t fmt = w.fmt, bn = w.bn, bk = w.bk;
  for (const at::Tensor* t : {&w13, &s13, &w2, &s2})
    FCHECK(t->defined() && t->device().is_cpu(), op + "weights and scales must be on the CPU");
  FCHECK(fmt == kFmtFp8Block || fmt == kFmtMxfp4 || fmt == kFmtInt4Group || fmt == kFmtInt4Zp,
         op + "unknown format " + FSTR(fmt));
  FCHECK(w.act == kActSilu || w.act == kActSwigluOai, op + "unknown activation " + FSTR(w.act));
  const bool mx = fmt == kFmtMxfp4, zp = fmt == kFmtInt4Zp, int4 = fmt == kFmtInt4Group || zp;
  const auto values = mx ? at::kByte : int4 ? at::kInt : at::kFloat8_e4m3fn;
  // INT4 group scales: bf16 or fp16, x's dtype (check_x_dtype)
  const auto int4_scales = s13.scalar_type() == at::kHalf ? at::kHalf : at::kBFloat16;
  const auto scales = mx ? at::kByte : zp ? at::kInt : int4 ? int4_scales : at::kFloat;
  FCHECK(w13.scalar_type() == values && w2.scalar_type() == values && s13.scalar_type() == scales &&
             s2.scalar_type() == scales,
         op + (mx     ? "MXFP4 weights and scales must be uint8"
               : zp   ? "INT4 zero-point weights and scales must be int32 words"
               : int4 ? "INT4 weights must be int32 words, scales bfloat16 or float16 (both the same)"
                      : "FP8 weights must be float8_e4m3fn, scales float32"));
  FCHECK(w13.dim() == 3 && w2.dim() == 3 && s13.dim() == 3 && s2.dim() == 3,
         op + "expected w13 [E,2I,.], s13 [E,.,.], w2 [E,H,.], s2 [E,.,.]");
  const int64_t E = w13.size(0), H = w2.size(1), I = w13.size(1) / 2;
  if (int4) {
    FCHECK(bk > 0 && bk % 32 == 0 && H % bk == 0 && I % bk == 0,
           op + "INT4 needs groups of a multiple of 32 dividing H and I, got " + FSTR(bk) + " for " + FSTR(H) + ", " +
               FSTR(I));
    FCHECK(w13.size(1) == 2 * I && w13.size(2) == H / 8 && w2.size(0) == E && w2.size(1) == H && w2.size(2) == I / 8,
           op + "INT4 w13 must be [E, 2I, H/8] and w2 [E, H, I/8]");
    FCHECK(s13.size(0) == E && s13.size(1) == 2 * I && s13.size(2) == H / bk && s2.size(0) == E &&
               s2.size(1) == H && s2.size(2) == I / bk,
           op + "INT4 scales must be [E, 2I, H/group] and [E, H, I/group]");
  } else if (mx) {
    FCHECK(H % 32 == 0 && I % 32 == 0, op + "MXFP4 needs H and I multiples of 32, got " + FSTR(H) + ", " + FSTR(I));
    FCHECK(w13.size(1) == 2 * I && w13.size(2) == H / 2 && w2.size(0) == E && w2.size(1) == H && w2.size(2) == I / 2,
           op + "MXFP4 w13 must be [E, 2I, H/2] and w2 [E, H, I/2]");
    FCHECK(s13.size(0) == E && s13.size(1) == 2 * I && s13.size(2) == H / 32 && s2.size(0) == E &&
               s2.size(1) == H && s2.size(2) == I / 32,
           op + "MXFP4 scales must be [E, 2I, H/32] and [E, H, I/32]");
  } else {
    FCHECK(bn > 0 && bk > 0 && I % bn == 0, op + "bad scale block " + FSTR(bn) + "x" + FSTR(bk) + " for I = " + FSTR(I));
    FCHECK(w13.size(1) == 2 * I && w13.size(2) == H && w2.size(0) == E && w2.size(1) == H && w2.size(2) == I,
           op + "w13 must be [E, 2I, H] and w2 [E, H, I]");
    FCHECK(s13.size(0) == E && s13.size(1) == 2 * I / bn && s13.size(2) == (H + bk - 1) / bk && s2.size(0) == E &&
               s2.size(1) == (H + bn - 1) / bn && s2.size(2) == (I + bk - 1) / bk,
           op + "scales must be [E, 2I/bn, ceil(H/bk)] and [E, ceil(H/bn), ceil(I/bk)]");
  }
  FCHECK(w.b13.has_value() == w.b2.has_value(), op + "give both biases or neither");
  if (w.b13.has_value()) {
    const at::Tensor &b13 = *w.b13, &b2 = *w.b2;
    FCHECK((b13.scalar_type() == at::kBFloat16 || b13.scalar_type() == at::kHalf) &&
               b2.scalar_type() == b13.scalar_type() && b13.is_contiguous() && b2.is_contiguous() &&
               b13.dim() == 2 && b13.size(0) == E && b13.size(1) == 2 * I && b2.dim() == 2 && b2.size(0) == E &&
               b2.size(1) == H,
           op + "biases must be contiguous bf16 (or fp16) b13 [E, 2I] and b2 [E, H]");
  }
  FCHECK(w13.stride(2) == 1 && w13.stride(1) == w13.size(2) && w2.stride(2) == 1 && w2.stride(1) == w2.size(2) &&
             s13.stride(2) == 1 && s13.stride(1) == s13.size(2) && s2.stride(2) == 1 && s2.stride(1) == s2.size(2),
         op + "each expert's weights and scales must be contiguous (row-major)");
}

// x's dtype for experts w: bf16 for bf16 experts; for quantized ones the model's, bf16 or
// fp16, which their biases and INT4 scales are in (zero-point words hold its bits).
void check_x_dtype(const ExpertSet& w, at::ScalarType xt, const std::string& op) {
  const std::string got = std::string(" (x is ") + c10::toString(xt) + ")";
  if (!w.quantized()) {
    FCHECK(xt == at::kBFloat16, op + "bf16 experts take bfloat16 x" + got);
    return;
  }
  FCHECK(xt == at::kBFloat16 || xt == at::kHalf, op + "x must be bfloat16 or float16" + got);
  FCHECK(!w.b13.has_value() || w.b13->scalar_type() == xt, op + "the biases' dtype must be x's" + got);
  FCHECK(w.fmt != kFmtInt4Group || w.s13.scalar_type() == xt, op + "the INT4 scales' dtype must be x's" + got);
}

// moe_forward_quant once its experts are checked.
void run_quant(const ExpertSet& w, const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
               const at::Tensor& out) {
  const std::string op = "fiddler_cpu.moe_forward_quant: ";
  for (const at::Tensor* t : {&x, &topk_ids, &topk_weights, &out})
    FCHECK(t->device().is_cpu(), op + "all tensors must be on the CPU");
  check_x_dtype(w, x.scalar_type(), op);
  const bool f16 = x.scalar_type() == at::kHalf;
  FCHECK(topk_ids.scalar_type() == at::kInt && topk_weights.scalar_type() == at::kFloat &&
             out.scalar_type() == at::kFloat,
         op + "topk_ids int32, topk_weights and out float32");
  FCHECK(x.dim() == 2 && topk_ids.dim() == 2 && topk_weights.dim() == 2 && out.dim() == 2,
         op + "expected x [T,H], topk_ids/topk_weights [T,K], out [T,H]");
  const at::Tensor &w13 = w.w13, &s13 = w.s13, &w2 = w.w2, &s2 = w.s2;
  const int64_t T = x.size(0), H = x.size(1), E = w13.size(0), I = w13.size(1) / 2, K = topk_ids.size(1);
  FCHECK(w2.size(1) == H, op + "x has " + FSTR(H) + " columns, the experts' hidden size is " + FSTR(w2.size(1)));
  FCHECK(topk_ids.size(0) == T && topk_weights.size(0) == T && topk_weights.size(1) == K && out.size(0) == T &&
             out.size(1) == H,
         op + "topk_ids/topk_weights must be [T, K] and out [T, H]");
  if (T == 0 || E == 0 || K == 0 || H == 0 || I == 0) return;
  FCHECK(x.stride(1) == 1 && out.stride(1) == 1, op + "x and out rows must be contiguous");
  const int64_t fmt = w.fmt;
  const c10::optional<at::Tensor>&b13 = w.b13, &b2 = w.b2;

  const at::Tensor ids = topk_ids.contiguous();
  const at::Tensor wts = topk_weights.contiguous();
  std::lock_guard<std::mutex> lk(g_mu);
  FCHECK(g_tables[2], op + "the AVX512 quantized-expert kernels are not loaded");
  ThreadPool* pool = pool_locked();
  if (group_pairs(ids.data_ptr<int32_t>(), wts.data_ptr<float>(), T, K, E) == 0) return;

  static std::vector<ExpertWork> experts;
  static std::vector<int32_t> active;
  experts.assign(E, ExpertWork{});
  active.clear();
  std::vector<size_t> act_off(E);
  size_t act_elems = 0;
  const auto* q13 = static_cast<const uint8_t*>(w13.data_ptr());
  const auto* q2 = static_cast<const uint8_t*>(w2.data_ptr());
  const auto* sc13 = static_cast<const uint8_t*>(s13.data_ptr());
  const auto* sc2 = static_cast<const uint8_t*>(s2.data_ptr());
  const auto* bias13 = b13.has_value() ? static_cast<const uint16_t*>(b13->data_ptr()) : nullptr;
  const auto* bias2 = b2.has_value() ? static_cast<const uint16_t*>(b2->data_ptr()) : nullptr;
  for (int64_t e = 0; e < E; ++e) {
    if (g_counts[e] == 0) continue;
    ExpertWork& ew = experts[e];
    ew.q13 = q13 + e * w13.stride(0) * w13.element_size();
    ew.q2 = q2 + e * w2.stride(0) * w2.element_size();
    ew.s13 = sc13 + e * s13.stride(0) * s13.element_size();
    ew.s2 = sc2 + e * s2.stride(0) * s2.element_size();
    ew.b13 = bias13 ? bias13 + e * 2 * I : nullptr;
    ew.b2 = bias2 ? bias2 + e * H : nullptr;
    ew.tok = g_toks.data() + g_offs[e];
    ew.wt = g_wlist.data() + g_offs[e];
    ew.m = g_counts[e];
    active.push_back(int32_t(e));
    act_off[e] = act_elems;
    act_elems += size_t(round_up(int64_t(ew.m) * I, 16));
  }
  static Scratch act_buf;
  float* act_f = static_cast<float*>(act_buf.get(act_elems * sizeof(float) + 64));
  for (int32_t e : active) experts[e].actf = act_f + act_off[e];

  static std::vector<Item1> items1;
  split_gate_up(active, I, pool->size(), items1);
  Ctx ctx;
  set_problem(ctx, x, out, H, I, E, experts, active, items1, down_item_rows(H, pool->size(), 0));
  ctx.prob.bn = w.bn;
  ctx.prob.bk = w.bk;
  ctx.prob.fmt = int32_t(fmt);
  ctx.prob.act = int32_t(w.act);
  ctx.prob.alpha = float(w.alpha);
  ctx.prob.limit = float(w.limit);
  ctx.prob.f16 = int32_t(f16);
  run_projections(pool, ctx, E, nullptr);
}

void moe_forward_quant(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& s13, const at::Tensor& w2,
                       const at::Tensor& s2, const c10::optional<at::Tensor>& b13, const c10::optional<at::Tensor>& b2,
                       const at::Tensor& topk_ids, const at::Tensor& topk_weights, const at::Tensor& out, int64_t fmt,
                       int64_t bn, int64_t bk, int64_t act, double alpha, double limit) {
  ExpertSet w{w13, w2, s13, s2, b13, b2, fmt, bn, bk, act, alpha, limit};
  check_quant(w, "fiddler_cpu.moe_forward_quant: ");
  run_quant(w, x, topk_ids, topk_weights, out);
}

// The experts' contribution to out, by kind: bf16 ones through moe_forward (mode, amx_min_tokens
// as there), quantized ones through the quantized kernels (already checked: check_experts).
void run_experts(const ExpertSet& w, const at::Tensor& x, const at::Tensor& ids, const at::Tensor& wts,
                 const at::Tensor& out, int64_t mode, int64_t amx_min_tokens) {
  if (w.quantized())
    run_quant(w, x, ids, wts, out);
  else
    moe_forward(x, w.w13, w.w2, ids, wts, out, mode, amx_min_tokens);
}

// An ExpertSet from an op's arguments: bf16 w13 / w2 (s13 / s2 none), or quantized ones with
// their scales, biases and activation, checked here (a queued job fails at its submit, not
// later on the job thread).
ExpertSet check_experts(const at::Tensor& w13, const at::Tensor& w2, const c10::optional<at::Tensor>& s13,
                        const c10::optional<at::Tensor>& s2, const c10::optional<at::Tensor>& b13,
                        const c10::optional<at::Tensor>& b2, int64_t fmt, int64_t bn, int64_t bk, int64_t act,
                        double alpha, double limit, const std::string& op) {
  FCHECK(s13.has_value() == s2.has_value(), op + "give both scales or neither");
  ExpertSet w{w13, w2, s13.has_value() ? *s13 : at::Tensor(), s2.has_value() ? *s2 : at::Tensor(), b13, b2,
              fmt, bn, bk, act, alpha, limit};
  if (w.quantized()) {
    check_quant(w, op);
    return w;
  }
  FCHECK(!b13.has_value() && !b2.has_value() && act == kActSilu,
         op + "bf16 experts run SiLU-gated without biases natively");
  FCHECK(w13.scalar_type() == at::kBFloat16 && w2.scalar_type() == at::kBFloat16 && w13.dim() == 3 &&
             w2.dim() == 3 && w2.size(0) == w13.size(0),
         op + "bf16 experts: w13 [E, 2I, H] and w2 [E, H, I] bfloat16");
  return w;
}

// ---------------------------------------------------------------- async jobs
// A native job queue for moe_forward and the quantized kernels (an ExpertSet a
// job), for cold experts whose result the GPU waits for on the device (vllm_fiddler.runtime.device_wait). The engine
// thread enqueues a layer's job and goes on launching GPU work; this thread
// (no Python, so it never waits for the GIL, which the engine thread holds
// while it launches) runs the jobs in order, then stores each job's sequence
// number into its pinned "done" word, which a CUDA stream wait polls. A Python
// worker would need the GIL to start a job and to signal it: measured on the
// H100 box, the engine thread's launches and such a worker slowed each other
// (decode 21.5 vs 22.2 tok/s with the host waiting).
//
// A job's failure is kept for async_take_error and the word is stored anyway:
// a stream must never wait for a job that will not come.
//
// A routed job (moe_forward_routed_async) does not know its routing when it is
// submitted: the engine thread queues the routing's device->host copy and a
// stream write of the job's sequence number into a pinned "ready" word, then
// submits the job and goes on without waiting for the copy. This thread waits
// for the word, turns the routing (host slot or -1 per (token, k)) into chunk
// ids itself and runs the job. So at decode no host thread sits between the
// GPU's routing and the CPU's start (measured on the H100 box before: the
// engine thread's wake-up, planning and hand-over cost ~0.6 ms of CPU idle
// time a layer).
struct AsyncJob {
  ExpertSet experts;
  at::Tensor x, ids, wts, out, done_word;
  at::Tensor ready_word, counts;  // routed jobs only (ready_word undefined: a plain job)
  int64_t mode = 1, amx_min_tokens = 0, seq = 0, chunks = 1;
  std::vector<int64_t> first_chunks;  // [K] chunks below it are the GPU's, per top-k position
  std::chrono::steady_clock::time_point submitted;
};

// A routed job waits this long for its routing before it fails: a copy that
// never comes means the stream or the process is gone, and a job thread stuck
// on it would hold every later job (and the streams waiting for them) forever.
constexpr auto kReadyTimeout = std::chrono::seconds(60);
// Spin this long on the ready word before polling it with sleeps: the routing
// of the next layer usually lands within ~0.2-0.5 ms of the previous job's end.
constexpr auto kReadySpin = std::chrono::microseconds(2000);
// With graph steps attached and none for this long, the idle job thread polls their mark
// word every millisecond instead of every 50 us (an idle server's cost against the first
// layer's wait after a pause).
constexpr auto kGraphIdle = std::chrono::milliseconds(100);
// Routed jobs count tokens per cold-position mask up to this top-k (2^12 counters).
constexpr int64_t kMaxPatternTopK = 12;

// (int32)(word - seq) >= 0: the word has reached seq, cyclically (as the GPU's
// CU_STREAM_WAIT_VALUE_GEQ compares).
inline bool word_reached(const at::Tensor& word, int64_t seq) {
  const uint32_t v = uint32_t(__atomic_load_n(static_cast<const int32_t*>(word.data_ptr()), __ATOMIC_ACQUIRE));
  return int32_t(v - uint32_t(seq)) >= 0;
}

// Host-slot routing -> chunk-expert routing: slots [T, K] (host slot or -1) and
// weights [T, K] -> ids [T, K*C] (slot * C + c for the chunks c from first[k] on,
// -1 below it and for device-served pairs) and weights [T, K*C], the layout
// HybridMoE.cpu_chunk_ids builds on the engine thread. Adds to counts[0] the
// (token, k) pairs of host slots, to counts[1] the distinct chunk-experts below
// first[k] of those, which the GPU streams from host memory, and to counts[2] the
// distinct ones from first[k] on, which the CPU reads (a chunk-expert that several
// of the step's tokens chose is read once). With n_counts = 3 + 2^K, also counts
// each token under its cold-position mask (bit k: the pair (t, k) is on the host):
// counts[3 + mask] += 1, what cost_model.streamed_chunks prices the streamed cut
// over. Returns the first.
int64_t expand_routing(const at::Tensor& slots, const at::Tensor& wts, int64_t C, const std::vector<int64_t>& first,
                    at::Tensor* ids_out, at::Tensor* wts_out, int64_t* counts, int64_t n_counts) {
  const int64_t T = slots.size(0), K = slots.size(1);
  *ids_out = at::empty({T, K * C}, slots.options());
  *wts_out = at::empty({T, K * C}, wts.options());
  const int32_t* s = slots.data_ptr<int32_t>();
  const float* w = wts.data_ptr<float>();
  int32_t* ci = ids_out->data_ptr<int32_t>();
  float* cw = wts_out->data_ptr<float>();
  int64_t cold = 0;
  // chunk-experts, T * K * C at most in all (routed steps are small)
  std::vector<int64_t> streamed, on_cpu;
  for (int64_t p = 0; p < T * K; ++p) {
    const int32_t slot = s[p];
    cold += slot >= 0;
    const int64_t lo = first[size_t(p % K)];
    for (int64_t c = 0; c < C; ++c) {
      ci[p * C + c] = slot >= 0 && c >= lo ? int32_t(slot * C + c) : -1;
      cw[p * C + c] = w[p];
      if (slot >= 0) (c < lo ? streamed : on_cpu).push_back(int64_t(slot) * C + c);
    }
  }
  const auto distinct = [](std::vector<int64_t>& v) {
    std::sort(v.begin(), v.end());
    return int64_t(std::unique(v.begin(), v.end()) - v.begin());
  };
  __atomic_fetch_add(&counts[0], cold, __ATOMIC_RELAXED);
  __atomic_fetch_add(&counts[1], distinct(streamed), __ATOMIC_RELAXED);
  __atomic_fetch_add(&counts[2], distinct(on_cpu), __ATOMIC_RELAXED);
  if (n_counts == 3 + (int64_t(1) << K)) {
    for (int64_t t = 0; t < T; ++t) {
      int64_t mask = 0;
      for (int64_t k = 0; k < K; ++k) mask |= int64_t(s[t * K + k] >= 0) << k;
      __atomic_fetch_add(&counts[3 + mask], 1, __ATOMIC_RELAXED);
    }
  }
  return cold;
}

// A routed job's work once its routing is there (queued routed jobs and graph steps):
// expand the host slots into chunk-expert ids (counting them), then run the chunks from
// first[k] on, if any are cold, into `out` (already zeroed). Returns the CPU's chunk-experts.
int64_t run_routed(const at::Tensor& x, const ExpertSet& experts, const at::Tensor& slots,
                   const at::Tensor& wts, int64_t chunks, const std::vector<int64_t>& first, const at::Tensor& out,
                   const at::Tensor& counts, int64_t mode, int64_t amx_min_tokens) {
  at::Tensor ids, chunk_wts;
  int64_t* c = counts.data_ptr<int64_t>();
  const int64_t before = __atomic_load_n(&c[2], __ATOMIC_RELAXED);
  const int64_t cold = expand_routing(slots, wts, chunks, first, &ids, &chunk_wts, c, counts.numel());
  const int64_t cpu_chunks = __atomic_load_n(&c[2], __ATOMIC_RELAXED) - before;  // one job thread: no race
  if (cold && *std::min_element(first.begin(), first.end()) < chunks)
    run_experts(experts, x, ids, chunk_wts, out, mode, amx_min_tokens);
  return cpu_chunks;
}

// Graph steps (vllm_fiddler.runtime.graph_jobs): a routed step captured inside a CUDA graph
// that the engine thread replays whole (vLLM's FULL decode graphs), so no Python runs per
// layer to hand this thread a job. The graph copies the routing, the activations and the
// streamed cut into the buffers attached here, then writes a fixed code into `mark`
// ((layer + 1) << 16 | tokens, a driver memop, which orders the copies before it); this
// thread sees the code, clears `mark`, runs the layer's cold chunk-experts into `out` and
// sets `done` to 1; the graph waits for done == 1 and clears it (a memop ordered before
// its next mark). Fixed values, so the captured memops replay unchanged:
//   mark = 0 before done = 1 (this thread's program order, x86 keeps stores in order), so
//   the graph's next mark, which follows its wait for done, is never overwritten;
//   done = 0 (the graph's) before its next mark (the memop's barrier), so this thread's
//   next done = 1 comes after it.
// One job is in flight at a time: the graph waits for each before it marks the next.
struct GraphLayer {
  ExpertSet experts;
  at::Tensor counts, pairs;  // pairs: int64 [1], (token, k) pairs this layer's graph jobs saw
  int64_t chunks = 0;                 // 0: no layer in this slot
};
struct GraphJobs {
  at::Tensor x, slots, wts, first, out, mark_word, done_word;  // [N, H] bf16 / fp16, [N, K] i32, [N, K] f32, [K] i32, [N, H] f32
  int64_t mode = 1, amx_min_tokens = 0;
  std::vector<GraphLayer> layers;
};

class AsyncRunner {
 public:
  AsyncRunner() : pid_(getpid()), thread_([this] { loop(); }) {}
  pid_t pid() const { return pid_; }

  // Called from Python (the GIL held): the jobs this thread finished are dropped here.
  void submit(AsyncJob job) {
    job.submitted = std::chrono::steady_clock::now();
    std::vector<AsyncJob> finished;
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.push_back(std::move(job));
      finished.swap(finished_);
    }
    cv_.notify_one();
  }
  void wait_idle() {
    std::vector<AsyncJob> finished;
    std::unique_lock<std::mutex> lk(mu_);
    idle_cv_.wait(lk, [&] { return queue_.empty() && !busy_; });
    finished.swap(finished_);
    lk.unlock();
  }
  std::string take_error() {
    std::lock_guard<std::mutex> lk(mu_);
    std::string e;
    e.swap(error_);
    return e;
  }
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lk(mu_);
    return {jobs_, busy_ns_, queue_ns_, routing_wait_ns_, graph_jobs_};
  }
  // The jobs done since the last call, oldest first (at most kTraceJobs): (submitted,
  // started, done, picked, CPU chunk-experts) per job; times in steady_clock ns
  // (CLOCK_MONOTONIC on Linux, the clock of Python's time.perf_counter_ns), for
  // timelines in benchmarks. picked: this thread took the job (a routed job then waits
  // for its routing until started); chunk-experts: what a routed job ran on the CPU
  // (counts[2]'s share; 0 for planned jobs).
  std::vector<int64_t> take_trace() {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<int64_t> flat;
    const int64_t n = std::min<int64_t>(traced_, kTraceJobs);
    flat.reserve(size_t(kTraceFields * n));
    for (int64_t i = traced_ - n; i < traced_; ++i)
      for (int64_t v : trace_[size_t(i % kTraceJobs)]) flat.push_back(v);
    traced_ = 0;
    return flat;
  }

 private:
  void loop() {
    name_this_thread("fiddler-job");
    for (;;) {
      AsyncJob job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        while (queue_.empty()) {
          if (!graph()) {
            cv_.wait(lk);
            continue;
          }
          lk.unlock();
          idle_poll();
          lk.lock();
        }
        job = std::move(queue_.front());
        queue_.pop_front();
        busy_ = true;
      }
      std::string error;
      const auto picked = std::chrono::steady_clock::now();
      if (job.ready_word.defined()) error = wait_ready(job);
      const auto t0 = std::chrono::steady_clock::now();
      int64_t cpu_chunks = 0;
      try {
        std::memset(job.out.data_ptr(), 0, job.out.nbytes());
        if (error.empty() && job.ready_word.defined()) {
          cpu_chunks = run_routed(job.x, job.experts, job.ids, job.wts, job.chunks, job.first_chunks, job.out,
                                  job.counts, job.mode, job.amx_min_tokens);
        } else if (error.empty()) {
          run_experts(job.experts, job.x, job.ids, job.wts, job.out, job.mode, job.amx_min_tokens);
        }
      } catch (const std::exception& e) {
        error = e.what();
      } catch (...) {
        error = "fiddler_cpu: unknown error in an async moe_forward job";
      }
      const auto t1 = std::chrono::steady_clock::now();
      // release: the result's stores (joined pool threads) before the word's
      __atomic_store_n(static_cast<int32_t*>(job.done_word.data_ptr()), int32_t(uint32_t(job.seq)),
                       __ATOMIC_RELEASE);
      const auto queued = job.submitted;
      std::lock_guard<std::mutex> lk(mu_);
      // Not dropped here: in torch 2.11 dropping a C++ reference to a tensor that Python
      // also holds (refcount 2 -> 1) decrefs its PyObject, which takes the GIL, and the
      // engine thread holds that while it runs Python. The H100 box's engine traces had
      // this thread ~0.1 ms (median; 0.45 at p90, 1.1 at p99) from one job's end to
      // taking the next, queued one (benchmarks/investigations/engine_trace.py). The next submit (or
      // wait_idle), on a Python thread, drops them.
      finished_.push_back(std::move(job));
      if (!error.empty() && error_.empty()) error_ = error;
      ++jobs_;
      busy_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
      queue_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(picked - queued).count();
      routing_wait_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(t0 - picked).count();
      trace_[size_t(traced_++ % kTraceJobs)] = {ns(queued), ns(t0), ns(t1), ns(picked), cpu_chunks};
      busy_ = false;
      if (queue_.empty()) idle_cv_.notify_all();
    }
  }

  // Waits for a routed job's ready word; an error message if it gave up.
  std::string wait_ready(const AsyncJob& job) {
    const auto t0 = std::chrono::steady_clock::now();
    const uint64_t cancel_gen = cancel_gen_.load(std::memory_order_acquire);
    for (int spins = 0; !word_reached(job.ready_word, job.seq); ++spins) {
      // a graph step queued before this job's routing (stream order) comes first
      if (serve_graph()) continue;
      if ((spins & 63) != 0) {
        __builtin_ia32_pause();
        continue;
      }
      if (cancel_gen_.load(std::memory_order_acquire) != cancel_gen)
        return "fiddler_cpu: a routed job was cancelled before its routing arrived";
      const auto waited = std::chrono::steady_clock::now() - t0;
      if (waited > kReadyTimeout) return "fiddler_cpu: a routed job's routing never arrived (60 s)";
      if (waited > kReadySpin) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    return "";
  }

 public:
  // Routed jobs waiting for their routing now give up (with an error), so that
  // wait_idle returns at shutdown even if no stream will write their word.
  void cancel_ready_waits() { cancel_gen_.fetch_add(1, std::memory_order_acq_rel); }

  // Graph steps: the buffers and words (replaces any before; null: none), and layer slots.
  void set_graph(std::shared_ptr<GraphJobs> g) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      std::atomic_store(&graph_, std::move(g));
    }
    cv_.notify_one();  // an idle loop starts polling the new mark word
  }
  std::shared_ptr<GraphJobs> graph() const { return std::atomic_load(&graph_); }
  // A stream waiting for `done` goes on (shutdown: a graph that will not be served).
  void release_graph() {
    if (auto g = graph()) __atomic_store_n(g->done_word.data_ptr<int32_t>(), 1, __ATOMIC_RELEASE);
  }

 private:
  // Runs the graph job whose code is in the mark word, if any (this thread only).
  bool serve_graph() {
    const std::shared_ptr<GraphJobs> g = graph();
    if (!g) return false;
    int32_t* mark = g->mark_word.data_ptr<int32_t>();
    const int32_t code = __atomic_load_n(mark, __ATOMIC_ACQUIRE);
    if (code == 0) return false;
    const auto t0 = std::chrono::steady_clock::now();
    __atomic_store_n(mark, 0, __ATOMIC_RELAXED);  // before done = 1 (see GraphJobs)
    const int64_t slot = int64_t(uint32_t(code) >> 16) - 1, T = code & 0xFFFF;
    std::string error;
    int64_t cpu_chunks = 0;
    try {
      FCHECK(slot >= 0 && slot < int64_t(g->layers.size()) && g->layers[size_t(slot)].chunks > 0 && T >= 1 &&
                 T <= g->x.size(0),
             "fiddler_cpu: a graph step marked an unknown layer or token count (code " + std::to_string(code) + ")");
      const GraphLayer& layer = g->layers[size_t(slot)];
      const int64_t K = g->slots.size(1);
      at::Tensor out = g->out.narrow(0, 0, T), slots = g->slots.narrow(0, 0, T), wts = g->wts.narrow(0, 0, T);
      std::memset(out.data_ptr(), 0, out.nbytes());
      const int32_t* first_word = g->first.data_ptr<int32_t>();
      std::vector<int64_t> first(static_cast<size_t>(K));
      for (int64_t k = 0; k < K; ++k) first[size_t(k)] = std::min<int64_t>(std::max(first_word[k], 0), layer.chunks);
      cpu_chunks = run_routed(g->x.narrow(0, 0, T), layer.experts, slots, wts, layer.chunks, first, out,
                              layer.counts, g->mode, g->amx_min_tokens);
      __atomic_fetch_add(layer.pairs.data_ptr<int64_t>(), T * K, __ATOMIC_RELAXED);
    } catch (const std::exception& e) {
      error = e.what();
    } catch (...) {
      error = "fiddler_cpu: unknown error in a graph step's job";
    }
    const auto t1 = std::chrono::steady_clock::now();
    // release: the result's stores (joined pool threads) before the word's; a failed job
    // sets it too, a stream must never wait for a job that will not come
    __atomic_store_n(g->done_word.data_ptr<int32_t>(), 1, __ATOMIC_RELEASE);
    std::lock_guard<std::mutex> lk(mu_);
    if (!error.empty() && error_.empty()) error_ = error;
    ++jobs_;
    ++graph_jobs_;
    busy_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
    trace_[size_t(traced_++ % kTraceJobs)] = {ns(t0), ns(t0), ns(t1), ns(t0), cpu_chunks};
    last_graph_job_ = t1;
    return true;
  }

  // No queued job, graph steps attached: poll the mark word; spin for kReadySpin after the
  // last graph job (a decode step's next layer marks within a millisecond or so), then
  // sleep between polls, longer once idle for kGraphIdle (a replay after that waits at most
  // one sleep for its first layer). Returns when a job is queued, or after serving one.
  void idle_poll() {
    for (int spins = 0;; ++spins) {
      if (serve_graph()) return;
      if ((spins & 63) == 0) {
        std::unique_lock<std::mutex> lk(mu_);
        if (!queue_.empty() || !graph()) return;
        const auto idle = std::chrono::steady_clock::now() - last_graph_job_;
        if (idle > kReadySpin) {
          cv_.wait_for(lk, idle > kGraphIdle ? std::chrono::microseconds(1000) : std::chrono::microseconds(50));
          if (!queue_.empty()) return;
        }
        continue;
      }
      __builtin_ia32_pause();
    }
  }

  static int64_t ns(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
  }
  static constexpr int64_t kTraceJobs = 8192, kTraceFields = 5;

  const pid_t pid_;
  std::mutex mu_;
  std::condition_variable cv_, idle_cv_;
  std::deque<AsyncJob> queue_;
  std::vector<AsyncJob> finished_;  // done, their tensors still held (see loop)
  std::vector<std::array<int64_t, kTraceFields>> trace_ =
      std::vector<std::array<int64_t, kTraceFields>>(kTraceJobs);
  int64_t traced_ = 0;
  bool busy_ = false;
  std::string error_;
  // queue: from submit until this thread took the job (behind earlier jobs);
  // routing wait: a routed job's wait for its ready word after that
  int64_t jobs_ = 0, busy_ns_ = 0, queue_ns_ = 0, routing_wait_ns_ = 0;
  std::atomic<uint64_t> cancel_gen_{0};
  std::shared_ptr<GraphJobs> graph_;  // std::atomic_load / atomic_store only
  int64_t graph_jobs_ = 0;
  std::chrono::steady_clock::time_point last_graph_job_{};
  std::thread thread_;  // last: starts once the members above exist
};

std::mutex g_async_mu;
AsyncRunner* g_async = nullptr;

AsyncRunner* async_runner() {
  std::lock_guard<std::mutex> lk(g_async_mu);
  if (g_async && g_async->pid() != getpid()) g_async = nullptr;  // forked child: the thread is gone; leak
  if (!g_async) g_async = new AsyncRunner();  // lives as long as the process (a detached-like daemon)
  return g_async;
}

AsyncJob make_job(const at::Tensor& x, ExpertSet experts, const at::Tensor& ids, const at::Tensor& wts,
                  const at::Tensor& out, int64_t mode, int64_t amx_min_tokens, const at::Tensor& done_word,
                  int64_t seq) {
  AsyncJob job;
  job.x = x;
  job.experts = std::move(experts);
  job.ids = ids;
  job.wts = wts;
  job.out = out;
  job.done_word = done_word;
  job.mode = mode;
  job.amx_min_tokens = amx_min_tokens;
  job.seq = seq;
  return job;
}

// A job's experts (check_experts) checked against its x and fp32 result buffer, at submit.
ExpertSet check_job_experts(const at::Tensor& x, const at::Tensor& out, const at::Tensor& w13, const at::Tensor& w2,
                            const c10::optional<at::Tensor>& s13, const c10::optional<at::Tensor>& s2,
                            const c10::optional<at::Tensor>& b13, const c10::optional<at::Tensor>& b2, int64_t fmt,
                            int64_t bn, int64_t bk, int64_t act, double alpha, double limit, const std::string& op) {
  ExpertSet experts = check_experts(w13, w2, s13, s2, b13, b2, fmt, bn, bk, act, alpha, limit, op);
  check_x_dtype(experts, x.scalar_type(), op);
  FCHECK(out.is_contiguous() && out.scalar_type() == at::kFloat, op + "out must be contiguous float32");
  return experts;
}

void moe_forward_async(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                       const at::Tensor& topk_ids, const at::Tensor& topk_weights, const at::Tensor& out,
                       int64_t mode, int64_t amx_min_tokens, const at::Tensor& done_word, int64_t seq,
                       const c10::optional<at::Tensor>& s13, const c10::optional<at::Tensor>& s2,
                       const c10::optional<at::Tensor>& b13, const c10::optional<at::Tensor>& b2, int64_t fmt,
                       int64_t bn, int64_t bk, int64_t act, double alpha, double limit) {
  ExpertSet experts = check_job_experts(x, out, w13, w2, s13, s2, b13, b2, fmt, bn, bk, act, alpha, limit,
                                        "fiddler_cpu.moe_forward_async: ");
  FCHECK(done_word.device().is_cpu() && done_word.scalar_type() == at::kInt && done_word.numel() == 1,
         "fiddler_cpu.moe_forward_async: done_word must be one int32 on the host");
  async_runner()->submit(
      make_job(x, std::move(experts), topk_ids.contiguous(), topk_weights.contiguous(), out, mode, amx_min_tokens,
               done_word, seq));
}

void moe_forward_routed_async(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                              const at::Tensor& slots, const at::Tensor& weights, int64_t chunks,
                              c10::IntArrayRef first_chunks, const at::Tensor& out, int64_t mode, int64_t amx_min_tokens,
                              const at::Tensor& ready_word, const at::Tensor& done_word, int64_t seq,
                              const at::Tensor& counts, const c10::optional<at::Tensor>& s13, const c10::optional<at::Tensor>& s2,
                              const c10::optional<at::Tensor>& b13, const c10::optional<at::Tensor>& b2, int64_t fmt,
                              int64_t bn, int64_t bk, int64_t act, double alpha, double limit) {
  ExpertSet experts = check_job_experts(x, out, w13, w2, s13, s2, b13, b2, fmt, bn, bk, act, alpha, limit,
                                        "fiddler_cpu.moe_forward_routed_async: ");
  for (const at::Tensor* word : {&ready_word, &done_word})
    FCHECK(word->device().is_cpu() && word->scalar_type() == at::kInt && word->numel() == 1,
           "fiddler_cpu.moe_forward_routed_async: ready_word and done_word must be one int32 each on the host");
  FCHECK(slots.is_contiguous() && slots.scalar_type() == at::kInt && weights.is_contiguous() &&
             weights.scalar_type() == at::kFloat && slots.dim() == 2 && weights.sizes() == slots.sizes(),
         "fiddler_cpu.moe_forward_routed_async: slots [T, K] int32 and weights [T, K] float32, contiguous");
  const int64_t K = slots.size(1);
  FCHECK(counts.device().is_cpu() && counts.scalar_type() == at::kLong && counts.is_contiguous() &&
             (counts.numel() == 3 || (K <= kMaxPatternTopK && counts.numel() == 3 + (int64_t(1) << K))),
         "fiddler_cpu.moe_forward_routed_async: counts must be int64 on the host: three (cold pairs, streamed "
         "chunk-experts, CPU chunk-experts), or those and 2^top_k tokens per cold-position mask (top_k <= 12)");
  FCHECK(chunks >= 1 && w13.size(0) % chunks == 0,
         "fiddler_cpu.moe_forward_routed_async: chunks must divide the chunk-experts of w13");
  FCHECK(int64_t(first_chunks.size()) == slots.size(1),
         "fiddler_cpu.moe_forward_routed_async: first_chunks needs one entry per top-k position");
  for (int64_t f : first_chunks)
    FCHECK(f >= 0 && f <= chunks, "fiddler_cpu.moe_forward_routed_async: first_chunks must be in 0..chunks");
  // slots / weights are read only once ready_word says the routing copy has landed
  AsyncJob job = make_job(x, std::move(experts), slots, weights, out, mode, amx_min_tokens, done_word, seq);
  job.ready_word = ready_word;
  job.counts = counts;
  job.chunks = chunks;
  job.first_chunks = first_chunks.vec();
  async_runner()->submit(std::move(job));
}

void graph_jobs_attach(const at::Tensor& x, const at::Tensor& slots, const at::Tensor& weights,
                       const at::Tensor& first, const at::Tensor& out, const at::Tensor& mark_word,
                       const at::Tensor& done_word, int64_t mode, int64_t amx_min_tokens) {
  FCHECK(x.device().is_cpu() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) &&
             x.dim() == 2 && x.is_contiguous(),
         "fiddler_cpu.graph_jobs_attach: x must be [N, H] bf16 (fp16: quantized layers only), contiguous, on the "
         "host");
  const int64_t N = x.size(0);
  FCHECK(slots.scalar_type() == at::kInt && slots.dim() == 2 && slots.size(0) == N && slots.is_contiguous() &&
             weights.scalar_type() == at::kFloat && weights.sizes() == slots.sizes() && weights.is_contiguous(),
         "fiddler_cpu.graph_jobs_attach: slots [N, K] int32 and weights [N, K] float32, contiguous");
  FCHECK(slots.size(1) <= kMaxPatternTopK, "fiddler_cpu.graph_jobs_attach: top_k must be <= 12");
  FCHECK(first.scalar_type() == at::kInt && first.numel() == slots.size(1) && first.is_contiguous(),
         "fiddler_cpu.graph_jobs_attach: first must be [K] int32");
  FCHECK(out.scalar_type() == at::kFloat && out.sizes() == x.sizes() && out.is_contiguous(),
         "fiddler_cpu.graph_jobs_attach: out must be [N, H] float32, contiguous");
  FCHECK(N >= 1 && N <= 0xFFFF, "fiddler_cpu.graph_jobs_attach: 1..65535 tokens");
  for (const at::Tensor* word : {&mark_word, &done_word})
    FCHECK(word->device().is_cpu() && word->scalar_type() == at::kInt && word->numel() == 1,
           "fiddler_cpu.graph_jobs_attach: mark_word and done_word must be one int32 each on the host");
  auto g = std::make_shared<GraphJobs>();
  g->x = x;
  g->slots = slots;
  g->wts = weights;
  g->first = first;
  g->out = out;
  g->mark_word = mark_word;
  g->done_word = done_word;
  g->mode = mode;
  g->amx_min_tokens = amx_min_tokens;
  async_runner()->set_graph(std::move(g));
}

void graph_jobs_add_layer(int64_t slot, const at::Tensor& w13, const at::Tensor& w2, int64_t chunks,
                          const at::Tensor& counts, const at::Tensor& pairs, const c10::optional<at::Tensor>& s13, const c10::optional<at::Tensor>& s2,
                          const c10::optional<at::Tensor>& b13, const c10::optional<at::Tensor>& b2, int64_t fmt,
                          int64_t bn, int64_t bk, int64_t act, double alpha, double limit) {
  ExpertSet experts = check_experts(w13, w2, s13, s2, b13, b2, fmt, bn, bk, act, alpha, limit,
                                    "fiddler_cpu.graph_jobs_add_layer: ");
  AsyncRunner* runner = async_runner();
  const std::shared_ptr<GraphJobs> old = runner->graph();
  FCHECK(old, "fiddler_cpu.graph_jobs_add_layer: attach the graph buffers first");
  check_x_dtype(experts, old->x.scalar_type(), "fiddler_cpu.graph_jobs_add_layer: ");
  FCHECK(slot >= 0 && slot < 0x7FFE, "fiddler_cpu.graph_jobs_add_layer: slot must be in 0..32765");
  FCHECK(chunks >= 1 && w13.size(0) % chunks == 0 && w2.size(0) == w13.size(0),
         "fiddler_cpu.graph_jobs_add_layer: chunks must divide the chunk-experts of w13 and w2");
  const int64_t K = old->slots.size(1);
  FCHECK(counts.device().is_cpu() && counts.scalar_type() == at::kLong && counts.is_contiguous() &&
             (counts.numel() == 3 || counts.numel() == 3 + (int64_t(1) << K)),
         "fiddler_cpu.graph_jobs_add_layer: counts must be int64 [3] or [3 + 2^K]");
  FCHECK(pairs.device().is_cpu() && pairs.scalar_type() == at::kLong && pairs.numel() == 1,
         "fiddler_cpu.graph_jobs_add_layer: pairs must be one int64 on the host");
  // copy on write: the job thread keeps reading the table it loaded
  auto g = std::make_shared<GraphJobs>(*old);
  if (int64_t(g->layers.size()) <= slot) g->layers.resize(size_t(slot + 1));
  g->layers[size_t(slot)] = GraphLayer{std::move(experts), counts, pairs, chunks};
  runner->set_graph(std::move(g));
}

void graph_jobs_detach() {
  async_runner()->release_graph();
  async_runner()->set_graph(nullptr);
}

void async_wait_idle() { async_runner()->wait_idle(); }
void async_cancel_ready_waits() { async_runner()->cancel_ready_waits(); }
std::string async_take_error() { return async_runner()->take_error(); }
std::vector<int64_t> async_stats() { return async_runner()->stats(); }
std::vector<int64_t> async_trace() { return async_runner()->take_trace(); }

// ---------------------------------------------------------------- stream_read
// Reads a buffer with all pool threads (the DRAM read roofline for the
// benchmark): 1 MiB chunks handed out dynamically, 64-bit loads summed.
struct ReadCtx {
  const uint64_t* p;
  int64_t n;  // words
  int64_t chunk;
  std::vector<uint64_t>* sums;
};

void body_read(void* vctx, int64_t item) {
  // 8 interleaved streams per chunk with a prefetch ahead in each (the access
  // pattern of the kernels: a single stream per core under-reports DRAM).
  auto* ctx = static_cast<ReadCtx*>(vctx);
  const int64_t b = item * ctx->chunk, e = std::min(b + ctx->chunk, ctx->n);
  const int64_t sub = (e - b) / 64 * 8;  // words per stream, a multiple of 8
  uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const uint64_t* p = ctx->p + b;
  for (int64_t i = 0; i < sub; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const uint64_t* q = p + j * sub + i;
      __builtin_prefetch(q + 128);
      acc[j] += q[0] + q[1] + q[2] + q[3] + q[4] + q[5] + q[6] + q[7];
    }
  }
  uint64_t total = 0;
  for (int j = 0; j < 8; ++j) total += acc[j];
  for (int64_t i = b + 8 * sub; i < e; ++i) total += ctx->p[i];
  (*ctx->sums)[item] = total;
}

int64_t stream_read(const at::Tensor& buf) {
  FCHECK(buf.device().is_cpu() && buf.is_contiguous(), "fiddler_cpu.stream_read: contiguous CPU tensor");
  ReadCtx ctx;
  ctx.p = static_cast<const uint64_t*>(buf.data_ptr());
  ctx.n = int64_t(buf.nbytes() / 8);
  ctx.chunk = (1 << 21) / 8;  // 2 MiB: 8 x 256 KiB streams
  std::vector<uint64_t> sums((ctx.n + ctx.chunk - 1) / ctx.chunk);
  ctx.sums = &sums;
  std::lock_guard<std::mutex> lk(g_mu);
  pool_locked()->run(int64_t(sums.size()), body_read, nullptr, &ctx);
  uint64_t total = 0;
  for (uint64_t v : sums) total += v;
  return int64_t(total);
}

}  // namespace
}  // namespace fiddler_cpu

// The ExpertSet arguments that end each async op's schema (check_experts reads them).
#define EXPERT_SET_SCHEMA \
  "Tensor? s13, Tensor? s2, Tensor? b13, Tensor? b2, int fmt, int bn, int bk, int act, float alpha, float limit"

TORCH_LIBRARY(fiddler_cpu, m) {
  m.def("stream_read(Tensor buf) -> int", &fiddler_cpu::stream_read);
  m.def("cpu_features() -> int", &fiddler_cpu::features);
  m.def("register_isa_library(str isa, str path) -> bool", &fiddler_cpu::register_isa_library);
  m.def("set_num_threads(int n) -> ()", &fiddler_cpu::set_num_threads);
  m.def("get_num_threads() -> int", &fiddler_cpu::get_num_threads);
  m.def(
      "moe_forward(Tensor x, Tensor w13, Tensor w2, Tensor topk_ids, Tensor topk_weights, Tensor(a!) out, "
      "int mode, int amx_min_tokens) -> ()");
  m.impl("moe_forward", c10::DispatchKey::CPU, TORCH_FN(fiddler_cpu::moe_forward));
  m.def("moe_forward_quant(Tensor x, Tensor w13, Tensor s13, Tensor w2, Tensor s2, Tensor? b13, Tensor? b2, "
        "Tensor topk_ids, Tensor topk_weights, Tensor(a!) out, int fmt, int bn, int bk, int act, float alpha, "
        "float limit) -> ()", &fiddler_cpu::moe_forward_quant);
  m.def("moe_forward_async(Tensor x, Tensor w13, Tensor w2, Tensor topk_ids, Tensor topk_weights, "
        "Tensor(a!) out, int mode, int amx_min_tokens, Tensor(b!) done_word, int seq, "
        EXPERT_SET_SCHEMA ") -> ()",
        &fiddler_cpu::moe_forward_async);
  m.def("moe_forward_routed_async(Tensor x, Tensor w13, Tensor w2, Tensor slots, Tensor weights, int chunks, "
        "int[] first_chunks, Tensor(a!) out, int mode, int amx_min_tokens, Tensor ready_word, Tensor(b!) done_word, int seq, "
        "Tensor(c!) counts, "
        EXPERT_SET_SCHEMA ") -> ()",
        &fiddler_cpu::moe_forward_routed_async);
  m.def("graph_jobs_attach(Tensor x, Tensor slots, Tensor weights, Tensor first, Tensor(a!) out, "
        "Tensor(b!) mark_word, Tensor(c!) done_word, int mode, int amx_min_tokens) -> ()",
        &fiddler_cpu::graph_jobs_attach);
  m.def("graph_jobs_add_layer(int slot, Tensor w13, Tensor w2, int chunks, Tensor(a!) counts, Tensor(b!) pairs, "
        EXPERT_SET_SCHEMA ") -> ()",
        &fiddler_cpu::graph_jobs_add_layer);
  m.def("graph_jobs_detach() -> ()", &fiddler_cpu::graph_jobs_detach);
  m.def("async_wait_idle() -> ()", &fiddler_cpu::async_wait_idle);
  m.def("async_cancel_ready_waits() -> ()", &fiddler_cpu::async_cancel_ready_waits);
  m.def("async_take_error() -> str", &fiddler_cpu::async_take_error);
  m.def("async_stats() -> int[]", &fiddler_cpu::async_stats);
  m.def("async_trace() -> int[]", &fiddler_cpu::async_trace);
}
