"""Model configuration: one dataclass, presets, YAML/JSON files and ``key=value`` overrides.

The dense baseline and the Spark model come from the same config and differ only in ``ffn`` and ``attention``
(each either one kind for every layer, or a list with one kind per layer).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import numbers
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union, get_args, get_origin, get_type_hints

FFN_KINDS = ("geglu", "spark", "topk")
ATTENTION_KINDS = ("dense", "spark")


def _round_down(x: int, multiple: int) -> int:
    return max(multiple, (x // multiple) * multiple)


@dataclass
class ModelConfig:
    """A Gemma-2-style decoder. Defaults follow Gemma 2 and the Spark Transformer paper (see shared spec)."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    max_seq_len: int = 1024

    # FFN: GeGLU width m; a Spark FFN of equal parameter count has d_ff = 1.5 * m (2*d*d_ff == 3*d*m).
    # "topk" is the paper's ablation: act(top-k(K x)) with no predictor split (same d_ff, same parameters).
    ffn: Union[str, list] = "geglu"
    ffn_dim: int = 1024
    spark_ffn_dim: int | None = None  # default: 3 * ffn_dim // 2
    spark_ffn_rank: int | None = None  # r, predictor dims of x; default: d_model/2 rounded down to a multiple of 64
    spark_ffn_fraction: float = 0.08  # target fraction of FFN neurons active per token

    # Attention
    attention: Union[str, list] = "dense"
    spark_attn_rank: int | None = None  # r, predictor dims of q/k; default: head_dim // 2
    spark_attn_topk: int = 256  # at most this many keys per query (statistical top-k target)
    spark_attn_hard_cap: bool = False  # also keep only the best k of the survivors (the decode kernels always do)
    sliding_window: int | None = 4096  # used on local layers
    local_global: str = "alternate"  # alternate (Gemma 2: even layers local) | global | local | periodic
    local_period: int = 6  # periodic: the last of every local_period layers is global (Gemma 3: 5 local, 1 global)
    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0
    query_pre_attn_scalar: float | None = None  # attention scale = scalar**-0.5; default head_dim
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # RoPE base on local layers (Gemma 3: 10k, global 1M); None: rope_theta
    qk_norm: bool = False  # Gemma 3: RMSNorm of each q and k head (norm_style) after the projections, before RoPE

    # Statistical top-k options
    topk_method: str = "statistical"  # statistical | exact (torch.topk, the slow baseline)
    detach_threshold: bool = False

    rms_norm_eps: float = 1e-6
    init_std: float = 0.02

    # Architecture family details (defaults: Gemma 2). Llama-family checkpoints (e.g. SmolLM2) load with
    # norm_style=llama, post_norms=False, embed_scale=False, ffn_activation=silu, no soft-caps, no window.
    norm_style: str = "gemma"  # gemma: x * (1 + w), w init 0 | llama: x * w, w init 1
    post_norms: bool = True  # Gemma-2 norms after attention and FFN as well as before
    embed_scale: bool = True  # multiply embeddings by sqrt(d_model)
    ffn_activation: str = "gelu_tanh"  # gelu_tanh | silu (gated FFN and Spark FFN activation)
    tie_embeddings: bool = True  # LM head = embedding matrix

    # ---- derived -------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        coerce_fields(self, "ModelConfig.")
        if self.spark_ffn_dim is None:
            self.spark_ffn_dim = 3 * self.ffn_dim // 2
        if self.spark_ffn_rank is None:
            self.spark_ffn_rank = _round_down(self.d_model // 2, 64) if self.d_model >= 128 else self.d_model // 2
        if self.spark_attn_rank is None:
            self.spark_attn_rank = self.head_dim // 2
        self.validate()

    def ffn_kind(self, layer: int) -> str:
        return self.ffn[layer] if isinstance(self.ffn, (list, tuple)) else self.ffn

    def attention_kind(self, layer: int) -> str:
        return self.attention[layer] if isinstance(self.attention, (list, tuple)) else self.attention

    def is_local(self, layer: int) -> bool:
        if self.sliding_window is None or self.local_global == "global":
            return False
        if self.local_global == "local":
            return True
        period = 2 if self.local_global == "alternate" else self.local_period
        return (layer + 1) % period != 0

    def layer_rope_theta(self, layer: int) -> float:
        """The RoPE base of ``layer``: ``rope_local_theta`` on local layers when set, else ``rope_theta``."""
        if self.rope_local_theta is not None and self.is_local(layer):
            return self.rope_local_theta
        return self.rope_theta

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.is_local(layer) else None

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def uses_spark(self) -> bool:
        kinds = [self.ffn_kind(i) for i in range(self.n_layers)] + [self.attention_kind(i) for i in range(self.n_layers)]
        return "spark" in kinds

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, fld: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig.{fld}={getattr(self, fld)!r}: {msg}")

        for fld in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len", "ffn_dim"):
            need(isinstance(getattr(self, fld), int) and getattr(self, fld) >= 1, fld, "must be an integer >= 1")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"must divide n_heads={self.n_heads} (grouped-query attention); allowed: divisors of {self.n_heads}")
        need(self.head_dim % 2 == 0, "head_dim", "must be even (RoPE rotates pairs of dims)")
        need(self.d_model % 2 == 0, "d_model", "must be even")
        for fld, kinds in (("ffn", FFN_KINDS), ("attention", ATTENTION_KINDS)):
            v = getattr(self, fld)
            vals = list(v) if isinstance(v, (list, tuple)) else [v]
            if isinstance(v, (list, tuple)):
                need(len(vals) == self.n_layers, fld, f"a per-layer list needs n_layers={self.n_layers} entries")
            for k in vals:
                need(k in kinds, fld, f"unknown kind {k!r}; allowed: {', '.join(kinds)} (or a per-layer list of them)")
        need(isinstance(self.spark_ffn_dim, int) and self.spark_ffn_dim >= 1, "spark_ffn_dim", "must be an integer >= 1")
        need(isinstance(self.spark_ffn_rank, int) and 1 <= self.spark_ffn_rank < self.d_model, "spark_ffn_rank",
             f"must be in [1, d_model-1] = [1, {self.d_model - 1}] (the predictor uses x[:r], the value path x[r:])")
        need(0.0 < self.spark_ffn_fraction <= 1.0, "spark_ffn_fraction", "must be in (0, 1]")
        need(isinstance(self.spark_attn_rank, int) and 2 <= self.spark_attn_rank <= self.head_dim - 2
             and self.spark_attn_rank % 2 == 0, "spark_attn_rank",
             f"must be even and in [2, head_dim-2] = [2, {self.head_dim - 2}] (each half gets its own RoPE)")
        need(isinstance(self.spark_attn_topk, int) and self.spark_attn_topk >= 1, "spark_attn_topk", "must be an integer >= 1")
        need(self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window >= 1),
             "sliding_window", "must be None (no local layers) or an integer >= 1")
        need(self.local_global in ("alternate", "global", "local", "periodic"), "local_global",
             "allowed: alternate, global, local, periodic (the last of every local_period layers global)")
        need(isinstance(self.local_period, int) and self.local_period >= 2, "local_period",
             "must be an integer >= 2 (with local_global=periodic: local_period-1 local layers, then 1 global)")
        for fld in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            v = getattr(self, fld)
            need(v is None or v > 0, fld, "must be None (off) or > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.rope_local_theta is None or self.rope_local_theta > 0, "rope_local_theta",
             "must be None (local layers use rope_theta) or > 0")
        need(self.topk_method in ("statistical", "exact"), "topk_method", "allowed: statistical, exact")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.norm_style in ("gemma", "llama"), "norm_style", "allowed: gemma, llama")
        need(self.ffn_activation in ("gelu_tanh", "silu"), "ffn_activation", "allowed: gelu_tanh, silu")
        need(self.init_std > 0, "init_std", "must be > 0")

    # ---- (de)serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def replace(self, **kw: Any) -> "ModelConfig":
        d = self.to_dict()
        # derived defaults are recomputed unless given
        for k in ("spark_ffn_dim", "spark_ffn_rank", "spark_attn_rank"):
            if k not in kw and _DERIVED_FROM[k] & kw.keys():
                d[k] = None
        d.update(kw)
        return ModelConfig.from_dict(d)


_DERIVED_FROM = {
    "spark_ffn_dim": {"ffn_dim"},
    "spark_ffn_rank": {"d_model"},
    "spark_attn_rank": {"head_dim"},
}


# ---- presets ---------------------------------------------------------------------------------------------------
_BASE_PRESETS: dict[str, dict[str, Any]] = {
    # Gemma-2 2B shape: for speed and FLOP accounting (spark r=1024 as in the paper).
    "gemma2-2b": dict(vocab_size=256000, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256,
                      ffn_dim=9216, spark_ffn_rank=1024, max_seq_len=8192, sliding_window=4096,
                      query_pre_attn_scalar=256),
    # Trains on 2 CPU cores in minutes.
    "tiny": dict(vocab_size=8192, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=512,
                 max_seq_len=512, sliding_window=128, spark_attn_topk=32),
    "small": dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=1024,
                  max_seq_len=1024, sliding_window=256, spark_attn_topk=64),
}

PRESETS: dict[str, dict[str, Any]] = {}
for _name, _kw in _BASE_PRESETS.items():
    PRESETS[_name] = dict(_kw, ffn="geglu", attention="dense")
    PRESETS[f"{_name}-dense"] = dict(_kw, ffn="geglu", attention="dense")
    PRESETS[f"{_name}-spark"] = dict(_kw, ffn="spark", attention="spark")


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name: ``NAME`` / ``NAME-dense`` (GeGLU + dense attention) or ``NAME-spark`` (both Spark)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ---- files and key=value overrides -----------------------------------------------------------------------------
def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a missing file or one that is not UTF-8 is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} " + ("is not a file" if path.exists() else "does not exist"))
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); is it the right "
                         "file?") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file; malformed JSON is an error naming the file, line and column."""
    path = Path(path)
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict; every error names the file."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        text = read_text(path, "config file")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or e}{where})") from None
    else:
        data = read_json(path, "config file")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NONE = ("none", "null", "~")


def _expected(cands: tuple) -> str:
    names = [{bool: "a boolean (true or false)", int: "an integer", float: "a finite number", str: "a string",
              list: "a list"}.get(c, getattr(c, "__name__", str(c))) for c in cands if c is not type(None)]
    if type(None) in cands:
        names.append("none")
    return " or ".join(names)


def parse_field(name: str, value: Any, typ: Any) -> Any:
    """``value`` (a ``key=value`` string or a YAML/JSON value) as the declared type ``typ`` of field ``name``.

    Strict: a boolean is true/false (also yes/no, on/off, 1/0), a number is finite, an integer is whole (``1e6`` is
    one), ``none``/``null`` only where the field allows None; anything else is a ``ValueError`` naming the field and
    the value."""
    if typ is Any:
        return value
    origin = get_origin(typ)
    cands = get_args(typ) if origin is Union or origin is getattr(types, "UnionType", Union) else (typ,)
    cands = tuple(get_origin(c) or c for c in cands)

    def bad(why: str = "") -> ValueError:
        return ValueError(f"{name}={value!r}: expected {_expected(cands)}{why}")

    if value is None:
        if type(None) in cands:
            return None
        raise bad()
    if isinstance(value, str):
        s = value.strip()
        if type(None) in cands and s.lower() in _NONE:
            return None
        if bool in cands and s.lower() in _TRUE + _FALSE:
            return s.lower() in _TRUE
        if int in cands or float in cands:
            try:
                x: Any = int(s)
            except ValueError:
                try:
                    x = float(s)
                except ValueError:
                    x = None
            if x is not None:
                return parse_field(name, x, typ)
        if list in cands and s.startswith("["):
            import yaml

            try:
                v = yaml.safe_load(s)
            except yaml.YAMLError:
                raise bad(" (a list like [a, b])") from None
            if isinstance(v, list):
                return v
        if str in cands:
            return value
        raise bad()
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        if bool in cands:
            return bool(value)
        raise bad()
    if isinstance(value, numbers.Integral):
        if int in cands:
            return int(value)
        if float in cands:
            return float(value)
    elif isinstance(value, numbers.Real):
        x = float(value)
        if not math.isfinite(x) and (int in cands or float in cands):
            raise bad(" (not nan or inf)")
        if float in cands:
            return x
        if int in cands and x.is_integer():
            return int(x)
    elif isinstance(value, (list, tuple)) and list in cands:
        return list(value)
    if str in cands and isinstance(value, numbers.Real):
        return str(value)
    raise bad()


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def coerce_fields(obj: Any, prefix: str = "") -> None:
    """Every field of dataclass ``obj`` to its declared type with :func:`parse_field` (in place)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        new = parse_field(prefix + f.name, v, hints[f.name])
        if new is not v:
            setattr(obj, f.name, new)


def apply_overrides(obj: Any, overrides: list[str] | dict[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``key=value`` strings (or a dict) applied; unknown keys are errors,
    and each value is parsed as its field's type (:func:`parse_field`)."""
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for s in overrides:
            if "=" not in s:
                raise ValueError(f"override {s!r} must look like key=value")
            k, v = s.split("=", 1)
            items.append((k.strip(), v))
    hints = get_type_hints(type(obj))
    kw: dict[str, Any] = {}
    for k, v in items:
        if k not in hints:
            raise ValueError(f"unknown field {k!r} for {type(obj).__name__}; known: {sorted(hints)}")
        kw[k] = parse_field(prefix + k, v, hints[k])
    if hasattr(obj, "replace"):
        return obj.replace(**kw)
    return dataclasses.replace(obj, **kw)


# ---- command-line values (argparse ``type=``) --------------------------------------------------------------------
def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lo``."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be >= {lo}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def number_in(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number between ``lo`` and ``hi`` (bounds included unless ``*_open``)."""
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        ok = (math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"{s} must be a finite number in {rng}")
        return v

    parse.__name__ = "number"
    return parse


def parameter_count_ffn(cfg: ModelConfig, layer: int = 0) -> int:
    """Parameters of one FFN block (no biases)."""
    if cfg.ffn_kind(layer) in ("spark", "topk"):
        return 2 * cfg.d_model * cfg.spark_ffn_dim
    return 3 * cfg.d_model * cfg.ffn_dim

