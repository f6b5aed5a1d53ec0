"""Each decode kernel alone against its dense counterpart, at the gemma2-2b shape (issue #16's device items).

    PYTHONPATH=. python3 benchmarks/gpu_kernels.py --out $OUT                 # ~1-2 min on an H100/H200
    TRITON_INTERPRET=1 python3 benchmarks/gpu_kernels.py --tiny --out DIR     # the same code path on CPU, tiny shapes

Every figure is one CUDA graph over all layers' own weights (26 x ~127 MB of FFN weights: far beyond L2, so every
read is cold), replayed 20 times, median of 3, divided by the layer count: microseconds per layer. Each item is
appended to ``$OUT/kernels.jsonl`` as one JSON line the moment it is measured, so a run cut short keeps what it got.

Items: M0 the cost of a kernel boundary (26 empty launches; with programmatic dependent launch where available);
M1 F1 (predictor GEMV + stats) vs torch.mv over K1; M2 F1 + F2 at BLOCK_C 32 / 64 and with column splits; M2b the
variant without output atomics (F1 + F2 + F3); M2c batch 4 (union of selections); M2d PDL on; M2e the launch shape
the graph-timed tuner picks; M3 the dense GeGLU FFN (cuBLAS GEMVs + activation) of equal parameters; M4 per
context: A1 alone, A1 + A2 with the cap as it falls / forced on / forced off, vs dense flash-decoding; M5 the q/k/v
GEMV with the residual + pre-norm in its prologue vs residual_norm + torch.mv. FFN and attention items also record a
full-shape check against the plain-PyTorch reference of layer 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from sparkformer.config import ModelConfig, get_preset
from sparkformer.ops.spark_attn_decode import spark_attn_decode_reference
from sparkformer.ops.spark_ffn_decode import spark_ffn_decode_reference
from sparkformer.ops.triton_common import HAS_PDL, cuda_graph_us, launch_opts, tl, triton, wait_prior
from sparkformer.ops.triton_decode import DenseAttnPlan, geglu_act, res_norm_gemv, residual_norm
from sparkformer.ops.triton_spark_attn import SparkAttnPlan
from sparkformer.ops.triton_spark_ffn import SparkFFNPlan


@triton.jit
def _empty_kernel(x_ptr, PDL: tl.constexpr):
    wait_prior(PDL)


def tiny_config() -> ModelConfig:
    """The shapes of the interpreter run: every code path, seconds on a CPU."""
    return ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=64,
                       max_seq_len=256, sliding_window=64, spark_attn_topk=8, spark_ffn_rank=32)


class Harness:
    def __init__(self, cfg: ModelConfig, device: str, out: str | None, reps: int = 20):
        self.cfg, self.dev, self.reps = cfg, torch.device(device), reps
        self.cuda = self.dev.type == "cuda"
        self.path = os.path.join(out, "kernels.jsonl") if out else None
        if out:
            os.makedirs(out, exist_ok=True)

    def time_us(self, fn) -> float:
        """Microseconds per call: CUDA-graph replays on a GPU; one warm eager call under the interpreter."""
        if self.cuda:
            return cuda_graph_us(fn, self.reps)
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    def per_layer(self, fn, n: int) -> float:
        return round(self.time_us(fn) / n, 3)

    def emit(self, item: str, **rec) -> dict:
        rec = {"item": item, **rec}
        line = json.dumps(rec)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        return rec

    def guarded(self, item: str, fn) -> None:
        """Run one item; a failure is recorded as its own line and the next item still runs."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the point is to keep going and say what failed
            self.emit(item, error=f"{type(e).__name__}: {e}"[:500])
            if not self.cuda:
                raise  # under the interpreter (the test) a failure must fail


def rnd(g, *shape, dev, dt, scale=0.02):
    return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)


def boundary_items(hz: Harness, n: int) -> None:
    x = torch.zeros(1, device=hz.dev)
    hz.emit("M0_kernel_boundary", us_per_launch=hz.per_layer(
        lambda: [_empty_kernel[(1,)](x, PDL=False) for _ in range(n)], n))
    if HAS_PDL and hz.cuda:
        hz.emit("M0_kernel_boundary_pdl", us_per_launch=hz.per_layer(
            lambda: [_empty_kernel[(1,)](x, PDL=True, **launch_opts(4, True)) for _ in range(n)], n))


def ffn_items(hz: Harness, dt: torch.dtype, n_layers: int) -> None:
    cfg, dev = hz.cfg, hz.dev
    d, n, r, f = cfg.d_model, cfg.spark_ffn_dim, cfg.spark_ffn_rank, cfg.spark_ffn_fraction
    g = torch.Generator(device=dev).manual_seed(0)
    ws = [(rnd(g, n, r, dev=dev, dt=dt), rnd(g, n, d - r, dev=dev, dt=dt), rnd(g, n, d, dev=dev, dt=dt))
          for _ in range(n_layers)]
    x = torch.randn(d, generator=g, device=dev).to(dt)
    s_out = torch.empty(n, device=dev, dtype=dt)
    plan0 = SparkFFNPlan.for_weights(*ws[0], f)
    hz.guarded("M1_F1", lambda: hz.emit(
        "M1_F1", spark_f1_us=hz.per_layer(lambda: [plan0.run(x, *w, stages=1) for w in ws], n_layers),
        dense_mv_k1_us=hz.per_layer(lambda: [torch.mv(w[0], x[:r], out=s_out) for w in ws], n_layers),
        k1_mb=round(n * r * ws[0][0].element_size() / 1e6, 2)))

    def spark(item: str, stages: int = 2, xin=x, **kw) -> None:
        plan = SparkFFNPlan.for_weights(*ws[0], f, **kw)
        us = hz.per_layer(lambda: [plan.run(xin, *w, stages=stages) for w in ws], n_layers)
        y = plan.run(xin, *ws[0])[0].float()
        y_ref, n_ref = spark_ffn_decode_reference(xin if xin.dim() == 1 else xin[0], *ws[0], f)
        err = float((y - y_ref.float()).norm() / y_ref.float().norm().clamp_min(1e-30))
        hz.emit(item, us=us, shape=plan.shape(), stages=stages, selected=int(plan.cnt[0]), selected_ref=int(n_ref),
                rel_err=round(err, 6))

    for item, kw in [("M2_F1F2_c32", dict(block_c=32, sub=8)), ("M2_F1F2_c64", dict(block_c=64, sub=8)),
                     ("M2_F1F2_c32_cols2", dict(block_c=32, sub=8, col_splits=2)),
                     ("M2_F1F2_c64_cols2", dict(block_c=64, sub=8, col_splits=2)),
                     ("M2_F1F2_c64_w16", dict(block_c=64, sub=8, warps2=16)),
                     ("M2_F1F2_c16", dict(block_c=16, sub=4))]:
        hz.guarded(item, lambda item=item, kw=kw: spark(item, **kw))
    hz.guarded("M2b_noatomic_F1F2", lambda: spark("M2b_noatomic_F1F2", stages=2, atomic=False))
    hz.guarded("M2b_noatomic_F1F2F3", lambda: spark("M2b_noatomic_F1F2F3", stages=3, atomic=False))
    hz.guarded("M2b_noatomic_F1F2F3_d32", lambda: spark("M2b_noatomic_F1F2F3_d32", stages=3, atomic=False,
                                                         block_d=32))
    xb = torch.randn(4, d, generator=g, device=dev).to(dt)
    hz.guarded("M2c_batch4", lambda: spark("M2c_batch4", xin=xb, batch=4))
    hz.guarded("M2c_batch4_noatomic", lambda: spark("M2c_batch4_noatomic", stages=3, xin=xb, batch=4, atomic=False))
    if HAS_PDL and hz.cuda:
        hz.guarded("M2d_pdl", lambda: spark("M2d_pdl", pdl=True))

    def tuned() -> None:
        t0 = time.perf_counter()
        plan = SparkFFNPlan.pick(x, *ws[0], f, weights=ws, timer=None if hz.cuda else hz.time_us)
        hz.emit("M2e_tuner_pick", us=getattr(plan, "pick_us", None), shape=plan.shape(),
                table=getattr(plan, "pick_table", None), tune_s=round(time.perf_counter() - t0, 1))

    hz.guarded("M2e_tuner_pick", tuned)
    del ws
    m = cfg.ffn_dim
    dws = [(rnd(g, 2 * m, d, dev=dev, dt=dt), rnd(g, d, m, dev=dev, dt=dt)) for _ in range(n_layers)]
    gu, a, y = (torch.empty(2 * m, device=dev, dtype=dt), torch.empty(m, device=dev, dtype=dt),
                torch.empty(d, device=dev, dtype=dt))

    def dense_ffn():
        for wgu, wd in dws:
            torch.mv(wgu, x, out=gu)
            geglu_act(gu, a, cfg.ffn_activation)
            torch.mv(wd, a, out=y)

    hz.guarded("M3_dense_geglu", lambda: hz.emit(
        "M3_dense_geglu", us=hz.per_layer(dense_ffn, n_layers),
        mb=round(3 * m * d * dws[0][0].element_size() / 1e6, 2)))
    del dws


def attn_items(hz: Harness, dt: torch.dtype, n_layers: int, context: int) -> None:
    cfg, dev = hz.cfg, hz.dev
    H, KV, hd, ra, k = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank, cfg.spark_attn_topk
    L = -(-(context + 64) // 64) * 64
    g = torch.Generator(device=dev).manual_seed(1)
    ln = torch.tensor([context], dtype=torch.int32, device=dev)
    q = torch.randn(H, hd, generator=g, device=dev)
    out = torch.empty(H, hd, device=dev, dtype=dt)
    caches = []
    for _ in range(n_layers):
        krv = torch.randn(KV, L, 2 * hd - ra, generator=g, device=dev).to(dt)
        caches.append((torch.randn(KV, L // 64, ra, 64, generator=g, device=dev).to(dt), krv[..., : hd - ra],
                       krv[..., hd - ra:]))
    sc, cap = cfg.attn_scale, cfg.attn_logit_softcap

    def spark(item: str, stages: int = 2, **kw) -> None:
        plan = SparkAttnPlan(H, KV, hd, ra, hd, L, k, dev, **kw)
        us = hz.per_layer(lambda: [plan.run(q, *c, ln, sc, None, cap, out=out, stages=stages) for c in caches],
                          n_layers)
        rec = dict(context=context, us=us, stages=stages, **kw)
        if stages == 2 and not kw.get("cap_mode"):
            plan.run(q, *caches[0], ln, sc, None, cap, out=out)
            ref = spark_attn_decode_reference(q.cpu(), *[c.cpu() for c in caches[0]], context, k, sc, None, cap)
            rec.update(kept_equal=plan.kept.cpu().tolist() == ref[1].tolist(),
                       capped_heads=int(plan.capped.sum()), capped_equal=plan.capped.bool().cpu().tolist()
                       == ref[2].tolist(), rel_err=round(float((out.float().cpu() - ref[0].float()).norm()
                                                              / ref[0].float().norm().clamp_min(1e-30)), 6))
        hz.emit(item, **rec)

    hz.guarded(f"M4_A1_{context}", lambda: spark(f"M4_A1_{context}", stages=1))
    hz.guarded(f"M4_A1A2_{context}", lambda: spark(f"M4_A1A2_{context}"))
    hz.guarded(f"M4_A1A2_cap_on_{context}", lambda: spark(f"M4_A1A2_cap_on_{context}", cap_mode=1))
    hz.guarded(f"M4_A1A2_cap_off_{context}", lambda: spark(f"M4_A1A2_cap_off_{context}", cap_mode=2))
    hz.guarded(f"M4_A1A2_chunk1024_{context}", lambda: spark(f"M4_A1A2_chunk1024_{context}", chunk=1024))
    del caches
    dcs = [(torch.randn(KV, L, hd, generator=g, device=dev).to(dt), torch.randn(KV, L, hd, generator=g,
                                                                                  device=dev).to(dt))
           for _ in range(n_layers)]
    dplan = DenseAttnPlan(H, KV, hd, hd, dev)  # as the dense engine runs it: fp32 q, output in the cache dtype
    hz.guarded(f"M4_dense_flash_{context}", lambda: hz.emit(
        f"M4_dense_flash_{context}", context=context,
        us=hz.per_layer(lambda: [dplan.run(q, kk, vv, ln, sc, None, cap, out) for kk, vv in dcs], n_layers)))


def norm_gemv_items(hz: Harness, dt: torch.dtype, n_layers: int) -> None:
    cfg, dev = hz.cfg, hz.dev
    d, rows = cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    g = torch.Generator(device=dev).manual_seed(2)
    ws = [rnd(g, rows, d, dev=dev, dt=dt) for _ in range(n_layers)]
    o = torch.randn(d, generator=g, device=dev).to(dt)
    h, h2 = torch.randn(d, generator=g, device=dev), torch.empty(d, device=dev)
    wpost, wpre = torch.rand(d, generator=g, device=dev) + 0.5, torch.rand(d, generator=g, device=dev) + 0.5
    xn, y = torch.empty(d, device=dev, dtype=dt), torch.empty(rows, device=dev, dtype=dt)

    def unfused():
        for w in ws:
            residual_norm(o, h, wpost, wpre, xn, cfg.rms_norm_eps)
            torch.mv(w, xn, out=y)

    rec = dict(unfused_us=hz.per_layer(unfused, n_layers), mb=round(rows * d * ws[0].element_size() / 1e6, 2))
    for bn, bk in ((16, 512), (8, 1024), (32, 256)):
        rec[f"fused_n{bn}_k{bk}_us"] = hz.per_layer(
            lambda: [res_norm_gemv(o, h, h2, wpost, wpre, w, y, cfg.rms_norm_eps, bn, bk) for w in ws], n_layers)
    hz.emit("M5_norm_gemv_qkv", **rec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gemma2-2b")
    p.add_argument("--contexts", default="512,4096")
    p.add_argument("--layers", type=int, default=None, help="layers of weights per graph (default: the model's)")
    p.add_argument("--items", default="boundary,ffn,attn,norm", help="comma list of item groups to run")
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1): the test's run")
    args = p.parse_args(argv)
    cfg = tiny_config() if args.tiny else get_preset(args.preset)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --tiny under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    hz = Harness(cfg, device, args.out, reps=20)
    dt = torch.float32 if args.tiny else torch.bfloat16
    nl = args.layers or cfg.n_layers
    groups = set(args.items.split(","))
    hz.emit("env", device=torch.cuda.get_device_name(0) if hz.cuda else "cpu (interpreter)",
            torch=torch.__version__, triton=triton.__version__, pdl=HAS_PDL, preset="tiny" if args.tiny else
            args.preset, layers=nl, dtype=str(dt))
    with torch.no_grad():
        if "boundary" in groups:
            hz.guarded("M0_kernel_boundary", lambda: boundary_items(hz, nl))
        if "ffn" in groups:
            ffn_items(hz, dt, nl)
        if "attn" in groups:
            for ctx in ([96] if args.tiny else [int(c) for c in args.contexts.split(",")]):
                attn_items(hz, dt, nl, ctx)
        if "norm" in groups:
            hz.guarded("M5_norm_gemv_qkv", lambda: norm_gemv_items(hz, dt, nl))
    hz.emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
