"""What every brick experiment shares: its settings as one dataclass, the command line built from it and the one
that reproduces a run, the model it runs on, and one writer for ``results.json`` and ``report.md``.

An experiment is a plain function ``run_<command>(run, model=None, ...)``, the Python API of ``sparkformer bricks
<command>``. Its settings are a dataclass of ``arg(...)`` fields; the fields (names, types, defaults, help) *are*
the command's options, so every default is written once::

    @dataclass(kw_only=True)
    class PartitionRun(PromptRun):
        n_bricks: int = arg(16, "bricks per layer (must divide the neuron count)")

    run_partition(PartitionRun(model="smollm2-135m", out="p.safetensors", n_bricks=8))
    # == sparkformer bricks partition --model smollm2-135m --n-bricks 8 --out p.safetensors

Flags: ``field_name`` -> ``--field-name``; a bool that defaults to False is ``--flag``, to True ``--no-flag``; a
``list[str]`` field repeats its flag; a ``tuple[X, ...]`` field is a comma list. A folder or file option ends in
``_dir`` / names the file; a count starts with ``n_`` (``--n-bricks`` vs ``--bricks-dir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import shlex
import sys
import time
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
MISSING = dataclasses.MISSING


def arg(default: Any = MISSING, help: str = "", *, choices: Sequence[str] | None = None,
        parse: Callable[[str], Any] | None = None, cli: bool = True, positional: bool = False,
        required: bool = False) -> Any:
    """A settings field: its default (a list default is copied per instance), the command-line help, allowed
    ``choices``, a ``parse`` function from the command-line string, ``cli=False`` for a field the command does not
    expose, ``positional`` for a positional argument, ``required`` on the command line (the model and the output)."""
    meta = {"help": help, "choices": choices, "parse": parse, "cli": cli, "positional": positional,
            "required": required}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---- comma lists -----------------------------------------------------------------------------------------------------
def csv(s: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return tuple(x.strip() for x in str(s).split(",") if x.strip())


def fraction_list(s: str | Sequence[float]) -> tuple[float, ...]:
    """A comma list (or sequence) of fractions in (0, 1], sorted, without repeats."""
    try:
        fr = sorted({float(x) for x in (csv(s) if isinstance(s, str) else s)})
    except ValueError:
        raise ValueError(f"fractions {s!r}: expected a comma list of numbers in (0, 1]") from None
    if not fr or any(not 0 < f <= 1 for f in fr):
        raise ValueError(f"fractions {s!r}: every fraction must be in (0, 1]")
    return tuple(fr)


# ---- the settings every experiment has -------------------------------------------------------------------------------
MODEL_HELP = "built-in name (smollm2-135m, gemma3-270m), HF folder or hub name, .gguf file, or a sparkformer checkpoint"


@dataclass(kw_only=True)
class ModelRun:
    """A run on one model, written under ``out``. ``model`` names it (the run loads it unless a model object is
    passed to the run function)."""

    model: str = arg("", MODEL_HELP, required=True)
    out: str = arg(help="output folder", required=True)
    seed: int = arg(0, "random seed (data sampling, initialisations)")
    threads: int | None = arg(None, "torch threads (default: torch's choice; 1 is often fastest on a busy machine)")


@dataclass(kw_only=True)
class TextRun(ModelRun):
    """A run over capability-labelled text (:mod:`sparkformer.bricks.capabilities`)."""

    capabilities: str = arg("default", "comma list of built-in capabilities, 'default' (code,docstrings,reference,"
                                        "drama,arithmetic), 'all' (+ those whose data is already on this machine), "
                                        "or 'none' (only --data)")
    data: list[str] = arg([], "extra capability data: a jsonl with 'text' and 'capability' fields (or any "
                              "sparkformer.corpora source, whose domain is the capability); repeatable")

    def capability_set(self, n_per_capability: int, n_heldout: int, chars: int):
        """``n_per_capability`` scoring (training) and ``n_heldout`` held-out texts per capability."""
        from sparkformer.bricks.capabilities import capability_set

        return capability_set(self.capabilities, self.data, n_per_capability, n_heldout, chars, self.seed)


@dataclass(kw_only=True)
class PromptRun(TextRun):
    """A run over capability prompts cut to ``max_tokens`` and run in batches."""

    prompts_per_capability: int = arg(40, "scoring / recording prompts per capability (where routers are fitted, "
                                          "every 10th is kept for validation)")
    heldout_per_capability: int = arg(8, "held-out prompts per capability (losses and perplexities)")
    max_tokens: int = arg(128, "tokens per prompt (at most)")
    batch_size: int = arg(8, "prompts per forward pass")

    def prompts(self):
        """The prompts of this run (:class:`~sparkformer.bricks.capabilities.CapabilitySet`)."""
        return self.capability_set(self.prompts_per_capability, self.heldout_per_capability, 6 * self.max_tokens)


@dataclass(kw_only=True)
class RecordRun(PromptRun):
    """A run that records FFN inputs (fits routers on them) and runs the model in ``dtype``."""

    dtype: str = arg("float32", "model dtype for every forward", choices=sorted(DTYPES))
    record_cache: str | None = arg(None, "a .safetensors file for the recorded FFN inputs: read if it matches, "
                                         "else written")


# ---- run settings <-> command line -----------------------------------------------------------------------------------
def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def _unwrap(hint: Any) -> Any:
    """``X | None`` -> X."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(hint) and len(args) == 1 else hint


def _reporting(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` whose ValueError message argparse shows as it is."""
    def typed(s: str) -> Any:
        try:
            return parse(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return typed


def _element_parser(hint: Any, meta: dict) -> Callable[[str], Any]:
    if meta.get("parse"):
        return _reporting(meta["parse"])
    base = _unwrap(hint)
    if typing.get_origin(base) is tuple:
        elem = typing.get_args(base)[0]
        return _reporting(lambda s: tuple(elem(x) for x in csv(s)))
    return base


def _cli_fields(settings) -> list[dataclasses.Field]:
    """The fields a command exposes, the model first and the output last."""
    order = {"model": 0, "out": 2}
    return sorted((f for f in fields(settings) if f.metadata.get("cli", True)), key=lambda f: order.get(f.name, 1))


def add_arguments(parser: argparse.ArgumentParser, settings: type) -> None:
    """One argument per field of the dataclass ``settings`` (see the module docstring)."""
    hints = typing.get_type_hints(settings)
    for f in _cli_fields(settings):
        meta = f.metadata
        hint, default = hints[f.name], _default(f)
        required = meta.get("required", False) or default is MISSING
        shown = "" if required or default in (None, "", [], ()) or isinstance(default, bool) else \
            f" (default: {_text(default)})"
        kw: dict[str, Any] = {"help": (meta.get("help", "") + shown).replace("%", "%%")}
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("positional"):
            parser.add_argument(f.name, **kw)
            continue
        flag = "--" + f.name.replace("_", "-")
        if _unwrap(hint) is bool:
            if default is True:
                parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", **kw)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", **kw)
        elif typing.get_origin(_unwrap(hint)) is list:
            elem = typing.get_args(_unwrap(hint))[0]
            parser.add_argument(flag, dest=f.name, action="append", type=elem, required=required,
                                default=None if required else default, **kw)
        else:
            parser.add_argument(flag, dest=f.name, type=_element_parser(hint, meta), required=required,
                                default=None if default is MISSING else default, **kw)


def from_arguments(settings: type, args: argparse.Namespace) -> Any:
    """The dataclass ``settings`` from parsed arguments (fields the command does not expose keep their default)."""
    return settings(**{f.name: getattr(args, f.name) for f in _cli_fields(settings)})


def _text(v: Any) -> str:
    if isinstance(v, float):
        short = f"{v:g}"
        return short if float(short) == v else repr(v)
    if isinstance(v, tuple):
        return ",".join(_text(x) for x in v)
    return str(v)


def command_line(command: str, run: Any) -> str:
    """``sparkformer bricks <command> ...`` that reproduces ``run``: the model first, the output last, and in
    between every option that is not at its default."""
    parts = ["sparkformer", "bricks", command]
    for f in _cli_fields(run):
        v = getattr(run, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.metadata.get("positional"):
            parts.append(_text(v))
        elif f.name not in ("model", "out") and (v is None or v == _default(f)):
            continue
        elif isinstance(v, bool):
            parts.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, list):
            for x in v:
                parts += [flag, _text(x)]
        elif v not in (None, ""):
            parts += [flag, _text(v)]
    return " ".join(shlex.quote(p) for p in parts)


def _description(doc: str, settings: type) -> str:
    """A run function's docstring as command help: without its first words, Sphinx roles and literal quotes, and
    with the settings' fields spelled as the options."""
    doc = re.sub(r"^Python API of ``[^`]*``: ", "", " ".join(doc.split()))
    for f in fields(settings):
        for spelled in (f"``{f.name}``", f"``run.{f.name}``"):
            doc = doc.replace(spelled, "--" + f.name.replace("_", "-"))
    doc = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"\1", doc).replace("``", "")
    return doc[:1].upper() + doc[1:]


def add_command(subparsers, name: str, settings: type, run: Callable[[Any], Any], *, help: str,
                summary: Callable[[Any], tuple[str, dict | None]] | None = None) -> argparse.ArgumentParser:
    """The sub-command ``name``: its options from ``settings``, its description from ``run``'s docstring; it calls
    ``run(settings)`` and prints ``summary(result)``: a text (a table) and one JSON line of headline numbers (when the
    summary gives none, ``{"command": ...}``: every command ends with one JSON line)."""
    p = subparsers.add_parser(name, help=help, description=_description(run.__doc__ or help, settings))
    add_arguments(p, settings)

    def func(args: argparse.Namespace) -> int:
        res = run(from_arguments(settings, args))
        text, headline = summary(res) if summary is not None else ("", None)
        if text:
            print(text)
        # like every command, end with one JSON line (the headline numbers, at least what ran)
        print(json.dumps(headline if headline is not None else {"command": f"bricks {name}"}, default=json_default))
        return 0

    p.set_defaults(func=func)
    return p


# ---- running --------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def start(run: ModelRun) -> float:
    """Apply the run's thread count and seed; returns the start time. (A run loads its model before it builds its
    prompts, so a missing path or an unknown name fails at once, not after minutes of preparation.)"""
    if run.threads:
        torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    return time.time()


def load_model(name: str, model: Any = None, tokenizer: Any = None, dtype: str | None = None, freeze: bool = False,
               log: Callable[[str], None] = log) -> tuple[Any, Any, str, str]:
    """(model, tokenizer, name, description): ``model`` as given (cast to ``dtype``, eval mode; its name is ``name``
    or its class name), or loaded by ``name`` (every parameter frozen when ``freeze``). The description is the
    built-in model's, or ''."""
    dt = DTYPES[dtype] if dtype else None
    if model is not None:
        if dt is not None:
            model = model.to(dt)
        return model.eval(), tokenizer, name or type(model).__name__, ""
    from sparkformer.pretrained import BUILTIN_MODELS, load_causal_lm

    t = time.time()
    model, tok = load_causal_lm(name, dt or torch.float32)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    log(f"{name}: loaded in {time.time() - t:.0f} s")
    spec = BUILTIN_MODELS.get(name)
    return model, tokenizer if tokenizer is not None else tok, name, spec.description if spec else ""


def environment(dtype: torch.dtype) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "dtype": str(dtype).replace("torch.", "")}


# ---- writing --------------------------------------------------------------------------------------------------------
def json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return float(o)


def write_json(path: str | Path, obj: Any, indent: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, default=json_default))
    return path


def write_results(out: str | Path, results: dict[str, Any], *, command: str, title: str | None = None,
                  table: str | None = None, notes: str = "", started: float | None = None) -> dict[str, Any]:
    """The one writer of an experiment's output folder: ``results.json`` and, with a ``table``, ``report.md`` (the
    title, the command that reproduces it, the table, the notes, every PNG of the folder). With ``started`` (the
    run's start time) the results also get the command, the wall time and the thread count. Returns the results
    as written."""
    out = Path(out)
    if started is not None:
        wall = time.time() - started
        results = {**results, "command": command, "wall_seconds": wall, "threads": torch.get_num_threads()}
        threads = torch.get_num_threads()
        notes = (notes + " " if notes else "") + f"Wall time {wall / 60:.1f} min on {threads} thread(s)."
    write_json(out / "results.json", results)
    if table is not None:
        report = [f"# bricks {title}", "", f"Reproduce: `{command}`", "", table, ""]
        if notes:
            report += [notes, ""]
        for png in sorted(out.glob("*.png")):
            report += [f"![{png.stem}]({png.name})", ""]
        (out / "report.md").write_text("\n".join(report))
    return results


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = ".2f") -> str:
    """A Markdown table; floats get ``fmt``."""
    def cell(v: Any) -> str:
        return format(v, fmt) if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """Lay out, write (110 dpi) and close a figure."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
