"""MoE expert compute: each `moe_impl` against a balanced batched matmul, forward and forward+backward.

    python -m benchmarks.moe_experts --tokens 32768 --out results/gpu/moe_experts.json

Shapes default to the hybrid_moe_1b experts (hidden 2048, 8 experts of width
1408, top-2); `--shape paper` uses MiniMax-Text-01's (6144, 32 x 9216, top-2).
Routing comes from a random router (softmax, top-k), so loads are uneven as
in training.  Variants:

  balanced   the routed FLOPs as one batched matmul with tokens*k/E rows per
             expert -- what a perfect grouped GEMM costs (the floor);
  ragged     jax.lax.ragged_dot (dropless);
  ragged_mosaic  jax's Hopper ragged-dot kernels (dropless; GPU only);
  ragged_tokamax the tokamax library's ragged_dot (dropless; needs tokamax);
  capacity_F per-expert buffers of capacity F x tokens*k/E, one batched matmul.

TFLOP/s count the routed work only (2 x 3 x tokens x k x hidden x width
forward, 3x that for forward+backward), so capacity padding shows as lower
throughput.  Every variant is checked against the every-expert reference
(`experts_dense_reference`) with the same drops before it is timed.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import experts_balanced
from mx01.layers import moe as moe_lib

SHAPES = {"1b": (2048, 1408, 8, 2), "paper": (6144, 9216, 32, 2)}


def experts_for(name: str, capacity: int):
  """(x, idx, weights, positions, *w) -> y for a variant name."""
  if name == "balanced":
    return lambda x, i, w, pos, *ws: experts_balanced(x, i, w, *ws)
  if name == "ragged":
    return lambda x, i, w, pos, *ws: moe_lib.experts_grouped(x, i, w, *ws)
  if name == "ragged_mosaic":
    return lambda x, i, w, pos, *ws: moe_lib.experts_grouped_mosaic(x, i, w, *ws)
  if name == "ragged_tokamax":
    return lambda x, i, w, pos, *ws: moe_lib.experts_grouped_tokamax(x, i, w, *ws)
  if name.startswith("capacity"):
    return lambda x, i, w, pos, *ws: moe_lib.experts_capacity(x, i, w, pos, *ws, capacity=capacity)
  raise ValueError(name)


def time_fn(fn, args, reps: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shape", default="1b", choices=list(SHAPES))
  ap.add_argument("--tokens", type=int, default=32768)
  ap.add_argument("--variants", default="balanced,ragged,ragged_mosaic,ragged_tokamax,capacity_1.0,capacity_1.25,capacity_2.0")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  hidden, width, e, k = SHAPES[args.shape]
  t = args.tokens
  ks = jax.random.split(jax.random.key(0), 6)
  dt = jnp.bfloat16
  x = jax.random.normal(ks[0], (t, hidden), dt)
  router = jax.random.normal(ks[1], (hidden, e), jnp.float32) * 0.02
  wi_gate = (jax.random.normal(ks[2], (e, hidden, width), jnp.float32) * hidden ** -0.5).astype(dt)
  wi_up = (jax.random.normal(ks[3], (e, hidden, width), jnp.float32) * hidden ** -0.5).astype(dt)
  wo = (jax.random.normal(ks[4], (e, width, hidden), jnp.float32) * width ** -0.5).astype(dt)
  _, idx, weights = moe_lib.route(x, router, k)
  loads = np.bincount(np.asarray(idx).reshape(-1), minlength=e)
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; tokens {t}, hidden {hidden}, "
        f"{e} experts x {width}, top-{k}; loads max/mean {loads.max() / loads.mean():.3f}")
  routed_flops = 2 * 3 * t * k * hidden * width
  rows = []
  for name in args.variants.split(","):
    cf = float(name.split("_")[1]) if name.startswith("capacity") else None
    cap = moe_lib.expert_capacity(t, e, k, cf) if cf else t * k
    pos = moe_lib.capacity_positions(idx, e)
    w_kept = weights * (pos < cap) if cf else weights
    fn = experts_for(name, cap)
    fwd = jax.jit(fn)
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)  # noqa: E731
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 4, 5, 6)))
    a = (x, idx, weights, pos, wi_gate, wi_up, wo)
    row = {"variant": name, "capacity": cap if cf else None}
    try:
      y = fwd(*a)
      if name != "balanced":
        ref = moe_lib.experts_dense_reference(x, idx, w_kept, wi_gate, wi_up, wo).astype(jnp.float32)
        row["rel_err_vs_dense"] = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
      row["fwd_ms"] = time_fn(fwd, a, args.reps) * 1e3
      row["fwd_bwd_ms"] = time_fn(fwd_bwd, a, args.reps) * 1e3
      row["fwd_tflops"] = routed_flops / row["fwd_ms"] / 1e9
      row["fwd_bwd_tflops"] = 3 * routed_flops / row["fwd_bwd_ms"] / 1e9
    except Exception as err:  # a variant that cannot run here (e.g. no Hopper) is reported, not fatal
      row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    rows.append(row)
    print(json.dumps(row), flush=True)
  base = {r["variant"]: r for r in rows if "fwd_bwd_ms" in r}.get("balanced")
  print("\n| variant | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s (routed) | vs balanced | rel. err |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in rows:
    if "fwd_bwd_ms" not in r:
      print(f"| {r['variant']} | failed: {r.get('error', '')[:80]} |")
      continue
    ratio = f"{r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x" if base else "-"
    print(f"| {r['variant']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} | {ratio} | "
          f"{r.get('rel_err_vs_dense', 0):.1e} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, tokens=t, shape=args.shape,
                     loads=loads.tolist(), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
