"""Small measurements quoted in docs/results.md and docs/quality-study.md, as one program.

    python benchmarks/side_checks.py thp        # LM-head matvec GB/s with and without transparent huge pages
    python benchmarks/side_checks.py csr        # 8%-dense FFN activations: CSR x dense vs dense GEMM (prefill)
    python benchmarks/side_checks.py chunked    # small Spark/dense model forward+backward, chunked vs one-chunk attention
    python benchmarks/side_checks.py prefill    # one gemma2-2b layer's prefill (T = 2048) split into its parts
    python benchmarks/side_checks.py attn       # Spark attention decode op at 4096: predictor pass vs the gathers

Each prints a few lines, a table of its figures and one JSON line, and writes ``side_checks_<name>.json`` (the
figures plus hardware, threads, dtype, versions and the load average before and after) to ``runs/bench/`` or
``--out DIR``; the figures quoted in the docs were published with ``--out benchmarks/results``. 2 threads.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def thp_child() -> dict:
    from sparkformer.ops.dense_decode import matvec

    x = torch.randn(2304)
    out = {}
    for dt in (torch.bfloat16, torch.float32):
        w = torch.empty(256000, 2304, dtype=dt).normal_()
        matvec(w, x)
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            matvec(w, x)
            ts.append(time.perf_counter() - t)
        m = statistics.median(ts)
        out[str(dt).split(".")[1]] = {"ms": m * 1e3, "gb_per_s": w.numel() * w.element_size() / m / 1e9}
        del w
    return out


def thp(rounds: int = 2) -> dict:
    """Alternating child processes (the allocator reads THP_MEM_ALLOC_ENABLE before its first large allocation)."""
    res = {"1": [], "0": []}
    for _ in range(rounds):
        for flag in ("1", "0"):
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": flag}
            r = subprocess.run([sys.executable, __file__, "_thp_child"], env=env, capture_output=True, text=True,
                               check=True)
            res[flag].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"THP_MEM_ALLOC_ENABLE={flag}: " + ", ".join(
                f"{k} {v['gb_per_s']:.1f} GB/s" for k, v in res[flag][-1].items()), flush=True)
    return res


def csr() -> dict:
    T, n, d = 2048, 13824, 2304
    a = torch.randn(T, n)
    a[torch.rand(T, n) > 0.08] = 0
    v = torch.randn(n, d)
    s = a.to_sparse_csr()
    dense, sparse = [], []
    for _ in range(3):
        t = time.perf_counter()
        a @ v
        dense.append(time.perf_counter() - t)
        t = time.perf_counter()
        s @ v
        sparse.append(time.perf_counter() - t)
    out = {"dense_s": statistics.median(dense[1:]), "csr_s": statistics.median(sparse[1:])}
    print(f"fp32 (2048 x 13824, 8% nonzero) @ (13824 x 2304): dense {out['dense_s']:.3f} s, CSR {out['csr_s']:.3f} s")
    return out


def chunked() -> dict:
    import sparkformer.model as M
    from sparkformer.config import get_preset

    orig = M.chunked_attention
    out = {}
    try:
        for kind in ("spark", "dense"):
            torch.manual_seed(0)
            cfg = get_preset("small", ffn="spark" if kind == "spark" else "geglu", attention=kind, max_seq_len=512)
            m = M.SparkLM(cfg)
            x = torch.randint(0, cfg.vocab_size, (8, 512))
            y = torch.randint(0, cfg.vocab_size, (8, 512))
            res: dict[int, list[float]] = {}
            for rep in range(3):
                for ch in (256, 10**9):  # chunks of 256 queries vs one chunk (the whole sequence)
                    M.chunked_attention = functools.partial(orig, chunk=ch)
                    t = time.perf_counter()
                    m(x, targets=y).loss.backward()
                    if rep:
                        res.setdefault(ch, []).append(time.perf_counter() - t)
            out[kind] = {"chunk_256_s": statistics.median(res[256]), "one_chunk_s": statistics.median(res[10**9])}
            print(f"{kind}: forward+backward, batch 8 x 512: chunks of 256 {out[kind]['chunk_256_s']:.2f} s, "
                  f"one chunk {out[kind]['one_chunk_s']:.2f} s", flush=True)
    finally:
        M.chunked_attention = orig
    return out


def interleaved_medians(parts: dict, rounds: int) -> dict[str, float]:
    """Seconds per call of each part: one warm-up round, then ``rounds`` rounds calling every part in turn."""
    times: dict[str, list[float]] = {p: [] for p in parts}
    for rep in range(rounds + 1):
        for p, f in parts.items():
            t = time.perf_counter()
            f()
            if rep:
                times[p].append(time.perf_counter() - t)
    return {p: statistics.median(ts) for p, ts in times.items()}


def prefill(T: int = 2048) -> dict:
    """Per part of one gemma2-2b layer's prefill, dense vs Spark, medians of 3 interleaved rounds. Random weights in
    the decode engines' layouts and scale (``init_std``), built here so the check depends only on the ops."""
    import torch.nn.functional as F

    from sparkformer.config import get_preset
    from sparkformer.ops.attn_prefill import prefill_attention, spark_prefill_attention
    from sparkformer.ops.spark_attn_decode import new_spark_cache, spark_cache_write
    from sparkformer.ops.spark_ffn_prefill import spark_ffn_prefill

    cfg = get_preset("gemma2-2b", n_layers=1)
    H, KV, hd, r = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
    d, n, rf = cfg.d_model, cfg.spark_ffn_dim, cfg.spark_ffn_rank
    out = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        g = torch.Generator().manual_seed(0)

        def rnd(*shape):
            return torch.empty(*shape, dtype=dt).normal_(0.0, cfg.init_std, generator=g)

        wg, wu, wd = rnd(3, cfg.ffn_dim, d)  # the dense engine's packed GeGLU layout
        k1, packed = rnd(n, rf), rnd(n, 2 * d - rf)  # the Spark engine's: K1 (n, r), then K2 | V rows side by side
        k2, vw = packed[:, : d - rf], packed[:, d - rf:]
        xn = torch.randn(T, d, generator=g).to(dt)
        q = torch.randn(H, T, hd, generator=g)
        k, v = torch.randn(KV, T, hd, generator=g), torch.randn(KV, T, hd, generator=g)
        cache = new_spark_cache(KV, T + 8, hd, r, dtype=dt)
        spark_cache_write(cache, 0, k.to(dt), v.to(dt))
        kw = dict(scale=cfg.attn_scale, window=cfg.window(0), cap=cfg.attn_logit_softcap)
        parts = {
            "dense_ffn": lambda: (F.gelu((xn @ wg.t()).float(), approximate="tanh") * (xn @ wu.t()).float()).to(dt)
            @ wd,
            "spark_ffn": lambda: spark_ffn_prefill(xn, k1, k2, vw, cfg.spark_ffn_fraction),
            "spark_ffn_predictor_gemm": lambda: xn[:, : k1.shape[1]] @ k1.t(),
            "dense_attention": lambda: prefill_attention(q, k, v, 0, kind="dense", **kw),
            "spark_attention_decode_steps": lambda: spark_prefill_attention(q, cache, 0, topk=cfg.spark_attn_topk,
                                                                            **kw),
            "spark_attention_training_form": lambda: prefill_attention(q, k, v, 0, kind="spark", rank=r,
                                                                       topk=cfg.spark_attn_topk, **kw),
        }
        out[name] = {p: t * 1e3 for p, t in interleaved_medians(parts, 3).items()}
        print(f"{name}, one layer, T = {T} (ms): " + ", ".join(f"{p} {v:.0f}" for p, v in out[name].items()),
              flush=True)
    return out


def attn(L: int = 4096, layers: int = 26) -> dict:
    """The Spark attention decode op at context L on the gemma2-2b attention shape, one cache per layer (cold, as in
    decode), with k = 256 (the real setting) and k = 16 (the same predictor pass and selection, ~no gathers): the
    difference is the cost of reading the kept keys' other half and values. Dense decode attention beside it."""
    from sparkformer.ops.dense_decode import dense_attn_decode
    from sparkformer.ops.spark_attn_decode import new_spark_cache, spark_attn_decode, spark_cache_write

    KV, H, hd, r = 4, 8, 256, 128
    out = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        g = torch.Generator().manual_seed(0)
        caches, dense = [], []
        def rows():
            return torch.randn(KV, L, hd, generator=g).to(dt)

        for _ in range(layers):
            c = new_spark_cache(KV, L + 64, hd, r, dtype=dt)
            spark_cache_write(c, 0, rows(), rows())
            caches.append(c)
            dense.append((rows(), rows()))
        q = torch.randn(H, hd, generator=g)

        def spark(k):
            for c in caches:
                spark_attn_decode(q, c.kp, c.kr, c.v, L, k, 0.0625, None, 50.0)

        def dense_all():
            for kk, vv in dense:
                dense_attn_decode(q, kk, vv, L, 0.0625, None, 50.0)

        parts = {"spark_k256": lambda: spark(256), "spark_k16": lambda: spark(16), "dense": dense_all}
        res = {p: t / layers * 1e6 for p, t in interleaved_medians(parts, 15).items()}
        kp_bytes = KV * L * r * (2 if dt == torch.bfloat16 else 4)
        gather_bytes = H * 256 * (hd - r + hd) * (2 if dt == torch.bfloat16 else 4)
        res["predictor_pass_gb_per_s"] = kp_bytes / (res["spark_k16"] * 1e-6) / 1e9
        res["gather_us"] = res["spark_k256"] - res["spark_k16"]
        res["gather_gb_per_s"] = gather_bytes / (res["gather_us"] * 1e-6) / 1e9 if res["gather_us"] > 0 else None
        out[name] = res
        print(f"{name}, per layer at {L}: spark k=256 {res['spark_k256']:.0f} us, k=16 {res['spark_k16']:.0f} us "
              f"(predictor pass + selection, {res['predictor_pass_gb_per_s']:.1f} GB/s), gathers {res['gather_us']:.0f}"
              f" us, dense {res['dense']:.0f} us", flush=True)
        del caches, dense
    return out


CHECKS = {"thp": thp, "csr": csr, "chunked": chunked, "prefill": prefill, "attn": attn}
DTYPES = {"thp": "bf16,fp32", "csr": "fp32", "chunked": "fp32", "prefill": "bf16,fp32", "attn": "bf16,fp32"}


def _rows(d: dict | list, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
        if isinstance(v, (dict, list)):
            rows += _rows(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def print_table(result: dict) -> None:
    print("| figure | value |\n|---|---:|")
    for k, v in _rows(result):
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")


def extension_state() -> dict:
    """Whether the C++ kernels were loaded (thp, prefill and attn time them; without them the torch paths run)."""
    from sparkformer.ops import _extension

    return {"available": _extension.available(), "isa": _extension.isa(), "error": _extension.error()}


def git_state() -> dict:
    """The commit measured and the files that differed from it (a shared working tree can be mid-change)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, check=True).stdout

    try:
        changed = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()]
        return {"head": git("rev-parse", "HEAD").strip(),
                "changed_files": [f for f in changed if f.startswith(("sparkformer/", "benchmarks/side_checks"))]}
    except (OSError, subprocess.CalledProcessError):
        return {}


def main(argv: list[str] | None = None) -> int:
    from sparkformer.bench.common import OUT_HELP, env_info, load_average, write_result

    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("check", choices=sorted(CHECKS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["SIDE_CHECKS_THREADS"] = str(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    t0 = time.perf_counter()
    result = CHECKS[args.check]()
    res = {"benchmark": "side_checks", "check": args.check,
           "command": "python benchmarks/side_checks.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "started_utc": started.isoformat(timespec="seconds"), "wall_s": round(time.perf_counter() - t0, 1),
           "load_average_before": load_before, "load_average_after": load_average(),
           "env": env_info(DTYPES[args.check]), "extension": extension_state(), "git": git_state(),
           "result": result}
    print_table(result)
    if not args.no_save:
        print(f"wrote {write_result(f'side_checks_{args.check}', res, args.out)}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_thp_child"]:
        torch.set_num_threads(int(os.environ.get("SIDE_CHECKS_THREADS", "2")))
        print(json.dumps(thp_child()))
        sys.exit(0)
    sys.exit(main())
