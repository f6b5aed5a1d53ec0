"""Bad input gets one line naming what to change: typed key=value overrides, files named in parse errors, checked
command-line values, checks before slow work or output, and every command ending with one JSON line."""

import io
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from sparkformer.cli import main
from sparkformer.config import ModelConfig, apply_overrides, get_preset
from sparkformer.train_config import load_train_config

sys.path.insert(0, str(Path(__file__).parent))


def _run(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``sparkformer ARGV`` (argparse's own errors included)."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("usage:", " "))]
    assert len(lines) == 1 and lines[0].startswith(f"sparkformer {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- key=value overrides are typed -------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,field", [
    ("bf16=Flase", "bf16='Flase'"), ("compile=sure", "compile='sure'"), ("model.post_norms=maybe", "post_norms"),
    ("model.tie_embeddings=nope", "tie_embeddings"), ("model.spark_ffn_fraction=abc", "spark_ffn_fraction='abc'"),
    ("model.spark_ffn_fraction=nan", "spark_ffn_fraction=nan"), ("model.spark_ffn_fraction=inf", "spark_ffn_fraction"),
    ("lr=abc", "lr='abc'"), ("max_steps=1.5", "max_steps=1.5"), ("seq_len=true", "seq_len=")])
def test_overrides_are_parsed_as_their_fields_type(override, field):
    with pytest.raises(ValueError, match="expected (a boolean|a finite number|an integer)") as e:
        load_train_config(None, [override])
    assert field in str(e.value)


def test_typed_values_from_files_and_the_python_api(tmp_path):
    cfg = load_train_config(None, ["bf16=yes", "max_tokens=1e6", "model.sliding_window=none", "compile=false"])
    assert cfg.bf16 is True and cfg.compile is False and cfg.max_tokens == 1_000_000
    assert cfg.model["sliding_window"] is None
    f = tmp_path / "c.yaml"
    f.write_text("bf16: Flase\n")
    with pytest.raises(ValueError, match="bf16='Flase': expected a boolean"):
        load_train_config(f)
    with pytest.raises(ValueError, match="ModelConfig.post_norms='maybe': expected a boolean"):
        ModelConfig(post_norms="maybe")
    with pytest.raises(ValueError, match="spark_ffn_fraction=nan"):
        apply_overrides(get_preset("tiny"), ["spark_ffn_fraction=nan"])
    assert apply_overrides(get_preset("tiny"), ["tie_embeddings=off"]).tie_embeddings is False


# ---- a file that does not parse is named ------------------------------------------------------------------------------
def test_parse_errors_name_the_file(tmp_path):
    from sparkformer.data import TokenData
    from sparkformer.tokenizer import load_tokenizer

    bad = tmp_path / "config.json"
    bad.write_text('{"lr": 1,}')
    with pytest.raises(ValueError, match=f"{bad}: not valid JSON .*line 1 column 10"):
        load_train_config(bad)
    y = tmp_path / "c.yaml"
    y.write_text("lr: [1, 2\n")
    with pytest.raises(ValueError, match=f"{y}: not valid YAML"):
        load_train_config(y)
    b = tmp_path / "bin.json"
    b.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=f"{b}: not UTF-8 text \\(byte 0xff at offset 0\\)"):
        load_train_config(b)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{oops")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        TokenData(tmp_path / "data")
    (tmp_path / "tokenizer.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")


# ---- generate and eval: checked values, checks before output -----------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_loading import _checkpoint

    folder = tmp_path_factory.mktemp("gen") / "ck"
    _checkpoint(folder)
    return folder


@pytest.mark.parametrize("opts,msg", [
    (["--temperature", "-1"], "argument --temperature: -1 must be a finite number"),
    (["--temperature", "nan"], "argument --temperature: nan must be a finite number"),
    (["--top-p", "0"], "argument --top-p: 0 must be a finite number in (0, 1]"),
    (["--top-p", "5"], "argument --top-p: 5 must be a finite number in (0, 1]"),
    (["--max-new-tokens", "-5"], "argument --max-new-tokens: -5 must be >= 1"),
    (["--stop", ""], "stop='': a stop string must be non-empty"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--prompt", "To be, or not to be " * 40], "model's context is 128: shorten it"),
])
def test_generate_refuses_bad_values_before_any_output(ckpt, capsys, one_thread, opts, msg):
    argv = ["generate", "--model", str(ckpt), "--prompt", "To be", *opts]
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and out == ""  # not even the prompt is echoed
    assert msg in _one_error_line(err, "generate")


def test_generate_cuda_without_gpu_or_triton_says_what_is_missing(ckpt, capsys, monkeypatch, one_thread):
    import importlib.util

    if not torch.cuda.is_available():
        rc, out, err = _run(["generate", "--model", str(ckpt), "--device", "cuda"], capsys)
        assert rc == 2 and out == "" and "needs a CUDA GPU" in _one_error_line(err, "generate")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    rc, out, err = _run(["generate", "--model", str(ckpt), "--device", "cuda"], capsys)
    assert rc == 2 and out == "" and "pip install 'sparkformer[gpu]'" in _one_error_line(err, "generate")


def test_generate_says_why_it_stopped_and_streams_exactly_its_text(ckpt, capsys, one_thread):
    from sparkformer.generate import generate_text

    rc, out, err = _run(["generate", "--model", str(ckpt), "--prompt", "To be", "--max-new-tokens", "1000000",
                         "--temperature", "0"], capsys)
    res = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and res["stopped"] == "context_full" and res["prompt_tokens"] + res["new_tokens"] == 128
    assert "stopped after" in err and "context (128 tokens) is full" in err
    free = generate_text(str(ckpt), "To be", 40, temperature=0.0)["text"]
    stop = free[6:8]
    assert len(free) > 10 and stop
    buf = io.StringIO()
    res = generate_text(str(ckpt), "To be", 40, temperature=0.0, stop=[stop], stream=buf, echo_prompt=True)
    assert res["stopped"] == "stop" and res["text"] == free[: free.index(stop)]
    assert buf.getvalue() == "To be" + res["text"]  # what was streamed is what is reported


@pytest.mark.parametrize("opts,msg", [(["--seq-len", "0"], "argument --seq-len: 0 must be >= 1"),
                                      (["--max-tokens", "-5"], "argument --max-tokens: -5 must be >= 1"),
                                      (["--batch-size", "0"], "argument --batch-size: 0 must be >= 1")])
def test_eval_refuses_bad_values(ckpt, capsys, opts, msg):
    rc, out, err = _run(["eval", "--model", str(ckpt), *opts], capsys)
    assert rc == 2 and out == "" and msg in _one_error_line(err, "eval")


# ---- slow commands check the model first --------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["/no/such/model", "no-such-model-name"])
def test_bricks_commands_check_the_model_before_building_prompts(model, capsys, monkeypatch, tmp_path):
    from sparkformer.bricks import capabilities

    def never(*a, **kw):
        raise AssertionError("prompts were built before the model was checked")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(capabilities, "build_capability_set", never)
    for cmd in ("analyze", "partition", "sparkify", "route", "lora", "grow"):
        t = time.time()
        rc, out, err = _run(["bricks", cmd, "--model", model, "--out", str(tmp_path / cmd)], capsys)
        assert rc == 2 and time.time() - t < 5
        line = _one_error_line(err, f"bricks {cmd}")
        assert model in line and ("does not exist" in line or "not in the local Hugging Face cache" in line)


# ---- where results go, and the JSON line ------------------------------------------------------------------------------
def test_bench_writes_to_runs_bench_unless_told(tmp_path, monkeypatch):
    from argparse import Namespace

    from sparkformer.bench.common import finish
    from sparkformer.cli import build_parser

    args = build_parser().parse_args(["bench", "topk"])
    assert args.out is None
    monkeypatch.chdir(tmp_path)
    finish({"benchmark": "topk"}, lambda: None, "topk", Namespace(out=args.out, no_save=False))
    assert (tmp_path / "runs" / "bench" / "topk.json").is_file() and not (tmp_path / "benchmarks").exists()


def test_every_bricks_command_ends_with_one_json_line(capsys, tmp_path):
    import argparse
    from dataclasses import dataclass

    from sparkformer.bricks.experiment import ModelRun, add_command

    @dataclass(kw_only=True)
    class DummyRun(ModelRun):
        pass

    def run_dummy(run):
        """Python API of ``sparkformer bricks dummy``: nothing."""
        return tmp_path / "report.md"

    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers(), "dummy", DummyRun, run_dummy, help="x",
                summary=lambda path: (f"wrote {path}", None))
    args = parser.parse_args(["dummy", "--model", "m", "--out", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"wrote {tmp_path / 'report.md'}" and json.loads(out[-1]) == {"command": "bricks dummy"}
