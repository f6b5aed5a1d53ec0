import math

import pytest
import torch

from sparkformer.ops import achieved_count, exact_topk, exact_topk_inf, stat_threshold, stat_topk, stat_topk_inf


def test_gaussian_rows_keep_about_k():
    n, f = 13824, 0.08
    x = torch.randn(64, n)
    kept = achieved_count(stat_topk(x, f)).float()
    k = f * n
    assert (kept - k).abs().max() < 4 * math.sqrt(k), kept
    # the same target given as a count
    kept_c = achieved_count(stat_topk(x, int(k))).float()
    assert (kept_c - k).abs().max() < 4 * math.sqrt(k)


def test_formula_and_soft_shift():
    x = torch.randn(8, 1000, dtype=torch.float64)
    f = 0.1
    theta = x.mean(-1, keepdim=True) + x.std(-1, unbiased=False, keepdim=True) * torch.special.ndtri(
        torch.tensor(1 - f, dtype=torch.float64))
    torch.testing.assert_close(stat_topk(x, f), torch.relu(x - theta))
    inf = stat_topk_inf(x, f)
    torch.testing.assert_close(torch.isfinite(inf), x > theta)
    torch.testing.assert_close(inf[torch.isfinite(inf)], x[x > theta])


def test_matches_gemma3n_gaussian_topk():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextMLP

    fraction = 0.08
    cfg = transformers.Gemma3nTextConfig(hidden_size=32, intermediate_size=512, num_hidden_layers=1,
                                         activation_sparsity_pattern=[1.0 - fraction])
    mlp = Gemma3nTextMLP(cfg, layer_idx=0)
    x = torch.randn(4, 7, 512)
    torch.testing.assert_close(stat_topk(x, fraction), mlp._gaussian_topk(x), rtol=1e-5, atol=1e-5)


def test_masked_rows_use_valid_statistics_only():
    x = torch.randn(5, 300)
    mask = torch.rand(5, 300) > 0.3
    y = stat_topk_inf(x, 20, mask)
    assert not torch.isfinite(y[~mask]).any()
    for i in range(5):
        xv = x[i][mask[i]]
        ref = stat_topk_inf(xv[None], 20)[0]
        torch.testing.assert_close(y[i][mask[i]], ref)
    # the padded values must not change anything
    x2 = x.masked_fill(~mask, 1e6)
    torch.testing.assert_close(stat_topk_inf(x2, 20, mask), y)


def test_keep_all_when_few_valid():
    x = torch.randn(3, 50)
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[:, :10] = True
    y = stat_topk_inf(x, 10, mask)
    assert torch.isfinite(y[:, :10]).all() and not torch.isfinite(y[:, 10:]).any()
    assert torch.equal(stat_topk(x, 50), x)  # n <= k: unchanged
    assert torch.isneginf(stat_threshold(x, 60)).all()


def test_edge_cases_no_nan():
    const = torch.full((4, 100), 3.0)
    for fn in (stat_topk, stat_topk_inf):
        assert not torch.isnan(fn(const, 0.1)).any()
    assert torch.equal(stat_topk(const, 0.1), torch.zeros_like(const))
    empty = torch.zeros(2, 100, dtype=torch.bool)
    y = stat_topk(torch.randn(2, 100), 0.1, empty)
    assert torch.equal(y, torch.zeros_like(y))
    assert not torch.isnan(stat_topk_inf(torch.randn(2, 100), 10, empty)).any()
    xb = torch.randn(16, 4096).bfloat16()
    yb = stat_topk(xb, 0.08)
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()
    kept = achieved_count(yb).float()
    assert (kept - 0.08 * 4096).abs().max() < 4 * math.sqrt(0.08 * 4096)
    assert stat_threshold(xb, 0.08).dtype == torch.float32


def test_gradients_flow_through_threshold():
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: stat_topk(t, 0.2), (x,))
    y = stat_topk(x, 0.2)
    (g,) = torch.autograd.grad(y.sum(), x)
    # through theta every entry gets a gradient; detached, only survivors do
    assert (g[y == 0] != 0).any()
    (gd,) = torch.autograd.grad(stat_topk(x, 0.2, detach_threshold=True).sum(), x)
    assert torch.equal(gd[y == 0], torch.zeros_like(gd[y == 0]))
    assert torch.isfinite(g).all()
    c = torch.full((2, 30), 1.0, dtype=torch.float64, requires_grad=True)
    (gc,) = torch.autograd.grad(stat_topk(c, 0.1).sum(), c)
    assert torch.isfinite(gc).all()


def test_exact_baselines():
    x = torch.randn(6, 200)
    y = exact_topk(x, 17)
    assert torch.equal(achieved_count(y), torch.full((6,), 17))
    assert torch.equal(achieved_count(exact_topk_inf(x, 17), inf_form=True), torch.full((6,), 17))
    mask = torch.rand(6, 200) > 0.5
    yi = exact_topk_inf(x, 5, mask)
    assert not torch.isfinite(yi[~mask]).any()
    assert torch.equal(achieved_count(yi, inf_form=True), torch.full((6,), 5))


def test_bad_targets():
    with pytest.raises(ValueError, match="fraction"):
        stat_topk(torch.randn(3, 10), 1.5)
    with pytest.raises(ValueError, match="count"):
        stat_topk(torch.randn(3, 10), -1)


def test_gradcheck_with_mask_and_keep_all_rows():
    x = torch.randn(4, 30, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 30) > 0.3
    mask[3, 5:] = False  # 5 valid entries <= k: keeps all
    torch.autograd.gradcheck(lambda t: stat_topk(t, 5, mask), (x,))
    y = stat_topk(x, 0.3, mask, detach_threshold=True)  # detached: gradient only through the survivors
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, (y != 0).double())
