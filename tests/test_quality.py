"""benchmarks/quality.py (issue #3): the --quick study on a tiny prepared corpus, result keys, resume."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sparkformer import corpora
from sparkformer.data import prepare

sys.path.insert(0, str(Path(__file__).parent))
from test_data import make_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("dense", "spark_ffn", "spark", "topk_no_predictor")
REQUIRED = ("params", "tokens", "final_val_loss", "ffn_activity", "keys_per_query", "step_time_s")


def _load_quality():
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quality():
    return _load_quality()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality_data")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARKFORMER_CACHE", str(root / "cache"))
    corpora._MEMO.clear()
    try:
        yield prepare(make_corpus(root / "corpus", n_docs=16), out=root / "data", vocab_size=300, val_fraction=0.2,
                      quiet=True)
    finally:
        mp.undo()


def _argv(data_dir, tmp_path, *extra):
    # --quick, made smaller: batch 4 x 64 (k=16: three quarters of the query rows have more than k valid keys).
    # One thread: on a busy 2-core machine two threads per process oversubscribe the cores (steps 10x slower).
    return ["--quick", "--quiet", "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "quality.json"), "--plot", str(tmp_path / "loss.png"),
            "--batch-size", "4", "--seq-len", "64", "--spark-attn-topk", "16", "--threads", "1", *extra]


def test_quick_study_writes_all_keys(quality, data_dir, tmp_path, capsys):
    assert quality.main(_argv(data_dir, tmp_path, "--budget-tokens", str(16 * 4 * 64), "--time-repeats", "1")) == 0
    res = json.loads((tmp_path / "quality.json").read_text())
    assert set(res["variants"]) == set(VARIANTS)
    for name in VARIANTS:
        v = res["variants"][name]
        for key in REQUIRED:
            assert isinstance(v[key], (int, float)) and v[key] > 0, (name, key)
        assert v["tokens"] == res["settings"]["budget_tokens"] == 16 * 4 * 64
    for key in ("cpu", "threads", "torch", "python"):
        assert key in res["env"]
    # same parameter count, same data (same seed, same number of tokens)
    assert len({v["params"] for v in res["variants"].values()}) == 1
    # achieved sparsity is measured, not assumed
    v = res["variants"]
    assert v["dense"]["ffn_activity"] > 0.9 and v["spark_ffn"]["ffn_activity"] < 0.3
    assert v["topk_no_predictor"]["ffn_activity"] < 0.3
    assert v["spark"]["keys_per_query"] < v["dense"]["keys_per_query"]  # attention top-k dropped keys
    assert v["spark"]["eval"]["keys_dropped_fraction"] > 0.1
    assert v["dense"]["eval"]["keys_dropped_fraction"] == 0.0
    assert v["spark"]["eval_hard_cap"]["rows_at_most_k"] >= 0.999
    # the eval pass reproduces the trainer's final val loss on the same windows
    for name in VARIANTS:
        assert v[name]["eval"]["val_loss_mean"] == pytest.approx(v[name]["final_val_loss"], rel=1e-4)
    assert "spark_exact_topk" in res["timing"] and set(res["targets"]) >= {
        "spark_val_loss_within_2pct_of_dense", "spark_step_at_most_1.3x_dense", "statistical_step_faster_than_exact",
        "spark_keys_at_most_k_on_99pct_rows"}
    assert (tmp_path / "loss.png").stat().st_size > 1000
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["benchmark"] == "quality" and set(last["variants"]) == set(VARIANTS)

    # --timing-only re-times the steps here and keeps the training machine's timing and the quality results
    res["timing"]["dense"]["median"] = -1.0  # a marker the re-timing must replace
    (tmp_path / "quality.json").write_text(json.dumps(res))
    assert quality.main(["--timing-only", "--data-dir", str(data_dir), "--results", str(tmp_path / "quality.json"),
                         "--time-repeats", "1"]) == 0
    new = json.loads((tmp_path / "quality.json").read_text())
    assert new["timing_training_machine"]["timing"]["dense"]["median"] == -1.0
    assert new["timing"]["dense"]["median"] > 0
    assert new["variants"]["dense"]["step_time_s"] == new["timing"]["dense"]["median"]
    assert new["variants"]["spark"]["final_val_loss"] == res["variants"]["spark"]["final_val_loss"]
    with pytest.raises(SystemExit, match="does not exist"):
        quality.main(["--timing-only", "--results", str(tmp_path / "missing.json")])


def test_interrupted_study_resumes_and_refuses_other_settings(quality, data_dir, tmp_path):
    short = ("--budget-tokens", str(8 * 4 * 64), "--eval-interval", "4", "--time-repeats", "1")
    assert quality.main(_argv(data_dir, tmp_path, *short, "--stop-after", "3")) == 3
    runs = tmp_path / "runs"
    assert (runs / "dense" / "checkpoints" / "latest").exists() and not (runs / "spark").exists()
    assert quality.main(_argv(data_dir, tmp_path, *short)) == 0
    steps = [json.loads(ln)["step"] for ln in (runs / "dense" / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == list(range(1, 9))
    res = json.loads((tmp_path / "quality.json").read_text())
    assert res["variants"]["dense"]["run"] == "resumed" and res["variants"]["spark"]["run"] == "trained"
    with pytest.raises(SystemExit, match="other settings"):
        quality.main(_argv(data_dir, tmp_path, *short, "--lr", "1e-3"))
