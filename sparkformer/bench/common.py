"""Shared benchmark plumbing: interleaved timing with medians, environment record, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# Where a bare run writes: a scratch folder under the current directory, so that running a benchmark never
# overwrites the committed, quoted results with another machine's figures. Publish with ``--out benchmarks/results``.
DEFAULT_OUT = Path("runs") / "bench"
PUBLISHED_OUT = Path("benchmarks") / "results"
OUT_HELP = f"result folder (default {DEFAULT_OUT}/; pass --out {PUBLISHED_OUT} to publish)"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: whether the machine was shared while a result was measured."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def env_info(dtype: str | None = None) -> dict:
    """What a result depends on: hardware, threads, versions, load (recorded with every result file)."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": load_average(),
    }
    if dtype:
        info["dtype"] = dtype
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Run each fn ``warmup`` times, then ``repeats`` rounds of A B C ... so machine drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(ts: list[float]) -> dict:
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "n": len(ts)}


def write_result(name: str, payload: dict, out_dir: str | Path | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` atomically; ``out_dir`` defaults to ``runs/bench`` under the current directory
    (never the committed ``benchmarks/results``: publishing is an explicit ``--out benchmarks/results``)."""
    out = Path(out_dir) if out_dir else Path.cwd() / DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def finish(res: dict, print_table: Callable[[], None], name: str, args) -> int:
    """The end of every benchmark command: the table, the result file (unless ``--no-save``), one JSON line."""
    print_table()
    if not args.no_save:
        print(f"wrote {write_result(name, res, args.out)}")
    print(json.dumps(res))
    return 0
