"""What ``docs/results.md`` quotes, as functions of its result files: each table's rows, rounded as printed, and the
sentences of prose that carry fixed figures. ``sparkformer.bench.results_doc`` compares them with the document.

Sources are result files under ``benchmarks/results/`` (measurements, each with hardware, threads, dtype and
versions), the brick analyses' ``results.json`` under ``docs/bricks*/`` (written by ``sparkformer bricks analyze
--out docs/bricks``), and ``sparkformer.flops`` for the analytic FLOPs/bytes table (a formula, not a measurement:
the check recomputes it from the code, so it cannot drift from ``sparkformer flops``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DOC = Path("docs") / "results.md"
RESULTS = "benchmarks/results/"
FLOPS_SOURCE = "sparkformer.flops"

Loader = Callable[[str], dict]
Rows = list[list[str]]  # header, then body rows (the |---| line is derived from the header's alignment)


@dataclass
class Table:
    sources: tuple[str, ...]
    align: str  # one character per column: "l" (---) or "r" (---:)
    render: Callable[[Loader], Rows]


# ---- formatting (as printed in the document) -------------------------------------------------------------------

def f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def bold(s: str) -> str:
    return f"**{s}**"


def pct(x: float, nd: int = 1, sign: bool = False) -> str:
    s = f"{100 * x:{'+' if sign else ''}.{nd}f}%"
    return s.replace("-", "\u2212") if sign else s


def rng(r: dict, nd: int = 0) -> str:
    return f"{r['min']:.{nd}f}\u2013{r['max']:.{nd}f}"


def run_of(d: dict, dtype: str, context: int | None = None, **match) -> dict:
    for r in d["runs"]:
        if r["dtype"] == dtype and (context is None or r.get("context") == context) and all(
                r.get(k) == v for k, v in match.items()):
            return r
    raise KeyError(f"no run dtype={dtype} context={context} {match}")


def meas_over_ideal(r: dict) -> float:
    return r.get("measured_over_ideal", r["speedup"] / r["ideal_speedup"])


# ---- the tables --------------------------------------------------------------------------------------------------

def _flops(load: Loader) -> Rows:
    from sparkformer.config import get_preset
    from sparkformer.flops import compare

    cfg = get_preset("gemma2-2b")
    rows = [["context", "FLOPs ratio (with LM head)", "FLOPs ratio (no LM head)",
             "bytes read ratio = ideal decode speedup", "FFN bytes ratio", "KV bytes ratio"]]
    for L in (512, 2048, 4096, 8192):
        c = compare(cfg, L, "bf16")
        rows.append([str(L)] + [f(c[k]) + "x" for k in ("flops_ratio", "flops_ratio_no_head", "ideal_decode_speedup",
                                                          "ideal_ffn_speedup", "ideal_attention_speedup")])
    return rows


def _topk_ops(load: Loader) -> Rows:
    d = load(RESULTS + "topk.json")
    rows_, width = d["ffn_shape"]
    heads, q, k = d["attn_shape"]

    def ms(s: dict, with_range: bool = True) -> str:
        return f"{1e3 * s['median']:.0f} ms" + (f" ({1e3 * s['min']:.0f}\u2013{1e3 * s['max']:.0f})" if with_range
                                                else "")

    return [["input", "statistical top-k", "exact `torch.topk`", "stat vs exact"],
            [f"FFN predictor output {rows_} x {width}, {100 * d['ffn_fraction']:.0f}% kept ({d['ffn_kept_mean']:.0f} "
             f"kept vs target {d['ffn_fraction'] * width:.0f})", ms(d["ffn_stat_s"]), ms(d["ffn_exact_s"]),
             bold(f(d["stat_vs_exact_speedup"]) + "x")],
            [f"attention scores {heads} x {q} x {k}, causal mask, k = {d['attn_k']} "
             f"({d['attn_kept_mean_full_rows']:.1f} kept on full rows)", ms(d["attn_stat_s"], False),
             ms(d["attn_exact_s"], False), f(d["attn_stat_vs_exact_speedup"]) + "x"]]


def _topk_step(load: Loader) -> Rows:
    d = load(RESULTS + "topk.json")
    ms = lambda s: f"{1e3 * s['median']:.0f} ms"  # noqa: E731
    return [[f"training step, `{d['preset']}` preset ({d['params']['dense'] / 1e6:.1f} M params), batch "
             f"{d['batch']} x {d['seq']}", "median"],
            ["dense (GeGLU + dense attention)", ms(d["step_dense_s"])],
            ["Spark (statistical top-k)", f"{ms(d['step_spark_s'])} ({f(d['train_step_spark_vs_dense'])}x dense)"],
            ["Spark with exact top-k",
             f"{ms(d['step_spark_exact_topk_s'])} ({f(d['train_step_exact_vs_stat'])}x of statistical)"]]


def _bricks(load: Loader) -> Rows:
    d = load("docs/bricks/smollm2-135m/results.json")
    sp, spec, part = d["sparsity"], d["specialisation"], d["partition"]
    below = sp["frac_below_threshold_all_layers"]
    m = sp["masking"]
    fr = [round(x, 2) for x in m["fractions"]]

    def loss_change(x: float) -> str:
        ch = 100 * (m["loss"]["activation"]["all"][fr.index(x)] / m["base_loss_all"] - 1)
        return f"{ch:+.{0 if abs(ch) >= 10 else 1}f}% at {100 * x:.0f}%"

    caps = d["data"]["capabilities"]
    n_layers = d["model"]["n_layers"]
    full = [c for c in caps if spec["layers_best_above_0.8"][c] == n_layers]
    shuffled = [statistics.mean(r) for r in spec["ap_shuffled"]["best"]]
    prune = spec["prune"]
    pc = prune["ppl_change_pct"]
    diag = [pc[i][i] for i in range(len(prune["columns"]))]
    rand = pc[prune["rows"].index("random")]
    ov = part["overlap"]
    pairs = {(caps[i], caps[j]): ov[i][j] for i in range(len(caps)) for j in range(i + 1, len(caps))}
    big = {p: v for p, v in pairs.items() if v >= 0.01}
    small = [v for p, v in pairs.items() if p not in big]
    return [["study", "paper (8B models)", "SmolLM2-135M"],
            ["neurons below 0.2 of the token's layer max", "~80%",
             f"{pct(below['activation'])} (activation), {pct(below['output'])} (output magnitude)"],
            ["lowest neurons zeroed per token, loss change", "~none up to 70% (activation) / 80% (output)",
             ", ".join(loss_change(x) for x in (0.6, 0.7, 0.8))],
            ["best functionality AP per layer", "> 0.8 in most layers (coding, math)",
             f"> 0.8 in {n_layers}/{n_layers} layers for {', '.join(full)}; shuffled \u2248 "
             f"{min(shuffled):.2f}-{max(shuffled):.2f}"],
            ["zero a capability's top-5% neurons: itself / others", "e.g. +444% / mostly +3-25%",
             f"+{min(diag):.0f}% to +{max(diag):.0f}% / median +{prune['off_diagonal_median_pct']:.0f}% "
             f"(random 5%: +{min(rand):.0f}-{max(rand):.0f}%)"],
            [f"overlap of top-5% sets (random {part['random_expected']:.2f})", "0.00-0.04",
             f"{min(small):.3f}-{max(small):.3f}, except "
             + ", ".join(f"{a}-{b} {v:.3f}" for (a, b), v in big.items())]]


def _decode_main(load: Loader) -> Rows:
    d = load(RESULTS + "decode_gemma2-2b.json")
    rows = [["dtype", "context", "dense ms/token (min\u2013max)", "spark ms/token (min\u2013max)", "speedup", "ideal",
             "meas/ideal", "FFN x (ideal)", "attention x (ideal)", "dense GB/s", "spark GB/s", "HF Gemma2 ms/token",
             "neurons/token/layer", "keys/query", "cap fired"]]
    for r in d["runs"]:
        a = r["achieved"]
        rows.append([r["dtype"], str(r["context"]), f"{r['dense_ms_per_token']:.1f} ({rng(r['dense_ms'])})",
                     f"{r['spark_ms_per_token']:.1f} ({rng(r['spark_ms'])})", bold(f(r["speedup"])),
                     f(r["ideal_speedup"]), f(meas_over_ideal(r)),
                     f"{f(r['ffn_speedup'])} ({f(r['ideal_ffn_speedup'])})",
                     f"{f(r['attention_speedup'])} ({f(r['ideal_attention_speedup'])})",
                     f(r["dense_gb_per_s"], 1), f(r["spark_gb_per_s"], 1),
                     "\u2014" if r.get("hf_ms_per_token") is None else f(r["hf_ms_per_token"], 0),
                     f(a["ffn_neurons_per_layer"], 0), f(a["keys_per_query"], 1), pct(a["cap_fired_fraction"], 0)])
    return rows


def _decode_components(load: Loader) -> Rows:
    d = load(RESULTS + "decode_gemma2-2b.json")
    parts = ("attn_proj", "attention", "ffn", "lm_head")
    rows = [["dtype", "context", "dense: attn_proj / attention / FFN / LM head (ms/token)",
             "spark: attn_proj / attention / FFN / LM head"]]
    for r in d["runs"]:
        rows.append([r["dtype"], str(r["context"])] + [" / ".join(f(r[f"{e}_components_ms"][p], 1) for p in parts)
                                                       for e in ("dense", "spark")])
    return rows


STABILITY_RUNS = (  # label, file; each at context 4096, bf16 then fp32
    ("full run (main table)", "decode_gemma2-2b.json"),
    ("4096 rerun", "decode_gemma2-2b_4096.json"),
    ("4096 lockstep 1", "decode_gemma2-2b_4096_lockstep1.json"),
    ("4096 lockstep 2", "decode_gemma2-2b_4096_lockstep2.json"),
    ("full run, lockstep", "decode_gemma2-2b_lockstep.json"),
    ("previous session", "decode_gemma2-2b_previous_session.json"),
)


def _decode_stability(load: Loader) -> Rows:
    ideal = run_of(load(RESULTS + STABILITY_RUNS[0][1]), "bf16", 4096)["ideal_speedup"]
    rows = [["run", "interleave", "dtype", "dense ms", "spark ms", f"speedup (ideal {f(ideal)})", "paired",
             "meas/ideal", "FFN x", "attention x", "dense / spark GB/s"]]
    for dtype in ("bf16", "fp32"):
        for label, name in STABILITY_RUNS:
            r = run_of(load(RESULTS + name), dtype, 4096)
            paired = r.get("paired_speedup")
            rows.append([label, "token" if r.get("interleave") == "token" else "runs", dtype,
                         f(r["dense_ms_per_token"], 1), f(r["spark_ms_per_token"], 1), f(r["speedup"]),
                         "\u2014" if paired is None else f(paired), f(meas_over_ideal(r)), f(r["ffn_speedup"]),
                         f(r["attention_speedup"]), f"{f(r['dense_gb_per_s'], 1)} / {f(r['spark_gb_per_s'], 1)}"])
    return rows


def _prefill(load: Loader) -> Rows:
    d = load(RESULTS + "prefill_gemma2-2b_4layers.json")
    prev = load(RESULTS + "prefill_gemma2-2b_4layers_training_form.json")
    r0 = d["runs"][0]
    rows = [["dtype", f"dense prefill (s, {r0['prefill']['tokens']} tokens, {r0['layers']} layers)",
             "Spark prefill (s)", "Spark / dense", "previous (training form)"]]
    for r in d["runs"]:
        p = r["prefill"]
        rows.append([r["dtype"], f(p["dense_s"]), f(p["spark_s"]), bold(f(p["spark_over_dense"])),
                     f(run_of(prev, r["dtype"])["prefill"]["spark_over_dense"])])
    return rows


PREFILL_PARTS = (
    ("dense GeGLU FFN (three GEMMs)", "dense_ffn"),
    ("Spark FFN, sparse (`spark_ffn_prefill`)", "spark_ffn"),
    ("of which the predictor GEMM (r = 1024 of d = 2304 input dims)", "spark_ffn_predictor_gemm"),
    ("dense attention (chunked, soft-capped)", "dense_attention"),
    ("Spark attention as decode steps (`spark_prefill_attention`)", "spark_attention_decode_steps"),
    ("Spark attention, training form with hard cap (the previous prefill)", "spark_attention_training_form"),
)


def _prefill_parts(load: Loader) -> Rows:
    res = load(RESULTS + "side_checks_prefill.json")["result"]
    return [["part", "bf16", "fp32"]] + [[label, f(res["bf16"][k], 0), f(res["fp32"][k], 0)]
                                         for label, k in PREFILL_PARTS]


def _batch(load: Loader) -> Rows:
    d = load(RESULTS + "batch_ffn_gemma2-2b.json")
    rows = [["dtype", "batch", "dense ms / layer-step", "Spark ms", "speedup", "ideal (bytes)", "union of selections"]]
    for r in d["runs"]:
        rows.append([r["dtype"], str(r["batch"]), f(r["dense_ms"]), f(r["spark_ms"]), bold(f(r["speedup"])),
                     f(r["ideal_speedup"]), pct(r["union_fraction"])])
    return rows


def _quality(load: Loader) -> Rows:
    d = load(RESULTS + "quality.json")
    v, t = d["variants"], d["timing"]
    base_loss, base_t = v["dense"]["final_val_loss"], t["dense"]["median"]
    rows = [["variant", "final val loss", "vs dense", "FFN active", "keys / query", "CPU step (s, "
             f"{d['timing_info']['threads']} threads)", "vs dense"]]
    for name, label, strong in (("dense", "dense", False), ("spark_ffn", "spark_ffn", False),
                                ("spark", "**spark** (FFN + attention)", True),
                                ("topk_no_predictor", "topk_no_predictor", False)):
        x = v[name]
        loss = f(x["final_val_loss"], 4)
        rel = "\u2014" if name == "dense" else pct(x["final_val_loss"] / base_loss - 1, sign=True)
        rows.append([label, bold(loss) if strong else loss, bold(rel) if strong and name != "dense" else rel,
                     pct(x["ffn_activity"], 0 if x["ffn"] == "geglu" else 1), f(x["keys_per_query"], 1),
                     f(t[name]["median"]), f(t[name]["median"] / base_t)])
    rows.append(["spark with exact `torch.topk`", "", "", "", "", f(t["spark_exact_topk"]["median"]),
                 f(t["spark_exact_topk"]["median"] / base_t)])
    return rows


def _routed(load: Loader) -> Rows:
    d = load(RESULTS + "routed_decode.json")
    rows = [["dtype", "context", "dense engine ms/token", "routed ms/token", "speedup", "ideal (bytes)", "meas/ideal",
             "HF ms/token", "FFN active", "greedy agreement"]]
    for r in d["runs"]:
        rows.append([r["dtype"], str(r["context"]), f(r["dense_ms_per_token"], 1), f(r["routed_ms_per_token"], 1),
                     bold(f(r["speedup"])), f(r["ideal_speedup"]), f(meas_over_ideal(r)), f(r["hf_ms_per_token"], 1),
                     pct(r["ffn_activity"]), f(r["greedy_agreement"])])
    return rows


def _vs_llamacpp_random(load: Loader) -> Rows:
    d = load(RESULTS + "decode_quant_gemma2-2b.json")
    rows = [["format", "context", "our dense ms/token", "our Spark ms/token", "llama.cpp ms/token", "dense vs llama.cpp",
             "Spark vs llama.cpp", "Spark/dense", "byte ideal", "meas/ideal"]]
    for r in d["runs"]:
        ll = r["llamacpp_ms_per_token"]
        rows.append([r["dtype"], str(r["context"]), f(r["dense_ms_per_token"], 1), f(r["spark_ms_per_token"], 1),
                     f(ll, 1), f(ll / r["dense_ms_per_token"]), bold(f(ll / r["spark_ms_per_token"])),
                     f(r["speedup"]), f(r["ideal_speedup"]), f(meas_over_ideal(r))])
    return rows


def _vs_llamacpp_model(load: Loader) -> Rows:
    d = load(RESULTS + "decode_llamacpp_smollm2-135m.json")
    rows = [["format", "context", "our ms/token", "our GB/s", "llama.cpp ms/token", "ours vs llama.cpp"]]
    for r in d["runs"]:
        ll = r["llamacpp_ms_per_token"]
        rows.append([r["dtype"], str(r["context"]), f(r["dense_ms_per_token"], 2), f(r["dense_gb_per_s"], 1),
                     f(ll, 2), bold(f(ll / r["dense_ms_per_token"]))])
    return rows


def _sparsify(name: str):
    def rows_of(load: Loader) -> Rows:
        d = load(RESULTS + f"sparsify_{name}.json")
        rows = [["method", "scope", "asked", "achieved sparsity", "weights skipped", "held-out ppl", "ppl change",
                 "decode speedup", "ideal (bytes)", "meas/ideal", "training-free"]]
        for p in d["points"]:
            v = f" (verify {p['verify']:g}x)" if p.get("verify", 1.0) > 1 else ""
            sp = p["speedup"] is not None
            rows.append([p["method"] + v, p["scope"], f(p["target"]), pct(p["sparsity"]), pct(p["weights_skipped"]),
                         f(p["ppl"]), pct(p["ppl_increase"], 1, sign=True), bold(f(p["speedup"])) if sp else "-",
                         f(p["ideal_speedup"]) if sp else "-", f(p["measured_over_ideal"]) if sp else "-",
                         "yes" if p["training_free"] else "no"])
        return rows
    return rows_of


TABLES: dict[str, Table] = {
    "flops": Table((FLOPS_SOURCE,), "rrrrrr", _flops),
    "topk_ops": Table((RESULTS + "topk.json",), "lrrr", _topk_ops),
    "topk_step": Table((RESULTS + "topk.json",), "lr", _topk_step),
    "bricks_smollm2": Table(("docs/bricks/smollm2-135m/results.json",), "lll", _bricks),
    "decode_main": Table((RESULTS + "decode_gemma2-2b.json",), "l" + "r" * 14, _decode_main),
    "decode_components": Table((RESULTS + "decode_gemma2-2b.json",), "lrll", _decode_components),
    "decode_stability": Table(tuple(RESULTS + n for _, n in STABILITY_RUNS), "lll" + "r" * 8, _decode_stability),
    "prefill": Table((RESULTS + "prefill_gemma2-2b_4layers.json",
                      RESULTS + "prefill_gemma2-2b_4layers_training_form.json"), "lrrrr", _prefill),
    "prefill_parts": Table((RESULTS + "side_checks_prefill.json",), "lrr", _prefill_parts),
    "batch": Table((RESULTS + "batch_ffn_gemma2-2b.json",), "lrrrrrr", _batch),
    "quality": Table((RESULTS + "quality.json",), "lrrrrrr", _quality),
    "routed_decode": Table((RESULTS + "routed_decode.json",), "lrrrrrrrrr", _routed),
    "sparsify_smollm2": Table((RESULTS + "sparsify_smollm2-135m.json",), "llrrrrrrrrl", _sparsify("smollm2-135m")),
    "sparsify_gemma3": Table((RESULTS + "sparsify_gemma3-270m.json",), "llrrrrrrrrl", _sparsify("gemma3-270m")),
    "llamacpp_gemma2": Table((RESULTS + "decode_quant_gemma2-2b.json",), "l" + "r" * 9, _vs_llamacpp_random),
    "llamacpp_smollm2": Table((RESULTS + "decode_llamacpp_smollm2-135m.json",), "lrrrrr", _vs_llamacpp_model),
}

# Tables whose data is not committed: the check only requires the marker (with its reason) and this entry.
UNTIED: dict[str, str] = {
    "routing_sparkify": "runs/routing/sparkify-r128/results.json and sparkify-r128-ft/results.json are not committed "
                        "(runs/ is ignored); the same figures and their commands are in docs/bricks-routing.md",
    "brick_operations": "each operation's results.json is under runs/bricks/ (ignored, not committed); the figures, "
                        "commands and full tables are in docs/bricks-operations.md",
}


# ---- figures in prose --------------------------------------------------------------------------------------------

def _claims_flops(load: Loader) -> list[str]:
    from sparkformer.config import get_preset
    from sparkformer.flops import compare

    cfg = get_preset("gemma2-2b")
    c = compare(cfg, 8192, "bf16")
    c4 = compare(cfg, 4096, "bf16")
    lo, hi = (compare(cfg, L, "bf16")["flops_ratio_no_head"] for L in (2048, 8192))
    dn, sp = c["dense"], c["spark"]
    return [f"At 8192 context the dense model costs {dn['flops'] / 1e9:.2f} GFLOP and reads {dn['bytes'] / 1e9:.2f} GB "
            f"per token (bf16); the Spark model {sp['flops'] / 1e9:.2f} GFLOP and {sp['bytes'] / 1e9:.2f} GB.",
            f"Our count without the LM head is {f(c4['flops_ratio_no_head'])}x at 4096 context ({f(lo)}\u2013{f(hi)}x "
            f"over 2k\u20138k)",
            f"LM head ({dn['head_flops'] / 1e9:.2f} GFLOP per token, untouched by sparsity) included the ratio is "
            f"{f(c4['flops_ratio'])}x",
            f"The FFN alone is {f(c4['ideal_ffn_speedup'])}x in both FLOPs and bytes"]


def _claims_side_checks(load: Loader) -> list[str]:
    out = []
    thp = load(RESULTS + "side_checks_thp.json")["result"]

    def gbs(flag: str, dt: str) -> str:
        xs = [r[dt]["gb_per_s"] for r in thp[flag]]
        return f"{min(xs):.1f}-{max(xs):.1f}"

    out.append(f"gave {gbs('1', 'bfloat16')} GB/s (bf16) / {gbs('1', 'float32')} (fp32) with huge pages against "
               f"{gbs('0', 'bfloat16')} / {gbs('0', 'float32')} without")
    csr = load(RESULTS + "side_checks_csr.json")["result"]
    out.append(f"CSR {csr['csr_s']:.2f} s against {csr['dense_s']:.2f} s for the dense GEMM, "
               f"{csr['csr_s'] / csr['dense_s']:.1f}x slower")
    ch = load(RESULTS + "side_checks_chunked.json")["result"]
    sc = lambda k: f"{ch[k]['one_chunk_s']:.2f} -> {ch[k]['chunk_256_s']:.2f} s"  # noqa: E731
    out.append(f"Spark {sc('spark')}, dense (soft-capped, so also materialised) {sc('dense')}")
    at = load(RESULTS + "side_checks_attn.json")["result"]
    b, f32 = at["bf16"], at["fp32"]
    out.append(f"gives {b['spark_k256']:.0f} vs {b['dense']:.0f} us per layer in bf16 "
               f"(**{b['dense'] / b['spark_k256']:.2f}x**) and {f32['spark_k256']:.0f} vs {f32['dense']:.0f} us "
               f"in fp32 ({f32['dense'] / f32['spark_k256']:.2f}x)")
    out.append(f"its predictor pass plus selection (k = 16 instead of 256) takes {b['spark_k16']:.0f} / "
               f"{f32['spark_k16']:.0f} us ({b['predictor_pass_gb_per_s']:.0f} / {f32['predictor_pass_gb_per_s']:.0f} "
               f"GB/s over the key halves), and the gathers of the 2,048 kept keys' other halves and values the "
               f"remaining {b['gather_us']:.0f} / {f32['gather_us']:.0f} us, i.e. {b['gather_gb_per_s']:.0f} GB/s in "
               f"bf16 (768-byte rows) and {f32['gather_gb_per_s']:.0f} GB/s in fp32 (1,536-byte rows)")
    pr = load(RESULTS + "side_checks_prefill.json")["result"]
    out.append(f"The Spark FFN is {pr['bf16']['dense_ffn'] / pr['bf16']['spark_ffn']:.1f}x (bf16) / "
               f"{pr['fp32']['dense_ffn'] / pr['fp32']['spark_ffn']:.1f}x (fp32) faster than the dense GeGLU")
    return out


def _claims_topk(load: Loader) -> list[str]:
    d, prev = load(RESULTS + "topk.json"), load(RESULTS + "topk_previous_loaded.json")
    q = load(RESULTS + "quality.json")["timing"]
    ex, st = d["ffn_exact_s"], d["ffn_stat_s"]
    return [f"the earlier run under load 3-5 gave {f(prev['stat_vs_exact_speedup'])}x / "
            f"{f(prev['attn_stat_vs_exact_speedup'])}x / {f(prev['train_step_spark_vs_dense'])}x",
            f"({1e3 * ex['min']:.0f}-{1e3 * ex['max']:.0f} ms:",
            f"the min-to-min ratio is {ex['min'] / st['min']:.1f}x",
            f"the statistical step was {q['spark_exact_topk']['median'] / q['spark']['median']:.2f}x faster than "
            f"exact; here (batch {d['batch']}) it was {f(d['train_step_exact_vs_stat'])}x"]


def _claims_decode(load: Loader) -> list[str]:
    lock = load(RESULTS + "decode_gemma2-2b_lockstep.json")

    def series(dtype: str) -> str:
        out = []
        for r in lock["runs"]:
            if r["dtype"] == dtype:
                x = f(r["speedup"])
                if abs(r["paired_speedup"] - r["speedup"]) >= 0.1:
                    x += f" (paired {f(r['paired_speedup'])})"
                out.append(x)
        return " / ".join(out)

    ctx = " / ".join(str(r["context"]) for r in lock["runs"] if r["dtype"] == "bf16")

    def hf(names: tuple[str, ...], dtype: str) -> list[float]:
        rs = [run_of(load(RESULTS + n), dtype, 4096) for n in names]
        return [r["hf_ms_per_token"] / r["dense_ms_per_token"] for r in rs if r.get("hf_ms_per_token")]

    this = tuple(n for _, n in STABILITY_RUNS[:-1])
    (b0, b1), (f0, f1) = ((min(x), max(x)) for x in (hf(this, "bf16"), hf(this, "fp32")))
    pb, pf = (hf((STABILITY_RUNS[-1][1],), dt)[0] for dt in ("bf16", "fp32"))
    return [f"(bf16 {series('bf16')} at {ctx}; fp32 {series('fp32')})",
            f"{b0:.1f}-{b1:.1f}x (bf16) and {f0:.1f}-{f1:.1f}x (fp32) faster per token at 4096 ({pb:.1f}x / {pf:.1f}x "
            f"before)"]


def _claims_quality(load: Loader) -> list[str]:
    t = load(RESULTS + "quality.json")["targets"]
    prev = load(RESULTS + "quality_previous_timing.json")["timing"]
    act = [x for k in ("spark_ffn", "spark") for x in t[f"ffn_activity_every_layer_within_1pt/{k}"]["value"]]
    return [f"statistical top-k step faster than exact ({t['statistical_step_faster_than_exact']['value']:.3f}x)",
            f"(achieved {100 * min(act):.1f}-{100 * max(act):.1f}%:",
            f"({pct(t['spark_keys_at_most_k_on_99pct_rows']['value'], 0)}; 100% with the decode hard cap",
            f"({f(t['spark_step_at_most_1.3x_dense']['value'])}x in this timing, "
            f"{prev['spark']['median'] / prev['dense']['median']:.3f}x in the previous one"]


def _claims_quality_study(load: Loader) -> list[str]:
    ch = load(RESULTS + "side_checks_chunked.json")["result"]
    sc = lambda k: f"{ch[k]['one_chunk_s']:.2f} -> {ch[k]['chunk_256_s']:.2f} s"  # noqa: E731
    return [f"Spark {sc('spark')}, dense {sc('dense')}"]


@dataclass
class Claims:
    doc: Path
    sources: tuple[str, ...]
    render: Callable[[Loader], list[str]]


CLAIMS: dict[str, Claims] = {
    "flops_prose": Claims(DOC, (FLOPS_SOURCE,), _claims_flops),
    "side_checks_prose": Claims(DOC, tuple(RESULTS + f"side_checks_{c}.json" for c in ("thp", "csr", "chunked",
                                                                                        "attn", "prefill")),
                                _claims_side_checks),
    "topk_prose": Claims(DOC, (RESULTS + "topk.json", RESULTS + "topk_previous_loaded.json",
                               RESULTS + "quality.json"), _claims_topk),
    "decode_prose": Claims(DOC, tuple(RESULTS + n for _, n in STABILITY_RUNS), _claims_decode),
    "quality_prose": Claims(DOC, (RESULTS + "quality.json", RESULTS + "quality_previous_timing.json"),
                            _claims_quality),
    "quality_study_chunked": Claims(Path("docs") / "quality-study.md", (RESULTS + "side_checks_chunked.json",),
                                    _claims_quality_study),
}


