"""Quality study (issue #3): dense vs Spark FFN vs Spark FFN + attention vs the top-k ablation, same data and budget.

    python benchmarks/quality.py                              # the full study (see docs/quality-study.md)
    python benchmarks/quality.py --preset small --seq-len 512 --batch-size 16 --spark-attn-topk 64 \
        --budget-tokens 2000000 --threads 2                   # the same, spelled out
    python benchmarks/quality.py --quick                      # smoke test: tiny preset, 30 steps per variant

Four variants are trained through ``sparkformer.train.train`` with one TrainConfig that differs only in the model's
``ffn`` / ``attention`` kinds (same seed, so the same batches in the same order; same parameter count):

    dense               GeGLU FFN + dense attention
    spark_ffn           Spark FFN (predictor split + statistical top-k) + dense attention
    spark               Spark FFN + Spark attention
    topk_no_predictor   ffn=topk: GELU(statistical top-k(K x)), no predictor split (the paper's top-k ablation),
                        dense attention -- compare with spark_ffn

Then, for each final model, one pass over the trainer's own val windows measures per layer the fraction of FFN
neurons nonzero and, per query row, the keys kept (histograms: mean, rows with at most k, keys dropped); the
Spark model is evaluated a second time with the decode kernels' hard cap (best k of the survivors). Finally a
training step (forward + backward + clip + AdamW, the study's batch) of every variant and of the Spark model with
exact ``torch.topk`` is timed interleaved (A B C D E, repeated).

Resumable: each variant trains in ``<out-dir>/<variant>``; a finished run is reused, an interrupted one (Ctrl-C,
SIGTERM, ``--stop-after``) continues from its latest checkpoint when the same command is run again. A run folder
trained with other settings is refused (choose another ``--out-dir``).

Writes ``benchmarks/results/quality.json`` (atomically, with the machine, threads and versions) and a loss-curve
PNG, prints a table and ends with one JSON line. ``--quick`` writes into ``<out-dir>`` instead (not a result).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparkformer.bench.common import env_info, summary, time_interleaved, write_result
from sparkformer.config import PRESETS
from sparkformer.data import BatchSampler, TokenData, default_data_dir, eval_windows, prepare
from sparkformer.model import SparkLM, attention_mask, spark_attention
from sparkformer.checkpoint import latest_checkpoint, load_checkpoint
from sparkformer.train import train
from sparkformer.train_config import TrainConfig, resolve_model_config

REPO = Path(__file__).resolve().parents[1]

# name -> (ffn kind, attention kind, topk_method)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "dense": ("geglu", "dense", "statistical"),
    "spark_ffn": ("spark", "dense", "statistical"),
    "spark": ("spark", "spark", "statistical"),
    "topk_no_predictor": ("topk", "dense", "statistical"),
}
TIMED_EXTRA = {"spark_exact_topk": ("spark", "spark", "exact")}  # timed only, not trained

# the targets
LOSS_TOL = 0.02  # spark final val loss within 2% of dense
FFN_BAND = 0.01  # achieved FFN activity = spark_ffn_fraction +/- 1 point, every layer, after warmup
ROWS_AT_MOST_K = 0.99  # keys kept <= k on at least 99% of query rows
STEP_RATIO = 1.3  # spark training step <= 1.3x dense


class Interrupted(Exception):
    """A training run stopped early (signal or --stop-after); rerun the same command to continue."""


# ---- settings --------------------------------------------------------------------------------------------------
def settings_from_args(args: argparse.Namespace) -> dict:
    """Everything that defines the study (the same for every variant)."""
    if args.quick:
        d = dict(preset="tiny", seq_len=128, batch_size=8, budget_tokens=None, spark_attn_topk=32,
                 eval_iters=2, eval_interval=10, log_interval=1, time_repeats=2)  # budget: 30 steps
    else:
        d = dict(preset="small", seq_len=512, batch_size=16, budget_tokens=2_000_000, spark_attn_topk=64,
                 eval_iters=4, eval_interval=None, log_interval=5, time_repeats=5)
    for k in d:  # explicit command-line values win over the mode's defaults
        v = getattr(args, k, None)
        if v is not None:
            d[k] = v
    if d["budget_tokens"] is None:
        d["budget_tokens"] = 30 * d["batch_size"] * d["seq_len"]
    if d["preset"] not in PRESETS or d["preset"].endswith(("-dense", "-spark")):
        raise SystemExit(f"--preset {d['preset']!r}: give a base preset (the variants set ffn/attention): "
                         f"{', '.join(sorted(p for p in PRESETS if not p.endswith(('-dense', '-spark'))))}")
    steps = max(1, math.ceil(d["budget_tokens"] / (d["batch_size"] * d["seq_len"])))
    d["steps"] = steps
    d["warmup_steps"] = args.warmup_steps if args.warmup_steps is not None else max(1, min(200, steps // 10))
    if d["eval_interval"] is None:
        d["eval_interval"] = max(1, steps // 8)
    d["checkpoint_interval"] = max(1, steps // (2 if args.quick else 10))
    d.update(lr=args.lr, min_lr=args.lr / 10, spark_ffn_fraction=args.ffn_fraction, seed=args.seed,
             grad_accum=args.grad_accum, data_dir=str(args.data_dir) if args.data_dir else None)
    return d


def model_spec(s: dict, variant: str) -> dict:
    ffn, attn, method = {**VARIANTS, **TIMED_EXTRA}[variant]
    preset_len = PRESETS[s["preset"]]["max_seq_len"]
    return {"preset": s["preset"], "ffn": ffn, "attention": attn, "topk_method": method,
            "spark_attn_topk": s["spark_attn_topk"], "spark_ffn_fraction": s["spark_ffn_fraction"],
            "max_seq_len": max(preset_len, s["seq_len"])}


def train_config(s: dict, variant: str, out_dir: Path, stop_after: int | None, progress: bool) -> TrainConfig:
    return TrainConfig(
        model=model_spec(s, variant), data_dir=s["data_dir"], out_dir=str(out_dir / variant),
        batch_size=s["batch_size"], seq_len=s["seq_len"], grad_accum=s["grad_accum"],
        lr=s["lr"], min_lr=s["min_lr"], warmup_steps=s["warmup_steps"], max_tokens=s["budget_tokens"],
        eval_interval=s["eval_interval"], eval_iters=s["eval_iters"], log_interval=s["log_interval"],
        checkpoint_interval=s["checkpoint_interval"], keep_checkpoints=1, seed=s["seed"], stop_after=stop_after,
        progress=progress)


_RUN_ONLY = {"progress", "stop_after", "overwrite"}  # may differ between sessions of the same run


def run_variant(cfg: TrainConfig, vocab_size: int, tokenizer_sha: str) -> str:
    """Train a variant, continue an interrupted run, or reuse a finished one. Returns 'trained' | 'resumed' |
    'reused'. Raises ``Interrupted`` when the run stopped early."""
    out = Path(cfg.out_dir)
    ck = latest_checkpoint(out)
    if ck is None:
        res, how = train(cfg), "trained"
    else:
        saved = json.loads((ck / "config.json").read_text())
        now = cfg.to_dict()
        diff = {k: (saved["train"].get(k), v) for k, v in now.items()
                if k not in _RUN_ONLY and saved["train"].get(k) != v}
        mc = resolve_model_config(cfg.model, vocab_size, cfg.seq_len).to_dict()
        if saved["model"] != mc:
            diff["model"] = {k: (saved["model"].get(k), v) for k, v in mc.items() if saved["model"].get(k) != v}
        if saved.get("tokenizer_sha256") != tokenizer_sha:
            diff["tokenizer_sha256"] = (saved.get("tokenizer_sha256"), tokenizer_sha)
        if diff:
            raise SystemExit(f"{out} holds a run with other settings (saved, now): {diff}; use another --out-dir "
                             "or delete that folder")
        step = json.loads((ck / "state.json").read_text())["step"]
        if step >= cfg.total_steps:
            print(f"[{out.name}] reusing the finished run ({step} steps) in {out}", file=sys.stderr)
            return "reused"
        print(f"[{out.name}] continuing from step {step} of {cfg.total_steps}", file=sys.stderr)
        res, how = train(cfg, resume=True), "resumed"
    if res["interrupted"]:
        raise Interrupted(f"{out.name} stopped at step {res['step']} of {cfg.total_steps}")
    return how


# ---- metrics from a run folder -----------------------------------------------------------------------------------
def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in recs if r["kind"] == "train"], [r for r in recs if r["kind"] == "eval"]


def train_summary(out: Path, s: dict) -> dict:
    tr, ev = read_metrics(out)
    tokens_per_step = s["batch_size"] * s["seq_len"]
    after = [r for r in tr if r["step"] > s["warmup_steps"]] or tr
    layers = len(tr[-1]["ffn_activity"])
    per_layer = []
    for i in range(layers):
        vals = [r["ffn_activity"][i] for r in after if r["ffn_activity"][i] is not None]
        per_layer.append({"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)} if vals else None)
    # wall time over sessions: elapsed_s restarts at 0 when a run is resumed
    wall, seg = 0.0, 0.0
    for r in tr:
        if r["elapsed_s"] < seg:
            wall += seg
        seg = r["elapsed_s"]
    wall += seg
    step_s = [tokens_per_step / r["tokens_per_s"] for r in tr if r["step"] > 1]
    return {
        "steps": tr[-1]["step"],
        "tokens": tr[-1]["tokens"],
        "final_train_loss": tr[-1]["loss"],
        "final_val_loss": ev[-1]["val_loss_mean"],
        "final_val_loss_per_domain": ev[-1]["val_loss"],
        "ffn_activity_train_after_warmup": per_layer,
        "train_wall_s": wall,
        "train_step_s_median_in_run": statistics.median(step_s) if step_s else None,
        "curve": {"train": [[r["tokens"], r["loss"]] for r in tr],
                  "val": [[r["step"] * tokens_per_step, r["val_loss_mean"]] for r in ev],
                  "ffn_activity": [[r["tokens"], _mean(r["ffn_activity"])] for r in tr]},
    }


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


# ---- eval pass: per-layer FFN activity and keys per query ------------------------------------------------------------
class _LayerRecorder:
    def __init__(self, seq_len: int, k: int):
        self.k = k
        self.ffn_nonzero = self.ffn_total = 0
        self.rows = self.rows_eligible = self.rows_at_most_k = 0
        self.kept_sum = self.valid_sum = 0
        self.hist_eligible = np.zeros(seq_len + 1, dtype=np.int64)  # keys kept, rows with more than k valid keys

    def ffn(self, a: torch.Tensor) -> None:
        self.ffn_nonzero += int((a != 0).sum())
        self.ffn_total += a.numel()

    def keys(self, kept: torch.Tensor, valid: torch.Tensor) -> None:
        """kept (..., T) keys kept per query row; valid (T,) valid keys per query position."""
        valid = valid.expand_as(kept)
        elig = valid > self.k
        self.rows += kept.numel()
        self.rows_eligible += int(elig.sum())
        self.rows_at_most_k += int((kept <= self.k).sum())
        self.kept_sum += int(kept.sum())
        self.valid_sum += int(valid.sum())
        self.hist_eligible += np.bincount(kept[elig].flatten().numpy(), minlength=len(self.hist_eligible))[
            : len(self.hist_eligible)]

    def result(self, sparse_attn: bool) -> dict:
        h = self.hist_eligible
        cum = np.cumsum(h)

        def pct(q):
            return int(np.searchsorted(cum, q * cum[-1])) if cum[-1] else None

        return {
            "ffn_activity": self.ffn_nonzero / max(1, self.ffn_total),
            "attention": "spark" if sparse_attn else "dense",
            "keys_per_query": self.kept_sum / max(1, self.rows),
            "valid_keys_per_query": self.valid_sum / max(1, self.rows),
            "keys_dropped_fraction": 1.0 - self.kept_sum / max(1, self.valid_sum),
            "rows_more_than_k_valid": self.rows_eligible / max(1, self.rows),
            "rows_at_most_k": self.rows_at_most_k / max(1, self.rows),
            "rows_at_most_k_of_eligible": 1.0 - (self.rows - self.rows_at_most_k) / max(1, self.rows_eligible),
            "kept_eligible_mean": float((h * np.arange(len(h))).sum() / max(1, h.sum())),
            "kept_eligible_p50": pct(0.5),
            "kept_eligible_p99": pct(0.99),
            "kept_eligible_max": int(np.flatnonzero(h).max()) if h.any() else None,
        }


@torch.no_grad()
def eval_pass(model: SparkLM, data: TokenData, cfg: TrainConfig, hard_cap: bool = False) -> dict:
    """Loss and sparsity over the trainer's val windows (same windows as its final evaluation)."""
    mc = model.config
    k = mc.spark_attn_topk
    recs = [_LayerRecorder(cfg.seq_len, k) for _ in model.layers]
    hooks, restore = [], []
    for block, rec in zip(model.layers, recs):
        hooks.append(block.ffn.down_proj.register_forward_pre_hook(lambda m, inp, rec=rec: rec.ffn(inp[0])))
        attn = block.attn
        if attn.kind == "spark":
            def _spark(q, kk, v, mask, attn=attn, rec=rec):
                out, kept = spark_attention(q, kk, v, mask, attn.rank, attn.topk, attn.scale, attn.cap, attn.exact,
                                            hard_cap)
                rec.keys(kept, mask.sum(-1))
                return out

            attn._spark = _spark
            restore.append(attn)
        else:
            def _dense(m, inp, out, rec=rec):
                B, T = inp[0].shape[:2]
                valid = attention_mask(T, T, 0, m.window, "cpu").sum(-1)
                rec.keys(valid.expand(B, m.n_heads, T), valid)

            hooks.append(attn.register_forward_hook(_dense))
    model.eval()
    global_bs = cfg.eval_batch_size or cfg.batch_size // cfg.grad_accum
    losses = {}
    try:
        for domain in data.domains("val"):
            toks = data.tokens("val", domain)
            starts = eval_windows(toks, cfg.seq_len, count=cfg.eval_iters * global_bs)
            nll, n = 0.0, 0
            for i in range(0, len(starts), global_bs):
                chunk = starts[i: i + global_bs]
                x = torch.from_numpy(np.stack([toks[s: s + cfg.seq_len] for s in chunk]).astype(np.int64))
                y = torch.from_numpy(np.stack([toks[s + 1: s + cfg.seq_len + 1] for s in chunk]).astype(np.int64))
                nll += float(model(x, targets=y).loss) * y.numel()
                n += y.numel()
            if n:
                losses[domain] = nll / n
    finally:
        for h in hooks:
            h.remove()
        for attn in restore:
            del attn._spark  # back to the class method
    layers = [r.result(b.attn.kind == "spark") for r, b in zip(recs, model.layers)]
    rows = sum(r.rows for r in recs)
    return {
        "val_loss_mean": sum(losses.values()) / len(losses),
        "val_loss": losses,
        "ffn_activity": statistics.fmean(x["ffn_activity"] for x in layers),
        "keys_per_query": sum(r.kept_sum for r in recs) / max(1, rows),
        "valid_keys_per_query": sum(r.valid_sum for r in recs) / max(1, rows),
        "rows_at_most_k": sum(r.rows_at_most_k for r in recs) / max(1, rows),
        "rows_more_than_k_valid": sum(r.rows_eligible for r in recs) / max(1, rows),
        "keys_dropped_fraction": 1.0 - sum(r.kept_sum for r in recs) / max(1, sum(r.valid_sum for r in recs)),
        "per_layer": layers,
    }


# ---- timing ----------------------------------------------------------------------------------------------------
def time_steps(s: dict, data: TokenData, cfg: TrainConfig, repeats: int) -> tuple[dict, dict]:
    """Interleaved training-step times (forward + backward + clip + AdamW on the study's step-0 batch)."""
    sampler = BatchSampler(data, s["seq_len"], s["batch_size"], s["seed"])
    micro = s["batch_size"] // s["grad_accum"]
    batches = []
    for m in range(s["grad_accum"]):
        x, y = sampler.batch(0, rows=slice(m * micro, (m + 1) * micro))
        batches.append((torch.from_numpy(x), torch.from_numpy(y)))
    fns, params = {}, {}
    cpu: dict[str, list[float]] = {}
    for name in list(VARIANTS) + list(TIMED_EXTRA):
        cpu[name] = []
        mc = resolve_model_config(model_spec(s, name), data.vocab_size, s["seq_len"])
        torch.manual_seed(s["seed"])
        model = SparkLM(mc).train()
        opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
        params[name] = model.num_parameters()

        def step(model=model, opt=opt):
            for x, y in batches:
                (model(x, targets=y).loss / len(batches)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[name] = _cpu_timed(step, cpu[name])
    load0 = os.getloadavg()[0]
    times = time_interleaved(fns, repeats=repeats, warmup=1)
    info = {"batch": [s["batch_size"], s["seq_len"]], "repeats": repeats, "params": params,
            "threads": torch.get_num_threads(), "loadavg_1min_before": load0,
            "loadavg_1min_after": os.getloadavg()[0],
            # process CPU seconds per step (all threads); on a busy machine wall >> cpu / threads
            "cpu_s": {k: summary(v[1:]) for k, v in cpu.items()}}  # [0] is the warmup call
    return {k: summary(v) for k, v in times.items()}, info


def _cpu_timed(fn, out: list):
    def run():
        c = time.process_time()
        fn()
        out.append(time.process_time() - c)

    return run


# ---- plot ------------------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    s = result["settings"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for name, v in result["variants"].items():
        c = colors.get(name)
        tr = np.array(v["curve"]["train"], dtype=float)
        if len(tr):
            alpha, ema, sm = 0.9, None, []
            for x in tr[:, 1]:
                ema = x if ema is None else alpha * ema + (1 - alpha) * x
                sm.append(ema)
            axes[0].plot(tr[:, 0] / 1e6, sm, label=name, color=c)
        va = np.array(v["curve"]["val"], dtype=float)
        if len(va):
            axes[1].plot(va[:, 0] / 1e6, va[:, 1], marker="o", ms=3, label=name, color=c)
        fa = [(t, a) for t, a in v["curve"]["ffn_activity"] if a is not None]
        if fa:
            fa = np.array(fa, dtype=float)
            axes[2].plot(fa[:, 0] / 1e6, fa[:, 1] * 100, label=name, color=c)
    f = s["spark_ffn_fraction"] * 100
    axes[2].axhspan(f - FFN_BAND * 100, f + FFN_BAND * 100, color="grey", alpha=0.2, label="target ±1 pt")
    axes[0].set(title="train loss (EMA 0.9)", xlabel="tokens (M)", ylabel="loss")
    axes[1].set(title="val loss (mean over domains)", xlabel="tokens (M)", ylabel="loss")
    axes[2].set(title="FFN neurons active (mean over layers)", xlabel="tokens (M)", ylabel="%")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    va_all = [p for v in result["variants"].values() for p in v["curve"]["val"]]
    late = [y for t, y in va_all if t >= 0.25 * s["budget_tokens"]] or [y for _, y in va_all]
    if late:  # the interesting part: past the first quarter of the budget
        lo, hi = min(late), max(late)
        pad = max(0.05 * (hi - lo), 0.01)
        axes[1].set_ylim(lo - pad, hi + pad)
    fig.suptitle(f"{s['preset']} preset, {s['budget_tokens']:,} tokens per variant, batch {s['batch_size']} x "
                 f"{s['seq_len']}, k_attn {s['spark_attn_topk']}, seed {s['seed']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---- targets ---------------------------------------------------------------------------------------------------
def check_targets(res: dict) -> dict:
    v, t = res["variants"], res["timing"]
    f = res["settings"]["spark_ffn_fraction"]
    k = res["settings"]["spark_attn_topk"]
    out = {}
    d, sp = v["dense"]["final_val_loss"], v["spark"]["final_val_loss"]
    out["spark_val_loss_within_2pct_of_dense"] = {"value": sp / d - 1, "limit": LOSS_TOL, "met": sp / d - 1 <= LOSS_TOL}
    for name in ("spark_ffn", "spark", "topk_no_predictor"):
        layers = v[name]["ffn_activity_train_after_warmup"]
        means = [x["mean"] for x in layers]
        worst = max(abs(m - f) for m in means)
        out[f"ffn_activity_every_layer_within_1pt/{name}"] = {
            "value": means, "worst_deviation": worst, "limit": [f - FFN_BAND, f + FFN_BAND],
            "met": worst <= FFN_BAND + 1e-12}
    rows = [x["rows_at_most_k"] for x in v["spark"]["eval"]["per_layer"] if x["attention"] == "spark"]
    out["spark_keys_at_most_k_on_99pct_rows"] = {"value": min(rows), "per_layer": rows, "k": k,
                                                 "limit": ROWS_AT_MOST_K, "met": min(rows) >= ROWS_AT_MOST_K}
    ratio = t["spark"]["median"] / t["dense"]["median"]
    out["spark_step_at_most_1.3x_dense"] = {"value": ratio, "limit": STEP_RATIO, "met": ratio <= STEP_RATIO}
    ex = t["spark_exact_topk"]["median"] / t["spark"]["median"]
    out["statistical_step_faster_than_exact"] = {"value": ex, "limit": 1.0, "met": ex > 1.0,
                                                 "note": "exact / statistical step time"}
    return out


# ---- the study -------------------------------------------------------------------------------------------------
def run_study(args: argparse.Namespace) -> dict:
    s = settings_from_args(args)
    out_dir = Path(args.out_dir or ("runs/quality-quick" if args.quick else "runs/quality")).expanduser()
    if s["data_dir"] is None:
        prepare(quiet=True)
        data_path = default_data_dir()
    else:
        data_path = Path(s["data_dir"]).expanduser()
    data = TokenData(data_path)
    sha = data.manifest["tokenizer_sha256"]
    t_start = time.time()
    print(f"quality study: {s['preset']} preset, {s['budget_tokens']:,} tokens = {s['steps']} steps x "
          f"{s['batch_size']} x {s['seq_len']}, k_attn {s['spark_attn_topk']}, out {out_dir}", file=sys.stderr)

    cfgs = {name: train_config(s, name, out_dir, args.stop_after, not args.quiet) for name in VARIANTS}
    how = {}
    for name, cfg in cfgs.items():
        print(f"[{name}] ffn={VARIANTS[name][0]} attention={VARIANTS[name][1]}", file=sys.stderr)
        how[name] = run_variant(cfg, data.vocab_size, sha)

    variants = {}
    for name, cfg in cfgs.items():
        out = Path(cfg.out_dir)
        model, info = load_checkpoint(out)
        summ = train_summary(out, s)
        ev = eval_pass(model, data, cfg)
        row = {"ffn": VARIANTS[name][0], "attention": VARIANTS[name][1], "params": model.num_parameters(),
               "run": how[name], "out_dir": str(out), **summ,
               "ffn_activity": ev["ffn_activity"], "keys_per_query": ev["keys_per_query"], "eval": ev}
        if VARIANTS[name][1] == "spark":
            capped = eval_pass(model, data, cfg, hard_cap=True)
            row["eval_hard_cap"] = {k: capped[k] for k in ("val_loss_mean", "val_loss", "keys_per_query",
                                                           "rows_at_most_k", "keys_dropped_fraction")}
        variants[name] = row
        print(f"[{name}] val loss {summ['final_val_loss']:.4f} (eval pass {ev['val_loss_mean']:.4f}), "
              f"FFN active {ev['ffn_activity']:.2%}, keys/query {ev['keys_per_query']:.1f}", file=sys.stderr)

    print(f"timing a training step ({s['time_repeats']} interleaved rounds) ...", file=sys.stderr)
    timing, tinfo = time_steps(s, data, cfgs["dense"], s["time_repeats"])
    for name in variants:
        variants[name]["step_time_s"] = timing[name]["median"]
        variants[name]["step_time"] = timing[name]

    res = {
        "benchmark": "quality",
        "issue": 3,
        "quick": bool(args.quick),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd())] + args.argv),
        "env": env_info("float32"),
        "settings": {**s, "data_dir": str(data_path), "tokenizer_sha256": sha, "vocab_size": data.vocab_size,
                     "train_tokens_available": data.num_tokens("train"), "out_dir": str(out_dir),
                     "model": {k: v for k, v in model_spec(s, "spark").items() if k not in ("ffn", "attention")},
                     "variants": {n: {"ffn": f, "attention": a} for n, (f, a, _) in VARIANTS.items()}},
        "variants": variants,
        "timing": timing,
        "timing_info": tinfo,
        "wall_s_this_session": time.time() - t_start,
    }
    res["targets"] = check_targets(res)
    return res


def retime(args: argparse.Namespace, rpath: Path) -> dict:
    """--timing-only: time the training steps on this machine and put them into an existing result file (trained
    elsewhere, e.g. on a lent GPU); the training machine's own timing is kept under ``timing_training_machine``."""
    if not rpath.is_file():
        raise SystemExit(f"--timing-only needs an existing result file; {rpath} does not exist (run the study first)")
    res = json.loads(rpath.read_text())
    s = dict(res["settings"])
    data_path = Path(args.data_dir).expanduser() if args.data_dir else None
    if data_path is None:
        prepare(quiet=True)
        data_path = default_data_dir()
    data = TokenData(data_path)
    if data.manifest["tokenizer_sha256"] != s["tokenizer_sha256"]:
        raise SystemExit(f"{data_path}: its tokenizer differs from the one the study trained with; pass --data-dir "
                         "with the study's data")
    if args.time_repeats:
        s["time_repeats"] = args.time_repeats
    s["data_dir"] = str(data_path)
    cfg = train_config(s, "dense", Path(res["settings"]["out_dir"]), None, False)
    print(f"timing a training step ({s['time_repeats']} interleaved rounds) on this machine ...", file=sys.stderr)
    timing, tinfo = time_steps(s, data, cfg, s["time_repeats"])
    if "timing_training_machine" not in res:
        res["timing_training_machine"] = {"env": res["env"], "timing": res["timing"], "timing_info": res["timing_info"]}
    res["training_env"] = res.get("training_env", res["env"])
    res["env"] = env_info("float32")
    res["timing"], res["timing_info"] = timing, tinfo
    for name, v in res["variants"].items():
        v["step_time_s"], v["step_time"] = timing[name]["median"], timing[name]
    res["timing_command"] = "python " + " ".join(shlex.quote(a) for a in
                                                 [os.path.relpath(__file__, Path.cwd())] + args.argv)
    res["targets"] = check_targets(res)
    return res


def print_table(res: dict) -> None:
    s, e = res["settings"], res["env"]
    print(f"{e['cpu']}, {e['threads']} threads, torch {e['torch']}, fp32; "
          f"load {res['timing_info']['loadavg_1min_before']:.1f}")
    print(f"{s['preset']} preset, {s['budget_tokens']:,} tokens ({s['steps']} steps x {s['batch_size']} x "
          f"{s['seq_len']}), k_attn {s['spark_attn_topk']}, FFN fraction {s['spark_ffn_fraction']:.0%}, "
          f"seed {s['seed']}")
    hdr = (f"{'variant':18s} {'params':>9s} {'tokens':>10s} {'val loss':>9s} {'vs dense':>9s} {'FFN act':>8s} "
           f"{'keys/q':>7s} {'rows<=k':>8s} {'step s':>8s} {'(min-max)':>13s}")
    print(hdr)
    d = res["variants"]["dense"]["final_val_loss"]
    for name, v in res["variants"].items():
        t = v["step_time"]
        print(f"{name:18s} {v['params']:>9,} {v['tokens']:>10,} {v['final_val_loss']:>9.4f} "
              f"{v['final_val_loss'] / d - 1:>+8.2%} {v['ffn_activity']:>8.2%} {v['keys_per_query']:>7.1f} "
              f"{v['eval']['rows_at_most_k']:>8.2%} {t['median']:>8.3f} {t['min']:>6.3f}-{t['max']:<6.3f}")
    t = res["timing"]["spark_exact_topk"]
    print(f"{'spark, exact topk':18s} {'':>9s} {'':>10s} {'':>9s} {'':>9s} {'':>8s} {'':>7s} {'':>8s} "
          f"{t['median']:>8.3f} {t['min']:>6.3f}-{t['max']:<6.3f}")
    sp = res["variants"]["spark"]
    print("spark attention per layer: keys/query | valid keys/query | dropped | rows with > k valid | rows <= k | "
          "kept p50/p99 of those rows")
    for i, L in enumerate(sp["eval"]["per_layer"]):
        if L["attention"] == "spark":
            print(f"  layer {i}: {L['keys_per_query']:6.1f} | {L['valid_keys_per_query']:6.1f} | "
                  f"{L['keys_dropped_fraction']:6.1%} | {L['rows_more_than_k_valid']:6.1%} | {L['rows_at_most_k']:6.1%}"
                  f" | {L['kept_eligible_p50']}/{L['kept_eligible_p99']}")
    hc = sp["eval_hard_cap"]
    print(f"  with the decode hard cap: rows <= k {hc['rows_at_most_k']:.2%}, val loss {hc['val_loss_mean']:.4f} "
          f"(no cap {sp['eval']['val_loss_mean']:.4f})")
    for name in ("spark_ffn", "spark", "topk_no_predictor"):
        layers = res["variants"][name]["ffn_activity_train_after_warmup"]
        print(f"FFN activity after warmup, {name}: " + " ".join(
            f"{x['mean']:.2%}[{x['min']:.1%},{x['max']:.1%}]" for x in layers))
    print("targets:")
    for k, tg in res["targets"].items():
        val = tg["value"]
        val = f"{val:.4g}" if isinstance(val, float) else ", ".join(f"{x:.4g}" for x in val)
        print(f"  {'met ' if tg['met'] else 'MISS'} {k}: {val} (limit {tg['limit']})")


def summary_line(res: dict, path: Path | None, plot_path: Path | None) -> dict:
    return {
        "benchmark": "quality", "quick": res["quick"], "results": str(path) if path else None,
        "plot": str(plot_path) if plot_path else None,
        "settings": {k: res["settings"][k] for k in ("preset", "budget_tokens", "steps", "batch_size", "seq_len",
                                                     "spark_attn_topk")},
        "variants": {n: {k: v[k] for k in ("params", "tokens", "final_val_loss", "ffn_activity", "keys_per_query",
                                           "step_time_s")} for n, v in res["variants"].items()},
        "spark_exact_topk_step_time_s": res["timing"]["spark_exact_topk"]["median"],
        "targets_met": {k: t["met"] for k, t in res["targets"].items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny preset, ~30 steps per variant")
    p.add_argument("--preset", default=None, help="base model preset (default: small; tiny with --quick)")
    p.add_argument("--budget-tokens", type=int, default=None, help="training tokens per variant (default 2000000)")
    p.add_argument("--seq-len", type=int, default=None, help="context of every training sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step (default 16)")
    p.add_argument("--spark-attn-topk", type=int, default=None, help="k keys per query (default 64)")
    p.add_argument("--ffn-fraction", type=float, default=0.08, help="target fraction of FFN neurons active")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine to lr/10)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of the steps, at most 200")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--eval-iters", type=int, default=None, help="val batches per domain per evaluation")
    p.add_argument("--eval-interval", type=int, default=None, help="steps between evaluations (default steps/8)")
    p.add_argument("--log-interval", type=int, default=None)
    p.add_argument("--time-repeats", type=int, default=None, help="interleaved timing rounds (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="prepared data folder (default: the default corpus)")
    p.add_argument("--out-dir", default=None, help="run folders (default runs/quality, runs/quality-quick)")
    p.add_argument("--results", default=None,
                   help="result JSON (default benchmarks/results/quality.json; <out-dir>/quality.json with --quick)")
    p.add_argument("--plot", default=None,
                   help="loss-curve PNG (default docs/img/quality-loss.png; <out-dir>/quality-loss.png with --quick)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop each run after this step, as an interruption would (rerun to continue)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--timing-only", action="store_true",
                   help="only time the training steps on this machine and update the existing result file")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.timing_only:
            rpath = Path(args.results) if args.results else REPO / "benchmarks" / "results" / "quality.json"
            res = retime(args, rpath)
            path = write_result(rpath.stem, res, rpath.parent)
            print_table(res)
            print(json.dumps(summary_line(res, path, None)))
            return 0
        res = run_study(args)
    except Interrupted as e:
        print(f"quality study interrupted: {e}; run the same command again to continue", file=sys.stderr)
        return 3
    finally:
        torch.set_num_threads(threads)
    out_dir = Path(res["settings"]["out_dir"])
    if args.results:
        rpath = Path(args.results)
    else:
        rpath = out_dir / "quality.json" if args.quick else REPO / "benchmarks" / "results" / "quality.json"
    if args.plot:
        ppath = Path(args.plot)
    else:
        ppath = out_dir / "quality-loss.png" if args.quick else REPO / "docs" / "img" / "quality-loss.png"
    res["plot"] = str(ppath)
    ppath = plot(res, ppath)
    path = write_result(rpath.stem, res, rpath.parent)
    print_table(res)
    print(json.dumps(summary_line(res, path, ppath)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
