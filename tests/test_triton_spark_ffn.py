"""The two-kernel Spark FFN decode (F1 predictor + F2 select/gather, or F2 + F3 without output atomics) vs its
references: ``spark_ffn_decode_reference`` (one token) and ``spark_ffn_decode_batch`` (B tokens, union of selections).

Interpreter on CPU (TRITON_INTERPRET=1, set before triton is imported), compiled on CUDA. Marked ``triton``
(``pytest -m triton``); tiny shapes so the file runs in seconds under the interpreter.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from sparkformer.ops.spark_ffn_decode import spark_ffn_decode_batch, spark_ffn_decode_reference  # noqa: E402
from sparkformer.ops.stat_topk import stat_threshold  # noqa: E402
from sparkformer.ops.triton_common import pow2_pieces  # noqa: E402
from sparkformer.ops.triton_spark_ffn import (SparkFFNPlan, spark_ffn_decode_triton,  # noqa: E402
                                              triton_spark_ffn_decode)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.triton
VARIANTS = [dict(atomic=True), dict(atomic=False)]


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def weights(n, d, r, d_out, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, c, generator=g) * 0.2).to(dtype) for c in (r, d - r, d_out)]


def dev(*ts):
    return [t.to(DEV) for t in ts]


def test_pow2_pieces():
    assert pow2_pieces(2304) == (2048, 256) and pow2_pieces(1280) == (1024, 256) and pow2_pieces(64) == (64, 0)
    assert pow2_pieces(48) == (32, 16) and pow2_pieces(1500) == (1024, 512)


@pytest.mark.parametrize("variant", VARIANTS)
def test_selects_what_stat_threshold_selects(variant):
    """The kernel's own theta (Chan-combined fp32 partials, z = stat_z(f)) selects as the one definition does."""
    n, d, r = 600, 80, 48
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(d, generator=g)
        k1, k2 = torch.randn(n, r, generator=g) * 0.2, torch.randn(n, d - r, generator=g) * 0.2
        v = torch.eye(n)  # y_i = act(s_i - theta) (K2 x2)_i: nonzero exactly on the selected neurons
        y, n_sel = spark_ffn_decode_triton(*dev(x, k1, k2, v), 0.08, **variant)
        s = k1 @ x[:r]
        theta = stat_threshold(s, 0.08)
        diff = (y.cpu() != 0) != (s > theta)
        assert bool(((s - theta).abs() <= 1e-4 * s.std(correction=0))[diff].all()), f"seed {seed}"
        assert int(n_sel) == int((y != 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(dtype, variant):
    n, d, r, d_out = 700, 96, 40, 80
    x = torch.randn(d)
    k1, k2, v = weights(n, d, r, d_out, dtype)
    y_ref, n_ref = spark_ffn_decode_reference(x, k1, k2, v, 0.08)
    y, n_sel = spark_ffn_decode_triton(*dev(x, k1, k2, v), 0.08, **variant)
    assert abs(int(n_sel) - int(n_ref)) <= 1  # fp32 summation order may move a neuron sitting on theta
    assert 0.03 < int(n_sel) / n < 0.15
    assert rel(y, y_ref) < 1e-5  # soft threshold: a neuron at theta contributes ~0, so y stays close anyway


@pytest.mark.parametrize("kw", list(SparkFFNPlan.CANDIDATES) + [dict(block_c=64, sub=2, col_splits=3),
                                                                dict(atomic=False, block_d=16, cpg=2, sub=2)])
def test_every_launch_shape_computes_the_same(kw):
    """Every launch shape the tuner may pick, plus odd ones (column splits that do not divide d_out)."""
    n, d, r, d_out = 500, 80, 48, 72
    x = torch.randn(d)
    k1, k2, v = weights(n, d, r, d_out)
    y_ref, n_ref = spark_ffn_decode_reference(x, k1, k2, v, 0.1)
    plan = SparkFFNPlan.for_weights(*dev(k1, k2, v), 0.1, **kw)
    y = plan.run(*dev(x, k1, k2, v))[0]
    assert abs(int(plan.cnt[0]) - int(n_ref)) <= 1 and rel(y, y_ref) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunk_with_more_survivors_than_slots(variant):
    """A chunk whose every neuron is selected (more than SUB: the second and later rounds) and chunks with none."""
    n, d, r = 256, 64, 32
    x = torch.randn(d)
    k1, k2, v = weights(n, d, r, d)
    k1[32:64] = x[:r] * 0.5  # chunk 1 (block_c = 32): 32 huge scores, all above theta
    y_ref, n_ref = spark_ffn_decode_reference(x, k1, k2, v, 0.15)
    plan = SparkFFNPlan.for_weights(*dev(k1, k2, v), 0.15, block_c=32, sub=4, **variant)
    y = plan.run(*dev(x, k1, k2, v))[0]
    assert int(plan.cnt[0]) == int(n_ref) >= 32 and rel(y, y_ref) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_survivors_then_repeated_calls(variant):
    """Constant scores select nothing (y = 0, count 0); the same plan then serves other inputs: F1 re-zeroes y and
    the counts every call, so nothing leaks from one call (or graph replay) into the next."""
    n, d, r = 128, 32, 16
    k1, k2, v = weights(n, d, r, d)
    plan = SparkFFNPlan.for_weights(*dev(k1, k2, v), 0.08, block_c=16, sub=4, **variant)
    x0 = torch.zeros(d)
    x0[r:] = 1.0  # predictor input zero -> every score equal -> theta = mean, nothing strictly above it
    for x in (x0, torch.randn(d), torch.randn(d), x0):
        y_ref, n_ref = spark_ffn_decode_reference(x, k1, k2, v, 0.08)
        y = plan.run(*dev(x, k1, k2, v))[0]
        assert int(plan.cnt[0]) == int(n_ref)
        assert rel(y, y_ref) < 1e-5 if int(n_ref) else float(y.abs().max()) == 0.0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [2, 3])
def test_batch_union(variant, batch):
    """B tokens at once: each its own theta and selection, K2/V rows of the union read once; equals the per-token
    reference row by row (one row selects nothing)."""
    n, d, r, d_out = 400, 64, 32, 48
    k1, k2, v = weights(n, d, r, d_out)
    x = torch.randn(batch, d)
    x[1, :r] = 0.0  # row 1: all scores 0 -> no survivors
    y, n_sel = spark_ffn_decode_triton(*dev(x, k1, k2, v), 0.08, block_c=32, sub=4, **variant)
    yb, nb, _ = spark_ffn_decode_batch(x, k1, k2, v, 0.08)
    assert n_sel.cpu().tolist() == nb.tolist() and int(n_sel[1]) == 0
    for b in range(batch):
        y_ref, n_ref = spark_ffn_decode_reference(x[b], k1, k2, v, 0.08)
        assert int(n_sel[b]) == int(n_ref)
        assert rel(y[b], y_ref) < 1e-5 if int(n_ref) else float(y[b].abs().max()) == 0.0


def test_custom_op_and_strided_views():
    n, d, r = 300, 64, 32
    x = torch.randn(d, dtype=torch.bfloat16)
    packed = torch.randn(n, (d - r) + d) * 0.3  # K2 and V rows adjacent, as prepare_spark_ffn lays them out
    k1 = torch.randn(n, r) * 0.3
    y_ref, _ = spark_ffn_decode_reference(x, k1, packed[:, : d - r], packed[:, d - r:], 0.1)
    packed_d = packed.to(DEV)
    y, n_sel = triton_spark_ffn_decode(x.to(DEV), k1.to(DEV), packed_d[:, : d - r], packed_d[:, d - r:], 0.1)
    assert y.dtype == torch.bfloat16 and n_sel.dtype == torch.int64
    assert rel(y.float(), y_ref.float()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", VARIANTS + [dict(atomic=True, pdl=True)])
def test_graph_replay_equals_eager(variant):
    """A captured plan.run replays to the eager result, replay after replay (y and counts re-zeroed by F1 inside the
    graph); with PDL where the GPU and triton support it (falls back to plain launches otherwise)."""
    n, d, r = 2048, 256, 128
    k1, k2, v = (w.cuda() for w in weights(n, d, r, d, torch.bfloat16))
    x = torch.randn(d, device="cuda", dtype=torch.bfloat16)
    plan = SparkFFNPlan.for_weights(k1, k2, v, 0.08, **variant)
    eager = plan.run(x, k1, k2, v).clone()
    n_eager = int(plan.cnt[0])
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        plan.run(x, k1, k2, v)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert int(plan.cnt[0]) == n_eager and rel(plan.y, eager) < 1e-5
