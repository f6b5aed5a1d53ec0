"""Building and loading the C++ extension (sparkformer.ops._extension): the cached build, the pure-PyTorch fallback
when it is disabled, and SPARKFORMER_REQUIRE_EXT, which turns a failed build into an error (for CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from sparkformer.ops import _extension

HAVE_EXT = _extension.available()
ROOT = Path(__file__).resolve().parent.parent


_FALLBACK_SCRIPT = """
import warnings, torch
warnings.simplefilter("error")  # disabling by env is deliberate: no warning
from sparkformer.ops import _extension
from sparkformer.ops.spark_ffn_decode import spark_ffn_decode
from sparkformer.ops.spark_attn_decode import spark_attn_decode
from sparkformer.ops.dense_decode import geglu_decode, dense_attn_decode, matvec, pack_geglu
assert not _extension.available() and _extension.isa() == "none"
torch.manual_seed(0)
x = torch.randn(64); k1 = torch.randn(300, 32); k2 = torch.randn(300, 32); v = torch.randn(300, 64)
y, n = spark_ffn_decode(x, k1, k2, v, 0.08)
y_ref, n_ref = spark_ffn_decode(x, k1, k2, v, 0.08, impl="reference")
assert int(n) == int(n_ref) and torch.allclose(y, y_ref, rtol=1e-4, atol=1e-4)
q = torch.randn(4, 32); kp = torch.randn(2, 16, 100); kr = torch.randn(2, 100, 16); vv = torch.randn(2, 100, 32)
o, kept, capped = spark_attn_decode(q, kp, kr, vv, 90, 16, 0.2, None, 50.0)
o_ref, kept_ref, _ = spark_attn_decode(q, kp, kr, vv, 90, 16, 0.2, None, 50.0, impl="reference")
assert torch.equal(kept, kept_ref) and torch.allclose(o, o_ref, rtol=1e-4, atol=1e-5)
w = pack_geglu(torch.randn(64, 64), torch.randn(64, 64), torch.randn(64, 64))
assert torch.allclose(geglu_decode(x, *w), geglu_decode(x, *w, impl="reference"), rtol=1e-4, atol=1e-3)
kk = torch.randn(2, 100, 32)
assert torch.allclose(dense_attn_decode(q, kk, vv, 90, 0.2), dense_attn_decode(q, kk, vv, 90, 0.2, impl="reference"), atol=1e-5)
assert torch.allclose(matvec(k1, x[:32]), k1 @ x[:32], atol=1e-4)
print("fallback-ok")
"""


def test_fallback_when_extension_disabled():
    # disabling is deliberate, so it wins over SPARKFORMER_REQUIRE_EXT (as CI sets it): no error, no warning
    env = {**os.environ, "SPARKFORMER_DISABLE_EXT": "1", "SPARKFORMER_REQUIRE_EXT": "1"}
    res = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "fallback-ok" in res.stdout, res.stderr[-3000:]


def test_build_is_cached_per_cpu():
    key = _extension.build_key()
    assert key.startswith(f"torch{torch.__version__}-")
    if HAVE_EXT:
        assert (_extension.build_dir() / f"{_extension.NAME}.so").exists()



def _no_compiler_env(tmp_path, **extra) -> dict:
    """An environment where the extension cannot build: an empty cache and no compiler on PATH."""
    drop = ("SPARKFORMER_DISABLE_EXT", "SPARKFORMER_REQUIRE_EXT", "CXX")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "SPARKFORMER_CACHE": str(tmp_path / "cache"), "PATH": "", **extra}


_PROBE = """
from sparkformer.ops import _extension
for _ in range(2):  # the verdict holds for every later call too
    try:
        print("available", _extension.available())
    except _extension.ExtensionUnavailable as e:
        print("raised", str(e).splitlines()[0])
"""


def test_failed_build_falls_back_unless_required(tmp_path):
    def run(env):
        return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120,
                              cwd=ROOT)

    res = run(_no_compiler_env(tmp_path))
    assert res.returncode == 0 and res.stdout.split("\n")[:2] == ["available False"] * 2, res.stderr[-2000:]
    assert "pure-PyTorch fallback" in res.stderr  # by default: a warning, then the torch paths
    res = run(_no_compiler_env(tmp_path, SPARKFORMER_REQUIRE_EXT="1"))
    lines = res.stdout.split("\n")[:2]
    assert res.returncode == 0 and all(ln.startswith("raised SPARKFORMER_REQUIRE_EXT") for ln in lines), res.stderr
    assert "no C++ compiler found" in lines[0]  # the build's own message


def test_required_extension_fails_the_test_session(tmp_path):
    """tests/conftest.py: with SPARKFORMER_REQUIRE_EXT=1 a missing extension ends the run with an error, not skips."""
    env = _no_compiler_env(tmp_path, SPARKFORMER_REQUIRE_EXT="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_stat_topk.py",
                          "-k", "bad_targets"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode != 0 and "SPARKFORMER_REQUIRE_EXT" in res.stdout + res.stderr, res.stdout[-2000:]
