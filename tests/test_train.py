import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparkformer import corpora
from sparkformer.data import prepare
from sparkformer.evaluate import evaluate
from sparkformer.checkpoint import latest_checkpoint, load_checkpoint
from sparkformer.train import train
from sparkformer.train_config import TrainConfig, TrainingDiverged, load_train_config, lr_at, resolve_model_config

sys.path.insert(0, str(Path(__file__).parent))
from test_data import make_corpus  # noqa: E402

MICRO = {"preset": "tiny-spark", "d_model": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 32,
         "ffn_dim": 128, "max_seq_len": 64, "sliding_window": 16, "spark_attn_topk": 8}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    old = os.environ.get("SPARKFORMER_CACHE")
    os.environ["SPARKFORMER_CACHE"] = str(root / "cache")
    corpora._MEMO.clear()
    try:
        return prepare(make_corpus(root / "corpus", n_docs=16), out=root / "data", vocab_size=300,
                       val_fraction=0.2, quiet=True)
    finally:
        if old is None:
            os.environ.pop("SPARKFORMER_CACHE")
        else:
            os.environ["SPARKFORMER_CACHE"] = old


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Micro models train several times faster on one thread than on two on a shared machine."""
    yield


def micro_cfg(data_dir, out_dir, **kw) -> TrainConfig:
    base = dict(model=dict(MICRO), data_dir=str(data_dir), out_dir=str(out_dir), batch_size=4, seq_len=32,
                max_steps=8, warmup_steps=2, eval_interval=4, eval_iters=1, log_interval=1, checkpoint_interval=4,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def records(out_dir, kind="train"):
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=20)
    lrs = [lr_at(cfg, s) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert TrainConfig(max_tokens=1000, batch_size=2, seq_len=100).total_steps == 5


def test_config_file_and_overrides(tmp_path, data_dir):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  preset: tiny-spark\n  d_model: 64\ntrain:\n  batch_size: 8\nlr: 0.001\n")
    cfg = load_train_config(f, ["max_steps=7", "model.n_layers=2", "min_lr=0", "bf16=true", "max_tokens=1e6"])
    assert (cfg.batch_size, cfg.lr, cfg.max_steps, cfg.min_lr, cfg.bf16) == (8, 0.001, 7, 0.0, True)
    assert cfg.max_tokens == 1_000_000 and isinstance(cfg.max_tokens, int)  # YAML reads 1e6 as a string
    f2 = tmp_path / "c2.yaml"
    f2.write_text("lr: 3e-4\nmax_steps: 1.0e+3\n")
    assert (load_train_config(f2).lr, load_train_config(f2).max_steps) == (3e-4, 1000)
    assert cfg.model == {"preset": "tiny-spark", "d_model": 64, "n_layers": 2}
    mc = resolve_model_config(cfg.model, vocab_size=300, seq_len=128)
    assert (mc.d_model, mc.n_layers, mc.vocab_size, mc.ffn) == (64, 2, 300, "spark")  # tokenizer vocab adopted
    assert load_train_config(None, ["model=small-dense"]).model == {"preset": "small-dense"}

    with pytest.raises(ValueError, match="unknown field 'lrr'"):
        load_train_config(f, ["lrr=1"])
    with pytest.raises(ValueError, match="unknown model field 'dmodel'"):
        load_train_config(f, ["model.dmodel=3"])
    with pytest.raises(ValueError, match="batch_size.*multiple of grad_accum=3"):
        load_train_config(f, ["grad_accum=3"])
    with pytest.raises(ValueError, match="model has vocab_size=8192 but the tokenizer has 300"):
        resolve_model_config({"preset": "tiny", "vocab_size": 8192}, vocab_size=300)
    with pytest.raises(ValueError, match="seq_len=1024 exceeds the model's max_seq_len=512"):
        resolve_model_config("tiny", vocab_size=300, seq_len=1024)
    with pytest.raises(ValueError, match="unknown model preset"):
        resolve_model_config("huge", vocab_size=300)


def test_train_metrics_checkpoint_eval(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    res = train(micro_cfg(data_dir, out))
    assert res["step"] == 8 and res["tokens"] == 8 * 4 * 32 and not res["interrupted"]
    assert set(res["val_loss"]) == {"drama", "code"}
    recs = records(out)
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert recs[-1]["loss"] < recs[0]["loss"]
    for key in ("loss", "lr", "tokens_per_s", "grad_norm", "ffn_activity", "keys_per_query"):
        assert key in recs[0]
    assert len(recs[0]["ffn_activity"]) == 2 and 0 < recs[0]["ffn_activity"][0] < 0.5
    evals = records(out, "eval")
    assert [e["step"] for e in evals] == [4, 8] and set(evals[0]["val_loss"]) == {"drama", "code"}

    ck = latest_checkpoint(out)
    assert ck.name == "step-0000008" and res["checkpoint"] == str(ck)
    assert sorted(p.name for p in ck.iterdir()) == ["checksums.json", "config.json", "model.safetensors", "state.json",
                                                    "tokenizer.json", "trainer_state.pt"]
    assert not list((out / "checkpoints").glob("*.tmp*"))
    model, info = load_checkpoint(out)
    assert info["model"]["vocab_size"] == 300
    # eval: perplexity per domain on the whole val split
    capsys.readouterr()
    ev = evaluate(out, seq_len=32, progress=True)
    assert "eval val" in capsys.readouterr().err  # a progress bar: evaluation can take minutes
    assert set(ev["domains"]) == {"drama", "code"}
    assert ev["all"]["ppl"] == pytest.approx(math.exp(ev["all"]["loss"]))
    assert abs(ev["domains"]["code"]["loss"] - res["val_loss"]["code"]) < 0.5
    # a second run into the same folder must be explicit
    with pytest.raises(ValueError, match="already has checkpoints; pass --resume"):
        train(micro_cfg(data_dir, out))


def test_data_without_validation_is_said_at_start(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("the king and the queen of the night\n" * 80)
    d = prepare(str(tmp_path / "t.txt"), out=tmp_path / "d", vocab_size=280, val_fraction=0, quiet=True)
    res = train(micro_cfg(d, tmp_path / "run", max_steps=1))
    assert res["val_loss"] == {}
    assert "has no validation tokens; val_loss stays empty" in capsys.readouterr().err


def test_resume_is_bit_for_bit(tmp_path, data_dir):
    full = train(micro_cfg(data_dir, tmp_path / "a", grad_accum=2))
    part = train(micro_cfg(data_dir, tmp_path / "b", grad_accum=2, stop_after=3))
    assert part["interrupted"] and part["step"] == 3
    rest = train(micro_cfg(data_dir, tmp_path / "b", grad_accum=2), resume=True)
    assert rest["step"] == 8
    assert [r["loss"] for r in records(tmp_path / "b")] == [r["loss"] for r in records(tmp_path / "a")]
    assert rest["val_loss"] == full["val_loss"]
    a = load_file(str(latest_checkpoint(tmp_path / "a") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="seed=1 but the checkpoint was trained with seed=0"):
        train(micro_cfg(data_dir, tmp_path / "b", grad_accum=2, seed=1, max_steps=9), resume=True)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, data_dir, monkeypatch):
    from sparkformer.model import SparkLM

    calls = {"n": 0}
    forward = SparkLM.forward

    def poisoned(self, *a, **kw):
        out = forward(self, *a, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 5 and out.loss is not None:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SparkLM, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="loss=nan at step 5") as e:
        train(micro_cfg(data_dir, out, checkpoint_interval=2))
    assert e.value.step == 5 and "step-0000004" in str(e.value)
    assert latest_checkpoint(out).name == "step-0000004"
    load_checkpoint(out)  # still loadable


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _write_cfg(path: Path, cfg: TrainConfig) -> Path:
    import yaml

    d = cfg.to_dict()
    path.write_text(yaml.safe_dump(d))
    return path


def test_sigterm_saves_checkpoint_and_resume_matches(tmp_path, data_dir):
    cfg = micro_cfg(data_dir, tmp_path / "sig", max_steps=400, checkpoint_interval=1000, eval_interval=1000)
    proc = subprocess.Popen([sys.executable, "-m", "sparkformer.train", "--config",
                             str(_write_cfg(tmp_path / "sig.yaml", cfg))], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM" in err
    stopped = json.loads((latest_checkpoint(tmp_path / "sig") / "state.json").read_text())["step"]
    assert 3 <= stopped < 400
    # resume a few more steps; the curve equals an uninterrupted run with the same schedule
    more = dict(stop_after=stopped + 2)
    train(micro_cfg(data_dir, tmp_path / "sig", max_steps=400, checkpoint_interval=1000, eval_interval=1000,
                    **more), resume=True)
    train(micro_cfg(data_dir, tmp_path / "ref", max_steps=400, checkpoint_interval=1000, eval_interval=1000, **more))
    got, ref = [r["loss"] for r in records(tmp_path / "sig")], [r["loss"] for r in records(tmp_path / "ref")]
    assert len(ref) == stopped + 2 and got == ref


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_match_single_process(tmp_path, data_dir, mode):
    kw = dict(batch_size=8, grad_accum=2, max_steps=3, eval_interval=3, checkpoint_interval=3, fsdp=mode == "fsdp")
    cfg_path = _write_cfg(tmp_path / "c.yaml", micro_cfg(data_dir, tmp_path / "multi", **kw))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "sparkformer.train", "--config", str(cfg_path)],
                       env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    single = train(micro_cfg(data_dir, tmp_path / "single", **{**kw, "fsdp": False}))
    multi, one = records(tmp_path / "multi"), records(tmp_path / "single")
    assert [m["step"] for m in multi] == [1, 2, 3]
    for m, s in zip(records(tmp_path / "multi", "eval"), records(tmp_path / "single", "eval")):
        assert m["val_loss"] == pytest.approx(s["val_loss"], rel=1e-5)  # same eval windows for any world size
    for m, s in zip(multi, one):  # same global batch -> same loss and gradient norm (up to reduction order)
        assert m["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert m["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4)
        if mode == "ddp":
            assert m["replica_param_diff"] == 0.0  # replicas stay bit-identical
    a = load_file(str(latest_checkpoint(tmp_path / "multi") / "model.safetensors"))
    b = load_file(str(Path(single["checkpoint"]) / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_cli_train_subcommand(tmp_path, data_dir, capsys):
    from sparkformer import train as train_mod

    parser = argparse.ArgumentParser()
    train_mod.add_cli(parser.add_subparsers(dest="command"))
    cfg_path = _write_cfg(tmp_path / "c.yaml", micro_cfg(data_dir, tmp_path / "cli", max_steps=2))
    args = parser.parse_args(["train", "--config", str(cfg_path), "lr=0.001", "model.n_layers=1"])
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 2
    assert load_checkpoint(tmp_path / "cli")[1]["model"]["n_layers"] == 1


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_resolve(path):
    cfg = load_train_config(REPO / path)
    mc = resolve_model_config(cfg.model, vocab_size=8192, seq_len=cfg.seq_len)
    assert mc.vocab_size == 8192 and cfg.total_steps >= 1


def test_hf_wrapper_for_lm_eval(tmp_path, data_dir):
    pytest.importorskip("transformers")
    from sparkformer.evaluate import hf_model_and_tokenizer

    res = train(micro_cfg(data_dir, tmp_path / "hf", max_steps=1))
    hf, tok = hf_model_and_tokenizer(tmp_path / "hf")
    raw, _ = load_checkpoint(res["checkpoint"])
    x = tok("the king and the queen", return_tensors="pt")["input_ids"]
    assert tok.eos_token == "<|endoftext|>" and tok.decode(x[0]) == "the king and the queen"
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, raw(x).logits)
