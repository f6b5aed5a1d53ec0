"""Tiny random models shared by the tests: a Llama (transformers), our SparkLM of matching size, and a Llama-style
SparkLM with scaled-up weights for the activation-sparsity tests."""

import torch

from sparkformer.config import ModelConfig
from sparkformer.model import SparkLM


def tiny_llama(layers: int = 2, inter: int = 48, vocab: int = 40, act: str = "silu",
               init: float = 0.02) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, hidden_act=act,
                                   max_position_embeddings=64, initializer_range=init)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_spark(kind: str = "geglu", layers: int = 2, topk_method: str = "statistical") -> SparkLM:
    cfg = ModelConfig(vocab_size=40, d_model=64, n_layers=layers, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64,
                      max_seq_len=64, sliding_window=8, spark_attn_topk=6, spark_ffn_fraction=0.25,
                      ffn=kind, attention="dense", topk_method=topk_method)
    return SparkLM(cfg).eval()


def tiny_silu_lm(layers: int = 2, seed: int = 0) -> SparkLM:
    """A Llama-style SparkLM (SiLU gated FFN, no post-norms) with weights x3: activations spread enough that the
    sparsifiers' thresholds bite."""
    cfg = ModelConfig(vocab_size=40, d_model=64, n_layers=layers, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                      max_seq_len=64, sliding_window=8, ffn="geglu", attention="dense", norm_style="llama",
                      post_norms=False, embed_scale=False, ffn_activation="silu")
    torch.manual_seed(seed)
    m = SparkLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    return m
