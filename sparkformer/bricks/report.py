"""Write the neuron studies: ``results.json``, ``neuron_scores.safetensors``, PNG plots and a Markdown report.

Layout of ``--out DIR`` (one sub-folder per model when several are analysed):

    DIR/report.md                       every figure and table, each under the command that reproduces it
    DIR/<model>/results.json            all numbers (see :func:`sparkformer.bricks.analysis.analyze`)
    DIR/<model>/neuron_scores.safetensors  per layer: ``ap.{layer}`` (capabilities x neurons) functionality scores,
                                        ``top.{layer}`` (uint8) top-5% sets; metadata: capabilities (JSON)
    DIR/<model>/*.png                   cdf, sparsity_layers, masking, ap_layers, prune_matrix, overlap
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparkformer.bricks.experiment import add_command, arg, md_table, pyplot, write_json

# The paper's numbers (Xiao et al. 2024, §4; Llama-3-8B-Instruct and Mistral-7B-Instruct-v0.3, 7 capabilities x
# 1,000 Infinity-Instruct prompts), as the shared spec quotes them.
PAPER = {
    "frac_below_0.2": "~0.80 of neurons below 0.2 (normalised activation)",
    "masking": "up to ~70% (activation) / ~80% (output magnitude) of the lowest neurons masked with the loss "
               "barely changed; output magnitude is the better indicator",
    "ap": "coding, math and translation neurons score AP > 0.8 in most layers",
    "prune": "diagonal dominates (e.g. Llama translation +444%); off-diagonal mostly +3% to +25%",
    "overlap": "0.00-0.04 off-diagonal (translation-linguistic 0.08-0.09); random 0.05",
}


def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(name)).name if Path(str(name)).exists() else str(name))
    return s.strip("-.") or "model"


def save_arrays(arrays: dict[str, Any], capabilities: list[str], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, a in enumerate(arrays["ap"]):
        tensors[f"ap.{i}"] = a.float().contiguous()
    for i, t in enumerate(arrays["top"]):
        tensors[f"top.{i}"] = t.to(torch.uint8).contiguous()
    save_file(tensors, str(path), metadata={"capabilities": json.dumps(capabilities),
                                             "n_layers": str(len(arrays["ap"]))})


def load_neuron_scores(path: str | Path) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """(capabilities, per-layer AP (C, n), per-layer top sets (C, n) bool) from ``neuron_scores.safetensors``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        n = int(meta["n_layers"])
        ap = [f.get_tensor(f"ap.{i}") for i in range(n)]
        top = [f.get_tensor(f"top.{i}").bool() for i in range(n)]
    return json.loads(meta["capabilities"]), ap, top


# ---- plots ---------------------------------------------------------------------------------------------------------
def _layer_colors(L: int):
    plt = pyplot()
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(1, L - 1)) for i in range(L)]


def plot_cdf(res: dict, path: Path) -> None:
    plt = pyplot()
    sp = res["sparsity"]
    L, bins = len(sp["cdf_activation"]), sp["bins"]
    x = [(i + 1) / bins for i in range(bins)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = _layer_colors(L)
    for ax, key, title in ((axes[0], "cdf_activation", "normalised |activation|"),
                           (axes[1], "cdf_output", "normalised output magnitude")):
        for li, c in enumerate(sp[key]):
            ax.plot([0] + x, [0] + c, color=colors[li], lw=0.8, alpha=0.8)
        ax.axvline(0.2, color="k", ls=":", lw=1)
        ax.set_xlabel(title)
        ax.set_title(f"{title}: {sp['frac_below_threshold_all_layers'][key.split('_')[1]]:.2f} below 0.2")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cumulative fraction of neurons")
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, L - 1))
    fig.colorbar(sm, ax=axes, label="layer")
    fig.suptitle(f"{res['model']['name']}: FFN neuron activations, normalised per token and layer (max = 1)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_sparsity_layers(res: dict, path: Path) -> None:
    plt = pyplot()
    sp = res["sparsity"]
    L = len(sp["zero_fraction"])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(range(L), sp["frac_below_threshold"]["activation"], "o-", ms=3, label="|activation| < 0.2 max")
    ax.plot(range(L), sp["frac_below_threshold"]["output"], "s-", ms=3, label="output magnitude < 0.2 max")
    ax.plot(range(L), sp["zero_fraction"], "^-", ms=3, label="activation exactly 0")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of neurons")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{res['model']['name']}: per-layer sparsity")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_masking(res: dict, path: Path) -> None:
    plt = pyplot()
    m = res["sparsity"]["masking"]
    fr = [100 * f for f in m["fractions"]]
    caps = res["data"]["capabilities"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, ind in zip(axes, ("activation", "output")):
        for c in caps + ["all"]:
            ax.plot(fr, m["loss"][ind][c], "o-" if c != "all" else "k--", ms=3, label=c, lw=2 if c == "all" else 1)
        ax.set_xlabel(f"lowest neurons zeroed per token and layer (%), by {ind}")
        ax.set_title(f"indicator: {'|activation|' if ind == 'activation' else 'output magnitude'}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("LM loss (nats/token, held-out prompts)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{res['model']['name']}: loss when the lowest neurons are zeroed")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_ap_layers(res: dict, path: Path) -> None:
    plt = pyplot()
    caps = res["data"]["capabilities"]
    sp = res["specialisation"]
    n = len(caps)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), sharex=True, sharey=True, squeeze=False)
    for k, c in enumerate(caps):
        ax = axes[k // cols][k % cols]
        L = len(sp["ap"]["best"][k])
        ax.plot(range(L), sp["ap"]["best"][k], "-", label="best")
        ax.plot(range(L), sp["ap"]["top"][k], "-", label="top 0.5%")
        ax.plot(range(L), sp["ap"]["mean"][k], "-", label="mean")
        ax.plot(range(L), sp["ap_shuffled"]["best"][k], ":", color="gray", label="best, shuffled labels")
        ax.axhline(0.8, color="k", lw=0.6, ls="--")
        ax.set_title(c)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    for r in axes:
        r[0].set_ylabel("average precision")
    fig.suptitle(f"{res['model']['name']}: neuron functionality scores per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _heatmap(mat: list[list[float]], rows: list[str], cols: list[str], title: str, path: Path, fmt: str,
             cbar: str, log: bool = False) -> None:
    plt = pyplot()
    from matplotlib.colors import LogNorm, Normalize

    t = torch.tensor(mat, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.5, 0.8 * len(rows) + 1.5))
    if log:
        v = t.clamp_min(0.1)
        norm = LogNorm(vmin=float(v.min()), vmax=max(float(v.max()), float(v.min()) * 10))
    else:
        v = t
        norm = Normalize(vmin=0, vmax=max(1e-9, float(t.max())))
    im = ax.imshow(v.numpy(), cmap="magma_r" if log else "Blues", norm=norm)
    for i in range(len(rows)):
        for j in range(len(cols)):
            val = mat[i][j]
            frac = norm(v[i, j].item())
            ax.text(j, i, format(val, fmt), ha="center", va="center", fontsize=8,
                    color="white" if frac > 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    fig.colorbar(im, ax=ax, label=cbar)
    ax.set_title(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_prune(res: dict, path: Path) -> None:
    p = res["specialisation"]["prune"]
    _heatmap(p["ppl_change_pct"], [f"zero top-5% of {r}" if r != "random" else "zero random 5%" for r in p["rows"]],
             [f"ppl on {c}" for c in p["columns"]],
             f"{res['model']['name']}: perplexity change (%) when a capability's neurons are zeroed", path, ".0f",
             "perplexity change (%)", log=True)


def plot_overlap(res: dict, path: Path) -> None:
    caps = res["data"]["capabilities"]
    _heatmap(res["partition"]["overlap"], caps, caps,
             f"{res['model']['name']}: overlap |A∩B|/|A| of top-5% neuron sets (random 0.05)", path, ".2f",
             "overlap (mean over layers)")


PLOTS = {
    "cdf.png": plot_cdf,
    "sparsity_layers.png": plot_sparsity_layers,
    "masking.png": plot_masking,
    "ap_layers.png": plot_ap_layers,
    "prune_matrix.png": plot_prune,
    "overlap.png": plot_overlap,
}


def write_plots(res: dict, folder: Path) -> list[str]:
    written = []
    for name, fn in PLOTS.items():
        fn(res, folder / name)
        written.append(name)
    return written


# ---- Markdown ------------------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[Any]], fmt: str | None = None) -> str:
    """A Markdown table; floats get ``fmt`` (default: 3 decimals)."""
    return md_table(header, rows, fmt or ".3f")


def summary_line(res: dict) -> dict[str, Any]:
    """The headline numbers of one model (for comparison tables)."""
    sp, spec, part = res["sparsity"], res["specialisation"], res["partition"]
    m = sp["masking"]
    caps = res["data"]["capabilities"]

    def tolerated(ind: str, rel: float = 0.05) -> float:
        """Largest masked fraction with the overall loss within +rel (relative) of unmasked."""
        base = m["base_loss_all"]
        ok = [f for f, v in zip(m["fractions"], m["loss"][ind]["all"]) if v <= base * (1 + rel)]
        return max(ok) if ok else 0.0

    return {
        "model": res["model"]["name"],
        "below_0.2_activation": sp["frac_below_threshold_all_layers"]["activation"],
        "below_0.2_output": sp["frac_below_threshold_all_layers"]["output"],
        "zero_fraction": sum(sp["zero_fraction"]) / len(sp["zero_fraction"]),
        "mask_ok_activation": tolerated("activation"),
        "mask_ok_output": tolerated("output"),
        "layers_best_ap_above_0.8": {c: spec["layers_best_above_0.8"][c] for c in caps},
        "prune_diag_mean_pct": spec["prune"]["diagonal_mean_pct"],
        "prune_offdiag_median_pct": spec["prune"]["off_diagonal_median_pct"],
        "overlap_offdiag_mean": part["off_diagonal_mean"],
    }


def model_section(res: dict, rel: str, command: str) -> str:
    """Markdown for one model; ``rel`` is the folder of its plots relative to the report."""
    caps = res["data"]["capabilities"]
    C = len(caps)
    mi, data, sp, spec, part = res["model"], res["data"], res["sparsity"], res["specialisation"], res["partition"]
    s = summary_line(res)
    L = mi["n_layers"]
    kinds = sorted(set(mi["ffn_kinds"]))
    pre = f"{rel}/" if rel else ""
    lines = [f"## {mi['name']}", ""]
    lines.append(f"{mi['architecture']}, {L} FFN layers ({', '.join(kinds)}), "
                 f"{min(mi['n_neurons'])}{'' if min(mi['n_neurons']) == max(mi['n_neurons']) else '-' + str(max(mi['n_neurons']))}"
                 f" neurons per layer, {mi['n_params'] / 1e6:.1f}M parameters, {mi['dtype']}."
                 + (f" {mi['notes']}" if mi["notes"] else ""))
    lines += ["", f"Data: {C} capabilities x {data['n_score_per_capability']} scoring prompts (statistics, scores) + "
              f"{data['n_heldout_per_capability']} held-out prompts (losses), at most {res['config']['max_tokens']} "
              f"tokens each, seed {data['seed']}; {data['n_tokens_scored']} scored tokens. Runtime "
              f"{res['timings_s']['total']:.0f} s.", ""]
    lines.append(_table(["capability", "source", "tokens (scoring / held-out)"],
                        [[c, data["descriptions"].get(c, ""), "{} / {}".format(*data["tokens_per_capability"][c])]
                         for c in caps]))
    reproduce = f"Reproduce: `{command}`"

    # 1. sparsity
    lines += ["", "### 1. Sparse activation", "", reproduce, "",
              f"![CDF]({pre}cdf.png)", "", f"![per-layer sparsity]({pre}sparsity_layers.png)", "",
              f"Fraction of (token, neuron) pairs below 0.2 of the token's layer max: **{s['below_0.2_activation']:.3f}** "
              f"by |activation|, **{s['below_0.2_output']:.3f}** by output magnitude (paper: {PAPER['frac_below_0.2']}). "
              f"Exactly-zero activations: {s['zero_fraction']:.3f} on average over layers.", "",
              f"![masking]({pre}masking.png)", ""]
    m = sp["masking"]
    hdr = ["zeroed"] + [f"{100 * f:g}%" for f in m["fractions"]]
    rows = [[f"{ind}: all"] + m["loss"][ind]["all"] for ind in ("activation", "output")]
    rows += [[f"{ind}: {c}"] + m["loss"][ind][c] for ind in ("activation", "output") for c in caps]
    lines += ["Held-out LM loss (nats/token) when the lowest neurons of every token are zeroed in every layer:", "",
              _table(hdr, rows), "",
              f"Largest fraction with the overall loss within +5% of unmasked: **{100 * s['mask_ok_activation']:g}%** "
              f"by activation, **{100 * s['mask_ok_output']:g}%** by output magnitude (paper: {PAPER['masking']}).", ""]

    # 2. specialisation
    ap, apr = spec["ap"], spec["ap_shuffled"]

    def avg(v: list[float]) -> float:
        return sum(v) / len(v)

    lines += ["### 2. Functional specialisation", "", reproduce, "", f"![AP per layer]({pre}ap_layers.png)", "",
              "Average precision of each neuron's per-prompt mean |activation| for \"this prompt is capability f\" "
              "(averaged over layers; top 0.5% = AP of the neuron ranked at 0.5%; shuffled = same with permuted labels):",
              "", _table(["capability", "best", "top 0.5%", "mean", "shuffled best", "shuffled mean",
                          f"layers with best > 0.8 (of {L})", "layers with top 0.5% > 0.8"],
                         [[c, avg(ap["best"][k]), avg(ap["top"][k]), avg(ap["mean"][k]), avg(apr["best"][k]),
                           avg(apr["mean"][k]), spec["layers_best_above_0.8"][c], spec["layers_top_above_0.8"][c]]
                          for k, c in enumerate(caps)]),
              "", f"Paper: {PAPER['ap']}.", "", f"![prune matrix]({pre}prune_matrix.png)", ""]
    p = spec["prune"]
    lines += ["Perplexity change (%) on each capability's held-out prompts (columns) when the top-5% neurons of one "
              "capability (rows) are zeroed in every layer; last row: a random 5% of neurons:", "",
              _table(["zeroed \\ ppl on"] + caps, [[r] + v for r, v in zip(p["rows"], p["ppl_change_pct"])],
                     "+.1f"), "",
              f"Diagonal mean **{p['diagonal_mean_pct']:.0f}%**, off-diagonal median **{p['off_diagonal_median_pct']:.0f}%** "
              f"(mean {p['off_diagonal_mean_pct']:.0f}%); the diagonal is the largest entry of its column in "
              f"{p['diagonal_dominant_columns']} of {C} columns. Unmasked held-out loss: "
              + ", ".join(f"{c} {v:.3f}" for c, v in zip(caps, p["base_loss"])) + f". Paper: {PAPER['prune']}.", ""]

    # 3. partition
    lines += ["### 3. Functional partition", "", reproduce, "", f"![overlap]({pre}overlap.png)", "",
              "Overlap of the row capability's top-5% set A with the column's B, |A∩B| / |A|, mean over layers:", "",
              _table(["A \\ B"] + caps, [[c] + row for c, row in zip(caps, part["overlap"])]), "",
              f"Off-diagonal mean **{part['off_diagonal_mean']:.3f}** (min {part['off_diagonal_min']:.3f}, max "
              f"{part['off_diagonal_max']:.3f}); with shuffled labels {part['shuffled_off_diagonal_mean']:.3f}; random "
              f"sets {part['random_expected']:.2f}. Paper: {PAPER['overlap']}.", ""]
    return "\n".join(lines)


def comparison(results: list[dict]) -> str:
    rows = []
    for r in results:
        s = summary_line(r)
        rows.append([s["model"], s["below_0.2_activation"], s["below_0.2_output"], s["zero_fraction"],
                     f"{100 * s['mask_ok_activation']:g}% / {100 * s['mask_ok_output']:g}%",
                     f"{s['prune_diag_mean_pct']:.0f}% / {s['prune_offdiag_median_pct']:.0f}%",
                     s["overlap_offdiag_mean"]])
    rows.append(["paper (Llama-3-8B / Mistral-7B)", "~0.8", "-", "-", "~70% / ~80%", "e.g. +444% / 3-25%",
                 "0.00-0.04"])
    return _table(["model", "below 0.2 (act)", "below 0.2 (out)", "exactly 0", "maskable at +5% loss (act / out)",
                   "prune ppl change diag mean / off-diag median", "overlap off-diag"], rows)


def write_report(results: list[dict], arrays: list[dict], out: str | Path, command: str) -> Path:
    """Write everything under ``out``; returns the path of ``report.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folders: list[str] = []
    for res, arr in zip(results, arrays):
        name = slug(res["model"]["name"])
        while name in folders:
            name += "_"
        folders.append(name)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "results.json", {**res, "command": command})
        save_arrays(arr, res["data"]["capabilities"], folder / "neuron_scores.safetensors")
    write_json(out / "index.json", {"command": command, "models": folders})
    return render(out)


def render(out: str | Path) -> Path:
    """(Re)draw the plots and report.md of an analysis folder from its results.json files (no model needed)."""
    out = Path(out)
    index = json.loads((out / "index.json").read_text())
    command = index["command"]
    results, sections = [], []
    for name in index["models"]:
        res = json.loads((out / name / "results.json").read_text())
        results.append(res)
        write_plots(res, out / name)
        sections.append(model_section(res, name, command))
    head = ["# FFN neuron sparsity, specialisation and partition", "",
            f"Command: `{command}`", "",
            "Method: Xiao et al., *Configurable Foundation Models* (2024), §4. Activation = input of the FFN down "
            "projection; output magnitude = |activation| x ||down-projection column||. Statistics and scores on the "
            "scoring prompts, losses on disjoint held-out prompts.", "",
            comparison(results), ""]
    path = out / "report.md"
    path.write_text("\n".join(head + sections))
    return path


# ---- `sparkformer bricks report` ------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RenderRun:
    out: str = arg(help="the --out folder of a previous `sparkformer bricks analyze`", positional=True)


def run_render(run: RenderRun) -> Path:
    """Python API of ``sparkformer bricks report``: re-render an analyze output folder (plots + report.md) from its
    results.json files, without the model; returns the path of report.md."""
    if not (Path(run.out) / "index.json").is_file():
        raise FileNotFoundError(f"{run.out}: no index.json; give the --out folder of `sparkformer bricks analyze`")
    return render(run.out)


def add_cli(subparsers) -> None:
    add_command(subparsers, "report", RenderRun, run_render,
                help="redraw the plots and report.md of an analyze folder from its results.json",
                summary=lambda path: (f"wrote {path}", {"report": str(path)}))
