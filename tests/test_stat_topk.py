import math

import pytest
import torch

from sparkformer.ops import _extension, achieved_count, exact_topk, exact_topk_inf, stat_threshold, stat_topk, stat_topk_inf
from sparkformer.ops.stat_topk import THETA_TOL, stat_z, stat_z_table

needs_ext = pytest.mark.skipif(not _extension.available(), reason=f"C++ extension unavailable: {_extension.error()}")


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


# ---- the one threshold definition, and the kernels that compute it themselves -----------------------------------
def test_stat_z_is_the_float64_ndtri_clamped():
    for f in (1e-3, 0.08, 0.3, 0.5, 0.9):
        assert stat_z(f) == torch.special.ndtri(torch.tensor(1 - f, dtype=torch.float64)).item()
    assert stat_z(0.0) == pytest.approx(7.0345, abs=1e-3)  # 1 - f clamped: z finite at both ends
    assert stat_z(1.0) == pytest.approx(-7.0345, abs=1e-3)


def test_stat_z_table_is_stat_z_per_valid_count():
    k, L = 16, 600
    tab = stat_z_table(k, L)
    assert tab.dtype == torch.float32 and tab.shape == (L + 1,) and bool((tab[: k + 1] == 0).all())
    want = torch.tensor([stat_z(k / n) for n in range(k + 1, L + 1)], dtype=torch.float64).float()
    assert torch.equal(tab[k + 1:], want)


def test_threshold_is_mean_plus_std_times_stat_z():
    x = torch.randn(6, 500)
    xd = x.double()
    for k, f in ((0.08, 0.08), (40, 40 / 500)):
        want = xd.mean(-1, keepdim=True) + xd.std(-1, correction=0, keepdim=True) * stat_z(f)
        torch.testing.assert_close(stat_threshold(x, k).double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_1d_shortcut_is_bitwise_the_general_path(dtype):
    for n in (1, 7, 300, 13824):
        x = torch.randn(n).to(dtype)
        for k in (0.08, 0.5, 1.0, 0, 3, 400):
            a, b = stat_threshold(x, k), stat_threshold(x[None], k)[0]  # 1-D shortcut vs the general path
            assert a.dtype == b.dtype and a.shape == (1,) and torch.equal(a, b), (n, k)
    with pytest.raises(ValueError, match="fraction"):
        stat_threshold(torch.randn(10), 1.5)


def test_one_pass_statistics_error_is_as_documented():
    """The cancellation in E[x^2] - mean^2 against a float64 two-pass theta, by |mean| / std (module doc)."""
    g = torch.Generator().manual_seed(0)
    for offset, tol in ((0.0, 2e-6), (1.0, 2e-6), (10.0, 1.5e-4), (30.0, 6e-4)):
        xd = (torch.randn(8, 13824, generator=g, dtype=torch.float64) + offset).float().double()
        sd = xd.std(-1, correction=0, keepdim=True)
        exact = xd.mean(-1, keepdim=True) + sd * stat_z(0.08)
        err = ((stat_threshold(xd.float(), 0.08).double() - exact).abs() / sd).max().item()
        assert err < tol, (offset, err)


def test_constant_rows_keep_nothing_for_any_target():
    for value in (0.0, 2.5):
        c = torch.full((3, 64), value)
        for k in (0.1, 0.7, 40):  # z > 0 and z < 0: theta is the value itself, nothing is above it
            assert torch.equal(stat_threshold(c, k), torch.full((3, 1), value))
            assert torch.equal(stat_threshold(c[0], k), torch.full((1,), value))


@needs_ext
def test_cpp_ndtri_matches_torch():
    for p in (1e-12, 1e-4, 0.02, 0.3, 0.5, 0.92, 0.975, 0.999, 1 - 1e-9):
        want = torch.special.ndtri(torch.tensor(p, dtype=torch.float64)).item()
        assert torch.ops.sparkformer._ndtri(p) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert torch.ops.sparkformer._ndtri(0.0) == -math.inf and torch.ops.sparkformer._ndtri(1.0) == math.inf


@needs_ext
@pytest.mark.parametrize("one_pass", [False, True], ids=["two_pass", "from_sums"])
def test_cpp_threshold_matches_stat_threshold(isa, one_pass):
    """The C++ kernels' theta on every ISA: the two-pass form (FFN decode and prefill, attention over the plain
    layout) and the one from sums (attention over the blocked layout) equal stat_threshold to THETA_TOL * std."""
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 16, 17, 100, 1000, 1025, 13824):  # every vector-width tail, one and several 1024-blocks
        for offset in (0.0, 1.0, 2.0):  # |mean| / std exactly this (THETA_TOL holds up to 2)
            x = torch.randn(n, generator=g, dtype=torch.float64)
            x = ((x - x.mean()) / x.std(correction=0) + offset).float()
            sd = x.double().std(correction=0).item()
            for k in (0.08, 0.5, 0.9, 1.0, 3):
                f = k / n if isinstance(k, int) else k
                got = torch.ops.sparkformer._stat_threshold(x, f, one_pass)
                want = stat_threshold(x, k).item()
                if f >= 1.0:
                    assert got == want == -math.inf
                else:
                    assert abs(got - want) <= THETA_TOL * sd, (isa, n, offset, k, got, want)
