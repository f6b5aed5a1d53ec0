"""`sparkformer bricks <command>`: the brick tools.

Every command is an experiment of a library module: a settings dataclass and ``run_<command>(settings)``, its
Python API (see :mod:`sparkformer.bricks.experiment`). The module exposes ``add_cli(subparsers)``, which adds the
command to the ``bricks`` group; to add a command, list its module in ``BRICKS_COMMAND_MODULES``.

    sparkformer bricks analyze --model smollm2-135m --out docs/bricks/smollm2-135m
"""

from __future__ import annotations

import argparse
import importlib
import sys

BRICKS_COMMAND_MODULES = [
    "sparkformer.bricks.analysis",  # analyze
    "sparkformer.bricks.report",  # report
    "sparkformer.bricks.partition",  # partition
    "sparkformer.bricks.brick_routers",  # route
    "sparkformer.bricks.sparkify",  # sparkify
    "sparkformer.bricks.lora",  # lora
    "sparkformer.bricks.retrieval",  # retrieve
    "sparkformer.bricks.merge",  # merge
    "sparkformer.bricks.edit",  # edit
    "sparkformer.bricks.grow_train",  # grow
]


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bricks", help="brick tools: neuron analysis, routing, LoRA, merging, editing, growth",
                              description="Tools over the functional units (bricks) of a model.")
    sub = p.add_subparsers(dest="bricks_command", metavar="<bricks command>")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    for name in BRICKS_COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)


def main(argv: list[str] | None = None) -> int:
    """``sparkformer bricks ...`` as a function (``python -m sparkformer.bricks.cli <command> ...``): every bricks
    command, bad input reported as one error line and exit status 2."""
    parser = argparse.ArgumentParser(prog="sparkformer")
    sub = parser.add_subparsers(dest="command")
    add_cli(sub)
    args = parser.parse_args(["bricks", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        name = f"bricks {args.bricks_command}" if getattr(args, "bricks_command", None) else "bricks"
        print(f"sparkformer {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
