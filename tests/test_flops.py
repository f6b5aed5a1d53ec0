import json

import pytest

from sparkformer.cli import main
from sparkformer.config import get_preset
from sparkformer.flops import compare, token_cost


def test_dense_ffn_counts_by_hand():
    cfg = get_preset("tiny-dense")
    c = token_cost(cfg, 64, dtype_bytes=4)
    assert c.ffn_flops == cfg.n_layers * 6 * cfg.d_model * cfg.ffn_dim
    assert c.head_bytes == cfg.d_model * cfg.vocab_size * 4


def test_spark_reads_fewer_bytes_and_ratios():
    res = compare(get_preset("gemma2-2b"), 8192, "bf16")
    assert res["ideal_ffn_speedup"] == pytest.approx(3 * 9216 / (1024 * 13824 + 0.08 * 13824 * (2 * 2304 - 1024)) * 2304)
    assert 1.5 < res["ideal_decode_speedup"] < res["ideal_ffn_speedup"]
    assert res["flops_ratio_no_head"] > res["flops_ratio"] > 1
    # a context shorter than k: every key is kept
    short = compare(get_preset("gemma2-2b"), 128, "bf16")
    assert short["spark"]["keys_per_query"] == pytest.approx(128)


def test_cli_final_json_line(capsys):
    assert main(["flops", "--preset", "gemma2-2b", "--context", "4096"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    data = json.loads(last)
    for key in ("flops_ratio", "flops_ratio_no_head", "ideal_decode_speedup"):
        assert data[key] > 1


def test_cli_bad_input_is_clear(capsys):
    assert main(["flops", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
