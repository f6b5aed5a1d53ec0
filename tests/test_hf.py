import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparkformer.config import ModelConfig  # noqa: E402
from sparkformer.hf import SparkConfig, SparkForCausalLM, from_gemma2, to_gemma2, to_hf  # noqa: E402
from sparkformer.model import SparkLM  # noqa: E402


def tiny(kind="spark", **kw):
    base = dict(vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                max_seq_len=64, sliding_window=8, spark_attn_topk=6, spark_ffn_fraction=0.25,
                ffn="spark" if kind == "spark" else "geglu", attention="spark" if kind == "spark" else "dense")
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kind", ["dense", "spark"])
def test_save_load_roundtrip_exact(tmp_path, kind):
    model = to_hf(SparkLM(tiny(kind))).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SparkForCausalLM)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    x = torch.randint(0, 101, (2, 12))
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert transformers.AutoConfig.from_pretrained(tmp_path).to_model_config() == model.config.to_model_config()


def test_hf_generate_matches_ours():
    core = SparkLM(tiny("spark")).eval()
    hf = to_hf(core).eval()
    x = torch.randint(0, 101, (1, 6))
    ours = core.generate(x, 10)
    theirs = hf.generate(x, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs)
    sampled = hf.generate(x, max_new_tokens=5, do_sample=True, top_p=0.9, temperature=0.7)
    assert sampled.shape == (1, 11)


def test_labels_loss_matches_targets_loss():
    core = SparkLM(tiny("dense")).eval()
    x = torch.randint(0, 101, (2, 12))
    hf_loss = to_hf(core)(x, labels=x).loss
    ours = core(x[:, :-1], targets=x[:, 1:]).loss
    torch.testing.assert_close(hf_loss, ours)


def test_dense_model_equals_hf_gemma2():
    torch.manual_seed(0)
    core = SparkLM(tiny("dense", sliding_window=5, n_layers=3, attn_logit_softcap=20.0, final_logit_softcap=15.0))
    with torch.no_grad():  # non-trivial norm weights so the (1 + w) convention is tested
        for n, p in core.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.3)
    core.eval()
    g2 = to_gemma2(core)
    x = torch.randint(0, 101, (2, 20))
    torch.testing.assert_close(core(x).logits, g2(x).logits, rtol=1e-5, atol=1e-5)
    back = from_gemma2(g2).eval()
    torch.testing.assert_close(back(x).logits, core(x).logits, rtol=0, atol=0)


def test_config_validation_through_hf():
    with pytest.raises(ValueError, match="spark_ffn_fraction"):
        SparkConfig(**{**tiny().to_dict(), "spark_ffn_fraction": 2.0})
    with pytest.raises(ValueError, match="padded"):
        to_hf(SparkLM(tiny()))(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]]))


@pytest.mark.parametrize("tied", [True, False])
def test_llama_family_matches_hf(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparkformer.decode import make_engine
    from sparkformer.hf import from_hf

    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, rope_theta=100000.0,
                     tie_word_embeddings=tied)
    hf = LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.2)
    ours = from_hf(hf)
    x = torch.randint(0, 101, (2, 20))
    torch.testing.assert_close(ours(x).logits, hf(x).logits, rtol=1e-5, atol=1e-5)
    e = make_engine(ours)  # the engine runs Llama-style models too (SiLU, no post-norms)
    got = torch.stack([e.prefill(x[0, :10])] + [e.step(int(t)) for t in x[0, 10:19]])
    torch.testing.assert_close(got, hf(x[:1]).logits[0, 9:19], rtol=1e-4, atol=1e-4)
