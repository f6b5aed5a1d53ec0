"""Neuron view, capability sets and the three neuron studies on tiny random models (no download).

Each metric is checked against a hand-computed case: a neuron that fires only on one capability gets AP = 1, zeroing
0% changes nothing, output magnitude uses the down-projection column norms, overlap of identical sets is 1.
"""

import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from sparkformer.bricks import analysis as A
from sparkformer.bricks.capabilities import (CapabilitySet, Prompt, arithmetic_problem, build_capability_set,
                                             resolve_capabilities, strip_docs_and_comments)
from sparkformer.bricks.neurons import NeuronView
from sparkformer.model import SparkLM
from tiny_models import tiny_llama as shared_llama
from tiny_models import tiny_spark as shared_spark

transformers = pytest.importorskip("transformers")


def tiny_llama(act: str = "silu", layers: int = 2) -> torch.nn.Module:
    return shared_llama(layers=layers, act=act)


def tiny_spark(kind: str = "spark") -> SparkLM:
    return shared_spark(kind)


# ---- fixtures -----------------------------------------------------------------------------------------------------
class CharTok:
    """Characters -> ids 0..39 (no special tokens)."""

    def encode(self, text):
        return [ord(c) % 40 for c in text]


def two_cap_set(n=6, h=3) -> CapabilitySet:
    rng = random.Random(0)
    a = [Prompt("".join(rng.choice("abcdefgh") for _ in range(20)), "a", "gen") for _ in range(n + h)]
    b = [Prompt("".join(rng.choice("0123456789") for _ in range(20)), "b", "gen") for _ in range(n + h)]
    return CapabilitySet(["a", "b"], a[:n] + b[:n], a[n:] + b[n:], 0)


# ---- neuron view --------------------------------------------------------------------------------------------------
def test_view_llama_rows_columns_and_recorded_activation():
    m = tiny_llama()
    view = NeuronView(m)
    assert len(view) == 2 and view.kinds == ["gated", "gated"] and view.n_neurons == [48, 48]
    mlp = m.model.layers[1].mlp
    layer = view[1]
    assert torch.equal(layer.gate_rows(), mlp.gate_proj.weight) and layer.gate_rows().shape == (48, 32)
    assert torch.equal(layer.up_rows(), mlp.up_proj.weight)
    assert torch.equal(layer.down_cols(), mlp.down_proj.weight) and layer.down_cols().shape == (32, 48)
    seen = {}
    h = mlp.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad(), view.record() as rec:
        m(ids)
    h.remove()
    expect = F.silu(mlp.gate_proj(seen["x"])) * mlp.up_proj(seen["x"])
    assert rec.cat(1).shape == (2, 7, 48)
    torch.testing.assert_close(rec.cat(1), expect)


def test_mask_zero_percent_and_empty_change_nothing():
    m = tiny_llama()
    view = NeuronView(m)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        ref = m(ids).logits
        with view.mask(A.lowest_fraction_mask(view, 0.0, "activation")):
            same = m(ids).logits
        with view.mask({}):
            same2 = m(ids).logits
    assert torch.equal(ref, same) and torch.equal(ref, same2)


def test_mask_static_neurons_zeroes_exactly_those():
    m = tiny_llama()
    view = NeuronView(m)
    ids = torch.randint(0, 40, (1, 5))
    with torch.no_grad(), view.mask({0: torch.tensor([3, 7])}), view.record() as rec:
        out = m(ids).logits
    a0, a1 = rec.cat(0), rec.cat(1)
    assert torch.all(a0[..., [3, 7]] == 0) and torch.all(a0[..., :3] != 0)
    assert torch.all(a1 != 0)  # other layers untouched
    with torch.no_grad():
        ref = m(ids).logits
    assert not torch.allclose(out, ref)
    with pytest.raises(ValueError, match="out of range"):
        with view.mask({0: torch.tensor([48])}):
            pass


def test_lowest_fraction_mask_counts_and_output_indicator_uses_down_norms():
    m = tiny_llama(layers=1)
    view = NeuronView(m)
    with torch.no_grad():  # columns of the down projection get norms 1, 2, ..., 48
        w = torch.randn(32, 48)
        m.model.layers[0].mlp.down_proj.weight.copy_(w / w.norm(dim=0) * torch.arange(1, 49))
    view.refresh()
    torch.testing.assert_close(view.down_col_norms()[0], torch.arange(1, 49).float())
    a = torch.ones(2, 3, 48)  # equal |activation|: only the column norms separate the neurons
    torch.testing.assert_close(view.output_magnitude(0, -a), torch.arange(1, 49).float().expand(2, 3, 48))
    for f in (0.1, 0.5, 0.9):
        k = math.floor(f * 48)
        zero = A.lowest_fraction_mask(view, f, "output")(0, a)
        assert torch.equal(zero[0, 0], torch.arange(48) < k)  # the k smallest-norm neurons
        b = torch.randn(2, 3, 48)
        zero_a = A.lowest_fraction_mask(view, f, "activation")(0, b)
        assert torch.all(zero_a.sum(-1) == k)
        kept_min = b.abs().masked_fill(zero_a, float("inf")).amin(-1)
        dropped_max = b.abs().masked_fill(~zero_a, -1).amax(-1)
        assert torch.all(dropped_max <= kept_min)


def test_plain_gemma3_and_unsupported_architectures():
    g = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2,
                                                             n_positions=32))
    view = NeuronView(g)
    assert view.kinds == ["plain", "plain"] and view.n_neurons == [64, 64]
    assert view[0].down_cols().shape == (16, 64) and view[0].up_rows().shape == (64, 16)  # Conv1D transposed
    assert view[0].gate_rows() is None
    with torch.no_grad(), view.record() as rec:
        g(torch.randint(0, 40, (1, 4)))
    assert rec.cat(0).shape == (1, 4, 64)
    cfg = transformers.Gemma3TextConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    gm = transformers.Gemma3ForCausalLM(cfg)
    assert NeuronView(gm).kinds == ["gated", "gated"]
    with pytest.raises(ValueError, match="Llama, Mistral, Qwen2"):
        NeuronView(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_view_sparklm_spark_geglu_and_topk():
    m = tiny_spark("topk")
    view = NeuronView(m)
    assert view.kinds == ["topk", "topk"] and view[0].gate_rows() is None
    with torch.no_grad(), view.record() as rec:
        m(torch.randint(0, 40, (2, 16)))
    assert 0.6 < float((rec.cat(0) == 0).float().mean()) < 0.9  # top-k keeps ~25%
    for kind, expect in (("spark", "spark"), ("geglu", "gated")):
        m = tiny_spark(kind)
        view = NeuronView(m)
        ffn = m.layers[0].ffn
        assert view.kinds == [expect, expect] and view.arch == "sparkformer"
        assert view.n_neurons[0] == ffn.n_neurons
        if kind == "spark":
            assert torch.equal(view[0].gate_rows(), ffn.predictor.weight)  # K1 over x[:r]
        seen = {}
        h = ffn.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
        with torch.no_grad(), view.record() as rec:
            m(torch.randint(0, 40, (2, 16)))
        h.remove()
        x = seen["x"]
        if kind == "spark":
            expect_a = ffn.gate(x) * ffn.up_proj(x[..., ffn.rank:])
            frac_nonzero = float((rec.cat(0) != 0).float().mean())
            assert abs(frac_nonzero - 0.25) < 0.1  # statistical top-k sets the sparsity
        else:
            expect_a = F.gelu(ffn.gate_proj(x), approximate="tanh") * ffn.up_proj(x)
        torch.testing.assert_close(rec.cat(0), expect_a)


# ---- metrics against hand-computed cases ----------------------------------------------------------------------------
def test_average_precision_hand_computed():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    pos = torch.tensor([[True, False, True, False]])
    # ranks 1 and 3 are positive: (1/1 + 2/3) / 2
    torch.testing.assert_close(A.average_precision(scores, pos), torch.tensor([(1 + 2 / 3) / 2]))
    # a neuron firing only on capability 0 has AP 1 for it; a constant neuron has AP = positive rate
    s = torch.stack([torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 0.0]), torch.full((6,), 0.5)], dim=1)  # (P, n)
    pos = torch.tensor([[True, True, False, False, False, False], [False, False, True, True, True, True]])
    ap = A.average_precision(s, pos)
    torch.testing.assert_close(ap, torch.tensor([[1.0, 2 / 6], [4 / 6, 4 / 6]]))


def test_average_precision_matches_bruteforce_with_ties():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (30, 5), generator=g).float()  # many ties
    pos = torch.rand(2, 30, generator=g) < 0.4

    def brute(s, y):  # sklearn's definition: sum over distinct thresholds of (R_n - R_n-1) * P_n
        total, prev_r = 0.0, 0.0
        for t in sorted(set(s.tolist()), reverse=True):
            sel = s >= t
            tp = float((sel & y).sum())
            r, p = tp / float(y.sum()), tp / float(sel.sum())
            total += (r - prev_r) * p
            prev_r = r
        return total

    ap = A.average_precision(scores, pos)
    for c in range(2):
        for n in range(5):
            assert abs(float(ap[c, n]) - brute(scores[:, n], pos[c])) < 1e-6


def test_overlap_identical_disjoint_and_matrix():
    a = torch.tensor([True, True, False, False])
    assert A.overlap(a, a) == 1.0 and A.overlap(a, ~a) == 0.0
    top = [torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)]
    ov = A.overlap_matrix(top)[:, :, 0]
    torch.testing.assert_close(ov, torch.tensor([[1.0, 0.5, 1.0], [0.5, 1.0, 0.5], [1.0, 0.5, 1.0]]))


def test_cdf_fraction_below_and_top_sets():
    h = torch.histc(torch.tensor([0.05, 0.1, 0.15, 0.5, 1.0]), bins=100, min=0, max=1).double()
    assert A.fraction_below(h, 0.2) == pytest.approx(3 / 5)
    assert float(A.cdf(h)[-1]) == pytest.approx(1.0)
    torch.testing.assert_close(A.normalised(torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 0.0]])),
                               torch.tensor([[0.25, 0.5, 1.0], [0.0, 0.0, 0.0]]))
    ap = [torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.8, 0.1, 0.3, 0.7]])]
    top = A.top_neurons(ap, 0.5)[0]
    assert top.tolist() == [[False, True, True, False], [True, False, False, True]]


def test_neuron_firing_on_one_capability_gets_ap_one():
    """Layer 0 of a tiny Llama is rigged: neuron 5 reads an embedding dim that is +big on capability 'a' tokens
    and -big on capability 'b' tokens (ReLU gate), so it fires only on 'a'."""
    m = tiny_llama(act="relu")
    caps = two_cap_set()
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb.mul_(0.01)
        for ch in "abcdefgh":
            emb[ord(ch) % 40, 0] = 5.0
        for ch in "0123456789":
            emb[ord(ch) % 40, 0] = -5.0
        mlp = m.model.layers[0].mlp
        mlp.gate_proj.weight[5].zero_()
        mlp.gate_proj.weight[5, 0] = 10.0
        mlp.up_proj.weight[5].zero_()
        mlp.up_proj.weight[5, 0] = 1.0
    view = NeuronView(m)
    cfg = A.AnalysisConfig(max_tokens=32, batch_size=4)
    toks = A.encode(CharTok(), [p.text for p in caps.score], 32)
    stats = A.collect_activation_stats(m, view, toks, cfg, progress=False)
    labels = torch.tensor([0] * 6 + [1] * 6)
    assert torch.all(stats.prompt_mean[0][6:, 5] == 0) and torch.all(stats.prompt_mean[0][:6, 5] > 0)
    ap = A.functionality_scores(stats.prompt_mean, labels, 2)
    assert float(ap[0][0, 5]) == 1.0
    assert float(ap[0][1, 5]) == 0.5  # for b: all b prompts tie at 0 below every a prompt -> positive rate
    assert stats.n_tokens == 12 * 20


def test_token_losses_match_model_loss():
    m = tiny_llama()
    toks = [[1, 2, 3, 4, 5], [6, 7, 8]]
    nll, cnt = A.token_losses(m, toks, A.AnalysisConfig(batch_size=2))
    assert cnt.tolist() == [4.0, 2.0]
    with torch.no_grad():
        ref = m(torch.tensor([toks[0]]), labels=torch.tensor([toks[0]])).loss
    assert float(nll[0] / cnt[0]) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("which", ["llama", "spark"])
def test_analyze_end_to_end(which, tmp_path):
    from sparkformer.bricks.report import load_neuron_scores, write_report

    m = tiny_llama() if which == "llama" else tiny_spark("spark")
    caps = two_cap_set()
    cfg = A.AnalysisConfig(max_tokens=24, batch_size=4, mask_fractions=(0.0, 0.5, 0.9))
    res, arr = A.analyze(m, CharTok(), caps, cfg, name=which, progress=False, log=lambda s: None)
    sp = res["sparsity"]
    L = len(sp["zero_fraction"])
    assert L == 2 and len(sp["cdf_activation"][0]) == 100 and sp["cdf_output"][1][-1] == pytest.approx(1.0)
    for ind in ("activation", "output"):
        assert sp["masking"]["loss"][ind]["all"][0] == pytest.approx(sp["masking"]["base_loss_all"])
    if which == "spark":
        assert all(0.6 < z < 0.9 for z in sp["zero_fraction"])  # ~75% of a Spark FFN's neurons are exactly 0
        assert sp["frac_below_threshold_all_layers"]["activation"] > 0.7
    p = res["specialisation"]["prune"]
    assert p["rows"] == ["a", "b", "random"] and len(p["ppl_change_pct"]) == 3
    assert all(math.isfinite(v) for row in p["ppl_change_pct"] for v in row)
    ov = res["partition"]["overlap"]
    assert ov[0][0] == 1.0 and ov[1][1] == 1.0
    json.dumps(res)
    report = write_report([res], [arr], tmp_path, "sparkformer bricks analyze --model x --out y")
    text = report.read_text()
    assert "sparkformer bricks analyze --model x --out y" in text and "Functional partition" in text
    for png in ("cdf.png", "masking.png", "ap_layers.png", "prune_matrix.png", "overlap.png"):
        assert (tmp_path / which / png).stat().st_size > 1000
    (tmp_path / which / "cdf.png").unlink()
    from sparkformer.bricks.cli import main

    assert main(["report", str(tmp_path)]) == 0  # re-render from results.json, no model
    assert (tmp_path / which / "cdf.png").exists() and (tmp_path / "report.md").read_text() == text
    names, ap, top = load_neuron_scores(tmp_path / which / "neuron_scores.safetensors")
    assert names == ["a", "b"] and len(ap) == 2 and top[0].sum(1).tolist() == [math.ceil(0.05 * ap[0].shape[1])] * 2


# ---- capabilities -----------------------------------------------------------------------------------------------
def test_arithmetic_problems_are_correct_and_deterministic():
    rng = random.Random(3)
    for _ in range(200):
        p = arithmetic_problem(rng)
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", p):
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c
            if op == "/":
                assert a % b == 0
    assert arithmetic_problem(random.Random(7)) == arithmetic_problem(random.Random(7))


def test_strip_docs_and_comments():
    src = 'def f(x):\n    """Doc\n    string."""\n    # comment\n    return x  # keep\n'
    assert strip_docs_and_comments(src) == "def f(x):\n    return x  # keep\n"
    assert strip_docs_and_comments("def (:") is None


def test_capability_set_balanced_deterministic_and_user_jsonl(tmp_path):
    rows = [{"text": f"Translate to French: the {w} is red.", "capability": "translation"} for w in
            ("cat", "dog", "house", "car", "tree", "book", "chair", "door")]
    rows += [{"text": f"Sort the list {[i, 3 * i % 7, 5]} in ascending order.", "capability": "sorting"}
             for i in range(8)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    kw = dict(data=[str(path)], n_per_capability=5, n_heldout=2, chars=120, seed=4)
    s1 = build_capability_set(["arithmetic", "reference"], **kw)
    s2 = build_capability_set(["arithmetic", "reference"], **kw)
    assert s1.capabilities == ["arithmetic", "reference", "translation", "sorting"]
    assert [p.text for p in s1.score] == [p.text for p in s2.score]
    for split, n in (("score", 5), ("heldout", 2)):
        assert {c: len(v) for c, v in s1.by_capability(split).items()} == {c: n for c in s1.capabilities}
    # scoring and held-out prompts come from disjoint documents
    for c in ("reference", "translation"):
        src_s = {p.source for p in s1.by_capability("score")[c]}
        src_h = {p.source for p in s1.by_capability("heldout")[c]}
        assert not src_s & src_h
    assert all(len(p.text) <= 120 for p in s1.score)
    s3 = build_capability_set(["arithmetic", "reference"], **{**kw, "seed": 5})
    assert [p.text for p in s3.score] != [p.text for p in s1.score]
    with pytest.raises(ValueError, match="unknown capability"):
        resolve_capabilities("code,poetry")
    assert resolve_capabilities(None)[:2] == ["code", "docstrings"]
