"""Every decode kernel variant compiles for sm_90 (Hopper) at the gemma2-2b shape, without a GPU: the interpreter
tests check what the kernels compute, this checks that the compiler accepts them (``sparkformer.ops.triton_aot``),
so a device run does not discover a compile error. Runs in a subprocess because the other test files put triton
in interpreter mode. Marked ``triton``; skips where triton's CUDA backend or ptxas is missing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[1]


def _has_ptxas() -> bool:
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return False
    return (Path(nv.__file__).parent / "bin" / "ptxas").exists() or shutil.which("ptxas") is not None


@pytest.mark.skipif(not _has_ptxas(), reason="needs triton's CUDA backend with ptxas")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "sparkformer.ops.triton_aot"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    bad = [f"{r['kernel']} {r['constexprs']}: {r.get('error', '')[-600:]}" for r in recs if not r["ok"]]
    assert not bad, "\n\n".join(bad)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {r["kernel"] for r in recs}
    assert {"_ffn_predict_kernel", "_ffn_select_kernel", "_ffn_slots_out_kernel", "_attn_score_kernel",
            "_attn_select_kernel", "_res_norm_gemv_kernel"} <= names
