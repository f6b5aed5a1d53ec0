"""Activation-sparse decode kernels (sparkformer.ops.sparse_ffn_decode) and the act= of the fused gated FFNs.

Every C++ op is compared with its plain-PyTorch reference on every ISA the CPU has (the ``isa`` fixture), fp32 and
bf16 weights, both activations. The kernels widen bf16 to fp32 exactly and accumulate in fp32, so they meet the
fp32 reference on the same (upcast) weights at 1e-4 of the output's scale; the pure-torch fallback multiplies bf16
in bf16 (3e-2). Threshold decisions are compared exactly except within a hair of the threshold, where a different
summation order may flip them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparkformer.ops import _extension
from sparkformer.ops.dense_decode import geglu_decode, pack_geglu
from sparkformer.ops.spark_ffn_decode import spark_ffn_decode
from sparkformer.ops.sparse_ffn_decode import cats_ffn_decode, fused_act_name, gated_ffn_gather, \
    gated_ffn_gather_verify, sparse_input_matvec

HAVE_EXT = _extension.available()
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason=f"C++ extension unavailable: {_extension.error()}")

DTYPES = [torch.float32, torch.bfloat16]
ACTS = ["gelu_tanh", "silu"]
# (m, d, d_out): tails of every vector width (16, 8), d_out != d, and the SmolLM2 FFN width
SHAPES = [(133, 77, 45), (256, 96, 96), (1536, 64, 40), (17, 5, 3)]


def close(actual, expected, rtol, what="", atol=0.0):
    """max |actual - expected| <= rtol * max |expected| + atol."""
    actual, expected = actual.float(), expected.float()
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    ref = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(ref, 1e-6) + atol, f"{what}: max err {err:.3g} vs max |ref| {ref:.3g}"


def term_scale(x, w_gate, w_up, w_down_t) -> float:
    """A bound on the gated FFN's terms, max over outputs of |W_down| (|W_gate| |x| * |W_up| |x|): with few neurons
    the output may be far smaller than its terms (cancellation), and fp32 summation order then shows relative to
    the terms, not to the output."""
    xa = x.float().abs()
    return float((w_down_t.float().abs().t() @ ((w_gate.float().abs() @ xa) * (w_up.float().abs() @ xa))).max())


def _ffn(seed, m, d, dout, dtype):
    g = torch.Generator().manual_seed(seed)
    gu = (torch.randn(m, 2, d, generator=g) / d**0.5).to(dtype)
    wd_t = (torch.randn(m, dout, generator=g) / m**0.5).to(dtype)
    return torch.randn(d, generator=g), gu, wd_t


def _near(score: torch.Tensor, thr: float) -> int:
    """How many scores lie within rounding distance of the threshold (their decision may differ)."""
    return int(((score - thr).abs() <= 1e-5 * max(score.abs().max().item(), 1e-6)).sum())


# ------------------------------------------------------------------------------------------------
# gated_ffn_gather
# ------------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_gather_matches_reference(isa, dtype, act, shape):
    m, d, dout = shape
    x, gu, wd_t = _ffn(0, m, d, dout, dtype)
    g = torch.Generator().manual_seed(1)
    for k in (1, 3, 16, 21, m // 2, m):  # group tails of 16 / 4 / 1, half, all
        for idx_dtype in (torch.int32, torch.int64):
            idx = torch.randperm(m, generator=g)[:k].to(idx_dtype)
            ref = gated_ffn_gather(x, gu, wd_t, idx, act, impl="reference")
            y = gated_ffn_gather(x, gu, wd_t, idx, act, impl="ext")
            assert y.shape == (dout,) and y.dtype == x.dtype
            atol = 1e-6 * term_scale(x, gu[idx.long(), 0], gu[idx.long(), 1], wd_t[idx.long()])
            close(y, ref, 1e-4, f"{isa} {act} k={k}", atol)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    close(gated_ffn_gather(x, gu, wd_t, idx, act, impl="torch"), ref, tol, "torch path")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_gated_gather_verify_matches_reference(isa, dtype, shape):
    m, d, dout = shape
    x, gu, wd_t = _ffn(2, m, d, dout, dtype)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(m, generator=g) + 0.5
    idx = torch.randperm(m, generator=g)[: max(1, 2 * m // 3)]
    h = gated_ffn_gather_verify(x, gu, wd_t, idx, "silu", w, -1.0, impl="reference")  # threshold < 0 keeps all
    assert int(h[1]) == idx.numel()
    close(h[0], gated_ffn_gather(x, gu, wd_t, idx, "silu", impl="reference"), 1e-5, "verify keeps all")
    gu_f = gu.float()[idx]
    hh = F.silu(gu_f[:, 0] @ x) * (gu_f[:, 1] @ x)
    for q in (0.0, 0.5, 0.9):  # thresholds between the neurons' exact scores
        t = float(torch.quantile(hh.abs() * w[idx], q)) * 1.0001
        ref, n_ref = gated_ffn_gather_verify(x, gu, wd_t, idx, "silu", w, t, impl="reference")
        y, n = gated_ffn_gather_verify(x, gu, wd_t, idx, "silu", w, t, impl="ext")
        assert abs(int(n) - int(n_ref)) <= _near(hh.abs() * w[idx], t)
        if int(n) == int(n_ref):
            close(y, ref, 1e-4, f"{isa} q={q}", 1e-6 * term_scale(x, gu[idx, 0], gu[idx, 1], wd_t[idx]))
    y, n = gated_ffn_gather_verify(x, gu, wd_t, idx[:0], "silu", w, 0.0, impl="ext")
    assert int(n) == 0 and float(y.abs().max()) == 0.0
    with pytest.raises(RuntimeError, match="weights"):
        gated_ffn_gather_verify(x, gu, wd_t, idx, "silu", w[:-1], 0.0, impl="ext")


@needs_ext
def test_gated_gather_all_neurons_equals_dense_and_edges(isa):
    x, gu, wd_t = _ffn(2, 200, 72, 72, torch.bfloat16)
    wg, wu = gu[:, 0], gu[:, 1]
    for act in ACTS:
        dense = geglu_decode(x, wg, wu, wd_t, impl="reference", act=act)
        close(gated_ffn_gather(x, gu, wd_t, torch.arange(200), act, impl="ext"), dense, 1e-4, act)
        # empty selection: exactly zero
        y = gated_ffn_gather(x, gu, wd_t, torch.empty(0, dtype=torch.long), act, impl="ext")
        assert torch.equal(y, torch.zeros(72))
        # repeated neurons count twice, as in the reference
        idx = torch.tensor([5, 5, 7], dtype=torch.int32)
        close(gated_ffn_gather(x, gu, wd_t, idx, act, impl="ext"),
              gated_ffn_gather(x, gu, wd_t, idx, act, impl="reference"), 1e-4, "repeats")
    # bf16 activation in, bf16 out; a strided (non-contiguous) gate_up view
    xb = x.bfloat16()
    assert gated_ffn_gather(xb, gu, wd_t, torch.arange(50), "silu", impl="ext").dtype == torch.bfloat16
    big = torch.randn(200, 3, 72).bfloat16()
    view = big[:, 1:]
    close(gated_ffn_gather(x, view, wd_t, torch.arange(0, 200, 3), "silu", impl="ext"),
          gated_ffn_gather(x, view, wd_t, torch.arange(0, 200, 3), "silu", impl="reference"), 1e-4, "strided")


@needs_ext
def test_gated_gather_threads():
    x, gu, wd_t = _ffn(3, 512, 64, 64, torch.float32)
    idx = torch.randperm(512)[:300]
    ref = gated_ffn_gather(x, gu, wd_t, idx, "silu", impl="reference")
    n = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            close(gated_ffn_gather(x, gu, wd_t, idx, "silu", impl="ext"), ref, 1e-4, f"{t} threads")
    finally:
        torch.set_num_threads(n)


@needs_ext
def test_gated_gather_refuses_bad_arguments():
    x, gu, wd_t = _ffn(4, 64, 32, 16, torch.float32)
    idx = torch.arange(10)
    with pytest.raises(ValueError, match="activation"):
        gated_ffn_gather(x, gu, wd_t, idx, "relu")
    for impl, err in (("ext", RuntimeError), ("torch", ValueError), ("reference", ValueError)):
        with pytest.raises(err, match="gate_up"):
            gated_ffn_gather(x, gu[:, 0], wd_t, idx, "silu", impl=impl)
        with pytest.raises(err, match="gate_up"):
            gated_ffn_gather(x[:31], gu, wd_t, idx, "silu", impl=impl)
    with pytest.raises(ValueError, match="out of range"):
        gated_ffn_gather(x, gu, wd_t, torch.tensor([64]), "silu", impl="reference")
    with pytest.raises(RuntimeError, match="int32 or int64"):
        gated_ffn_gather(x, gu, wd_t, idx.float(), "silu", impl="ext")
    with pytest.raises(RuntimeError, match="out of range"):
        gated_ffn_gather(x, gu, wd_t, torch.tensor([0, 64]), "silu", impl="ext")
    with pytest.raises(RuntimeError, match="out of range"):
        gated_ffn_gather(x, gu, wd_t, torch.tensor([-1]), "silu", impl="ext")
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        gated_ffn_gather(x, gu.half(), wd_t.half(), idx, "silu", impl="ext")
    with pytest.raises(RuntimeError, match="one dtype"):
        gated_ffn_gather(x, gu, wd_t.bfloat16(), idx, "silu", impl="ext")
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.sparkformer.gated_ffn_gather(x, gu, wd_t, idx, "gelu")
    with pytest.raises(ValueError, match="impl"):
        gated_ffn_gather(x, gu, wd_t, idx, "silu", impl="cuda")


# ------------------------------------------------------------------------------------------------
# cats_ffn_decode
# ------------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cats_matches_reference(isa, dtype, act, shape):
    m, d, dout = shape
    x, gu, wd_t = _ffn(5, m, d, dout, dtype)
    if d == dout:  # pack_geglu's layout where it applies, else three separate tensors
        w = pack_geglu(gu[:, 0].float(), gu[:, 1].float(), wd_t.float().t(), dtype=dtype)
    else:
        w = (gu[:, 0].contiguous(), gu[:, 1].contiguous(), wd_t)
    a = F.silu(w[0].float() @ x) if act == "silu" else F.gelu(w[0].float() @ x, approximate="tanh")
    for q in (0.0, 0.3, 0.5, 0.9):  # threshold at these quantiles of |act(gate)|: ~all, 70%, 50%, 10% kept
        thr = float(a.abs().quantile(q)) if q else 0.0
        ref, n_ref = cats_ffn_decode(x, *w, thr, act, impl="reference")
        y, n = cats_ffn_decode(x, *w, thr, act, impl="ext")
        assert y.shape == (dout,) and y.dtype == x.dtype and n.dtype == torch.long and n.dim() == 0
        assert abs(int(n) - int(n_ref)) <= _near(a.abs(), thr), f"{isa} q={q}: kept {int(n)} vs {int(n_ref)}"
        if int(n) == int(n_ref):
            close(y, ref, 1e-4, f"{isa} {act} q={q}", 1e-6 * term_scale(x, *w))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    y_t, n_t = cats_ffn_decode(x, *w, thr, act, impl="torch")
    if int(n_t) == int(n_ref):  # its bf16 gate may flip a borderline neuron, which moves y by a whole term
        close(y_t, ref, tol, "torch path")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_cats_edge_cases(isa, dtype):
    x, gu, wd_t = _ffn(6, 300, 80, 80, dtype)
    w = pack_geglu(gu[:, 0].float(), gu[:, 1].float(), wd_t.float().t(), dtype=dtype)
    for act in ACTS:
        dense = geglu_decode(x, *w, impl="reference", act=act)
        # a negative threshold keeps every neuron: the dense FFN
        y, n = cats_ffn_decode(x, *w, -1.0, act, impl="ext")
        assert int(n) == 300
        close(y, dense, 1e-4, f"{act} all kept")
        # a huge threshold keeps none: exactly zero
        y, n = cats_ffn_decode(x, *w, 1e30, act, impl="ext")
        assert int(n) == 0 and torch.equal(y, torch.zeros(80, dtype=x.dtype))
        # threshold 0 drops only exact zeros of the activation (a zero gate row)
        wg = w.w_gate.clone()
        wg[::7] = 0
        y, n = cats_ffn_decode(x, wg, w.w_up, w.w_down_t, 0.0, act, impl="ext")
        assert int(n) == 300 - len(range(0, 300, 7))
        close(y, geglu_decode(x, wg, w.w_up, w.w_down_t, impl="reference", act=act), 1e-4, "threshold 0")
    with pytest.raises(ValueError, match="NaN"):
        cats_ffn_decode(x, *w, float("nan"), "silu")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cats_ffn_decode(x[:79], *w, 0.1, "silu", impl="ext")
    with pytest.raises(RuntimeError, match="one dtype"):
        other = torch.bfloat16 if dtype == torch.float32 else torch.float32
        cats_ffn_decode(x, w.w_gate, w.w_up.to(other), w.w_down_t, 0.1, "silu", impl="ext")
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cats_ffn_decode(x, w.w_gate.half(), w.w_up.half(), w.w_down_t.half(), 0.1, "silu", impl="ext")
    with pytest.raises(ValueError, match="activation"):
        cats_ffn_decode(x, *w, 0.1, "tanh")


@needs_ext
def test_cats_threads_and_bf16_activation():
    x, gu, wd_t = _ffn(7, 1000, 64, 64, torch.bfloat16)
    w = (gu[:, 0].contiguous(), gu[:, 1].contiguous(), wd_t)
    xb = x.bfloat16()
    ref, n_ref = cats_ffn_decode(xb, *w, 0.05, "silu", impl="reference")
    n_thr = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y, n = cats_ffn_decode(xb, *w, 0.05, "silu", impl="ext")
            assert y.dtype == torch.bfloat16 and int(n) == int(n_ref)
            close(y, ref, 1 / 128, f"{t} threads")
    finally:
        torch.set_num_threads(n_thr)


# ------------------------------------------------------------------------------------------------
# sparse_input_matvec
# ------------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(576, 576), (77, 45), (1536, 576), (33, 1), (5, 130)], ids=str)
def test_sparse_input_matvec_matches_reference(isa, dtype, shape):
    n_in, n_out = shape
    g = torch.Generator().manual_seed(8)
    w_t = (torch.randn(n_in, n_out, generator=g) / n_in**0.5).to(dtype)
    x = torch.randn(n_in, generator=g)
    for q in (0.0, 0.4, 0.5, 0.95):
        thr = float(x.abs().quantile(q)) if q else 0.0
        ref, n_ref = sparse_input_matvec(w_t, x, thr, impl="reference")
        y, n = sparse_input_matvec(w_t, x, thr, impl="ext")
        assert int(n) == int(n_ref) and y.shape == (n_out,) and y.dtype == x.dtype
        close(y, ref, 1e-4, f"{isa} q={q}")
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        y_t, n_t = sparse_input_matvec(w_t, x, thr, impl="torch")
        assert int(n_t) == int(n_ref)
        close(y_t, ref, tol, "torch path")
    # threshold 0 with exact zeros in x skips just those; all kept equals the dense product
    xz = x.clone()
    xz[::3] = 0
    y, n = sparse_input_matvec(w_t, xz, 0.0, impl="ext")
    assert int(n) == n_in - len(range(0, n_in, 3))
    close(y, w_t.float().t() @ xz, 1e-4, "zeros skipped")
    y, n = sparse_input_matvec(w_t, x, -1.0, impl="ext")
    assert int(n) == n_in
    close(y, w_t.float().t() @ x, 1e-4, "all kept")


@needs_ext
def test_sparse_input_matvec_edges_and_threads():
    w_t = torch.randn(600, 100).bfloat16()
    x = torch.randn(600)
    y, n = sparse_input_matvec(w_t, x, 1e9, impl="ext")  # nothing kept
    assert int(n) == 0 and torch.equal(y, torch.zeros(100))
    xb = x.bfloat16()
    ref, _ = sparse_input_matvec(w_t, xb, 0.5, impl="reference")
    n_thr = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y, _ = sparse_input_matvec(w_t, xb, 0.5, impl="ext")
            assert y.dtype == torch.bfloat16
            close(y, ref, 1 / 128, f"{t} threads")
    finally:
        torch.set_num_threads(n_thr)
    with pytest.raises(RuntimeError, match="W\\^T"):
        sparse_input_matvec(w_t, x[:599], 0.5, impl="ext")
    with pytest.raises(ValueError, match="W\\^T"):
        sparse_input_matvec(w_t, x[:599], 0.5, impl="reference")
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        sparse_input_matvec(w_t.double(), x, 0.5, impl="ext")
    with pytest.raises(RuntimeError, match="contiguous"):
        sparse_input_matvec(w_t.t().contiguous().t(), x, 0.5, impl="ext")
    with pytest.raises(ValueError, match="NaN"):
        sparse_input_matvec(w_t, x, float("nan"))


# ------------------------------------------------------------------------------------------------
# act= of the fused dense gated FFN and of the Spark FFN
# ------------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_geglu_decode_act(isa, dtype):
    g = torch.Generator().manual_seed(9)
    for m, d in ((200, 96), (131, 77), (1536, 576)):
        wg, wu = torch.randn(m, d, generator=g) / d**0.5, torch.randn(m, d, generator=g) / d**0.5
        wd = torch.randn(d, m, generator=g) / m**0.5
        x = torch.randn(d, generator=g)
        w = pack_geglu(wg, wu, wd, dtype=dtype)
        for act in ACTS:
            ref = geglu_decode(x, *w, impl="reference", act=act)
            fn = F.silu if act == "silu" else (lambda z: F.gelu(z, approximate="tanh"))
            direct = w.w_down_t.float().t() @ (fn(w.w_gate.float() @ x) * (w.w_up.float() @ x))
            close(ref, direct, 1e-6, "reference")
            close(geglu_decode(x, *w, impl="ext", act=act), ref, 1e-4, f"{isa} {act} m={m}")
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            close(geglu_decode(x, *w, impl="torch", act=act), ref, tol, "torch path")
        # the default is gelu_tanh, bit for bit, and an activation function resolves to its name
        assert torch.equal(geglu_decode(x, *w, impl="ext"), geglu_decode(x, *w, impl="ext", act="gelu_tanh"))
        assert torch.equal(geglu_decode(x, *w, impl="ext", act=F.silu), geglu_decode(x, *w, impl="ext", act="silu"))
    with pytest.raises(ValueError, match="activation"):
        geglu_decode(x, *w, act="relu")
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.sparkformer.geglu_decode(x, *w, None, "relu")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_spark_ffn_decode_act(isa, dtype):
    g = torch.Generator().manual_seed(10)
    d_ff, d, r = 517, 77, 29
    x = torch.randn(d, generator=g)
    k1 = (torch.randn(d_ff, r, generator=g) / r**0.5).to(dtype)
    k2 = (torch.randn(d_ff, d - r, generator=g) / d**0.5).to(dtype)
    v = (torch.randn(d_ff, d, generator=g) / d_ff**0.5).to(dtype)
    for act in ACTS:
        ref, n_ref = spark_ffn_decode(x, k1, k2, v, 0.1, impl="reference", act=act)
        y, n = spark_ffn_decode(x, k1, k2, v, 0.1, impl="ext", act=act)
        assert int(n) == int(n_ref)
        close(y, ref, 1e-4, f"{isa} {act}")
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        close(spark_ffn_decode(x, k1, k2, v, 0.1, impl="torch", act=act)[0], ref, tol, "torch path")
    assert torch.equal(spark_ffn_decode(x, k1, k2, v, 0.1, impl="ext")[0],
                       spark_ffn_decode(x, k1, k2, v, 0.1, impl="ext", act="gelu_tanh")[0])


def test_fused_act_name():
    assert fused_act_name("silu") == "silu" and fused_act_name(F.silu) == "silu"
    from sparkformer.ops.activations import gelu_tanh

    assert fused_act_name(gelu_tanh) == "gelu_tanh"
    for bad in ("relu", torch.tanh, None):
        with pytest.raises(ValueError, match="unsupported activation"):
            fused_act_name(bad)


def test_torch_paths_without_extension():
    """The fallbacks need no extension: they agree with the references (fp32)."""
    x, gu, wd_t = _ffn(11, 100, 40, 24, torch.float32)
    idx = torch.arange(0, 100, 2)
    close(gated_ffn_gather(x, gu, wd_t, idx, "silu", impl="torch"),
          gated_ffn_gather(x, gu, wd_t, idx, "silu", impl="reference"), 1e-5)
    w = (gu[:, 0], gu[:, 1], wd_t)
    y, n = cats_ffn_decode(x, *w, 0.1, "silu", impl="torch")
    y_ref, n_ref = cats_ffn_decode(x, *w, 0.1, "silu", impl="reference")
    assert int(n) == int(n_ref)
    close(y, y_ref, 1e-5)
    w_t = torch.randn(40, 24)
    y, n = sparse_input_matvec(w_t, x, 0.5, impl="torch")
    y_ref, n_ref = sparse_input_matvec(w_t, x, 0.5, impl="reference")
    assert int(n) == int(n_ref)
    close(y, y_ref, 1e-5)


@needs_ext
def test_ops_pass_opcheck_and_compile():
    x, gu, wd_t = _ffn(12, 64, 32, 16, torch.float32)
    idx = torch.arange(0, 64, 3)
    w = (gu[:, 0].contiguous(), gu[:, 1].contiguous(), wd_t)
    w_t = torch.randn(32, 48)
    torch.library.opcheck(torch.ops.sparkformer.gated_ffn_gather.default, (x, gu, wd_t, idx, "silu"))
    torch.library.opcheck(torch.ops.sparkformer.cats_ffn_decode.default, (x, *w, 0.1, "silu"))
    torch.library.opcheck(torch.ops.sparkformer.sparse_input_matvec.default, (w_t, x, 0.5))
    torch.library.opcheck(torch.ops.sparkformer.geglu_decode.default, (x, *w, None, "silu"))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(x):
        return gated_ffn_gather(x, gu, wd_t, idx, "silu") * 2, sparse_input_matvec(w_t, x, 0.5)[0] + 1

    a, b = step(x)
    assert torch.equal(a, gated_ffn_gather(x, gu, wd_t, idx, "silu") * 2)
    assert torch.equal(b, sparse_input_matvec(w_t, x, 0.5)[0] + 1)


# ------------------------------------------------------------------------------------------------
# lowrank_routed_ffn: a low-rank predictor's whole routed FFN step in one op
# ------------------------------------------------------------------------------------------------
# (m, d, d_out, r): vector-width tails, d_out != d, SmolLM2's FFN width with its predictor rank, a tiny one
LOWRANK_SHAPES = [(133, 77, 45, 29), (256, 96, 96, 16), (1536, 64, 40, 128), (17, 5, 3, 1)]


def _predictor(seed, m, d, r, dtype):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, d, generator=g) / d**0.5).to(dtype), (torch.randn(2 * m, r, generator=g) / r**0.5).to(dtype)


def _lowrank_scores(x, A, B, m, act):
    """The reference's scores (fp32 on upcast weights) and the score activation."""
    fn = F.silu if act == "silu" else (lambda z: F.gelu(z, approximate="tanh"))
    yb = B.float() @ (A.float() @ x.float())
    return (fn(yb[:m]) * yb[m:]).abs(), fn


def _near_theta(s: torch.Tensor, theta: float) -> int:
    """_near, widened by the kernels' threshold tolerance (THETA_TOL std; -inf: nothing is near)."""
    from sparkformer.ops.stat_topk import THETA_TOL

    if theta == float("-inf"):
        return 0
    tol = 1e-5 * max(s.abs().max().item(), 1e-6) + THETA_TOL * s.std(unbiased=False).item()
    return int(((s - theta).abs() <= tol).sum())


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", LOWRANK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lowrank_routed_ffn_matches_reference(isa, dtype, act, shape):
    from sparkformer.ops.sparse_ffn_decode import lowrank_routed_ffn
    from sparkformer.ops.stat_topk import stat_threshold

    m, d, dout, r = shape
    x, gu, wd_t = _ffn(20, m, d, dout, dtype)
    A, B = _predictor(21, m, d, r, dtype)
    s, fn = _lowrank_scores(x, A, B, m, act)
    vw = torch.rand(m, generator=torch.Generator().manual_seed(22)) + 0.5
    gf = gu.float() @ x  # (m, 2): exact gate and up outputs
    h = fn(gf[:, 0]) * gf[:, 1]
    vscore = h.abs() * vw
    for f in (0.02, 0.1, 0.3, 1.0):
        theta = float(stat_threshold(s, f))
        for vt in (None, -1.0, float(vscore.median()) * 1.0001, 1e30):
            args = (x, A, B, f, act, gu, wd_t) + (() if vt is None else (vw, vt))
            ref, np_ref, nk_ref = lowrank_routed_ffn(*args, impl="reference")
            y, n_prop, n_kept = lowrank_routed_ffn(*args, impl="ext")
            what = f"{isa} {act} f={f} vt={vt}"
            assert y.shape == (dout,) and y.dtype == x.dtype and n_prop.dtype == torch.long and n_prop.dim() == 0
            assert abs(int(n_prop) - int(np_ref)) <= _near_theta(s, theta), what
            if int(n_prop) != int(np_ref):
                continue
            if vt is None:
                assert int(n_kept) == int(n_prop)
            elif vt < 0:
                assert int(n_kept) == int(n_prop), what
            elif vt == 1e30:
                assert int(n_kept) == 0 and torch.equal(y, torch.zeros(dout)), what
            else:
                assert abs(int(n_kept) - int(nk_ref)) <= _near(vscore, vt), what
            if int(n_kept) == int(nk_ref):
                close(y, ref, 1e-4, what, 1e-6 * term_scale(x, gu[:, 0], gu[:, 1], wd_t))
    y, n_prop, _ = lowrank_routed_ffn(x, A, B, 1.0, act, gu, wd_t, impl="ext")  # every neuron: the dense FFN
    assert int(n_prop) == m
    close(y, geglu_decode(x, gu[:, 0].contiguous(), gu[:, 1].contiguous(), wd_t, impl="reference", act=act), 1e-4,
          "f=1 is dense", 1e-6 * term_scale(x, gu[:, 0], gu[:, 1], wd_t))
    # the unfused torch composition (decode.routed's): GEMVs in the weights' dtype, z rounded to it
    ref, np_ref, _ = lowrank_routed_ffn(x, A, B, 0.3, act, gu, wd_t, impl="reference")
    y_t, np_t, _ = lowrank_routed_ffn(x, A, B, 0.3, act, gu, wd_t, impl="torch")
    if dtype == torch.float32 and int(np_t) == int(np_ref):
        close(y_t, ref, 1e-4, "torch path")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_lowrank_routed_ffn_edges_threads_and_errors(isa, dtype):
    from sparkformer.ops.sparse_ffn_decode import lowrank_routed_ffn

    m, d, dout, r = 1536, 64, 48, 128
    x, gu, wd_t = _ffn(23, m, d, dout, dtype)
    A, B = _predictor(24, m, d, r, dtype)
    # constant scores (B = 0): std 0, theta = their value, nothing above it
    y, n_prop, n_kept = lowrank_routed_ffn(x, A, torch.zeros_like(B), 0.5, "silu", gu, wd_t, impl="ext")
    assert int(n_prop) == 0 and int(n_kept) == 0 and torch.equal(y, torch.zeros(dout))
    # non-finite scores (the scalar path): statistics over the finite ones, NaN never kept, +inf always
    from sparkformer.ops.stat_topk import stat_threshold

    Bx = B.float().clone()
    Bx[1], Bx[m + 2, 0] = float("nan"), float("inf")
    Bx = Bx.to(dtype)
    s, _ = _lowrank_scores(x, A, Bx, m, "silu")
    assert bool(s[1].isnan()) and bool(s[2].isposinf()) and int(torch.isfinite(s).sum()) == m - 2
    for f in (0.1, 0.5):
        theta = float(stat_threshold(s, f))
        ref = lowrank_routed_ffn(x, A, Bx, f, "silu", gu, wd_t, impl="reference")
        out = lowrank_routed_ffn(x, A, Bx, f, "silu", gu, wd_t, impl="ext")
        assert int(ref[1]) > 10
        assert abs(int(out[1]) - int(ref[1])) <= _near_theta(s[torch.isfinite(s)], theta), f"non-finite f={f}"
    # a different score activation (a predictor trained with gelu_tanh on a silu FFN)
    ref = lowrank_routed_ffn(x, A, B, 0.2, "silu", gu, wd_t, score_act="gelu_tanh", impl="reference")
    out = lowrank_routed_ffn(x, A, B, 0.2, "silu", gu, wd_t, score_act="gelu_tanh", impl="ext")
    if int(out[1]) == int(ref[1]):
        close(out[0], ref[0], 1e-4, "score_act", 1e-6 * term_scale(x, gu[:, 0], gu[:, 1], wd_t))
    # threads: same counts, same y up to summation order; bf16 x gives bf16 y
    vw = torch.rand(m) + 0.5
    base = lowrank_routed_ffn(x, A, B, 0.3, "silu", gu, wd_t, vw, 0.01, impl="ext")
    n_thr = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y, n_prop, n_kept = lowrank_routed_ffn(x, A, B, 0.3, "silu", gu, wd_t, vw, 0.01, impl="ext")
            assert (int(n_prop), int(n_kept)) == (int(base[1]), int(base[2])), f"{t} threads"
            close(y, base[0], 1e-5, f"{t} threads", 1e-6 * term_scale(x, gu[:, 0], gu[:, 1], wd_t))
            yb, _, _ = lowrank_routed_ffn(x.bfloat16(), A, B, 0.3, "silu", gu, wd_t, impl="ext")
            assert yb.dtype == torch.bfloat16
    finally:
        torch.set_num_threads(n_thr)
    op = torch.ops.sparkformer.lowrank_routed_ffn
    with pytest.raises(RuntimeError, match="shape mismatch"):
        op(x, A, B[:-1], 0.3, "silu", gu, wd_t)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        op(x[:-1], A, B, 0.3, "silu", gu, wd_t)
    with pytest.raises(RuntimeError, match="expected x"):
        op(x, A, B, 0.3, "silu", gu[:, 0], wd_t)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(x, A.float(), B.bfloat16(), 0.3, "silu", gu, wd_t)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(x, A.half(), B.half(), 0.3, "silu", gu, wd_t)
    with pytest.raises(RuntimeError, match="verify_weights"):
        op(x, A, B, 0.3, "silu", gu, wd_t, vw[:-1], 0.1)
    with pytest.raises(RuntimeError, match="verify_weights"):
        op(x, A, B, 0.3, "silu", gu, wd_t, vw.double(), 0.1)
    for f in (0.0, 1.5, float("nan")):
        with pytest.raises(RuntimeError, match="f must be in"):
            op(x, A, B, f, "silu", gu, wd_t)
        with pytest.raises(ValueError, match="f must be in"):
            lowrank_routed_ffn(x, A, B, f, "silu", gu, wd_t, impl="reference")
    with pytest.raises(RuntimeError, match="unknown activation"):
        op(x, A, B, 0.3, "relu", gu, wd_t)
    with pytest.raises(ValueError, match="A \\(r, d\\)"):
        lowrank_routed_ffn(x, A, B[:-1], 0.3, "silu", gu, wd_t, impl="torch")


# ------------------------------------------------------------------------------------------------
# teal_ffn_decode: TEAL's gated FFN step in one op
# ------------------------------------------------------------------------------------------------
def _teal_weights(gu, wd_t):
    return torch.cat([gu[:, 0], gu[:, 1]]).t().contiguous(), wd_t  # gate_up_t (d, 2m)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_teal_ffn_decode_matches_reference(isa, dtype, act, shape):
    from sparkformer.ops.sparse_ffn_decode import teal_ffn_decode

    m, d, dout = shape
    x, gu, wd_t = _ffn(30, m, d, dout, dtype)
    gut, wd_t = _teal_weights(gu, wd_t)
    fn = F.silu if act == "silu" else (lambda z: F.gelu(z, approximate="tanh"))
    atol = 1e-6 * term_scale(x, gu[:, 0], gu[:, 1], wd_t)
    for q_in in (None, 0.5, 0.9, 2.0):  # keep all, half, 10%, nothing of the inputs
        t_in = -1.0 if q_in is None else (1e30 if q_in > 1 else float(x.abs().quantile(q_in)))
        xm = torch.where(x.abs() > t_in, x, torch.zeros_like(x))
        g = gut.float().t() @ xm
        h = (fn(g[:m]) * g[m:]).abs()
        for q_h in (None, 0.0, 0.5, 0.9, 2.0):
            t_down = -1.0 if q_h is None else (1e30 if q_h > 1 else float(h.quantile(q_h)) * 1.0001)
            ref, ni_ref, nh_ref = teal_ffn_decode(x, gut, wd_t, t_in, t_down, act, impl="reference")
            y, n_in, n_h = teal_ffn_decode(x, gut, wd_t, t_in, t_down, act, impl="ext")
            what = f"{isa} {act} t_in={t_in:.3g} t_down={t_down:.3g}"
            assert y.shape == (dout,) and y.dtype == x.dtype and n_h.dtype == torch.long and n_h.dim() == 0
            assert int(n_in) == int(ni_ref), what
            assert abs(int(n_h) - int(nh_ref)) <= _near(h, t_down), what
            if q_in is None:
                assert int(n_in) == d
            if q_h is None:
                assert int(n_h) == m
            if q_h is not None and q_h > 1:
                assert int(n_h) == 0 and torch.equal(y, torch.zeros(dout)), what
            if int(n_h) == int(nh_ref):
                close(y, ref, 1e-4, what, atol)
        if q_in is None:  # every input, every neuron: the dense gated FFN
            dense = geglu_decode(x, gu[:, 0].contiguous(), gu[:, 1].contiguous(), wd_t, impl="reference", act=act)
            close(teal_ffn_decode(x, gut, wd_t, -1.0, -1.0, act, impl="ext")[0], dense, 1e-4, "dense", atol)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    ref, _, nh_ref = teal_ffn_decode(x, gut, wd_t, 0.3, 0.0, act, impl="reference")
    y_t, _, nh_t = teal_ffn_decode(x, gut, wd_t, 0.3, 0.0, act, impl="torch")
    if int(nh_t) == int(nh_ref):
        close(y_t, ref, tol, "torch path", atol)


@needs_ext
def test_teal_ffn_decode_threads_and_errors():
    from sparkformer.ops.sparse_ffn_decode import teal_ffn_decode

    x, gu, wd_t = _ffn(31, 1536, 96, 80, torch.bfloat16)
    gut, wd_t = _teal_weights(gu, wd_t)
    xb = x.bfloat16()
    ref, ni_ref, nh_ref = teal_ffn_decode(xb, gut, wd_t, 0.5, 0.01, "silu", impl="reference")
    n_thr = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y, n_in, n_h = teal_ffn_decode(xb, gut, wd_t, 0.5, 0.01, "silu", impl="ext")
            assert y.dtype == torch.bfloat16 and int(n_in) == int(ni_ref)
            if int(n_h) == int(nh_ref):
                close(y, ref, 1 / 128, f"{t} threads")
    finally:
        torch.set_num_threads(n_thr)
    op = torch.ops.sparkformer.teal_ffn_decode
    with pytest.raises(RuntimeError, match="shape mismatch"):
        op(x[:-1], gut, wd_t, 0.5, 0.0, "silu")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        op(x, gut[:, :-1], wd_t, 0.5, 0.0, "silu")
    with pytest.raises(RuntimeError, match="expected x"):
        op(x, gut[None], wd_t, 0.5, 0.0, "silu")
    with pytest.raises(RuntimeError, match="one dtype"):
        op(x, gut, wd_t.float(), 0.5, 0.0, "silu")
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(x, gut.half(), wd_t.half(), 0.5, 0.0, "silu")
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x, gut.t().contiguous().t(), wd_t, 0.5, 0.0, "silu")
    with pytest.raises(RuntimeError, match="NaN"):
        op(x, gut, wd_t, float("nan"), 0.0, "silu")
    with pytest.raises(RuntimeError, match="unknown activation"):
        op(x, gut, wd_t, 0.5, 0.0, "relu")
    with pytest.raises(ValueError, match="gate_up_t"):
        teal_ffn_decode(x[:-1], gut, wd_t, 0.5, 0.0, "silu", impl="reference")


@needs_ext
def test_fused_ffn_steps_pass_opcheck_and_compile():
    from sparkformer.ops.sparse_ffn_decode import lowrank_routed_ffn, teal_ffn_decode

    x, gu, wd_t = _ffn(32, 64, 32, 16, torch.float32)
    A, B = _predictor(33, 64, 32, 8, torch.float32)
    gut, _ = _teal_weights(gu, wd_t)
    vw = torch.rand(64) + 0.5
    torch.library.opcheck(torch.ops.sparkformer.lowrank_routed_ffn.default, (x, A, B, 0.3, "silu", gu, wd_t))
    torch.library.opcheck(torch.ops.sparkformer.lowrank_routed_ffn.default,
                          (x, A, B, 0.3, "silu", gu, wd_t, vw, 0.01, "gelu_tanh"))
    torch.library.opcheck(torch.ops.sparkformer.teal_ffn_decode.default, (x, gut, wd_t, 0.5, 0.01, "silu"))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(x):
        return lowrank_routed_ffn(x, A, B, 0.3, "silu", gu, wd_t, vw, 0.01)[0] * 2, \
            teal_ffn_decode(x, gut, wd_t, 0.5, 0.01, "silu")[0] + 1

    a, b = step(x)
    assert torch.equal(a, lowrank_routed_ffn(x, A, B, 0.3, "silu", gu, wd_t, vw, 0.01)[0] * 2)
    assert torch.equal(b, teal_ffn_decode(x, gut, wd_t, 0.5, 0.01, "silu")[0] + 1)
