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

__all__ = [
    "FUSED_ACTIVATIONS",
    "cats_ffn_decode",
    "cats_ffn_decode_reference",
    "cats_ffn_decode_torch",
    "fused_act_name",
    "gated_ffn_gather",
    "gated_ffn_gather_reference",
    "gated_ffn_gather_torch",
    "sparse_input_matvec",
    "sparse_input_matvec_reference",
    "sparse_input_matvec_torch",
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
