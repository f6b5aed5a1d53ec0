"""Sparse ops: statistical top-k (training and reference) and the decode kernels' Python entry points.

Nothing here imports from above ``sparkformer.ops`` (model, decode, train, bricks, cli): they build on it.
"""

from sparkformer.ops.stat_topk import (
    achieved_count,
    exact_topk,
    exact_topk_inf,
    stat_threshold,
    stat_topk,
    stat_topk_inf,
    stat_z,
    stat_z_table,
)

__all__ = ["stat_topk", "stat_topk_inf", "stat_threshold", "stat_z", "stat_z_table", "exact_topk", "exact_topk_inf",
           "achieved_count"]
