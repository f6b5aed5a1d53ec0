"""`sparkformer bricks <command>`: the brick tools.

The ``bricks`` group has its own sub-commands. To add one, write a module exposing ``add_bricks_cli(subparsers)``
(which adds its parser and sets ``func``) and list it in ``BRICKS_COMMAND_MODULES``.

    sparkformer bricks analyze --model smollm2-135m --out docs/bricks/smollm2-135m
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path

import torch

# (module, hook): each hook adds its sub-commands to the `sparkformer bricks` group
BRICKS_COMMAND_MODULES: list[tuple[str, str]] = [
    ("sparkformer.bricks.cli", "add_bricks_cli"),  # analyze, report
    ("sparkformer.bricks.route_cli", "add_route_commands"),  # partition, route, sparkify
    ("sparkformer.bricks.ops_cli", "add_bricks_commands"),  # lora, retrieve, merge, edit, grow
]

_DEFAULTS = {"capabilities": "default", "prompts_per_capability": 40, "heldout_per_capability": 8,
             "max_tokens": 128, "batch_size": 8, "seed": 0, "mask_fractions": "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95",
             "top_fraction": 0.05, "threads": None}


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bricks", help="brick tools: neuron analysis (and more)",
                              description="Tools over the functional units (bricks) of a model.")
    sub = p.add_subparsers(dest="bricks_command", metavar="<bricks command>")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    for name, hook in BRICKS_COMMAND_MODULES:
        getattr(importlib.import_module(name), hook)(sub)


def add_bricks_cli(sub) -> None:
    a = sub.add_parser(
        "analyze", help="FFN neuron sparsity, specialisation and partition (paper §4) -> JSON, PNG, Markdown",
        description="Measure activation sparsity, neuron specialisation and partition of FFN neurons per capability "
                    "and write results.json, neuron_scores.safetensors, PNG plots and report.md under --out.")
    a.add_argument("--model", action="append", required=True,
                   help="built-in name (smollm2-135m, gemma3-270m), HF folder or hub name, .gguf file, or a "
                        "sparkformer checkpoint; repeat to analyse several models with the same prompts")
    a.add_argument("--data", action="append", default=[],
                   help="extra capability data: a jsonl with 'text' and 'capability' fields (or any "
                        "sparkformer.corpora source, whose domain is the capability); repeatable")
    a.add_argument("--capabilities", default=_DEFAULTS["capabilities"],
                   help="comma list of built-in capabilities, 'default' (code,docstrings,reference,drama,arithmetic),"
                        " 'all' (+ those whose data is already on this machine), or 'none' (only --data)")
    a.add_argument("--prompts-per-capability", type=int, default=_DEFAULTS["prompts_per_capability"],
                   help="scoring prompts per capability (statistics and neuron scores)")
    a.add_argument("--heldout-per-capability", type=int, default=_DEFAULTS["heldout_per_capability"],
                   help="held-out prompts per capability (losses under masking)")
    a.add_argument("--max-tokens", type=int, default=_DEFAULTS["max_tokens"], help="tokens per prompt (at most)")
    a.add_argument("--batch-size", type=int, default=_DEFAULTS["batch_size"])
    a.add_argument("--mask-fractions", default=_DEFAULTS["mask_fractions"],
                   help="comma list of fractions of the lowest neurons to zero per token")
    a.add_argument("--top-fraction", type=float, default=_DEFAULTS["top_fraction"],
                   help="size of a capability's neuron set (paper: 0.05)")
    a.add_argument("--seed", type=int, default=_DEFAULTS["seed"])
    a.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.add_argument("--out", required=True, help="output folder")
    a.set_defaults(func=_cmd_analyze)

    r = sub.add_parser("report", help="redraw the plots and report.md of an analyze folder from its results.json",
                       description="Re-render an analyze output folder (plots + report.md) without the model.")
    r.add_argument("out", help="the --out folder of a previous `bricks analyze`")
    r.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from sparkformer.bricks.report import render

    if not (Path(args.out) / "index.json").is_file():
        raise FileNotFoundError(f"{args.out}: no index.json; give the --out folder of `sparkformer bricks analyze`")
    print(f"wrote {render(args.out)}")
    return 0


def canonical_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (options at their defaults left out)."""
    parts = ["sparkformer", "bricks", "analyze"]
    for m in args.model:
        parts += ["--model", m]
    for d in args.data:
        parts += ["--data", d]
    for key, default in _DEFAULTS.items():
        v = getattr(args, key)
        if v is not None and v != default:
            parts += ["--" + key.replace("_", "-"), str(v)]
    parts += ["--out", args.out]
    return " ".join(shlex.quote(p) for p in parts)


def _fractions(s: str) -> tuple[float, ...]:
    try:
        fr = tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--mask-fractions {s!r}: expected a comma list of numbers in [0, 1)") from None
    if not fr or any(not 0 <= f < 1 for f in fr):
        raise ValueError(f"--mask-fractions {s!r}: every fraction must be in [0, 1)")
    return tuple(sorted(set(fr) | {0.0}))


def run_analyze(models: list[str], out: str | Path, capabilities: str = "default", data: list[str] | None = None,
                prompts_per_capability: int = 40, heldout_per_capability: int = 8, max_tokens: int = 128,
                batch_size: int = 8, mask_fractions: tuple[float, ...] | None = None, top_fraction: float = 0.05,
                seed: int = 0, progress: bool = True, command: str | None = None) -> Path:
    """Python API of ``sparkformer bricks analyze``; returns the path of report.md."""
    from sparkformer.bricks.analysis import AnalysisConfig, analyze
    from sparkformer.bricks.capabilities import build_capability_set
    from sparkformer.bricks.report import write_report
    from sparkformer.pretrained import BUILTIN_MODELS, load_causal_lm

    cfg = AnalysisConfig(max_tokens=max_tokens, batch_size=batch_size, top_fraction=top_fraction, seed=seed)
    if mask_fractions is not None:
        cfg.mask_fractions = tuple(mask_fractions)
    cfg.validate()
    if prompts_per_capability < 2 or heldout_per_capability < 1:
        raise ValueError("need --prompts-per-capability >= 2 and --heldout-per-capability >= 1")
    caps = [] if capabilities in ("none", "") else capabilities
    t0 = time.time()
    capset = build_capability_set(caps, data, n_per_capability=prompts_per_capability,
                                  n_heldout=heldout_per_capability, chars=6 * max_tokens, seed=seed)
    print(f"capabilities: {', '.join(capset.capabilities)} ({len(capset.score)} scoring + {len(capset.heldout)} "
          f"held-out prompts, built in {time.time() - t0:.0f} s)", file=sys.stderr)
    results, arrays = [], []
    for name in models:
        t = time.time()
        model, tokenizer = load_causal_lm(name)
        spec = BUILTIN_MODELS.get(name)
        notes = f"Weights: {spec.description}." if spec else ""
        print(f"{name}: loaded in {time.time() - t:.0f} s", file=sys.stderr)
        res, arr = analyze(model, tokenizer, capset, cfg, name=name, notes=notes, progress=progress,
                           log=lambda s: print(s, file=sys.stderr))
        res["timings_s"]["load"] = time.time() - t - res["timings_s"]["total"]
        results.append(res)
        arrays.append(arr)
        del model
    cmd = command or f"sparkformer bricks analyze {' '.join('--model ' + shlex.quote(m) for m in models)} --out {out}"
    return write_report(results, arrays, out, cmd)


def _cmd_analyze(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.time()
    path = run_analyze(args.model, args.out, args.capabilities, args.data, args.prompts_per_capability,
                       args.heldout_per_capability, args.max_tokens, args.batch_size, _fractions(args.mask_fractions),
                       args.top_fraction, args.seed, progress=not args.no_progress, command=canonical_command(args))
    print(f"wrote {path} ({time.time() - t:.0f} s, {torch.get_num_threads()} threads)")
    return 0


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
