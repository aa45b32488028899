"""Tests of the CPU expert kernel (vllm_fiddler.kernels.cpu) against the fp32 oracle.

Every ISA path is tested where the CPU has it ("amx" needs an Intel Xeon with AMX,
"avx512_bf16" AVX512-BF16, "torch" runs everywhere); unavailable ones are skipped
with the reason. The first test that needs the native kernels builds them
(torch.utils.cpp_extension, cached in ~/.cache/torch_extensions): ~10-60 s once.

Tolerances. Inputs are bf16 (x, w13, w2), and the oracles run in fp32 on exactly
those bf16 values, so input rounding is not part of the error. The native kernels
multiply bf16 pairs exactly and accumulate in fp32 (only the summation order
differs from the oracle: relative ~1e-6), but they round the SwiGLU activation to
bf16 before the down projection (its operand must be bf16 for dpbf16/AMX):
relative error <= 2^-9 per activation element, i.e. about 1e-3 of the output's
magnitude after the down projection sums over I terms. Hence two checks:
  * tight, against an oracle that rounds the activation to bf16 the same way:
    max|y - ref| <= 2e-3 * max|ref| (what is left is fp32 ordering, plus the odd
    activation element whose rounding flips by one bf16 ulp);
  * loose, against the plain fp32 oracle (kernels/reference.py):
    max|y - ref| <= 1e-2 * max|ref|.
The torch fallback computes in bf16 matmuls (oneDNN accumulates in fp32 but
rounds gate/up, the activation and the output to bf16): loose check only, 3e-2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from vllm_fiddler.kernels import cpu, reference

ALL_ISAS = ["amx", "avx512_bf16", "torch"]
TOKENS = [1, 2, 3, 4, 7, 16, 33, 128]
# (H, I): multiples of 32; not multiples of 32 or 16 (K and N tails); smaller than
# one AMX tile (the AMX path hands such experts to the AVX512-BF16 kernels).
SHAPES = [(96, 160), (200, 344), (72, 48), (40, 24), (256, 512)]

TIGHT = 2e-3
LOOSE_NATIVE = 1e-2
LOOSE_TORCH = 3e-2


def _cpu_name() -> str:
    from vllm_fiddler.cpuinfo import cpu_model_name

    return cpu_model_name()


@pytest.fixture(params=ALL_ISAS)
def isa_path(request):
    name = request.param
    if name not in cpu.available_isas():
        pytest.skip(f"ISA path {name!r} not available on {_cpu_name()} "
                    f"(available: {cpu.available_isas()})")
    return name


def _weights(H, I, E=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape13 = (2 * I, H) if E is None else (E, 2 * I, H)
    shape2 = (H, I) if E is None else (E, H, I)
    w13 = (torch.randn(shape13, generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(shape2, generator=g) / I ** 0.5).bfloat16()
    return w13, w2


def _x(T, H, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g).bfloat16()


def oracle_bf16_act(x, w13, w2):
    """The fp32 oracle, except that the SwiGLU activation is rounded to bf16 (as the kernels do)."""
    xf, w13f, w2f = x.float(), w13.float(), w2.float()
    inter = w13.shape[0] // 2
    gate_up = xf @ w13f.t()
    act = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).bfloat16().float()
    return act @ w2f.t()


def oracle_moe_bf16_act(x, w13, w2, topk_weights, topk_ids):
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    for e in range(w13.shape[0]):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel():
            y = oracle_bf16_act(x[tok], w13[e], w2[e])
            out.index_add_(0, tok, y * topk_weights[tok, slot, None].float())
    return out


def _rel_err(y, ref):
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _check(y, x, w13, w2, path, fp32_ref=None):
    fp32_ref = reference.expert_ffn(x, w13, w2) if fp32_ref is None else fp32_ref
    assert y.dtype == torch.float32 and y.shape == fp32_ref.shape
    assert torch.isfinite(y).all()
    if path == "torch":
        assert _rel_err(y, fp32_ref) <= LOOSE_TORCH
    else:
        assert _rel_err(y, oracle_bf16_act(x, w13, w2)) <= TIGHT
        assert _rel_err(y, fp32_ref) <= LOOSE_NATIVE


def test_available_isas_and_isa():
    avail = cpu.available_isas()
    if os.environ.get("FIDDLER_CPU_AMX_EMULATE") == "1":
        assert "amx" in avail, "FIDDLER_CPU_AMX_EMULATE=1 but the emulated AMX kernels did not build"
    assert avail[-1] == "torch"
    assert set(avail) <= set(ALL_ISAS)
    if "amx" in avail:
        assert "avx512_bf16" in avail
    assert cpu.isa() in avail


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}xI{s[1]}")
@pytest.mark.parametrize("T", TOKENS)
def test_expert_ffn_matches_oracle(isa_path, T, shape):
    H, I = shape
    w13, w2 = _weights(H, I)
    x = _x(T, H)
    y = cpu.expert_ffn(x, w13, w2, isa=isa_path)
    _check(y, x, w13, w2, isa_path)


def test_expert_ffn_deterministic(isa_path):
    w13, w2 = _weights(200, 344)
    x = _x(33, 200)
    a = cpu.expert_ffn(x, w13, w2, isa=isa_path)
    b = cpu.expert_ffn(x, w13, w2, isa=isa_path)
    assert torch.equal(a, b)


def _routing(T, K, E, seed=2, drop=0.25, skip_expert=None):
    """Random distinct top-k ids per token; ~drop of them -1 (handled elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    choices = [e for e in range(E) if e != skip_expert]
    ids = torch.empty(T, K, dtype=torch.int32)
    for t in range(T):
        perm = torch.randperm(len(choices), generator=g)[:K]
        ids[t] = torch.tensor([choices[i] for i in perm.tolist()], dtype=torch.int32)
    ids[torch.rand(T, K, generator=g) < drop] = -1
    w = torch.rand(T, K, generator=g) + 0.1
    w = (w / w.sum(-1, keepdim=True)).float()
    return ids, w


@pytest.mark.parametrize("T", [1, 5, 40, 130])
def test_moe_forward_several_experts(isa_path, T):
    H, I, E, K = 200, 344, 5, 2
    w13, w2 = _weights(H, I, E)
    # Expert 3 gets no tokens; poison it: nothing of it may reach the output.
    w13[3] = float("nan")
    w2[3] = float("nan")
    x = _x(T, H)
    ids, wts = _routing(T, K, E, skip_expert=3)
    out0 = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    out = out0.clone()
    cpu.moe_forward(x, w13, w2, ids, wts, out, isa=isa_path)
    assert torch.isfinite(out).all()
    ref = reference.moe(x, w13, w2, wts, ids.long())
    delta = out - out0
    if isa_path == "torch":
        assert _rel_err(delta, ref) <= LOOSE_TORCH
    else:
        assert _rel_err(delta, oracle_moe_bf16_act(x, w13, w2, wts, ids.long())) <= TIGHT
        assert _rel_err(delta, ref) <= LOOSE_NATIVE


def test_moe_forward_all_skipped_and_empty(isa_path):
    H, I, E = 96, 160, 3
    w13, w2 = _weights(H, I, E)
    # every id -1: nothing to do, out untouched
    x = _x(4, H)
    out = torch.ones(4, H)
    cpu.moe_forward(x, w13, w2, torch.full((4, 2), -1, dtype=torch.int32), torch.ones(4, 2), out, isa=isa_path)
    assert torch.equal(out, torch.ones(4, H))
    # T == 0
    out = torch.empty(0, H)
    cpu.moe_forward(_x(0, H), w13, w2, torch.empty(0, 2, dtype=torch.int32), torch.empty(0, 2), out,
                    isa=isa_path)
    assert out.shape == (0, H)


def test_moe_forward_auto_mixes_kernels(monkeypatch):
    """isa=None in auto mode: with AMX, experts below FIDDLER_CPU_AMX_MIN_TOKENS use AVX512-BF16."""
    monkeypatch.setenv("FIDDLER_CPU_ISA", "auto")
    monkeypatch.setenv("FIDDLER_CPU_AMX_MIN_TOKENS", "4")
    H, I, E = 96, 160, 3
    w13, w2 = _weights(H, I, E)
    T = 20
    x = _x(T, H)
    ids = torch.zeros(T, 1, dtype=torch.int32)  # expert 0: 17 tokens, expert 1: 2, expert 2: 1
    ids[17:19] = 1
    ids[19] = 2
    wts = torch.ones(T, 1)
    out = torch.zeros(T, H)
    cpu.moe_forward(x, w13, w2, ids, wts, out)
    ref = reference.moe(x, w13, w2, wts, ids.long())
    tol = LOOSE_TORCH if cpu.isa() == "torch" else LOOSE_NATIVE
    assert _rel_err(out, ref) <= tol


def test_moe_forward_global_ids_into_full_tensor(isa_path):
    """The whole host weight tensor can be passed; experts never routed here are not touched."""
    H, I, E = 96, 160, 8
    w13, w2 = _weights(H, I, E)
    T = 6
    x = _x(T, H)
    ids = torch.tensor([[1, 6]] * T, dtype=torch.int32)
    wts = torch.full((T, 2), 0.5)
    out = torch.zeros(T, H)
    cpu.moe_forward(x, w13, w2, ids, wts, out, isa=isa_path)
    ref = reference.moe(x, w13, w2, wts, ids.long())
    assert _rel_err(out, ref) <= (LOOSE_TORCH if isa_path == "torch" else LOOSE_NATIVE)


def test_moe_forward_rejects_bad_ids(isa_path):
    w13, w2 = _weights(96, 160, 2)
    with pytest.raises((RuntimeError, ValueError)):
        cpu.moe_forward(_x(2, 96), w13, w2, torch.tensor([[0], [2]], dtype=torch.int32), torch.ones(2, 1),
                        torch.zeros(2, 96), isa=isa_path)


def test_num_threads_changes_nothing_but_speed():
    native = [i for i in cpu.available_isas() if i != "torch"]
    if not native:
        pytest.skip("no native kernels on this machine")
    w13, w2 = _weights(200, 344)
    x = _x(9, 200)
    before = cpu._get_num_threads()
    try:
        results = []
        for n in (1, 3, 8):
            cpu.set_num_threads(n)
            assert cpu._get_num_threads() == n
            results.append(cpu.expert_ffn(x, w13, w2, isa=native[0]))
    finally:
        cpu.set_num_threads(before)
    # each output element is computed by one thread, in the same order: bit-identical
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    with pytest.raises(ValueError):
        cpu.set_num_threads(0)


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_load(tmp_path):
    """torch's extension loader waits, without end, for a plain "lock" file its builder
    deletes when done; a build killed midway leaves it. Loading the (built) kernels in a new
    process with such a file in every build directory must finish and remove the files."""
    native = [i for i in cpu.available_isas() if i != "torch"]  # built (or loaded) here first
    if not native:
        pytest.skip("no native kernels on this machine")
    planted = []
    for name in ("fiddler_cpu_ops", "fiddler_cpu_avx512_bf16"):
        lock = os.path.join(cpu._build_dir(name), "lock")
        with open(lock, "w"):
            pass
        planted.append(lock)
    code = "from vllm_fiddler.kernels import cpu; print(','.join(cpu.available_isas()))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("loading the kernels hung on a stale build lock")
    finally:
        for lock in planted:
            if os.path.exists(lock):
                os.remove(lock)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().split(",")[:len(native)] == native
    assert "left by a build that did not finish" in done.stderr


def test_down_items_wait_for_their_experts_gate_up(isa_path):
    """Both projections run in one pool run, a down item waiting only for the gate/up items
    of the experts it reads. Oversubscribed threads (preempted mid-item) and a last expert
    with most of the tokens (its gate/up items finish last) make a missing wait read the
    previous call's activations: each call changes x, so that shows. One thread runs the
    items in order (every gate/up item before any down item) and computes each output
    element the same way, so the bits must match it."""
    if isa_path == "torch":
        pytest.skip("the torch path has no pool")
    H, I, E, K, T = 256, 512, 6, 2, 48
    w13, w2 = _weights(H, I, E)
    ids, wts = _routing(T, K, E, drop=0.0)
    ids[T // 4:, 0] = E - 1  # three quarters of the tokens also go to the last expert
    ids[T // 4:, 1] = torch.where(ids[T // 4:, 1] == E - 1, 0, ids[T // 4:, 1])

    def run_all(threads: int):
        cpu.set_num_threads(threads)
        outs = []
        for rep in range(12):
            out = torch.zeros(T, H)
            cpu.moe_forward(_x(T, H, seed=100 + rep), w13, w2, ids, wts, out, isa=isa_path)
            outs.append(out)
        return outs

    before = cpu._get_num_threads()
    try:
        many, one = run_all(8), run_all(1)
    finally:
        cpu.set_num_threads(before)
    for rep, (a, b) in enumerate(zip(many, one)):
        assert torch.equal(a, b), (rep, (a - b).abs().max().item())
    x = _x(T, H, seed=100)
    ref = oracle_moe_bf16_act(x, w13, w2, wts, ids)
    assert _rel_err(many[0], ref) <= TIGHT


# (H, I, T): K and N tails on both projections, one and several row groups per
# item, odd token blocks (a single-block pass), 1..9 token blocks.
AMX_SPLIT_CASES = [(200, 344, 1), (200, 344, 16), (200, 344, 33), (96, 160, 7), (512, 344, 64), (256, 512, 130)]


def test_amx_uneven_splits_match_oracle():
    """The AMX kernels with 3 threads (items of uneven sizes, N tails inside items), on real
    AMX or under FIDDLER_CPU_AMX_EMULATE=1, against the oracles."""
    if "amx" not in cpu.available_isas():
        pytest.skip(f"no AMX path on {_cpu_name()} (FIDDLER_CPU_AMX_EMULATE=1 tests it emulated)")
    before = cpu._get_num_threads()
    cpu.set_num_threads(3)
    try:
        for H, I, T in AMX_SPLIT_CASES:
            w13, w2 = _weights(H, I, seed=H + I)
            x = _x(T, H, seed=T)
            _check(cpu.expert_ffn(x, w13, w2, isa="amx"), x, w13, w2, "amx")
        H, I, E, K, T = 200, 344, 5, 2, 70
        w13, w2 = _weights(H, I, E)
        ids, wts = _routing(T, K, E)
        x = _x(T, H)
        out = torch.zeros(T, H)
        cpu.moe_forward(x, w13, w2, ids, wts, out, isa="amx")
    finally:
        cpu.set_num_threads(before)
    assert _rel_err(out, oracle_moe_bf16_act(x, w13, w2, wts, ids.long())) <= TIGHT
    assert _rel_err(out, reference.moe(x, w13, w2, wts, ids.long())) <= LOOSE_NATIVE


def test_concurrent_callers_are_serialized():
    native = [i for i in cpu.available_isas() if i != "torch"]
    if not native:
        pytest.skip("no native kernels on this machine")
    w13, w2 = _weights(200, 344)
    xs = [_x(5, 200, seed=s) for s in range(4)]
    expected = [cpu.expert_ffn(x, w13, w2, isa=native[0]) for x in xs]
    got = [None] * 4

    def run(i):
        for _ in range(5):
            got[i] = cpu.expert_ffn(xs[i], w13, w2, isa=native[0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_native_call_releases_the_gil():
    """While one Python thread is inside the op, another Python thread keeps running.

    torch.ops calls go through torch::jit::invokeOperatorFromPython, which drops the
    GIL around the kernel; we check it: the main thread's loop never stalls for
    anything close to the duration of the call.
    """
    native = [i for i in cpu.available_isas() if i != "torch"]
    if not native:
        pytest.skip("no native kernels on this machine")
    H, I = 1024, 4096
    w13, w2 = _weights(H, I)
    path = native[-1]
    before = cpu._get_num_threads()
    cpu.set_num_threads(1)  # leave a core to the main thread on small machines
    try:
        x = _x(64, H)
        cpu.expert_ffn(x, w13, w2, isa=path)  # warm up
        t0 = time.perf_counter()
        cpu.expert_ffn(x, w13, w2, isa=path)
        t64 = time.perf_counter() - t0
        x_long = _x(int(min(4096, max(64, 64 * 0.3 / t64))), H)  # a call of ~0.3 s
        started, done = threading.Event(), threading.Event()
        span = {}

        def call():
            started.set()
            c0 = time.perf_counter()
            cpu.expert_ffn(x_long, w13, w2, isa=path)
            span["call"] = (c0, time.perf_counter())
            done.set()

        th = threading.Thread(target=call)
        th.start()
        started.wait()
        stamps = []
        while not done.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0)
        th.join()
    finally:
        cpu.set_num_threads(before)
    c0, c1 = span["call"]
    inside = [t for t in stamps if c0 <= t <= c1]
    dur = c1 - c0
    assert dur > 0.05, f"call too short to judge ({dur:.3f} s)"
    gaps = [b - a for a, b in zip([c0] + inside, inside + [c1])]
    # With the GIL held the main loop would stop for the whole call.
    assert len(inside) > 10 and max(gaps) < 0.5 * dur, (dur, len(inside), max(gaps))


def test_env_var_forces_path(monkeypatch):
    monkeypatch.setenv("FIDDLER_CPU_ISA", "torch")
    assert cpu.isa() == "torch"
    monkeypatch.setenv("FIDDLER_CPU_ISA", "no-such-isa")
    assert cpu.isa() == cpu.available_isas()[0]  # warns, falls back to the best path
    for name in cpu.available_isas():
        monkeypatch.setenv("FIDDLER_CPU_ISA", name)
        assert cpu.isa() == name


def test_unavailable_isa_argument_raises():
    missing = [i for i in ALL_ISAS if i not in cpu.available_isas()]
    if not missing:
        pytest.skip("every ISA path is available here")
    w13, w2 = _weights(96, 160)
    with pytest.raises(ValueError):
        cpu.expert_ffn(_x(1, 96), w13, w2, isa=missing[0])


def test_failed_build_falls_back_to_torch(tmp_path):
    """No usable compiler (or FIDDLER_CPU_BUILD=0): the torch path, no crash."""
    code = (
        "import torch, logging; logging.basicConfig(level=logging.INFO)\n"
        "from vllm_fiddler.kernels import cpu, reference\n"
        "assert cpu.available_isas() == ['torch'], cpu.available_isas()\n"
        "assert cpu.isa() == 'torch'\n"
        "x = torch.randn(3, 64).bfloat16(); w13 = torch.randn(96, 64).bfloat16(); w2 = torch.randn(64, 48).bfloat16()\n"
        "y = cpu.expert_ffn(x, w13, w2); r = reference.expert_ffn(x, w13, w2)\n"
        "assert ((y - r).abs().max() / r.abs().max()).item() < 3e-2\n"
        "print('FALLBACK-OK')\n"
    )
    fake_cxx = tmp_path / "no-such-compiler"
    for extra in ({"CXX": str(fake_cxx)}, {"FIDDLER_CPU_BUILD": "0"}):
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), **extra)
        env.pop("FIDDLER_CPU_ISA", None)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "FALLBACK-OK" in proc.stdout, proc.stdout + proc.stderr
