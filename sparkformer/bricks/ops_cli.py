"""`sparkformer bricks lora|retrieve|merge|edit|grow`: the operations on customized bricks, as commands.

Each command is a plain function (``run_lora`` ... ``run_grow``, the Python API) that writes ``results.json``, PNG
plots and ``report.md`` (a Markdown table and the command that reproduces it) under ``--out``, prints the table,
and ends with one JSON line of headline numbers.

    sparkformer bricks lora     --model smollm2-135m --out runs/bricks/lora          # train + save PEFT bricks
    sparkformer bricks retrieve --model smollm2-135m --bricks runs/bricks/lora --out runs/bricks/retrieve
    sparkformer bricks merge    --model smollm2-135m --bricks runs/bricks/lora --out runs/bricks/merge
    sparkformer bricks edit     --model smollm2-135m --out runs/bricks/edit
    sparkformer bricks grow     --model smollm2-135m --new-capability arithmetic --out runs/bricks/grow

Hook: ``add_bricks_commands(bricks_subparsers)`` (also exported as ``add_bricks_cli`` for
``sparkformer.bricks.cli.BRICKS_COMMAND_MODULES``).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

LORA_DEFAULTS = dict(capabilities="default", targets="q_proj,v_proj,up_proj,down_proj", layers=None, rank=8,
                     alpha=16.0, steps=30, lr=1e-3, batch_size=2, seq_len=128, train_per_capability=24,
                     heldout_per_capability=8, seed=0)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = ".2f") -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else format(v, fmt)
        return str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def parse_layers(spec: str | None) -> tuple[int, ...] | None:
    """'15-29' or '3,5,7' or None."""
    if spec in (None, "", "all"):
        return None
    out: list[int] = []
    try:
        for part in str(spec).split(","):
            if "-" in part:
                a, b = part.split("-")
                out += list(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise ValueError(f"--layers {spec!r}: expected e.g. '15-29' or '3,5,7'") from None
    return tuple(out)


_START = [time.time()]


def _setup(threads: int | None, seed: int) -> None:
    _START[0] = time.time()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)


def _load(model: str):
    from sparkformer.pretrained import BUILTIN_MODELS, load_causal_lm

    t = time.time()
    m, tok = load_causal_lm(model)
    for p in m.parameters():
        p.requires_grad_(False)
    spec = BUILTIN_MODELS.get(model)
    note = f"{spec.description}" if spec else model
    _log(f"{model}: loaded in {time.time() - t:.0f} s")
    return m, tok, note


def _capability_texts(capabilities: str, n_train: int, n_heldout: int, seq_len: int, seed: int,
                      data: Sequence[str] = ()) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, str]]:
    from sparkformer.bricks.capabilities import build_capability_set

    caps = [] if capabilities in ("none", "") else capabilities
    cs = build_capability_set(caps, list(data), n_per_capability=n_train, n_heldout=n_heldout, chars=6 * seq_len,
                              seed=seed)
    train = {c: [p.text for p in ps] for c, ps in cs.by_capability("score").items()}
    held = {c: [p.text for p in ps] for c, ps in cs.by_capability("heldout").items()}
    return train, held, cs.description


def _finish(out: Path, name: str, results: dict, table: str, command: str, headline: dict, notes: str = "") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    wall = time.time() - _START[0]
    results = {**results, "command": command, "wall_seconds": wall, "threads": torch.get_num_threads()}
    notes = (notes + " " if notes else "") + f"Wall time {wall / 60:.1f} min on {torch.get_num_threads()} thread(s)."
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    report = [f"# bricks {name}", "", f"Reproduce: `{command}`", "", table, ""]
    if notes:
        report += [notes, ""]
    for png in sorted(out.glob("*.png")):
        report += [f"![{png.stem}]({png.name})", ""]
    (out / "report.md").write_text("\n".join(report))
    print(table)
    print(json.dumps(headline, default=float))
    return out / "report.md"


def _command(name: str, args: argparse.Namespace, defaults: dict[str, Any], first: Sequence[str]) -> str:
    """The command line that reproduces the run (options at their defaults left out)."""
    parts = ["sparkformer", "bricks", name]
    for k in first:
        v = getattr(args, k)
        if v is not None:
            parts += ["--" + k.replace("_", "-"), str(v)]
    for k, d in defaults.items():
        v = getattr(args, k, None)
        if k in first or v is None or v == d or v is False:
            continue
        if isinstance(v, list):
            for item in v:
                parts += ["--" + k.replace("_", "-"), str(item)]
            continue
        parts += ["--" + k.replace("_", "-")] + ([] if v is True else [str(v)])
    parts += ["--out", str(args.out)]
    return " ".join(shlex.quote(p) for p in parts)


# ==== lora ============================================================================================================
def run_lora(model: str, out: str | Path, capabilities: str = "default", targets: str = LORA_DEFAULTS["targets"],
             layers: tuple[int, ...] | None = None, rank: int = 8, alpha: float = 16.0, steps: int = 30,
             lr: float = 1e-3, batch_size: int = 2, seq_len: int = 128, train_per_capability: int = 24,
             heldout_per_capability: int = 8, seed: int = 0, data: Sequence[str] = (), threads: int | None = None,
             command: str = "") -> Path:
    """Train one LoRA brick per capability (base frozen), save each in PEFT format under ``out/bricks/<cap>``,
    and measure held-out perplexity of each capability without and with its brick."""
    from sparkformer.bricks.lora import (LoRAConfig, encode_texts, forward_logits, perplexity, token_windows,
                                         train_lora)

    _setup(threads, seed)
    out = Path(out)
    cfg = LoRAConfig(r=rank, alpha=alpha, targets=targets, layers=layers)
    m, tok, note = _load(model)
    train, held, desc = _capability_texts(capabilities, train_per_capability, heldout_per_capability, seq_len, seed,
                                          data)
    (out).mkdir(parents=True, exist_ok=True)
    (out / "texts.json").write_text(json.dumps({"train": train, "heldout": held, "seed": seed}, indent=0))
    caps = list(train)
    res: dict[str, Any] = {"model": model, "model_note": note, "config": {**vars(cfg), "steps": steps, "lr": lr,
                           "batch_size": batch_size, "seq_len": seq_len, "threads": torch.get_num_threads()},
                           "capabilities": {}}
    curves = {}
    bricks = {}
    for cap in caps:
        t = time.time()
        windows = token_windows(tok, train[cap], seq_len)
        _log(f"[{cap}] {windows.shape[0]} windows of {seq_len} tokens, {steps} steps")
        brick, tl = train_lora(m, tok, [], cfg, steps, lr, batch_size, seq_len, seed, name=cap, log=_log,
                               windows=windows)
        brick.meta.update({"capability": cap, "base_model": model, "description": desc.get(cap, "")})
        brick.save(out / "bricks" / cap, base_model_name_or_path=model)
        bricks[cap] = brick
        curves[cap] = tl.losses
        held_tokens = encode_texts(tok, held[cap], seq_len)
        base_ppl = perplexity(m, held_tokens)
        with brick.attached(m):
            brick_ppl = perplexity(m, held_tokens)
        k = max(1, min(5, len(tl.losses) // 2))
        res["capabilities"][cap] = {"train_windows": int(windows.shape[0]), "trainable_params": tl.trainable_params,
                                    "train_seconds": tl.seconds, "first_loss": sum(tl.losses[:k]) / k,
                                    "last_loss": sum(tl.losses[-k:]) / k, "losses": tl.losses,
                                    "ppl_base": base_ppl, "ppl_brick": brick_ppl}
        _log(f"[{cap}] ppl {base_ppl:.2f} -> {brick_ppl:.2f} ({time.time() - t:.0f} s)")
    # merged == attached and PEFT loading, on the first brick
    first = bricks[caps[0]]
    ids = torch.tensor([encode_texts(tok, held[caps[0]][:1], 64)[0]])
    with torch.no_grad():
        with first.attached(m):
            att = forward_logits(m, ids)
        first.merge(m)
        mer = forward_logits(m, ids)
        first.unmerge(m)
    res["merged_vs_attached_max_abs_diff"] = float((att - mer).abs().max())
    try:
        import copy

        import peft

        pm = peft.PeftModel.from_pretrained(copy.deepcopy(m), str(out / "bricks" / caps[0])).eval()
        with torch.no_grad():
            pl = forward_logits(pm.get_base_model(), ids)  # peft injected its layers in place; works for SparkLM too
        res["peft_vs_ours_max_abs_diff"] = float((pl - att).abs().max())
        del pm
    except ImportError:
        res["peft_vs_ours_max_abs_diff"] = None
    rows = [[c, r["train_windows"], f"{r['first_loss']:.2f} -> {r['last_loss']:.2f}", r["ppl_base"], r["ppl_brick"],
             f"{100 * (r['ppl_brick'] / r['ppl_base'] - 1):+.1f}%", f"{r['train_seconds']:.0f}"]
            for c, r in res["capabilities"].items()]
    table = md_table(["capability", "train windows", "train loss (first / last 5 steps)", "held-out ppl base",
                      "ppl with brick", "change", "train s"], rows)
    n_par = next(iter(res["capabilities"].values()))["trainable_params"]
    notes = (f"LoRA r={rank}, alpha={alpha}, targets {','.join(cfg.names())}"
             f"{'' if layers is None else ', layers ' + str(list(layers))}; {n_par / 1e6:.2f} M trainable parameters "
             f"per brick; {steps} steps x {batch_size} x {seq_len} tokens, AdamW lr {lr}. Merged vs attached: max "
             f"|logit diff| {res['merged_vs_attached_max_abs_diff']:.2e}; peft.PeftModel vs ours: "
             f"{res['peft_vs_ours_max_abs_diff']}.")
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for c, ls in curves.items():
        ax[0].plot(ls, label=c)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("train loss")
    ax[0].legend()
    x = range(len(caps))
    ax[1].bar([i - 0.2 for i in x], [res["capabilities"][c]["ppl_base"] for c in caps], 0.4, label="base")
    ax[1].bar([i + 0.2 for i in x], [res["capabilities"][c]["ppl_brick"] for c in caps], 0.4, label="+ own brick")
    ax[1].set_xticks(list(x), caps, rotation=20)
    ax[1].set_ylabel("held-out perplexity")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "lora.png", dpi=110)
    plt.close(fig)
    headline = {"op": "lora", "model": model,
                "mean_ppl_change_pct": sum(100 * (r["ppl_brick"] / r["ppl_base"] - 1)
                                           for r in res["capabilities"].values()) / len(caps),
                "merged_vs_attached_max_abs_diff": res["merged_vs_attached_max_abs_diff"]}
    return _finish(out, "lora", res, table, command or f"sparkformer bricks lora --model {model} --out {out}",
                   headline, notes)


def _brick_texts(bricks_dir: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    f = bricks_dir / "texts.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: pass the --out folder of `sparkformer bricks lora` (it holds "
                                "bricks/ and texts.json with each brick's training and held-out texts)")
    d = json.loads(f.read_text())
    return d["train"], d["heldout"]


def _bricks_dir(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    return (p, p / "bricks") if (p / "bricks").is_dir() else (p.parent, p)


# ==== retrieve ========================================================================================================
def run_retrieve(model: str, bricks: str | Path, out: str | Path, encoders: Sequence[str] = ("minilm", "hidden"),
                 top_k: int = 2, temperature: float = 0.05, index_per_brick: int = 16, seq_len: int = 128,
                 threads: int | None = None, seed: int = 0, command: str = "") -> Path:
    """Retrieval accuracy on held-out inputs and perplexity with no / oracle / retrieved top-1 / retrieved mix /
    all-merged bricks (the first encoder computes every condition, later ones only their own picks)."""
    from sparkformer.bricks.lora import load_bricks
    from sparkformer.bricks.retrieval import BrickRetriever, evaluate_retrieval, make_encoder

    _setup(threads, seed)
    root, bdir = _bricks_dir(bricks)
    train, held = _brick_texts(root)
    bs = load_bricks(bdir)
    m, tok, note = _load(model)
    out = Path(out)
    res: dict[str, Any] = {"model": model, "bricks": list(bs), "encoders": {}}
    for i, enc_name in enumerate(encoders):
        t = time.time()
        enc = make_encoder(enc_name, m, tok, seq_len)
        r = BrickRetriever(enc)
        for name in bs:
            r.add(name, train[name][:index_per_brick])
        conds = ("none", "oracle", "top1", "mix", "all_merged") if i == 0 else ("top1", "mix")
        ev = evaluate_retrieval(m, tok, bs, {c: held[c] for c in bs}, r, top_k, temperature, seq_len,
                                conditions=conds, log=_log)
        ev["seconds"] = time.time() - t
        res["encoders"][enc_name] = ev
        _log(f"[{enc_name}] accuracy {ev['accuracy']:.3f} (chance {ev['chance']:.2f}), {ev['seconds']:.0f} s")
    caps = list(bs)
    first = res["encoders"][encoders[0]]
    rows = []
    for cond in ("none", "oracle", "all_merged"):
        rows.append([cond] + [first["perplexity"][cond][c] for c in caps] + [first["perplexity_mean"][cond], ""])
    for enc_name, ev in res["encoders"].items():
        for cond in ("top1", "mix"):
            label = f"{cond} ({enc_name})" if cond == "top1" else f"top-{top_k} mix ({enc_name})"
            rows.append([label] + [ev["perplexity"][cond][c] for c in caps] + [ev["perplexity_mean"][cond],
                                                                               f"{ev['accuracy']:.3f}"])
    table = md_table(["bricks attached"] + caps + ["mean ppl", "retrieval accuracy"], rows)
    n_held = len(next(iter(held.values())))
    notes = (f"{len(caps)} bricks, {n_held} held-out inputs per capability (chance accuracy {1 / len(caps):.2f}); "
             f"each brick indexed by {index_per_brick} of its training texts; mix = softmax(cos / {temperature}) over "
             f"the top {top_k}; all_merged = uniform average of all bricks. Per-capability accuracy: "
             + "; ".join(f"{e}: " + ", ".join(f"{c} {v:.2f}" for c, v in ev["accuracy_per_capability"].items())
                         for e, ev in res["encoders"].items()))
    plt = _plt()
    fig, axes = plt.subplots(1, len(encoders), figsize=(4.5 * len(encoders), 4))
    axes = axes if len(encoders) > 1 else [axes]
    for ax, (e, ev) in zip(axes, res["encoders"].items()):
        mat = torch.tensor(ev["confusion"], dtype=torch.float)
        ax.imshow(mat.numpy(), cmap="Blues")
        ax.set_xticks(range(len(caps)), caps, rotation=30)
        ax.set_yticks(range(len(caps)), caps)
        for a in range(len(caps)):
            for b in range(len(caps)):
                ax.text(b, a, int(mat[a, b]), ha="center", va="center")
        ax.set_title(f"{e}: accuracy {ev['accuracy']:.2f}")
        ax.set_xlabel("retrieved")
        ax.set_ylabel("true")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "confusion.png", dpi=110)
    plt.close(fig)
    headline = {"op": "retrieve", "model": model, **{f"accuracy_{e}": ev["accuracy"]
                                                     for e, ev in res["encoders"].items()},
                "ppl_mean": {k: v for k, v in first["perplexity_mean"].items()}}
    return _finish(out, "retrieve", res, table, command or f"sparkformer bricks retrieve --model {model} "
                   f"--bricks {bricks} --out {out}", headline, notes)


# ==== merge ===========================================================================================================
def run_merge(model: str, bricks: str | Path, out: str | Path,
              methods: Sequence[str] = ("linear", "task_arithmetic", "ties", "dare"), weights: Sequence[float] | None
              = None, scale: float = 0.5, density: float = 0.5, drop: float = 0.5, negate: str | None = None,
              seq_len: int = 128, save: bool = False, threads: int | None = None, seed: int = 0,
              command: str = "") -> Path:
    """Perplexity on every capability of the base, each single brick, each merge of all bricks, and (``negate``)
    the base minus one brick (task-arithmetic subtraction)."""
    from sparkformer.bricks.lora import encode_texts, load_bricks, sequence_nll
    from sparkformer.bricks.merge import get_method, merge_bricks

    _setup(threads, seed)
    for meth in methods:
        get_method(meth)
    root, bdir = _bricks_dir(bricks)
    _, held = _brick_texts(root)
    bs = load_bricks(bdir)
    names = list(bs)
    if negate is not None and negate not in bs:
        raise ValueError(f"--negate {negate!r}: no such brick; bricks: {', '.join(names)}")
    w = list(weights) if weights else [1.0] * len(names)
    if len(w) != len(names):
        raise ValueError(f"--weights has {len(w)} values for {len(names)} bricks ({', '.join(names)})")
    m, tok, note = _load(model)
    out = Path(out)
    caps = [c for c in held if c in bs] or list(held)
    tokens = {c: encode_texts(tok, held[c], seq_len) for c in caps}

    def ppl_row() -> dict[str, float]:
        row = {}
        for c in caps:
            nll, cnt = sequence_nll(m, tokens[c])
            row[c] = math.exp(float(nll.sum() / cnt.sum()))
        row["mean"] = sum(row[c] for c in caps) / len(caps)
        return row

    t0 = time.time()
    table_rows: dict[str, dict[str, float]] = {"base": ppl_row()}
    _log(f"base: {table_rows['base']['mean']:.2f} ({time.time() - t0:.0f} s)")
    for n, b in bs.items():
        with b.attached(m):
            table_rows[f"brick {n}"] = ppl_row()
        _log(f"brick {n}: " + " ".join(f"{c}={table_rows[f'brick {n}'][c]:.2f}" for c in caps))
    params = {"linear": {}, "task_arithmetic": {"scale": scale}, "ties": {"density": density, "scale": 1.0},
              "dare": {"drop": drop, "scale": scale, "seed": seed}}
    info = {}
    for meth in methods:
        t = time.time()
        p = params.get(meth, {})
        merged = merge_bricks([bs[n] for n in names], w, meth, **p)
        merged.apply(m)
        try:
            table_rows[f"merged {meth}"] = ppl_row()
        finally:
            merged.remove(m)
        info[meth] = {"params": merged.meta["params"], "seconds": time.time() - t}
        if save:
            lora, err = merged.to_lora(rank=8 * len(names))
            lora.meta["base_model"] = model
            lora.save(out / "merged" / meth, base_model_name_or_path=model)
            info[meth]["saved_lora_rank"] = 8 * len(names)
            info[meth]["saved_lora_rel_error"] = err
        _log(f"merged {meth}: mean {table_rows[f'merged {meth}']['mean']:.2f} ({time.time() - t:.0f} s)")
    if negate:
        neg = merge_bricks([bs[negate]], [-1.0], "task_arithmetic")
        neg.apply(m)
        try:
            table_rows[f"base - {negate}"] = ppl_row()
        finally:
            neg.remove(m)
    base = table_rows["base"]
    best_single = {c: min(table_rows[f"brick {n}"][c] for n in names) for c in caps}
    rows = [[k] + [v[c] for c in caps] + [v["mean"]] for k, v in table_rows.items()]
    table = md_table(["model"] + caps + ["mean"], rows)
    res = {"model": model, "bricks": names, "weights": w, "methods": info, "perplexity": table_rows,
           "best_single_brick": best_single, "seconds": time.time() - t0}
    notes = (f"Merging {len(names)} LoRA bricks ({', '.join(names)}) with weights {w} through their exact dense "
             f"deltas; task_arithmetic and dare use scale {scale}, ties density {density}, dare drop {drop}. "
             "Rows 'brick X' attach one brick. Held-out perplexity, lower is better.")
    plt = _plt()
    keys = list(table_rows)
    mat = torch.tensor([[table_rows[k][c] / base[c] for c in caps] for k in keys])
    fig, ax = plt.subplots(figsize=(1.4 * len(caps) + 3, 0.45 * len(keys) + 1.5))
    ax.imshow(mat.numpy(), cmap="RdYlGn_r", vmin=0.5, vmax=1.5)
    ax.set_xticks(range(len(caps)), caps, rotation=20)
    ax.set_yticks(range(len(keys)), keys)
    for a in range(len(keys)):
        for b in range(len(caps)):
            ax.text(b, a, f"{float(mat[a, b]):.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("held-out perplexity / base")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "merge.png", dpi=110)
    plt.close(fig)
    headline = {"op": "merge", "model": model, "mean_ppl": {k: v["mean"] for k, v in table_rows.items()}}
    return _finish(out, "merge", res, table, command or f"sparkformer bricks merge --model {model} --bricks "
                   f"{bricks} --out {out}", headline, notes)


# ==== edit ============================================================================================================
def run_edit(model: str, out: str | Path, relations: str = "capital,language", facts: str | None = None,
             n_edits: int = 12, sequential: int = 6, n_locality: int = 30, layer: str = "default",
             methods: Sequence[str] = ("rome", "ft"), stats_capabilities: str = "reference,docstrings,drama",
             stats_tokens: int = 20000, v_steps: int = 30, ft_steps: int = 50, ft_lr: float = 2e-3,
             threads: int | None = None, seed: int = 0, command: str = "") -> Path:
    """ROME edits vs plain fine-tuning of the same down projection on facts the model gets right."""
    from sparkformer.bricks.edit import HELDOUT_ENTITIES, EditConfig, builtin_facts, load_facts, run_edits

    _setup(threads, seed)
    fs = load_facts(facts) if facts else builtin_facts([r.strip() for r in relations.split(",") if r.strip()])
    m, tok, note = _load(model)
    out = Path(out)
    trace = layer == "trace"
    cfg = EditConfig(layer=None if layer in ("default", "trace") else int(layer), v_steps=v_steps,
                     ft_steps=ft_steps, ft_lr=ft_lr, stats_tokens=stats_tokens)
    n_stats = max(8, math.ceil(stats_tokens / 128))
    stats_train, _, _ = _capability_texts(stats_capabilities, max(2, n_stats // 3 + 1), 1, 128, seed)
    stats_texts = [t for ts in stats_train.values() for t in ts]
    res = run_edits(m, tok, fs, stats_texts, n_edits, n_locality, sequential, methods, cfg, model_key=model,
                    trace=trace, seed=seed, log=_log)
    res["model"] = model
    keys = ["efficacy", "efficacy_top1", "paraphrase", "paraphrase_top1", "locality", "locality_score"]
    rows = []
    for meth, r in res["methods"].items():
        rows.append([f"{meth} (one edit at a time, x{res['n_edits']})"] + [r["single"][k] for k in keys])
        if r["sequential"]:
            rows.append([f"{meth} ({r['sequential']['n_edited']} sequential edits)"]
                        + [r["sequential"][k] for k in keys])
    table = md_table(["method", "efficacy", "efficacy top-1", "paraphrase", "paraphrase top-1", "locality",
                      "locality score"], rows)
    how = "causal tracing" if trace else ("documented default int(0.2 * n_layers)" if layer == "default" else "given")
    notes = (f"Layer {res['layer']} ({how}) "
             f"of {model}; {res['n_correct']}/{res['n_candidates']} candidate facts answered right by the base "
             f"(top-1 first token); edits drawn from those; locality over up to {n_locality} other right facts with "
             f"another subject. efficacy / paraphrase = P(new) > P(true) (mean token log-prob), top-1 = the first "
             f"predicted token is the new object's; locality = top-1 unchanged; locality score = P(true) > P(new) "
             f"(CounterFact's neighbourhood score). Second moment from {stats_tokens} tokens of {stats_capabilities}"
             f" plus {res['n_context_texts']} texts of the relations' templates around {len(HELDOUT_ENTITIES)} "
             f"entities that are no fact's subject (rome; rome-corpus: without them).")
    plt = _plt()
    fig, ax = plt.subplots(1, 2 if res.get("trace") else 1, figsize=(11 if res.get("trace") else 6, 4))
    ax = ax if res.get("trace") else [ax]
    for i, row in enumerate(rows):
        ax[0].bar([j + i * 0.8 / len(rows) for j in range(len(keys))], row[1:], 0.8 / len(rows), label=row[0])
    ax[0].set_xticks(range(len(keys)), keys, rotation=20)
    ax[0].set_ylim(0, 1.05)
    ax[0].legend(fontsize=7)
    if res.get("trace"):
        ax[1].plot(res["trace"]["indirect_effect"], marker="o")
        ax[1].set_xlabel("layer (window centre)")
        ax[1].set_ylabel("indirect effect on P(true)")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "edit.png", dpi=110)
    plt.close(fig)
    headline = {"op": "edit", "model": model, "layer": res["layer"],
                **{f"{meth}_{k}": r["single"][k] for meth, r in res["methods"].items()
                   for k in ("efficacy", "paraphrase", "locality")}}
    return _finish(out, "edit", res, table, command or f"sparkformer bricks edit --model {model} --out {out}",
                   headline, notes)


# ==== grow ============================================================================================================
def run_grow(model: str, out: str | Path, new_capability: str = "arithmetic",
             old_capabilities: str = "code,docstrings,reference,drama",
             methods: Sequence[str] = ("width", "depth", "upcycle", "full", "lora"), steps: int = 20,
             batch_size: int = 4, seq_len: int = 128, train_texts: int = 24, heldout_per_capability: int = 6,
             width_neurons: int = 256, depth_every: int = 6, upcycle_every: int = 6, upcycle_experts: int = 4,
             from_layer: int = 0, lrs: dict[str, float] | None = None, threads: int | None = None, seed: int = 0,
             command: str = "", route_encoder: str | None = "minilm") -> Path:
    """Grow the base by each method, train only the new bricks on ``new_capability``, compare with full
    fine-tuning (and a LoRA brick): the new capability's gain and the old capabilities' retention, always-on and
    routed (the new bricks attached only to inputs retrieval assigns to the new capability, by ``route_encoder``
    over every capability's training texts; None: always-on only)."""
    from sparkformer.bricks.grow import GrowthConfig, run_growth

    _setup(threads, seed)
    caps = [new_capability] + [c for c in old_capabilities.split(",") if c.strip() and c != new_capability]
    train, held, _ = _capability_texts(",".join(caps), train_texts, heldout_per_capability, seq_len, seed)
    m, tok, note = _load(model)
    cfg = GrowthConfig(width_neurons=width_neurons, depth_every=depth_every, upcycle_every=upcycle_every,
                       upcycle_experts=upcycle_experts, from_layer=from_layer, steps=steps, batch_size=batch_size,
                       seq_len=seq_len, seed=seed)
    if lrs:
        cfg.lrs.update(lrs)
    res = run_growth(m, tok, new_capability, train[new_capability], held, methods, cfg, log=_log,
                     route_texts=train if route_encoder else None, encoder=route_encoder or "hidden")
    res["model"] = model
    old = caps[1:]
    rows = []
    for meth, r in res["methods"].items():
        rows.append([meth, "always on", f"{r['trainable_params'] / 1e6:.2f}",
                     "yes" if r["function_preserving"] else "NO", f"{r['lr']:g}",
                     f"{res['base_perplexity'][new_capability]:.2f} -> {r['perplexity_after'][new_capability]:.2f}",
                     r["gain"]] + [r["retention"][c] for c in old] + [r["mean_retention"]])
    for meth, r in res["methods"].items():
        if "routed" not in r:
            continue
        rr = r["routed"]
        label = "routed (base copy kept: +{:.1f} M)".format(rr["extra_params_kept"] / 1e6) if meth == "full" else \
            "routed" + ("" if rr["detached_equals_base"] else " (DETACHED != BASE)")
        rows.append([meth, label, f"{r['trainable_params'] / 1e6:.2f}", "yes" if r["function_preserving"] else "NO",
                     f"{r['lr']:g}",
                     f"{res['base_perplexity'][new_capability]:.2f} -> {rr['perplexity'][new_capability]:.2f}",
                     rr["gain"]] + [rr["retention"][c] for c in old] + [rr["mean_retention"]])
    table = md_table(["method", "bricks", "trainable M", "exact before training", "lr", f"{new_capability} ppl",
                      "gain (x)"] + [f"retention {c}" for c in old] + ["mean retention"], rows, fmt=".3f")
    notes = (f"New capability {new_capability!r}: {steps} steps x {batch_size} x {seq_len} tokens on its training "
             f"texts; held-out perplexity ({heldout_per_capability} texts per capability). gain = ppl before / "
             f"after on {new_capability}; retention = ppl before / after on an old capability (1 = nothing "
             f"forgotten). Grown layers: {'all' if not from_layer else f'>= {from_layer}'}; width: "
             f"+{width_neurons} neurons per FFN; depth: LLaMA-Pro copy after every {depth_every}th block; upcycle: FFN "
             f"of every {upcycle_every}th layer -> {upcycle_experts} experts, top-2 router; full: every parameter; "
             f"lora: r=8 on all projections of the same layers, attached after training. Per-method learning rates "
             f"in the table (AdamW, warmup + cosine).")
    if res.get("routing"):
        rt = res["routing"]
        notes += (f" Routed rows: a retriever ({rt['encoder']} encoder, each capability indexed by its training "
                  f"texts) attaches the new bricks only to held-out texts it assigns to {new_capability!r} "
                  f"(new-vs-old accuracy {rt['accuracy']:.3f}; attached on "
                  + ", ".join(f"{c} {v:.2f}" for c, v in rt["attached_fraction"].items())
                  + "); the other texts run with the bricks detached, which equals the base exactly (checked per "
                    "text). Full fine-tuning keeps no base inside it, so its routed row needs a second full copy.")
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for meth, r in res["methods"].items():
        ax[0].scatter(r["mean_retention"], r["gain"], s=60)
        ax[0].annotate(meth, (r["mean_retention"], r["gain"]))
        if "routed" in r:
            ax[0].scatter(r["routed"]["mean_retention"], r["routed"]["gain"], s=60, marker="^")
            ax[0].annotate(meth + " routed", (r["routed"]["mean_retention"], r["routed"]["gain"]))
        ax[1].plot(r["losses"], label=meth)
    ax[0].set_xlabel("mean retention of old capabilities")
    ax[0].set_ylabel(f"gain on {new_capability} (x)")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("train loss")
    ax[1].legend()
    fig.tight_layout()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "grow.png", dpi=110)
    plt.close(fig)
    headline = {"op": "grow", "model": model, **{f"{k}_gain": r["gain"] for k, r in res["methods"].items()},
                **{f"{k}_retention": r["mean_retention"] for k, r in res["methods"].items()},
                **{f"{k}_routed_gain": r["routed"]["gain"] for k, r in res["methods"].items() if "routed" in r},
                **{f"{k}_routed_retention": r["routed"]["mean_retention"] for k, r in res["methods"].items()
                   if "routed" in r}}
    return _finish(out, "grow", res, table, command or f"sparkformer bricks grow --model {model} --out {out}",
                   headline, notes)


# ==== argparse ========================================================================================================
def _common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required,
                   help="built-in name (smollm2-135m), HF folder or hub name, .gguf file, or a sparkformer checkpoint")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; 1 is often fastest on a busy machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (results.json, PNG plots, report.md)")


def add_bricks_commands(sub) -> None:
    """Add ``lora``, ``retrieve``, ``merge``, ``edit`` and ``grow`` to the ``sparkformer bricks`` sub-parsers."""
    d = LORA_DEFAULTS
    p = sub.add_parser("lora", help="train one LoRA brick per capability (base frozen), save in PEFT format",
                       description=run_lora.__doc__)
    _common(p)
    p.add_argument("--capabilities", default=d["capabilities"],
                   help="comma list of capabilities (see `bricks analyze`), 'default' or 'all'")
    p.add_argument("--data", action="append", default=[], help="extra capability data (jsonl: text, capability)")
    p.add_argument("--targets", default=d["targets"],
                   help="projections to adapt: names (q_proj,v_proj,...) or groups attn, ffn, all")
    p.add_argument("--layers", default=None, help="layers to adapt, e.g. '15-29' (default: all)")
    p.add_argument("--rank", type=int, default=d["rank"])
    p.add_argument("--alpha", type=float, default=d["alpha"])
    p.add_argument("--steps", type=int, default=d["steps"], help="training steps per brick")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--seq-len", type=int, default=d["seq_len"])
    p.add_argument("--train-per-capability", type=int, default=d["train_per_capability"],
                   help="training texts per capability")
    p.add_argument("--heldout-per-capability", type=int, default=d["heldout_per_capability"])
    p.set_defaults(func=_cmd_lora)

    p = sub.add_parser("retrieve", help="pick LoRA bricks per input by embedding similarity; accuracy + perplexity",
                       description=run_retrieve.__doc__)
    _common(p)
    p.add_argument("--bricks", required=True, help="the --out folder of `sparkformer bricks lora`")
    p.add_argument("--encoders", default="minilm,hidden",
                   help="comma list: minilm (packaged all-MiniLM-L6-v2), hidden (the base model's mean hidden state)")
    p.add_argument("--top-k", type=int, default=2, help="bricks in the similarity-weighted mixture")
    p.add_argument("--temperature", type=float, default=0.05, help="softmax temperature over cosine similarities")
    p.add_argument("--index-per-brick", type=int, default=16, help="training texts that represent each brick")
    p.add_argument("--seq-len", type=int, default=128)
    p.set_defaults(func=_cmd_retrieve)

    p = sub.add_parser("merge", help="merge LoRA bricks (linear, task arithmetic, TIES, DARE); perplexity table",
                       description=run_merge.__doc__)
    _common(p)
    p.add_argument("--bricks", required=True, help="the --out folder of `sparkformer bricks lora`")
    p.add_argument("--methods", default="linear,task_arithmetic,ties,dare",
                   help="comma list of registered merge methods")
    p.add_argument("--weights", default=None, help="comma list, one weight per brick (default: all 1)")
    p.add_argument("--scale", type=float, default=0.5, help="lambda of task_arithmetic and dare")
    p.add_argument("--density", type=float, default=0.5, help="TIES: fraction of each delta kept")
    p.add_argument("--drop", type=float, default=0.5, help="DARE: drop probability")
    p.add_argument("--negate", default=None, help="also evaluate base minus this brick (unlearning by subtraction)")
    p.add_argument("--save", action="store_true", help="save each merge as a PEFT LoRA (SVD, rank 8 x bricks)")
    p.add_argument("--seq-len", type=int, default=128)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("edit", help="ROME rank-one edits vs fine-tuning: efficacy, paraphrase, locality",
                       description=run_edit.__doc__)
    _common(p)
    p.add_argument("--relations", default="capital,language", help="built-in fact relations: capital,language,author")
    p.add_argument("--facts", default=None, help="a jsonl of facts instead (subject, prompt with {}, target_true, "
                                                 "target_new, paraphrases)")
    p.add_argument("--n-edits", type=int, default=12)
    p.add_argument("--sequential", type=int, default=6, help="edits applied one after another (0: skip)")
    p.add_argument("--n-locality", type=int, default=30)
    p.add_argument("--layer", default="default", help="'default' (int(0.2 * n_layers)), 'trace' (causal tracing), "
                                                      "or a layer index")
    p.add_argument("--methods", default="rome,ft",
                   help="comma list of rome (statistics: corpus + relation contexts of other entities), rome-corpus "
                        "(statistics: corpus only), ft (fine-tuning baseline)")
    p.add_argument("--stats-capabilities", default="reference,docstrings,drama",
                   help="corpus text for the second-moment statistics")
    p.add_argument("--stats-tokens", type=int, default=20000)
    p.add_argument("--v-steps", type=int, default=30)
    p.add_argument("--ft-steps", type=int, default=50, help="fine-tuning baseline: at most this many steps")
    p.add_argument("--ft-lr", type=float, default=2e-3)
    p.set_defaults(func=_cmd_edit)

    p = sub.add_parser("grow", help="width / depth / upcycling growth; train the new bricks on a new capability",
                       description=run_grow.__doc__)
    _common(p)
    p.add_argument("--new-capability", default="arithmetic")
    p.add_argument("--old-capabilities", default="code,docstrings,reference,drama")
    p.add_argument("--methods", default="width,depth,upcycle,full,lora")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train-texts", type=int, default=24)
    p.add_argument("--heldout-per-capability", type=int, default=6)
    p.add_argument("--width-neurons", type=int, default=256)
    p.add_argument("--depth-every", type=int, default=6)
    p.add_argument("--upcycle-every", type=int, default=6)
    p.add_argument("--upcycle-experts", type=int, default=4)
    p.add_argument("--from-layer", type=int, default=0,
                   help="grow (and LoRA) only layers >= this, so training back-propagates through the top only")
    p.add_argument("--route-encoder", default="minilm", choices=["hidden", "minilm", "none"],
                   help="also score routed growth: attach the new bricks only to inputs this retriever assigns to the "
                        "new capability (none: always-on only)")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                   help="learning rate per method, e.g. --lr full=3e-5 (defaults: width 2e-3, depth 1e-3, upcycle "
                        "3e-4, full 1e-4, lora 2e-3)")
    p.set_defaults(func=_cmd_grow)


add_bricks_cli = add_bricks_commands  # the name sparkformer.bricks.cli.BRICKS_COMMAND_MODULES looks for


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _cmd_lora(args: argparse.Namespace) -> int:
    cmd = _command("lora", args, {**LORA_DEFAULTS, "threads": None, "data": []}, ["model"])
    run_lora(args.model, args.out, args.capabilities, args.targets, parse_layers(args.layers), args.rank, args.alpha,
             args.steps, args.lr, args.batch_size, args.seq_len, args.train_per_capability,
             args.heldout_per_capability, args.seed, args.data, args.threads, cmd)
    return 0


def _cmd_retrieve(args: argparse.Namespace) -> int:
    cmd = _command("retrieve", args, {"bricks": None, "encoders": "minilm,hidden", "top_k": 2, "temperature": 0.05,
                                      "index_per_brick": 16, "seq_len": 128, "threads": None, "seed": 0},
                   ["model", "bricks"])
    run_retrieve(args.model, args.bricks, args.out, _csv(args.encoders), args.top_k, args.temperature,
                 args.index_per_brick, args.seq_len, args.threads, args.seed, cmd)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    cmd = _command("merge", args, {"bricks": None, "methods": "linear,task_arithmetic,ties,dare", "weights": None,
                                   "scale": 0.5, "density": 0.5, "drop": 0.5, "negate": None, "save": False,
                                   "seq_len": 128, "threads": None, "seed": 0}, ["model", "bricks"])
    weights = [float(x) for x in _csv(args.weights)] if args.weights else None
    run_merge(args.model, args.bricks, args.out, _csv(args.methods), weights, args.scale, args.density, args.drop,
              args.negate, args.seq_len, args.save, args.threads, args.seed, cmd)
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    cmd = _command("edit", args, {"relations": "capital,language", "facts": None, "n_edits": 12, "sequential": 6,
                                  "n_locality": 30, "layer": "default", "methods": "rome,ft",
                                  "stats_capabilities": "reference,docstrings,drama", "stats_tokens": 20000,
                                  "v_steps": 30, "ft_steps": 50, "ft_lr": 2e-3, "threads": None, "seed": 0},
                   ["model"])
    run_edit(args.model, args.out, args.relations, args.facts, args.n_edits, args.sequential, args.n_locality,
             args.layer, _csv(args.methods), args.stats_capabilities, args.stats_tokens, args.v_steps,
             args.ft_steps, args.ft_lr, args.threads, args.seed, cmd)
    return 0


def _cmd_grow(args: argparse.Namespace) -> int:
    lrs = {}
    for item in args.lr:
        if "=" not in item:
            raise ValueError(f"--lr {item!r}: expected METHOD=LR, e.g. full=3e-5")
        k, v = item.split("=", 1)
        lrs[k.strip()] = float(v)
    defaults = {"new_capability": "arithmetic", "old_capabilities": "code,docstrings,reference,drama",
                "methods": "width,depth,upcycle,full,lora", "steps": 20, "batch_size": 4, "seq_len": 128,
                "train_texts": 24, "heldout_per_capability": 6, "width_neurons": 256, "depth_every": 6,
                "upcycle_every": 6, "upcycle_experts": 4, "from_layer": 0, "route_encoder": "minilm",
                "threads": None, "seed": 0}
    cmd = _command("grow", args, defaults, ["model"])
    for item in args.lr:
        cmd += " --lr " + shlex.quote(item)
    run_grow(args.model, args.out, args.new_capability, args.old_capabilities, _csv(args.methods), args.steps,
             args.batch_size, args.seq_len, args.train_texts, args.heldout_per_capability, args.width_neurons,
             args.depth_every, args.upcycle_every, args.upcycle_experts, args.from_layer, lrs, args.threads,
             args.seed, cmd, None if args.route_encoder == "none" else args.route_encoder)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sparkformer.bricks.ops_cli <command> ...``: the same as ``sparkformer bricks <command> ...``."""
    from sparkformer.bricks.cli import main as bricks_main

    return bricks_main(argv)


if __name__ == "__main__":
    sys.exit(main())
