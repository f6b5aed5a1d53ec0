"""Triton decode kernels vs their plain-PyTorch references.

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
from sparkformer.ops.spark_attn_decode import spark_attn_decode_reference, to_blocked  # noqa: E402
from sparkformer.ops.spark_ffn_decode import spark_ffn_decode_reference  # noqa: E402
from sparkformer.ops.stat_topk import stat_threshold  # noqa: E402
from sparkformer.ops.triton_decode import (  # noqa: E402
    dense_attn_decode_triton, embed_norm, geglu_act, residual_norm, rope_cache)
from sparkformer.ops.triton_spark_attn import spark_attn_decode_triton, triton_spark_attn_decode  # noqa: E402
from sparkformer.ops.triton_spark_ffn import spark_ffn_decode_triton, triton_spark_ffn_decode  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.triton


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_selects_like_stat_threshold(got: torch.Tensor, score: torch.Tensor, k: int | float, what=""):
    """got == (score > stat_topk.stat_threshold(score, k)), except for entries within 1e-4 std of theta (the
    kernels' fp32 partial statistics may round theta differently)."""
    theta = stat_threshold(score, k)
    diff = got.cpu() != (score > theta)
    near = (score - theta).abs() <= 1e-4 * score.std(correction=0)
    assert bool(near[diff].all()), f"{what}: selections differ away from theta at {torch.nonzero(diff & ~near)}"


@pytest.mark.parametrize("fuse_out", [False, True])
def test_spark_ffn_selects_what_stat_threshold_selects(fuse_out):
    """The kernel's own theta (fp32 Chan-combined partials, z = stat_z(f)) selects as the one definition does."""
    n, d, r = 600, 80, 48
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(d, generator=g)
        k1, k2 = torch.randn(n, r, generator=g) * 0.2, torch.randn(n, d - r, generator=g) * 0.2
        v = torch.eye(n)  # y_i = gelu(s_i - theta) (K2 x2)_i: nonzero exactly on the selected neurons
        y, n_sel = spark_ffn_decode_triton(x.to(DEV), k1.to(DEV), k2.to(DEV), v.to(DEV), 0.08, fuse_out)
        assert_selects_like_stat_threshold(y != 0, k1 @ x[:r], 0.08, f"seed {seed}")
        assert int(n_sel) == int((y != 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fuse_out", [False, True])
def test_spark_ffn_matches_reference(dtype, fuse_out):
    n, d, r, d_out = 700, 96, 40, 80
    x = torch.randn(d)
    k1, k2, v = (torch.randn(n, c) * 0.2 for c in (r, d - r, d_out))
    k1, k2, v = k1.to(dtype), k2.to(dtype), v.to(dtype)
    y_ref, n_ref = spark_ffn_decode_reference(x, k1, k2, v, 0.08)
    y, n_sel = spark_ffn_decode_triton(x.to(DEV), k1.to(DEV), k2.to(DEV), v.to(DEV), 0.08, fuse_out)
    assert abs(int(n_sel) - int(n_ref)) <= 1  # fp32 summation order may move a neuron sitting on theta
    assert 0.03 < int(n_sel) / n < 0.15
    assert rel(y, y_ref) < 1e-5  # soft threshold: a neuron at theta contributes ~0, so y stays close anyway


@pytest.mark.parametrize("kw", [dict(block_c=32, sub=8, splits=64), dict(fuse_out=True, block_c=32, sub=8),
                                dict(block_n=8, block_k=1024, block_c=32, sub=8, splits=5, block_s=4),
                                dict(block_n=32, block_k=512, warps=8, sub=4)])
def test_spark_ffn_launch_shapes(kw):
    """Every launch shape the on-device tuner may pick computes the same function."""
    from sparkformer.ops.triton_spark_ffn import SparkFFNPlan

    n, d, r = 500, 80, 48
    x = torch.randn(d)
    k1, k2, v = (torch.randn(n, c) * 0.2 for c in (r, d - r, d))
    y_ref, n_ref = spark_ffn_decode_reference(x, k1, k2, v, 0.1)
    plan = SparkFFNPlan.for_weights(k1.to(DEV), k2.to(DEV), v.to(DEV), 0.1, **kw)
    y = plan.run(x.to(DEV), k1.to(DEV), k2.to(DEV), v.to(DEV))
    assert abs(int(plan.cnt[0]) - int(n_ref)) <= 1 and rel(y, y_ref) < 1e-5


def test_spark_ffn_custom_op_and_strided_views():
    n, d, r = 300, 64, 32
    x = torch.randn(d, dtype=torch.bfloat16)
    packed = torch.randn(n, (d - r) + d) * 0.3  # K2 and V rows adjacent, as prepare_spark_ffn lays them out
    k1 = torch.randn(n, r) * 0.3
    y_ref, _ = spark_ffn_decode_reference(x, k1, packed[:, : d - r], packed[:, d - r:], 0.1)
    packed_d = packed.to(DEV)
    y, n_sel = triton_spark_ffn_decode(x.to(DEV), k1.to(DEV), packed_d[:, : d - r], packed_d[:, d - r:], 0.1)
    assert y.dtype == torch.bfloat16 and n_sel.dtype == torch.int64
    assert rel(y.float(), y_ref.float()) < 1e-2


def test_spark_ffn_constant_scores_select_nothing():
    n, d, r = 128, 32, 16
    x = torch.zeros(d)
    x[r:] = 1.0  # predictor input zero -> every score equal -> theta = mean, nothing strictly above it
    k1, k2, v = torch.randn(n, r), torch.randn(n, d - r), torch.randn(n, d)
    y, n_sel = spark_ffn_decode_triton(x.to(DEV), k1.to(DEV), k2.to(DEV), v.to(DEV), 0.08)
    assert int(n_sel) == 0 and float(y.abs().max()) == 0.0


def _spark_cache(n_kv, L, D, r, dtype, blocked):
    kp = torch.randn(n_kv, r, L).to(dtype)
    krv = torch.randn(n_kv, L, (D - r) + D).to(dtype)
    return (to_blocked(kp) if blocked else kp), krv[..., : D - r], krv[..., D - r:]


CASES = [  # length, k, window, softcap
    (200, 16, None, None),
    (200, 16, 64, 50.0),
    (10, 16, None, None),  # n <= k: keep all
    (256, 300, None, 5.0),
    (130, 8, 100, None),
    (1, 4, None, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocked", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_spark_attn_matches_reference(dtype, blocked, case):
    length, k, window, cap = case
    H, KV, D, r, L = 4, 2, 32, 16, 256
    q = torch.randn(H, D).to(dtype)
    kp, kr, v = _spark_cache(KV, L, D, r, dtype, blocked)
    ref = spark_attn_decode_reference(q, kp, kr, v, length, k, D**-0.5, window, cap)
    out = spark_attn_decode_triton(q.to(DEV), kp.to(DEV), kr.to(DEV), v.to(DEV), length, k, D**-0.5, window, cap)
    assert out[1].cpu().tolist() == ref[1].tolist()
    assert out[2].cpu().tolist() == ref[2].tolist()
    assert rel(out[0].float(), ref[0].float()) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("group", [1, 4])
def test_spark_attn_gqa_groups_and_hard_cap(group):
    KV, D, r, L, k = 2, 64, 32, 512, 24
    H = KV * group
    q = torch.randn(H, D) * 3  # large logits -> heavy right tail -> the cap fires often
    kp, kr, v = _spark_cache(KV, L, D, r, torch.float32, True)
    ref = spark_attn_decode_reference(q, kp, kr, v, 500, k, D**-0.5, None, None)
    out = spark_attn_decode_triton(q.to(DEV), kp.to(DEV), kr.to(DEV), v.to(DEV), 500, k, D**-0.5)
    assert out[1].cpu().tolist() == ref[1].tolist() and out[2].cpu().tolist() == ref[2].tolist()
    assert rel(out[0], ref[0]) < 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if c[1] < c[0]])
def test_spark_attn_selects_what_stat_threshold_selects(case):
    """Per head where the hard cap did not fire: the kept keys are those above stat_threshold over the valid keys
    (the kernel: per-block (mean, M2) partials, z from stat_z_table)."""
    length, k, window, cap = case
    H, KV, D, r, L = 4, 2, 32, 16, 256
    q = torch.randn(H, D)
    kp, kr, _ = _spark_cache(KV, L, D, r, torch.float32, False)
    v = torch.eye(L).expand(KV, L, L).contiguous()  # out[h] = the attention weights by position
    out, kept, capped = spark_attn_decode_triton(q.to(DEV), kp.to(DEV), kr.to(DEV), v.to(DEV), length, k, D**-0.5,
                                                 window, cap)
    lo = max(0, length - window) if window else 0
    for h in range(H):
        p = D**-0.5 * (q[h, :r] @ kp[h // (H // KV), :, lo:length])
        p = cap * torch.tanh(p / cap) if cap else p
        if capped[h]:
            assert int((p > stat_threshold(p, k)).sum()) > k == int(kept[h])
        else:
            assert_selects_like_stat_threshold(out[h, lo:length] != 0, p, k, f"head {h}")


def test_spark_attn_degenerate_and_ties():
    """Constant scores keep the k most recent keys (nothing clears theta); tied survivors over the cap prefer
    the more recent key, as the reference's rule says."""
    KV, H, D, r, L, k = 1, 2, 16, 8, 128, 8
    q = torch.randn(H, D)
    q[0, :r] = 0.0  # head 0: every predictor score is 0 -> degenerate
    kp = torch.randn(KV, r, L)
    kp[:, :, 40:80] = kp[:, :, 40:41]  # head 1: 40 identical keys, likely all above theta -> cap with ties
    krv = torch.randn(KV, L, 2 * D - r)
    kr, v = krv[..., : D - r], krv[..., D - r:]
    for length in (100, 120):
        ref = spark_attn_decode_reference(q, kp, kr, v, length, k, D**-0.5)
        out = spark_attn_decode_triton(q.to(DEV), kp.to(DEV), kr.to(DEV), v.to(DEV), length, k, D**-0.5)
        assert out[1].cpu().tolist() == ref[1].tolist() and out[2].cpu().tolist() == ref[2].tolist()
        assert rel(out[0], ref[0]) < 1e-5


def test_spark_attn_custom_op():
    H, KV, D, r, L = 4, 2, 32, 16, 128
    q = torch.randn(H, D, dtype=torch.bfloat16)
    kp, kr, v = _spark_cache(KV, L, D, r, torch.bfloat16, True)
    out, kept, capped = triton_spark_attn_decode(q.to(DEV), kp.to(DEV), kr.to(DEV), v.to(DEV), 100, 16, 0.2, 64, 30.0)
    ref = spark_attn_decode_reference(q, kp, kr, v, 100, 16, 0.2, 64, 30.0)
    assert out.dtype == torch.bfloat16 and kept.dtype == torch.int64 and capped.dtype == torch.bool
    assert kept.cpu().tolist() == ref[1].tolist()


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


@pytest.mark.parametrize("kinds", [("geglu", "dense"), ("spark", "spark")])
def test_cuda_engine_matches_cpu_engine(kinds):
    """Same logits as the CPU DecodeEngine through prefill and greedy decode (fp32, so the two agree closely)."""
    from sparkformer.decode import make_engine, model_layout
    from sparkformer.decode.cuda import CudaEngine
    from sparkformer.model import SparkLM

    torch.manual_seed(0)
    cfg = _tiny_cfg(ffn=kinds[0], attention=kinds[1], spark_attn_hard_cap=True)
    model = SparkLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so the norm multipliers are exercised
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.1)
    ref = make_engine(model, torch.float32, max_len=64)
    eng = CudaEngine(model_layout(model, torch.float32), max_len=64, device=DEV)
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
def test_cuda_graph_replay_matches_eager():
    from sparkformer.decode import make_random_engine

    cfg = _tiny_cfg(ffn="spark", attention="spark", d_model=256, ffn_dim=512, spark_ffn_rank=128, head_dim=64,
                    spark_attn_topk=16, sliding_window=32)
    eager = make_random_engine(cfg, torch.bfloat16, max_len=128, device="cuda", seed=3, graph=False)
    graph = make_random_engine(cfg, torch.bfloat16, max_len=128, device="cuda", seed=3, graph=True)
    prompt = list(range(1, 41))
    le, lg = eager.prefill(prompt), graph.prefill(prompt)
    assert rel(lg, le) < 2e-2
    for _ in range(8):
        tok = int(le.argmax())
        le, lg = eager.step(tok), graph.step(tok)
        assert rel(lg, le) < 2e-2
