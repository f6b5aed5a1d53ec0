"""Per-kernel timings of the Spark FFN / Spark attention launches at the gemma2-2b shape (next device session).

    PYTHONPATH=. python3 benchmarks/gpu_kernels.py --out $OUT        # ~1 min on an H200

The decode benchmark showed the Spark kernels latency-bound (docs/gpu-decode.md); this splits their time. Each
figure is one CUDA graph over all 26 layers' own weights (cold: ~100x the L2), divided by 26, for the first 1, 2 or 3
launches of a plan, so differences give each kernel. Every FFN launch shape of ``SparkFFNPlan.pick`` is timed, plus
the dense GEMVs for reference. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from sparkformer.config import get_preset
from sparkformer.ops.triton_decode import DenseAttnPlan, geglu_act
from sparkformer.ops.triton_spark_attn import SparkAttnPlan
from sparkformer.ops.triton_spark_ffn import SparkFFNPlan


def graph_time(fn, reps: int = 20) -> float:
    """Microseconds per replay of a CUDA graph of fn."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        g.replay()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) * 1e3 / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="gemma2-2b")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    cfg = get_preset(args.preset)
    dev, dt, nl = args.device, torch.bfloat16, cfg.n_layers
    d, n, r, m = cfg.d_model, cfg.spark_ffn_dim, cfg.spark_ffn_rank, cfg.ffn_dim
    res: dict = {"device": torch.cuda.get_device_name(0), "preset": args.preset, "context": args.context}
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt) * 0.02  # noqa: E731
    x = torch.randn(d, device=dev, dtype=dt)

    # ---- FFN -----------------------------------------------------------------------------------------------
    ws = [(rnd(n, r), rnd(n, d - r), rnd(n, d)) for _ in range(nl)]
    ffn = {}
    for c in [dict(fuse_out=False), dict(fuse_out=True), dict(fuse_out=False, block_n=32, block_k=512, warps=8),
              dict(fuse_out=False, block_c=64, sub=8, block_s=16), dict(fuse_out=True, block_c=64, sub=8),
              dict(fuse_out=False, block_c=32, sub=8, splits=64), dict(fuse_out=True, block_c=32, sub=8),
              dict(fuse_out=False, block_n=8, block_k=1024, block_c=32, sub=8, splits=64, block_s=4)]:
        plan = SparkFFNPlan.for_weights(*ws[0], cfg.spark_ffn_fraction, **c)
        row = {}
        for stages in (1, 2, 3):
            if stages == 3 and plan.fuse_out:
                continue
            row[f"launches_1_to_{stages}_us"] = graph_time(
                lambda: [plan.run(x, *w, stages=stages) for w in ws]) / nl
        key = ",".join(f"{k}={v}" for k, v in c.items())
        ffn[key] = row
        print(f"ffn {key}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    res["spark_ffn_us_per_layer"] = ffn
    del ws
    dws = [(rnd(2 * m, d), rnd(d, m)) for _ in range(nl)]
    gu, a, y = (torch.empty(2 * m, device=dev, dtype=dt), torch.empty(m, device=dev, dtype=dt),
                torch.empty(d, device=dev, dtype=dt))

    def dense_ffn(stages):
        for wgu, wd in dws:
            torch.mv(wgu, x, out=gu)
            if stages > 1:
                geglu_act(gu, a)
            if stages > 2:
                torch.mv(wd, a, out=y)

    res["dense_ffn_us_per_layer"] = {f"launches_1_to_{s}_us": graph_time(lambda: dense_ffn(s)) / nl for s in (1, 2, 3)}
    print("dense ffn:", res["dense_ffn_us_per_layer"], flush=True)
    del dws

    # ---- attention -------------------------------------------------------------------------------------------
    H, KV, hd, ra, L = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank, args.context + 64
    L = -(-L // 64) * 64
    ln = torch.tensor([args.context], dtype=torch.int32, device=dev)
    q = torch.randn(H, hd, device=dev)
    caches = []
    for _ in range(nl):
        krv = torch.randn(KV, L, 2 * hd - ra, device=dev, dtype=dt)
        caches.append((torch.randn(KV, L // 64, ra, 64, device=dev, dtype=dt), krv[..., : hd - ra], krv[..., hd - ra:]))
    attn = {}
    for c in [dict(), dict(chunk=128), dict(block_j=8), dict(block_l=128)]:
        plan = SparkAttnPlan(H, KV, hd, ra, hd, L, cfg.spark_attn_topk, dev, **c)
        row = {f"launches_1_to_{s}_us": graph_time(
            lambda: [plan.run(q, *cc, ln, cfg.attn_scale, None, cfg.attn_logit_softcap, stages=s) for cc in caches]) / nl
            for s in (1, 2, 3)}
        key = ",".join(f"{k}={v}" for k, v in c.items()) or "default"
        attn[key] = row
        print(f"spark attn {key}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    res["spark_attn_us_per_layer"] = attn
    del caches
    dcs = [(torch.randn(KV, L, hd, device=dev, dtype=dt), torch.randn(KV, L, hd, device=dev, dtype=dt))
           for _ in range(nl)]
    out = torch.empty(H, hd, device=dev, dtype=dt)
    dplan = DenseAttnPlan(H, KV, hd, hd, dev)
    res["dense_attn_us_per_layer"] = graph_time(
        lambda: [dplan.run(q, k, v, ln, cfg.attn_scale, None, cfg.attn_logit_softcap, out) for k, v in dcs]) / nl
    print("dense attn:", res["dense_attn_us_per_layer"], flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_kernels.json"), "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
