"""Chunked, grouped prefill attention equals the training form it replaces."""

import pytest
import torch

from sparkformer.ops.attention import attention_mask, chunked_attention, dense_attention, spark_attention
from sparkformer.ops.attn_prefill import prefill_attention


@pytest.mark.parametrize("kind", ["dense", "spark"])
@pytest.mark.parametrize("pos0,window,cap", [(0, None, None), (5, None, 50.0), (3, 6, None), (9, 4, 30.0)])
def test_prefill_attention_matches_training_form(kind, pos0, window, cap):
    g = torch.Generator().manual_seed(0)
    H, KV, T, D, r, topk = 4, 2, 13, 16, 8, 3
    q = torch.randn(H, T, D, generator=g)
    k = torch.randn(KV, pos0 + T, D, generator=g)
    v = torch.randn(KV, pos0 + T, D, generator=g)
    out, kept = prefill_attention(q, k, v, pos0, kind=kind, scale=D ** -0.5, window=window, cap=cap, rank=r,
                                  topk=topk, chunk=4)
    mask = attention_mask(T, pos0 + T, pos0, window, "cpu")
    ke, ve = k.repeat_interleave(H // KV, 0)[None], v.repeat_interleave(H // KV, 0)[None]
    if kind == "spark":
        ref, ref_kept = spark_attention(q[None], ke, ve, mask, r, topk, D ** -0.5, cap, hard_cap=True)
        assert torch.equal(kept, ref_kept[0])
        assert int(kept.max()) <= topk
    else:
        ref = dense_attention(q[None], ke, ve, mask, D ** -0.5, cap)
        assert kept is None
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)


def test_prefill_attention_rejects_bad_shapes():
    q = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="positions"):
        prefill_attention(q, torch.randn(2, 5, 8), torch.randn(2, 5, 8), 0, kind="dense", scale=1.0)
    with pytest.raises(ValueError, match="multiple"):
        prefill_attention(q, torch.randn(3, 3, 8), torch.randn(3, 3, 8), 0, kind="dense", scale=1.0)
    with pytest.raises(ValueError, match="rank and topk"):
        prefill_attention(q, torch.randn(2, 3, 8), torch.randn(2, 3, 8), 0, kind="spark", scale=1.0)


@pytest.mark.parametrize("kind,hard_cap", [("dense", False), ("spark", False), ("spark", True)])
@pytest.mark.parametrize("window", [None, 5])
def test_chunked_attention_forward_and_grads_match_full_form(kind, hard_cap, window):
    """The model's training path (batched, chunked, KV-grouped) equals the full form, gradients included."""
    g = torch.Generator().manual_seed(1)
    B, H, KV, T, D, r, topk = 2, 4, 2, 11, 8, 4, 3
    q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
    k = torch.randn(B, KV, T, D, generator=g, requires_grad=True)
    v = torch.randn(B, KV, T, D, generator=g, requires_grad=True)
    out, kept = chunked_attention(q, k, v, 0, kind=kind, scale=0.3, window=window, cap=20.0, rank=r, topk=topk,
                                  hard_cap=hard_cap, chunk=3)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    mask = attention_mask(T, T, 0, window, "cpu")
    ke, ve = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    if kind == "spark":
        ref, ref_kept = spark_attention(q, ke, ve, mask, r, topk, 0.3, 20.0, hard_cap=hard_cap)
        assert torch.equal(kept, ref_kept)
    else:
        ref = dense_attention(q, ke, ve, mask, 0.3, 20.0)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
