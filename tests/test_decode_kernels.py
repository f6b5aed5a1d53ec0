"""Batch-1 decode kernels (sparkformer.ops.*_decode): C++ ops and fast torch paths vs the plain references.

Tolerances. The C++ kernels widen bf16 weights to fp32 exactly and accumulate in fp32, so for both fp32
and bf16 weights they are compared with the fp32 reference on the *same* (upcast) weights at fp32
tolerance (only the summation order differs): rtol 1e-4 on outputs scaled by their max. When the
activation itself is bf16 the result is rounded to bf16 once: 1/128 relative. The pure-torch fallback
multiplies bf16 weights in bf16 (x rounded to bf16 too), so there it gets 3% relative L2 and may flip a
few borderline selections.

Selections are compared exactly, except for entries whose score lies within 1e-4 (relative to the score
spread) of the decision boundary, where a different summation order may legitimately flip them.

The extension is built once and cached (sparkformer.paths.cache_dir("ext", ...)); the first run of this
file on a new machine compiles it (~20-50 s), later runs load it in milliseconds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparkformer.ops import _extension
from sparkformer.ops.dense_decode import (
    dense_attn_decode,
    dense_cache_write,
    geglu_decode,
    matvec,
    new_dense_cache,
    pack_geglu,
)
from sparkformer.ops.spark_attn_decode import (
    feature_major,
    new_spark_cache,
    spark_attn_decode,
    spark_attn_workspace,
    spark_cache_write,
    to_blocked,
)
from sparkformer.ops.spark_ffn_decode import prepare_spark_ffn, spark_ffn_decode, spark_ffn_workspace
from sparkformer.ops.stat_topk import stat_threshold

HAVE_EXT = _extension.available()
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason=f"C++ extension unavailable: {_extension.error()}")


DTYPES = [torch.float32, torch.bfloat16]


def assert_close_scaled(actual, expected, rtol, what=""):
    """max |actual - expected| <= rtol * max |expected| (outputs are sums of many signed terms)."""
    actual, expected = actual.float(), expected.float()
    err = (actual - expected).abs().max().item()
    ref = expected.abs().max().item()
    assert err <= rtol * max(ref, 1e-6), f"{what}: max err {err:.3g} vs max |ref| {ref:.3g}"


def assert_same_selection(got: torch.Tensor, want: torch.Tensor, score: torch.Tensor, boundary: float, what=""):
    """Boolean masks equal, except where the score is within a hair of the decision boundary."""
    diff = got != want
    if diff.any():
        tol = 1e-4 * max(score.std().item(), 1e-6)
        near = (score - boundary).abs() <= tol
        assert bool(near[diff].all()), f"{what}: selections differ away from the boundary at {torch.nonzero(diff & ~near)}"


# ------------------------------------------------------------------------------------------------
# Spark FFN
# ------------------------------------------------------------------------------------------------
def _ffn(seed, d_ff, d, r, d_out, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=g)
    k1 = (torch.randn(d_ff, r, generator=g) / math.sqrt(r)).to(dtype)
    k2 = (torch.randn(d_ff, d - r, generator=g) / math.sqrt(d)).to(dtype)
    v = (torch.randn(d_ff, d_out, generator=g) / math.sqrt(d_ff)).to(dtype)
    return x, k1, k2, v


FFN_SHAPES = [  # (d_ff, d, r, d_out, fraction): tails of every vector width, d_out != d
    (384, 96, 64, 96, 0.08),
    (517, 77, 29, 45, 0.1),
    (256, 160, 128, 200, 0.3),
]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", FFN_SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_spark_ffn_matches_reference(isa, dtype, shape):
    d_ff, d, r, d_out, f = shape
    for seed in range(3):
        x, k1, k2, v = _ffn(seed, d_ff, d, r, d_out, dtype)
        y_ref, n_ref = spark_ffn_decode(x, k1, k2, v, f, impl="reference")
        y, n = spark_ffn_decode(x, k1, k2, v, f, impl="ext")
        assert y.shape == (d_out,) and y.dtype == x.dtype and n.dtype == torch.long
        s = k1.float() @ x[:r]
        theta = stat_threshold(s, f).item()
        border = int(((s - theta).abs() <= 1e-4 * s.std()).sum())
        assert abs(int(n) - int(n_ref)) <= border
        assert_close_scaled(y, y_ref, 1e-4, f"{isa} {dtype} seed {seed}")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_spark_ffn_selection_equals_reference(isa, dtype):
    # With V = identity, y_i = gelu(s_i - theta) * (K2[i] . x2) is nonzero exactly on the selected neurons.
    d_ff, d, r = 600, 80, 48
    for seed in range(3):
        x, k1, k2, _ = _ffn(seed, d_ff, d, r, 1, dtype)
        v = torch.eye(d_ff, dtype=dtype)
        y, n = spark_ffn_decode(x, k1, k2, v, 0.08, impl="ext")
        s = k1.float() @ x[:r]
        theta = stat_threshold(s, 0.08).item()
        assert_same_selection(y != 0, s > theta, s, theta, f"{isa} seed {seed}")
        assert int(n) == int((y != 0).sum())
        y_ref, _ = spark_ffn_decode(x, k1, k2, v, 0.08, impl="reference")
        assert_close_scaled(y, y_ref, 1e-4)


@needs_ext
def test_spark_ffn_bf16_activation_and_threads():
    x, k1, k2, v = _ffn(7, 512, 96, 64, 96, torch.bfloat16)
    xb = x.bfloat16()
    y_ref, _ = spark_ffn_decode(xb, k1, k2, v, 0.08, impl="reference")
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y, _ = spark_ffn_decode(xb, k1, k2, v, 0.08, impl="ext")
            assert y.dtype == torch.bfloat16
            assert_close_scaled(y, y_ref, 1 / 128, f"{t} threads")
    finally:
        torch.set_num_threads(threads)


@needs_ext
def test_spark_ffn_edge_cases():
    x, k1, k2, v = _ffn(3, 300, 64, 32, 64, torch.float32)
    # constant predictor scores (std = 0): nothing selected, no NaN
    y, n = spark_ffn_decode(x, torch.zeros_like(k1), k2, v, 0.08, impl="ext")
    assert int(n) == 0 and torch.equal(y, torch.zeros_like(y))
    # the fraction must be a proper fraction
    for f in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            spark_ffn_decode(x, k1, k2, v, f, impl="ext")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_spark_ffn_packed_layout_and_workspace(dtype):
    d_ff, d, r = 400, 96, 64
    g = torch.Generator().manual_seed(11)
    k, v = torch.randn(d_ff, d, generator=g) / 10, torch.randn(d_ff, d, generator=g) / 20
    w = prepare_spark_ffn(k, v, r, dtype=dtype)
    assert w.k1.is_contiguous() and w.k2.stride(0) == (d - r) + d
    x = torch.randn(d, generator=g)
    y_ref, n_ref = spark_ffn_decode(x, k[:, :r].to(dtype), k[:, r:].to(dtype), v.to(dtype), 0.08, impl="reference")
    ws = spark_ffn_workspace(d_ff, d)
    y, n = spark_ffn_decode(x, *w, 0.08, workspace=ws, impl="ext")
    assert int(n) == int(n_ref)
    assert_close_scaled(y, y_ref, 1e-4)
    with pytest.raises(RuntimeError, match="workspace"):
        spark_ffn_decode(x, *w, 0.08, workspace=torch.empty(10), impl="ext")
    with pytest.raises(RuntimeError, match="fraction"):
        torch.ops.sparkformer.spark_ffn_decode(x, *w, 1.5, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_spark_ffn_torch_path_matches_reference(dtype):
    x, k1, k2, v = _ffn(5, 640, 128, 64, 128, dtype)
    y_ref, n_ref = spark_ffn_decode(x, k1, k2, v, 0.08, impl="reference")
    y, n = spark_ffn_decode(x, k1, k2, v, 0.08, impl="torch")
    if dtype == torch.float32:
        assert int(n) == int(n_ref)
        assert_close_scaled(y, y_ref, 1e-4)
    else:  # bf16 products: a few borderline neurons may flip
        assert abs(int(n) - int(n_ref)) <= 3
        assert (y.float() - y_ref).norm() <= 0.03 * y_ref.norm()


# ------------------------------------------------------------------------------------------------
# Spark attention
# ------------------------------------------------------------------------------------------------
def _cache(seed, n_heads, n_kv, d, r, l_max, dv, dtype, onehot_v=False, layout="plain"):
    """Random query and cache; layout "blocked" rounds L_max up to a multiple of 64 and blocks kp."""
    if layout == "blocked":
        l_max = -(-l_max // 64) * 64
        dv = l_max if onehot_v else dv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_heads, d, generator=g)
    kp = torch.randn(n_kv, r, l_max, generator=g).to(dtype)
    kr = torch.randn(n_kv, l_max, d - r, generator=g).to(dtype)
    if onehot_v:  # out[h] = the attention weights by position: its support is the kept set
        v = torch.eye(l_max).expand(n_kv, l_max, l_max).contiguous().to(dtype)
    else:
        v = torch.randn(n_kv, l_max, dv, generator=g).to(dtype)
    if layout == "blocked":
        kp = to_blocked(kp)
    return q, kp, kr, v


LAYOUTS = ["plain", "blocked"]


def _pred_scores(q, kp, h, group, lo, length, scale, softcap):
    kp = feature_major(kp)
    r = kp.shape[1]
    p = scale * (q[h, :r].float() @ kp[h // group, :, lo:length].float())
    return softcap * torch.tanh(p / softcap) if softcap is not None else p


ATTN_CASES = [  # (n_heads, n_kv, D, r, l_max, length, k, window, softcap)
    (4, 2, 48, 16, 160, 150, 16, None, None),
    (4, 2, 48, 16, 160, 150, 16, 70, 50.0),
    (3, 1, 40, 24, 300, 300, 32, None, 5.0),  # MQA, D - r not a vector multiple
    (2, 2, 64, 32, 96, 37, 8, None, None),
    (8, 4, 32, 16, 700, 650, 24, 600, 50.0),  # several key chunks per kv head
]


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}L{c[5]}k{c[6]}w{c[7]}c{c[8]}")
def test_spark_attn_matches_reference(isa, dtype, case, layout):
    H, nkv, D, r, l_max, length, k, window, cap = case
    scale = D**-0.5
    for seed in range(2):
        q, kp, kr, v = _cache(seed, H, nkv, D, r, l_max, D, dtype, layout=layout)
        o_ref, kept_ref, capped_ref = spark_attn_decode(q, kp, kr, v, length, k, scale, window, cap, impl="reference")
        o, kept, capped = spark_attn_decode(q, kp, kr, v, length, k, scale, window, cap, impl="ext")
        assert o.shape == (H, D) and kept.dtype == torch.long and capped.dtype == torch.bool
        assert torch.equal(kept, kept_ref) and torch.equal(capped, capped_ref), f"seed {seed}"
        assert bool((kept <= k).all())
        assert_close_scaled(o, o_ref, 1e-4, f"{isa} {dtype} seed {seed}")


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_spark_attn_selection_equals_reference(isa, dtype, layout):
    H, nkv, D, r, l_max, k = 6, 2, 32, 16, 400, 24
    scale = D**-0.5
    for seed, (length, window, cap) in enumerate([(400, None, None), (390, 200, 50.0), (20, None, None)]):
        q, kp, kr, v = _cache(seed, H, nkv, D, r, l_max, l_max, dtype, onehot_v=True, layout=layout)
        o, kept, capped = spark_attn_decode(q, kp, kr, v, length, k, scale, window, cap, impl="ext")
        o_ref, kept_ref, _ = spark_attn_decode(q, kp, kr, v, length, k, scale, window, cap, impl="reference")
        lo = max(0, length - window) if window else 0
        for h in range(H):
            got, want = o[h, lo:length] != 0, o_ref[h, lo:length] != 0
            p = _pred_scores(q, kp, h, H // nkv, lo, length, scale, cap)
            boundary = p[want].min().item() if want.any() else 0.0
            assert_same_selection(got, want, p, boundary, f"head {h}")
            assert int(got.sum()) == int(kept[h]) <= k
            assert not (o[h, :lo] != 0).any() and not (o[h, length:] != 0).any()  # never outside the window
        assert_close_scaled(o, o_ref, 1e-4)


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_kernels_agree_with_training_stat_topk(isa, layout):
    """The decode ops select what the training-time statistical top-k (sparkformer.ops.stat_topk) selects: FFN
    (two-pass threshold) and attention with the plain layout (two-pass) and the blocked one (sums fused into
    the scoring pass)."""
    from sparkformer.ops import stat_topk, stat_topk_inf

    # FFN: y = V^T (gelu_tanh(stat_topk(K1 x1)) * (K2 x2))
    x, k1, k2, v = _ffn(9, 700, 96, 64, 96, torch.float32)
    s = k1 @ x[:64]
    a = F.gelu(stat_topk(s[None], 0.08)[0], approximate="tanh")
    y_train = v.t() @ (a * (k2 @ x[64:]))
    y, n = spark_ffn_decode(x, k1, k2, v, 0.08, impl="ext")
    assert int(n) == int((a > 0).sum())
    assert_close_scaled(y, y_train, 1e-4)
    # attention, per head, where the hard cap did not fire: kept keys = the finite entries of stat_topk_inf
    H, nkv, D, r, length, k = 4, 2, 32, 16, 300, 24
    q, kp, kr, vv = _cache(4, H, nkv, D, r, length, length, torch.float32, onehot_v=True, layout=layout)
    o, kept, capped = spark_attn_decode(q, kp, kr, vv, length, k, D**-0.5, None, 50.0, impl="ext")
    for h in range(H):
        p = _pred_scores(q, kp, h, H // nkv, 0, length, D**-0.5, 50.0)
        sel = torch.isfinite(stat_topk_inf(p[None], k)[0])
        if capped[h]:
            assert int(sel.sum()) > k == int(kept[h])
        else:
            assert_same_selection(o[h, :length] != 0, sel, p, stat_threshold(p, k).item(), f"{isa} head {h}")


@needs_ext
def test_spark_attn_hard_cap():
    # A light-tailed (uniform) score distribution: the Gaussian threshold lets ~13% through for a 10% target.
    n, k, r, D = 1000, 100, 8, 16
    q = torch.zeros(1, D)
    q[0, 0] = 1.0
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    kp = torch.zeros(1, r, n)
    kp[0, 0] = u
    kr = torch.randn(1, n, D - r)
    v = torch.eye(n).unsqueeze(0)
    o, kept, capped = spark_attn_decode(q, kp, kr, v, n, k, 1.0, impl="ext")
    assert bool(capped[0]) and int(kept[0]) == k
    assert torch.equal(torch.nonzero(o[0]).flatten(), torch.topk(u, k).indices.sort().values)
    o_ref, kept_ref, capped_ref = spark_attn_decode(q, kp, kr, v, n, k, 1.0, impl="reference")
    assert bool(capped_ref[0]) and int(kept_ref[0]) == k
    assert_close_scaled(o, o_ref, 1e-4)
    # Gaussian scores: the cap fires for some heads and never lets more than k through
    fired = 0
    for seed in range(20):
        q, kp, kr, v = _cache(seed, 8, 4, 32, 16, 600, 32, torch.float32)
        _, kept, capped = spark_attn_decode(q, kp, kr, v, 600, 40, 32**-0.5, impl="ext")
        assert bool((kept <= 40).all()) and bool((kept[capped] == 40).all())
        fired += int(capped.sum())
    assert 0 < fired < 160


@needs_ext
def test_spark_attn_edge_cases():
    H, nkv, D, r, l_max = 4, 2, 32, 16, 64
    q, kp, kr, v = _cache(1, H, nkv, D, r, l_max, l_max, torch.float32, onehot_v=True)
    # n <= k: every valid key kept, no cap
    o, kept, capped = spark_attn_decode(q, kp, kr, v, 30, 30, D**-0.5, impl="ext")
    assert kept.tolist() == [30] * H and not capped.any() and bool((o[:, :30] > 0).all())
    # window makes n <= k
    o, kept, _ = spark_attn_decode(q, kp, kr, v, 60, 16, D**-0.5, window=10, impl="ext")
    assert kept.tolist() == [10] * H and bool((o[:, 50:60] > 0).all()) and not (o[:, :50] != 0).any()
    # empty cache
    o, kept, _ = spark_attn_decode(q, kp, kr, v, 0, 16, D**-0.5, impl="ext")
    assert torch.equal(o, torch.zeros_like(o)) and kept.tolist() == [0] * H
    # constant scores: degenerate, keeps the k most recent keys with equal softmax weights, no NaN
    o, kept, capped = spark_attn_decode(q, torch.zeros_like(kp), kr, v, 50, 8, D**-0.5, impl="ext")
    o_ref, kept_ref, _ = spark_attn_decode(q, torch.zeros_like(kp), kr, v, 50, 8, D**-0.5, impl="reference")
    assert torch.isfinite(o).all() and kept.tolist() == [8] * H and not capped.any()
    assert bool((o[:, 42:50] > 0).all()) and not (o[:, :42] != 0).any()
    assert_close_scaled(o, o_ref, 1e-5)
    o_t, kept_t, _ = spark_attn_decode(q, torch.zeros_like(kp), kr, v, 50, 8, D**-0.5, impl="torch")
    assert torch.equal(kept_t, kept_ref)
    assert_close_scaled(o_t, o_ref, 1e-5)


@needs_ext
def test_spark_attn_strided_cache_and_workspace():
    # one layer of a stacked cache: non-contiguous in every dim but the last
    layers, H, nkv, D, r, l_max = 3, 4, 2, 32, 16, 256
    q = torch.randn(H, D)
    kp_all = torch.randn(nkv, layers, r, l_max).bfloat16()
    kr_all = torch.randn(layers, nkv, l_max, D - r).bfloat16()
    v_all = torch.randn(layers, nkv, l_max, D).bfloat16()
    kp, kr, v = kp_all[:, 1], kr_all[1], v_all[1]
    args = (q, kp, kr, v, 180, 20, D**-0.5, None, 50.0)
    o_ref, kept_ref, _ = spark_attn_decode(*args, impl="reference")
    ws = spark_attn_workspace(H, D, l_max)
    o, kept, _ = spark_attn_decode(*args, workspace=ws, impl="ext")
    assert torch.equal(kept, kept_ref)
    assert_close_scaled(o, o_ref, 1e-4)
    with pytest.raises(RuntimeError, match="workspace"):
        spark_attn_decode(*args, workspace=torch.empty(5), impl="ext")
    # blocked predictor half, one layer of a stacked blocked cache
    kpb_all = torch.stack([to_blocked(kp_all[:, i]) for i in range(layers)], 1)  # (n_kv, layers, blocks, r, 64)
    kp_b = kpb_all[:, 1]
    assert not kp_b.is_contiguous()
    o_b, kept_b, _ = spark_attn_decode(q, kp_b, kr, v, 180, 20, D**-0.5, None, 50.0, impl="ext")
    assert torch.equal(kept_b, kept_ref)
    assert_close_scaled(o_b, o_ref, 1e-4)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        spark_attn_decode(q, kp.reshape(nkv, 32, r, 8), kr, v, 180, 20, 0.1, impl="ext")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_cache_helpers_write_and_decode(dtype):
    """new_*_cache / *_cache_write (the recommended layouts) decode like plain tensors holding the same keys."""
    H, nkv, D, r, length = 4, 2, 48, 16, 150
    g = torch.Generator().manual_seed(8)
    keys, vals = torch.randn(length, nkv, D, generator=g), torch.randn(length, nkv, D, generator=g)
    sc = new_spark_cache(nkv, length, D, r, dtype=dtype)  # L_max rounded up to 192
    assert sc.kp.shape == (nkv, 3, r, 64) and sc.kr.stride(1) == (D - r) + D
    dc = new_dense_cache(nkv, length, D, dtype=dtype)
    for t in range(length):
        spark_cache_write(sc, t, keys[t].to(dtype), vals[t].to(dtype))
        dense_cache_write(dc, t, keys[t].to(dtype), vals[t].to(dtype))
    kp_plain = keys[:, :, :r].permute(1, 2, 0).to(dtype)
    kr_plain = keys[:, :, r:].transpose(0, 1).to(dtype)
    v_plain = vals.transpose(0, 1).to(dtype)
    q = torch.randn(H, D, generator=g)
    for impl in (("ext",) if HAVE_EXT else ()) + ("torch",):
        o, kept, _ = spark_attn_decode(q, *sc, length, 24, D**-0.5, 100, 50.0, impl=impl)
        o_ref, kept_ref, _ = spark_attn_decode(q, kp_plain, kr_plain, v_plain, length, 24, D**-0.5, 100, 50.0,
                                               impl="reference")
        assert torch.equal(kept, kept_ref)
        assert_close_scaled(o, o_ref, 1e-4 if impl == "ext" or dtype == torch.float32 else 3e-2, impl)
        od = dense_attn_decode(q, *dc, length, D**-0.5, None, 50.0, impl=impl)
        od_ref = dense_attn_decode(q, keys.transpose(0, 1).to(dtype), v_plain, length, D**-0.5, None, 50.0,
                                   impl="reference")
        assert_close_scaled(od, od_ref, 1e-4 if impl == "ext" or dtype == torch.float32 else 3e-2, impl)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ATTN_CASES[:3], ids=["plain", "window", "mqa"])
def test_spark_attn_torch_path_matches_reference(case, layout):
    H, nkv, D, r, l_max, length, k, window, cap = case
    q, kp, kr, v = _cache(3, H, nkv, D, r, l_max, D, torch.float32, layout=layout)
    args = (q, kp, kr, v, length, k, D**-0.5, window, cap)
    o_ref, kept_ref, capped_ref = spark_attn_decode(*args, impl="reference")
    o, kept, capped = spark_attn_decode(*args, impl="torch")
    assert torch.equal(kept, kept_ref) and torch.equal(capped, capped_ref)
    assert_close_scaled(o, o_ref, 1e-4)


# ------------------------------------------------------------------------------------------------
# Dense baselines
# ------------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_geglu_and_matvec_match_reference(isa, dtype):
    g = torch.Generator().manual_seed(2)
    for m, d in ((200, 96), (131, 77)):
        wg, wu = torch.randn(m, d, generator=g) / 9, torch.randn(m, d, generator=g) / 9
        wd = torch.randn(d, m, generator=g) / 12
        x = torch.randn(d, generator=g)
        w = pack_geglu(wg, wu, wd, dtype=dtype)
        y_ref = geglu_decode(x, *w, impl="reference")
        assert_close_scaled(geglu_decode(x, *w, impl="ext"), y_ref, 1e-4, f"packed m={m}")
        plain = (wg.to(dtype), wu.to(dtype), wd.t().contiguous().to(dtype))
        assert_close_scaled(geglu_decode(x, *plain, impl="ext"), y_ref, 1e-4, f"plain m={m}")
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert_close_scaled(geglu_decode(x, *w, impl="torch"), y_ref, tol, "torch path")
        assert_close_scaled(matvec(w.w_gate, x, impl="ext"), w.w_gate.float() @ x, 1e-5, "matvec")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_dense_attn_matches_reference(isa, dtype):
    g = torch.Generator().manual_seed(4)
    for H, nkv, D, l_max, length, window, cap in ((4, 2, 48, 100, 90, None, None), (8, 4, 32, 900, 880, 700, 50.0),
                                                  (2, 1, 40, 1200, 1100, None, 5.0)):
        q = torch.randn(H, D, generator=g)
        k = torch.randn(nkv, l_max, D, generator=g).to(dtype)
        v = torch.randn(nkv, l_max, D, generator=g).to(dtype)
        args = (q, k, v, length, D**-0.5, window, cap)
        o_ref = dense_attn_decode(*args, impl="reference")
        assert_close_scaled(dense_attn_decode(*args, impl="ext"), o_ref, 1e-4, f"H={H} L={length}")
        pad = -(-l_max // 64) * 64 - l_max  # blocked keys need L_max % 64 == 0
        kb = to_blocked(F.pad(k.float(), (0, 0, 0, pad)).to(dtype).transpose(1, 2))
        vb = F.pad(v.float(), (0, 0, 0, pad)).to(dtype)
        assert_close_scaled(dense_attn_decode(q, kb, vb, length, D**-0.5, window, cap, impl="ext"), o_ref, 1e-4,
                            f"blocked H={H} L={length}")
        assert_close_scaled(dense_attn_decode(q, kb, vb, length, D**-0.5, window, cap, impl="reference"), o_ref,
                            1e-5, "blocked reference")
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert_close_scaled(dense_attn_decode(*args, impl="torch"), o_ref, tol, "torch path")


# ------------------------------------------------------------------------------------------------
# torch.compile / dispatcher, fallback
# ------------------------------------------------------------------------------------------------
@needs_ext
def test_ops_pass_opcheck_and_trace():
    x, k1, k2, v = _ffn(0, 256, 64, 32, 64, torch.float32)
    torch.library.opcheck(torch.ops.sparkformer.spark_ffn_decode.default, (x, k1, k2, v, 0.08, None))
    q, kp, kr, vv = _cache(0, 4, 2, 32, 16, 100, 32, torch.float32)
    torch.library.opcheck(torch.ops.sparkformer.spark_attn_decode.default, (q, kp, kr, vv, 90, 16, 0.2, 50, 50.0, None))
    w = pack_geglu(torch.randn(64, 32), torch.randn(64, 32), torch.randn(32, 64))
    torch.library.opcheck(torch.ops.sparkformer.geglu_decode.default, (x[:32], *w, None))
    kk = torch.randn(2, 100, 32)
    torch.library.opcheck(torch.ops.sparkformer.dense_attn_decode.default, (q, kk, vv, 90, 0.2, None, None, None))
    torch.library.opcheck(torch.ops.sparkformer.matvec.default, (k1, x[:32]))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(x, q):
        y, n = spark_ffn_decode(x, k1, k2, v, 0.08)
        o, kept, _ = spark_attn_decode(q, kp, kr, vv, 90, 16, 0.2, None, 50.0)
        return y * 2, o + 1, n, kept

    y2, o1, n, kept = step(x, q)
    y, n_ref = spark_ffn_decode(x, k1, k2, v, 0.08)
    o, kept_ref, _ = spark_attn_decode(q, kp, kr, vv, 90, 16, 0.2, None, 50.0)
    assert torch.equal(y2, y * 2) and torch.equal(o1, o + 1) and n == n_ref and torch.equal(kept, kept_ref)


def test_kernel_bench_runs_at_tiny_shapes(capsys):
    from sparkformer.bench import kernels

    argv = ["--d-model", "128", "--ffn-dim", "256", "--spark-ffn-dim", "384", "--rank", "64", "--heads", "4",
            "--kv-heads", "2", "--head-dim", "32", "--attn-rank", "16", "--topk", "16", "--contexts", "100",
            "--copies", "2", "--repeats", "1", "--no-save"]
    assert kernels.main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["benchmark"] == "kernels" and len(res["sections"]) == 4
    for s in res["sections"]:
        assert s["ideal_ratio"] > 1 and s["measured_ratio"] > 0


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_spark_ffn_decode_batch_equals_per_row_reference(batch):
    from sparkformer.ops.spark_ffn_decode import spark_ffn_decode_batch, spark_ffn_decode_reference

    g = torch.Generator().manual_seed(batch)
    d, r, n = 64, 16, 256
    k1, k2, v = torch.randn(n, r, generator=g), torch.randn(n, d - r, generator=g), torch.randn(n, d, generator=g)
    x = torch.randn(batch, d, generator=g)
    y, n_sel, n_union = spark_ffn_decode_batch(x, k1, k2, v, 0.08)
    for b in range(batch):
        ref, ref_n = spark_ffn_decode_reference(x[b], k1, k2, v, 0.08)
        torch.testing.assert_close(y[b], ref, rtol=1e-4, atol=1e-4)
        assert int(n_sel[b]) == int(ref_n)
    assert max(n_sel.tolist()) <= n_union <= min(n, int(n_sel.sum()))
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        spark_ffn_decode_batch(x[0], k1, k2, v, 0.08)


@pytest.mark.parametrize("block", [64, None])
def test_cache_row_writes_equal_per_position_writes(block):
    """Prefill's range writes and the per-token writes store the same cache, in both key layouts."""
    from sparkformer.ops.dense_decode import dense_cache_keys, dense_cache_write, new_dense_cache
    from sparkformer.ops.spark_attn_decode import new_spark_cache, read_key_rows, spark_cache_write

    g = torch.Generator().manual_seed(0)
    kv, T, hd, r, pos0 = 2, 70, 16, 4, 3
    k, v = torch.randn(kv, T, hd, generator=g), torch.randn(kv, T, hd, generator=g)
    for new, write in ((lambda: new_dense_cache(kv, 80, hd, block=block), dense_cache_write),
                       (lambda: new_spark_cache(kv, 80, hd, r, block=block), spark_cache_write)):
        rows, one = new(), new()
        write(rows, pos0, k, v)
        for t in range(T):
            write(one, pos0 + t, k[:, t], v[:, t])
        for a, b in zip(rows, one):
            assert torch.equal(a, b)
    dense = new_dense_cache(kv, 80, hd, block=block)
    dense_cache_write(dense, pos0, k, v)
    assert torch.equal(dense_cache_keys(dense, pos0 + T)[:, pos0:], k)
    spark = new_spark_cache(kv, 80, hd, r, block=block)
    spark_cache_write(spark, pos0, k, v)
    assert torch.equal(read_key_rows(spark.kp, pos0 + T)[:, pos0:], k[..., :r])


@pytest.mark.parametrize("interleave", ["run", "token"])
def test_decode_bench_one_tiny(interleave):
    """The decode benchmark's measurement on a tiny preset: both interleavings give ratios and paired ratios."""
    from sparkformer.bench.decode import bench_one
    from sparkformer.config import get_preset

    cfg = get_preset("tiny", n_layers=2)
    r = bench_one(cfg, "fp32", 64, 4, 3, "auto", hf=False, interleave=interleave)
    assert r["interleave"] == interleave and r["dense_ms_per_token"] > 0 and r["spark_ms_per_token"] > 0
    assert r["paired_speedup"] > 0 and r["ideal_speedup"] > 1
    lo, hi = r["paired_speedup_iqr"]
    assert lo <= r["paired_speedup"] <= hi
    assert set(r["spark_components_ms"]) >= {"attn_proj", "attention", "ffn", "lm_head"}
    assert r["achieved"]["tokens"] == 4 * 3
