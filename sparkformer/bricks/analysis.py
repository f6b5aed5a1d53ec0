"""The three neuron studies of the configurable-foundation-models paper (§4), on any model :class:`NeuronView` reads.

1. Sparse activation: per layer, the distribution of normalised |activation| (divided by the per-token, per-layer
   max) and of normalised output magnitude ``|a_i| * ||W_down[:, i]||``; then the LM loss per capability when the
   p% lowest neurons (by either indicator) are zeroed on every token in every layer.
2. Functional specialisation: the functionality score of neuron n for capability f is the average precision of the
   per-prompt mean |activation| (over the prompt's tokens) against the label "this prompt is capability f". Per
   layer: best, top-0.5% (the AP of the neuron ranked at 0.5%), mean, and the same under shuffled labels. Then
   zero each capability's top-5% neurons per layer and measure the perplexity change on every capability.
3. Functional partition: overlap |A∩B|/|A| of the top-5% neuron sets of two capabilities (random: 0.05).

Statistics and scores use the *scoring* prompts; losses use the disjoint *held-out* prompts
(see :mod:`sparkformer.bricks.capabilities`). The model is only read, never changed.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from sparkformer.bricks.adapter import forward_logits
from sparkformer.bricks.capabilities import CapabilitySet
from sparkformer.bricks.experiment import (MODEL_HELP, PromptRun, add_command, arg, command_line, csv, load_model,
                                           log, start)
from sparkformer.bricks.lm import sequence_nll
from sparkformer.bricks.neurons import NeuronView
from sparkformer.bricks.report import write_report
from sparkformer.bricks.tokens import batches, encode, progress_bar, real_tokens, special_ids

INDICATORS = ("activation", "output")


@dataclass
class AnalysisConfig:
    max_tokens: int = PromptRun.max_tokens  # every prompt is cut to this many tokens (special tokens included)
    batch_size: int = PromptRun.batch_size
    mask_fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    top_fraction: float = 0.05  # size of a capability's neuron set (paper: top 5%)
    top_ap_fraction: float = 0.005  # "top-0.5%" AP statistic
    bins: int = 100  # histogram bins over the normalised [0, 1] range
    hist_tokens_per_batch: int = 256  # the CDFs use an evenly strided subsample of at most this many tokens a batch
    low_threshold: float = 0.2  # the paper's "80% of neurons fall below 0.2"
    seed: int = 0

    def validate(self) -> None:
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 2 (the loss needs a next token)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if not all(0.0 <= f < 1.0 for f in self.mask_fractions):
            raise ValueError(f"mask_fractions={self.mask_fractions} must lie in [0, 1)")
        if not 0.0 < self.top_fraction < 1.0:
            raise ValueError(f"top_fraction={self.top_fraction} must be in (0, 1)")


# ---- study 1: activation statistics ---------------------------------------------------------------------------------
def normalised(x: torch.Tensor) -> torch.Tensor:
    """x (..., n) >= 0 divided by its max over the last dim (rows that are all zero stay zero)."""
    m = x.amax(dim=-1, keepdim=True)
    return x / torch.where(m > 0, m, torch.ones_like(m))


@dataclass
class ActivationStats:
    """What one pass over the scoring prompts collects, per layer (lists: layers can differ in width)."""

    hist_activation: list[torch.Tensor]  # (bins,) counts of normalised |a| over (token, neuron)
    hist_output: list[torch.Tensor]  # (bins,) same for output magnitude
    zero_fraction: list[float]  # fraction of activations exactly 0 (a Spark FFN's selected sparsity)
    prompt_mean: list[torch.Tensor]  # (P, n) mean |a| over each prompt's tokens
    n_tokens: int


def collect_activation_stats(model: torch.nn.Module, view: NeuronView, token_lists: Sequence[Sequence[int]],
                             cfg: AnalysisConfig, skip_ids: set[int] = frozenset(), progress: bool = True,
                             ) -> ActivationStats:
    """One forward pass over ``token_lists`` recording the statistics of every layer's activation.
    Tokens in ``skip_ids`` (special tokens such as <bos>) are left out of every statistic."""
    L, P, bins = len(view), len(token_lists), cfg.bins
    hist_a = [torch.zeros(bins, dtype=torch.float64) for _ in range(L)]
    hist_o = [torch.zeros(bins, dtype=torch.float64) for _ in range(L)]
    zeros = [0.0] * L
    pmean = [torch.zeros(P, n) for n in view.n_neurons]
    norms = view.down_col_norms()
    state: dict[str, Any] = {"sampled": 0}
    n_tokens = 0

    def on_activation(i: int, a: torch.Tensor) -> None:
        valid, idx = state["valid"], state["idx"]
        a = a.detach().abs().float()
        flat = a[valid]  # (tokens, n)
        stride = max(1, math.ceil(flat.shape[0] / cfg.hist_tokens_per_batch))
        flat = flat[::stride]  # histograms are the costly part: an even subsample of tokens is enough for a CDF
        state["sampled"] += flat.shape[0]
        hist_a[i] += torch.histc(normalised(flat), bins=bins, min=0.0, max=1.0).double()
        hist_o[i] += torch.histc(normalised(flat * norms[i]), bins=bins, min=0.0, max=1.0).double()
        zeros[i] += float((flat == 0).sum())
        w = valid.float()
        sums = torch.einsum("bt,btn->bn", w, a)
        pmean[i][idx] = sums / w.sum(1, keepdim=True).clamp_min(1)

    n_batches = math.ceil(P / cfg.batch_size)
    with torch.inference_mode(), view.hook(on_activation):
        for idx, ids, valid in progress_bar(batches(token_lists, cfg.batch_size), n_batches, "activations",
                                            progress):
            valid = real_tokens(ids, valid, skip_ids)
            state["valid"], state["idx"] = valid, torch.tensor(idx)
            forward_logits(model, ids)
            n_tokens += int(valid.sum())
    sampled_per_layer = state["sampled"] / max(1, L)
    total = [max(1.0, sampled_per_layer * n) for n in view.n_neurons]
    return ActivationStats(hist_a, hist_o, [z / t for z, t in zip(zeros, total)], pmean, n_tokens)


def cdf(hist: torch.Tensor) -> torch.Tensor:
    """Cumulative fraction at the right edge of each bin."""
    c = hist.cumsum(0)
    return c / c[-1].clamp_min(1)


def fraction_below(hist: torch.Tensor, threshold: float) -> float:
    """Fraction of values below ``threshold`` (a bin edge of the [0, 1] histogram)."""
    k = int(round(threshold * hist.numel()))
    return float(hist[:k].sum() / hist.sum().clamp_min(1))


def lowest_fraction_mask(view: NeuronView, fraction: float, indicator: str = "activation"
                         ) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
    """A per-token rule for :meth:`NeuronView.mask`: True on the ``floor(fraction * n)`` neurons with the lowest
    |activation| (``indicator='activation'``) or output magnitude (``'output'``) of each token."""
    if indicator not in INDICATORS:
        raise ValueError(f"indicator={indicator!r}; allowed: {', '.join(INDICATORS)}")

    def rule(i: int, a: torch.Tensor) -> torch.Tensor | None:
        n = a.shape[-1]
        k = int(math.floor(fraction * n + 1e-9))
        if k <= 0:
            return None
        if k >= n:
            return torch.ones(a.shape, dtype=torch.bool, device=a.device)
        score = view.output_magnitude(i, a) if indicator == "output" else a.detach().abs().float()
        if k <= n // 2:  # select the k lowest
            low = score.topk(k, dim=-1, largest=False).indices
            return torch.zeros(a.shape, dtype=torch.bool, device=a.device).scatter_(-1, low, True)
        keep = score.topk(n - k, dim=-1).indices  # cheaper: select the n-k highest, zero the rest
        return torch.ones(a.shape, dtype=torch.bool, device=a.device).scatter_(-1, keep, False)

    return rule


def token_losses(model: torch.nn.Module, token_lists: Sequence[Sequence[int]], cfg: AnalysisConfig,
                 view: NeuronView | None = None, mask: Any = None, progress: bool = False, desc: str = "loss",
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt (sum of next-token NLL, number of predicted tokens), with ``mask`` applied through ``view``."""
    ctx = view.mask(mask) if (view is not None and mask is not None) else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        return sequence_nll(model, token_lists, cfg.batch_size, show_progress=progress, desc=desc)


def per_capability_loss(nll: torch.Tensor, cnt: torch.Tensor, labels: torch.Tensor, n_caps: int) -> list[float]:
    """Token-weighted mean NLL per capability."""
    return [float(nll[labels == c].sum() / cnt[labels == c].sum().clamp_min(1)) for c in range(n_caps)]


# ---- study 2: functionality scores --------------------------------------------------------------------------------
def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """AP of ``scores`` (P, ...) ranking the positives ``positive`` (C, P) bool, for every trailing column at once.

    Returns (C, ...). Ties are handled as in scikit-learn (one threshold per distinct score): a neuron whose score
    is constant gets AP = positive rate. A capability without positives gets NaN.
    """
    P = scores.shape[0]
    s, order = scores.sort(dim=0, descending=True, stable=True)  # (P, ...)
    y = positive.float()[:, order]  # (C, P, ...): y[c, p, n] = positive[c, order[p, n]]
    tp = y.cumsum(dim=1)
    # last index of each run of equal scores: precision is taken at the end of a tie group
    idx = torch.arange(P, device=scores.device).view(P, *([1] * (scores.dim() - 1))).expand_as(s)
    is_end = torch.ones_like(s, dtype=torch.bool)
    is_end[:-1] = s[:-1] != s[1:]
    end = torch.where(is_end, idx, torch.full_like(idx, P))
    end = end.flip(0).cummin(dim=0).values.flip(0)  # (P, ...) next group end at or after each position
    tp_end = tp.gather(1, end.unsqueeze(0).expand_as(tp))
    precision = tp_end / (end + 1).to(tp.dtype).unsqueeze(0)
    npos = positive.float().sum(1).view(-1, *([1] * (scores.dim() - 1)))
    return (y * precision).sum(1) / npos


def functionality_scores(prompt_mean: list[torch.Tensor], labels: torch.Tensor, n_caps: int) -> list[torch.Tensor]:
    """Per layer (C, n): AP of each neuron's per-prompt mean |activation| for each capability."""
    positive = torch.stack([labels == c for c in range(n_caps)])  # (C, P)
    return [average_precision(pm, positive) for pm in prompt_mean]


def ap_summary(ap: list[torch.Tensor], top_fraction: float = 0.005) -> dict[str, list[list[float]]]:
    """Per capability, per layer: best AP, AP of the neuron ranked at ``top_fraction``, mean AP."""
    out: dict[str, list[list[float]]] = {"best": [], "top": [], "mean": []}
    C = ap[0].shape[0]
    for c in range(C):
        best, top, mean = [], [], []
        for layer in ap:
            v = layer[c]
            k = max(1, math.ceil(top_fraction * v.numel()))
            best.append(float(v.max()))
            top.append(float(v.topk(k).values[-1]))
            mean.append(float(v.mean()))
        out["best"].append(best)
        out["top"].append(top)
        out["mean"].append(mean)
    return out


def top_neurons(ap: list[torch.Tensor], fraction: float = 0.05) -> list[torch.Tensor]:
    """Per layer (C, n) bool: each capability's ``ceil(fraction * n)`` highest-scoring neurons."""
    out = []
    for layer in ap:
        C, n = layer.shape
        k = max(1, math.ceil(fraction * n))
        idx = layer.topk(k, dim=1).indices
        out.append(torch.zeros(C, n, dtype=torch.bool).scatter_(1, idx, True))
    return out


# ---- study 3: partition ---------------------------------------------------------------------------------------------
def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A| for two bool masks over the same neurons."""
    na = int(a.sum())
    return float((a & b).sum()) / na if na else float("nan")


def overlap_matrix(top: list[torch.Tensor]) -> torch.Tensor:
    """(C, C, L): overlap of capability i's top set with capability j's, per layer."""
    C = top[0].shape[0]
    out = torch.zeros(C, C, len(top))
    for li, t in enumerate(top):
        tf = t.float()
        inter = tf @ tf.T  # (C, C)
        out[:, :, li] = inter / tf.sum(1, keepdim=True).clamp_min(1)
    return out


# ---- the whole analysis -------------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    name: str
    architecture: str
    n_layers: int
    n_neurons: list[int]
    ffn_kinds: list[str]
    n_params: int
    dtype: str
    notes: str = ""


def _lists(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x


def _pct_change(loss: float, base: float) -> float:
    return (math.exp(loss - base) - 1.0) * 100.0


def analyze(model: torch.nn.Module, tokenizer: Any, capset: CapabilitySet, cfg: AnalysisConfig | None = None,
            name: str = "model", notes: str = "", progress: bool = True, log: Callable[[str], None] = print,
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the three studies. Returns (results, arrays): ``results`` is JSON-ready; ``arrays`` holds per-layer
    tensors (``ap``: per layer (C, n) functionality scores, ``top``: the top sets) for :mod:`report` and later
    brick tools."""
    cfg = cfg or AnalysisConfig()
    cfg.validate()
    t_start = time.time()
    timings: dict[str, float] = {}
    model.eval()
    limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    if isinstance(limit, int) and cfg.max_tokens > limit:
        raise ValueError(f"max_tokens={cfg.max_tokens} exceeds the model's max_seq_len={limit}; lower --max-tokens")
    view = NeuronView(model)
    caps = capset.capabilities
    C = len(caps)
    info = ModelInfo(name, view.arch, len(view), view.n_neurons, view.kinds,
                     sum(p.numel() for p in model.parameters()), str(next(model.parameters()).dtype), notes)

    score_p, held_p = capset.score, capset.heldout
    score_tok = encode(tokenizer, [p.text for p in score_p], cfg.max_tokens)
    held_tok = encode(tokenizer, [p.text for p in held_p], cfg.max_tokens)
    cap_index = {c: i for i, c in enumerate(caps)}
    score_lab = torch.tensor([cap_index[p.capability] for p in score_p])
    held_lab = torch.tensor([cap_index[p.capability] for p in held_p])
    skip = special_ids(tokenizer)
    tokens_per_cap = {c: [int(sum(len(score_tok[i]) for i in range(len(score_p)) if score_lab[i] == k)),
                          int(sum(len(held_tok[i]) for i in range(len(held_p)) if held_lab[i] == k))]
                      for k, c in enumerate(caps)}

    # 1. statistics over the scoring prompts
    t = time.time()
    log(f"[{name}] activation statistics: {len(score_p)} prompts, {sum(map(len, score_tok))} tokens")
    stats = collect_activation_stats(model, view, score_tok, cfg, skip, progress)
    timings["statistics"] = time.time() - t
    L = len(view)
    below = {ind: [fraction_below(h, cfg.low_threshold) for h in hists]
             for ind, hists in (("activation", stats.hist_activation), ("output", stats.hist_output))}
    total_hist = {ind: torch.stack(h).sum(0) for ind, h in
                  (("activation", stats.hist_activation), ("output", stats.hist_output))}

    # 1b. masking sweep on the held-out prompts
    t = time.time()
    base_nll, base_cnt = token_losses(model, held_tok, cfg)
    base_loss = per_capability_loss(base_nll, base_cnt, held_lab, C)
    base_all = float(base_nll.sum() / base_cnt.sum())
    sweep: dict[str, dict[str, list[float]]] = {ind: {c: [] for c in caps + ["all"]} for ind in INDICATORS}
    runs = [(ind, f) for ind in INDICATORS for f in cfg.mask_fractions]
    for ind, f in progress_bar(runs, len(runs), "masking sweep", progress):
        if f == 0.0:
            nll, cnt = base_nll, base_cnt
        else:
            nll, cnt = token_losses(model, held_tok, cfg, view, lowest_fraction_mask(view, f, ind))
        for k, v in enumerate(per_capability_loss(nll, cnt, held_lab, C)):
            sweep[ind][caps[k]].append(v)
        sweep[ind]["all"].append(float(nll.sum() / cnt.sum()))
    timings["masking_sweep"] = time.time() - t

    # 2. functionality scores
    t = time.time()
    ap = functionality_scores(stats.prompt_mean, score_lab, C)
    g = torch.Generator().manual_seed(cfg.seed)
    shuffled_lab = score_lab[torch.randperm(len(score_lab), generator=g)]
    ap_shuf = functionality_scores(stats.prompt_mean, shuffled_lab, C)
    summary = ap_summary(ap, cfg.top_ap_fraction)
    summary_shuf = ap_summary(ap_shuf, cfg.top_ap_fraction)
    top = top_neurons(ap, cfg.top_fraction)
    timings["scores"] = time.time() - t

    # 2b. prune matrix: zero capability i's top set, loss on every capability j (+ a random set of the same size)
    t = time.time()
    rows = caps + ["random"]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    random_sets = {li: torch.randperm(n, generator=gen)[: max(1, math.ceil(cfg.top_fraction * n))]
                   for li, n in enumerate(view.n_neurons)}
    prune_loss = []
    for r in progress_bar(rows, len(rows), "prune matrix", progress):
        spec = random_sets if r == "random" else {li: top[li][cap_index[r]] for li in range(L)}
        nll, cnt = token_losses(model, held_tok, cfg, view, spec)
        prune_loss.append(per_capability_loss(nll, cnt, held_lab, C))
    prune_pct = [[_pct_change(prune_loss[i][j], base_loss[j]) for j in range(C)] for i in range(len(rows))]
    timings["prune_matrix"] = time.time() - t

    # 3. partition
    ov = overlap_matrix(top)  # (C, C, L)
    ov_shuf = overlap_matrix(top_neurons(ap_shuf, cfg.top_fraction))
    diag = torch.eye(C, dtype=torch.bool)
    off = ov.mean(-1)[~diag]
    timings["total"] = time.time() - t_start

    diag_pct = [prune_pct[i][i] for i in range(C)]
    off_pct = [prune_pct[i][j] for i in range(C) for j in range(C) if i != j]
    results: dict[str, Any] = {
        "model": asdict(info),
        "data": {
            "capabilities": caps,
            "descriptions": capset.description,
            "n_score_per_capability": len(score_p) // C,
            "n_heldout_per_capability": len(held_p) // C,
            "tokens_per_capability": tokens_per_cap,
            "n_tokens_scored": stats.n_tokens,
            "seed": capset.seed,
        },
        "config": asdict(cfg),
        "sparsity": {
            "bins": cfg.bins,
            "cdf_activation": [cdf(h).tolist() for h in stats.hist_activation],
            "cdf_output": [cdf(h).tolist() for h in stats.hist_output],
            "frac_below_threshold": below,
            "frac_below_threshold_all_layers": {k: fraction_below(v, cfg.low_threshold)
                                                for k, v in total_hist.items()},
            "zero_fraction": stats.zero_fraction,
            "masking": {"fractions": list(cfg.mask_fractions), "base_loss": dict(zip(caps, base_loss)),
                        "base_loss_all": base_all, "loss": sweep},
        },
        "specialisation": {
            "ap": summary,
            "ap_shuffled": summary_shuf,
            "layers_best_above_0.8": {c: sum(v > 0.8 for v in summary["best"][k]) for k, c in enumerate(caps)},
            "layers_top_above_0.8": {c: sum(v > 0.8 for v in summary["top"][k]) for k, c in enumerate(caps)},
            "prune": {"rows": rows, "columns": caps, "base_loss": base_loss, "loss": prune_loss,
                      "ppl_change_pct": prune_pct,
                      "diagonal_mean_pct": sum(diag_pct) / C,
                      "off_diagonal_mean_pct": sum(off_pct) / max(1, len(off_pct)),
                      "off_diagonal_median_pct": float(torch.tensor(off_pct).median()) if off_pct else float("nan"),
                      "diagonal_dominant_columns": sum(
                          prune_pct[j][j] == max(prune_pct[i][j] for i in range(C)) for j in range(C))},
        },
        "partition": {
            "overlap": ov.mean(-1).tolist(),
            "overlap_per_layer": ov.tolist(),
            "off_diagonal_mean": float(off.mean()) if off.numel() else float("nan"),
            "off_diagonal_min": float(off.min()) if off.numel() else float("nan"),
            "off_diagonal_max": float(off.max()) if off.numel() else float("nan"),
            "shuffled_off_diagonal_mean": float(ov_shuf.mean(-1)[~diag].mean()) if off.numel() else float("nan"),
            "random_expected": cfg.top_fraction,
        },
        "timings_s": timings,
    }
    arrays = {"ap": ap, "ap_shuffled": ap_shuf, "top": top}
    return _lists(results), arrays


# ---- the experiment: `sparkformer bricks analyze` -------------------------------------------------------------------
def mask_fractions(s: str) -> tuple[float, ...]:
    """'0.1,0.5' -> (0.0, 0.1, 0.5): fractions in [0, 1), sorted, 0 (no masking) always included."""
    try:
        fr = tuple(float(x) for x in csv(s))
    except ValueError:
        raise ValueError(f"--mask-fractions {s!r}: expected a comma list of numbers in [0, 1)") from None
    if not fr or any(not 0 <= f < 1 for f in fr):
        raise ValueError(f"--mask-fractions {s!r}: every fraction must be in [0, 1)")
    return tuple(sorted(set(fr) | {0.0}))


@dataclass(kw_only=True)
class AnalyzeRun(PromptRun):
    """Settings of ``sparkformer bricks analyze`` (several models share the same prompts)."""

    model: list[str] = arg([], MODEL_HELP + "; repeat to analyse several models with the same prompts",
                           required=True)
    out: str = arg(help="output folder: report.md, and per model results.json, neuron_scores.safetensors and PNG "
                        "plots", required=True)
    mask_fractions: tuple[float, ...] = arg(AnalysisConfig.mask_fractions, "comma list of fractions of the lowest "
                                            "neurons to zero per token", parse=mask_fractions)
    top_fraction: float = arg(AnalysisConfig.top_fraction, "size of a capability's neuron set (paper: 0.05)")
    progress: bool = arg(True, "show progress bars (--no-progress: none)")


def run_analyze(run: AnalyzeRun, model: torch.nn.Module | None = None, tokenizer: Any = None,
                capset: CapabilitySet | None = None, log: Callable[[str], None] = log) -> dict[str, Any]:
    """Python API of ``sparkformer bricks analyze``: the three studies on every model of ``run.model`` (or on a model
    object given to this function) with the same prompts, written under ``run.out`` (report.md; per model results.json,
    neuron_scores.safetensors, PNG plots). Returns ``{"report": path of report.md, "results": [per model]}``."""
    start(run)
    cfg = AnalysisConfig(max_tokens=run.max_tokens, batch_size=run.batch_size,
                         mask_fractions=tuple(run.mask_fractions), top_fraction=run.top_fraction, seed=run.seed)
    cfg.validate()
    if run.prompts_per_capability < 2 or run.heldout_per_capability < 1:
        raise ValueError("need --prompts-per-capability >= 2 and --heldout-per-capability >= 1")
    todo = [(name, None) for name in run.model] if model is None else [(run.model[0] if run.model else "", model)]
    # the models first (the first loaded, the others checked), the prompts after: a missing path or an unknown name
    # fails at once, not after the prompts are built
    from sparkformer.pretrained import model_source

    for name, given in todo[1:]:
        if given is None:
            model_source(name)
    t = time.time()
    first = load_model(*todo[0], tokenizer, log=log)
    first_load = time.time() - t
    t0 = time.time()
    capset = capset or run.prompts()
    log(f"capabilities: {', '.join(capset.capabilities)} ({len(capset.score)} scoring + {len(capset.heldout)} "
        f"held-out prompts, built in {time.time() - t0:.0f} s)")
    results, arrays = [], []
    for i, (name, given) in enumerate(todo):
        t = time.time()
        m, tok, name, description = first if i == 0 else load_model(name, given, tokenizer, log=log)
        first = None
        res, arr = analyze(m, tok, capset, cfg, name=name, notes=f"Weights: {description}." if description else "",
                           progress=run.progress, log=log)
        res["timings_s"]["load"] = (time.time() - t - res["timings_s"]["total"]) + (first_load if i == 0 else 0.0)
        results.append(res)
        arrays.append(arr)
        del m
    return {"report": write_report(results, arrays, run.out, command_line("analyze", run)), "results": results}


def add_cli(subparsers) -> None:
    add_command(subparsers, "analyze", AnalyzeRun, run_analyze,
                help="FFN neuron sparsity, specialisation and partition (paper section 4) -> JSON, PNG, Markdown",
                summary=lambda res: (f"wrote {res['report']}", {"report": str(res["report"])}))
