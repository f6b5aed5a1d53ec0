"""`sparkformer <command>`: one CLI over functions that are also the Python API.

Each command lives in the module that implements it; that module exposes ``add_cli(subparsers)`` which adds its
sub-parser and sets ``func`` (called with the parsed args). Add a module here to add a command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Large tensors on transparent huge pages (PyTorch's CPU allocator honours this when it is set before its first
# large allocation). Batch-1 decode streams gigabytes of weights per token; with 4 KB pages one core reads ~30% less
# per second than with 2 MB pages on the machines we measured, and every model (dense, Spark, HF) gets the same pages.
# Set THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

COMMAND_MODULES = [
    "sparkformer.data",
    "sparkformer.train",
    "sparkformer.evaluate",
    "sparkformer.generate",
    "sparkformer.flops",
    "sparkformer.bricks.cli",
    "sparkformer.sparsify.command",
    "sparkformer.bench",
    "sparkformer.demo",
]


def build_parser() -> argparse.ArgumentParser:
    from sparkformer import __version__

    parser = argparse.ArgumentParser(prog="sparkformer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sparkformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    sub = {"data": "data_command", "bricks": "bricks_command", "bench": "bench"}.get(args.command)
    name = " ".join(filter(None, [args.command, getattr(args, sub, None) if sub else None]))
    try:
        rc = args.func(args)
    except (ValueError, OSError) as e:  # bad input, missing or unreadable files: say what to change, no traceback
        print(f"sparkformer {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nsparkformer {name}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
