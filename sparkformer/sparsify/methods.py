"""The sparsification methods of ``sparkformer sparsify``: each turns a dense pretrained model into thresholds
(a :class:`~sparkformer.sparsity.SparseSpec`) or FFN routers, calibrated on calibration text.

    teal       training-free magnitude thresholds on the inputs of the matrices (TEAL, arXiv 2408.14690): scope ffn
               (gate/up input, down input) or model (+ q/k/v input, o input); per-site levels allocated to minimise
               the KL from the dense model (``calibrate.allocate``) or uniform; scope down: the down input alone
               (neurons skip their W_down row only)
    cats       training-free threshold on |act(gate)| (CATS, arXiv 2404.08763): the gate GEMV runs dense, the neurons
               under the threshold skip their up and down rows; ``sparsity`` = fraction of neurons skipped
    predictor  a low-rank neuron predictor per FFN layer fitted to the model's own gate/up (the Spark predictor idea
               for a pretrained gated FFN; ``sparkformer.bricks.sparkify``), statistical top-k on its scores;
               ``sparsity`` = fraction of neurons skipped
    oracle     (reference only, not a usable model: it needs the dense FFN) the neurons with the largest
               |act(g) * u| * ||W_down[:, i]||, exact top-k
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sparkformer.sparsify.calibrate import calibrate
from sparkformer.sparsity import SparseSpec

METHODS = ("teal", "cats", "predictor")


@dataclass
class Sparsified:
    spec: SparseSpec | None = None
    routers: list | None = None
    info: dict[str, Any] = field(default_factory=dict)


def check_supported(model) -> None:
    """Every method needs dense gated FFN layers (Llama / Gemma / Qwen / Mistral families, our GeGLU)."""
    kinds = sorted({getattr(b.ffn, "kind", type(b.ffn).__name__) for b in model.layers})
    if kinds != ["geglu"]:
        raise ValueError(f"sparsify needs dense gated FFN layers in every layer; this model has {kinds} (a Spark "
                         "model is sparse already: run it as it is)")


def teal(model, calib: torch.Tensor, sparsity: float, scope: str = "ffn", allocation: str = "greedy",
         sens_windows: torch.Tensor | None = None, table=None, log: Callable | None = None) -> Sparsified:
    if scope not in ("ffn", "model", "down"):
        raise ValueError(f"teal scope={scope!r}; allowed: ffn, model, down")
    spec, info = calibrate(model, calib, scope, sparsity, allocation, sens_windows, method="teal", table=table,
                           log=log)
    return Sparsified(spec=spec, info=info)


def cats(model, calib: torch.Tensor, sparsity: float, allocation: str = "uniform",
         sens_windows: torch.Tensor | None = None, table=None, log: Callable | None = None) -> Sparsified:
    spec, info = calibrate(model, calib, "cats", sparsity, allocation, sens_windows, method="cats", table=table,
                           log=log)
    return Sparsified(spec=spec, info=info)


def record_inputs(model, calib: torch.Tensor, batch: int = 8) -> list[torch.Tensor]:
    """Every FFN layer's inputs (tokens, d) on the calibration windows (dense model)."""
    from sparkformer.bricks.ffn_inputs import record_ffn_inputs
    from sparkformer.bricks.neurons import NeuronView

    return record_ffn_inputs(model, NeuronView(model), [w.tolist() for w in calib], batch, dtype=torch.float32)


def predictor(model, calib: torch.Tensor, sparsity: float, rank: int = 128, fit: str = "lsq", train_steps: int = 0,
              X: list[torch.Tensor] | None = None, verify: float = 1.0, log: Callable | None = None) -> Sparsified:
    """Low-rank predictors (``bricks.sparkify.fit_predictor``) keeping ``1 - sparsity`` of the neurons. ``verify``
    > 1: the predictor proposes ``verify`` times as many neurons; their gate/up rows are read, and only those whose
    exact |act(g_i) u_i| * ||W_down[:, i]|| passes a per-layer threshold (calibrated so that ``1 - sparsity`` of the
    neurons pass on the calibration tokens) read their down row and contribute."""
    from sparkformer.bricks.neurons import NeuronView
    from sparkformer.bricks.routing import ACTS
    from sparkformer.bricks.sparkify import SparkifyConfig, gated_parts, sparkify_model

    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
    if verify < 1.0:
        raise ValueError(f"verify={verify}: the proposed set is verify x the kept neurons, so verify >= 1")
    kept = 1.0 - sparsity
    proposed = min(1.0, verify * kept)
    X = X if X is not None else record_inputs(model, calib)
    cfg = SparkifyConfig(rank=rank, fit=fit, train_steps=train_steps, fraction=proposed)
    routers, infos = sparkify_model(model, X, cfg, log=log)
    if verify > 1.0:
        view = NeuronView(model)
        for r, layer, x in zip(routers, view, X):
            Wg, Wu, dn, act = gated_parts(layer)
            xs = x[:: max(1, x.shape[0] // 4096)].float()
            with torch.no_grad():
                a = ACTS[act](xs @ Wg.T) * (xs @ Wu.T)
                score = (a.abs() * dn) * r.neuron_mask(xs)
            k = max(1, round(kept * score.numel()))
            t = float(score.flatten().kthvalue(score.numel() - k).values) if k < score.numel() else 0.0
            r.set_verify(dn, t)
    info = {"config": cfg.__dict__, "fit": infos, "verify": verify, "proposed_fraction": proposed,
            "kept_fraction": kept}
    return Sparsified(routers=routers, info=info)


def oracle(model, sparsity: float) -> Sparsified:
    from sparkformer.bricks.neurons import NeuronView
    from sparkformer.bricks.routing import oracle_routers

    routers = oracle_routers(NeuronView(model), method="topk")
    for r in routers:
        r.fraction = 1.0 - sparsity
    return Sparsified(routers=routers, info={"reference": "oracle top-k of |act(g) * u| * ||W_down col||"})
