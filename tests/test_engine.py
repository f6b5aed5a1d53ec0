import pytest
import torch

from sparkformer.config import ModelConfig
from sparkformer.decode import make_engine, make_random_engine, stop_on_strings
from sparkformer.model import SparkLM


def cfg_for(kind, **kw):
    base = dict(vocab_size=97, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
                max_seq_len=160, sliding_window=16, spark_attn_topk=8, spark_ffn_fraction=0.1,
                ffn="spark" if kind == "spark" else "geglu", attention="spark" if kind == "spark" else "dense",
                spark_attn_hard_cap=True)
    base.update(kw)
    return ModelConfig(**base)


IMPLS = ["torch", "reference", "ext"]


def _impl_or_skip(impl):
    if impl == "ext":
        from sparkformer.ops import _extension
        if not _extension.available():
            pytest.skip("C++ extension unavailable")


@pytest.mark.parametrize("kind", ["dense", "spark"])
@pytest.mark.parametrize("impl", IMPLS)
def test_engine_logits_match_reference_fp32(kind, impl):
    _impl_or_skip(impl)
    torch.manual_seed(0)
    m = SparkLM(cfg_for(kind)).eval()
    x = torch.randint(0, 97, (1, 70))
    ref = m(x).logits[0]
    e = make_engine(m, impl=impl)
    got = [e.prefill(x[0, :30])] + [e.step(int(t)) for t in x[0, 30:69]]
    torch.testing.assert_close(torch.stack(got), ref[29:69], rtol=1e-4, atol=1e-4)
    if kind == "spark":
        s = e.stats.summary()
        assert s["keys_per_query"] <= 8 and 0 < s["ffn_neurons_per_layer"] < 256 * 1.5


@pytest.mark.parametrize("kind", ["dense", "spark"])
def test_engine_bf16_close_to_reference(kind):
    torch.manual_seed(0)
    m = SparkLM(cfg_for(kind)).eval()
    x = torch.randint(0, 97, (1, 40))
    ref = m(x).logits[0, 19:39]
    e = make_engine(m, dtype="bf16")
    got = torch.stack([e.prefill(x[0, :20])] + [e.step(int(t)) for t in x[0, 20:39]])
    # bf16 weights and cache (fp32 accumulation): agreement of the distributions, stated tolerance 0.1 in logits
    assert (got - ref).abs().max() < 0.1


@pytest.mark.parametrize("kind", ["dense", "spark"])
def test_greedy_generation_identical_64_steps(kind):
    torch.manual_seed(1)
    m = SparkLM(cfg_for(kind, max_seq_len=128)).eval()
    prompt = torch.randint(0, 97, (1, 8))
    ref = m.generate(prompt, 64)[0, 8:].tolist()
    e = make_engine(m)
    assert list(e.generate(prompt[0], 64)) == ref


def test_key_cap_never_exceeded():
    torch.manual_seed(0)
    cfg = cfg_for("spark", sliding_window=None, max_seq_len=300)
    e = make_random_engine(cfg)
    e.prefill(torch.randint(0, 97, (10,)))
    for t in range(200):
        e.step(t % 97)
    assert e.stats.keys_kept <= e.stats.key_rows * cfg.spark_attn_topk


def test_clear_errors():
    m = SparkLM(cfg_for("spark", max_seq_len=32)).eval()
    e = make_engine(m)
    with pytest.raises(ValueError, match="exceed the cache"):
        e.prefill(torch.zeros(40, dtype=torch.long))
    e.prefill(torch.zeros(31, dtype=torch.long))
    e.step(1)
    with pytest.raises(ValueError, match="context full"):
        e.step(1)
    with pytest.raises(ValueError, match="unsupported engine dtype"):
        make_engine(m, dtype="fp16")
    with pytest.raises(TypeError, match="SparkLM"):
        make_engine(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_seq_len"):
        make_engine(m, max_len=64)


def test_stop_strings_and_eos():
    torch.manual_seed(0)
    m = SparkLM(cfg_for("dense")).eval()
    e = make_engine(m)
    toks = list(e.generate([1, 2, 3], 20))
    e.reset()
    first = toks[0]
    assert list(e.generate([1, 2, 3], 20, eos_token_id=first)) == [first]
    e.reset()
    stop = stop_on_strings(lambda ts: " ".join(map(str, ts)), [str(toks[2])])
    assert list(e.generate([1, 2, 3], 20, stop=stop))[-1] in toks[:3]


def test_engine_llama_style_spark_model():
    torch.manual_seed(0)
    cfg = cfg_for("spark", norm_style="llama", post_norms=False, embed_scale=False, ffn_activation="silu",
                  tie_embeddings=False, attn_logit_softcap=None, final_logit_softcap=None)
    m = SparkLM(cfg).eval()
    x = torch.randint(0, 97, (1, 40))
    ref = m(x).logits[0, 19:39]
    e = make_engine(m)
    got = torch.stack([e.prefill(x[0, :20])] + [e.step(int(t)) for t in x[0, 20:39]])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def _llama_dense_cfg():
    return cfg_for("dense", norm_style="llama", post_norms=False, embed_scale=False, ffn_activation="silu",
                   tie_embeddings=True, attn_logit_softcap=None, final_logit_softcap=None)


def test_engine_routed_ffn_matches_routed_model():
    """A dense gated model with sparkified predictors: the engine's gathered FFN equals bricks.route's masking."""
    from sparkformer.bricks.routing import LowRankPredictor, route

    torch.manual_seed(0)
    cfg = _llama_dense_cfg()
    m = SparkLM(cfg).eval()
    d, n = cfg.d_model, cfg.ffn_dim
    routers = [LowRankPredictor(torch.randn(2 * n, 16), A=torch.randn(16, d), output="gate_up", act="silu",
                                fraction=0.3, method="stat") if i != 1 else None for i in range(cfg.n_layers)]
    x = torch.randint(0, 97, (1, 40))
    with route(m, routers) as stats:
        ref = m(x).logits[0, 19:39]
    e = make_engine(m, routers=routers)
    got = torch.stack([e.prefill(x[0, :20])] + [e.step(int(t)) for t in x[0, 20:39]])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    activity = e.stats.summary()["ffn_activity"]
    assert 0.15 < activity < 0.45, activity  # the routers really drop neurons (~30% kept)
    assert stats.kept[0] < stats.total[0]
    # and routing changes the output: the dense engine differs
    dense = make_engine(m)
    assert not torch.allclose(dense.prefill(x[0, :20]), got[0], atol=1e-3)


def test_engine_rejects_bad_routers():
    from sparkformer.bricks.routing import LowRankPredictor

    cfg = _llama_dense_cfg()
    m = SparkLM(cfg).eval()
    r = LowRankPredictor(torch.randn(2 * 10, 4), A=torch.randn(4, cfg.d_model), output="gate_up")
    with pytest.raises(ValueError, match="one per layer"):
        make_engine(m, routers=[None])
    with pytest.raises(ValueError, match="neurons"):
        make_engine(m, routers=[r, None, None])


@pytest.mark.parametrize("kind", ["dense", "spark"])
def test_decode_rope_equals_training_rope(kind):
    from sparkformer.model import apply_rope, rope_tables

    cfg = cfg_for(kind)
    e = make_engine(SparkLM(cfg).eval())
    hd, r = cfg.head_dim, cfg.spark_attn_rank
    x = torch.randn(cfg.n_heads + cfg.n_kv_heads, hd)
    for pos in (0, 7, 33):
        got = e._rope_qk(x, pos, r if kind == "spark" else None)
        parts = [(0, hd)] if kind == "dense" else [(0, r), (r, hd)]
        want = []
        for a, b in parts:
            cos, sin = rope_tables(b - a, pos, 1, cfg.rope_theta)
            want.append(apply_rope(x[:, a:b], cos[0], sin[0]))
        torch.testing.assert_close(got, torch.cat(want, -1), rtol=1e-6, atol=1e-6)
