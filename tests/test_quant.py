"""Block-quantized weights: formats, round trips, and every C++ kernel against its pure-torch reference on every ISA."""

import pytest
import torch

from sparkformer.ops import _extension
from sparkformer.ops.quant import (BITS, BLOCK, CODES, dequantize, quant_ffn_gather, quant_ffn_gather_reference,
                                   quant_matvec, quant_matvec_reference, quantize, quantize_act, quantize_spark_ffn,
                                   row_bytes)

FMTS = list(CODES)  # every format code the C++ kernels take (q4_1's layout and quantizer: test_quant_format.py)
SYMMETRIC = ["q8_0", "q4_0"]


def _quant_isas() -> list[str]:
    """conftest's ISAs plus the VNNI build of the quantized kernels where the CPU has it."""
    from conftest import _extension_isas

    have = _extension_isas()
    if have:
        try:
            _extension.set_isa("avx512vnni")
            have = ["avx512vnni"] + have
        except RuntimeError:
            pass
        _extension.set_isa("auto")
    return have or ["none"]


@pytest.fixture(params=_quant_isas())
def isa(request):
    """Every kernel ISA of this CPU, AVX-512 VNNI included (overrides conftest's fixture in this module)."""
    from conftest import use_isa

    yield from use_isa(request.param)


@pytest.mark.parametrize("fmt", SYMMETRIC)
def test_quantize_round_trip_and_bytes(fmt):
    torch.manual_seed(0)
    w = torch.randn(37, 96)
    w[3, :32] = 0.0  # an all-zero block: scale 0, values 0
    q = quantize(w, fmt)
    assert q.data.dtype == torch.uint8 and q.data.shape == (37, row_bytes(fmt, 96)) and q.shape == (37, 96)
    assert q.nbytes == 37 * 3 * (34 if fmt == "q8_0" else 18)  # 8.5 / 4.5 bits per weight
    back = dequantize(q)
    assert torch.equal(back[3, :32], torch.zeros(32))
    # error bound per block: half a step of the block's scale (d = amax / 127); q4_0 maps the largest magnitude to
    # -8, so a value of the other sign near it is clamped to +7: up to a whole step (d = amax / 8)
    step = w.reshape(37, 3, BLOCK).abs().amax(-1, keepdim=True) / (127 if fmt == "q8_0" else 8)
    err = (back - w).reshape(37, 3, BLOCK).abs()
    bound = (0.5 if fmt == "q8_0" else 1.0) * step * (1 + 2 ** -9) + 1e-7  # fp16 scales: the step moves slightly
    assert bool((err <= bound).all())
    # quantizing the dequantized weights again gives the same bytes
    assert torch.equal(quantize(back, fmt).data, q.data)


def test_bad_formats_and_shapes_are_refused():
    with pytest.raises(ValueError, match="unknown quantized format"):
        quantize(torch.randn(4, 64), "q3_k")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.randn(4, 48), "q8_0")


def test_activation_quantization_matches_the_kernels(isa):
    torch.manual_seed(1)
    x = torch.randn(256) * 3
    x[:32] = 0.0
    q, d = quantize_act(x)
    if _extension.available():
        qc, dc = torch.ops.sparkformer._quantize_act(x)
        assert torch.equal(qc, q) and torch.equal(dc, d)
    assert torch.allclose(q.float().reshape(-1, BLOCK) * d[:, None], x.reshape(-1, BLOCK), atol=float(d.max()) / 2)


def _threads(k: int):
    """Run a block with k intra-op threads (the ops split rows / neurons over them), restoring the setting."""
    class _T:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(k)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)
    return _T()


@pytest.mark.parametrize("fmt", FMTS)
# one block; 3, 5, 18 blocks (AVX-512's last group of 3, 1, 2 blocks; q4_1's minima: 16 blocks a step and 2 more);
# real widths; 129 blocks (AVX-512's long rows: four far-apart rows per pass, a last group of 1 block)
@pytest.mark.parametrize("n", [32, 96, 160, 576, 2304, 4128])
def test_quant_matvec_kernel_equals_reference(isa, fmt, n):
    if isa == "none":
        pytest.skip("C++ extension unavailable")
    torch.manual_seed(2)
    w, x = torch.randn(203, n), torch.randn(n)  # 203 rows: groups of 4 rows and a remainder of 3
    w[5, :32] = -w[5, :32].abs() * 1e3  # extreme weights: -127 (q8_0), 0 (q4_0) and 0 (q4_1) quants at full activation
    x[:32] = w[5, :32].sign() * -1e3
    if fmt == "q4_1":
        w[7, 32:64] = w[7, 32:64].abs() + 50.0  # a block far from 0: its minimum term dominates
        w[9] = 3.0  # constant rows: d = 0, every weight is m
    q = quantize(w, fmt)
    ref = quant_matvec_reference(q, x)
    got = quant_matvec(q, x, impl="ext")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))
    for rows in (1, 2, 5):  # fewer rows than a group, several threads' worth below
        torch.testing.assert_close(quant_matvec(q.index_select(torch.arange(rows)), x, impl="ext"), ref[:rows],
                                   rtol=1e-5, atol=1e-4 * float(ref.abs().max()))
    # large enough to split over threads, odd row count (long rows: the 203 rows already are, in ranges of 4-row
    # quads and a remainder)
    big = quantize(torch.randn(4099, n), fmt, method="maxabs") if n < 4096 else q
    ref = quant_matvec_reference(big, x)
    for k in (1, 2, 3):  # one range, even and uneven splits (ranges of whole 4-row groups, a short last one)
        with _threads(k):
            torch.testing.assert_close(quant_matvec(big, x, impl="ext"), ref, rtol=1e-5,
                                       atol=1e-4 * float(ref.abs().max()), msg=f"{isa} {fmt} n={n} threads={k}")
    # and the integer scheme is close to the exact product with the dequantized weights
    exact = dequantize(q) @ x
    assert float((got - exact).norm() / exact.norm()) < 0.02


@pytest.mark.parametrize("fmt", FMTS)
# K2 / V widths: small, a last group of 1-3 blocks, SmolLM2 (576 = 960 - 384), Gemma-2's d_model
@pytest.mark.parametrize("n2,nv", [(96, 128), (32, 160), (576, 960), (160, 2304)])
def test_quant_ffn_gather_kernel_equals_reference(isa, fmt, n2, nv):
    """Each selected neuron: the matvec kernel's dot product (K2 row) and the dequantizing row accumulation (V row)."""
    if isa == "none":
        pytest.skip("C++ extension unavailable")
    torch.manual_seed(3)
    n = 300
    v = torch.randn(n, nv)
    v[:, :32] += 5.0  # blocks away from zero: q4_1's minima carry them
    ffn = quantize_spark_ffn(torch.randn(n, 64), torch.randn(n, n2), v, fmt)
    x2 = torch.randn(n2)
    for cnt in (0, 1, 5, 40, 299):  # none, one, fewer than a group, several threads' worth
        idx = torch.randperm(n)[:cnt].to(torch.int32)
        a = torch.rand(cnt)
        ref = quant_ffn_gather_reference(ffn, idx, a, x2)
        for k in (1, 3):
            with _threads(k):
                got = quant_ffn_gather(ffn, idx, a, x2, impl="ext")
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4 * max(1.0, float(ref.abs().max())),
                                       msg=f"{isa} {fmt} n2={n2} nv={nv} cnt={cnt} threads={k}")
    with pytest.raises(RuntimeError, match="out of range"):
        quant_ffn_gather(ffn, torch.tensor([n], dtype=torch.int32), torch.ones(1), x2, impl="ext")


@pytest.mark.parametrize("fmt", FMTS)
def test_torch_paths_equal_dequantized_math(fmt):
    torch.manual_seed(4)
    w, x = torch.randn(50, 64), torch.randn(64)
    q = quantize(w, fmt)
    torch.testing.assert_close(quant_matvec(q, x, impl="torch"), dequantize(q) @ x)


@pytest.mark.parametrize("fmt", FMTS)
def test_quantized_engine_equals_the_quantized_model_up_to_activation_rounding(fmt):
    """The engine's q8_0 / q4_0 / q4_1 logits against the training-form forward of the same quantized weights
    (``quantized_model``): they differ only by the per-token int8 activation rounding of the dot products."""
    from sparkformer.config import ModelConfig
    from sparkformer.decode import make_engine
    from sparkformer.decode.layout import quantized_model
    from sparkformer.model import SparkLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
                      max_seq_len=96, sliding_window=16, ffn="geglu", attention="dense")
    m = SparkLM(cfg).eval()
    ids = torch.randint(0, 96, (1, 40))
    ref = quantized_model(m, fmt)(ids).logits[0, 19:39].detach()
    e = make_engine(m, dtype=fmt)
    got = torch.stack([e.prefill(ids[0, :20])] + [e.step(int(t)) for t in ids[0, 20:39]])
    assert float((got - ref).norm() / ref.norm()) < 0.05  # bf16 activations + int8 activation rounding
    plain = SparkLM(cfg).eval()  # and not just any model: a different one is far off
    assert float((plain(ids).logits[0, 19:39].detach() - ref).norm() / ref.norm()) > 0.2
    # resident weights: the format's bytes (+ norms), no hidden float copy
    float_bytes = make_engine(m, dtype="bf16").weight_bytes
    ratio = e.weight_bytes / float_bytes
    assert ratio < BITS[fmt] / 16 * 1.1, ratio


def test_the_ops_refuse_unknown_format_codes():
    if not _extension.available():
        pytest.skip("C++ extension unavailable")
    with pytest.raises(RuntimeError, match=r"unknown quantized format 3 \(0 = q8_0, 1 = q4_0, 2 = q4_1\)"):
        torch.ops.sparkformer.quant_matvec(torch.zeros(2, 20, dtype=torch.uint8), 3, 32, torch.randn(32))
    q = quantize(torch.randn(4, 64), "q4_1")
    with pytest.raises(RuntimeError, match="the format needs 40"):  # q4_1 rows: 20 bytes a block
        torch.ops.sparkformer.quant_matvec(q.data[:, :36], CODES["q4_1"], 64, torch.randn(64))


@pytest.mark.parametrize("kind", ["llama", "spark"])
def test_fused_step_runs_q4_1(kind):
    """The fused decode step over q4_1 weights (its embedding rows dequantized by step_ops.cpp's table_row, every
    matrix by the kernels) against the engine's Python step: test_fused_step.py's check for q8_0 / q4_0."""
    if not _extension.available():
        pytest.skip("C++ extension unavailable")
    from test_fused_step import _model, _run

    from sparkformer.decode import make_engine
    from sparkformer.decode.fused import FusedStep

    e = make_engine(_model(kind), dtype="q4_1")
    assert e.embed.fmt == "q4_1"
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(1))
    ref, _ = _run(e, ids, fused=False)
    got, _ = _run(e, ids, fused=True)
    assert isinstance(e._fused_step, FusedStep)  # the fused path ran
    assert float((got - ref).norm() / ref.norm()) < 1.5e-2
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.9


def test_quantized_spark_engine_runs_sparse():
    from sparkformer.config import ModelConfig
    from sparkformer.decode import make_engine
    from sparkformer.decode.layout import quantized_model
    from sparkformer.model import SparkLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
                      max_seq_len=96, sliding_window=16, spark_attn_topk=8, spark_ffn_fraction=0.1, ffn="spark",
                      attention="spark", spark_attn_hard_cap=True, spark_ffn_rank=32)
    m = SparkLM(cfg).eval()
    ids = torch.randint(0, 96, (1, 30))
    ref = quantized_model(m, "q8_0")(ids).logits[0, -1].detach()
    e = make_engine(m, dtype="q8_0")
    e.prefill(ids[0, :20])
    for t in ids[0, 20:29]:
        e.step(int(t))
    got = e.step(int(ids[0, 29]))
    # discrete selections (neurons, keys) near the thresholds flip under bf16 / int8 activation rounding, as they do
    # between the bf16 engine and the fp32 model: close, not equal
    assert float((got - ref).norm() / ref.norm()) < 0.2
    s = e.stats.summary()
    assert 0.05 < s["ffn_activity"] < 0.2 and s["keys_per_query"] <= 8


def test_quantized_engine_refusals():
    from tiny_models import tiny_spark

    from sparkformer.decode import make_engine

    m = tiny_spark("geglu")
    with pytest.raises(ValueError, match="unsupported engine dtype"):
        make_engine(m, dtype="q3_k")
    # routed layers run quantized (tests/test_quant_sparse.py); all-None routers are the dense model
    assert make_engine(m, dtype="q8_0", routers=[None] * m.config.n_layers).weight_format == "q8_0"
