"""Block-quantized weights for batch-1 decode: 8-bit ``q8_0``, 4-bit ``q4_0`` / ``q4_1`` (llama.cpp's Q8_0 / Q4_0 /
Q4_1).

    qw = quantize(w, "q8_0")                 # (rows, n) float -> QuantMatrix: one uint8 buffer, a row is its blocks
    y = quant_matvec(qw, x)                  # C++ integer dot products (x quantized per call), pure torch otherwise
    w_hat = dequantize(qw)                   # the weights the kernels compute with

Formats (blocks of 32 weights along a row; a row is [fp16 d per block][q4_1: fp16 m per block][the quants]):
    q8_0   q = round(w / d) in [-127, 127]                                     34 bytes per block (8.5 bits/weight)
    q4_0   q = clamp(round(w / d), -8, 7), stored q + 8: block bytes j hold q[j] (low nibble) and q[j + 16] (high
           nibble); w = d * q                                                  18 bytes per block (4.5 bits/weight)
    q4_1   asymmetric: q = clamp(round((w - m) / d), 0, 15), stored as q4_0's nibbles (no offset); w = d * q + m
                                                                               20 bytes per block (5.0 bits/weight)
Scales (``quantize_blocks``): ``maxabs`` is llama.cpp's reference rule (q8_0 d = max|w| / 127; q4_0 d = m / -8, m the
signed weight of largest magnitude; q4_1 m = block min, d = (max - min) / 15, integers rounded against the stored
fp16 d and m, so weights already on a Q4_1 grid, e.g. SmolLM2's packaged ones, come back unchanged); ``search``
(q4_0's and q4_1's default) tries a few scales per block, fits each by least squares and keeps the one of least
weighted error (``error_weights``), never worse than max-abs: the same bytes.
Mixes (``MIXES``, e.g. ``q4_0m``) give each matrix role (``ROLES``) its format, like llama.cpp's file types.
A row is contiguous (scales then quants), so a gather of selected rows (Spark FFN) still reads whole rows.

Dot products quantize the activation vector per call to int8 blocks of 32 (``quantize_act``: d = max|x| / 127,
round half to even) and sum integer block products scaled by d_w * d_x in fp32, as llama.cpp does; the pure-torch
``*_reference`` functions compute exactly that, and the C++ kernels (``csrc/quant_impl.h``, every ISA) are tested
equal to them up to fp32 summation order.

q4_1 in C++ (format code 2, ``CODES``): a row of n = 32 nb weights is 20 nb bytes, [fp16 d[nb]][fp16 m[nb]][16 nb
bytes of nibbles], block b's byte j holding q[32 b + j] (low nibble) and q[32 b + j + 16] (high), q in 0..15. With
the activation quantized as for q8_0 / q4_0 (x_q int8, d_x per block), y = sum_b d_x[b] (d[b] sum_j q_j x_q,j +
m[b] sum_j x_q,j) in fp32: the integer sums are exact (|sum q x_q| <= 15 * 127 * 32), so only the fp32 summation
order may differ from ``quant_matvec_reference``. The gather / row-accumulation ops read rows the same way (a
dequantized weight is d q + m) and every op that takes a format code takes 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparkformer.ops import _extension, quant_cache
from sparkformer.ops.stat_topk import stat_threshold

CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 2}  # every block format -> the format code the C++ ops take
# The formats the C++ kernels implement (tests/test_quant.py and test_quant_sparse.py run each against its reference
# on every ISA); a format added to CODES before its kernels runs in torch (``ext_supports``) until it joins here.
FORMATS = {k: CODES[k] for k in ("q8_0", "q4_0", "q4_1")}
BLOCK = 32
QRANGE = {"q8_0": (-127, 127), "q4_0": (-8, 7), "q4_1": (0, 15)}  # the integer range of a stored weight
BITS = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0}  # bits per weight, scales (and minima) included
METHODS = ("search", "maxabs")
# Bump when a quantizer's output bytes change, so the on-disk cache (``quant_cache``) never serves stale rows.
QUANTIZER_VERSION = "2"
# Candidate scales of the search, as the integer the block's largest-magnitude weight m maps to (d = m / t): max-abs
# is t = qmin (q4_0: -8) or qmax (q8_0: 127). q4_0 also tries m at -7.2 .. -9.0 (beyond -8, m is clamped to -8 and the
# other weights get finer steps) and at +7.0, +7.4 (m on the short +7 side, for blocks whose other side is nearly as
# large). Measured on SmolLM2's matrices, 32 candidates (-6.9 .. -9.0 and +6.6 .. +7.5 by 0.1) cut the squared error
# only 0.1-0.3% more than these 8.
SEARCH_T = {"q4_0": [-7.2, -7.5, -7.8, -8.2, -8.6, -9.0, 7.0, 7.4], "q8_0": [123.0, 124.5, 126.0, 128.0, 130.0]}
# q4_1's candidates: the block's range split into k steps (k = 15: the min/max rule; k < 15: a grid of fewer levels,
# e.g. Q4_K sub-blocks whose integers do not span 0..15; k > 15: finer steps, the ends clamped), anchored at the min
# (0), the max (1) or the middle (0.5)
SEARCH_K = [(14.0, 0.0), (13.0, 0.0), (12.0, 0.0), (15.5, 0.5), (16.0, 0.5), (17.0, 0.5), (16.0, 0.0), (16.0, 1.0)]
CHUNK_BLOCKS = 1 << 12  # blocks searched at a time: the temporaries stay in cache


# Roles of the matrices a decode step reads (a mix gives each its format): the token embedding and the LM head (one
# matrix when tied: "head"), the fused q/k/v projection, the attention output, the dense FFN's fused gate/up and its
# down projection, the Spark FFN's predictor K1 and its per-neuron K2 + V rows.
ROLES = ("embed", "head", "qkv", "o", "gate_up", "down", "k1", "k2v")


@dataclass(frozen=True)
class QuantMix:
    """A named per-matrix format choice, like llama.cpp's file types: ``base`` for every matrix, ``roles`` for the
    roles named there (a tied embedding is the "head" matrix)."""

    name: str
    base: str
    roles: tuple[tuple[str, str], ...]
    doc: str

    def format_of(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown matrix role {role!r}; roles: {', '.join(ROLES)}")
        return dict(self.roles).get(role, self.base)

    def bits_per_weight(self, numels: dict[str, int]) -> float:
        """Average bits per weight over matrices of ``numels`` (role -> weights)."""
        return sum(BITS[self.format_of(r)] * n for r, n in numels.items()) / max(1, sum(numels.values()))


MIXES = {m.name: m for m in (
    QuantMix("q4_0m", "q4_0", (("embed", "q8_0"), ("head", "q8_0")),
             "q4_0 layers, embedding and LM head in q8_0 (llama.cpp's Q4_0 keeps the output tensor in Q6_K unless "
             "--pure; we have no 6-bit format, so 8-bit); chosen by measurement, docs/quantized-decode.md Quality"),
    QuantMix("q4_1m", "q4_1", (("embed", "q8_0"), ("head", "q8_0")),
             "q4_1 layers, embedding and LM head in q8_0: the layout of SmolLM2-135M's packaged Q4_1 GGUF "
             "(token_embd Q8_0, every layer matrix Q4_1); docs/quantized-decode.md Quality"),
)}
WEIGHT_FORMATS = (*CODES, *MIXES)  # what an engine ``dtype`` may name: one format for every matrix, or a mix


def format_plan(name: str):
    """``role -> format`` for a weight format name: a plain format (every matrix in it) or a ``MIXES`` name."""
    if name in CODES:
        return lambda role: name
    if name in MIXES:
        return MIXES[name].format_of
    raise ValueError(f"unknown quantized weight format {name!r}; choose one of {', '.join(WEIGHT_FORMATS)} "
                     f"({', '.join(f'{k}: {v.doc}' for k, v in MIXES.items())})")


def row_bytes(fmt: str, n: int) -> int:
    nb = n // BLOCK
    return (4 if fmt == "q4_1" else 2) * nb + (n if fmt == "q8_0" else n // 2)


def scale_bytes(fmt: str, n: int) -> int:
    """Bytes of a row's scales (q4_1: then its minima) before the quants."""
    return (4 if fmt == "q4_1" else 2) * (n // BLOCK)


def check_format(fmt: str, n: int, what: str = "matrix") -> None:
    if fmt not in CODES:
        raise ValueError(f"unknown quantized format {fmt!r}; choose one of {', '.join(CODES)}")
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


def _round_clamp(x: torch.Tensor, d: torch.Tensor, fmt: str) -> torch.Tensor:
    """q = clamp(round(x / d)) of blocks x (B, 32) against the stored scales d (B,) (0 where d is 0), as floats."""
    qmin, qmax = QRANGE[fmt]
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(x * inv[:, None]).clamp_(qmin, qmax)


def _fp16(d: torch.Tensor) -> torch.Tensor:
    return d.to(torch.float16).float()


def _lsq_scale(x: torch.Tensor, q: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """(d16, err) for fixed integers q: the scale minimising sum w (x - d q)^2, rounded to fp16, and the error of
    that stored scale up to the constant sum w x^2 (d^2 sum w q^2 - 2 d sum w x q)."""
    wq = q if w is None else w * q
    sxq, sqq = (wq * x).sum(-1), (wq * q).sum(-1)
    d = _fp16(torch.where(sqq > 0, sxq / sqq.clamp_min(1e-30), torch.zeros_like(sxq)))
    return d, d * d * sqq - 2 * d * sxq


def block_error(x: torch.Tensor, d: torch.Tensor, q: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Per block (B,): sum w (x - d q)^2 (w = 1 when None)."""
    e = (x - d[:, None] * q) ** 2
    return (e if w is None else w * e).sum(-1)


def quantize_blocks(x: torch.Tensor, fmt: str, w: torch.Tensor | None = None,
                    method: str = "search") -> tuple[torch.Tensor, torch.Tensor]:
    """(d (B,) fp32 values of the fp16 scales, q (B, 32) integers as floats) of blocks x (B, 32) fp32.

    ``maxabs``: llama.cpp's reference rule (the module docstring). ``search``: for each candidate t of
    ``SEARCH_T[fmt]`` the integers q = clamp(round(x t / m)) (m: the block's signed largest-magnitude weight), the
    least-squares scale for them, rounded to fp16; the best candidate is refined twice (q re-rounded against its scale,
    the scale re-fitted), and max-abs is kept wherever it is no worse. The error is sum w (x - d q)^2 with ``w``
    (B, 32) the importance of each weight (e.g. the mean square of the activation it multiplies; None: 1), so the
    search never does worse than max-abs in that error."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if fmt not in ("q8_0", "q4_0"):
        raise ValueError(f"quantize_blocks takes the symmetric formats q8_0 and q4_0, not {fmt!r} (q4_1: "
                         "quantize_blocks_q4_1)")
    qmin, qmax = QRANGE[fmt]
    amax, idx = x.abs().max(-1)
    m = x.gather(-1, idx[:, None])[:, 0]
    d0 = _fp16(m / qmin + 0.0) if fmt == "q4_0" else _fp16(amax / qmax)  # + 0.0: no -0 scales
    q0 = _round_clamp(x, d0, fmt)
    if method == "maxabs":
        return d0, q0
    inv_m = torch.where(m != 0, 1.0 / m, torch.zeros_like(m))
    best_err = best_t = None
    for t in SEARCH_T[fmt]:
        _, err = _lsq_scale(x, torch.round(x * (t * inv_m)[:, None]).clamp_(qmin, qmax), w)
        if best_err is None:
            best_err, best_t = err, torch.full_like(err, t)
        else:
            better = err < best_err
            best_err, best_t = torch.where(better, err, best_err), torch.where(better, t, best_t)
    q = torch.round(x * (best_t * inv_m)[:, None]).clamp_(qmin, qmax)
    d, err = _lsq_scale(x, q, w)
    for _ in range(2):  # refine: integers against the stored scale, then the scale for those integers
        q2 = _round_clamp(x, d, fmt)
        d2, err2 = _lsq_scale(x, q2, w)
        better = err2 < err
        q, d, err = torch.where(better[:, None], q2, q), torch.where(better, d2, d), torch.where(better, err2, err)
    # (d, q) and (-d, -q) are the same weights where -q is in range: store d >= 0 then, so that quantizing the
    # dequantized weights again gives the same bytes
    flip = (d < 0) & (q.amin(-1) >= -qmax) & (q.amax(-1) <= -qmin)
    d, q = torch.where(flip, -d, d), torch.where(flip[:, None], -q, q)
    keep = block_error(x, d0, q0, w) <= block_error(x, d, q, w)  # exact errors: max-abs wins ties
    return torch.where(keep, d0, d) + 0.0, torch.where(keep[:, None], q0, q)


def _affine_error(x, d, m, q, w):
    """Per block (B,): sum w (x - d q - m)^2."""
    e = (x - d[:, None] * q - m[:, None]) ** 2
    return (e if w is None else w * e).sum(-1)


def _round_affine(x, d, m):
    """q = clamp(round((x - m) / d), 0, 15) against the stored d, m (0 where d is 0)."""
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round((x - m[:, None]) * inv[:, None]).clamp_(0, 15)


def _lsq_affine(x, q, w):
    """(d16, m16) for fixed integers q: the least-squares fit of x ~ d q + m (weights w), both rounded to fp16
    (a block whose q are all equal: d = 0, m its weighted mean)."""
    w1 = torch.ones_like(x) if w is None else w
    s, sq, sqq = w1.sum(-1), (w1 * q).sum(-1), (w1 * q * q).sum(-1)
    sx, sxq = (w1 * x).sum(-1), (w1 * x * q).sum(-1)
    det = s * sqq - sq * sq
    ok = det > 1e-12 * s * sqq.clamp_min(1e-30)
    safe = torch.where(ok, det, torch.ones_like(det))
    d = torch.where(ok, (s * sxq - sq * sx) / safe, torch.zeros_like(det))
    m = torch.where(ok, (sqq * sx - sq * sxq) / safe, sx / s.clamp_min(1e-30))
    return _fp16(d), _fp16(m)


def quantize_blocks_q4_1(x: torch.Tensor, w: torch.Tensor | None = None,
                         method: str = "search") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d (B,), m (B,) fp32 values of the fp16 scale and minimum, q (B, 32) integers 0..15 as floats) of blocks
    x (B, 32): w = d q + m.

    ``maxabs``: llama.cpp's reference rule, m = block min, d = (max - min) / 15, then the integers rounded against
    the stored fp16 d and m (llama.cpp rounds against the unrounded ones): weights on a Q4_1 grid (every block
    spanning 0..15, as llama-quantize writes them) are reproduced exactly. ``search``: the candidates of
    ``SEARCH_K`` (the range in k steps, anchored at the min, max or middle), each re-fitted by weighted least
    squares (d and m, rounded to fp16), the best refined twice; the min/max rule is kept wherever it is no worse."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    lo, hi = x.amin(-1), x.amax(-1)
    m0 = _fp16(lo)
    d0 = _fp16((hi - lo) / 15)
    q0 = _round_affine(x, d0, m0)
    if method == "maxabs":
        return d0 + 0.0, m0 + 0.0, q0
    rng = hi - lo
    best = None
    for k, anchor in SEARCH_K:
        dk = rng / k
        mk = lo + anchor * (rng - 15 * dk)  # anchor 0: lo at q = 0; 1: hi at q = 15; 0.5: the middle
        inv = torch.where(dk != 0, 1.0 / dk, torch.zeros_like(dk))
        q = torch.round((x - mk[:, None]) * inv[:, None]).clamp_(0, 15)
        d, m = _lsq_affine(x, q, w)
        err = _affine_error(x, d, m, q, w)
        if best is None:
            best = [d, m, q, err]
        else:
            b = err < best[3]
            best = [torch.where(b, d, best[0]), torch.where(b, m, best[1]), torch.where(b[:, None], q, best[2]),
                    torch.where(b, err, best[3])]
    d, m, q, err = best
    for _ in range(2):  # refine: integers against the stored scale and min, then (d, m) for those integers
        q2 = _round_affine(x, d, m)
        d2, m2 = _lsq_affine(x, q2, w)
        err2 = _affine_error(x, d2, m2, q2, w)
        b = err2 < err
        d, m, q, err = (torch.where(b, d2, d), torch.where(b, m2, m), torch.where(b[:, None], q2, q),
                        torch.where(b, err2, err))
    # a negative d is the same grid read backwards (q -> 15 - q): store d >= 0
    flip = d < 0
    m = torch.where(flip, _fp16(m + 15 * d), m)
    d = torch.where(flip, -d, d)
    q = torch.where(flip[:, None], _round_affine(x, d, m), q)
    keep = _affine_error(x, d0, m0, q0, w) <= _affine_error(x, d, m, q, w)  # min/max wins ties
    return torch.where(keep, d0, d) + 0.0, torch.where(keep, m0, m) + 0.0, torch.where(keep[:, None], q0, q)


def error_weights(x: torch.Tensor) -> torch.Tensor:
    """The weight of each weight's rounding error in the search: sqrt(sigma^2 + x^2), sigma^2 the block's mean
    square (llama.cpp weights its imatrix the same way): larger weights count more. Measured on SmolLM2 (q4_0, every
    matrix): the plain squared error (w = 1) is lowered by the search but perplexity rises (+42% against max-abs's
    +36%); these weights give +32% (docs/quantized-decode.md, Quality)."""
    return torch.sqrt((x * x).mean(-1, keepdim=True) + x * x)


def default_method(fmt: str) -> str:
    """q4_0 and q4_1: the scale search (the error of 4-bit rounding is what costs quality); q8_0: max-abs (its
    rounding error is 1/256 of q4_0's; perplexity already within 0.05%, docs/quantized-decode.md, Quality)."""
    return "maxabs" if fmt == "q8_0" else "search"


def quantize(w: torch.Tensor, fmt: str, importance: torch.Tensor | None = None,
             method: str | None = None) -> QuantMatrix:
    """Quantize the rows of ``w`` (rows, n) to ``fmt`` (see the module docstring). ``method``: search | maxabs
    (default ``default_method(fmt)``, see ``quantize_blocks``); the search weighs each weight's error by
    ``error_weights`` times ``importance`` (n,) of its input column when given (e.g. the mean square of the
    activation it multiplies, as llama.cpp's imatrix)."""
    check_format(fmt, w.shape[-1])
    method = default_method(fmt) if method is None else method
    rows, n = w.shape
    nb = n // BLOCK
    src = w.detach()
    imp = None
    if importance is not None:
        if importance.shape != (n,):
            raise ValueError(f"importance has shape {tuple(importance.shape)}; expected ({n},), one per input column")
        imp = importance.detach().float().clamp_min(0).reshape(1, nb, BLOCK)

    def build() -> torch.Tensor:
        data = torch.empty(rows, row_bytes(fmt, n), dtype=torch.uint8)
        threads = torch.get_num_threads()
        try:
            if method == "search":  # many small ops: one thread (threads per op on cache-sized chunks cost 2-15x more)
                torch.set_num_threads(1)
            _quantize_rows(src, data, fmt, imp, method)
        finally:
            torch.set_num_threads(threads)
        return data

    if not quant_cache.active():
        return QuantMatrix(build(), fmt, n)
    version = f"{QUANTIZER_VERSION}|{method}"
    if imp is not None:  # the importance changes the search's choice: it is part of the key
        version += "|" + quant_cache.matrix_key(imp.reshape(-1), "importance", "")
    return QuantMatrix(quant_cache.cached_rows(src, fmt, version, build), fmt, n)


def _quantize_rows(src: torch.Tensor, data: torch.Tensor, fmt: str, imp: torch.Tensor | None, method: str) -> None:
    rows, n = src.shape
    nb = n // BLOCK
    step = max(1, CHUNK_BLOCKS // nb)
    for r0 in range(0, rows, step):  # a chunk of rows at a time: the search's temporaries stay in cache
        r1 = min(rows, r0 + step)
        x = src[r0:r1].float().reshape(-1, BLOCK)
        wt = None if method == "maxabs" else error_weights(x)
        if imp is not None and wt is not None:
            wt = wt * imp.expand(r1 - r0, nb, BLOCK).reshape(-1, BLOCK)
        if fmt == "q4_1":
            d, m, q = quantize_blocks_q4_1(x, wt, method)
            data[r0:r1, 2 * nb: 4 * nb] = m.to(torch.float16).view(torch.uint8).reshape(r1 - r0, 2 * nb)
        else:
            d, q = quantize_blocks(x, fmt, wt, method)
        if fmt == "q8_0":
            quants = q.to(torch.int8).reshape(r1 - r0, n).view(torch.uint8)
        else:
            q = (q + (0 if fmt == "q4_1" else 8)).to(torch.uint8).reshape(r1 - r0, nb, BLOCK)
            quants = (q[..., :16] | (q[..., 16:] << 4)).reshape(r1 - r0, n // 2)
        data[r0:r1, : 2 * nb] = d.to(torch.float16).view(torch.uint8).reshape(r1 - r0, 2 * nb)
        data[r0:r1, scale_bytes(fmt, n):] = quants


def _split(qw: QuantMatrix) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(d (rows, nb) fp32, m (rows, nb) fp32 minima (q4_1) or None, q (rows, n) int values as float32)."""
    rows, n, nb = qw.data.shape[0], qw.cols, qw.cols // BLOCK
    d = qw.data[:, : 2 * nb].contiguous().view(torch.float16).float()
    m = qw.data[:, 2 * nb: 4 * nb].contiguous().view(torch.float16).float() if qw.fmt == "q4_1" else None
    raw = qw.data[:, scale_bytes(qw.fmt, n): row_bytes(qw.fmt, n)]
    if qw.fmt == "q8_0":
        q = raw.contiguous().view(torch.int8).float()
    else:
        p = raw.reshape(rows, nb, 16)
        q = torch.cat([p & 0x0F, p >> 4], -1).float().reshape(rows, n)
        if qw.fmt == "q4_0":
            q -= 8.0
    return d, m, q


def dequantize(qw: QuantMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (rows, cols) weights the quantized matrix stands for."""
    d, m, q = _split(qw)
    rows, nb = d.shape
    w = q.reshape(rows, nb, BLOCK) * d[..., None]
    if m is not None:
        w += m[..., None]
    return w.reshape(rows, qw.cols).to(dtype)


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-call activation quantization of the dot products: (q int8 (n,), d fp32 (n / 32,))."""
    blocks = x.float().reshape(-1, BLOCK)
    d = blocks.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(blocks * inv[:, None]).to(torch.int8).reshape(-1), d


def quant_matvec_reference(qw: QuantMatrix, x: torch.Tensor) -> torch.Tensor:
    """y = W x with integer block products, as the kernels compute it (fp32, summation order aside): per block b,
    d_w d_x sum(q x_q), plus for q4_1 m_w d_x sum(x_q)."""
    xq, xd = quantize_act(x)
    d, m, q = _split(qw)
    rows, nb = d.shape
    xb = xq.float().reshape(nb, BLOCK)
    # integer sums below 2^24 (|q x_q| <= 127 * 127 per weight, 32 per block): exact in fp32
    isum = torch.einsum("rbk,bk->rb", q.reshape(rows, nb, BLOCK), xb)
    y = isum * (d * xd[None, :])
    if m is not None:
        y += m * (xd * xb.sum(-1))[None, :]
    return y.sum(-1)


_EXT_FORMATS: dict[str, bool] = {}


def ext_supports(fmt: str) -> bool:
    """Whether the C++ extension's quantized ops take ``fmt`` (probed once per format on a one-row matrix: an
    extension built before a format's kernels refuses its code). The wrappers below run a format the extension
    lacks in torch; callers that hand formats to C++ themselves (the fused step, ``ops.quant_sparse``) must check."""
    if fmt not in _EXT_FORMATS:
        ok = _extension.available()
        if ok and fmt not in FORMATS:
            g = torch.Generator().manual_seed(0)
            qw = quantize(torch.randn(2, 2 * BLOCK, generator=g), fmt, method="maxabs")
            x = torch.randn(2 * BLOCK, generator=g)
            try:
                y = torch.ops.sparkformer.quant_matvec(qw.data, CODES[fmt], qw.cols, x)
                ok = bool(torch.allclose(y, quant_matvec_reference(qw, x), rtol=1e-4, atol=1e-4))
            except RuntimeError:
                ok = False
        _EXT_FORMATS[fmt] = ok
    return _EXT_FORMATS[fmt]


def _auto_impl(fmt: str) -> str:
    """auto: the C++ op where the extension has the format; the kernels' math in torch (``reference``) where the
    extension lacks only the format; plain torch without the extension."""
    if ext_supports(fmt):
        return "ext"
    return "reference" if _extension.available() else "torch"


def quant_matvec(qw: QuantMatrix, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """y (rows,) fp32 = W x for a quantized W. ``impl``: auto (C++ when it builds and has the format, see
    ``ext_supports``), ext, torch (dequantize and matvec in fp32: no activation quantization) or reference."""
    if impl == "auto":
        impl = _auto_impl(qw.fmt)
    if impl == "ext":
        return torch.ops.sparkformer.quant_matvec(qw.data, CODES[qw.fmt], qw.cols, x)
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


def quantize_spark_ffn(k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, fmt: str,
                       k1_fmt: str | None = None) -> QuantSparkFFN:
    """K2 and V rows in ``fmt`` (one row per neuron: one format), K1 in ``k1_fmt`` (default ``fmt``)."""
    k1_fmt = fmt if k1_fmt is None else k1_fmt
    check_format(k1_fmt, k1.shape[1], "Spark FFN K1")
    check_format(fmt, k2.shape[1], "Spark FFN K2")
    check_format(fmt, v.shape[1], "Spark FFN V")
    rows = torch.cat([quantize(k2, fmt).data, quantize(v, fmt).data], 1).contiguous()
    return QuantSparkFFN(quantize(k1, k1_fmt), rows, fmt, k2.shape[1], v.shape[1])


@dataclass
class QuantGeglu:
    """A dense gated FFN in a quantized decode layout: [W_gate; W_up] (2m, d) and W_down (d, m), both read as
    integer dot products (the hidden activations are quantized per token like the input)."""

    gate_up: QuantMatrix
    down: QuantMatrix

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def quantize_geglu(w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, fmt: str,
                   down_fmt: str | None = None) -> QuantGeglu:
    """From the float decode layout (w_gate, w_up (m, d), W_down^T (m, d)): gate/up in ``fmt``, down in
    ``down_fmt`` (default ``fmt``)."""
    down_fmt = fmt if down_fmt is None else down_fmt
    check_format(fmt, w_gate.shape[1], "FFN gate/up")
    check_format(down_fmt, w_down_t.shape[0], "FFN down")
    return QuantGeglu(quantize(torch.cat([w_gate, w_up]), fmt), quantize(w_down_t.t(), down_fmt))


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
        impl = _auto_impl(ffn.fmt)
    if impl == "ext":
        return torch.ops.sparkformer.quant_ffn_gather(idx.to(torch.int32).contiguous(), a.float().contiguous(),
                                                      ffn.rows, CODES[ffn.fmt], ffn.n2, ffn.nv, x2)
    if impl == "torch":
        k2, v = quant_ffn_rows(ffn)
        idx = idx.long()
        h = a.float() * (dequantize(k2.index_select(idx)) @ x2.float())
        return h @ dequantize(v.index_select(idx))
    if impl == "reference":
        return quant_ffn_gather_reference(ffn, idx, a, x2)
    raise ValueError(f"unknown impl {impl!r} (auto | ext | torch | reference)")
