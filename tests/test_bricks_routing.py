"""Partitions, routers and sparkify on tiny random models (offline, CPU, no download).

Exactness checks: a partition covers every neuron once with equal bricks; with every brick (or neuron) selected the
routed model is bit-identical to the dense one; the Spark predictor as a Router reproduces the SparkLM's own
selection; files round-trip; unsupported FFNs get an error naming what is supported.
"""

import json
import math
import random

import pytest
import torch

from sparkformer.bricks.brick_routers import fit_brick_router
from sparkformer.bricks.capabilities import CapabilitySet, Prompt
from sparkformer.bricks.continued_training import continued_training
from sparkformer.bricks.ffn_inputs import layer_activation, record_ffn_inputs
from sparkformer.bricks.neurons import NeuronView
from sparkformer.bricks.partition import (Partition, balanced_assign, balanced_kmeans, coactivation_counts,
                                          coactivation_score, partition_model)
from sparkformer.bricks.router_eval import calibrate_stat_fraction, recall_metrics, routed_loss
from sparkformer.bricks.routing import (BrickMLPRouter, LowRankPredictor, OracleRouter, RandomRouter,
                                        SparkPredictorRouter, load_routers, oracle_routers, random_routers, route,
                                        save_routers, select_units, spark_routers)
from sparkformer.bricks.sparkify import SparkifyConfig, fit_predictor, sparkify_model
from sparkformer.model import SparkLM
from tiny_models import tiny_llama as shared_llama
from tiny_models import tiny_spark as shared_spark

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 2, act: str = "silu") -> torch.nn.Module:
    return shared_llama(layers=layers, act=act)


def tiny_spark(kind: str = "spark", topk: str = "statistical") -> SparkLM:
    m = shared_spark(kind, topk_method=topk)
    with torch.no_grad():  # non-zero norms so the blocks actually transform x
        for name, p in m.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return m


class CharTok:
    def encode(self, text):
        return [ord(c) % 40 for c in text]


def token_lists(n=12, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 40, (length - (i % 3),), generator=g).tolist() for i in range(n)]


def ids(B=2, T=9):
    return torch.randint(0, 40, (B, T))


# ---- partition --------------------------------------------------------------------------------------------------
def test_balanced_assign_fills_every_cluster_to_capacity():
    d = torch.rand(60, 5)
    d[:, 0] = -1.0  # everyone prefers cluster 0
    a = balanced_assign(d, 12)
    assert torch.bincount(a, minlength=5).tolist() == [12] * 5
    v = torch.cat([torch.randn(10, 3) + 10 * torch.eye(3)[i] for i in range(3)])  # 3 clear blobs of 10
    a = balanced_kmeans(v, 3, seed=1)
    assert all(len(set(a[10 * i: 10 * i + 10].tolist())) == 1 for i in range(3))
    with pytest.raises(ValueError, match="equal bricks"):
        balanced_kmeans(torch.randn(10, 2), 3)


@pytest.mark.parametrize("method", ["weights", "coactivation"])
@pytest.mark.parametrize("which", ["llama", "spark"])
def test_partition_covers_every_neuron_once_with_equal_sizes(method, which, tmp_path):
    m = tiny_llama() if which == "llama" else tiny_spark("spark")
    view = NeuronView(m)
    E = 4
    part = partition_model(m, E, method, token_lists=token_lists(), features="gate_up")
    assert part.n_layers == len(view) and part.n_neurons == view.n_neurons
    for li, n in enumerate(view.n_neurons):
        g = part.groups(li)
        assert g.shape == (E, n // E)
        assert sorted(g.flatten().tolist()) == list(range(n))  # every neuron exactly once
        assert torch.bincount(part.assign[li], minlength=E).tolist() == [n // E] * E
    path = part.save(tmp_path / "p")
    assert path.suffix == ".safetensors" and path.stat().st_size < 4096
    back = Partition.load(path)
    assert back.method == method and back.n_bricks == E and back.meta == part.meta
    assert all(torch.equal(a, b) for a, b in zip(back.assign, part.assign))
    with pytest.raises(ValueError, match="equal bricks|divide"):
        partition_model(m, 5, "weights")
    with pytest.raises(ValueError, match="not all"):
        Partition("weights", 2, [torch.tensor([0, 0, 0, 1])])


@pytest.mark.parametrize("norm", ["cosine", "phi"])
def test_coactivation_partition_groups_coactive_neurons(norm):
    m = tiny_llama(layers=1)
    view = NeuronView(m)
    counts, n_tok = coactivation_counts(m, view, token_lists(), active_fraction=0.25)
    assert n_tok == sum(len(t) for t in token_lists()) and counts[0].shape == (48, 48)
    assert torch.allclose(counts[0].diagonal().sum(), torch.tensor(float(n_tok * 12), dtype=torch.float64))
    co = partition_model(m, 4, "coactivation", token_lists=token_lists(), active_fraction=0.25,
                         coactivation_norm=norm)
    assert co.meta["coactivation_norm"] == norm
    rnd = Partition("random", 4, [torch.randperm(48) % 4])
    assert coactivation_score(co, counts)[0] > coactivation_score(rnd, counts)[0]


# ---- routers: exactness --------------------------------------------------------------------------------------------
def test_select_units_topk_stat_and_all():
    s = torch.randn(5, 200)
    assert select_units(s, 0.1, "topk").sum(-1).tolist() == [20] * 5
    assert select_units(s, 1.0, "stat").all() and select_units(s, 1.0, "topk").all()
    frac = select_units(torch.randn(400, 1000), 0.2, "stat").float().mean()
    assert abs(float(frac) - 0.2) < 0.01
    with pytest.raises(ValueError, match="allowed"):
        select_units(s, 0.5, "sorted")


@pytest.mark.parametrize("which", ["llama", "spark-geglu"])
def test_all_bricks_active_and_oracle_at_100_equal_dense_exactly(which):
    m = tiny_llama() if which == "llama" else tiny_spark("geglu")
    view = NeuronView(m)
    part = partition_model(m, 4, "weights")
    x = ids()
    fwd = (lambda: m(input_ids=x).logits) if which == "llama" else (lambda: m(x).logits)
    with torch.no_grad():
        ref = fwd()
        brick = [BrickMLPRouter(view[i].up_rows().shape[1], part.assign[i], hidden=8, fraction=1.0)
                 for i in range(len(view))]
        for routers in (brick, oracle_routers(view, fraction=1.0), oracle_routers(view, part, fraction=1.0),
                        random_routers(view, part, fraction=1.0)):
            with route(m, routers, view) as st:
                out = fwd()
            assert torch.equal(out, ref) and st.fraction() == 1.0
        # every neuron by exact top-k (k = n): the mask is all True, the output bit-identical
        with route(m, oracle_routers(view, method="topk", fraction=0.9999), view):
            assert torch.equal(fwd(), ref)
        with route(m, oracle_routers(view, fraction=0.5), view) as st:
            half = fwd()
        assert not torch.allclose(half, ref) and st.fraction() == pytest.approx(0.5)


def test_oracle_keeps_the_largest_output_magnitudes():
    m = tiny_llama(layers=1)
    view = NeuronView(m)
    x = ids(1, 6)
    with torch.no_grad(), view.record() as rec:
        m(input_ids=x)
    a = rec.cat(0)
    mag = a.abs() * view.down_col_norms()[0]
    keep = mag >= mag.topk(12, dim=-1).values[..., -1:]
    with torch.no_grad(), route(m, oracle_routers(view, fraction=0.25), view), view.record() as rec2:
        m(input_ids=x)
    torch.testing.assert_close(rec2.cat(0), torch.where(keep, a, torch.zeros_like(a)))


@pytest.mark.parametrize("topk", ["statistical", "exact"])
def test_spark_predictor_router_reproduces_the_models_selection(topk):
    m = tiny_spark("spark", topk)
    view = NeuronView(m)
    routers = spark_routers(m)
    assert all(isinstance(r, SparkPredictorRouter) for r in routers)
    xs = {}
    hs = [layer.module.register_forward_pre_hook(lambda mod, a, i=layer.layer: xs.__setitem__(i, a[0]))
          for layer in view]
    x = ids(3, 11)
    with torch.no_grad(), view.record() as rec:
        ref = m(x).logits
    for h in hs:
        h.remove()
    for i, r in enumerate(routers):
        own = view[i].module.gate(xs[i]) != 0  # the layer's own active set
        assert torch.equal(r.neuron_mask(xs[i]), own)
        assert torch.equal(rec.cat(i) != 0, own)
    with torch.no_grad(), route(m, routers, view) as st:
        out = m(x).logits
    assert torch.equal(out, ref)
    assert st.fraction() == pytest.approx(float(sum((rec.cat(i) != 0).float().mean() for i in range(2)) / 2))
    # exported as a saveable predictor (split input, gate output): same scores
    p = routers[0].to_predictor()
    torch.testing.assert_close(p.scores(xs[0]), routers[0].scores(xs[0]))
    with pytest.raises(ValueError, match="no Spark FFN"):
        spark_routers(tiny_spark("geglu"))


# ---- persistence ----------------------------------------------------------------------------------------------------
def test_routers_round_trip(tmp_path):
    torch.manual_seed(1)
    g = torch.arange(48) % 4
    routers = [
        LowRankPredictor(B=torch.randn(96, 8), A=torch.randn(8, 32), output="gate_up", act="silu", fraction=0.3,
                         method="stat", stat_fraction=0.21),
        LowRankPredictor(B=torch.randn(48, 16), dims=torch.arange(16), output="gate", act="gelu_tanh",
                         bias=torch.randn(48), groups=g, fraction=0.5, method="topk"),
        BrickMLPRouter(32, g, hidden=8, fraction=0.25),
        RandomRouter(48, g, seed=3, fraction=0.5),
        OracleRouter(torch.rand(48), fraction=0.4),
    ]
    path = save_routers(tmp_path / "r", routers, {"model": "tiny"})
    doc = json.loads(path.with_suffix(".json").read_text())
    assert doc["format"] == "sparkformer-routers" and doc["layers"][0]["rank"] == 8
    back, meta = load_routers(path.with_suffix(".json"))
    assert meta == {"model": "tiny"} and [type(r) for r in back] == [type(r) for r in routers]
    x = torch.randn(2, 5, 32)
    a = torch.randn(2, 5, 48)
    for r, b in zip(routers, back):
        assert b.config() == r.config()
        if isinstance(r, RandomRouter):
            r.reset()
        s = r.scores(x, a)
        if isinstance(r, RandomRouter):
            b.reset()
        assert torch.equal(b.scores(x, a), s)
        assert torch.equal(b.expand(b.select(s)), r.expand(r.select(s)))


def test_decode_form_only_for_the_predictors_a_decode_engine_runs_itself():
    """The (A, B, n, f, act) a decode engine reads: a neuron-level low-rank 'gate_up' predictor with statistical
    selection below 1; None for every other router or configuration."""
    from sparkformer.bricks.routing import ACTS

    torch.manual_seed(0)
    B, A = torch.randn(96, 8), torch.randn(8, 32)
    kw = dict(output="gate_up", act="silu", fraction=0.3, method="stat")
    form = LowRankPredictor(B=B, A=A, stat_fraction=0.21, **kw).decode_form(torch.bfloat16)
    assert form is not None
    a, b, n, f, act = form
    assert a.dtype == b.dtype == torch.bfloat16 and a.is_contiguous() and b.is_contiguous()
    assert torch.equal(a, A.to(torch.bfloat16)) and torch.equal(b, B.to(torch.bfloat16)) and n == 48
    assert act is ACTS["silu"]
    assert f == 0.21  # the calibrated stat_fraction
    uncalibrated = LowRankPredictor(B=B, A=A, **kw).decode_form(torch.float32)
    assert uncalibrated[3] == 0.3  # f = fraction
    assert uncalibrated[0].dtype == torch.float32
    others = [LowRankPredictor(B=B, A=A, **{**kw, "method": "topk"}),  # exact top-k
              LowRankPredictor(B=B, A=A, **{**kw, "fraction": 1.0}),  # everything runs
              LowRankPredictor(B=B, A=A, groups=torch.arange(48) % 4, **kw),  # bricks
              LowRankPredictor(B=B, A=A, bias=torch.randn(96), **kw),
              LowRankPredictor(B=torch.randn(48, 8), A=A, **{**kw, "output": "gate"}),
              LowRankPredictor(B=B, dims=torch.arange(8), **kw),  # Spark split input, no A
              OracleRouter(torch.rand(48), fraction=0.3), RandomRouter(48, fraction=0.3),
              BrickMLPRouter(32, torch.arange(48) % 4, fraction=0.3)]
    assert [r.decode_form(torch.float32) for r in others] == [None] * len(others)


# ---- unsupported ---------------------------------------------------------------------------------------------------
def test_unsupported_ffns_get_a_clear_error():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2,
                                                                 n_positions=32))
    with pytest.raises(ValueError, match=r"plain \(ungated\) FFN; sparkify supports gated FFNs .*Llama"):
        sparkify_model(gpt2, None, SparkifyConfig(rank=4, fit="none"))
    with pytest.raises(ValueError, match="Spark FFN.*sparkify supports gated FFNs"):
        sparkify_model(tiny_spark("spark"), None, SparkifyConfig(rank=4, fit="none"))
    with pytest.raises(ValueError, match="no FFN layers found; supported: gated FFNs"):
        partition_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2)
    with pytest.raises(ValueError, match="Llama, Mistral"):
        route(torch.nn.Sequential(torch.nn.Linear(4, 4)), []).__enter__()


# ---- sparkify --------------------------------------------------------------------------------------------------------
def test_calibrated_stat_fraction_hits_the_target_on_skewed_scores():
    s = torch.randn(300, 500).exp()  # log-normal: plain stat top-k keeps too few
    for f in (0.1, 0.3):
        plain = float(select_units(s, f, "stat").float().mean())
        sf = calibrate_stat_fraction(s, f)
        got = float(select_units(s, f, "stat", sf).float().mean())
        assert abs(got - f) < 0.005 and abs(plain - f) > 0.02


def test_full_rank_predictor_is_the_oracle_and_low_rank_is_useful():
    m = tiny_llama()
    view = NeuronView(m)
    X = record_ffn_inputs(m, view, token_lists(16), dtype=torch.float32)
    assert X[0].shape == (sum(len(t) for t in token_lists(16)), 32)
    full, info = fit_predictor(view[0], X[0], SparkifyConfig(rank=32, fit="lsq", method="topk"))
    assert info["explained"] == pytest.approx(1.0)
    met = recall_metrics(view[0], full, X[0], [0.1, 0.3, 0.5])
    assert all(r > 0.999 for r in met["recall"])  # rank = d: the score is the true output magnitude
    low, _ = fit_predictor(view[0], X[0], SparkifyConfig(rank=8, fit="lsq", fraction=0.3))
    rnd = recall_metrics(view[0], RandomRouter(48, fraction=0.3), X[0], [0.3])["recall"][0]
    got = recall_metrics(view[0], low, X[0], [0.3])["recall"][0]
    assert got > rnd + 0.1
    for kw in ({"input": "split", "fit": "none"}, {"input": "split", "fit": "lsq"}, {"fit": "none"},
               {"output": "gate"}, {"train_steps": 5}):
        p, _ = fit_predictor(view[1], X[1], SparkifyConfig(rank=8, **kw))
        assert p.scores(X[1][:3]).shape == (3, 48) and torch.isfinite(p.scores(X[1])).all()


def test_sparkify_model_calibrates_and_routes_at_the_target_fraction(tmp_path):
    m = tiny_llama()
    view = NeuronView(m)
    toks = token_lists(16)
    X = record_ffn_inputs(m, view, toks, dtype=torch.float32)
    routers, infos = sparkify_model(m, X, SparkifyConfig(rank=8, fraction=0.3))
    assert all(0 < i["stat_fraction"] <= 1 for i in infos)
    res = routed_loss(m, toks, routers, view, batch_size=4)
    assert abs(res["active"] - 0.3) < 0.05 and math.isfinite(res["ppl"])
    dense = routed_loss(m, toks, None, view, batch_size=4)
    with torch.no_grad():
        for r in routers:
            r.fraction = 1.0
    assert routed_loss(m, toks, routers, view, batch_size=4)["loss"] == dense["loss"]
    path = save_routers(tmp_path / "pred", routers)
    back, _ = load_routers(path)
    torch.testing.assert_close(back[1].scores(X[1]), routers[1].scores(X[1]))


def test_brick_router_learns_and_layer_activation_matches_the_model():
    m = tiny_llama(layers=1)
    view = NeuronView(m)
    X = record_ffn_inputs(m, view, token_lists(24), dtype=torch.float32)
    with torch.no_grad(), view.record() as rec:
        from sparkformer.bricks.tokens import batches

        acts = []
        for _i, x, valid in batches(token_lists(24), 8):
            m(input_ids=x)
            acts.append(rec.activations[0][-1][valid])
    torch.testing.assert_close(layer_activation(view[0], X[0]), torch.cat(acts), rtol=1e-5, atol=1e-6)
    part = partition_model(m, 4, "weights")
    router, log = fit_brick_router(view[0], X[0], part.assign[0], hidden=0, steps=60, lr=1e-2, fraction=0.25,
                                   method="topk")
    assert log["loss_last"] < log["loss_first"]
    got = recall_metrics(view[0], router, X[0], [0.25])["energy"][0]
    rnd = recall_metrics(view[0], RandomRouter(48, part.assign[0], fraction=0.25), X[0], [0.25])["energy"][0]
    assert got > rnd


@pytest.mark.parametrize("objective", ["kd", "lm"])
def test_continued_training_runs_and_keeps_dtype(objective):
    m = tiny_llama()
    view = NeuronView(m)
    toks = token_lists(8)
    routers = oracle_routers(view, fraction=1.0)
    trained, log = continued_training(m, routers, toks, steps=2, lr=1e-3, objective=objective, batch_size=4,
                                      autocast_dtype=None)
    assert log["steps"] == 2 and len(log["losses"]) == 2 and log["tokens"] > 0
    assert next(trained.parameters()).dtype == torch.float32
    if objective == "kd":  # all neurons on: the student starts as the teacher
        assert log["losses"][0] == pytest.approx(0.0, abs=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), m.parameters()))


# ---- commands ----------------------------------------------------------------------------------------------------
def two_cap_set(n=6, h=3) -> CapabilitySet:
    rng = random.Random(0)
    a = [Prompt("".join(rng.choice("abcdefgh") for _ in range(24)), "a", "gen") for _ in range(n + h)]
    b = [Prompt("".join(rng.choice("0123456789") for _ in range(24)), "b", "gen") for _ in range(n + h)]
    return CapabilitySet(["a", "b"], a[:n] + b[:n], a[n:] + b[n:], 0)


def test_commands_end_to_end_on_a_tiny_llama(tmp_path):
    from sparkformer.bricks.brick_routers import RouteRun, run_route
    from sparkformer.bricks.partition import PartitionRun, run_partition
    from sparkformer.bricks.sparkify import SparkifyRun, run_sparkify

    m = tiny_llama()
    caps = two_cap_set(n=10, h=3)
    quiet = dict(model=m, tokenizer=CharTok(), capset=caps, log=lambda s: None)
    small = dict(batch_size=4, max_tokens=24)
    summ = run_partition(PartitionRun(out=str(tmp_path / "p.safetensors"), n_bricks=4, method="coactivation",
                                      **small), **quiet)
    assert summ["brick_size"] == 12 and summ["in_brick_coactivation"] > summ["in_brick_coactivation_random"]
    assert summ["command"] == ("sparkformer bricks partition --max-tokens 24 --batch-size 4 --n-bricks 4 --method "
                               f"coactivation --out {tmp_path / 'p.safetensors'}")
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved == {k: v for k, v in summ.items() if k != "command"}
    part = Partition.load(tmp_path / "p.safetensors")
    res = run_sparkify(SparkifyRun(out=str(tmp_path / "s"), rank=8, fraction=0.3, fractions=[0.3], finetune_steps=1,
                                   finetune_batch=2, finetune_save=True, record_cache=str(tmp_path / "rec.safetensors"),
                                   **small), **quiet)
    assert (tmp_path / "s" / "finetuned" / "config.json").is_file()
    s = res["summary"]
    assert abs(s["achieved_fraction"] - 0.3) < 0.1 and s["ppl"] > 0 and "after_training_ppl_change_pct" in s
    assert set(res["curves"]) == {"predictor", "oracle", "random"} and s["oracle_ppl_change_pct"] is not None
    assert res["config"] == {"rank": 8, "input": "lowrank", "output": "gate_up", "fit": "lsq", "train_steps": 0,
                             "lr": 1e-3, "batch_tokens": 512, "fraction": 0.3, "method": "stat", "seed": 0}
    assert json.loads((tmp_path / "s" / "results.json").read_text())["summary"] == s
    again = run_sparkify(SparkifyRun(out=str(tmp_path / "s2"), fractions=[0.3], baselines=(),
                                     predictor=str(tmp_path / "s" / "predictor.safetensors"),
                                     record_cache=str(tmp_path / "rec.safetensors"), **small), **quiet)
    assert again["summary"]["ppl"] == pytest.approx(s["ppl"], rel=1e-6)  # loaded predictor, cached inputs
    for f in ("predictor.safetensors", "predictor.json", "results.json", "sparkify_ppl.png", "sparkify_recall.png"):
        assert (tmp_path / "s" / f).stat().st_size > 100
    doc = json.loads((tmp_path / "s" / "predictor.json").read_text())
    assert doc["meta"]["act"] == "silu" and doc["layers"][0]["input"] == "lowrank" and doc["layers"][0]["rank"] == 8
    res = run_route(RouteRun(out=str(tmp_path / "r"), partition=str(tmp_path / "p.safetensors"), fractions=[0.25, 1.0],
                             steps=20, predictor=str(tmp_path / "s" / "predictor.safetensors"), **small), **quiet)
    assert set(res["curves"]) == {"router", "oracle", "random", "predictor-bricks"}
    full = [p for pts in res["curves"].values() for p in pts if p["fraction"] == 1.0]
    assert all(p["loss"] == res["dense"]["loss"] and p["active"] == 1.0 for p in full)  # every brick on = dense
    assert (tmp_path / "r" / "route_ppl.png").exists() and (tmp_path / "r" / "brick_routers.json").exists()
    routers, meta = load_routers(tmp_path / "r" / "brick_routers.safetensors")
    assert all(torch.equal(r.groups, a) for r, a in zip(routers, part.assign)) and meta["n_bricks"] == 4
    assert set(json.loads((tmp_path / "r" / "results.json").read_text())) == {
        "command", "model", "environment", "data", "partition", "router", "dense", "recall", "curves", "timings_s"}


def test_cli_is_built_from_the_settings_and_reports_errors(tmp_path, capsys):
    import argparse

    from sparkformer.bricks.cli import main
    from sparkformer.bricks.experiment import add_arguments, command_line, from_arguments
    from sparkformer.bricks.partition import PartitionRun
    from sparkformer.bricks.sparkify import SparkifyConfig, SparkifyRun

    parser = argparse.ArgumentParser()
    add_arguments(parser, SparkifyRun)
    run = from_arguments(SparkifyRun, parser.parse_args(["--model", "x", "--rank", "64", "--fractions", "0.5,0.1",
                                                         "--baselines", "oracle", "--ablation", "--out", "o"]))
    assert run.rank == 64 and run.fraction == SparkifyConfig.fraction == 0.3 and run.selection == "stat"
    assert run.fractions == (0.1, 0.5) and run.baselines == ("oracle",) and run.ablation and run.data == []
    assert run.predictor_config() == SparkifyConfig(rank=64)
    assert command_line("sparkify", run) == ("sparkformer bricks sparkify --model x --rank 64 --fractions 0.1,0.5 "
                                             "--baselines oracle --ablation --out o")
    assert command_line("sparkify", SparkifyRun(model="x", out="o")) == "sparkformer bricks sparkify --model x --out o"
    parser = argparse.ArgumentParser()
    add_arguments(parser, PartitionRun)
    a = parser.parse_args(["--model", "x", "--n-bricks", "8", "--method", "coactivation", "--out", "p"])
    assert from_arguments(PartitionRun, a) == PartitionRun(model="x", out="p", n_bricks=8, method="coactivation")
    assert not hasattr(a, "heldout_per_capability") and not hasattr(a, "record_cache")  # not partition options
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "x", "--bricks", "8", "--out", "p"])  # the count is --n-bricks
    capsys.readouterr()
    assert main(["route", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sparkify", "--model", "x", "--fractions", "0,0.5", "--out", str(tmp_path / "o")])
    assert "--fractions: fractions '0,0.5': every fraction must be in (0, 1]" in capsys.readouterr().err
