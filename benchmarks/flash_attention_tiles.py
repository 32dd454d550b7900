"""Tile sizes of jax's Pallas flash attention (the softmax layers' kernel) on packed rows.

    python -m benchmarks.flash_attention_tiles --batch 4 --seq 8192 --heads 16 --head_dim 128

Times forward and forward+backward of `jax.experimental.pallas.ops.gpu.attention.mha`
(causal, segment ids: 4 documents a row, as in the train-step benchmark) for
several forward/backward block sizes and warp counts, and checks every variant
against the first one (same function, different tiling).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

# (block_q, block_k, block_q_dkv, block_kv_dkv, block_q_dq, block_kv_dq, num_warps or None)
VARIANTS = (
    (128, 128, 128, 128, 128, 128, None),  # mx01's setting before tuning
    (128, 128, 64, 64, 64, 64, None),
    (128, 128, 64, 128, 128, 64, None),
    (128, 128, 32, 32, 32, 32, None),  # jax's default backward
    (128, 64, 64, 64, 64, 64, None),
    (64, 64, 64, 64, 64, 64, None),
    (128, 128, 64, 64, 64, 64, 8),
)


def main(argv=None):
  from jax.experimental.pallas.ops.gpu import attention as fa
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=8192)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  b, t, h, d = args.batch, args.seq, args.heads, args.head_dim
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in ks[:3])
  cot = jax.random.normal(ks[3], (b, t, h, d), jnp.bfloat16)
  cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, t), size=3, replace=False))
  seg = jnp.asarray(np.broadcast_to(np.searchsorted(cuts, np.arange(t), side="right") + 1, (b, t)), jnp.int32)

  def timed(fn, *a):
    jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*a))
      ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3

  rows, ref = [], None
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; b={b} t={t} h={h} d={d}, 4 docs a row")
  for bq, bk, bqdkv, bkvdkv, bqdq, bkvdq, warps in VARIANTS:
    sizes = fa.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bqdkv, block_kv_dkv=bkvdkv, block_q_dq=bqdq,
                          block_kv_dq=bkvdq)
    attn = lambda q, k, v: fa.mha(q, k, v, seg, sm_scale=d ** -0.5, causal=True, block_sizes=sizes,  # noqa: E731
                                  num_warps=warps)
    fwd = jax.jit(attn)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * cot), argnums=(0, 1, 2)))
    row = {"blocks": [bq, bk, bqdkv, bkvdkv, bqdq, bkvdq], "num_warps": warps}
    try:
      out = (fwd(q, k, v), *grad(q, k, v))
      if ref is None:
        ref = out
      row["max_rel_err_vs_first"] = max(float(jnp.linalg.norm((a - r).astype(jnp.float32)) /
                                              jnp.linalg.norm(r.astype(jnp.float32))) for a, r in zip(out, ref))
      row["fwd_ms"] = timed(fwd, q, k, v)
      row["fwd_bwd_ms"] = timed(grad, q, k, v)
    except Exception as err:
      row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, shape=[b, t, h, d], rows=rows), f,
                indent=1)


if __name__ == "__main__":
  main()
