"""Benchmark programs behind ``sparkformer bench <name>``: each prints a table and ends with one JSON line."""

from __future__ import annotations

import importlib

BENCHMARKS = ["topk", "decode", "routed", "batch", "sparsify", "quant_quality"]


def add_cli(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (table + final JSON line)")
    bsub = p.add_subparsers(dest="bench", metavar="<benchmark>", required=True)
    for name in BENCHMARKS:
        importlib.import_module(f"sparkformer.bench.{name}").add_parser(bsub)
