"""GGUF files of our decode-benchmark models, for llama.cpp (the anchor of ``sparkformer bench decode --llamacpp``).

    path = random_gguf(get_preset("gemma2-2b"), "q8_0", seed=1)        # cached under cache_dir("gguf", "random")
    write_gguf(layout, "model.gguf", "bf16")                            # any dense decode layout (ModelLayout)

``write_gguf`` writes a dense ``ModelLayout`` (GeGLU FFN, dense attention: ``sparkformer.decode.random_layout`` or
``model_layout``) as a llama.cpp ``gemma2`` model: the same function as our dense engine computes.

- Tensor names and orientation as llama.cpp's ``convert_hf_to_gguf.py`` writes Gemma 2 (``token_embd``,
  ``blk.N.attn_q/k/v/output``, ``ffn_gate/up/down``, ``attn_norm``, ``post_attention_norm``, ``ffn_norm``,
  ``post_ffw_norm``, ``output_norm``; tied LM head = ``token_embd``). That converter stores every Gemma norm weight
  as ``w + 1`` and llama.cpp multiplies by it as stored; our layout already holds the multipliers ``1 + w``, so they
  are written as they are (all ones for random weights).
- Hyper-parameters: sizes, RMS eps, rope base, both soft-caps, the sliding window (llama.cpp's gemma2 puts it on even
  layers, as we do, with the same reach: a query at p sees keys p - window < k <= p). llama.cpp scales queries by
  ``head_dim**-0.5`` for every gemma2 size but 27B (46 layers), so ``query_pre_attn_scalar`` must equal
  ``head_dim``; configs llama.cpp's gemma2 cannot express (Spark layers, an untied head, ...) are refused.
  ``tests/test_llamacpp.py`` (marked slow, needs ``make llamacpp``) checks that llama.cpp's greedy tokens on such a
  file equal our dense engine's, with random norm multipliers.
- A tokenizer is required by llama.cpp's loader (``llama-bench`` never tokenizes text, it feeds random ids): a
  SentencePiece-style (``llama``) vocab of ``vocab_size`` tokens, Gemma's special ids (0 pad, 1 eos, 2 bos, 3 unk),
  the 256 byte tokens, then dummy pieces.
- Formats (every matrix; the norms stay F32, as the converter and ``llama-quantize`` keep them): ``bf16`` (the bf16
  layout's bits as they are, or fp32 rounded to nearest even), ``f32``, ``q8_0``, ``q4_0``, ``q4_1`` (``gguf.quants``,
  the reference quantizers of llama.cpp's own Python package: the same blocks ``llama-quantize --pure`` writes, with
  llama.cpp's reference scales where our q4_0 / q4_1 search them: the same bytes, so the same speed), or a mix of
  ``sparkformer.ops.quant.MIXES`` (``q4_0m``, ``q4_1m``: each tensor in its role's format, ``GGUF_ROLES``). The file
  is written tensor by tensor, so memory is the layout plus one tensor's encoding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sparkformer.config import ModelConfig
from sparkformer.decode.layout import ModelLayout
from sparkformer.ops.quant import MIXES, format_plan
from sparkformer.paths import cache_dir

FORMATS = ("f32", "bf16", "q8_0", "q4_0", "q4_1", *MIXES)  # a mix (q4_0m): each tensor in its role's format
# Our engine dtype -> the GGUF format of the same weights (None: not written, too large for the comparison).
DTYPE_FORMAT = {"bf16": "bf16", "bfloat16": "bf16", "q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1", "fp32": "f32",
                "float32": "f32", **{m: m for m in MIXES}}
# GGUF tensor (llama.cpp's name, less ``blk.N.`` and ``.weight``) -> our matrix role (sparkformer.ops.quant.ROLES);
# gemma2's LM head is the token embedding
GGUF_ROLES = {"token_embd": "head", "attn_q": "qkv", "attn_k": "qkv", "attn_v": "qkv", "attn_output": "o",
              "ffn_gate": "gate_up", "ffn_up": "gate_up", "ffn_down": "down"}
EXPORT_VERSION = 1  # part of the cache key: bump when the written file changes
NO_WINDOW = 1 << 30  # a config without local layers: llama.cpp's gemma2 always has them, so a window beyond any context
_ROW_CHUNK = 1 << 14  # rows quantized at a time (bounds the fp32 copy of the 256k-row embedding)


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is in the hf and test extras
        raise ImportError("GGUF export needs the `gguf` package: pip install gguf") from e
    return gguf


def _qtype(fmt: str):
    g = _gguf()
    T = g.GGMLQuantizationType
    types = {"f32": T.F32, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
    if fmt in MIXES:
        return types[MIXES[fmt].base]
    if fmt not in types:
        raise ValueError(f"unknown GGUF format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return types[fmt]


def _file_type(fmt: str):
    F = _gguf().LlamaFileType
    fmt = MIXES[fmt].base if fmt in MIXES else fmt  # a mix is labelled by its base, as llama.cpp's mixes are
    return {"f32": F.ALL_F32, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0,
            "q4_1": F.MOSTLY_Q4_1}[fmt]


def check_gemma2(cfg: ModelConfig) -> None:
    """Refuse a config that llama.cpp's ``gemma2`` graph would not compute the same way, saying what differs."""
    problems = []
    if cfg.norm_style != "gemma" or not cfg.post_norms or not cfg.embed_scale:
        problems.append("Gemma norms (norm_style=gemma, post_norms, embed_scale)")
    if cfg.ffn_activation != "gelu_tanh":
        problems.append("ffn_activation=gelu_tanh")
    if cfg.attn_logit_softcap is None or cfg.final_logit_softcap is None:
        problems.append("both soft-caps set (llama.cpp's gemma2 always applies them)")
    if (cfg.query_pre_attn_scalar or cfg.head_dim) != cfg.head_dim:
        problems.append("query_pre_attn_scalar == head_dim (llama.cpp scales queries by head_dim**-0.5)")
    if cfg.sliding_window is not None and cfg.local_global != "alternate":
        problems.append("local_global=alternate (llama.cpp's gemma2 window is on even layers)")
    if not cfg.tie_embeddings:
        problems.append("tie_embeddings (llama.cpp's gemma2 LM head is the embedding)")
    kinds = {cfg.ffn_kind(i) for i in range(cfg.n_layers)} | {cfg.attention_kind(i) for i in range(cfg.n_layers)}
    if kinds - {"geglu", "dense"}:
        problems.append("a dense model (ffn=geglu, attention=dense): llama.cpp has no Spark layers")
    if problems:
        raise ValueError("this config is not a llama.cpp gemma2 model; it needs " + "; ".join(problems))


def vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A minimal SentencePiece-style vocab of ``n`` tokens: pieces, scores, token types (llama.cpp's loader needs
    one; llama-bench feeds random ids and never tokenizes)."""
    if n < 4:
        raise ValueError(f"vocab_size={n}: need at least the 4 special tokens")
    T = _gguf().TokenType
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [T.CONTROL, T.CONTROL, T.CONTROL, T.UNKNOWN]
    n_bytes = min(256, n - 4)
    pieces += [f"<0x{b:02X}>" for b in range(n_bytes)]
    types += [T.BYTE] * n_bytes
    rest = n - len(pieces)
    pieces += [f"\u2581t{i}" for i in range(rest)]
    types += [T.NORMAL] * rest
    scores = [0.0] * (n - rest) + [-float(i) for i in range(rest)]
    return pieces, scores, [int(t) for t in types]


def gguf_tensors(layout: ModelLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of a dense layout in llama.cpp's gemma2 naming (``blk.0.attn_q.weight``), each as torch
    (rows, cols) = GGUF (ne1, ne0); norms are 1-D multipliers."""
    cfg = layout.cfg
    g = _gguf()
    T = g.MODEL_TENSOR
    N = {t: name + ".weight" for t, name in g.TENSOR_NAMES.items()}
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    yield N[T.TOKEN_EMBD], layout.embed
    for i, layer in enumerate(layout.layers):
        if layer.ffn_kind != "geglu" or layer.attn_kind != "dense" or layer.routed is not None:
            raise ValueError(f"layer {i} is {layer.attn_kind} attention / {layer.ffn_kind} FFN: llama.cpp's gemma2 "
                             "is dense attention and a GeGLU FFN only (export the dense model)")
        w = layer.ffn
        names = {t: N[t].format(bid=i) for t in (T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT,
                                                  T.ATTN_POST_NORM, T.FFN_NORM, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN,
                                                  T.FFN_POST_NORM)}
        yield names[T.ATTN_NORM], layer.norms[0]
        yield names[T.ATTN_Q], layer.w_qkv[:q]
        yield names[T.ATTN_K], layer.w_qkv[q: q + kv]
        yield names[T.ATTN_V], layer.w_qkv[q + kv:]
        yield names[T.ATTN_OUT], layer.w_o
        yield names[T.ATTN_POST_NORM], layer.norms[1]
        yield names[T.FFN_NORM], layer.norms[2]
        yield names[T.FFN_GATE], w.w_gate
        yield names[T.FFN_UP], w.w_up
        yield names[T.FFN_DOWN], w.w_down_t.t()  # (d, m): GGUF ne = (m, d), as llama.cpp's ffn_down
        yield names[T.FFN_POST_NORM], layer.norms[3]
    if layout.head is not layout.embed and layout.head.data_ptr() != layout.embed.data_ptr():
        raise ValueError("llama.cpp's gemma2 always ties the LM head to the embedding; this layout has its own head")
    yield N[T.OUTPUT_NORM], layout.final_norm


def tensor_format(t: torch.Tensor, fmt: str, name: str = "") -> str:
    """The format tensor ``name`` is written in: 1-D tensors (norms) stay F32; in a mix, its role's format."""
    if t.dim() == 1:
        return "f32"
    if fmt in MIXES:
        role = GGUF_ROLES.get(name.removesuffix(".weight").split(".")[-1])
        if role is None:
            raise ValueError(f"GGUF tensor {name!r} has no matrix role for the mix {fmt}")
        return format_plan(fmt)(role)
    return fmt


def encoded_nbytes(shape: tuple[int, ...], fmt: str) -> int:
    block, size = _gguf().GGML_QUANT_SIZES[_qtype(fmt)]
    n = int(np.prod(shape))
    if shape[-1] % block:
        raise ValueError(f"a row of {shape[-1]} weights does not split into {fmt} blocks of {block}")
    return n // block * size


def encode(t: torch.Tensor, fmt: str) -> np.ndarray:
    """The bytes of ``t`` in ``fmt`` as a numpy array (rows kept): bf16 bits as they are (fp32 rounded to nearest
    even), F32, or Q8_0 / Q4_0 / Q4_1 blocks from ``gguf.quants`` (quantized from the tensor's values, in row
    chunks)."""
    t = t.detach().cpu()
    if fmt == "f32":
        return t.float().contiguous().numpy()
    if fmt == "bf16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    quantize = _gguf().quants.quantize
    qt = _qtype(fmt)
    chunks = [quantize(t[r: r + _ROW_CHUNK].float().numpy(), qt) for r in range(0, t.shape[0], _ROW_CHUNK)]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def write_gguf(layout: ModelLayout, path: str | Path, fmt: str, name: str = "sparkformer-random") -> Path:
    """Write a dense ``layout`` as a llama.cpp gemma2 GGUF in ``fmt`` (f32, bf16, q8_0, q4_0, q4_1, a mix). Written
    to a temporary name and renamed, so a file at ``path`` is always complete."""
    g = _gguf()
    cfg = layout.cfg
    check_gemma2(cfg)
    _qtype(fmt)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    w = g.GGUFWriter(tmp, "gemma2")
    pieces, scores, types = vocab(cfg.vocab_size)
    metadata = {  # GGUFWriter.add_<key>(value): the hyper-parameters llama.cpp's gemma2 loader reads, and a vocab
        "name": name, "context_length": cfg.max_seq_len, "embedding_length": cfg.d_model,
        "block_count": cfg.n_layers, "feed_forward_length": cfg.ffn_dim, "head_count": cfg.n_heads,
        "head_count_kv": cfg.n_kv_heads, "key_length": cfg.head_dim, "value_length": cfg.head_dim,
        "layer_norm_rms_eps": cfg.rms_norm_eps, "rope_freq_base": cfg.rope_theta,
        "attn_logit_softcapping": cfg.attn_logit_softcap, "final_logit_softcapping": cfg.final_logit_softcap,
        "sliding_window": cfg.sliding_window or NO_WINDOW, "file_type": _file_type(fmt),
        "tokenizer_model": "llama", "token_list": pieces, "token_scores": scores, "token_types": types,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "unk_token_id": 3,
        "add_bos_token": True, "add_eos_token": False, "add_space_prefix": False,
    }
    for key, value in metadata.items():
        if value is not None:
            getattr(w, f"add_{key}")(value)
    tensors = list(gguf_tensors(layout))
    for tname, t in tensors:  # infos first (GGUF header), then the data tensor by tensor
        tf = tensor_format(t, fmt, tname)
        w.add_tensor_info(tname, tuple(t.shape), np.dtype(np.float32), encoded_nbytes(tuple(t.shape), tf),
                          raw_dtype=_qtype(tf))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for tname, t in tensors:
            w.write_tensor_data(encode(t, tensor_format(t, fmt, tname)))
        w.close()
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def random_gguf_path(cfg: ModelConfig, fmt: str, seed: int) -> Path:
    """Where the GGUF of ``random_layout(cfg, bf16, seed)`` in ``fmt`` is cached (keyed by shape, seed, format)."""
    key = (f"gemma2-L{cfg.n_layers}-d{cfg.d_model}-ff{cfg.ffn_dim}-h{cfg.n_heads}-kv{cfg.n_kv_heads}-hd{cfg.head_dim}"
           f"-v{cfg.vocab_size}-w{cfg.sliding_window}-seed{seed}-v{EXPORT_VERSION}")
    return cache_dir("gguf", "random") / f"{key}-{fmt}.gguf"


def random_ggufs(cfg: ModelConfig, fmts: list[str], seed: int = 1) -> list[Path]:
    """The GGUFs of the dense benchmark model ``random_layout(dense cfg, bf16, seed)`` in each of ``fmts`` (the
    weights of ``sparkformer bench decode``'s dense engine: seed 1), written once (one layout for all missing
    formats) and reused. Q8_0 / Q4_0 are quantized from the bf16 weights, as ``llama-quantize`` would from a BF16
    file; f32 is those bf16 weights widened."""
    from sparkformer.decode import random_layout

    cfg = cfg.replace(ffn="geglu", attention="dense")
    check_gemma2(cfg)
    paths = [random_gguf_path(cfg, _fmt(fmt), seed) for fmt in fmts]
    missing = [(fmt, p) for fmt, p in zip(fmts, paths) if not p.is_file()]
    if missing:
        layout = random_layout(cfg, torch.bfloat16, seed)
        for fmt, p in missing:
            write_gguf(layout, p, fmt, name=f"sparkformer-random-seed{seed}")
    return paths


def random_gguf(cfg: ModelConfig, fmt: str, seed: int = 1) -> Path:
    """``random_ggufs`` for one format."""
    return random_ggufs(cfg, [fmt], seed)[0]


def _fmt(fmt: str) -> str:
    _qtype(fmt)
    return fmt


def main(argv: list[str] | None = None) -> None:
    """Write (or find) the benchmark model's GGUFs and print their paths:
    ``python -m sparkformer.bench.gguf_export --preset gemma2-2b [--layers 4] --format bf16,q8_0,q4_0``."""
    import argparse

    from sparkformer.config import get_preset

    ap = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    ap.add_argument("--preset", default="gemma2-2b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers of the same shape")
    ap.add_argument("--format", default="bf16,q8_0,q4_0", help=f"comma list of {', '.join(FORMATS)}")
    ap.add_argument("--seed", type=int, default=1, help="random_layout seed (bench decode's dense model: 1)")
    args = ap.parse_args(argv)
    cfg = get_preset(args.preset, **({"n_layers": args.layers} if args.layers else {}))
    for p in random_ggufs(cfg, args.format.split(","), args.seed):
        print(p)


if __name__ == "__main__":
    main()
