"""The fused decode step (one C++ call per token, sparkformer.decode.fused) against the engine's per-op Python step,
which is its reference: same logits, same selections, same stats, on every layer kind and weight format it covers;
engines it does not cover fall back to the Python step."""

import pytest
import torch

from sparkformer.config import ModelConfig
from sparkformer.decode import make_engine
from sparkformer.decode.fused import FusedStep, fused_blockers
from sparkformer.model import SparkLM
from sparkformer.ops import _extension

pytestmark = pytest.mark.skipif(not _extension.available(), reason="C++ extension unavailable")


def _cfg(kind: str, **kw) -> ModelConfig:
    base = dict(vocab_size=96, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
                max_seq_len=96, sliding_window=16, spark_attn_topk=8, spark_ffn_fraction=0.1, spark_ffn_rank=32,
                spark_attn_hard_cap=True)
    base.update({"dense": dict(ffn="geglu", attention="dense"),  # Gemma 2: post norms, softcaps, local layers
                 "spark": dict(ffn="spark", attention="spark"),
                 "mixed": dict(ffn="spark", attention="dense"),
                 "llama": dict(ffn="geglu", attention="dense", ffn_activation="silu", post_norms=False,
                               attn_logit_softcap=None, final_logit_softcap=None, embed_scale=False,
                               sliding_window=None),
                 "gemma3": dict(ffn="geglu", attention="dense", qk_norm=True, local_global="periodic",
                                local_period=2, rope_local_theta=100.0, attn_logit_softcap=None,
                                final_logit_softcap=None)}[kind])
    base.update(kw)
    return ModelConfig(**base)


def _model(kind: str, seed: int = 0) -> SparkLM:
    torch.manual_seed(seed)
    m = SparkLM(_cfg(kind)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a norm applied in the wrong place shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)
    return m


def _run(engine, ids, fused: bool):
    engine.fused = fused
    engine.reset()
    engine._reset_stats()
    out = [engine.prefill(ids[:40])] + [engine.step(int(t)) for t in ids[40:70]]
    return torch.stack(out), engine.stats.summary()


@pytest.mark.parametrize("kind", ["dense", "spark", "mixed", "llama", "gemma3"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "q8_0", "q4_0"])
def test_fused_step_equals_python_step(kind, dtype):
    m = _model(kind)
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(1))
    e = make_engine(m, dtype=dtype)
    ref, ref_stats = _run(e, ids, fused=False)
    got, got_stats = _run(e, ids, fused=True)
    assert isinstance(e._fused_step, FusedStep)  # the fused path ran
    # the same kernels on the same inputs; only the norms' summation order (and the activation function's libm)
    # differ. Float weights: equal to rounding. Quantized: such a last-bit difference now and then flips an int8
    # activation rounding, or a neuron at its threshold, which moves these tiny random models' logits by up to ~1% of
    # their norm (a misplaced norm, RoPE or activation moves them by tens of percent)
    if dtype in ("fp32", "bf16"):
        torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)
        assert got_stats == ref_stats
    else:
        assert float((got - ref).norm() / ref.norm()) < 1.5e-2
        assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.9
        assert got_stats.keys() == ref_stats.keys()
        for k, v in ref_stats.items():
            assert got_stats[k] == pytest.approx(v, rel=2e-2), k


def test_fused_step_greedy_generation_matches():
    m = _model("spark")
    e = make_engine(m, dtype="bf16")
    prompt = [3, 14, 15, 92, 65]
    e.fused = False
    ref = list(e.generate(prompt, max_new_tokens=30))
    e.fused = True
    e.reset()
    assert list(e.generate(prompt, max_new_tokens=30)) == ref


def test_engines_the_plan_does_not_cover_fall_back():
    m = _model("llama")
    e = make_engine(m, impl="torch")
    assert fused_blockers(e) == ["impl='torch' asks for the Python kernels"]
    e.prefill([1, 2, 3])
    e.step(4)
    assert e._fused_step is False


def test_fused_step_refuses_bad_tokens_and_full_context():
    e = make_engine(_model("dense"), max_len=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        e.step(96)
    for t in range(4):
        e.step(t)
    with pytest.raises(ValueError, match="context full"):
        e.step(0)


def test_fused_false_keeps_the_python_step():
    from sparkformer.decode.cpu import CpuEngine
    from sparkformer.decode.layout import model_layout

    e = CpuEngine(model_layout(_model("dense"), torch.float32), fused=False)
    e.step(3)
    assert e.fused is False and e._fused_step is None
