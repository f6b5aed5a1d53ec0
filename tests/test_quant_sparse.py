"""Activation-sparse decode over block-quantized weights: every C++ op of ops/quant_sparse.py against its reference on
every ISA, then quantized routed / TEAL / CATS engines against the same engines' float path on dequantized weights."""

import pytest
import torch

from sparkformer.ops import _extension
from sparkformer.ops.activations import ACTIVATIONS
from sparkformer.ops.quant import FORMATS, dequantize, quantize
from sparkformer.ops.quant_sparse import (dequantize_gated_rows, quant_cats_ffn_decode, quant_gated_gather,
                                          quant_lowrank_routed_ffn, quant_sparse_input_matvec, quant_teal_ffn_decode,
                                          quantize_gated_rows)
from sparkformer.ops.stat_topk import stat_threshold
from tiny_models import tiny_silu_lm

FMTS = list(FORMATS)
ACTS = ["silu", "gelu_tanh"]


def _needs_ext(isa):
    if isa == "none":
        pytest.skip("C++ extension unavailable")


def _close(got, ref, what=""):
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())), msg=what)


def _gap(v: torch.Tensor, q: float) -> float:
    """A threshold near the q-quantile of v in the widest gap between neighbouring values there: no value is within
    summation-order noise of it, so the kernels and the references select the same entries."""
    s = v.flatten().sort().values
    if s.numel() < 2:
        return float(s.sum()) / 2
    i = int(q * (s.numel() - 1))
    lo, hi = max(0, i - 4), min(s.numel() - 1, i + 5)
    gaps = s[lo + 1: hi + 1] - s[lo:hi]
    j = lo + int(gaps.argmax())
    return float((s[j] + s[j + 1]) / 2)


def _rows(fmt, m=300, d=96, dout=64, seed=0, down_fmt=None):
    g = torch.Generator().manual_seed(seed)
    wg, wu, wd = (torch.randn(m, d, generator=g), torch.randn(m, d, generator=g), torch.randn(m, dout, generator=g))
    return quantize_gated_rows(wg, wu, wd, fmt, down_fmt), torch.randn(d, generator=g)


def _h(x, rows, act):
    """The reference's h = act(g) u per neuron (integer dot products)."""
    from sparkformer.ops.quant import quant_matvec_reference
    from sparkformer.ops.quant_sparse import gated_rows

    g, u = gated_rows(rows)
    return ACTIVATIONS[act](quant_matvec_reference(g, x)) * quant_matvec_reference(u, x)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("act", ACTS)
def test_quant_gated_gather_equals_reference(isa, fmt, act):
    _needs_ext(isa)
    rows, x = _rows(fmt, down_fmt="q8_0" if fmt == "q4_0" else None)  # q4_0 gate/up with q8_0 down: a mix
    m = rows.n_neurons
    h = _h(x, rows, act)
    vw = torch.rand(m) + 0.5
    for cnt in (0, 1, 5, 40, m):  # none, one, fewer than a chunk, two threads' worth, every neuron
        idx = torch.randperm(m)[:cnt]
        for verify in (None, (vw, _gap((h.abs() * vw)[idx], 0.5) if cnt else 0.0)):
            ref, k_ref = quant_gated_gather(x, rows, idx, act, verify, impl="reference")
            for ids in (idx, idx.to(torch.int32)):
                got, k = quant_gated_gather(x, rows, ids, act, verify, impl="ext")
                assert k == k_ref and got.dtype == torch.float32 and got.shape == (64,)
                _close(got, ref, f"{isa} {fmt} cnt={cnt} verify={verify is not None}")
    # every neuron = the dense FFN on the dequantized weights, up to the int8 rounding of x
    wg, wu, wd = dequantize_gated_rows(rows)
    dense = (ACTIVATIONS[act](wg @ x) * (wu @ x)) @ wd
    got, _ = quant_gated_gather(x, rows, torch.arange(m), act, impl="ext")
    assert float((got - dense).norm() / dense.norm()) < 0.03
    t, _ = quant_gated_gather(x, rows, torch.arange(m), act, impl="torch")
    _close(t, dense, "torch impl")


def test_quant_gated_gather_refuses_bad_arguments(isa):
    _needs_ext(isa)
    rows, x = _rows("q8_0", m=20)
    with pytest.raises(RuntimeError, match="out of range"):
        quant_gated_gather(x, rows, torch.tensor([0, 20]), "silu", impl="ext")
    with pytest.raises(RuntimeError, match="out of range"):
        quant_gated_gather(x, rows, torch.tensor([1 << 32]), "silu", impl="ext")
    with pytest.raises(RuntimeError, match="blocks"):
        quant_gated_gather(x[:40], rows, torch.tensor([0]), "silu", impl="ext")
    with pytest.raises(RuntimeError, match="verify_weights"):
        quant_gated_gather(x, rows, torch.tensor([0]), "silu", (torch.rand(3), 0.1), impl="ext")
    with pytest.raises(ValueError, match="unsupported activation"):
        quant_gated_gather(x, rows, torch.tensor([0]), "relu", impl="ext")


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quant_lowrank_routed_ffn_equals_reference(isa, fmt, pdtype):
    _needs_ext(isa)
    m, d, r = 300, 96, 16
    rows, x = _rows(fmt, m, d)
    g = torch.Generator().manual_seed(5)
    A = (torch.randn(r, d, generator=g) / d**0.5).to(pdtype)
    B = (torch.randn(2 * m, r, generator=g) / r**0.5).to(pdtype)
    yb = B.float() @ (A.float() @ x)
    s = (ACTIVATIONS["silu"](yb[:m]) * yb[m:]).abs()
    vw = torch.rand(m) + 0.5
    for f in (0.05, 0.3, 1.0):
        theta = float(stat_threshold(s, f))
        near = int(((s - theta).abs() <= 1e-4 * float(s.std())).sum())
        for verify in (None, (vw, float((_h(x, rows, "silu").abs() * vw).median()) * 1.001)):
            ref, p_ref, k_ref = quant_lowrank_routed_ffn(x, A, B, f, "silu", rows, verify, impl="reference")
            got, p, k = quant_lowrank_routed_ffn(x, A, B, f, "silu", rows, verify, impl="ext")
            assert abs(p - p_ref) <= near, (isa, f)
            if p == p_ref and near == 0:
                assert abs(k - k_ref) <= 1
                if k == k_ref:
                    _close(got, ref, f"{isa} {fmt} f={f}")
            if verify is None:
                assert k == p
    y1, p1, _ = quant_lowrank_routed_ffn(x, A, B, 1.0, "silu", rows, impl="ext")  # f = 1: every neuron
    assert p1 == m
    _close(y1, quant_gated_gather(x, rows, torch.arange(m), "silu", impl="ext")[0])
    _, p2, _ = quant_lowrank_routed_ffn(x, A, B, 0.3, "silu", rows, score_act="gelu_tanh", impl="ext")
    _, p2r, _ = quant_lowrank_routed_ffn(x, A, B, 0.3, "silu", rows, score_act="gelu_tanh", impl="reference")
    assert abs(p2 - p2r) <= 2
    with pytest.raises(RuntimeError, match="A \\(r, d\\)"):
        quant_lowrank_routed_ffn(x, A, B[:-1], 0.3, "silu", rows, impl="ext")


@pytest.mark.parametrize("fmt", FMTS)
def test_quant_sparse_input_matvec_equals_reference(isa, fmt):
    _needs_ext(isa)
    g = torch.Generator().manual_seed(7)
    w_t = quantize(torch.randn(200, 160, generator=g), fmt)  # W^T: rows along the output dimension
    x = torch.randn(200, generator=g)
    x[:10] = 0.0
    for t in (-1.0, 0.0, _gap(x.abs(), 0.5), _gap(x.abs(), 0.95), 1e9):
        ref, n_ref = quant_sparse_input_matvec(w_t, x, t, impl="reference")
        got, n = quant_sparse_input_matvec(w_t, x, t, impl="ext")
        assert n == n_ref and got.shape == (160,)
        _close(got, ref, f"{isa} {fmt} t={t}")
        tor, n_t = quant_sparse_input_matvec(w_t, x, t, impl="torch")
        assert n_t == n_ref
        _close(tor, ref)
    assert quant_sparse_input_matvec(w_t, x, -1.0, impl="ext")[1] == 200
    assert quant_sparse_input_matvec(w_t, x, 0.0, impl="ext")[1] == 190
    # the dense product with the dequantized weights (no activation rounding on this path)
    _close(quant_sparse_input_matvec(w_t, x, -1.0, impl="ext")[0], dequantize(w_t).t() @ x)
    xb = x.bfloat16()
    _close(quant_sparse_input_matvec(w_t, xb, -1.0, impl="ext")[0], dequantize(w_t).t() @ xb.float())
    with pytest.raises(RuntimeError, match="rows"):
        quant_sparse_input_matvec(w_t, x[:50], 0.1, impl="ext")


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("act", ACTS)
def test_quant_teal_ffn_decode_equals_reference(isa, fmt, act):
    _needs_ext(isa)
    g = torch.Generator().manual_seed(8)
    d, m, dout = 96, 128, 64
    gate_up_t = quantize(torch.randn(d, 2 * m, generator=g), fmt)
    down_t = quantize(torch.randn(m, dout, generator=g), "q8_0" if fmt == "q4_0" else fmt)
    x = torch.randn(d, generator=g)
    for t_in in (-1.0, _gap(x.abs(), 0.4)):
        gu, _ = quant_sparse_input_matvec(gate_up_t, x, t_in, impl="reference")
        h = ACTIVATIONS[act](gu[:m]) * gu[m:]
        for t_down in (-1.0, _gap(h.abs(), 0.5), 1e9):
            ref = quant_teal_ffn_decode(x, gate_up_t, down_t, t_in, t_down, act, impl="reference")
            got = quant_teal_ffn_decode(x, gate_up_t, down_t, t_in, t_down, act, impl="ext")
            assert got[1:] == ref[1:], (isa, t_in, t_down)
            _close(got[0], ref[0], f"{isa} {fmt} {act} t_in={t_in} t_down={t_down}")
            tor = quant_teal_ffn_decode(x, gate_up_t, down_t, t_in, t_down, act, impl="torch")
            assert tor[1:] == ref[1:]
            _close(tor[0], ref[0])
    with pytest.raises(ValueError, match="2m"):
        quant_teal_ffn_decode(x, gate_up_t, quantize(torch.randn(m + 32, dout), fmt), 0.1, 0.1, act, impl="ext")


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("act", ACTS)
def test_quant_cats_ffn_decode_equals_reference(isa, fmt, act):
    _needs_ext(isa)
    from sparkformer.ops.quant import quant_matvec_reference

    g = torch.Generator().manual_seed(9)
    d, m, dout = 96, 160, 64
    gate_up = quantize(torch.randn(2 * m, d, generator=g), fmt)
    down_t = quantize(torch.randn(m, dout, generator=g), fmt)
    x = torch.randn(d, generator=g)
    a = ACTIVATIONS[act](quant_matvec_reference(gate_up, x)[:m]).abs()
    for t in (-1.0, _gap(a, 0.3), _gap(a, 0.9), 1e9):
        ref, k_ref = quant_cats_ffn_decode(x, gate_up, down_t, t, act, impl="reference")
        got, k = quant_cats_ffn_decode(x, gate_up, down_t, t, act, impl="ext")
        assert k == k_ref, (isa, t)
        _close(got, ref, f"{isa} {fmt} {act} t={t}")
        tor, k_t = quant_cats_ffn_decode(x, gate_up, down_t, t, act, impl="torch")
        if t in (-1.0, 1e9):
            assert k_t == k_ref
            assert float((tor - ref).norm()) <= 0.03 * max(1.0, float(ref.norm()))
    assert quant_cats_ffn_decode(x, gate_up, down_t, -1.0, act, impl="ext")[1] == m
    with pytest.raises(ValueError, match="2m"):
        quant_cats_ffn_decode(x, gate_up, quantize(torch.randn(m - 32, dout), fmt), 0.1, act, impl="ext")
    with pytest.raises(RuntimeError, match="NaN"):
        torch.ops.sparkformer.quant_cats_ffn_decode(x, gate_up.data, FORMATS[fmt], down_t.data, FORMATS[fmt], dout,
                                                    float("nan"), act)


def test_ops_on_the_automatic_isa():
    """The tests above narrow the ISA; the automatic choice (e.g. AVX-512 VNNI) runs the same ops."""
    if not _extension.available():
        pytest.skip("C++ extension unavailable")
    _extension.set_isa("auto")
    rows, x = _rows("q4_0")
    idx = torch.arange(0, 300, 3)
    _close(quant_gated_gather(x, rows, idx, "silu", impl="ext")[0],
           quant_gated_gather(x, rows, idx, "silu", impl="reference")[0])
    w_t = quantize(torch.randn(96, 64), "q8_0")
    _close(quant_sparse_input_matvec(w_t, x, 0.5, impl="ext")[0],
           quant_sparse_input_matvec(w_t, x, 0.5, impl="reference")[0])


# ------------------------------------------------------------------------------------------------
# Engines: quantized routed / thresholded layers against the float path on the dequantized weights
# ------------------------------------------------------------------------------------------------
def _model(seed=0):
    return tiny_silu_lm(seed=seed)


def _routers(m, verify=False):
    from sparkformer.bricks.routing import LowRankPredictor

    d, n = m.config.d_model, m.config.ffn_dim
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(m.config.n_layers):
        r = LowRankPredictor(torch.randn(2 * n, 16, generator=g), A=torch.randn(16, d, generator=g), output="gate_up",
                             act="silu", fraction=0.3, method="stat")
        out.append(r.set_verify(torch.rand(n, generator=g) + 0.5, 0.15) if verify else r)
    return out


SITES = {"teal": ("gate_up", "down"), "cats": ("gate_act",), "down": ("down",), "model": ("qkv", "o", "gate_up")}


def _kw(m, kind):
    from sparkformer.sparsity import LayerThresholds, SparseSpec

    if kind.startswith("routed"):
        return {"routers": _routers(m, verify=kind == "routed_verify")}
    return {"sparsity": SparseSpec([LayerThresholds(**{s: 0.5 for s in SITES[kind]}) for _ in m.layers])}


def _float_twin(e):
    """A float (fp32) engine over the quantized engine's weights dequantized: the same layers, routers, thresholds."""
    from sparkformer.decode import CpuEngine, DecodeLayer, ModelLayout
    from sparkformer.decode.routed import dequantize_routed, routed_float_ffn
    from sparkformer.decode.sparse import dequantize_sparse_layer, sparse_prefill_weights
    from sparkformer.ops.dense_decode import GegluWeights
    from sparkformer.ops.quant import QuantMatrix

    f32 = torch.float32

    def dq(w):
        return dequantize(w) if isinstance(w, QuantMatrix) else w

    layers = []
    for st in e.layers:
        if st.routed is not None:
            ffn = routed_float_ffn(st.routed, f32)
        else:
            gu = dequantize(st.ffn.gate_up)
            m = gu.shape[0] // 2
            ffn = GegluWeights(gu[:m], gu[m:], dequantize(st.ffn.down).t().contiguous())
        w_qkv, w_o, sp = dq(st.w_qkv), dq(st.w_o), None
        routed = None if st.routed is None else dequantize_routed(st.routed, f32)
        if st.sparse is not None:
            w_qkv, w_o, ffn = sparse_prefill_weights(st.sparse, w_qkv, w_o, ffn, f32)
            sp = dequantize_sparse_layer(st.sparse, f32)
        layers.append(DecodeLayer(st.attn_kind, st.ffn_kind, st.window, w_qkv.contiguous(), w_o.contiguous(),
                                  st.norms, ffn, routed=routed, sparse=sp, qk_norms=st.qk_norms,
                                  rope_theta=st.rope_theta))
    return CpuEngine(ModelLayout(e.cfg, dq(e.embed), dq(e.head), e.final_norm, layers, f32), e.max_len)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
def test_quantized_routed_layer_selects_as_the_float_layer(fmt, verify):
    from sparkformer.decode import make_engine
    from sparkformer.decode.routed import routed_ffn_decode

    m = _model()
    e = make_engine(m, fmt, 32, **_kw(m, "routed_verify" if verify else "routed"))
    f = _float_twin(e)
    silu = ACTIVATIONS["silu"]
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        for sq, sf in zip(e.layers, f.layers):
            x = torch.randn(64, generator=g) * 2
            yq, nq = routed_ffn_decode(sq.routed, x, silu, e.dtype, e._mv, impl="auto")
            yf, nf = routed_ffn_decode(sf.routed, x, silu, f.dtype, f._mv, f._gather, f._gather_verify,
                                       f._routed_fused)
            assert abs(sq.routed.last_gate_up - sf.routed.last_gate_up) <= 1  # the same router, scores in fp32
            if sq.routed.last_gate_up == sf.routed.last_gate_up and (nq == nf or not verify):
                assert nq == nf
                # the same neurons: only the int8 rounding of x in the gate/up dot products differs
                assert float((yq - yf).norm() / yf.norm()) < 0.03
    assert sq.routed.quant is not None and sq.routed.gate_up.dtype == torch.uint8
    assert sq.routed.router.B.dtype == torch.bfloat16  # the router stays float


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("kind", list(SITES))
def test_quantized_thresholded_layer_selects_as_the_float_layer(fmt, kind):
    from sparkformer.decode import make_engine
    from sparkformer.decode.sparse import sparse_ffn_decode, sparse_matvec

    m = _model()
    e = make_engine(m, fmt, 32, **_kw(m, kind))
    f = _float_twin(e)
    silu = ACTIVATIONS["silu"]
    g = torch.Generator().manual_seed(4)
    for sq, sf in zip(e.layers, f.layers):
        x = torch.randn(64, generator=g) * 1.5
        if kind == "model":  # q/k/v and o: the same inputs kept, the same rows (dequantized) summed
            for wq, wf, t in ((sq.sparse.w_qkv_t, sf.sparse.w_qkv_t, 0.5), (sq.sparse.w_o_t, sf.sparse.w_o_t, 0.5)):
                yq, nq = sparse_matvec(wq, x, t)
                yf, nf = sparse_matvec(wf, x, t)
                assert nq == nf
                _close(yq, yf)
        yq, rq = sparse_ffn_decode(sq.sparse, sq.ffn, x, silu, "silu", e.dtype)
        yf, rf = sparse_ffn_decode(sf.sparse, sf.ffn, x, silu, "silu", f.dtype)
        if kind in ("teal", "model"):  # no activation rounding on this path: equal up to summation order
            assert rq == pytest.approx(rf)
            _close(yq, yf)
        else:  # the gate (CATS) or gate/up (down site) dot products see x rounded to int8: a neuron may flip
            assert abs(rq - rf) < 0.05
            assert float((yq - yf).norm() / yf.norm()) < 0.1
    assert isinstance(sq.sparse.down_t if kind != "model" else sq.sparse.w_qkv_t, type(sq.w_qkv))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("kind", ["routed", "routed_verify", "teal", "cats", "model"])
def test_quantized_sparse_engine_agrees_with_float_and_reference(fmt, kind, one_thread):
    from sparkformer.decode import make_engine

    m = _model()
    kw = _kw(m, kind)
    e = make_engine(m, fmt, 32, **kw)
    ids = torch.randint(0, 40, (18,), generator=torch.Generator().manual_seed(2))
    # the C++ path against the plain-PyTorch references through the whole engine: equal, same selections
    r = make_engine(m, fmt, 32, impl="reference", **kw)
    torch.testing.assert_close(e.prefill(ids[:10]), r.prefill(ids[:10]), rtol=1e-4, atol=1e-4)
    for t in ids[10:]:
        torch.testing.assert_close(e.step(int(t)), r.step(int(t)), rtol=1e-4, atol=1e-4)
    assert e.stats.summary() == r.stats.summary()
    # against the float engine on the dequantized weights: close (bf16 activations and cache, x rounded to int8 in
    # the dot products, so a selection near its threshold may flip), same selections on average
    f = _float_twin(e)
    e.reset()
    errs = [float((e.prefill(ids[:10]) - (b := f.prefill(ids[:10]))).norm() / b.norm())]
    agree = 0
    for t in ids[10:]:
        a, b = e.step(int(t)), f.step(int(t))
        errs.append(float((a - b).norm() / b.norm()))
        agree += int(a.argmax() == b.argmax())
    errs.sort()
    assert errs[len(errs) // 2] < 0.1 and agree >= 6, (errs, agree)
    sq, sf = e.stats.summary(), f.stats.summary()
    key = "ffn_activity" if kind.startswith("routed") else "thresholded_weights_read"
    assert 0.05 < sq[key] < 0.95 and abs(sq[key] - sf[key]) < 0.03, (sq, sf)
    if kind == "routed_verify":
        assert sq["ffn_gate_up_activity"] > sq["ffn_activity"]


def test_quantized_routed_layout_holds_the_format_bytes():
    from sparkformer.decode import make_engine

    m = _model()
    dense = make_engine(m, "q8_0", 32)
    routed = make_engine(m, "q8_0", 32, routers=_routers(m))
    # each routed layer's rows replace the dense FFN (same bytes: gate/up rows along d, W_down^T rows along d)
    assert routed.weight_bytes == dense.weight_bytes
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for st in routed.layers for t in st.ffn)
    teal = make_engine(m, "q8_0", 32, sparsity=_kw(m, "teal")["sparsity"])
    # thresholded FFN sites add their W^T / W_down^T rows beside the dense copy, as the float engine does
    ffn_q8 = (2 * 96 * 64 + 96 * 64) * 34 // 32
    assert teal.weight_bytes == dense.weight_bytes + 2 * ffn_q8


def _checkpoint(folder, corpus):
    """A tiny checkpoint folder whose vocabulary is its tokenizer's (so ``eval`` runs it on data of that tokenizer)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from sparkformer.config import ModelConfig
    from sparkformer.model import SparkLM
    from sparkformer.tokenizer import train_bpe

    tok = train_bpe([p.read_text() for src in corpus for p in sorted(Path(src).glob("*.txt"))], vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      ffn_dim=64, max_seq_len=128, sliding_window=16, ffn="geglu", attention="dense",
                      norm_style="llama", post_norms=False, embed_scale=False, ffn_activation="silu")
    torch.manual_seed(0)
    model = SparkLM(cfg).eval()
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {"seq_len": 32}}))
    tok.save(folder / "tokenizer.json")
    return model


def test_sparsified_folder_runs_quantized_in_eval_and_bench(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from test_data import make_corpus
    from test_loading import _sparsified

    from sparkformer.cli import main
    from sparkformer.data import prepare
    from sparkformer.decode import make_engine
    from sparkformer.loading import load_model
    from sparkformer.sparsity import LayerThresholds, SparseSpec

    corpus = make_corpus(tmp_path / "corpus", n_docs=4)
    base = _checkpoint(tmp_path / "ck", corpus)
    _sparsified(tmp_path / "routed", str(tmp_path / "ck"), base)
    spec = SparseSpec([LayerThresholds(gate_up=0.02, down=0.01)] * 2, method="teal",
                      meta={"model": str(tmp_path / "ck")})
    spec.save(tmp_path / "teal")
    data = prepare(corpus, out=tmp_path / "data", tokenizer=tmp_path / "ck" / "tokenizer.json", val_fraction=0.5,
                   quiet=True)
    for folder in ("routed", "teal"):
        loaded = load_model(str(tmp_path / folder))
        e = make_engine(loaded.model, "q8_0", 64, routers=loaded.routers, sparsity=loaded.sparsity)
        assert e.weight_format == "q8_0" and e.prefill(list(range(5, 15))).shape == (base.config.vocab_size,)
        assert main(["eval", "--model", str(tmp_path / folder), "--dtype", "q8_0", "--data", str(data),
                     "--seq-len", "16", "--max-tokens", "64", "--device", "cpu"]) == 0
        assert main(["bench", "decode", "--model", str(tmp_path / folder), "--dtype", "q8_0", "--context", "16",
                     "--tokens", "2", "--repeats", "1", "--no-hf", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "q8_0" in out


def test_q4_1_runs_in_the_sparse_ops():
    """q4_1 (a scale and a minimum per block) through the C++ sparse ops equals the reference (its rows take the
    kernel table's axpy, not the 8-row q8_0 / q4_0 accumulators)."""
    rows, x = _rows("q4_1", m=40)
    idx = torch.arange(0, 40, 3)
    y, k = quant_gated_gather(x, rows, idx, "silu", impl="ext")
    yr, kr = quant_gated_gather(x, rows, idx, "silu", impl="reference")
    assert k == kr == idx.numel()
    _close(y, yr)
    w_t = quantize(torch.randn(64, 96), "q4_1")
    _close(quant_sparse_input_matvec(w_t, x[:64], 0.3, impl="ext")[0],
           quant_sparse_input_matvec(w_t, x[:64], 0.3, impl="reference")[0])