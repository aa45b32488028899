"""CPU expert kernel: one or several MoE experts' SwiGLU FFN on the CPU.

Native paths (C++, built on first use with ``torch.utils.cpp_extension.load``
and cached under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``,
per Python and torch version; a build lock left by a killed build is removed):

- ``"avx512_bf16"``: ``_mm512_dpbf16_ps``; for few tokens per expert, where the
  expert is bound by DRAM bandwidth.
- ``"amx"``: AMX tiles (``_tile_dpbf16ps``); for many tokens per expert. In
  ``auto`` mode experts with fewer than ``FIDDLER_CPU_AMX_MIN_TOKENS`` tokens
  (default 8) still use the AVX512-BF16 kernels.
- ``"torch"``: the same math through torch matmuls; used where the native
  kernels can't be built or the CPU lacks the instructions.

Quantized experts (``moe_forward_quantized``: FP8 block-scaled, MXFP4 and INT4,
with optional biases and gpt-oss's clamped SwiGLU) have their own kernels, which
need AVX512F/BW/VL only: the weights are read as stored and widened to fp32 in
registers, the activations from the model's bf16 or fp16.

Weights are used in vLLM's FusedMoE layout as loaded (no repacking); see
docs/cpu-kernel.md for the layouts, the work split and the numerics.

Environment:
  FIDDLER_CPU_ISA            auto | amx | avx512_bf16 | torch (force a path)
  FIDDLER_CPU_THREADS        worker threads (default: CPUs in the affinity mask)
  FIDDLER_CPU_AMX_MIN_TOKENS tokens per expert from which ``auto`` uses AMX
  FIDDLER_CPU_SPIN_US        how long idle workers spin before sleeping (1000)
  FIDDLER_CPU_BUILD          0 disables building the native kernels
  FIDDLER_CPU_BUILD_VERBOSE  1 shows the compiler output
  FIDDLER_CPU_AMX_EMULATE    1: on a CPU without AMX, test the AMX kernels with the
                             tile instructions emulated in scalar code (tests only)
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Sequence

import torch

__all__ = ["isa", "available_isas", "set_num_threads", "expert_ffn", "moe_forward", "moe_forward_quantized", "quantized_available"]

logger = logging.getLogger("vllm.fiddler")  # a child of vLLM's logger, as vllm_fiddler.logger

_SRC_DIR = os.path.dirname(os.path.abspath(__file__))
_ISA_ORDER = ("amx", "avx512_bf16")  # best first
_ISA_SOURCES = {"avx512_bf16": "kernel_avx512bf16.cpp", "amx": "kernel_amx.cpp",
                "avx512_quant": "kernel_quant_avx512.cpp"}
_ISA_FLAGS = {
    "avx512_quant": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mf16c"],  # F16C: every AVX-512 CPU has it
    "avx512_bf16": ["-mavx512f", "-mavx512bf16", "-mavx512bw", "-mavx512vl"],
    "amx": ["-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bf16", "-mavx512bw", "-mavx512vl"],
}
_FEATURE_BIT = {"avx512_bf16": 1, "amx": 2, "avx512_quant": 16}
_COMMON_CFLAGS = ["-O3", "-DNDEBUG"]
_MODE = {"avx512_bf16": 1, "amx_all": 2, "amx_auto": 3}

_HEADERS = ("kernel_api.h", "vec_avx512.h", "amx_emu.h")

_lock = threading.RLock()
_native: list[str] | None = None  # native ISAs loaded, best first
_quant_native = False  # the quantized-expert kernels are loaded (moe_forward_quantized)
_num_threads: int | None = None
_logged: set[str] = set()


def _log_once(level: int, key: str, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg, *args)


def _headers_flag() -> str:
    """-D flag carrying a hash of the shared headers: torch's extension cache keys on the
    sources and the flags only, so without it a header change would not rebuild."""
    h = hashlib.sha1()
    for name in _HEADERS:
        with open(os.path.join(_SRC_DIR, name), "rb") as f:
            h.update(f.read())
    return f"-DFIDDLER_CPU_HEADERS_SHA1=0x{h.hexdigest()[:12]}"


def _build_dir(name: str) -> str:
    """Where `name` is built and cached: under torch's extension root, per Python and torch."""
    from torch.utils.cpp_extension import get_default_build_root

    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}".replace("+", "_")
    return os.path.join(get_default_build_root(), tag, name)


def _build_one(name: str, source: str, extra: list[str]) -> str:
    from torch.utils.cpp_extension import load

    verbose = os.environ.get("FIDDLER_CPU_BUILD_VERBOSE", "0") not in ("", "0")
    build_dir = _build_dir(name)
    os.makedirs(build_dir, exist_ok=True)
    # torch's build lock is a plain file ("lock") that its builder deletes when done, and
    # every later load waits for it to go, even to load a finished library: a build
    # killed midway (a timed-out engine start) left one on the H100 box, and every
    # engine start after it hung silently. An flock, which the kernel drops with its
    # process, says whether a builder is alive; holding it, a "lock" file is stale.
    with open(os.path.join(build_dir, "fiddler-build.flock"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            logger.warning("vllm_fiddler CPU kernel: removing %s, left by a build that did not finish", stale)
            os.remove(stale)
        return load(
            name=name,
            sources=[os.path.join(_SRC_DIR, source)],
            extra_cflags=_COMMON_CFLAGS + [_headers_flag()] + extra,
            # Bind every symbol at load time: no lazy PLT resolution (glibc's
            # _dl_runtime_resolve saves the extended register state) in a thread
            # whose AMX tiles are live.
            extra_ldflags=["-Wl,-z,now"],
            extra_include_paths=[_SRC_DIR],
            is_python_module=False,
            build_directory=build_dir,
            verbose=verbose,
        )


def _load_native() -> list[str]:
    """Build (first time) and load the native kernels; returns the ISAs usable here."""
    global _native
    if _native is not None:
        return _native
    with _lock:
        if _native is not None:
            return _native
        loaded: list[str] = []
        try:
            loaded = _load_native_locked()
        finally:
            _native = loaded
    return _native


def _load_native_locked() -> list[str]:
    if os.environ.get("FIDDLER_CPU_BUILD", "1") == "0":
        logger.info("vllm_fiddler CPU kernel: native build disabled (FIDDLER_CPU_BUILD=0)")
        return []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        logger.info("vllm_fiddler CPU kernel: no native kernels for %s, using torch", platform.machine())
        return []
    t0 = time.perf_counter()
    try:
        if not hasattr(torch.ops.fiddler_cpu, "moe_forward"):
            _build_one("fiddler_cpu_ops", "ops.cpp", [])
        feats = int(torch.ops.fiddler_cpu.cpu_features())
    except Exception as exc:  # no compiler, no ninja, build error, ...
        logger.warning("vllm_fiddler CPU kernel: could not build the native kernels (%s: %s); using torch",
                       type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
        return []
    if feats & 4 and not feats & 2:
        logger.warning("vllm_fiddler CPU kernel: the CPU has AMX but the kernel refused XTILEDATA "
                       "(arch_prctl ARCH_REQ_XCOMP_PERM); AMX disabled")
    loaded: list[str] = []
    for name in ("avx512_bf16", "amx"):
        if not feats & _FEATURE_BIT[name]:
            continue
        if name == "amx" and "avx512_bf16" not in loaded:
            continue
        try:
            path = _build_one(f"fiddler_cpu_{name}", _ISA_SOURCES[name],
                              _ISA_FLAGS[name] + ["-fvisibility=hidden"])
            if torch.ops.fiddler_cpu.register_isa_library(name, path):
                loaded.append(name)
        except Exception as exc:
            logger.warning("vllm_fiddler CPU kernel: %s kernels unavailable (%s: %s)", name,
                           type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
    if (os.environ.get("FIDDLER_CPU_AMX_EMULATE", "0") == "1" and "amx" not in loaded
            and "avx512_bf16" in loaded):
        # Test hook: the AMX kernels with the tile instructions emulated in scalar
        # code (amx_emu.h), to test their indexing on a CPU without AMX. Slow.
        try:
            path = _build_one("fiddler_cpu_amx_emu", "kernel_amx.cpp",
                              _ISA_FLAGS["avx512_bf16"] + ["-DFIDDLER_AMX_EMULATE", "-fvisibility=hidden"])
            if torch.ops.fiddler_cpu.register_isa_library("amx_emulated", path):
                loaded.append("amx")
                logger.warning("vllm_fiddler CPU kernel: AMX tile instructions EMULATED "
                               "(FIDDLER_CPU_AMX_EMULATE=1, for tests only: slow)")
        except Exception as exc:
            logger.warning("vllm_fiddler CPU kernel: AMX emulation unavailable (%s: %s)",
                           type(exc).__name__, exc)
    global _quant_native
    if feats & _FEATURE_BIT["avx512_quant"]:
        try:
            path = _build_one("fiddler_cpu_avx512_quant", _ISA_SOURCES["avx512_quant"],
                              _ISA_FLAGS["avx512_quant"] + ["-fvisibility=hidden"])
            _quant_native = bool(torch.ops.fiddler_cpu.register_isa_library("avx512_quant", path))
        except Exception as exc:
            logger.warning("vllm_fiddler CPU kernel: quantized-expert kernels unavailable (%s: %s)", type(exc).__name__,
                           str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
    threads = _num_threads or int(os.environ.get("FIDDLER_CPU_THREADS", "0") or 0)
    if threads > 0:
        torch.ops.fiddler_cpu.set_num_threads(threads)
    logger.info("vllm_fiddler CPU kernel: native kernels %s ready in %.1f s (cpu features 0x%x, %d threads)",
                (loaded + ["avx512_quant"] * _quant_native) or "none", time.perf_counter() - t0, feats,
                torch.ops.fiddler_cpu.get_num_threads())
    return [i for i in _ISA_ORDER if i in loaded]


def available_isas() -> list[str]:
    """Paths usable on this CPU (and build), best first; always ends with "torch"."""
    return _load_native() + ["torch"]


def _resolve(requested: str | None) -> tuple[str, bool]:
    """-> (path, forced). ``requested``: an ISA path (forced), "auto" (best available, AMX
    only for experts with enough tokens), or None: FIDDLER_CPU_ISA, which defaults to auto."""
    avail = available_isas()
    if requested == "auto":
        return avail[0], False
    if requested is not None:
        if requested not in avail:
            raise ValueError(f"CPU ISA path {requested!r} is not available here (available: {avail})")
        return requested, True
    env = os.environ.get("FIDDLER_CPU_ISA", "auto").strip().lower() or "auto"
    if env == "auto":
        chosen, forced = avail[0], False
    elif env in avail:
        chosen, forced = env, True
    else:
        _log_once(logging.WARNING, f"env:{env}",
                  "vllm_fiddler CPU kernel: FIDDLER_CPU_ISA=%s is not available here (available: %s); using %s",
                  env, ", ".join(avail), avail[0])
        chosen, forced = avail[0], False
    _log_once(logging.INFO, f"isa:{chosen}:{forced}",
              "vllm_fiddler CPU kernel: using the %s path%s (available: %s)", chosen,
              " (forced by FIDDLER_CPU_ISA)" if forced else "", ", ".join(avail))
    return chosen, forced


def isa() -> str:
    """ "amx" | "avx512_bf16" | "torch": the path moe_forward uses (FIDDLER_CPU_ISA or the best one)."""
    return _resolve(None)[0]


def set_num_threads(n: int) -> None:
    """Worker threads of the native kernels (the calling thread counts as one)."""
    global _num_threads
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    with _lock:
        _num_threads = n
        if _native:  # already loaded: apply now; otherwise applied at load
            torch.ops.fiddler_cpu.set_num_threads(n)


def _get_num_threads() -> int:
    if _load_native():
        return int(torch.ops.fiddler_cpu.get_num_threads())
    return _num_threads or torch.get_num_threads()


def _amx_min_tokens() -> int:
    return max(1, int(os.environ.get("FIDDLER_CPU_AMX_MIN_TOKENS", "8") or 8))


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, *, isa: str | None = None) -> torch.Tensor:
    """One expert's SwiGLU FFN: x [T,H] bf16, w13 [2I,H] bf16, w2 [H,I] bf16 -> [T,H] fp32."""
    T = x.shape[0]
    out = torch.zeros(T, w2.shape[0], dtype=torch.float32)
    ids = torch.zeros(T, 1, dtype=torch.int32)
    wts = torch.ones(T, 1, dtype=torch.float32)
    moe_forward(x, w13.unsqueeze(0), w2.unsqueeze(0), ids, wts, out, isa=isa)
    return out


def moe_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, out: torch.Tensor, *, isa: str | None = None) -> None:
    """out[t] += sum_k topk_weights[t,k] * ffn_{topk_ids[t,k]}(x[t]) for the experts in w13/w2.

    x [T,H] bf16; w13 [Ec,2I,H] bf16; w2 [Ec,H,I] bf16 (each expert row-major; the
    Ec stride is free, so the whole host weight tensor can be passed with global
    ids); topk_ids [T,K] int32, local expert index or -1 (skipped); topk_weights
    [T,K] fp32; out [T,H] fp32, accumulated into. Experts without tokens are not read.
    The native paths release the GIL while they compute.
    """
    if x.shape[0] == 0:
        return
    topk_ids, topk_weights = topk_ids.to(torch.int32), topk_weights.float()  # no-ops when they are
    native = _native_args(x, w13, w2, topk_ids, topk_weights, isa)
    if native is None:
        _torch_moe_forward(x, w13, w2, topk_ids, topk_weights, out)
        return
    x, topk_ids, topk_weights, mode = native
    torch.ops.fiddler_cpu.moe_forward(x, w13, w2, topk_ids, topk_weights, out, mode, _amx_min_tokens())


def quantized_available() -> bool:
    """Whether moe_forward_quantized runs natively here (AVX512F/BW/VL and a build)."""
    _load_native()
    return _quant_native


_FORMAT_CODE = {"fp8_block": 0, "mxfp4": 1, "int4_group": 2, "int4_zp": 3}  # kernel_api.h kFmt*
_ACTIVATION_CODE = {"silu": 0, "swigluoai": 1}  # kernel_api.h kAct*
_HALF = (torch.bfloat16, torch.float16)  # the model dtypes the quantized kernels take x in


def moe_forward_quantized(x: torch.Tensor, w13, w2, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          out: torch.Tensor, math=None, biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
    """moe_forward for quantized experts, their weights read as stored: x [T,H] in the model's
    dtype, bf16 or fp16 (GPTQ and AWQ checkpoints run in fp16); w13 [Ec,2I,H] and w2 [Ec,H,I]
    as kernels.quant.QuantizedExperts (fp8_block, mxfp4, or int4_group / int4_zp with groups
    of a multiple of 32 and scales in x's dtype); math the expert's activation
    (kernels.reference.ExpertMath; default SiLU-gated); biases (b13 [Ec,2I], b2 [Ec,H], x's
    dtype) where math.has_bias; ids / weights / out as moe_forward. Returns False, doing
    nothing, where the native kernels are not loaded or do not take these inputs (x in
    another dtype than the experts' scales and biases, other formats): kernels.quant
    dequantizes in torch instead. Releases the GIL while it computes."""
    experts = _quantized_set(w13, w2, math, biases)
    if experts is None or not _takes_x(w13, biases, x.dtype):
        return False
    if x.shape[0]:
        w13_values, w2_values, s13, s2, b13, b2, *spec = experts
        torch.ops.fiddler_cpu.moe_forward_quant(
            x.contiguous(), w13_values, s13, w2_values, s2, b13, b2, topk_ids.to(torch.int32).contiguous(),
            topk_weights.float().contiguous(), out, *spec)
    return True


def _quantized_set(w13, w2, math, biases) -> tuple | None:
    """The native ops' expert arguments for quantized experts (kernels.quant.QuantizedExperts):
    (w13 values, w2 values, s13, s2, b13, b2, fmt, bn, bk, act, alpha, limit); None where the
    native kernels do not take them (not loaded, another format, dtypes or activation)."""
    if isinstance(w13, torch.Tensor) or w13.fmt not in _FORMAT_CODE or w2.fmt != w13.fmt \
            or not quantized_available():
        return None
    activation = getattr(math, "activation", "silu")
    if activation not in _ACTIVATION_CODE or (biases is None) == bool(getattr(math, "has_bias", False)):
        return None
    b13 = b2 = None
    if biases is not None:
        b13, b2 = biases
        if b13.dtype not in _HALF or b2.dtype != b13.dtype:
            return None
        b13, b2 = b13.contiguous(), b2.contiguous()
    block = w13.block
    if w13.fmt in ("int4_group", "int4_zp"):
        # the kernels read 16-bit float scales (x's dtype, _x_dtype): stored as such, or as the
        # 16 bits of a zero-point word (quant.scale_zero_dtype)
        group, scales = w13.group, {_int4_scale_dtype(w) for w in (w13, w2)}
        if group % 32 or w13.k % group or w2.k % group or w2.group != group or len(scales) != 1 or \
                None in scales or (b13 is not None and scales != {b13.dtype}):
            return None
        key = "weight_scale" if w13.fmt == "int4_group" else "weight_scale_zero"
        block = (1, group)
        tensors = (w13.tensors["weight_packed"], w2.tensors["weight_packed"], w13.tensors[key], w2.tensors[key])
    elif w13.fmt == "mxfp4":  # [Ec, N, K/32, 16] blocks as [Ec, N, K/2] bytes
        tensors = (w13.tensors["blocks"].flatten(-2), w2.tensors["blocks"].flatten(-2), w13.tensors["scales"],
                   w2.tensors["scales"])
    else:
        tensors = (w13.tensors["weight"], w2.tensors["weight"], w13.tensors["weight_scale_inv"],
                   w2.tensors["weight_scale_inv"])
    return (*tensors, b13, b2, _FORMAT_CODE[w13.fmt], int(block[0]), int(block[1]), _ACTIVATION_CODE[activation],
            float(getattr(math, "alpha", 0.0)), float(getattr(math, "limit", 0.0)))


def _int4_scale_dtype(w) -> torch.dtype | None:
    """The 16-bit float an INT4 set's scales are in (stored, or a zero-point word's bits); None
    where the kernels cannot read them."""
    if w.fmt == "int4_group":
        dtype = w.tensors["weight_scale"].dtype
    else:
        dtype = w.scale_dtype if w.tensors["weight_scale_zero"].dtype == torch.int32 else None
    return dtype if dtype in _HALF else None


def activation_dtypes(quantized: bool) -> tuple[torch.dtype, ...]:
    """The model dtypes whose activations the native kernels take: bf16, and fp16 too for
    quantized experts (GPTQ and AWQ checkpoints run in fp16)."""
    return _HALF if quantized else (torch.bfloat16,)


def _takes_x(w13, biases, dtype: torch.dtype) -> bool:
    """Whether quantized experts take x of `dtype`: bf16 or fp16, their scales' and biases'."""
    return dtype in _HALF and _x_dtype(w13, biases) in (None, dtype)


def _x_dtype(w13, biases) -> torch.dtype | None:
    """The dtype quantized experts take x in: their INT4 scales' and biases' (the model's;
    _quantized_set checked that they agree); None where bf16 and fp16 both do."""
    if w13.fmt in ("int4_group", "int4_zp"):
        return _int4_scale_dtype(w13)
    return None if biases is None else biases[0].dtype


def _expert_set(w13, w2, math, biases) -> tuple | None:
    """The async ops' expert arguments: _quantized_set's for quantized experts; bf16 ones as
    (w13, w2, no scales or biases, SiLU), where math is plain SiLU-gated (moe_forward's); None
    where no native kernel takes them."""
    if not isinstance(w13, torch.Tensor):
        return _quantized_set(w13, w2, math, biases)
    if biases is not None or getattr(math, "activation", "silu") != "silu" or getattr(math, "has_bias", False):
        return None
    return w13, w2, None, None, None, None, 0, 0, 0, _ACTIVATION_CODE["silu"], 0.0, 0.0


def takes_jobs(w13, w2, math=None, biases: tuple[torch.Tensor, torch.Tensor] | None = None,
               x_dtype: torch.dtype | None = None) -> bool:
    """Whether the native job thread runs these experts (moe_forward_async, routed jobs, graph
    steps) on activations of `x_dtype` (None: the dtype they need): bf16 SiLU-gated ones where
    the bf16 kernels are loaded, bf16 x; quantized ones where moe_forward_quantized takes them,
    bf16 or fp16 x as their scales and biases are."""
    if _expert_set(w13, w2, math, biases) is None:
        return False
    if isinstance(w13, torch.Tensor):
        return isa() != "torch" and w13.dtype == torch.bfloat16 and x_dtype in (None, *activation_dtypes(False))
    return x_dtype is None or _takes_x(w13, biases, x_dtype)


def _async_args(x, w13, w2, topk_ids, topk_weights, math, biases, isa) -> tuple | None:
    """(x, topk_ids, topk_weights, mode, expert arguments) for the async ops, or None where no
    native kernel takes these experts (bf16 ones need the bf16 kernels, quantized ones the
    quantized kernels)."""
    experts = _expert_set(w13, w2, math, biases)
    if experts is None:
        return None
    if isinstance(w13, torch.Tensor):  # bf16
        native = _native_args(x, w13, w2, topk_ids, topk_weights, isa)
        return None if native is None else (*native, experts)
    # quantized: x in the experts' dtype (the model's); the bf16 kernels' mode is not read
    dtype = _x_dtype(w13, biases) or (x.dtype if x.dtype in _HALF else torch.bfloat16)
    x = x if x.dtype == dtype and x.stride(-1) == 1 else x.to(dtype).contiguous()
    return x, topk_ids.to(torch.int32), topk_weights.float(), _MODE["avx512_bf16"], experts


def moe_forward_async(x: torch.Tensor, w13, w2, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      out: torch.Tensor, done_word: torch.Tensor, seq: int, *, math=None,
                      biases: tuple[torch.Tensor, torch.Tensor] | None = None, isa: str | None = None) -> bool:
    """``out = moe_forward(...)`` (zeroed first) on the native job thread, in submission order;
    when the job is done (or failed: see async_take_error) its thread stores `seq` (mod 2^32)
    into `done_word` (one int32, pinned for a CUDA stream to wait on). w13 / w2 are bf16 tensors
    (SiLU-gated, no biases) or kernels.quant.QuantizedExperts (math and biases as
    moe_forward_quantized's). Returns at once, True; or False without doing anything when no
    native kernel takes these inputs (the caller runs them itself). The inputs must stay
    unchanged until the job is done."""
    native = _async_args(x, w13, w2, topk_ids, topk_weights, math, biases, isa)
    if native is None or not out.is_contiguous():
        return False
    x, topk_ids, topk_weights, mode, experts = native
    w13_values, w2_values, *rest = experts
    torch.ops.fiddler_cpu.moe_forward_async(x, w13_values, w2_values, topk_ids, topk_weights, out, mode,
                                            _amx_min_tokens(), done_word, seq, *rest)
    return True


def moe_forward_routed_async(x: torch.Tensor, w13, w2, slots: torch.Tensor,
                             weights: torch.Tensor, chunks: int, out: torch.Tensor, ready_word: torch.Tensor,
                             done_word: torch.Tensor, seq: int, counts: torch.Tensor,
                             *, first_chunks: Sequence[int] | None = None, math=None,
                             biases: tuple[torch.Tensor, torch.Tensor] | None = None, isa: str | None = None) -> bool:
    """moe_forward_async for a job whose routing is not there yet: the job thread first waits
    until `ready_word` (one pinned int32, which a CUDA stream writes after copying the routing
    down) reaches `seq` (cyclically), then reads slots [T, K] (host slot or -1, int32) and
    weights [T, K] (fp32), runs each host slot's chunk-experts first_chunks[k]..chunks-1 of
    w13 / w2 (slot s chunk c = chunk-expert s * chunks + c; k the pair's top-k position; the
    chunks below are left to the GPU; None: all of them on the CPU), adds to `counts` (int64
    [3]) the (token, k) pairs of host slots, the distinct chunk-experts below first_chunks of
    those (what the GPU streams) and the distinct ones from there on (what the CPU reads),
    and with `counts` of 3 + 2^K entries (K <= 12) each token at 3 + its cold-position mask
    (bit k set: the pair (t, k) is on the host), and stores `seq` into `done_word`. Experts,
    math and biases as moe_forward_async's. Returns True, or False without doing anything when
    no native kernel takes these inputs. A job whose word does not come within 60 s, or that
    async_cancel_ready_waits cancels, fails (async_take_error) and still stores done_word."""
    # the inputs are read when the routing has landed, so they must be taken as they are:
    # a converted copy made now would hold what the buffers held before the copy
    if not (x.dtype in _HALF and x.stride(-1) == 1 and slots.dtype == torch.int32
            and weights.dtype == torch.float32 and slots.is_contiguous() and weights.is_contiguous()
            and out.is_contiguous()):
        return False
    native = _async_args(x, w13, w2, slots, weights, math, biases, isa)
    if native is None or native[0] is not x:  # x in a dtype these experts do not take
        return False
    mode, (w13_values, w2_values, *rest) = native[3], native[4]
    first = list(first_chunks) if first_chunks is not None else [0] * slots.shape[1]
    torch.ops.fiddler_cpu.moe_forward_routed_async(x, w13_values, w2_values, slots, weights, chunks, first, out,
                                                   mode, _amx_min_tokens(), ready_word, done_word, seq, counts,
                                                   *rest)
    return True


def graph_jobs_attach(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, first: torch.Tensor,
                      out: torch.Tensor, mark_word: torch.Tensor, done_word: torch.Tensor,
                      *, isa: str | None = None) -> bool:
    """Graph steps (vllm_fiddler.runtime.graph_jobs): the native job thread serves routed steps
    that a CUDA graph hands it without any Python. The graph fills rows [:T] of x [N, H] (bf16;
    fp16 where every layer's experts are quantized ones of an fp16 model),
    slots [N, K] (host slot or -1, int32), weights [N, K] (fp32) and first [K] (int32, per top-k
    position the chunks below it are the GPU's), then writes ((layer slot + 1) << 16) | T into
    mark_word (one pinned int32). The thread clears mark_word, runs the layer's cold chunk-experts
    (graph_jobs_add_layer) into out[:T] (fp32, zeroed first), counts them as
    moe_forward_routed_async does, and sets done_word to 1, which the graph waits for and
    clears. Replaces buffers attached before, and their layers. False (nothing attached) where
    no native kernel takes bf16 experts."""
    path, forced = _resolve(isa)
    if path == "torch" or x.dtype not in _HALF:
        return False
    mode = _native_mode(path, forced)
    torch.ops.fiddler_cpu.graph_jobs_attach(x, slots, weights, first, out, mark_word, done_word, mode,
                                            _amx_min_tokens())
    return True


def graph_jobs_add_layer(slot: int, w13, w2, chunks: int, counts: torch.Tensor, pairs: torch.Tensor, *,
                         math=None, biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The experts of layer slot `slot` of the attached graph steps: host chunk-experts w13 / w2
    (slot s chunk c = chunk-expert s * chunks + c; bf16, or quantized with math and biases as
    moe_forward_async's), its counts (int64 [3] or [3 + 2^K], as moe_forward_routed_async's)
    and pairs (int64 [1]: (token, k) pairs its jobs saw). Raises ValueError where no native
    kernel takes these experts."""
    experts = _expert_set(w13, w2, math, biases)
    if experts is None:
        raise ValueError("fiddler: no native CPU kernel takes these experts for graph steps")
    w13_values, w2_values, *rest = experts
    torch.ops.fiddler_cpu.graph_jobs_add_layer(slot, w13_values, w2_values, chunks, counts, pairs, *rest)


def graph_jobs_detach() -> None:
    """No more graph steps: a stream waiting for one goes on, the job thread stops polling."""
    if _native:
        torch.ops.fiddler_cpu.graph_jobs_detach()


def async_cancel_ready_waits() -> None:
    """Routed jobs still waiting for their routing give up (shutdown)."""
    if _native:
        torch.ops.fiddler_cpu.async_cancel_ready_waits()


def async_wait_idle() -> None:
    """Blocks until every moe_forward_async job submitted so far is done."""
    if _native:
        torch.ops.fiddler_cpu.async_wait_idle()


def async_take_error() -> str:
    """The first failure of a moe_forward_async job since the last call ('' if none); clears it."""
    return str(torch.ops.fiddler_cpu.async_take_error()) if _native else ""


def async_stats() -> tuple[int, float, float, float]:
    """moe_forward_async jobs so far: (count, seconds computing, seconds queued behind earlier
    jobs, seconds routed jobs then waited for their routing)."""
    if not _native:
        return 0, 0.0, 0.0, 0.0
    jobs, busy_ns, queue_ns, routing_wait_ns = list(torch.ops.fiddler_cpu.async_stats())[:4]
    return int(jobs), busy_ns * 1e-9, queue_ns * 1e-9, routing_wait_ns * 1e-9


ASYNC_TRACE_FIELDS = ("submitted", "started", "done", "picked", "cpu_chunk_experts")


def graph_jobs_served() -> int:
    """Graph steps' jobs the native job thread ran so far (graph_jobs_attach)."""
    return int(torch.ops.fiddler_cpu.async_stats()[4]) if _native else 0


def async_trace() -> list[tuple[int, ...]]:
    """The moe_forward_async jobs done since the last call, oldest first (the last 8192 at most):
    ASYNC_TRACE_FIELDS each. Times in time.perf_counter_ns() units (CLOCK_MONOTONIC); picked:
    the job thread took the job, and a routed job waited from then until started for its
    routing; cpu_chunk_experts: the (expert, chunk) pairs a routed job ran on the CPU."""
    if not _native:
        return []
    flat = list(torch.ops.fiddler_cpu.async_trace())
    n = len(ASYNC_TRACE_FIELDS)
    return [tuple(flat[i:i + n]) for i in range(0, len(flat), n)]


def _native_args(x, w13, w2, topk_ids, topk_weights, isa):
    """(x, topk_ids, topk_weights, mode) as the native op takes them, or None for the torch path
    (also for quantized experts, which moe_forward_quantized takes)."""
    if not isinstance(w13, torch.Tensor):
        return None
    path, forced = _resolve(isa)
    if path != "torch" and (w13.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16):
        _log_once(logging.WARNING, f"dtype:{w13.dtype}",
                  "vllm_fiddler CPU kernel: native kernels need bf16 weights, got %s; using torch", w13.dtype)
        path = "torch"
    if path == "torch":
        return None
    if topk_ids.dtype != torch.int32:
        topk_ids = topk_ids.to(torch.int32)
    if topk_weights.dtype != torch.float32:
        topk_weights = topk_weights.float()
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, topk_ids, topk_weights, _native_mode(path, forced)


def _native_mode(path: str, forced: bool) -> int:
    """The native op's ISA mode for a resolved (non-torch) path."""
    return _MODE["avx512_bf16"] if path == "avx512_bf16" else _MODE["amx_all" if forced else "amx_auto"]


def _torch_moe_forward(x, w13, w2, topk_ids, topk_weights, out) -> None:
    """The same math through torch bf16 matmuls (gate/up, activation and down rounded to bf16)."""
    from vllm_fiddler.kernels.torch_moe import moe_forward

    moe_forward(x, w13, w2, topk_ids, topk_weights, out)