import math

import numpy as np
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
        if n == 300:  # rows that take the careful statistics: a large offset, a non-finite entry
            x = x + 1e4 if dtype != torch.float16 else x + 100
        if n == 7:
            x[2] = float("inf")
        for k in (0.08, 0.5, 1.0, 0, 3, 400):
            a, b = stat_threshold(x, k), stat_threshold(x[None], k)[0]  # 1-D shortcut vs the general path
            assert a.dtype == b.dtype and a.shape == (1,) and torch.equal(a, b), (n, k)
    with pytest.raises(ValueError, match="fraction"):
        stat_threshold(torch.randn(10), 1.5)


def test_statistics_do_not_cancel_at_any_offset_or_scale():
    """Against a float64 two-pass theta of the same fp32 values: within 2e-6 std plus half an fp32 ulp of theta
    itself, whatever the common offset (E[x^2] - mean^2 would lose every digit at 1e4) or scale (squares of 1e20
    overflow fp32, those of 1e-30 underflow); batched and through the 1-D shortcut alike."""
    g = torch.Generator().manual_seed(0)
    cases = [(o, 1.0) for o in (0.0, 1.0, 2.0, 10.0, 30.0, 1e4, -1e6)] + [(0.0, s) for s in (1e20, 1e-30, 1e30)]
    for offset, scale in cases:
        xd = (torch.randn(4, 13824, generator=g, dtype=torch.float64) * scale + offset).float().double()
        sd = xd.std(-1, correction=0, keepdim=True)
        exact = xd.mean(-1, keepdim=True) + sd * stat_z(0.08)
        tol = 2e-6 * sd + exact.abs().float().double() * 2.0 ** -24
        for got in (stat_threshold(xd.float(), 0.08), torch.stack([stat_threshold(r.float(), 0.08) for r in xd])):
            assert bool(((got.double() - exact).abs() <= tol).all()), (offset, scale)
        kept = achieved_count(stat_topk(xd.float(), 0.08)).float()
        assert (kept - 0.08 * 13824).abs().max() < 4 * math.sqrt(0.08 * 13824), (offset, scale, kept)


@pytest.mark.parametrize("form", ["soft", "inf"])
def test_non_finite_entries_follow_one_rule(form):
    """+inf always kept, -inf and NaN never; the statistics are over the finite entries, so the rest of the row is
    selected as without them (batched, 1-D, masked)."""
    fn = stat_topk if form == "soft" else stat_topk_inf
    x = torch.randn(4, 2000)
    bad = x.clone()
    bad[0, 3], bad[1, 5], bad[2, 7], bad[3, :3] = float("inf"), float("-inf"), float("nan"), float("nan")
    rows = [fn(bad, 0.08), torch.stack([fn(r, 0.08) for r in bad])]
    rest = torch.isfinite(bad)
    for y in rows:
        if form == "soft":
            assert y[0, 3] == float("inf") and y[1, 5] == 0 and y[2, 7] == 0 and (y[3, :3] == 0).all()
            assert not torch.isnan(y).any()
        else:
            assert y[0, 3] == float("inf") and y[1, 5] == float("-inf") and y[2, 7] == float("-inf")
            assert torch.isneginf(y[3, :3]).all()
        # the finite entries: as the row without the non-finite ones (statistics over 1999 or 1997 entries)
        for i in range(4):
            ref = fn(x[i][rest[i]], 0.08)
            torch.testing.assert_close(y[i][rest[i]], ref)
    mask = torch.rand(4, 2000) > 0.2
    y = fn(bad, 0.08, mask)
    assert not torch.isnan(y).any()
    assert (y[~mask] == (0 if form == "soft" else float("-inf"))).all()
    allnan = torch.full((2, 50), float("nan"))
    assert not torch.isnan(fn(allnan, 0.1)).any()


def test_non_finite_gradients_stay_finite():
    x = torch.randn(3, 60, dtype=torch.float64)
    x[0, 1], x[1, 2], x[2, 3] = float("inf"), float("nan"), float("-inf")
    x.requires_grad_(True)
    y = stat_topk(x, 0.2)
    (g,) = torch.autograd.grad(torch.where(torch.isinf(y), torch.zeros_like(y), y).sum(), x)
    assert torch.isfinite(g).all()
    # the finite entries get the gradient of the row without the non-finite one
    for i, j in ((0, 1), (1, 2), (2, 3)):
        keep = torch.arange(60) != j
        xi = x.detach()[i][keep].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(stat_topk(xi, 0.2).sum(), xi)
        torch.testing.assert_close(g[i][keep], gi)


def test_branch_free_path_matches_the_cpu_path(monkeypatch):
    """Off CPU (and under torch.compile) every row takes the careful statistics with no data-dependent branch; on
    CPU only the rows that need them do. Both give the same selection (theta within 2e-6 std)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3000, generator=g)
    x[1] += 1e4
    x[2, 7] = float("nan")
    x[3] *= 1e20
    mask = torch.rand(6, 3000, generator=g) > 0.1
    want = [stat_threshold(x, 0.08), stat_threshold(x, 200, mask), stat_topk(x, 0.08), stat_topk_inf(x, 50, mask)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = [stat_threshold(x, 0.08), stat_threshold(x, 200, mask), stat_topk(x, 0.08), stat_topk_inf(x, 50, mask)]
    sd = torch.stack([r[torch.isfinite(r)].double().std(correction=0) for r in x]).float()[:, None]
    for a, b in zip(want[:2], got[:2]):
        assert (((a - b).abs() / sd) <= 2e-6).all() or torch.equal(a, b)
    for a, b in zip(want[2:], got[2:]):
        assert (achieved_count(a) - achieved_count(b)).abs().max() <= 1


def test_counts_of_any_integer_type_and_clear_errors():
    x = torch.randn(3, 1000)
    ref = stat_topk(x, 10)
    for k in (np.int64(10), np.int32(10), torch.tensor(10)):
        assert torch.equal(stat_topk(x, k), ref) and torch.equal(stat_threshold(x[0], k), stat_threshold(x[0], 10))
    assert torch.equal(stat_topk(x, np.float32(0.25)), stat_topk(x, float(np.float32(0.25))))
    with pytest.raises(ValueError, match="0-dim"):
        stat_topk(torch.tensor(1.0), 0.1)
    with pytest.raises(ValueError, match="0-dim"):
        stat_threshold(torch.tensor(1.0), 0.1)
    with pytest.raises(ValueError, match="does not broadcast"):
        stat_topk(x, 0.1, torch.ones(4, 1000, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        stat_topk_inf(x, 0.1, torch.ones(3, 1000))
    with pytest.raises(ValueError, match="floating"):
        stat_threshold(torch.arange(10), 3)
    with pytest.raises(TypeError, match="bool"):
        stat_topk(x, True)
    with pytest.raises(ValueError, match="count must be >= 0"):
        stat_topk(x, np.int64(-1))


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
