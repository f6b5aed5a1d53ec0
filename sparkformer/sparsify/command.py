"""``sparkformer sparsify``: a pretrained model in, a sparse model folder out, with its held-out quality measured.

    sparkformer sparsify --model smollm2-135m --method teal --scope ffn --sparsity 0.5 --out runs/sparse/teal50
    sparkformer generate --model runs/sparse/teal50 --dtype bf16 --prompt "The capital of France is"
    sparkformer eval --model runs/sparse/teal50          # its own text; the held-out domains are in results.json
    sparkformer bench decode --model runs/sparse/teal50 --dtype bf16

The folder (``sparkformer.loading`` loads it as a model):

    sparsity.json           the per-layer thresholds (``sparkformer.sparsity.SparseSpec``); meta names the base model
    predictor.safetensors   (method predictor) the per-layer routers, + predictor.json (their metadata, base model)
    results.json            the command, calibration, and held-out perplexity per domain, dense vs sparse, with the
                            achieved sparsity

Python: ``run_sparsify(SparsifySettings(model=..., method=..., sparsity=...))`` returns the results dict.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from sparkformer.sparsify import methods as M
from sparkformer.sparsify.data import domain_windows
from sparkformer.sparsify.evaluate import heldout_eval


@dataclass
class SparsifySettings:
    model: str
    out: str
    method: str = "teal"  # teal | cats | predictor
    sparsity: float = 0.5  # teal: fraction of the scope's weights not read; cats / predictor: of FFN neurons
    scope: str = "ffn"  # teal: ffn | model | down (the down-projection input alone)
    allocation: str = "greedy"  # teal / cats: greedy (KL-minimising per-site levels) | uniform
    rank: int = 128  # predictor rank
    fit: str = "lsq"  # predictor fit: lsq (least squares on recorded inputs) | none (weights only)
    train_steps: int = 0  # predictor: Adam steps per layer after the closed-form fit
    verify: float = 1.0  # predictor: propose verify x the kept neurons, keep those whose exact output passes
    finetune_steps: int = 0  # continued training with the sparsity applied, KL to the dense model (0: none)
    finetune_lr: float = 3e-5
    finetune_batch: int = 4  # windows per step
    finetune_train: str = "ffn"  # ffn | all (every decoder parameter)
    capabilities: str = "default"  # calibration / held-out domains (sparkformer.bricks.capabilities)
    seq_len: int = 128
    calib_windows: int = 8  # per domain
    heldout_windows: int = 8  # per domain
    seed: int = 0
    threads: int | None = None

    def validate(self) -> "SparsifySettings":
        if self.method not in M.METHODS:
            raise ValueError(f"--method {self.method!r}; allowed: {', '.join(M.METHODS)}")
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"--sparsity {self.sparsity} must be in [0, 1) (a fraction: 0.5 = half skipped)")
        if self.scope not in ("ffn", "model", "down"):
            raise ValueError(f"--scope {self.scope!r}; allowed: ffn, model, down")
        if self.scope != "ffn" and self.method != "teal":
            raise ValueError(f"--scope {self.scope} is a teal option; {self.method} sparsifies the FFN (drop --scope)")
        if self.allocation not in ("greedy", "uniform"):
            raise ValueError(f"--allocation {self.allocation!r}; allowed: greedy, uniform")
        if self.rank < 1 or self.train_steps < 0 or self.verify < 1.0:
            raise ValueError("--rank >= 1, --train-steps >= 0 and --verify >= 1")
        if self.finetune_steps < 0 or self.finetune_lr <= 0 or self.finetune_batch < 1 \
                or self.finetune_train not in ("ffn", "all"):
            raise ValueError("--finetune-steps >= 0, --finetune-lr > 0, --finetune-batch >= 1, --finetune-train ffn|all")
        if self.fit not in ("lsq", "none"):
            raise ValueError(f"--fit {self.fit!r}; allowed: lsq, none")
        return self


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def environment() -> dict[str, Any]:
    import sparkformer

    return {"torch": torch.__version__, "sparkformer": sparkformer.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def _write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def apply_method(model, s: SparsifySettings, calib: torch.Tensor, table=None, X=None,
                 log: Callable[[str], None] = log) -> M.Sparsified:
    sens = calib[:: max(1, calib.shape[0] // 4)][:4]
    if s.method == "teal":
        return M.teal(model, calib, s.sparsity, s.scope, s.allocation, sens, table, log)
    if s.method == "cats":
        return M.cats(model, calib, s.sparsity, s.allocation, sens, table, log)
    return M.predictor(model, calib, s.sparsity, s.rank, s.fit, s.train_steps, X, s.verify, log)


def run_sparsify(s: SparsifySettings, loaded=None, log: Callable[[str], None] = log) -> dict[str, Any]:
    """Calibrate ``s.method`` on ``s.model``, measure held-out perplexity per domain (dense and sparse), write the
    folder. ``loaded``: an already loaded ``LoadedModel`` of ``s.model`` (saves reloading)."""
    from sparkformer.bricks.routing import save_routers
    from sparkformer.loading import load_model

    s.validate()
    if s.threads:
        torch.set_num_threads(s.threads)
    t0 = time.time()
    loaded = loaded or load_model(s.model)
    if loaded.routers is not None or getattr(loaded, "sparsity", None) is not None:
        raise ValueError(f"{s.model} is already sparsified; give its base model")
    model = loaded.model.float().eval()
    M.check_supported(model)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    dw = domain_windows(loaded.tokenizer, s.capabilities, s.seq_len, s.calib_windows, s.heldout_windows, s.seed)
    log(f"data: {dw.tokens('calibration')} calibration + {dw.tokens('heldout')} held-out tokens over "
        f"{len(dw.heldout)} domains")
    calib = dw.all("calibration")
    t = time.time()
    sp = apply_method(model, s, calib, log=log)
    t_cal = time.time() - t
    dense = heldout_eval(model, dw.heldout)
    sparse = heldout_eval(model, dw.heldout, sp.spec, sp.routers)
    meta = {"model": s.model, "method": s.method, "scope": s.scope, "target": s.sparsity}
    finetune = None
    if s.finetune_steps > 0:  # the model itself changes: saved in the folder, which then names it as its base
        finetune, model = _finetune(s, model, loaded, sp, calib, out, log)
        before, sparse = sparse, heldout_eval(model, dw.heldout, sp.spec, sp.routers)
        finetune["before_ppl_increase"] = math.exp(before["loss"] - dense["loss"]) - 1.0
        meta["model"], meta["base_model"] = "model", s.model
    if sp.spec is not None:
        sp.spec.meta.update(meta | {"heldout_achieved": sparse["achieved"]})
        sp.spec.save(out)
    if sp.routers is not None:
        save_routers(out / "predictor", sp.routers, meta | {"config": sp.info.get("config")})
    summary = summarize(s, dense, sparse)
    summary["continued_training"] = finetune is not None
    res = {"command": command_line(s), "settings": asdict(s), "environment": environment(), "summary": summary,
           "dense": dense, "sparse": {k: v for k, v in sparse.items() if k != "site_zeros"},
           "site_zeros": sparse.get("site_zeros"), "calibration": {k: v for k, v in sp.info.items() if k != "table"},
           "finetune": finetune,
           "seconds": {"calibrate": t_cal, "total": time.time() - t0}}
    _write_json(out / "results.json", res)
    log(f"{s.method} {s.scope} target {s.sparsity}: achieved {summary['sparsity']:.3f}, held-out ppl "
        f"{dense['ppl']:.3f} -> {sparse['ppl']:.3f} ({100 * summary['ppl_increase']:+.2f}%) -> {out}")
    return res


def _finetune(s: SparsifySettings, model, loaded, sp, calib, out: Path, log) -> tuple[dict, Any]:
    """Continued training with the sparsity applied (KL to the dense model), the trained model saved under
    ``out/model`` (sparkformer HF format + tokenizer)."""
    import shutil

    from sparkformer.bricks.continued_training import continued_training
    from sparkformer.hf import save_pretrained

    routers = sp.routers if sp.routers is not None else [None] * len(model.layers)
    trained, info = continued_training(model, routers, [w.tolist() for w in calib], s.finetune_steps, s.finetune_lr,
                                       "kd", s.finetune_batch, s.finetune_train, torch.bfloat16, s.seed, log,
                                       spec=sp.spec)
    save_pretrained(trained, out / "model")
    if loaded.tokenizer_file is not None:
        shutil.copyfile(loaded.tokenizer_file, out / "model" / "tokenizer.json")
    return {k: v for k, v in info.items() if k != "losses"} | {"loss_curve": info["losses"]}, trained


def summarize(s: SparsifySettings, dense: dict, sparse: dict) -> dict[str, Any]:
    """The headline numbers: achieved sparsity in the method's own unit and the weights skipped per token."""
    if "achieved" in sparse:
        ach = sparse["achieved"]
        skipped = ach["model" if s.scope == "model" else "ffn"]
        zeros = [z["gate_act"] for z in sparse["site_zeros"]]  # cats: the mean fraction of neurons dropped
        sparsity = skipped if s.method == "teal" else sum(zeros) / len(zeros)
    else:  # routers: neurons kept; gate, up and down rows of dropped neurons are skipped
        sparsity = 1.0 - sparse["neurons_kept"]
        skipped = sparsity
    return {"model": s.model, "method": s.method, "scope": s.scope, "target": s.sparsity, "sparsity": sparsity,
            "weights_skipped": skipped, "dense_ppl": dense["ppl"], "ppl": sparse["ppl"],
            "ppl_increase": math.exp(sparse["loss"] - dense["loss"]) - 1.0,
            "per_domain_increase": {d: sparse["per_domain"][d] / dense["per_domain"][d] - 1.0
                                    for d in dense["per_domain"]}}


def command_line(s: SparsifySettings) -> str:
    parts = ["sparkformer sparsify"]
    for f in fields(s):
        v = getattr(s, f.name)
        if v is None or (f.name not in ("model", "out", "method", "sparsity") and v == f.default):
            continue
        parts.append(f"--{f.name.replace('_', '-')} {v}")
    return " ".join(parts)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("sparsify", help="make a pretrained model activation-sparse (TEAL, CATS, predictor)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="built-in name, HF folder, .gguf or checkpoint (dense gated FFN)")
    p.add_argument("--out", required=True, help="output folder (a model: --model OUT runs it)")
    d = SparsifySettings(model="", out="")
    p.add_argument("--method", default=d.method, choices=M.METHODS)
    p.add_argument("--sparsity", type=float, default=d.sparsity,
                   help="teal: fraction of the scope's weights not read per token; cats / predictor: fraction of "
                        "FFN neurons skipped")
    p.add_argument("--scope", default=d.scope, choices=("ffn", "model", "down"),
                   help="teal: FFN inputs, every matrix's input, or the down-projection input alone")
    p.add_argument("--allocation", default=d.allocation, choices=("greedy", "uniform"),
                   help="per-site levels minimising the KL from the dense model, or one level everywhere")
    p.add_argument("--rank", type=int, default=d.rank, help="predictor rank")
    p.add_argument("--fit", default=d.fit, choices=("lsq", "none"), help="predictor fit")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="predictor Adam steps per layer")
    p.add_argument("--verify", type=float, default=d.verify,
                   help="predictor: propose VERIFY x the kept neurons, keep those whose exact |act(g) u| passes a "
                        "calibrated threshold (1: no verification)")
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                   help="continued training steps with the sparsity applied, KL to the dense model (0: none)")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    p.add_argument("--finetune-batch", type=int, default=d.finetune_batch, help="calibration windows per step")
    p.add_argument("--finetune-train", default=d.finetune_train, choices=("ffn", "all"))
    p.add_argument("--capabilities", default=d.capabilities, help="calibration / held-out domains")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--calib-windows", type=int, default=d.calib_windows, help="calibration windows per domain")
    p.add_argument("--heldout-windows", type=int, default=d.heldout_windows, help="held-out windows per domain")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None)

    def run(args) -> int:
        kw = {f.name: getattr(args, f.name) for f in fields(SparsifySettings)}
        res = run_sparsify(SparsifySettings(**kw))
        print(json.dumps(res["summary"]))
        return 0

    p.set_defaults(func=run)
