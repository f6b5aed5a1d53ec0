"""Sparse Spark prefill (C++): the FFN op equals its dense reference, attention as decode steps equals the training
form with the hard cap, and the engine's sparse prefill equals its training-form prefill."""

import pytest
import torch

from sparkformer.decode import make_engine
from sparkformer.model import SparkLM
from sparkformer.ops import _extension
from sparkformer.ops.attention import attention_mask, spark_attention
from sparkformer.ops.attn_prefill import spark_prefill_attention
from sparkformer.ops.spark_attn_decode import new_spark_cache, spark_cache_write
from sparkformer.ops.spark_ffn_prefill import spark_ffn_prefill, spark_ffn_prefill_reference
from tiny_models import tiny_spark

pytestmark = pytest.mark.skipif(not _extension.available(), reason=f"C++ extension unavailable: {_extension.error()}")


def ffn_weights(d_ff, r, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(d_ff, n, generator=g) * 0.1 for n in (r, d - r, d)]
    return [t.to(dtype) for t in w]


@pytest.mark.parametrize("T,block", [(1, 256), (37, 8), (64, 64), (100, 256), (33, 1)])
def test_spark_ffn_prefill_matches_reference_fp32(isa, T, block):
    d_ff, r, d = 200, 24, 40
    k1, k2, v = ffn_weights(d_ff, r, d, torch.float32)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(1))
    y, n = spark_ffn_prefill(x, k1, k2, v, 0.1, block=block)
    y_ref, n_ref = spark_ffn_prefill_reference(x, k1, k2, v, 0.1)
    assert torch.equal(n, n_ref)
    assert 0.05 * d_ff < float(n.float().mean()) < 0.2 * d_ff
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_spark_ffn_prefill_bf16_weights(isa):
    d_ff, r, d, T = 300, 32, 64, 50
    k1, k2, v = ffn_weights(d_ff, r, d, torch.bfloat16)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y, n = spark_ffn_prefill(x, k1, k2, v, 0.08, block=16)
    y_ref, n_ref = spark_ffn_prefill_reference(x, k1, k2, v, 0.08)
    # the predictor GEMM runs in bf16 (as the engine's), so a few near-threshold neurons may flip; their
    # activations are ~0, hence a stated tolerance of 2% of the output scale
    assert (n - n_ref).abs().float().mean() < 1.0
    assert float((y - y_ref).abs().max()) < 0.02 * float(y_ref.abs().max())


def test_spark_ffn_prefill_rejects_bad_input():
    k1, k2, v = ffn_weights(50, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="x must be"):
        spark_ffn_prefill(torch.randn(4, 15), k1, k2, v, 0.1)
    with pytest.raises(ValueError, match="fraction"):
        spark_ffn_prefill(torch.randn(4, 16), k1, k2, v, 1.5)
    with pytest.raises(RuntimeError, match="d_ff"):
        spark_ffn_prefill(torch.randn(4, 16), k1, k2[:40], v, 0.1)
    with pytest.raises(ValueError, match="unknown impl"):
        spark_ffn_prefill(torch.randn(4, 16), k1, k2, v, 0.1, impl="gpu")


@pytest.mark.parametrize("pos0,window,cap", [(0, None, None), (5, None, 50.0), (3, 6, None), (70, 40, 30.0)])
def test_spark_prefill_attention_equals_training_form(pos0, window, cap):
    g = torch.Generator().manual_seed(0)
    H, KV, T, D, r, topk = 4, 2, 30, 16, 8, 5
    q = torch.randn(H, T, D, generator=g)
    k = torch.randn(KV, pos0 + T, D, generator=g)
    v = torch.randn(KV, pos0 + T, D, generator=g)
    cache = new_spark_cache(KV, pos0 + T + 3, D, r)
    spark_cache_write(cache, 0, k, v)
    out, kept, capped = spark_prefill_attention(q[:, :], cache, pos0, topk=topk, scale=D ** -0.5, window=window,
                                                cap=cap)
    mask = attention_mask(T, pos0 + T, pos0, window, "cpu")
    ke, ve = k.repeat_interleave(H // KV, 0)[None], v.repeat_interleave(H // KV, 0)[None]
    ref, ref_kept = spark_attention(q[None], ke, ve, mask, r, topk, D ** -0.5, cap, hard_cap=True)
    assert torch.equal(kept, ref_kept[0]) and int(kept.max()) <= topk
    assert bool(capped.any())
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceed the cache"):
        spark_prefill_attention(q, cache, cache.v.shape[1] - T + 1, topk=topk, scale=1.0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_engine_sparse_prefill_equals_training_form_prefill(dtype):
    torch.manual_seed(0)
    m = SparkLM(tiny_spark("spark", layers=2).config.replace(attention="spark", max_seq_len=128)).eval()
    ids = torch.randint(0, m.config.vocab_size, (48,))
    sparse = make_engine(m, dtype=dtype, impl="auto")
    dense_form = make_engine(m, dtype=dtype, impl="torch")
    a, b = sparse.prefill(ids), dense_form.prefill(ids)
    tol = 1e-4 if dtype == "fp32" else 0.1
    assert float((a - b).abs().max()) < tol
    assert sparse.stats.summary()["prefill_ffn_neurons_per_layer"] > 0
    # the caches it leaves behind decode the same next token
    nxt = int(a.argmax())
    assert float((sparse.step(nxt) - dense_form.step(nxt)).abs().max()) < tol
