"""llama.cpp as the decode anchor: run ``llama-bench`` on a GGUF and read its decode speed.

    res = run_llama_bench("model.gguf", depth=4096, threads=2, tokens=8, repetitions=5)   # binary="auto"
    res["ms_per_token"], res["ms"], res["build_commit"]
    row = random_model_row(cfg, "q8_0", context=4096, threads=2, tokens=8, repeats=5)     # bench decode --llamacpp
    row = model_row("smollm2-135m", "bf16", context=512, threads=2, tokens=32, repeats=5)  # bench decode --model

``llama-bench -m M -p 0 -n TOKENS -d DEPTH -t THREADS -r REPS -fa 0,1 -o json``: each repetition restores a KV
cache of DEPTH tokens (filled once, untimed) and times TOKENS single-token decode steps; ms/token is each
repetition's time over TOKENS, quoted as median and min-max as our engines are; of the two flash-attention settings
the faster is the figure (llama.cpp's fastest working configuration, as the benchmarks spec asks), both are kept.
The binary is the one ``make llamacpp`` built (``binary="auto"``, ``sparkformer.bench.llamacpp_build``) or any
path; every figure carries the llama.cpp commit, build number, the build flags of ``build.json`` and llama-bench's
own run settings (flash attention, KV type, repack). Options for every llama-bench run (e.g. ``-ub 1`` on a host
whose AMX prompt code dies): ``$SPARKFORMER_LLAMA_BENCH_ARGS``.

Formats: our engine dtype -> GGUF of the same weights (``gguf_export.DTYPE_FORMAT``). The random gemma2-shape
model is written by ``gguf_export.random_gguf``; a pretrained model's GGUF (``smollm2-135m``: the packaged Q4_1
file) is re-encoded by ``llama-quantize --allow-requantize --pure`` into BF16 / F32 / Q8_0 / Q4_0 / Q4_1 (every
matrix in the one format, as our engines hold it; cached), or a mix such as ``q4_0m`` / ``q4_1m`` (per-tensor types,
``quantize_args``). From Q4_1 that is the same function our engine runs (it loads the same file, dequantized),
re-quantized once more for Q8_0 / Q4_0. Q4_1 -> Q4_1 keeps SmolLM2's grid (llama.cpp's min/max rule on weights that
lie on a Q4_1 grid returns them), so ``q4_1m`` (token_embd Q8_0 -> Q8_0, the rest Q4_1) is the packaged file's
weights, and ``q4_1`` the same with token_embd in Q4_1.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sparkformer.bench.llamacpp_build import build_info, built_binary
from sparkformer.config import ModelConfig
from sparkformer.paths import cache_dir

MAKE_HINT = "build it with `make llamacpp` (python -m sparkformer.bench.llamacpp_build), or pass --llamacpp PATH"
RUN_FIELDS = ("build_commit", "build_number", "cpu_info", "backends", "model_type", "model_size", "model_n_params",
              "n_threads", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn", "repack", "n_gen", "n_depth",
              "avg_ts", "stddev_ts")
# Flash attention off and on: on these 2-core hosts llama.cpp decodes the 2B shape at depth 4096 faster without it
# (157 vs 201 ms/token BF16) while its default (auto) picks it; the anchor is its fastest configuration.
FLASH_ATTN = "0,1"
QUANTIZE_TYPES = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}


def resolve_binary(spec: str | Path | None = "auto", name: str = "llama-bench") -> Path:
    """The llama.cpp tool ``name``: ``auto`` (or None) = the one ``make llamacpp`` built; else a file, or a folder
    holding it. Refused, with how to build it, when it is not there."""
    if spec is None or str(spec) == "auto":
        found = built_binary(name)
        if found is None:
            raise FileNotFoundError(f"llama.cpp's {name} has not been built on this machine: {MAKE_HINT}")
        return found
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / name
    elif name != "llama-bench":  # a llama-bench path: its sibling tool
        path = path.parent / name
    if not path.is_file():
        raise FileNotFoundError(f"no llama.cpp {name} at {path}: {MAKE_HINT}")
    return path


def bench_command(binary: Path, model: str | Path, depth: int, threads: int, tokens: int, repetitions: int,
                  flash_attn: str = FLASH_ATTN, extra: tuple[str, ...] = ()) -> list[str]:
    """The llama-bench command line; ``extra`` and ``$SPARKFORMER_LLAMA_BENCH_ARGS`` (e.g. ``-ub 1`` where a native
    build's AMX prompt code dies, see the benchmarks spec) are appended and recorded with the figure."""
    env = tuple(shlex.split(os.environ.get("SPARKFORMER_LLAMA_BENCH_ARGS", "")))
    return [str(binary), "-m", str(model), "-p", "0", "-n", str(tokens), "-d", str(depth), "-t", str(threads),
            "-r", str(repetitions), "-fa", flash_attn, "-o", "json", *extra, *env]


def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench's ``-o json`` (an array) or ``-o jsonl`` output -> one dict per test with ms per token (median,
    min, max over repetitions) beside its own fields."""
    text = text.strip()
    start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError("no JSON in llama-bench output")
    text = text[start:]
    if text.startswith("["):
        tests = json.loads(text[: text.rindex("]") + 1])
    else:
        tests = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
    out = []
    for t in tests:
        n = t.get("n_gen") or 0
        if n <= 0:
            raise ValueError("llama-bench test has no generated tokens (n_gen=0): run it with -n N -p 0")
        ms = [ns / n / 1e6 for ns in t["samples_ns"]]
        row = {k: t.get(k) for k in RUN_FIELDS}
        row.update(ms_per_token=statistics.median(ms), ms={"median": statistics.median(ms), "min": min(ms),
                                                           "max": max(ms)},
                   tokens_per_s=1e3 / statistics.median(ms), samples_ms_per_token=ms)
        out.append(row)
    return out


def run_llama_bench(model: str | Path, depth: int, threads: int, tokens: int = 32, repetitions: int = 5,
                    binary: str | Path | None = "auto", flash_attn: str = FLASH_ATTN, extra: tuple[str, ...] = (),
                    timeout: float = 7200) -> dict:
    """Decode speed of ``model`` (a GGUF) after a KV cache of ``depth`` tokens, on ``threads`` threads: llama.cpp's
    fastest configuration of those tried (``flash_attn`` values, each a llama-bench test), the others in
    ``configs``."""
    exe = resolve_binary(binary)
    cmd = bench_command(exe, model, depth, threads, tokens, repetitions, flash_attn, extra)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    tests = parse_llama_bench(proc.stdout)
    res = dict(min(tests, key=lambda t: t["ms_per_token"]))
    res["configs"] = [{"flash_attn": t["flash_attn"], "ms_per_token": t["ms_per_token"], "ms": t["ms"]} for t in tests]
    res.update(command=" ".join(cmd), wall_s=round(time.perf_counter() - t0, 1), model_file=Path(model).name)
    if binary is None or str(binary) == "auto":
        info = build_info() or {}
        res["build"] = {k: info.get(k) for k in ("source_package", "llama_cpp_commit", "cmake_flags", "compiler")}
    return res


# our matrix role -> llama-quantize's option naming those tensors (a mix's roles outside its base format)
ROLE_TENSORS = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
                "down": ("ffn_down",)}


def quantize_args(fmt: str) -> list[str]:
    """llama-quantize's arguments after ``--allow-requantize --pure`` for ``fmt``: a plain format is its type alone
    (every matrix in it); a mix (``sparkformer.ops.quant.MIXES``) names its other roles' types with
    ``--token-embedding-type`` / ``--output-tensor-type`` / ``--tensor-type NAME=TYPE`` (honoured under --pure), so
    llama.cpp holds each tensor in the format our engine does. Returns the options; the type comes last."""
    from sparkformer.ops.quant import MIXES

    if fmt in QUANTIZE_TYPES:
        return [QUANTIZE_TYPES[fmt]]
    if fmt not in MIXES:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join([*QUANTIZE_TYPES, *MIXES])}")
    mix = MIXES[fmt]
    opts = ["--token-embedding-type", QUANTIZE_TYPES[mix.format_of("embed")],
            "--output-tensor-type", QUANTIZE_TYPES[mix.format_of("head")]]  # a tied embedding is the head: both set
    if mix.format_of("embed") != mix.format_of("head"):
        raise ValueError(f"{fmt}: llama.cpp quantizes a tied embedding with one type; give embed and head the same")
    for role, names in ROLE_TENSORS.items():
        if mix.format_of(role) != mix.base:
            opts += [a for n in names for a in ("--tensor-type", f"{n}={QUANTIZE_TYPES[mix.format_of(role)]}")]
    return [*opts, QUANTIZE_TYPES[mix.base]]


def quantize_gguf(src: str | Path, dst: str | Path, fmt: str, binary: str | Path | None = "auto") -> Path:
    """``llama-quantize --allow-requantize --pure [per-tensor types] SRC DST TYPE`` (``quantize_args``: every matrix
    in ``fmt``, or a mix's formats per tensor), written atomically."""
    args = quantize_args(fmt)
    exe = resolve_binary(binary, "llama-quantize")
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    cmd = [str(exe), "--allow-requantize", "--pure", *args[:-1], str(src), str(tmp), args[-1]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"llama-quantize failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    tmp.replace(dst)
    return dst


def source_gguf(model: str) -> Path | None:
    """The GGUF a ``--model`` name stands for: a built-in name's packaged file, or a ``.gguf`` path; else None."""
    from sparkformer.pretrained import BUILTIN_MODELS

    if model in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[model]
        return spec.locate(spec)
    path = Path(model).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def model_gguf(model: str, fmt: str, binary: str | Path | None = "auto") -> Path | None:
    """``model``'s GGUF re-encoded in ``fmt`` (cached under ``cache_dir("gguf", "llamacpp")``), or None when the
    model has no GGUF source."""
    src = source_gguf(model)
    if src is None:
        return None
    dst = cache_dir("gguf", "llamacpp") / f"{src.stem}-{fmt}.gguf"
    if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
        quantize_gguf(src, dst, fmt, binary)
    return dst


def _in_child(fn, *args):
    """Run ``fn(*args)`` in a fresh process (a full-size layout's memory goes back to the system when it exits)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _row(gguf: Path | None, note: str | None, context: int, threads: int, tokens: int, repeats: int,
         binary) -> dict:
    if gguf is None:
        return {"llamacpp_ms_per_token": None, "llamacpp_note": note}
    res = run_llama_bench(gguf, context, threads, tokens, repeats, binary)
    return {"llamacpp_ms_per_token": res["ms_per_token"], "llamacpp": res}


def random_model_row(cfg: ModelConfig, dtype: str, context: int, threads: int, tokens: int, repeats: int,
                     binary: str | Path | None = "auto", seed: int = 1) -> dict:
    """llama.cpp's figures for one ``bench decode`` row: the dense benchmark model (seed 1) in the GGUF format of
    ``dtype`` at the same depth, threads and tokens. fp32 rows are skipped (an F32 2B file is 10 GB; the
    comparison is made in the formats users run)."""
    from sparkformer.bench.gguf_export import DTYPE_FORMAT, random_gguf, random_gguf_path

    fmt = DTYPE_FORMAT.get(dtype)
    if fmt is None or fmt == "f32":
        return _row(None, f"no llama.cpp figure for dtype {dtype} (compared in bf16, q8_0, q4_0, q4_1 and their "
                    "mixes)", context, threads, tokens, repeats, binary)
    path = random_gguf_path(cfg.replace(ffn="geglu", attention="dense"), fmt, seed)
    if not path.is_file():  # written once, in a process of its own (the full-size layout is GBs)
        path = _in_child(random_gguf, cfg, fmt, seed)
    return _row(path, None, context, threads, tokens, repeats, binary)


def model_row(model: str, dtype: str, context: int, threads: int, tokens: int, repeats: int,
              binary: str | Path | None = "auto") -> dict:
    """llama.cpp's figures for one ``bench decode --model`` row: the model's GGUF in the format of ``dtype``."""
    from sparkformer.bench.gguf_export import DTYPE_FORMAT

    fmt = DTYPE_FORMAT.get(dtype)
    gguf = model_gguf(model, fmt, binary) if fmt else None
    note = None if gguf else (f"no GGUF source for {model!r} (llama.cpp runs a built-in name or a .gguf file)"
                              if fmt else f"no GGUF format for dtype {dtype}")
    return _row(gguf, note, context, threads, tokens, repeats, binary)


def check_binary(spec: str | Path | None) -> None:
    """Fail early (before any engine is built) when ``--llamacpp`` names no usable llama-bench."""
    exe = resolve_binary(spec)
    if shutil.which(str(exe)) is None:
        raise FileNotFoundError(f"{exe} is not executable: {MAKE_HINT}")


def main(argv: list[str] | None = None) -> None:
    """llama.cpp alone, on the benchmark's random model or a ``--model``: a table, then one JSON line.

    python -m sparkformer.bench.llamacpp --preset gemma2-2b --layers 4 --dtype bf16,q8_0,q4_0 --context 4096
    python -m sparkformer.bench.llamacpp --model smollm2-135m --dtype bf16,q8_0,q4_0 --context 512
    """
    import argparse

    from sparkformer.bench.common import OUT_HELP, env_info, write_result
    from sparkformer.config import get_preset

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gemma2-2b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--model", default=None, help="a built-in name or .gguf instead of the random preset model")
    ap.add_argument("--dtype", default="bf16", help="comma list of bf16, q8_0, q4_0, q4_1, a mix such as q4_1m "
                    "(fp32: --model only)")
    ap.add_argument("--context", default="4096", help="comma list of depths")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--llamacpp", default="auto", help="llama-bench path (default: the `make llamacpp` build)")
    ap.add_argument("--name", default=None, help="result file name (default llamacpp_<model or preset>)")
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args(argv)
    check_binary(args.llamacpp)
    cfg = get_preset(args.preset, **({"n_layers": args.layers} if args.layers else {}))
    rows = []
    for dtype in args.dtype.split(","):
        for ctx in (int(c) for c in args.context.split(",")):
            r = (model_row(args.model, dtype, ctx, args.threads, args.tokens, args.repeats, args.llamacpp)
                 if args.model else
                 random_model_row(cfg, dtype, ctx, args.threads, args.tokens, args.repeats, args.llamacpp))
            rows.append({"dtype": dtype, "context": ctx, **r})
            ms = r["llamacpp_ms_per_token"]
            lo_hi = r["llamacpp"]["ms"] if ms else {}
            print(f"{dtype:5s} {ctx:6d} " + (f"{ms:9.2f} ms/token (min {lo_hi['min']:.2f}, max {lo_hi['max']:.2f})"
                                              if ms else r["llamacpp_note"]), flush=True)
    what = args.model or args.preset
    res = {"benchmark": "llamacpp", "model": what, "layers": None if args.model else cfg.n_layers,
           "threads": args.threads, "tokens": args.tokens, "repeats": args.repeats, "build": build_info(),
           "env": env_info(), "command": "python -m sparkformer.bench.llamacpp " + " ".join(argv or sys.argv[1:]),
           "runs": rows}
    print(f"wrote {write_result(args.name or 'llamacpp_' + Path(what).stem, res, args.out)}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
