"""One loading path behind every --model, and one engine protocol behind make_engine."""

import json

import pytest
import torch

from sparkformer.decode import CpuEngine, Engine, make_engine, make_random_engine
from sparkformer.loading import load_model

transformers = pytest.importorskip("transformers")


def _checkpoint(folder, ffn="geglu"):
    """A tiny training-style checkpoint folder (config.json {'model', 'train'} + weights + tokenizer.json)."""
    from safetensors.torch import save_file

    from sparkformer.config import ModelConfig
    from sparkformer.model import SparkLM
    from sparkformer.tokenizer import train_bpe

    tok = train_bpe(["To be, or not to be, that is the question. 12 + 30 = 42."] * 5, vocab_size=300)
    cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64,
                      max_seq_len=128, sliding_window=16, spark_attn_topk=8, ffn=ffn, attention="dense",
                      norm_style="llama", post_norms=False, embed_scale=False, ffn_activation="silu")
    torch.manual_seed(0)
    model = SparkLM(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {"seq_len": 32}}))
    tok.save(folder / "tokenizer.json")
    return model


def _sparsified(folder, base: str, model):
    from sparkformer.bricks.routing import LowRankPredictor, save_routers

    d, n = model.config.d_model, model.config.ffn_dim
    torch.manual_seed(1)
    routers = [LowRankPredictor(torch.randn(2 * n, 8), A=torch.randn(8, d), output="gate_up", act="silu",
                                fraction=0.3, method="stat") for _ in range(model.config.n_layers)]
    save_routers(folder / "predictor.safetensors", routers, {"model": base})
    return routers


def test_checkpoint_hf_folder_and_sparsified_folder_load_the_same_model(tmp_path):
    from sparkformer.hf import save_pretrained

    ref = _checkpoint(tmp_path / "ck")
    a = load_model(tmp_path / "ck")
    assert a.kind == "checkpoint" and a.tokenizer is not None and a.routers is None
    torch.testing.assert_close(a.model.embed.weight, ref.embed.weight)
    save_pretrained(ref, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text((tmp_path / "ck" / "tokenizer.json").read_text())
    b = load_model(tmp_path / "hf")
    assert b.kind == "sparkformer-hf" and b.tokenizer is not None
    torch.testing.assert_close(b.model.layers[1].ffn.down_proj.weight, ref.layers[1].ffn.down_proj.weight)
    routers = _sparsified(tmp_path / "sparse", str(tmp_path / "ck"), ref)
    c = load_model(tmp_path / "sparse")  # the folder names its base model
    assert c.kind == "checkpoint+routers" and len(c.routers) == 2
    torch.testing.assert_close(c.routers[0].A, routers[0].A)
    d = load_model(tmp_path / "ck", routers=tmp_path / "sparse" / "predictor.safetensors")
    assert d.kind == "checkpoint+routers"
    # the engine runs the routers it was given: fewer neurons than the dense engine, same as the training form
    ids = a.tokenizer.encode("To be, or not to be")
    dense, routed = make_engine(a.model, routers=None), make_engine(c.model, routers=c.routers)
    assert not torch.allclose(dense.prefill(ids), routed.prefill(ids), atol=1e-4)
    routed.step(ids[0])
    assert 0 < routed.stats.summary()["ffn_activity"] < 0.6


def test_hf_llama_folder_becomes_our_model(tmp_path):
    """A Hugging Face Llama folder loads as our SparkLM with the same logits (transformers converts, from_hf maps)."""
    from tiny_models import tiny_llama

    from sparkformer.model import SparkLM

    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = tiny_llama()
    hf.save_pretrained(tmp_path / "llama")
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(39)} | {"</s>": 39}, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(tmp_path / "llama")
    loaded = load_model(tmp_path / "llama")
    assert isinstance(loaded.model, SparkLM) and loaded.kind == "hf" and loaded.tokenizer.encode("w1 w2") == [1, 2]
    ids = torch.randint(0, 40, (1, 12))
    torch.testing.assert_close(loaded.model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_bad_model_and_router_paths_are_refused(tmp_path):
    ref = _checkpoint(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="router file"):
        load_model(tmp_path / "ck", routers=tmp_path / "ck")
    other = ref.config.replace(n_layers=3)
    from sparkformer.model import SparkLM

    _sparsified(tmp_path / "other", str(tmp_path / "ck"), SparkLM(other))
    with pytest.raises(ValueError, match="another model"):
        load_model(tmp_path / "ck", routers=tmp_path / "other")
    (tmp_path / "nobase").mkdir()
    _sparsified(tmp_path / "nobase", "", ref)
    with pytest.raises(ValueError, match="names no base model"):
        load_model(tmp_path / "nobase")


def test_generate_and_eval_take_any_model(tmp_path):
    from sparkformer.generate import generate_text

    _checkpoint(tmp_path / "ck")
    res = generate_text(str(tmp_path / "ck"), "To be", max_new_tokens=5, temperature=0.0)
    assert res["new_tokens"] == 5 and res["model"]["kind"] == "checkpoint"
    with pytest.raises(ValueError, match="top_p"):
        generate_text(str(tmp_path / "ck"), "To be", top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        generate_text(str(tmp_path / "ck"), "To be", temperature=-1)


def test_make_engine_passes_on_or_refuses_every_option():
    from tiny_models import tiny_spark

    m = tiny_spark("spark")
    e = make_engine(m, impl="torch")
    assert isinstance(e, CpuEngine) and isinstance(e, Engine) and e.impl == "torch"
    with pytest.raises(ValueError, match="do not apply to the cpu engine"):
        make_engine(m, graph=True)
    with pytest.raises(ValueError, match="no decode engine"):
        make_engine(m, device="meta")
    with pytest.raises(ValueError, match="unknown device"):
        make_engine(m, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            make_engine(m, device="cuda")
    with pytest.raises(ValueError, match="max_seq_len"):
        make_random_engine(m.config, max_len=m.config.max_seq_len + 1)


def test_every_engine_has_the_protocol():
    names = ["prefill", "step", "generate", "decode_greedy", "reset", "set_position", "fill_cache_random", "stats",
             "component_times", "synchronize", "bench_extras"]
    engines = [CpuEngine]
    try:
        from sparkformer.decode.cuda import CudaEngine

        engines.append(CudaEngine)
    except ImportError:  # triton absent: the CUDA engine cannot be imported here
        pass
    for cls in engines:
        assert issubclass(cls, Engine)
        assert not getattr(cls, "__abstractmethods__", None), cls
        for n in names:
            assert hasattr(cls, n), (cls, n)


def test_stats_are_the_same_form_and_reset():
    from tiny_models import tiny_spark

    m = tiny_spark("spark")
    e = make_engine(m)
    e.prefill([1, 2, 3, 4])
    e.decode_greedy(3)
    s = e.stats.summary()
    assert s["tokens"] == 3 and 0 < s["ffn_activity"] < 1 and s["ffn_neurons_per_layer"] > 0
    e.reset()
    assert e.pos == 0 and e.stats.summary() == {"tokens": 0}
    e.fill_cache_random(20)
    assert e.pos == 20
