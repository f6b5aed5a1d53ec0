"""Sparse ops: statistical top-k (training and reference) and the decode kernels' Python entry points."""

from sparkformer.ops.stat_topk import (
    achieved_count,
    exact_topk,
    exact_topk_inf,
    stat_threshold,
    stat_topk,
    stat_topk_inf,
)

__all__ = ["stat_topk", "stat_topk_inf", "stat_threshold", "exact_topk", "exact_topk_inf", "achieved_count"]
