"""Triton dense-attention and glue kernels vs their plain-PyTorch references, and the CUDA engine vs the CPU engine
(the Spark kernels have their own files: ``test_triton_spark_ffn.py``, ``test_triton_spark_attn.py``).

Without a GPU the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set here before
triton is imported); with one they compile and run on CUDA. Marked ``triton`` (deselected by default; run with
``pytest -m triton tests/test_triton_decode.py``), skipped when triton is absent. ``gpu`` tests need CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from sparkformer.ops.dense_decode import dense_attn_decode_reference  # noqa: E402
from sparkformer.ops.triton_decode import (  # noqa: E402
    dense_attn_decode_triton, embed_norm, geglu_act, res_norm_gemv, residual_norm, rope_cache)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.triton


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(200, None, None), (200, 64, 50.0), (5, None, 30.0), (1, 16, None)])
def test_dense_attn_matches_reference(dtype, case):
    length, window, cap = case
    H, KV, D, L = 4, 2, 32, 256
    q = torch.randn(H, D)
    k, v = torch.randn(KV, L, D).to(dtype), torch.randn(KV, L, D).to(dtype)
    ref = dense_attn_decode_reference(q, k, v, length, D**-0.5, window, cap)
    out = dense_attn_decode_triton(q.to(DEV), k.to(DEV), v.to(DEV), length, D**-0.5, window, cap)
    assert rel(out.float(), ref.float()) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_glue_kernels_match_torch():
    from sparkformer.ops.activations import gelu_tanh
    from sparkformer.ops.rope import apply_rope, rope_tables

    d, H, KV, D, r, L, eps = 48, 4, 2, 16, 8, 64, 1e-6
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w  # noqa: E731
    emb = torch.randn(10, d)
    w0, w1, w2 = torch.randn(d), torch.randn(d), torch.randn(d)
    tok, pos = torch.tensor([7]), torch.tensor([5], dtype=torch.int32)
    h, xn, ln = torch.empty(d), torch.empty(d), torch.zeros(1, dtype=torch.int32)
    to = lambda *ts: [t.to(DEV) for t in ts]  # noqa: E731
    hd, xnd, lnd = to(h, xn, ln)
    embed_norm(*to(tok, emb), 2.0, hd, w0.to(DEV), xnd, pos.to(DEV), lnd, eps)
    assert rel(hd, emb[7] * 2) < 1e-6 and rel(xnd, rms(emb[7] * 2, w0)) < 1e-6 and int(lnd) == 6
    o = torch.randn(d)
    for post in (w1, None):
        h0 = hd.clone()
        residual_norm(o.to(DEV), hd, None if post is None else post.to(DEV), w2.to(DEV), xnd, eps)
        hh = h0.cpu() + (rms(o, post) if post is not None else o)
        assert rel(hd, hh) < 1e-6 and rel(xnd, rms(hh, w2)) < 1e-6
    # residual + post-norm + pre-norm folded into the GEMV prologue == residual_norm then torch.mv
    for post, dt in ((w1, torch.float32), (None, torch.float32), (w1, torch.bfloat16)):
        W = torch.randn(37, d).to(dt)
        h0 = hd.clone()
        h_out, y = torch.empty_like(h0), torch.empty(37, dtype=dt, device=DEV)
        res_norm_gemv(o.to(DEV), h0, h_out, None if post is None else post.to(DEV), w2.to(DEV), W.to(DEV), y, eps)
        h_ref, xn_ref = h0.clone(), torch.empty(d, dtype=dt, device=DEV)
        residual_norm(o.to(DEV), h_ref, None if post is None else post.to(DEV), w2.to(DEV), xn_ref, eps)
        assert rel(h_out, h_ref) < 1e-6 and rel(h0, hd) == 0  # the input buffer is left alone
        assert rel(y.float(), W.float().to(DEV) @ xn_ref.float()) < (1e-5 if dt == torch.float32 else 1e-2)
    y = torch.empty(37, device=DEV)
    res_norm_gemv(None, hd, None, None, w2.to(DEV), W.float().to(DEV), y, eps)  # norm only (no residual)
    assert rel(y, W.float() @ rms(hd.cpu(), w2)) < 1e-5
    gu, a = torch.randn(2 * 40), torch.empty(40)
    ad = a.to(DEV)
    geglu_act(gu.to(DEV), ad)
    assert rel(ad, gelu_tanh(gu[:40]) * gu[40:]) < 1e-6
    # RoPE + cache write, Spark layout (two rotary spaces) and dense
    qkv = torch.randn((H + 2 * KV) * D)
    tabs = {n: tuple(t.to(DEV) for t in rope_tables(n, 0, L, 10000.0)) for n in (D, r, D - r)}
    q_out = torch.empty(H, D, device=DEV)
    kp = torch.zeros(KV, L // 64, r, 64, device=DEV)
    krv = torch.zeros(KV, L, 2 * D - r, device=DEV)
    rope_cache(qkv.to(DEV), pos.to(DEV), q_out, tabs[r], tabs[D - r],
               ("spark", kp, krv[..., : D - r], krv[..., D - r:]), H, KV, D, r)
    x = qkv.view(H + 2 * KV, D)
    cs = {n: rope_tables(n, 0, L, 10000.0) for n in (D, r, D - r)}
    rot = lambda t, n, off: apply_rope(t[..., off:off + n], cs[n][0][5], cs[n][1][5])  # noqa: E731
    want = torch.cat([rot(x, r, 0), rot(x, D - r, r)], -1)
    assert rel(q_out, want[:H]) < 1e-6
    assert rel(kp[:, 0, :, 5], want[H:H + KV, :r]) < 1e-6
    assert rel(krv[:, 5, : D - r], want[H:H + KV, r:]) < 1e-6 and rel(krv[:, 5, D - r:], x[H + KV:]) < 1e-6
    k, v = torch.zeros(KV, L, D, device=DEV), torch.zeros(KV, L, D, device=DEV)
    rope_cache(qkv.to(DEV), pos.to(DEV), q_out, tabs[D], None, ("dense", k, v), H, KV, D, D)
    assert rel(q_out, rot(x, D, 0)[:H]) < 1e-6 and rel(k[:, 5], rot(x, D, 0)[H:H + KV]) < 1e-6


# ---- the engine ----------------------------------------------------------------------------------------------
def _tiny_cfg(**kw):
    from sparkformer.config import ModelConfig

    base = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64,
                max_seq_len=128, sliding_window=8, spark_attn_topk=4, spark_ffn_rank=32)
    return ModelConfig(**{**base, **kw})


LLAMA = dict(norm_style="llama", post_norms=False, embed_scale=False, ffn_activation="silu", attn_logit_softcap=None,
             final_logit_softcap=None)


@pytest.mark.parametrize("kinds,fuse,style", [(("geglu", "dense"), False, {}), (("spark", "spark"), False, {}),
                                              (("spark", "spark"), True, {}), (("geglu", "spark"), True, {}),
                                              (("geglu", "dense"), True, LLAMA)])
def test_cuda_engine_matches_cpu_engine(kinds, fuse, style):
    """Same logits as the CPU engine through (batched) prefill and greedy decode (fp32, so the two agree closely);
    ``fuse``: residual + pre-norm folded into the q/k/v GEMV; ``style``: Llama-style (no post-norms, SiLU)."""
    from sparkformer.decode import make_engine, model_layout
    from sparkformer.decode.cuda import CudaEngine
    from sparkformer.model import SparkLM

    torch.manual_seed(0)
    cfg = _tiny_cfg(ffn=kinds[0], attention=kinds[1], spark_attn_hard_cap=True, **style)
    model = SparkLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so the norm multipliers are exercised
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.1)
    ref = make_engine(model, torch.float32, max_len=64)
    eng = CudaEngine(model_layout(model, torch.float32), max_len=64, device=DEV, fuse_norm=fuse)
    prompt = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3]  # longer than the window and than k
    l_ref, l_eng = ref.prefill(prompt), eng.prefill(prompt)
    assert rel(l_eng, l_ref) < 1e-4
    tok = int(l_ref.argmax())
    for _ in range(4):
        l_ref, l_eng = ref.step(tok), eng.step(tok)
        assert rel(l_eng, l_ref) < 1e-4
        tok = int(l_ref.argmax())
    s = eng.stats.summary()
    assert s["tokens"] == 4  # decoded tokens, as on the CPU engine (prefill is not counted)
    want = {k: v for k, v in ref.stats.summary().items() if not k.startswith("prefill_")}
    assert s.keys() == want.keys() and s["tokens"] == want["tokens"]
    if kinds[0] == "spark":
        assert 0 < s["ffn_activity"] < 0.5 and 0 < s["keys_per_query"] <= cfg.spark_attn_topk


def test_cuda_batched_prefill_equals_stepwise():
    """Batched prefill (GEMMs) leaves the engine where feeding the prompt one decode step at a time does: the same
    last logits, and the same logits for the tokens decoded after it (so the cache it wrote is the same)."""
    from sparkformer.decode import random_layout
    from sparkformer.decode.cuda import CudaEngine

    cfg = _tiny_cfg(ffn="spark", attention="spark", spark_attn_hard_cap=True)
    eng = CudaEngine(random_layout(cfg, torch.float32, seed=2, device=DEV), max_len=64, device=DEV)
    prompt = [5, 9, 2, 33, 17, 8, 41, 3, 3, 60, 12]
    batched = eng.prefill(prompt)
    after_b = [eng.step(t) for t in (7, 8)]
    eng.reset()
    for t in prompt[:-1]:
        eng.step(t)
    stepwise = eng.step(prompt[-1])
    assert rel(batched, stepwise) < 1e-4
    for a, b in zip(after_b, [eng.step(t) for t in (7, 8)]):
        assert rel(a, b) < 1e-4


def test_cuda_engine_runs_routers_like_the_cpu_engine():
    """Routed (sparkified) FFN layers on the CUDA engine: eager, the same logits and neuron counts as the CPU engine."""
    from sparkformer.bricks.routing import LowRankPredictor
    from sparkformer.decode import make_engine, model_layout
    from sparkformer.decode.cuda import CudaEngine
    from sparkformer.model import SparkLM

    torch.manual_seed(0)
    cfg = _tiny_cfg(ffn="geglu", attention="dense", norm_style="llama", post_norms=False, embed_scale=False,
                    ffn_activation="silu", attn_logit_softcap=None, final_logit_softcap=None)
    model = SparkLM(cfg).eval()
    routers = [LowRankPredictor(torch.randn(2 * cfg.ffn_dim, 8), A=torch.randn(8, cfg.d_model), output="gate_up",
                                act="silu", fraction=0.3, method="stat") for _ in range(cfg.n_layers)]
    ref = make_engine(model, torch.float32, max_len=64, routers=routers)
    eng = CudaEngine(model_layout(model, torch.float32, routers), max_len=64, device=DEV)
    assert not eng.graph_enabled  # data-dependent sizes: no graph
    prompt = [3, 14, 15, 9, 26, 5]
    assert rel(eng.prefill(prompt), ref.prefill(prompt)) < 1e-4
    ref.reset()
    eng.reset()
    ref.prefill(prompt)
    eng.prefill(prompt)
    for tok in (7, 8, 9):
        assert rel(eng.step(tok), ref.step(tok)) < 1e-4
    a, b = eng.stats.summary(), ref.stats.summary()
    assert a["ffn_neurons_per_layer"] == b["ffn_neurons_per_layer"] and 0 < a["ffn_activity"] < 0.6


def test_cuda_engine_generate_and_positions():
    from sparkformer.decode import random_layout
    from sparkformer.decode.cuda import CudaEngine

    cfg = _tiny_cfg(ffn="spark", attention="spark")
    eng = CudaEngine(random_layout(cfg, torch.float32, seed=1, device=DEV), max_len=64, device=DEV)
    a = list(eng.generate([1, 2, 3], 5))
    assert eng.pos == 3 + 4 and int(eng.pos_t) == eng.pos
    eng.reset()
    assert list(eng.generate([1, 2, 3], 5)) == a  # greedy decode is deterministic after reset
    eng.reset()
    eng.prefill([1, 2, 3])
    eng.decode_greedy(4)  # device-side feedback gives the same tokens
    assert eng.pos == 7
    with pytest.raises(ValueError):
        list(eng.generate([1] * 60, 10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fuse,pdl", [(False, False), (True, True)])
def test_cuda_graph_replay_matches_eager(fuse, pdl):
    """The captured step (tuned launch shapes; optionally the fused norm GEMV and programmatic dependent launch)
    replays to what the plain eager step computes."""
    from sparkformer.decode import make_random_engine, random_layout
    from sparkformer.decode.cuda import CudaEngine

    cfg = _tiny_cfg(ffn="spark", attention="spark", d_model=256, ffn_dim=512, spark_ffn_rank=128, head_dim=64,
                    spark_attn_topk=16, sliding_window=32)
    eager = make_random_engine(cfg, torch.bfloat16, max_len=128, device="cuda", seed=3, graph=False)
    graph = CudaEngine(random_layout(cfg, torch.bfloat16, seed=3, device="cuda"), max_len=128, device="cuda",
                       graph=True, fuse_norm=fuse, pdl=pdl)
    prompt = list(range(1, 41))
    le, lg = eager.prefill(prompt), graph.prefill(prompt)
    assert rel(lg, le) < 2e-2
    for _ in range(8):
        tok = int(le.argmax())
        le, lg = eager.step(tok), graph.step(tok)
        assert rel(lg, le) < 2e-2
