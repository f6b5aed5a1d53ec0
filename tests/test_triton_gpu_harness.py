"""The device script's kernel harness (``benchmarks/gpu_kernels.py``) on tiny shapes under the Triton interpreter:
the same code path as the GPU run (every item, the JSON lines), so a typo cannot waste a device run. Marked
``triton``."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location("gpu_kernels", ROOT / "benchmarks" / "gpu_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real harness in gpu_check.sh")
def test_harness_runs_every_item_on_tiny_shapes(tmp_path):
    assert _harness().main(["--tiny", "--out", str(tmp_path)]) == 0
    recs = [json.loads(line) for line in (tmp_path / "kernels.jsonl").read_text().splitlines()]
    items = {r["item"]: r for r in recs}
    assert not [r for r in recs if "error" in r]
    want = {"env", "M0_kernel_boundary", "M1_F1", "M2_F1F2_c32", "M2_F1F2_c64", "M2_F1F2_c32_cols2",
            "M2b_noatomic_F1F2F3", "M2c_batch4", "M2c_batch4_noatomic", "M2e_tuner_pick", "M3_dense_geglu",
            "M4_A1_96", "M4_A1A2_96", "M4_A1A2_cap_on_96", "M4_A1A2_cap_off_96", "M4_dense_flash_96",
            "M5_norm_gemv_qkv", "done"}
    assert want <= items.keys()
    for name, r in items.items():  # the full-shape checks the device run records must hold here too
        if name.startswith("M2") and "selected" in r and "stages" in r and r["stages"] >= 2:
            if name != "M2b_noatomic_F1F2":  # stops before F3, so y is not written
                assert abs(r["selected"] - r["selected_ref"]) <= 1 and r["rel_err"] < 1e-4, (name, r)
        if name == "M2e_tuner_pick":  # the graph-timed tuner's code path, with a plain clock here
            assert r["us"] is not None and len(r["table"]) >= 7 and not [c for c in r["table"] if "error" in c]
        if "kept_equal" in r:
            assert r["kept_equal"] and r["capped_equal"] and r["rel_err"] < 1e-4, (name, r)


def test_device_script_parses_and_its_benchmark_arguments_exist():
    """gpu_check.sh is valid bash, and every ``bench decode`` / pytest argument it passes exists."""
    import argparse
    import re
    import shlex
    import subprocess

    from sparkformer.bench.decode import add_parser

    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text().replace('"$OUT"', "/tmp/out").replace("$PY", "python3")
    bench = shlex.split(re.search(r"BENCH=\((.*?)\)", text, re.S).group(1))
    assert bench[:4] == ["-m", "sparkformer.cli", "bench", "decode"]
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    runs = re.findall(r'^run bench_\w+ \d+ python3 "\$\{BENCH\[@\]\}" (.*)$', text, re.M)
    assert len(runs) == 2
    for rest in runs:
        args = p.parse_args(["decode", *bench[4:], *shlex.split(rest)])
        assert args.device == "cuda" and args.no_hf
    for f in re.findall(r"tests/\S+\.py", text):
        assert (ROOT / f).exists(), f
