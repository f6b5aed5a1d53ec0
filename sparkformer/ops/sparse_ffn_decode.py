"""Activation-sparse decode kernels for pretrained models (issue 15): gated-FFN row gathers, CATS, TEAL inputs.

Three ops, each a fused C++ kernel (``csrc/sparse_impl.h``, AVX-512 / AVX2 / scalar; fp32 or bf16 weights, fp32
accumulation, both cores with a private accumulator per thread) beside its plain-PyTorch reference (the
specification, dense fp32 on upcast weights) and a fast pure-PyTorch path (the fallback without the extension):

- ``gated_ffn_gather(x, gate_up, w_down_t, idx, act)``: a gated FFN over the neurons ``idx`` some router chose,
  ``y = sum_{i in idx} act(gate_i . x) * (up_i . x) * w_down_t[i]``. ``gate_up`` is (m, 2, d): each neuron's gate
  and up rows side by side (``RoutedFFN.gate_up``), so a selected neuron is one contiguous read of 2d weights.
- ``cats_ffn_decode(x, w_gate, w_up, w_down_t, threshold, act)``: CATS -- every gate row, then only the neurons with
  ``|act(gate_i . x)| > threshold`` read their up row and W_down^T row. Weights as ``dense_decode.pack_geglu`` lays
  them out (three (m, d) views). Returns (y, neurons kept).
- ``lowrank_routed_ffn(x, A, B, f, act, gate_up, w_down_t, verify_weights, verify_threshold)``: a low-rank
  predictor's whole routed FFN step in one call -- scores ``s = |act(g) * u|``, ``[g; u] = B (A x)``, the neurons
  with ``s > stat_threshold(s, f)``, then ``gated_ffn_gather`` (or its verify form) over them. Returns
  (y, proposed, kept).
- ``teal_ffn_decode(x, gate_up_t, w_down_t, t_in, t_down, act)``: TEAL's gated FFN step in one call -- the inputs
  ``|x_j| > t_in`` of [W_gate; W_up]^T, then the neurons ``|h_i| > t_down`` of W_down^T. Returns (y, n_in, n_h).
- ``sparse_input_matvec(w_t, x, threshold)``: TEAL-style ``y = W x`` skipping the inputs ``|x_j| <= threshold``;
  W is stored transposed (``w_t = W^T``, (n_in, n_out), row-major) so that a kept input reads one contiguous row.
  Returns (y, inputs kept).

``act`` is ``"gelu_tanh"`` or ``"silu"`` (or the matching function of ``activations.ACTIVATIONS``). Every op
returns y in x's dtype and counts as int64 scalar tensors; ``impl``: "auto" (C++ when available, else "torch") |
"ext" | "torch" | "reference".
"""

from __future__ import annotations

from typing import Callable

import torch

from sparkformer.ops import _extension
from sparkformer.ops.activations import ACTIVATIONS
from sparkformer.ops.stat_topk import stat_threshold

__all__ = [
    "FUSED_ACTIVATIONS",
    "cats_ffn_decode",
    "cats_ffn_decode_reference",
    "cats_ffn_decode_torch",
    "fused_act_name",
    "gated_ffn_gather",
    "gated_ffn_gather_reference",
    "gated_ffn_gather_torch",
    "gated_ffn_gather_verify",
    "gated_ffn_gather_verify_reference",
    "lowrank_routed_ffn",
    "lowrank_routed_ffn_reference",
    "lowrank_routed_ffn_torch",
    "sparse_input_matvec",
    "sparse_input_matvec_reference",
    "sparse_input_matvec_torch",
    "teal_ffn_decode",
    "teal_ffn_decode_reference",
    "teal_ffn_decode_torch",
]

FUSED_ACTIVATIONS = ("gelu_tanh", "silu")  # what the C++ kernels implement (spk::Act)
IMPLS = ("auto", "ext", "torch", "reference")


def fused_act_name(act: str | Callable) -> str:
    """The kernels' name of an FFN activation given by name or as one of ``ACTIVATIONS``' functions."""
    if isinstance(act, str):
        if act in FUSED_ACTIVATIONS:
            return act
    else:
        for name in FUSED_ACTIVATIONS:
            if act is ACTIVATIONS[name]:
                return name
    raise ValueError(f"unsupported activation {act!r}: the fused kernels implement {' | '.join(FUSED_ACTIVATIONS)}")


def _impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r} ({' | '.join(IMPLS)})")
    if impl == "auto":
        return "ext" if _extension.available() else "torch"
    return impl


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if threshold != threshold:
        raise ValueError("threshold is NaN")
    return threshold


def _check_idx(idx: torch.Tensor, m: int) -> torch.Tensor:
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be a 1-D int32 or int64 tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= m):
        raise ValueError(f"neuron index out of range [0, {m})")
    return idx.long()


def _check_gate_up(x: torch.Tensor, gate_up: torch.Tensor, w_down_t: torch.Tensor) -> None:
    if gate_up.dim() != 3 or gate_up.shape[1] != 2 or x.dim() != 1 or x.shape[0] != gate_up.shape[2] \
            or w_down_t.dim() != 2 or w_down_t.shape[0] != gate_up.shape[0]:
        raise ValueError(f"expected x (d,), gate_up (m, 2, d), w_down_t (m, d_out); got x {tuple(x.shape)}, "
                         f"gate_up {tuple(gate_up.shape)}, w_down_t {tuple(w_down_t.shape)}")


# ------------------------------------------------------------------------------------------------
# Gated FFN over selected neurons
# ------------------------------------------------------------------------------------------------
def gated_ffn_gather_reference(x, gate_up, w_down_t, idx, act):
    """The specification: fp32 on upcast weights, the selected neurons' rows gathered."""
    fn = ACTIVATIONS[fused_act_name(act)]
    idx = _check_idx(idx, gate_up.shape[0])
    xf = x.float()
    gu = gate_up.index_select(0, idx).float() @ xf  # (k, 2)
    h = fn(gu[:, 0]) * gu[:, 1]
    return (w_down_t.index_select(0, idx).float().t() @ h).to(x.dtype)


def gated_ffn_gather_torch(x, gate_up, w_down_t, idx, act):
    """Fast pure-PyTorch form (index_select + matmul in the weights' dtype), the fallback without the extension."""
    fn = ACTIVATIONS[fused_act_name(act)]
    idx = _check_idx(idx, gate_up.shape[0])
    xw = x.to(gate_up.dtype)
    gu = (gate_up.index_select(0, idx).view(-1, xw.numel()) @ xw).float().view(-1, 2)
    h = fn(gu[:, 0]) * gu[:, 1]
    return (h.to(w_down_t.dtype) @ w_down_t.index_select(0, idx)).to(x.dtype)


def gated_ffn_gather(x: torch.Tensor, gate_up: torch.Tensor, w_down_t: torch.Tensor, idx: torch.Tensor,
                     act: str | Callable, *, impl: str = "auto") -> torch.Tensor:
    """Gated FFN output of one token over the neurons ``idx`` only.

    Args:
        x: (d,) activation, any float dtype (fp32 compute; y comes back in x's dtype).
        gate_up: (m, 2, d) fp32 or bf16: neuron i's gate row is gate_up[i, 0], its up row gate_up[i, 1]
            (last dim contiguous; contiguous overall reads best).
        w_down_t: (m, d_out) = W_down transposed, same dtype, last dim contiguous.
        idx: (k,) int32 or int64 neuron ids (k may be 0; repeats count twice).
        act: "gelu_tanh" | "silu" (or ``ACTIVATIONS[name]``).
        impl: "auto" | "ext" | "torch" | "reference".

    Returns:
        y (d_out,) = sum_{i in idx} act(gate_i . x) * (up_i . x) * w_down_t[i].
    """
    name = act if act in FUSED_ACTIVATIONS else fused_act_name(act)
    impl = _impl(impl)
    if impl == "ext":  # the op checks its arguments (RuntimeError); no Python-side checks on the hot path
        return torch.ops.sparkformer.gated_ffn_gather(x, gate_up, w_down_t, idx, name)
    _check_gate_up(x, gate_up, w_down_t)
    if impl == "torch":
        return gated_ffn_gather_torch(x, gate_up, w_down_t, idx, name)
    return gated_ffn_gather_reference(x, gate_up, w_down_t, idx, name)


def gated_ffn_gather_verify_reference(x, gate_up, w_down_t, idx, act, weights, threshold):
    """The specification of the verify stage: of the neurons idx, those with |h_i| * weights[i] > threshold."""
    fn = ACTIVATIONS[fused_act_name(act)]
    idx = _check_idx(idx, gate_up.shape[0])
    gu = gate_up.index_select(0, idx).float() @ x.float()
    h = fn(gu[:, 0]) * gu[:, 1]
    keep = h.abs() * weights.float().index_select(0, idx) > threshold
    y = w_down_t.index_select(0, idx[keep]).float().t() @ h[keep]
    return y.to(x.dtype), keep.sum()


def gated_ffn_gather_verify(x: torch.Tensor, gate_up: torch.Tensor, w_down_t: torch.Tensor, idx: torch.Tensor,
                            act: str | Callable, weights: torch.Tensor, threshold: float, *,
                            impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gated_ffn_gather` with a verify stage: of the proposed neurons ``idx`` only those whose exact output
    magnitude |h_i| * weights[i] exceeds ``threshold`` read their W_down^T row. ``weights``: (m,) fp32.
    Returns (y in x's dtype, kept: int64 scalar tensor)."""
    name = act if act in FUSED_ACTIVATIONS else fused_act_name(act)
    impl = _impl(impl)
    if impl == "ext":
        return torch.ops.sparkformer.gated_ffn_gather_verify(x, gate_up, w_down_t, idx, name, weights,
                                                             float(threshold))
    _check_gate_up(x, gate_up, w_down_t)
    return gated_ffn_gather_verify_reference(x, gate_up, w_down_t, idx, name, weights, threshold)


# ------------------------------------------------------------------------------------------------
# CATS
# ------------------------------------------------------------------------------------------------
def cats_ffn_decode_reference(x, w_gate, w_up, w_down_t, threshold, act):
    """The specification: dense fp32, h = a * (W_up x) where |a| > threshold (a = act(W_gate x)), else 0."""
    fn = ACTIVATIONS[fused_act_name(act)]
    xf = x.float()
    a = fn(w_gate.float() @ xf)
    keep = a.abs() > _check_threshold(threshold)
    h = torch.where(keep, a * (w_up.float() @ xf), torch.zeros_like(a))
    return (w_down_t.float().t() @ h).to(x.dtype), keep.sum()


def cats_ffn_decode_torch(x, w_gate, w_up, w_down_t, threshold, act):
    """Fast pure-PyTorch form: all of W_gate, then index_select of the kept up and W_down^T rows."""
    fn = ACTIVATIONS[fused_act_name(act)]
    xw = x.to(w_gate.dtype)
    a = fn(torch.mv(w_gate, xw).float())
    idx = torch.nonzero(a.abs() > _check_threshold(threshold)).squeeze(1)
    h = a.index_select(0, idx) * torch.mv(w_up.index_select(0, idx), xw).float()
    return (h.to(w_down_t.dtype) @ w_down_t.index_select(0, idx)).to(x.dtype), idx.new_tensor(idx.numel())


def cats_ffn_decode(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                    threshold: float, act: str | Callable, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """CATS gated FFN for one token: neurons whose gate activation is small skip their up and down rows.

    Args:
        x: (d,) activation, any float dtype.
        w_gate, w_up: (m, d); w_down_t: (m, d_out) = W_down^T. fp32 or bf16, one dtype, last dim contiguous
            (``pack_geglu``'s views read best).
        threshold: keep neuron i when |act(w_gate[i] . x)| > threshold (0 keeps every neuron with a nonzero gate).
        act: "gelu_tanh" | "silu" (or ``ACTIVATIONS[name]``).
        impl: "auto" | "ext" | "torch" | "reference".

    Returns:
        (y (d_out,) in x's dtype, n_kept: int64 scalar tensor).
    """
    name = act if act in FUSED_ACTIVATIONS else fused_act_name(act)
    threshold = _check_threshold(threshold)
    impl = _impl(impl)
    if impl == "ext":
        return torch.ops.sparkformer.cats_ffn_decode(x, w_gate, w_up, w_down_t, threshold, name)
    if impl == "torch":
        return cats_ffn_decode_torch(x, w_gate, w_up, w_down_t, threshold, name)
    return cats_ffn_decode_reference(x, w_gate, w_up, w_down_t, threshold, name)


# ------------------------------------------------------------------------------------------------
# TEAL-style input sparsity
# ------------------------------------------------------------------------------------------------
def _check_matvec(w_t: torch.Tensor, x: torch.Tensor) -> None:
    if w_t.dim() != 2 or x.dim() != 1 or w_t.shape[0] != x.shape[0]:
        raise ValueError(f"expected w_t (n_in, n_out) = W^T and x (n_in,), got w_t {tuple(w_t.shape)}, "
                         f"x {tuple(x.shape)}")


def sparse_input_matvec_reference(w_t, x, threshold):
    """The specification: fp32, inputs with |x_j| <= threshold zeroed, then W x = w_t^T x."""
    _check_matvec(w_t, x)
    xf = x.float()
    keep = xf.abs() > _check_threshold(threshold)
    return (w_t.float().t() @ torch.where(keep, xf, torch.zeros_like(xf))).to(x.dtype), keep.sum()


def sparse_input_matvec_torch(w_t, x, threshold):
    """Fast pure-PyTorch form: index_select of the kept rows of W^T, one vector-matrix product."""
    _check_matvec(w_t, x)
    idx = torch.nonzero(x.abs() > _check_threshold(threshold)).squeeze(1)
    y = x.index_select(0, idx).to(w_t.dtype) @ w_t.index_select(0, idx)
    return y.to(x.dtype), idx.new_tensor(idx.numel())


def sparse_input_matvec(w_t: torch.Tensor, x: torch.Tensor, threshold: float, *,
                        impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """y = W x over the inputs with |x_j| > threshold only, W given transposed.

    Args:
        w_t: (n_in, n_out) = W^T, fp32 or bf16, rows contiguous (``W.t().contiguous()``).
        x: (n_in,) activation, any float dtype.
        threshold: inputs with |x_j| <= threshold are skipped (a negative threshold keeps all).
        impl: "auto" | "ext" | "torch" | "reference".

    Returns:
        (y (n_out,) in x's dtype, n_kept: int64 scalar tensor).
    """
    threshold = _check_threshold(threshold)
    impl = _impl(impl)
    if impl == "ext":
        return torch.ops.sparkformer.sparse_input_matvec(w_t, x, threshold)
    if impl == "torch":
        return sparse_input_matvec_torch(w_t, x, threshold)
    return sparse_input_matvec_reference(w_t, x, threshold)


# ------------------------------------------------------------------------------------------------
# Whole FFN steps in one call
# ------------------------------------------------------------------------------------------------
def _check_fraction(f: float) -> float:
    f = float(f)
    if not 0.0 < f <= 1.0:
        raise ValueError(f"f must be in (0, 1], got {f}")
    return f


def _check_lowrank(x, A, B, gate_up, w_down_t) -> None:
    _check_gate_up(x, gate_up, w_down_t)
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != x.shape[0] or B.shape != (2 * gate_up.shape[0], A.shape[0]):
        raise ValueError(f"expected A (r, d), B (2m, r) for x (d,), gate_up (m, 2, d); got A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, gate_up {tuple(gate_up.shape)}")


def lowrank_routed_ffn_reference(x, A, B, f, act, gate_up, w_down_t, verify_weights=None, verify_threshold=0.0,
                                 score_act=None):
    """The specification: fp32 on upcast weights -- z = A x, [g; u] = B z, s = |act(g) * u|, the neurons with
    s > stat_threshold(s, f), then the gather (verify form when ``verify_weights`` is given)."""
    _check_lowrank(x, A, B, gate_up, w_down_t)
    f = _check_fraction(f)
    fn = ACTIVATIONS[fused_act_name(score_act if score_act is not None else act)]
    m = gate_up.shape[0]
    yb = B.float() @ (A.float() @ x.float())
    s = (fn(yb[:m]) * yb[m:]).abs()
    idx = (s > stat_threshold(s, f)).nonzero().squeeze(1)
    if verify_weights is None:
        return gated_ffn_gather_reference(x, gate_up, w_down_t, idx, act), idx.new_tensor(idx.numel()), \
            idx.new_tensor(idx.numel())
    y, kept = gated_ffn_gather_verify_reference(x, gate_up, w_down_t, idx, act, verify_weights, verify_threshold)
    return y, idx.new_tensor(idx.numel()), kept


def lowrank_routed_ffn_torch(x, A, B, f, act, gate_up, w_down_t, verify_weights=None, verify_threshold=0.0,
                             score_act=None):
    """The unfused torch composition of ``sparkformer.decode.routed`` (``routed_neurons``, then the gather): GEMVs in
    the weights' dtype, z rounded to it, ~10 small torch ops."""
    fn = ACTIVATIONS[fused_act_name(score_act if score_act is not None else act)]
    act_fn = ACTIVATIONS[fused_act_name(act)]
    m = gate_up.shape[0]
    xw = x.to(gate_up.dtype)
    yb = torch.mv(B, torch.mv(A, xw.to(A.dtype)).to(B.dtype)).float()
    s = (fn(yb[:m]) * yb[m:]).abs_()
    idx = (s > stat_threshold(s, f)).nonzero().squeeze(1)
    n_prop = idx.numel()
    gu = (gate_up.index_select(0, idx).view(-1, xw.numel()) @ xw).float().view(-1, 2)
    h = act_fn(gu[:, 0]) * gu[:, 1]
    if verify_weights is not None:
        keep = (h.abs() * verify_weights.index_select(0, idx) > verify_threshold).nonzero().squeeze(1)
        idx, h = idx.index_select(0, keep), h.index_select(0, keep)
    y = h.to(w_down_t.dtype) @ w_down_t.index_select(0, idx)
    return y.to(x.dtype), idx.new_tensor(n_prop), idx.new_tensor(idx.numel())


def lowrank_routed_ffn(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, f: float, act: str | Callable,
                       gate_up: torch.Tensor, w_down_t: torch.Tensor, verify_weights: torch.Tensor | None = None,
                       verify_threshold: float = 0.0, *, score_act: str | Callable | None = None,
                       impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A low-rank predictor's routed FFN step for one token, in one call (one C++ op).

    Args:
        x: (d,) activation, any float dtype (fp32 compute; y comes back in x's dtype).
        A: (r, d), B: (2m, r): the predictor (``LowRankPredictor.decode_form``), fp32 or bf16, one dtype.
        f: the statistical selection's fraction, in (0, 1] (1 keeps every neuron).
        act: the FFN's activation, "gelu_tanh" | "silu" (or ``ACTIVATIONS[name]``); also the score's unless
            ``score_act`` is given.
        gate_up: (m, 2, d), w_down_t: (m, d_out), fp32 or bf16 (one dtype), as :func:`gated_ffn_gather`.
        verify_weights: optional (m,) fp32 contiguous: then only the proposed neurons with
            |h_i| * verify_weights[i] > verify_threshold read their W_down^T row (:func:`gated_ffn_gather_verify`).
        impl: "auto" | "ext" | "torch" (the unfused composition of ``decode.routed``) | "reference".

    Returns:
        (y (d_out,), proposed: int64 scalar tensor (the neurons with s > theta), kept: int64 scalar tensor (the
        W_down^T rows read; = proposed without verify)).
    """
    name = act if act in FUSED_ACTIVATIONS else fused_act_name(act)
    sname = None if score_act is None else (score_act if score_act in FUSED_ACTIVATIONS else fused_act_name(score_act))
    impl = _impl(impl)
    if impl == "ext":
        return torch.ops.sparkformer.lowrank_routed_ffn(x, A, B, float(f), name, gate_up, w_down_t, verify_weights,
                                                        float(verify_threshold), sname)
    if impl == "torch":
        _check_lowrank(x, A, B, gate_up, w_down_t)
        return lowrank_routed_ffn_torch(x, A, B, _check_fraction(f), name, gate_up, w_down_t, verify_weights,
                                        verify_threshold, sname)
    return lowrank_routed_ffn_reference(x, A, B, f, name, gate_up, w_down_t, verify_weights, verify_threshold, sname)


def _check_teal(x, gate_up_t, w_down_t) -> None:
    if x.dim() != 1 or gate_up_t.dim() != 2 or w_down_t.dim() != 2 or gate_up_t.shape[0] != x.shape[0] \
            or gate_up_t.shape[1] != 2 * w_down_t.shape[0]:
        raise ValueError(f"expected x (d,), gate_up_t (d, 2m), w_down_t (m, d_out); got x {tuple(x.shape)}, "
                         f"gate_up_t {tuple(gate_up_t.shape)}, w_down_t {tuple(w_down_t.shape)}")


def _teal(x, gate_up_t, w_down_t, t_in, t_down, act, mv):
    _check_teal(x, gate_up_t, w_down_t)
    fn = ACTIVATIONS[fused_act_name(act)]
    m = w_down_t.shape[0]
    gu, n_in = mv(gate_up_t, x.float(), _check_threshold(t_in))
    gu = gu.float()
    y, n_h = mv(w_down_t, fn(gu[:m]) * gu[m:], _check_threshold(t_down))
    return y.to(x.dtype), n_in, n_h


def teal_ffn_decode_reference(x, gate_up_t, w_down_t, t_in, t_down, act):
    """The specification: :func:`sparse_input_matvec_reference` twice (fp32), the activation in between."""
    return _teal(x, gate_up_t, w_down_t, t_in, t_down, act, sparse_input_matvec_reference)


def teal_ffn_decode_torch(x, gate_up_t, w_down_t, t_in, t_down, act):
    """Pure-PyTorch form: :func:`sparse_input_matvec_torch` twice."""
    return _teal(x, gate_up_t, w_down_t, t_in, t_down, act, sparse_input_matvec_torch)


def teal_ffn_decode(x: torch.Tensor, gate_up_t: torch.Tensor, w_down_t: torch.Tensor, t_in: float, t_down: float,
                    act: str | Callable, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TEAL's gated FFN step for one token, in one call (one C++ op).

    Args:
        x: (d,) activation, any float dtype (fp32 compute).
        gate_up_t: (d, 2m) = [W_gate; W_up]^T, row-major; w_down_t: (m, d_out) = W_down^T. fp32 or bf16, one dtype.
        t_in: inputs with |x_j| <= t_in are skipped (negative: keep all).
        t_down: neurons with |h_i| <= t_down are skipped, h = act(g) * u (negative: keep all).
        act: "gelu_tanh" | "silu" (or ``ACTIVATIONS[name]``).
        impl: "auto" | "ext" | "torch" | "reference".

    Returns:
        (y (d_out,) in x's dtype, n_in, n_h: int64 scalar tensors).
    """
    name = act if act in FUSED_ACTIVATIONS else fused_act_name(act)
    impl = _impl(impl)
    if impl == "ext":
        return torch.ops.sparkformer.teal_ffn_decode(x, gate_up_t, w_down_t, _check_threshold(t_in),
                                                     _check_threshold(t_down), name)
    if impl == "torch":
        return teal_ffn_decode_torch(x, gate_up_t, w_down_t, t_in, t_down, name)
    return teal_ffn_decode_reference(x, gate_up_t, w_down_t, t_in, t_down, name)
