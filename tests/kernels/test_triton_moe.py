"""Tests of the Triton fused-MoE kernel (vllm_fiddler.kernels.triton) against the fp32 oracle.

Two halves:

- CPU, always: the kernels run under Triton's interpreter (TRITON_INTERPRET=1)
  on small shapes. The interpreter must be chosen before triton is first
  imported, and the rest of the suite may already have imported it in this
  process, so these cases run in ONE subprocess (this file run as a script
  with --interpret-worker) whose results the parametrised tests read.
- CUDA, when a GPU is there: bf16/fp16/fp32 on Mixtral-like and odd shapes.

Every case poisons `out` with NaN first, so an element the kernels fail to
write (a token whose every slot is -1 must come out as zeros) fails the test.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

# ----------------------------------------------------------------------------
# Cases and tolerances
# ----------------------------------------------------------------------------

# Tolerances, as (max |out - ref| / max |ref|, ||out - ref|| / ||ref||):
# - fp32 (interpreter: tl.dot is numpy's fp32 matmul; GPU: input_precision
#   "ieee", no tf32): only summation order differs from torch's fp32 oracle,
#   ~1e-7 relative per element, so 1e-5 is tight yet robust.
# - fp16 (10-bit mantissa): x and the weights are rounded to fp16 BEFORE the
#   oracle sees them, so what remains is the kernel's own rounding: the
#   SwiGLU activation is stored in fp16 for the second GEMM (2^-11 relative)
#   and the output is rounded to fp16 (2^-11); accumulation is fp32. Errors of
#   a few 1e-4 relative, checked at 4e-3 / 2e-3.
# - bf16 (7-bit mantissa): the same two roundings at 2^-8 each: ~3e-3 relative
#   in norm, single elements up to ~1e-2 of the largest; checked at 2e-2 / 1e-2.
TOL = {
    "fp32": (1e-5, 1e-5),
    "fp16": (4e-3, 2e-3),
    "bf16": (2e-2, 1e-2),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Small tiles for the interpreter, so that several tiles and K-loop steps run
# and the masks on ragged edges (H=40, I=72) are exercised.
SMALL_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)

# (name, T, H, I, E, K, dtype, ids mode, config or None)
# ids modes: "route" = the router's top-k; "neg" = every third token's first
# slot and every fifth token's second slot are -1 (cold experts); "empty" =
# expert 1 gets no token; "allneg" = every slot is -1 (output all zeros);
# "int32" = route, with int32 ids.
INTERP_CASES = [
    ("T0", 0, 64, 96, 4, 2, "fp32", "route", SMALL_CONFIG),
    ("T1", 1, 64, 96, 4, 2, "fp32", "route", SMALL_CONFIG),
    ("T7", 7, 64, 96, 4, 2, "fp32", "route", SMALL_CONFIG),
    ("T33", 33, 64, 96, 4, 2, "fp32", "route", SMALL_CONFIG),
    ("T33_odd", 33, 40, 72, 4, 2, "fp32", "route", SMALL_CONFIG),
    ("T7_odd_neg", 7, 40, 72, 4, 2, "fp32", "neg", SMALL_CONFIG),
    ("T33_neg", 33, 64, 96, 4, 2, "fp32", "neg", SMALL_CONFIG),
    ("T33_empty_expert", 33, 64, 96, 4, 2, "fp32", "empty", SMALL_CONFIG),
    ("T7_allneg", 7, 64, 96, 4, 2, "fp32", "allneg", SMALL_CONFIG),
    ("T33_int32_ids", 33, 64, 96, 4, 2, "fp32", "int32", SMALL_CONFIG),
    ("T33_K1_bm32", 33, 64, 96, 4, 1, "fp32", "neg",
     dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=1)),
    ("T33_default_config", 33, 40, 72, 4, 2, "fp32", "neg", None),
    ("T7_odd_bn_down", 7, 40, 72, 4, 2, "fp32", "neg", dict(SMALL_CONFIG, BLOCK_N_DOWN=16)),
    ("T33_chunked", 33, 64, 96, 4, 2, "fp32", "neg", SMALL_CONFIG),  # CHUNK_TOKENS=8: 5 chunks
    ("T33_fp16", 33, 64, 96, 4, 2, "fp16", "neg", SMALL_CONFIG),
    # bf16 is not run under the interpreter: its tl.dot on bf16 operands is
    # wrong in triton 3.6's interpreter (numpy has no bf16); it runs on CUDA.
]

# Quantized experts and gpt-oss's expert math: a 10th element says how the case's weights are
# stored (kernels.quant's quantizers; the oracle gets the same weights dequantized), the
# activation and whether experts carry biases. In fp32 a dequantized weight is exact in both
# (an e4m3 or e2m1 value, or a small integer, times a scale), so the fp32 tolerance holds.
FP8_128 = dict(fmt="fp8_block", block=(128, 128))
MXFP4_OAI = dict(fmt="mxfp4", act="swigluoai", bias=True)
QUANT_INTERP_CASES = [
    ("q_fp8_T7_neg", 7, 256, 128, 4, 2, "fp32", "neg", SMALL_CONFIG, FP8_128),
    ("q_fp8_b32_odd_T33_empty", 33, 80, 96, 5, 3, "fp32", "empty", SMALL_CONFIG,
     dict(fmt="fp8_block", block=(32, 32))),  # H=80: a partial scale block and a K tail
    ("q_mxfp4_T1", 1, 64, 64, 4, 2, "fp32", "route", SMALL_CONFIG, dict(fmt="mxfp4")),
    ("q_mxfp4_oai_bias_T7_neg", 7, 96, 160, 4, 2, "fp32", "neg", SMALL_CONFIG, MXFP4_OAI),
    ("q_mxfp4_oai_bias_T33_bk64", 33, 96, 160, 4, 2, "fp32", "route",
     dict(SMALL_CONFIG, BLOCK_K=64), MXFP4_OAI),
    ("q_int4_g32_T33_neg", 33, 64, 96, 4, 2, "fp32", "neg", SMALL_CONFIG, dict(fmt="int4_group", group=32)),
    ("q_int4_g8_odd_T7_empty", 7, 40, 72, 4, 2, "fp32", "empty", SMALL_CONFIG, dict(fmt="int4_group", group=8)),
    ("q_int4_T7_allneg", 7, 64, 96, 4, 2, "fp32", "allneg", SMALL_CONFIG, dict(fmt="int4_group", group=32)),
    ("q_int4zp_g32_T33_neg", 33, 64, 96, 4, 2, "fp32", "neg", SMALL_CONFIG, dict(fmt="int4_zp", group=32)),
    ("q_int4zp_g8_odd_T7_fp16", 7, 40, 72, 4, 2, "fp16", "empty", SMALL_CONFIG, dict(fmt="int4_zp", group=8)),
    ("dense_oai_bias_T7_neg", 7, 40, 72, 4, 2, "fp32", "neg", SMALL_CONFIG,
     dict(fmt=None, act="swigluoai", bias=True)),
    ("dense_silu_bias_T33_K1", 33, 64, 96, 4, 1, "fp32", "neg", SMALL_CONFIG, dict(fmt=None, bias=True)),
]
INTERP_CASES += QUANT_INTERP_CASES

MIXTRAL = dict(H=4096, I=14336, E=8, K=2)
CUDA_CASES = [
    # (name, T, H, I, E, K, dtype, ids mode, config or None)
    *[(f"mixtral_T{T}", T, MIXTRAL["H"], MIXTRAL["I"], MIXTRAL["E"], MIXTRAL["K"], "bf16", "route", None)
      for T in (1, 16, 333, 2048)],
    ("mixtral_T64_neg", 64, 4096, 14336, 8, 2, "bf16", "neg", None),
    ("mixtral_Eg3_T100_empty", 100, 4096, 14336, 3, 2, "bf16", "empty", None),
    ("odd_T33_bf16", 33, 40, 72, 4, 2, "bf16", "neg", None),
    ("odd_T257_bf16", 257, 200, 328, 5, 2, "bf16", "neg", None),
    ("odd_T7_allneg", 7, 200, 328, 5, 2, "bf16", "allneg", None),
    ("odd_T0", 0, 200, 328, 5, 2, "bf16", "route", None),
    ("odd_T129_fp16_K3", 129, 136, 264, 6, 3, "fp16", "neg", None),
    ("odd_T65_fp32", 65, 136, 264, 6, 2, "fp32", "neg", None),
    ("small_T33_bf16_smallcfg", 33, 64, 96, 4, 2, "bf16", "empty", SMALL_CONFIG),
    ("mixtral_Eg4_T1_bn_down16", 1, 4096, 14336, 4, 2, "bf16", "neg",
     dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4, BLOCK_N_DOWN=16)),
    # quantized experts in bf16: gpt-oss-120b's MXFP4 experts, DeepSeek-V3's FP8 ones, INT4 W4A16
    *[(f"gptoss_mxfp4_T{T}", T, 2880, 2880, 8, 4, "bf16", "route", None, MXFP4_OAI) for T in (1, 16, 300)],
    ("gptoss_mxfp4_T7_neg", 7, 2880, 2880, 8, 4, "bf16", "neg", None, MXFP4_OAI),
    *[(f"dsv3_fp8_T{T}", T, 7168, 2048, 8, 8, "bf16", "route", None, FP8_128) for T in (1, 64)],
    *[(f"int4_g128_T{T}", T, 2048, 768, 16, 8, "bf16", "neg", None, dict(fmt="int4_group", group=128))
      for T in (1, 100)],
    ("odd_fp8_T33", 33, 200, 256, 5, 2, "bf16", "neg", None, FP8_128),
    ("odd_int4_g32_T33", 33, 224, 96, 5, 2, "bf16", "empty", None, dict(fmt="int4_group", group=32)),
    *[(f"int4zp_g128_T{T}", T, 2048, 768, 16, 8, "bf16", "neg", None, dict(fmt="int4_zp", group=128))
      for T in (1, 100)],
    ("odd_int4zp_g32_T33_fp16", 33, 224, 96, 5, 2, "fp16", "empty", None, dict(fmt="int4_zp", group=32)),
    ("odd_dense_oai_bias_T33", 33, 200, 328, 5, 2, "bf16", "neg", None, dict(fmt=None, act="swigluoai", bias=True)),
]


# Routing-metadata cases: (T, E, K, block_m); the last has E not a power of two and K=6.
ALIGN_CASES = [(0, 4, 2, 16), (1, 4, 2, 16), (7, 4, 2, 16), (33, 4, 2, 16), (100, 8, 2, 64),
               (5, 16, 2, 16), (1000, 8, 2, 32), (70, 40, 6, 16)]


def align_ids(T, E, K, mode):
    g = torch.Generator().manual_seed(T * 31 + E)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.int64)
    if mode == "neg" and T:
        ids[::2, 0] = -1
        ids[1::7, -1] = E + 3  # out of range: dropped too
    if mode == "allneg":
        ids[:] = -1
    return ids


def make_inputs(T, H, I, E, K, dtype, mode, device, seed=0):
    """Random inputs scaled so that the output is O(1); ids per `mode`."""
    from vllm_fiddler.kernels import reference

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, generator=g, device=device)
    w13 = torch.randn(E, 2 * I, H, generator=g, device=device) / H**0.5
    w2 = torch.randn(E, H, I, generator=g, device=device) / I**0.5
    logits = torch.randn(T, E, generator=g, device=device)
    if mode == "empty":
        logits[:, 1] = -1e9  # expert 1 is never in the top-k
    topk_weights, topk_ids = reference.route(logits, K)
    if mode == "neg":
        topk_ids[::3, 0] = -1
        if K > 1:
            topk_ids[::5, 1] = -1
    elif mode == "allneg":
        topk_ids[:] = -1
    elif mode == "int32":
        topk_ids = topk_ids.to(torch.int32)
    dt = DTYPES[dtype]
    return (x.to(device, dt), w13.to(device, dt), w2.to(device, dt),
            topk_weights.to(device), topk_ids.to(device))


def quantize(w: torch.Tensor, quant: dict, dtype: torch.dtype):
    """[E, N, K] weights in the case's stored format (a kernels.quant.QuantizedExperts
    dequantizing to `dtype`), or w itself for dense cases."""
    from vllm_fiddler.kernels.quant import QuantizedExperts

    if quant.get("fmt") is None:
        return w
    return QuantizedExperts.quantize(quant["fmt"], w, dtype, block=quant.get("block", (128, 128)),
                                     group=quant.get("group", 128))


def run_case(case, device):
    """Runs one case; returns errors relative to the fp32 oracle on the same (rounded) inputs."""
    from vllm_fiddler.kernels import reference
    from vllm_fiddler.kernels.triton import fused_moe

    import importlib

    fm = importlib.import_module("vllm_fiddler.kernels.triton.fused_moe")
    name, T, H, I, E, K, dtype, mode, config = case[:9]
    quant = case[9] if len(case) > 9 else {}
    x, w13, w2, tw, ti = make_inputs(T, H, I, E, K, dtype, mode, device)
    math = reference.ExpertMath(activation=quant.get("act", "silu"), has_bias=quant.get("bias", False))
    b13 = b2 = None
    if math.has_bias:
        g = torch.Generator(device=device).manual_seed(7)
        b13 = (0.1 * torch.randn(E, 2 * I, generator=g, device=device)).to(x.dtype)
        b2 = (0.1 * torch.randn(E, H, generator=g, device=device)).to(x.dtype)
    w13, w2 = quantize(w13, quant, x.dtype), quantize(w2, quant, x.dtype)
    out = torch.full((T, H), float("nan"), dtype=x.dtype, device=device)
    chunk = fm.CHUNK_TOKENS
    if name.endswith("_chunked"):
        fm.CHUNK_TOKENS = 8  # long prefills are split into chunks: exercise that on a small T
    try:
        res = fused_moe(x, w13, w2, tw, ti, out=out, config=config, math=math, b13=b13, b2=b2)
    finally:
        fm.CHUNK_TOKENS = chunk
    assert res is out
    if quant.get("fmt"):  # the oracle reads the same weights, dequantized in fp32
        w13, w2 = (w.to_dtype(torch.float32).dequantized() for w in (w13, w2))
    # fp32; slots with id -1 match no expert
    ref = reference.moe(x, w13, w2, tw, ti, math, b13, b2)
    if T == 0:
        return dict(max_rel=0.0, norm_rel=0.0, nonfinite=0, allneg_nonzero=0, shape=list(res.shape))
    err = (res.float() - ref).abs()
    scale = ref.abs().max().clamp_min(1e-30)
    return dict(
        max_rel=(err.max() / scale).item() if mode != "allneg" else 0.0,
        norm_rel=(torch.linalg.vector_norm(err) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()
        if mode != "allneg" else 0.0,
        nonfinite=int((~torch.isfinite(res)).sum().item()),
        allneg_nonzero=int((res != 0).sum().item()) if mode == "allneg" else 0,
        shape=list(res.shape),
    )


def check(case, r):
    name, T, H, I, E, K, dtype, mode, config = case[:9]
    assert "error" not in r, f"{name}: {r.get('error')}"
    assert r["shape"] == [T, H]
    assert r["nonfinite"] == 0, f"{name}: {r['nonfinite']} elements not written (NaN poison) or inf"
    assert r["allneg_nonzero"] == 0, f"{name}: all slots -1 must give zeros"
    max_tol, norm_tol = TOL[dtype]
    assert r["max_rel"] <= max_tol, f"{name}: max error {r['max_rel']:.3g} > {max_tol} of max|ref|"
    assert r["norm_rel"] <= norm_tol, f"{name}: norm error {r['norm_rel']:.3g} > {norm_tol}"


# ----------------------------------------------------------------------------
# CPU: Triton's interpreter, in a subprocess
# ----------------------------------------------------------------------------


def _interpreter_worker() -> None:
    """Runs INTERP_CASES under TRITON_INTERPRET=1 and prints one JSON line of results."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET was set"
    import warnings

    # numpy >= 2.5 raises where older numpy warns (int() of a 1-element 1-D
    # array, which triton's interpreter does): fail here the same way.
    warnings.filterwarnings("error", message="Conversion of an array with ndim > 0")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results = {}
    for case in INTERP_CASES:
        try:
            results[case[0]] = run_case(case, "cpu")
        except Exception as e:  # reported per case by the parent
            results[case[0]] = {"error": f"{type(e).__name__}: {e}"}
    for T, E, K, block_m in ALIGN_CASES:
        for mode in ("route", "neg", "allneg"):
            try:
                results[f"align-{T}-{E}-{K}-{block_m}-{mode}"] = compare_align(T, E, K, block_m, mode, "cpu")
            except Exception as e:
                results[f"align-{T}-{E}-{K}-{block_m}-{mode}"] = f"{type(e).__name__}: {e}"
    print("RESULTS " + json.dumps(results))


@functools.lru_cache(maxsize=None)
def _interpreter_results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    # The child finds vllm_fiddler the way this process did (installed or via PYTHONPATH).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpret-worker"],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"interpreter worker failed (rc {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("case", INTERP_CASES, ids=[c[0] for c in INTERP_CASES])
def test_interpreter_matches_oracle(case):
    pytest.importorskip("triton")
    check(case, _interpreter_results()[case[0]])


def compare_align(T, E, K, block_m, mode, device) -> str:
    """'ok', or what differs between the align kernel and its torch twin (on the used part)."""
    from vllm_fiddler.kernels.triton import moe_align_block_size, moe_align_block_size_torch

    ids = align_ids(T, E, K, mode).to(device)
    a_ids, a_exp, a_n = moe_align_block_size(ids, block_m, E)
    b_ids, b_exp, b_n = moe_align_block_size_torch(ids, block_m, E)
    used = int(b_n.item())
    if a_ids.shape != b_ids.shape or a_exp.shape != b_exp.shape:
        return f"shapes {a_ids.shape}/{a_exp.shape} vs {b_ids.shape}/{b_exp.shape}"
    if int(a_n.item()) != used:
        return f"num_tokens_post_padded {int(a_n.item())} != {used}"
    if not torch.equal(a_ids[:used], b_ids[:used]):
        return "sorted_token_ids differ"
    if not torch.equal(a_exp[:used // block_m], b_exp[:used // block_m]):
        return "expert_ids differ"
    return "ok"


@pytest.mark.parametrize("T,E,K,block_m", ALIGN_CASES)
@pytest.mark.parametrize("mode", ["route", "neg", "allneg"])
def test_interpreter_align_kernel_matches_torch(T, E, K, block_m, mode):
    pytest.importorskip("triton")
    assert _interpreter_results()[f"align-{T}-{E}-{K}-{block_m}-{mode}"] == "ok"


# ----------------------------------------------------------------------------
# CPU: routing metadata and configs (torch only; nothing is compiled)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,K,block_m", ALIGN_CASES)
@pytest.mark.parametrize("mode", ["route", "neg", "allneg"])
def test_moe_align_block_size_torch(T, E, K, block_m, mode):
    """The torch twin of the align kernel (the kernel itself is checked against it in the worker)."""
    pytest.importorskip("triton")
    from vllm_fiddler.kernels.triton import moe_align_block_size_torch

    ids = align_ids(T, E, K, mode)
    S = T * K
    sorted_ids, expert_ids, npp = moe_align_block_size_torch(ids, block_m, E)
    em = sorted_ids.numel()
    assert em % block_m == 0 and expert_ids.numel() == em // block_m
    used = int(npp.item())
    assert used % block_m == 0 and used <= em
    flat = ids.reshape(-1)
    # Every valid slot appears exactly once, within a tile of its own expert.
    seen = []
    for b in range(used // block_m):
        e = int(expert_ids[b])
        assert 0 <= e < E
        for s in sorted_ids[b * block_m:(b + 1) * block_m].tolist():
            if s < S:
                assert int(flat[s]) == e
                seen.append(s)
            else:
                assert s == S  # padding sentinel
    valid = sorted(i for i in range(S) if 0 <= int(flat[i]) < E)
    assert sorted(seen) == valid
    assert (sorted_ids[used:] == S).all() and (expert_ids[used // block_m:] == -1).all()
    # Padding: exactly ceil(count / block_m) tiles per expert.
    counts = torch.bincount(flat[(flat >= 0) & (flat < E)], minlength=E)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())


def test_get_config_lookup(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    import importlib

    fm = importlib.import_module("vllm_fiddler.kernels.triton.fused_moe")
    keys = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
    # No file: the default, for any device name (or none).
    for T in (1, 64, 4096):
        cfg = fm.get_config(T, 8, 4096, 14336, 2, torch.bfloat16, None)
        assert keys <= set(cfg)
    # A file for E=8: the nearest token bucket; another E of the same N falls back to it.
    name = fm.config_file_name(8, 14336, "Fake GPU", torch.bfloat16)
    assert name == "E=8,N=14336,device_name=Fake_GPU,dtype=bf16.json"
    table = {"1": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=5),
             "256": dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=8,
                         num_warps=8, num_stages=3)}
    (tmp_path / name).write_text(json.dumps(table))
    monkeypatch.setattr(fm, "CONFIG_DIR", str(tmp_path))
    fm._load_config_table.cache_clear()
    try:
        assert fm.get_config(2, 8, 4096, 14336, 2, torch.bfloat16, "Fake GPU")["BLOCK_K"] == 256
        assert fm.get_config(1000, 8, 4096, 14336, 2, "bf16", "Fake_GPU")["BLOCK_M"] == 64  # vLLM keys
        assert fm.get_config(2, 5, 4096, 14336, 2, torch.bfloat16, "Fake GPU")["BLOCK_K"] == 256
        assert fm.get_config(2, 8, 4096, 14336, 2, torch.float16, "Fake GPU") == fm.default_config(2, 8, 2)
        # quantized experts read their format's table, never the bf16 one (their tiles decode in
        # registers); without one, the default
        from vllm_fiddler.kernels.quant import QuantizedExperts

        mx = QuantizedExperts.quantize("mxfp4", torch.randn(1, 64, 64))
        assert fm.config_kind(mx, torch.bfloat16) == "mxfp4"
        assert fm.config_kind(torch.empty(1, 2, 2, dtype=torch.bfloat16), torch.bfloat16) == "bf16"
        assert fm.get_config(2, 8, 4096, 14336, 2, "mxfp4", "Fake GPU") == fm.default_config(2, 8, 2)
        mx_name = fm.config_file_name(8, 14336, "Fake GPU", "mxfp4")
        assert mx_name == "E=8,N=14336,device_name=Fake_GPU,dtype=mxfp4.json"
        (tmp_path / mx_name).write_text(json.dumps({"1": dict(table["1"], BLOCK_K=64)}))
        fm._load_config_table.cache_clear()
        assert fm.get_config(2, 8, 4096, 14336, 2, "mxfp4", "Fake GPU")["BLOCK_K"] == 64
        # fp32 defaults are shrunk to fit shared memory.
        cfg32 = fm.get_config(65, 6, 136, 264, 2, torch.float32, None)
        smem = (cfg32["num_stages"] - 1) * (cfg32["BLOCK_M"] * cfg32["BLOCK_K"]
                                            + 2 * cfg32["BLOCK_K"] * cfg32["BLOCK_N"]) * 4
        assert smem <= 160 * 1024
    finally:
        fm._load_config_table.cache_clear()


def test_shipped_config_files_parse():
    pytest.importorskip("triton")
    import importlib

    fm = importlib.import_module("vllm_fiddler.kernels.triton.fused_moe")
    if not os.path.isdir(fm.CONFIG_DIR):
        pytest.skip("no configs folder")
    for name in sorted(os.listdir(fm.CONFIG_DIR)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(fm.CONFIG_DIR, name)) as f:
            table = json.load(f)
        assert name.startswith("E=") and ",N=" in name and ",device_name=" in name and ",dtype=" in name
        for m, cfg in table.items():
            int(m)
            for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_N_DOWN"):
                v = cfg.get(k, cfg.get(k.replace("BLOCK_", "BLOCK_SIZE_")))
                if v is None and k == "BLOCK_N_DOWN":
                    continue
                assert v >= 16 and v & (v - 1) == 0, f"{name}[{m}].{k} = {v}"
            assert cfg["num_warps"] in (1, 2, 4, 8, 16) and 1 <= cfg["num_stages"] <= 8


@pytest.mark.parametrize("Eg,I,K,device_name", [
    (8, 14336, 2, "NVIDIA_H100_80GB_HBM3"),  # the shipped Mixtral table
    (3, 14336, 2, "NVIDIA_H100_80GB_HBM3"),  # another E: the nearest table (E=4)
    (16, 1792, 16, "NVIDIA_H100_80GB_HBM3"),  # staging slots' chunk-experts: no table, defaults
    (8, 14336, 2, None),  # no device: defaults only
])
def test_tile_configs_cover_every_token_count(Eg, I, K, device_name):
    """warm_up launches tile_configs' list: every token count must pick one of its configs,
    each listed T must be the first to pick its config, and no config may be listed twice."""
    pytest.importorskip("triton")
    import importlib

    fm = importlib.import_module("vllm_fiddler.kernels.triton.fused_moe")
    max_tokens = 3000
    listed = fm.tile_configs(max_tokens, Eg, 4096, I, K, torch.bfloat16, device_name)
    keys = [tuple(sorted(cfg.items())) for _, cfg in listed]
    assert len(set(keys)) == len(keys) and [t for t, _ in listed] == sorted(t for t, _ in listed)
    first = {}
    for T in range(1, max_tokens + 1):
        key = tuple(sorted(fm.get_config(T, Eg, 4096, I, K, torch.bfloat16, device_name).items()))
        assert key in keys, f"T={T} picks a config warm_up never launches"
        first.setdefault(key, T)
    assert [first[k] for k in keys] == [t for t, _ in listed]
    if device_name is None:  # default_config's four buckets of slots per expert
        assert len(listed) == 4
    assert fm.tile_configs(1, Eg, 4096, I, K, torch.bfloat16, device_name)[0][0] == 1


# ----------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c[0] for c in CUDA_CASES])
def test_cuda_matches_oracle(case):
    check(case, run_case(case, "cuda"))


@cuda
@pytest.mark.parametrize("T,E,K,block_m", ALIGN_CASES)
@pytest.mark.parametrize("mode", ["route", "neg", "allneg"])
def test_cuda_align_kernel_matches_torch(T, E, K, block_m, mode):
    assert compare_align(T, E, K, block_m, mode, "cuda") == "ok"


@cuda
def test_cuda_no_host_sync_and_out_none():
    """The launcher makes no host sync (torch's sync debug mode would raise), and allocates out."""
    from vllm_fiddler.kernels import reference
    from vllm_fiddler.kernels.triton import fused_moe

    x, w13, w2, tw, ti = make_inputs(40, 128, 256, 4, 2, "bf16", "neg", "cuda")
    fused_moe(x, w13, w2, tw, ti)  # compile outside sync-debug mode
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fused_moe(x, w13, w2, tw, ti)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = reference.moe(x, w13, w2, tw, ti)
    assert out.dtype == torch.bfloat16 and out.shape == (40, 128)
    assert torch.linalg.vector_norm(out.float() - ref) / torch.linalg.vector_norm(ref) < TOL["bf16"][1]


@cuda
@pytest.mark.parametrize("Eg,I,K", [(3, 1024, 2), (16, 256, 16)])
def test_cuda_warm_up_compiles_every_variant(Eg, I, K):
    """After warm_up(max_tokens), steps of any 1..max_tokens tokens compile nothing new."""
    from vllm_fiddler.kernels.triton import compiled_variants, fused_moe, warm_up

    H, max_tokens = 256, 200
    w13 = torch.randn(Eg, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.05
    w2 = torch.randn(Eg, H, I, device="cuda", dtype=torch.bfloat16) * 0.05
    assert warm_up(w13, w2, K, max_tokens) >= 1
    compiled = compiled_variants()
    for T in list(range(1, 70)) + [97, 128, 129, 160, max_tokens]:
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ids = torch.randint(-1, Eg, (T, K), device="cuda", dtype=torch.int32)
        fused_moe(x, w13, w2, torch.rand(T, K, device="cuda"), ids)
    torch.cuda.synchronize()
    assert compiled_variants() == compiled


if __name__ == "__main__" and "--interpret-worker" in sys.argv:
    _interpreter_worker()
