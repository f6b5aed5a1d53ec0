"""The two-kernel Spark attention decode (A1 scores + stats, A2 select + radix-select cap + gather over splits)
vs ``spark_attn_decode_reference``: the same kept set (not only the count) with the cap fired and not fired, ties,
the degenerate fallback, sliding windows, n <= k, repeated calls through the self-resetting per-head tickets.

Interpreter on CPU (TRITON_INTERPRET=1, set before triton is imported), compiled on CUDA. Marked ``triton``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from sparkformer.ops.spark_attn_decode import spark_attn_decode_reference, to_blocked  # noqa: E402
from sparkformer.ops.stat_topk import stat_threshold  # noqa: E402
from sparkformer.ops.triton_spark_attn import (SparkAttnPlan, spark_attn_decode_triton,  # noqa: E402
                                               triton_spark_attn_decode)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.triton


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def spark_cache(n_kv, L, D, r, dtype=torch.float32, blocked=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    kp = torch.randn(n_kv, r, L, generator=g).to(dtype)
    krv = torch.randn(n_kv, L, (D - r) + D, generator=g).to(dtype)
    return (to_blocked(kp) if blocked else kp), krv[..., : D - r], krv[..., D - r:]


def dev(*ts):
    return [t.to(DEV) for t in ts]


def kept_sets(q, kp, kr, L, length, k, scale, window=None, cap=None, fn=None):
    """Per head, the set of kept positions: with v = identity, out[h] is the attention weight by position, nonzero
    exactly where a key was kept (softmax and softplus are positive)."""
    KV = kr.shape[0]
    eye = torch.eye(L).expand(KV, L, L).contiguous()
    if fn is None:
        out = spark_attn_decode_reference(q, kp, kr, eye, length, k, scale, window, cap)
    else:
        out = fn(*dev(q, kp, kr, eye), length, k, scale, window, cap)
    return [set(torch.nonzero(o.cpu()).flatten().tolist()) for o in out[0]], out


CASES = [  # length, k, window, softcap
    (200, 16, None, None),  # cap fires on some heads, not on others
    (200, 16, 64, 50.0),  # sliding window + soft-cap
    (10, 16, None, None),  # n <= k: keep all
    (256, 300, None, 5.0),  # k > max_len
    (130, 8, 100, None),
    (1, 4, None, None),
    (0, 4, None, None),  # empty cache
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocked", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(dtype, blocked, case):
    length, k, window, cap = case
    H, KV, D, r, L = 4, 2, 32, 16, 256
    q = (torch.randn(H, D) * 2).to(dtype)
    kp, kr, v = spark_cache(KV, L, D, r, dtype, blocked)
    ref = spark_attn_decode_reference(q, kp, kr, v, length, k, D**-0.5, window, cap)
    out = spark_attn_decode_triton(*dev(q, kp, kr, v), length, k, D**-0.5, window, cap)
    assert out[0].dtype == dtype  # written in the output's dtype, no cast kernel
    assert out[1].cpu().tolist() == ref[1].tolist()
    assert out[2].cpu().tolist() == ref[2].tolist()
    if length:
        assert rel(out[0].float(), ref[0].float()) < (1e-5 if dtype == torch.float32 else 1e-2)
    else:
        assert float(out[0].abs().max()) == 0.0


@pytest.mark.parametrize("case", [c for c in CASES if c[0] > 0])
def test_same_kept_set_as_reference(case):
    """Not only the counts: the kept positions equal the reference's, cap fired or not."""
    length, k, window, cap = case
    H, KV, D, r, L = 4, 2, 32, 16, 256
    q = torch.randn(H, D) * 3  # heavy tails -> the cap fires on some heads
    kp, kr, _ = spark_cache(KV, L, D, r, blocked=True, seed=1)
    want, ref = kept_sets(q, kp, kr, L, length, k, D**-0.5, window, cap)
    got, out = kept_sets(q, kp, kr, L, length, k, D**-0.5, window, cap, fn=spark_attn_decode_triton)
    assert got == want
    assert out[2].cpu().tolist() == ref[2].tolist()


def test_cap_fired_and_not_fired_both_seen():
    """The shapes above exercise both branches: some heads cap, some do not (else the tests above prove less)."""
    H, KV, D, r, L, k = 8, 2, 32, 16, 256, 16
    q = torch.randn(H, D) * 3
    kp, kr, v = spark_cache(KV, L, D, r, seed=1)
    _, _, capped = spark_attn_decode_triton(*dev(q, kp, kr, v), 200, k, D**-0.5)
    assert 0 < int(capped.sum()) < H
    lo = 0
    for h in range(H):  # where not capped, the survivors are those above stat_threshold over the valid keys
        p = D**-0.5 * (q[h, :r] @ kp.permute(0, 2, 1, 3).reshape(KV, r, L)[h // (H // KV), :, lo:200])
        assert (int((p > stat_threshold(p, k)).sum()) > k) == bool(capped[h])


@pytest.mark.parametrize("group", [1, 4])
def test_gqa_groups_and_hard_cap(group):
    KV, D, r, L, k = 2, 64, 32, 512, 24
    H = KV * group
    q = torch.randn(H, D) * 3
    kp, kr, v = spark_cache(KV, L, D, r)
    ref = spark_attn_decode_reference(q, kp, kr, v, 500, k, D**-0.5, None, None)
    out = spark_attn_decode_triton(*dev(q, kp, kr, v), 500, k, D**-0.5)
    assert out[1].cpu().tolist() == ref[1].tolist() and out[2].cpu().tolist() == ref[2].tolist()
    assert rel(out[0], ref[0]) < 1e-5


def test_degenerate_and_ties_at_the_cutoff():
    """Constant scores keep the k most recent keys (nothing clears theta); 12 identical keys at 4 std above theta,
    more than k: the cap fires with the cutoff inside a tie, so the radix select goes down to the position bits
    (the more recent key wins)."""
    KV, H, D, r, L, k = 1, 2, 16, 8, 128, 8
    scale = D**-0.5
    q = torch.randn(H, D)
    q[0, :r] = 0.0  # head 0: every predictor score is 0 -> degenerate
    kp = torch.randn(KV, r, L)
    q1 = q[1, :r]
    kp[0, :, 40:52] = (q1 * 4.0 / (scale * q1.norm()))[:, None]  # p = 4 std of head 1's scores
    krv = torch.randn(KV, L, 2 * D - r)
    kr = krv[..., : D - r]
    for length in (100, 120):
        want, ref = kept_sets(q, kp, kr, L, length, k, D**-0.5)
        got, out = kept_sets(q, kp, kr, L, length, k, D**-0.5, fn=spark_attn_decode_triton)
        assert got == want and out[2].cpu().tolist() == ref[2].tolist()
        assert want[0] == set(range(length - k, length))  # degenerate: the k most recent
        assert want[1] == set(range(52 - k, 52)) and bool(ref[2][1])  # tie: the most recent of the tied keys


@pytest.mark.parametrize("block_j", [4, 64])
def test_repeated_calls_reset_tickets(block_j):
    """One plan over many calls (lengths, windows, queries change; block_j 64 >= k: one split, no ticket): each
    equals the reference, and every per-head ticket is back at 0 after each call."""
    H, KV, D, r, L, k = 4, 2, 32, 16, 192, 12
    kp, kr, v = spark_cache(KV, L, D, r)
    plan = SparkAttnPlan(H, KV, D, r, D, L, k, torch.device(DEV), block_j=block_j, chunk=64)
    assert plan.splits == (1 if block_j >= k else 3)
    out = torch.empty(H, D, device=DEV)
    for length, window in [(150, None), (20, None), (190, 64), (150, None), (5, 4)]:
        q = torch.randn(H, D) * 2
        ref = spark_attn_decode_reference(q, kp, kr, v, length, k, D**-0.5, window)
        ln = torch.tensor([length], dtype=torch.int32, device=DEV)
        plan.run(*dev(q, kp, kr, v), ln, D**-0.5, window, out=out)
        assert plan.kept.cpu().tolist() == ref[1].tolist() and plan.capped.bool().cpu().tolist() == ref[2].tolist()
        assert rel(out, ref[0]) < 1e-5
        assert int(plan.tickets.abs().sum()) == 0


def test_timing_modes_run():
    """cap_mode 1/2 (always / never run the radix select) exist for timing only; they must compile and run."""
    H, KV, D, r, L, k = 2, 1, 16, 8, 128, 8
    kp, kr, v = spark_cache(KV, L, D, r)
    q = torch.randn(H, D)
    ln = torch.tensor([100], dtype=torch.int32, device=DEV)
    for mode in (1, 2):
        plan = SparkAttnPlan(H, KV, D, r, D, L, k, torch.device(DEV), cap_mode=mode)
        assert torch.isfinite(plan.run(*dev(q, kp, kr, v), ln, D**-0.5)).all()


def test_custom_op():
    H, KV, D, r, L = 4, 2, 32, 16, 128
    q = torch.randn(H, D, dtype=torch.bfloat16)
    kp, kr, v = spark_cache(KV, L, D, r, torch.bfloat16)
    out, kept, capped = triton_spark_attn_decode(*dev(q, kp, kr, v), 100, 16, 0.2, 64, 30.0)
    ref = spark_attn_decode_reference(q, kp, kr, v, 100, 16, 0.2, 64, 30.0)
    assert out.dtype == torch.bfloat16 and kept.dtype == torch.int64 and capped.dtype == torch.bool
    assert kept.cpu().tolist() == ref[1].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pdl", [False, True])
def test_graph_replay_equals_eager(pdl):
    """A captured plan.run replays to the eager result at every length the device tensor says (the per-head tickets
    reset themselves inside the graph)."""
    H, KV, D, r, L, k = 8, 4, 64, 32, 1024, 32
    kp, kr, v = (t.cuda() for t in spark_cache(KV, L, D, r, torch.bfloat16))
    q = torch.randn(H, D, device="cuda")
    ln = torch.tensor([700], dtype=torch.int32, device="cuda")
    plan = SparkAttnPlan(H, KV, D, r, D, L, k, torch.device("cuda"), pdl=pdl)
    out = torch.empty(H, D, device="cuda", dtype=torch.bfloat16)
    plan.run(q, kp, kr, v, ln, D**-0.5, None, 50.0, out=out)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        plan.run(q, kp, kr, v, ln, D**-0.5, None, 50.0, out=out)
    for length in (700, 1000, 64, 700):
        ln.fill_(length)
        g.replay()
        torch.cuda.synchronize()
        ref = spark_attn_decode_reference(q.cpu(), kp.cpu(), kr.cpu(), v.cpu(), length, k, D**-0.5, None, 50.0)
        assert plan.kept.cpu().tolist() == ref[1].tolist()
        assert rel(out.float(), ref[0].float()) < 2e-2 and int(plan.tickets.abs().sum()) == 0
