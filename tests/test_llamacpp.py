"""The llama.cpp anchor without llama.cpp: the GGUF writer (read back with gguf.GGUFReader), the llama-bench JSON
parser on a canned output, the runner against a stand-in binary, and the refusal when no binary was built."""

import json
import os
import stat

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from sparkformer.bench import llamacpp  # noqa: E402
from sparkformer.bench.gguf_export import (  # noqa: E402
    check_gemma2, gguf_tensors, random_gguf, random_gguf_path, vocab, write_gguf)
from sparkformer.config import ModelConfig  # noqa: E402
from sparkformer.decode import random_layout  # noqa: E402

CFG = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, ffn_dim=96,
                  max_seq_len=128, sliding_window=16, init_std=0.5)
QTYPE = {"bf16": "BF16", "f32": "F32", "q8_0": "Q8_0", "q4_0": "Q4_0"}
# Largest error per element, as a fraction of the block's max|w|: Q8_0 half a step of max|w| / 127 plus the fp16
# rounding of the scale times the largest code (127 * 2**-11 of a step); Q4_0 one step of max|w| / 8 (its codes
# reach -8 steps on the side of the largest value, 7 on the other: a value there is clamped by up to a step).
TOL = {"q8_0": 0.6 / 127, "q4_0": 1.01 / 8}

# What `llama-bench -m tiny-q8_0.gguf -p 0 -n 4 -d 64 -t 2 -r 3 -o json` printed (llama.cpp 0c1e570, a 2-layer
# gemma2 written by write_gguf; the path shortened).
CANNED = """[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "tiny-q8_0.gguf",
    "model_type": "gemma2 ?B Q8_0",
    "model_size": 87984,
    "model_n_params": 81216,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 4,
    "n_depth": 64,
    "test_time": "2026-12-06T07:22:22Z",
    "avg_ns": 308701,
    "stddev_ns": 67092,
    "avg_ts": 13330.772372,
    "stddev_ts": 2576.528935,
    "samples_ns": [ 386123, 272344, 267637 ],
    "samples_ts": [ 10359.4, 14687.3, 14945.6 ]
  }
]
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKFORMER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return len(f.data)
    return f.parts[f.data[0]][0].item()


@pytest.mark.parametrize("fmt", ["bf16", "f32", "q8_0", "q4_0"])
def test_gguf_round_trip(tmp_path, fmt):
    layout = random_layout(CFG, torch.bfloat16, seed=1)
    path = write_gguf(layout, tmp_path / f"m-{fmt}.gguf", fmt)
    reader = gguf.GGUFReader(path)
    ours = dict(gguf_tensors(layout))
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(CFG.n_layers)
        for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "post_attention_norm", "ffn_norm",
                  "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm")}
    assert {t.name for t in reader.tensors} == expected == set(ours)
    for t in reader.tensors:
        src = ours[t.name].float().numpy()
        want = "F32" if src.ndim == 1 else QTYPE[fmt]  # norms stay F32
        assert t.tensor_type.name == want, t.name
        assert tuple(int(x) for x in t.shape) == src.shape[::-1], t.name  # GGUF ne order: row length first
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src.shape)
        if want in ("F32", "BF16"):
            np.testing.assert_array_equal(got, src, err_msg=t.name)  # bf16 layout: exact in either
        else:
            blocks = np.abs(src.reshape(-1, 32)).max(1, keepdims=True)
            err = np.abs(got - src).reshape(-1, 32)
            assert (err <= TOL[fmt] * blocks).all(), t.name
    # the layout orientation llama.cpp expects: ffn_down is (d, m), q/k/v split from the fused projection
    q = CFG.n_heads * CFG.head_dim
    assert ours["blk.0.ffn_down.weight"].shape == (CFG.d_model, CFG.ffn_dim)
    assert torch.equal(ours["blk.1.attn_k.weight"], layout.layers[1].w_qkv[q: q + CFG.n_kv_heads * CFG.head_dim])
    assert _field(reader, "general.architecture") == "gemma2"
    assert _field(reader, "gemma2.block_count") == CFG.n_layers
    assert _field(reader, "gemma2.embedding_length") == CFG.d_model
    assert _field(reader, "gemma2.feed_forward_length") == CFG.ffn_dim
    assert _field(reader, "gemma2.attention.head_count_kv") == CFG.n_kv_heads
    assert _field(reader, "gemma2.attention.key_length") == CFG.head_dim
    assert _field(reader, "gemma2.attention.sliding_window") == CFG.sliding_window
    assert _field(reader, "gemma2.attn_logit_softcapping") == pytest.approx(CFG.attn_logit_softcap)
    assert _field(reader, "gemma2.final_logit_softcapping") == pytest.approx(CFG.final_logit_softcap)
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.tokens") == CFG.vocab_size


def test_vocab_is_valid_spm():
    pieces, scores, types = vocab(300)
    assert len(pieces) == len(scores) == len(types) == 300 and len(set(pieces)) == 300
    assert pieces[:4] == ["<pad>", "<eos>", "<bos>", "<unk>"] and pieces[4 + 10] == "<0x0A>"
    assert vocab(6)[0] == ["<pad>", "<eos>", "<bos>", "<unk>", "<0x00>", "<0x01>"]


def test_refuses_what_llamacpp_gemma2_cannot_compute(tmp_path):
    with pytest.raises(ValueError, match="dense model"):
        check_gemma2(CFG.replace(ffn="spark"))
    with pytest.raises(ValueError, match="query_pre_attn_scalar"):
        check_gemma2(CFG.replace(query_pre_attn_scalar=64))
    with pytest.raises(ValueError, match="not splitting|blocks of 32"):
        write_gguf(random_layout(CFG.replace(d_model=48), torch.bfloat16), tmp_path / "x.gguf", "q8_0")


def test_random_gguf_cached_by_shape_seed_format(cache):
    p = random_gguf(CFG.replace(ffn="spark", attention="spark"), "q4_0", seed=3)  # the dense model of the pair
    assert p == random_gguf_path(CFG, "q4_0", 3) and p.is_file() and str(p).startswith(str(cache))
    mtime = p.stat().st_mtime_ns
    assert random_gguf(CFG, "q4_0", seed=3) == p and p.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert random_gguf_path(CFG, "q4_0", 4) != p and random_gguf_path(CFG.replace(n_layers=1), "q4_0", 3) != p


def test_parse_llama_bench_json_and_jsonl():
    (t,) = llamacpp.parse_llama_bench("some log line\n" + CANNED)
    ms = [386123 / 4e6, 272344 / 4e6, 267637 / 4e6]  # samples_ns over n_gen = 4 tokens
    assert t["ms_per_token"] == pytest.approx(ms[1])
    assert t["ms"] == pytest.approx({"median": ms[1], "min": ms[2], "max": ms[0]})
    assert t["tokens_per_s"] == pytest.approx(4e9 / 272344)
    assert (t["n_depth"], t["n_gen"], t["n_threads"], t["build_commit"]) == (64, 4, 2, "0c1e570")
    assert (t["model_type"], t["type_k"], t["repack"]) == ("gemma2 ?B Q8_0", "f16", True)
    line = json.dumps(json.loads(CANNED)[0])
    assert llamacpp.parse_llama_bench(line + "\n" + line)[1]["ms_per_token"] == pytest.approx(ms[1])  # jsonl
    with pytest.raises(ValueError, match="no JSON"):
        llamacpp.parse_llama_bench("error: failed to load model")


def _fake_llama_bench(folder):
    """A stand-in llama-bench: records its arguments, prints the canned JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "llama-bench"
    (folder / "canned.json").write_text(CANNED)
    exe.write_text(f"#!/bin/sh\necho \"$@\" > {folder}/args\ncat {folder}/canned.json\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_run_llama_bench_passes_depth_threads_tokens(tmp_path):
    exe = _fake_llama_bench(tmp_path / "bin")
    res = llamacpp.run_llama_bench(tmp_path / "m.gguf", depth=64, threads=2, tokens=4, repetitions=3, binary=exe)
    args = (tmp_path / "bin" / "args").read_text().split()
    assert args == ["-m", str(tmp_path / "m.gguf"), "-p", "0", "-n", "4", "-d", "64", "-t", "2", "-r", "3",
                    "-fa", "0,1", "-o", "json"]
    assert res["ms_per_token"] == pytest.approx(272344 / 4e6) and res["model_file"] == "m.gguf"
    assert llamacpp.resolve_binary(tmp_path / "bin") == exe  # a folder holding it


def test_fastest_configuration_is_the_figure(tmp_path):
    slow, fast = json.loads(CANNED)[0], json.loads(CANNED)[0]
    slow["flash_attn"], fast["flash_attn"] = 1, 0
    slow["samples_ns"] = [4 * 9_000_000] * 3
    exe = _fake_llama_bench(tmp_path / "bin")
    (tmp_path / "bin" / "canned.json").write_text(json.dumps([slow, fast]))
    res = llamacpp.run_llama_bench(tmp_path / "m.gguf", 64, 2, 4, 3, binary=exe)
    assert res["flash_attn"] == 0 and res["ms_per_token"] == pytest.approx(272344 / 4e6)
    assert [c["flash_attn"] for c in res["configs"]] == [1, 0] and res["configs"][0]["ms_per_token"] == 9.0


def test_random_model_row_end_to_end_with_stand_in(cache, tmp_path):
    exe = _fake_llama_bench(tmp_path / "bin")
    row = llamacpp.random_model_row(CFG, "q8_0", context=64, threads=2, tokens=4, repeats=3, binary=exe)
    assert row["llamacpp_ms_per_token"] == pytest.approx(272344 / 4e6)
    assert f"-m {random_gguf_path(CFG, 'q8_0', 1)} " in (tmp_path / "bin" / "args").read_text()
    skipped = llamacpp.random_model_row(CFG, "fp32", 64, 2, 4, 3, binary=exe)
    assert skipped["llamacpp_ms_per_token"] is None and "fp32" in skipped["llamacpp_note"]


def test_missing_binary_says_make_llamacpp(cache, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="make llamacpp"):
        llamacpp.resolve_binary("auto")
    with pytest.raises(FileNotFoundError, match="make llamacpp"):
        llamacpp.resolve_binary(tmp_path / "nowhere" / "llama-bench")
    from sparkformer.cli import main

    for cmd in (["bench", "decode", "--preset", "tiny-dense", "--layers", "1", "--no-save", "--llamacpp", "auto"],
                ["bench", "decode", "--model", "smollm2-135m", "--no-save", "--llamacpp", str(tmp_path / "x")]):
        assert main(cmd) == 2  # refused before any engine or model is built
        assert "make llamacpp" in capsys.readouterr().err


def test_built_binary_found_in_cache(cache):
    bin_dir = cache / "llamacpp" / "bin"
    exe = _fake_llama_bench(bin_dir)
    assert llamacpp.resolve_binary("auto") == exe
    assert os.access(llamacpp.resolve_binary(None), os.X_OK)


@pytest.mark.slow
def test_llamacpp_computes_our_dense_model(tmp_path):
    """llama.cpp's greedy tokens on our GGUF equal our dense engine's on the same layout (fp32 weights, random norm
    multipliers so that the norm convention matters, a window shorter than the prompt, GQA, soft-caps): the file is
    the same function. Compared up to the first step whose top-2 logit margin is below 0.02 in our engine (there
    rounding differences, e.g. llama.cpp's fp16 KV cache, may pick the other token). Needs ``make llamacpp``."""
    import subprocess

    from sparkformer.decode import CpuEngine

    exe = llamacpp.built_binary("llama-simple")
    if exe is None:
        pytest.skip("llama.cpp not built (make llamacpp)")
    cfg = CFG.replace(vocab_size=512, d_model=128, head_dim=64, ffn_dim=256, max_seq_len=256, sliding_window=8,
                      init_std=0.1)
    layout = random_layout(cfg, torch.float32, seed=8)  # seeds whose greedy steps are well separated (24 of 24)
    g = torch.Generator().manual_seed(1)
    for layer in layout.layers:
        layer.norms.copy_(torch.rand(layer.norms.shape, generator=g) * 3 + 0.5)
        layer.norms[1::2] *= 3  # post norms: layer outputs outweigh the (tied) embedding, no echo of the last token
    layout.final_norm.copy_(torch.rand(layout.final_norm.shape, generator=g) + 0.5)
    path = write_gguf(layout, tmp_path / "m.gguf", "f32")
    prompt, n = "hello world, this is a test", 24
    out = subprocess.run([str(exe), "-m", str(path), "-n", str(n), prompt], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # our vocab: the prompt is <bos> then byte tokens (' ' is SentencePiece's U+2581); llama-simple prints the pieces
    ids = [2] + [4 + b for b in prompt.replace(" ", "\u2581").encode()]
    pieces, _, types = vocab(cfg.vocab_size)
    engine = CpuEngine(layout, cfg.max_seq_len)
    logits = engine.prefill(ids)
    text = b"<bos>" + prompt.replace(" ", "\u2581").encode()
    compared = 0
    for _ in range(n):
        top = logits.float().topk(2)
        if float(top.values[0] - top.values[1]) < 0.02:
            break
        t = int(top.indices[0])
        text += bytes([t - 4]) if types[t] == gguf.TokenType.BYTE else pieces[t].replace("\u2581", " ").encode()
        logits = engine.step(t)
        compared += 1
    assert compared >= 16, "too few well-separated steps to compare"
    assert out.stdout.startswith(text), (out.stdout, text)
