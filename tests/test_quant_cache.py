"""The on-disk cache of quantized matrices: a hit returns the stored rows without quantizing; any change to what
determines the rows (bytes, dtype, format, quantizer version) misses; a damaged entry is rebuilt; it can be off."""

import pytest
import torch

from sparkformer.ops import quant
from sparkformer.ops.quant_cache import cached_rows, caching, matrix_key


@pytest.fixture(autouse=True)
def _cache_on(monkeypatch):
    monkeypatch.setenv("SPARKFORMER_QUANT_CACHE", "1")  # conftest turns it off for every other test


def _counting():
    calls = []

    def make(value):
        def quantize():
            calls.append(value)
            return torch.full((4, 6), value, dtype=torch.uint8)
        return quantize
    return calls, make


def test_hit_miss_and_damaged_entries(tmp_path):
    calls, make = _counting()
    w = torch.randn(4, 32)
    a = cached_rows(w, "q8_0", "v1", make(1), tmp_path)
    b = cached_rows(w.clone(), "q8_0", "v1", make(2), tmp_path)  # same content: a hit, no second quantization
    assert calls == [1] and torch.equal(a, b)
    w2 = w.clone()
    w2[0, 0] += 1e-3
    keys = {matrix_key(w, "q8_0", "v1"), matrix_key(w2, "q8_0", "v1"), matrix_key(w, "q4_0", "v1"),
            matrix_key(w, "q8_0", "v2"), matrix_key(w.bfloat16(), "q8_0", "v1")}
    assert len(keys) == 5
    path = tmp_path / f"{matrix_key(w, 'q8_0', 'v1')}.safetensors"
    path.write_bytes(b"not a tensor")
    c = cached_rows(w, "q8_0", "v1", make(3), tmp_path)
    assert calls == [1, 3] and int(c[0, 0]) == 3
    assert int(cached_rows(w, "q8_0", "v1", make(4), tmp_path)[0, 0]) == 3  # the rebuilt entry serves again
    assert not list(tmp_path.glob("*.tmp*"))


def test_cache_off(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKFORMER_QUANT_CACHE", "0")
    calls, make = _counting()
    w = torch.randn(4, 32)
    cached_rows(w, "q8_0", "v1", make(1), tmp_path)
    cached_rows(w, "q8_0", "v1", make(2), tmp_path)
    assert calls == [1, 2] and not list(tmp_path.iterdir())


def test_quantize_uses_cache_only_while_caching(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKFORMER_CACHE", str(tmp_path))
    w = torch.randn(8, 64)
    plain = quant.quantize(w, "q4_0")
    assert not (tmp_path / "quant").exists()  # outside caching(): nothing written
    with caching():
        first = quant.quantize(w, "q4_0")
        entries = list((tmp_path / "quant" / "q4_0").iterdir())
        assert len(entries) == 1 and torch.equal(first.data, plain.data)
        calls = []
        monkeypatch.setattr(quant, "_quantize_rows", lambda *a: calls.append(a))
        again = quant.quantize(w, "q4_0")  # a hit: the quantizer does not run
        assert not calls and torch.equal(again.data, plain.data)
        quant.quantize(w, "q4_0", importance=torch.rand(64))  # importance changes the rows: its own entry
        assert len(calls) == 1
