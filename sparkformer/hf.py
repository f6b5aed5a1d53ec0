"""transformers integration: ``SparkConfig`` / ``SparkForCausalLM`` registered with the Auto classes, and
conversion between our dense model and HF ``Gemma2ForCausalLM`` (both ways), and from ``Gemma3ForCausalLM`` and Llama.

transformers is an optional extra (``pip install sparkformer[hf]``); ``import sparkformer`` works without it.

    from sparkformer.hf import SparkForCausalLM, SparkConfig
    model = SparkForCausalLM(SparkConfig.from_model_config(get_preset("tiny-spark")))
    model.save_pretrained("out")                                  # safetensors
    AutoModelForCausalLM.from_pretrained("out")                   # after `import sparkformer.hf`

HF ``generate`` works (greedy, sampling, beam search) without a KV cache: each step re-runs the whole sequence. That is
for correctness and ecosystem tools (lm-evaluation-harness, pipelines); use ``sparkformer generate`` for speed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sparkformer.config import ModelConfig
from sparkformer.model import SparkLM

try:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("sparkformer.hf needs transformers: pip install 'sparkformer[hf]'") from e

_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


class SparkConfig(PretrainedConfig):
    """HF config carrying every ``ModelConfig`` field (the same names)."""

    model_type = "sparkformer"

    def __init__(self, **kwargs):
        mine = {k: kwargs.pop(k) for k in list(kwargs) if k in _FIELDS}
        ModelConfig(**mine)  # validate now, with field-naming errors
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        for k in _FIELDS:
            setattr(self, k, mine.get(k, defaults[k]))
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> "SparkConfig":
        return cls(**cfg.to_dict(), **kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{k: getattr(self, k) for k in _FIELDS})

    @property
    def hidden_size(self) -> int:  # names generic HF tools look for
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads


class SparkForCausalLM(PreTrainedModel, GenerationMixin):
    """A ``SparkLM`` behind the transformers model contract (``.model`` is the ``SparkLM``)."""

    config_class = SparkConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = False

    def __init__(self, config: SparkConfig):
        super().__init__(config)
        self.model = SparkLM(config.to_model_config())
        self.generation_config.use_cache = False
        self.post_init()

    def _init_weights(self, module):  # SparkLM initialises itself; loading overwrites everything
        pass

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, return_dict: bool | None = None, **kwargs):
        if input_ids is None:
            raise ValueError("SparkForCausalLM needs input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: pass unpadded sequences (attention_mask all ones)")
        out = self.model(input_ids)
        loss = None
        if labels is not None:  # HF convention: labels are the inputs; shift here
            logits = out.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=out.logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def sparsity_stats(self) -> dict:
        return self.model.sparsity_stats()


AutoConfig.register("sparkformer", SparkConfig, exist_ok=True)
AutoModelForCausalLM.register(SparkConfig, SparkForCausalLM, exist_ok=True)


def to_hf(model: SparkLM) -> SparkForCausalLM:
    """Wrap a ``SparkLM`` (weights shared, not copied)."""
    hf = SparkForCausalLM(SparkConfig.from_model_config(model.config))
    hf.model = model
    return hf


def save_pretrained(model: SparkLM, path: str | Path) -> None:
    to_hf(model).save_pretrained(str(path), safe_serialization=True)


def load_pretrained(path: str | Path, **kwargs) -> SparkLM:
    return SparkForCausalLM.from_pretrained(str(path), **kwargs).model


# ---- Gemma 2 <-> our dense model ---------------------------------------------------------------------------------
def gemma2_config_to_model_config(hc) -> ModelConfig:
    """Our dense ``ModelConfig`` equivalent to an HF ``Gemma2Config``."""
    window = hc.sliding_window
    if getattr(hc, "layer_types", None):
        expect = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(hc.num_hidden_layers)]
        if list(hc.layer_types) != expect:
            raise ValueError(f"only Gemma-2's alternating local/global layers are supported, got {hc.layer_types}")
    rope_theta = getattr(hc, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(hc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=hc.vocab_size, d_model=hc.hidden_size, n_layers=hc.num_hidden_layers,
        n_heads=hc.num_attention_heads, n_kv_heads=hc.num_key_value_heads, head_dim=hc.head_dim,
        max_seq_len=hc.max_position_embeddings, ffn="geglu", ffn_dim=hc.intermediate_size, attention="dense",
        sliding_window=window, local_global="alternate", attn_logit_softcap=hc.attn_logit_softcapping,
        final_logit_softcap=hc.final_logit_softcapping, query_pre_attn_scalar=hc.query_pre_attn_scalar,
        rope_theta=float(rope_theta), rms_norm_eps=hc.rms_norm_eps,
    )


_GEMMA2_NAMES = {
    "input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
    "pre_ffn_norm": "pre_feedforward_layernorm", "post_ffn_norm": "post_feedforward_layernorm",
    "attn": "self_attn", "ffn": "mlp",
}


def _gemma2_key(ours: str) -> str:
    if ours == "embed.weight":
        return "model.embed_tokens.weight"
    if ours == "final_norm.weight":
        return "model.norm.weight"
    parts = ours.split(".")
    return "model." + ".".join(_GEMMA2_NAMES.get(p, p) for p in parts)


def from_gemma2(hf_model) -> SparkLM:
    """Our dense model with the weights of an HF ``Gemma2ForCausalLM`` (a real Gemma 2 checkpoint, say)."""
    cfg = gemma2_config_to_model_config(hf_model.config)
    model = SparkLM(cfg)
    sd = hf_model.state_dict()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(sd[_gemma2_key(name)])
    return model.to(next(hf_model.parameters()).dtype)


def to_gemma2(model: SparkLM):
    """An HF ``Gemma2ForCausalLM`` with the weights of our dense model."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    c = model.config
    if c.uses_spark:
        raise ValueError("only dense models (ffn=geglu, attention=dense) convert to Gemma2; this one uses Spark layers")
    if c.local_global != "alternate" or c.sliding_window is None:
        raise ValueError("Gemma2 alternates local and global layers: needs local_global='alternate' and a window")
    if c.qk_norm or c.rope_local_theta not in (None, c.rope_theta):
        raise ValueError("Gemma2 has no q/k norms and one RoPE base: needs qk_norm=False, rope_local_theta=None")
    hc = Gemma2Config(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        attn_logit_softcapping=c.attn_logit_softcap, final_logit_softcapping=c.final_logit_softcap,
        query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim, sliding_window=c.sliding_window,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, attn_implementation="eager",
    )
    hf = Gemma2ForCausalLM(hc)
    sd = hf.state_dict()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            sd[_gemma2_key(name)].copy_(p)
    hf.tie_weights()
    return hf.eval()


# ---- Gemma 3 (text) -> our model -----------------------------------------------------------------------------------
def _gemma3_rope_theta(hc, layer_type: str, legacy: str, default: float) -> float:
    rp = (getattr(hc, "rope_parameters", None) or {}).get(layer_type) or {}
    rope_type = rp.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"Gemma 3 {layer_type} layers use RoPE scaling {rope_type!r}; only plain RoPE is supported")
    theta = rp.get("rope_theta") or getattr(hc, legacy, None) or default
    return float(theta)


def gemma3_config_to_model_config(hc) -> ModelConfig:
    """Our dense ``ModelConfig`` equivalent to an HF ``Gemma3TextConfig`` (q/k norms, a local:global period, a local
    RoPE base). A multimodal ``Gemma3Config`` is read through its ``text_config``."""
    hc = getattr(hc, "text_config", None) or hc
    if getattr(hc, "attention_bias", False):
        raise ValueError("Gemma 3 checkpoints with attention biases are not supported (our projections have none)")
    if getattr(hc, "use_bidirectional_attention", False):
        raise ValueError("Gemma 3 with use_bidirectional_attention=True is not a causal LM; not supported")
    if getattr(hc, "hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"hidden_activation={hc.hidden_activation!r}: only gelu_pytorch_tanh is supported")
    n = hc.num_hidden_layers
    types = list(getattr(hc, "layer_types", None) or [])
    if not types:
        period = int(getattr(hc, "sliding_window_pattern", None) or getattr(hc, "_sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    bad = sorted(set(types) - {"sliding_attention", "full_attention"})
    if bad:
        raise ValueError(f"Gemma 3 layer types {bad} are not supported (only sliding_attention, full_attention)")
    window = hc.sliding_window if "sliding_attention" in types else None
    local_global, period = "global", 6
    if window is not None and "full_attention" not in types:
        local_global = "local"
    elif window is not None:
        period = types.index("full_attention") + 1
        local_global = "alternate" if period == 2 else "periodic"
        expect = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
        if period < 2 or types != expect:
            raise ValueError(f"only a periodic local:global layer pattern (k local, then 1 global) is supported, got "
                             f"{types}")
    global_theta = _gemma3_rope_theta(hc, "full_attention", "rope_theta", 1_000_000.0)
    local_theta = _gemma3_rope_theta(hc, "sliding_attention", "rope_local_base_freq", 10_000.0)
    return ModelConfig(
        vocab_size=hc.vocab_size, d_model=hc.hidden_size, n_layers=n, n_heads=hc.num_attention_heads,
        n_kv_heads=hc.num_key_value_heads, head_dim=hc.head_dim, max_seq_len=hc.max_position_embeddings,
        ffn="geglu", ffn_dim=hc.intermediate_size, attention="dense", sliding_window=window,
        local_global=local_global, local_period=period, attn_logit_softcap=hc.attn_logit_softcapping,
        final_logit_softcap=hc.final_logit_softcapping, query_pre_attn_scalar=hc.query_pre_attn_scalar,
        rope_theta=global_theta, rope_local_theta=local_theta if window is not None else None, qk_norm=True,
        rms_norm_eps=hc.rms_norm_eps, tie_embeddings=bool(getattr(hc, "tie_word_embeddings", True)),
    )


def from_gemma3(hf_model) -> SparkLM:
    """Our dense model with the weights of an HF ``Gemma3ForCausalLM`` (e.g. Gemma-3-270M), or of the language model
    inside a multimodal ``Gemma3ForConditionalGeneration`` (its vision tower is dropped); logits match HF's."""
    cfg = gemma3_config_to_model_config(hf_model.config)
    sd = hf_model.state_dict()
    embeds = [k for k in sd if k.endswith("embed_tokens.weight")]  # only the language model has token embeddings
    if len(embeds) != 1:
        raise ValueError(f"{type(hf_model).__name__}: expected one embed_tokens weight, found {embeds}")
    prefix = embeds[0][: -len("embed_tokens.weight")]  # "model." or "model.language_model."
    model = SparkLM(cfg)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            key = "lm_head.weight" if name == "lm_head.weight" else prefix + _gemma2_key(name)[len("model."):]
            if key not in sd:
                raise ValueError(f"{type(hf_model).__name__} has no weight {key!r} (needed for our {name!r})")
            p.copy_(sd[key])
    return model.to(next(hf_model.parameters()).dtype).eval()


# ---- Llama family (Llama, Mistral, SmolLM2) -> our model ----------------------------------------------------------
def llama_config_to_model_config(hc) -> ModelConfig:
    """Our ``ModelConfig`` equivalent to an HF Llama/Mistral config (dense, Llama-style norms, SiLU gated FFN)."""
    if getattr(hc, "model_type", "llama") not in ("llama", "mistral"):
        raise ValueError(f"from_llama supports model_type llama and mistral, got {hc.model_type!r}")
    if getattr(hc, "attention_bias", False) or getattr(hc, "mlp_bias", False):
        raise ValueError("Llama checkpoints with attention/MLP biases are not supported (our projections have none)")
    if getattr(hc, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hc.hidden_act!r}: only silu is supported for Llama-family models")
    rp = getattr(hc, "rope_parameters", None) or {}
    scaling = getattr(hc, "rope_scaling", None) or {}
    rope_type = rp.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    rope_theta = getattr(hc, "rope_theta", None) or rp.get("rope_theta", 10000.0)
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    window = getattr(hc, "sliding_window", None)
    return ModelConfig(
        vocab_size=hc.vocab_size, d_model=hc.hidden_size, n_layers=hc.num_hidden_layers,
        n_heads=hc.num_attention_heads, n_kv_heads=hc.num_key_value_heads or hc.num_attention_heads,
        head_dim=head_dim, max_seq_len=hc.max_position_embeddings, ffn="geglu", ffn_dim=hc.intermediate_size,
        attention="dense", sliding_window=window, local_global="local" if window else "global",
        attn_logit_softcap=None, final_logit_softcap=None, query_pre_attn_scalar=None, rope_theta=float(rope_theta),
        rms_norm_eps=hc.rms_norm_eps, norm_style="llama", post_norms=False, embed_scale=False,
        ffn_activation="silu", tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)),
    )


_LLAMA_NAMES = {"input_norm": "input_layernorm", "pre_ffn_norm": "post_attention_layernorm", "attn": "self_attn",
                "ffn": "mlp"}


def _llama_key(ours: str) -> str:
    if ours == "embed.weight":
        return "model.embed_tokens.weight"
    if ours == "final_norm.weight":
        return "model.norm.weight"
    if ours == "lm_head.weight":
        return "lm_head.weight"
    return "model." + ".".join(_LLAMA_NAMES.get(p, p) for p in ours.split("."))


def from_llama(hf_model) -> SparkLM:
    """Our dense model with the weights of an HF Llama-family causal LM (e.g. SmolLM2); logits match HF's."""
    cfg = llama_config_to_model_config(hf_model.config)
    model = SparkLM(cfg)
    sd = hf_model.state_dict()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            key = _llama_key(name)
            if key not in sd:
                raise ValueError(f"{type(hf_model).__name__} has no weight {key!r} (needed for our {name!r})")
            p.copy_(sd[key])
    return model.to(next(hf_model.parameters()).dtype).eval()


def from_hf(hf_model) -> SparkLM:
    """Our model from a supported HF causal LM: Gemma 2, Gemma 3, Llama, Mistral (SmolLM2 is Llama)."""
    mt = getattr(hf_model.config, "model_type", None)
    if mt == "gemma2":
        return from_gemma2(hf_model)
    if mt in ("gemma3_text", "gemma3"):
        return from_gemma3(hf_model)
    if mt in ("llama", "mistral"):
        return from_llama(hf_model)
    if mt == "sparkformer":
        return hf_model.model
    raise ValueError(f"model_type {mt!r} is not supported; supported: gemma2, gemma3_text (and the language model of "
                     "gemma3), llama, mistral, sparkformer")
