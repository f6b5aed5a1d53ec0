"""Tiny random models shared by the brick tests: a Llama (transformers) and our SparkLM of matching size."""

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
