"""Block-quantized weights for batch-1 decode (8-bit ``q8_0`` and 4-bit ``q4_0``, as llama.cpp's Q8_0 / Q4_0).

    qw = quantize(w, "q8_0")                 # (rows, n) float -> QuantMatrix: one uint8 buffer, a row is its blocks
    y = quant_matvec(qw, x)                  # C++ integer dot products (x quantized per call), pure torch otherwise
    w_hat = dequantize(qw)                   # the weights the kernels compute with

Formats (blocks of 32 weights along a row, one fp16 scale each, stored at the start of the row):
    q8_0   d = fp16(max|w| / 127), q = round(w / d) in [-127, 127]            34 bytes per block (8.5 bits/weight)
    q4_0   d = fp16(w_maxabs / -8) (w_maxabs: the signed value of largest magnitude), q = clamp(round(w / d) + 8, 0, 15);
           block bytes j hold q[j] (low nibble) and q[j + 16] (high nibble); w = d * (q - 8)   18 bytes (4.5 bits)
A row is contiguous (scales then quants), so a gather of selected rows (Spark FFN) still reads whole rows.

Dot products quantize the activation vector per call to int8 blocks of 32 (``quantize_act``: d = max|x| / 127,
round half to even) and sum integer block products scaled by d_w * d_x in fp32, as llama.cpp does; the pure-torch
``*_reference`` functions compute exactly that, and the C++ kernels (``csrc/quant_impl.h``, every ISA) are tested
equal to them up to fp32 summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparkformer.ops import _extension
from sparkformer.ops.stat_topk import stat_threshold

FORMATS = {"q8_0": 0, "q4_0": 1}
BLOCK = 32


def row_bytes(fmt: str, n: int) -> int:
    nb = n // BLOCK
    return 2 * nb + (n if fmt == "q8_0" else n // 2)


def check_format(fmt: str, n: int, what: str = "matrix") -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if n % BLOCK:
        raise ValueError(f"{what}: rows of {n} weights do not split into blocks of {BLOCK}; {fmt} needs a row length "
                         f"that is a multiple of {BLOCK} (keep this matrix in bf16/fp32)")


@dataclass
class QuantMatrix:
    """A (rows, cols) weight matrix in a block-quantized format: ``data`` (rows, row_bytes) uint8."""

    data: torch.Tensor
    fmt: str
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def numel(self) -> int:
        return self.data.shape[0] * self.cols

    def index_select(self, rows: torch.Tensor) -> "QuantMatrix":
        return QuantMatrix(self.data.index_select(0, rows), self.fmt, self.cols)


def quantize(w: torch.Tensor, fmt: str) -> QuantMatrix:
    """Quantize the rows of ``w`` (rows, n) to ``fmt`` (see the module docstring)."""
    check_format(fmt, w.shape[-1])
    rows, n = w.shape
    blocks = w.detach().float().reshape(rows, n // BLOCK, BLOCK)
    amax_idx = blocks.abs().argmax(-1, keepdim=True)
    # the scale is rounded to fp16 first and the weights quantized against the stored scale
    if fmt == "q8_0":
        d16 = (blocks.abs().amax(-1) / 127.0).to(torch.float16)
        d = d16.float()
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round(blocks * inv[..., None]).clamp_(-127, 127).to(torch.int8)
        quants = q.reshape(rows, n).view(torch.uint8)
    else:
        d16 = (blocks.gather(-1, amax_idx)[..., 0] / -8.0 + 0.0).to(torch.float16)  # + 0.0: no -0 scales
        d = d16.float()
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = (torch.round(blocks * inv[..., None]) + 8).clamp_(0, 15).to(torch.uint8)
        quants = (q[..., :16] | (q[..., 16:] << 4)).reshape(rows, n // 2)
    data = torch.cat([d16.view(torch.uint8).reshape(rows, -1), quants], 1).contiguous()
    return QuantMatrix(data, fmt, n)


def _split(qw: QuantMatrix) -> tuple[torch.Tensor, torch.Tensor]:
    """(d (rows, nb) fp32, q (rows, n) int values as float32) of a quantized matrix."""
    rows, n, nb = qw.data.shape[0], qw.cols, qw.cols // BLOCK
    d = qw.data[:, : 2 * nb].contiguous().view(torch.float16).float()
    raw = qw.data[:, 2 * nb: row_bytes(qw.fmt, n)]
    if qw.fmt == "q8_0":
        q = raw.contiguous().view(torch.int8).float()
    else:
        p = raw.reshape(rows, nb, 16)
        q = (torch.cat([p & 0x0F, p >> 4], -1).float() - 8.0).reshape(rows, n)
    return d, q


def dequantize(qw: QuantMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (rows, cols) weights the quantized matrix stands for."""
    d, q = _split(qw)
    rows, nb = d.shape
    return (q.reshape(rows, nb, BLOCK) * d[..., None]).reshape(rows, qw.cols).to(dtype)


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-call activation quantization of the dot products: (q int8 (n,), d fp32 (n / 32,))."""
    blocks = x.float().reshape(-1, BLOCK)
    d = blocks.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(blocks * inv[:, None]).to(torch.int8).reshape(-1), d


def quant_matvec_reference(qw: QuantMatrix, x: torch.Tensor) -> torch.Tensor:
    """y = W x with integer block products, as the kernels compute it (fp32, summation order aside)."""
    xq, xd = quantize_act(x)
    d, q = _split(qw)
    rows, nb = d.shape
    isum = (q.reshape(rows, nb, BLOCK).double() * xq.double().reshape(1, nb, BLOCK)).sum(-1)  # exact integers
    return (isum.float() * (d * xd[None, :])).sum(-1)


def quant_matvec(qw: QuantMatrix, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """y (rows,) fp32 = W x for a quantized W. ``impl``: auto (C++ when it builds), ext, torch (dequantize and
    matvec in fp32: no activation quantization) or reference."""
    if impl == "auto":
        impl = "ext" if _extension.available() else "torch"
    if impl == "ext":
        return torch.ops.sparkformer.quant_matvec(qw.data, FORMATS[qw.fmt], qw.cols, x)
    if impl == "torch":
        return dequantize(qw) @ x.float()
    if impl == "reference":
        return quant_matvec_reference(qw, x)
    raise ValueError(f"unknown impl {impl!r} (auto | ext | torch | reference)")


@dataclass
class QuantSparkFFN:
    """A Spark FFN in a quantized decode layout: K1 (d_ff, r) quantized rows, and per neuron its K2 row then its V
    row in one quantized row (``rows``), so each selected neuron is one contiguous read."""

    k1: QuantMatrix
    rows: torch.Tensor  # (d_ff, row_bytes(K2) + row_bytes(V)) uint8
    fmt: str
    n2: int  # K2 row length (d - r)
    nv: int  # V row length (d)

    @property
    def nbytes(self) -> int:
        return self.k1.nbytes + self.rows.numel()


def quantize_spark_ffn(k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, fmt: str) -> QuantSparkFFN:
    check_format(fmt, k1.shape[1], "Spark FFN K1")
    check_format(fmt, k2.shape[1], "Spark FFN K2")
    check_format(fmt, v.shape[1], "Spark FFN V")
    rows = torch.cat([quantize(k2, fmt).data, quantize(v, fmt).data], 1).contiguous()
    return QuantSparkFFN(quantize(k1, fmt), rows, fmt, k2.shape[1], v.shape[1])


@dataclass
class QuantGeglu:
    """A dense gated FFN in a quantized decode layout: [W_gate; W_up] (2m, d) and W_down (d, m), both read as
    integer dot products (the hidden activations are quantized per token like the input)."""

    gate_up: QuantMatrix
    down: QuantMatrix

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def quantize_geglu(w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, fmt: str) -> QuantGeglu:
    """From the float decode layout (w_gate, w_up (m, d), W_down^T (m, d))."""
    check_format(fmt, w_gate.shape[1], "FFN gate/up")
    check_format(fmt, w_down_t.shape[0], "FFN down")
    return QuantGeglu(quantize(torch.cat([w_gate, w_up]), fmt), quantize(w_down_t.t(), fmt))


def geglu_decode_quant(x: torch.Tensor, ffn: QuantGeglu, act, impl: str = "auto") -> torch.Tensor:
    """y (d,) fp32 of a quantized gated FFN for one token."""
    gu = quant_matvec(ffn.gate_up, x, impl)
    m = gu.shape[0] // 2
    return quant_matvec(ffn.down, act(gu[:m]) * gu[m:], impl)


def spark_ffn_decode_quant(x: torch.Tensor, ffn: QuantSparkFFN, fraction: float, act,
                           impl: str = "auto") -> tuple[torch.Tensor, int]:
    """Spark FFN for one token over quantized weights: predictor scores s = K1 x[:r] (integer dot products), the
    statistical threshold theta of ``stat_topk.stat_threshold``, then only the selected neurons' K2 / V rows:
    y = sum_i act(s_i - theta) * (K2_i . x[r:]) * V_i. Returns (y (d,) fp32, neurons run)."""
    r = ffn.k1.cols
    s = quant_matvec(ffn.k1, x[:r], impl)
    theta = stat_threshold(s, fraction)
    idx = torch.nonzero(s > theta).squeeze(1)
    a = act(s.index_select(0, idx) - theta)
    return quant_ffn_gather(ffn, idx, a, x[r:], impl), idx.numel()


def quant_ffn_rows(ffn: QuantSparkFFN) -> tuple[QuantMatrix, QuantMatrix]:
    """The K2 rows and the V rows of a quantized Spark FFN, as two (strided) quantized matrices."""
    b2 = row_bytes(ffn.fmt, ffn.n2)
    return QuantMatrix(ffn.rows[:, :b2], ffn.fmt, ffn.n2), QuantMatrix(ffn.rows[:, b2:], ffn.fmt, ffn.nv)


def quant_ffn_gather_reference(ffn: QuantSparkFFN, idx: torch.Tensor, a: torch.Tensor, x2: torch.Tensor):
    """sum_t a[t] * dot(K2 row idx[t], x2) * V row idx[t], fp32 (the kernels' math)."""
    k2, v = quant_ffn_rows(ffn)
    idx = idx.long()
    h = a.float() * quant_matvec_reference(k2.index_select(idx), x2)
    return h @ dequantize(v.index_select(idx))


def quant_ffn_gather(ffn: QuantSparkFFN, idx: torch.Tensor, a: torch.Tensor, x2: torch.Tensor,
                     impl: str = "auto") -> torch.Tensor:
    if impl == "auto":
        impl = "ext" if _extension.available() else "torch"
    if impl == "ext":
        return torch.ops.sparkformer.quant_ffn_gather(idx.to(torch.int32).contiguous(), a.float().contiguous(),
                                                      ffn.rows, FORMATS[ffn.fmt], ffn.n2, ffn.nv, x2)
    if impl == "torch":
        k2, v = quant_ffn_rows(ffn)
        idx = idx.long()
        h = a.float() * (dequantize(k2.index_select(idx)) @ x2.float())
        return h @ dequantize(v.index_select(idx))
    if impl == "reference":
        return quant_ffn_gather_reference(ffn, idx, a, x2)
    raise ValueError(f"unknown impl {impl!r} (auto | ext | torch | reference)")
