"""Helpers shared by the benchmarks: synthetic packed batches and step timing."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from mx01.layers import moe as moe_lib


def synthetic_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int, docs_per_row: int = 4) -> dict:
  """Random packed rows {"tokens", "segment_ids"} [batch, seq + 1], `docs_per_row` documents in each."""
  tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
  cuts = np.sort(rng.choice(np.arange(1, seq), size=docs_per_row - 1, replace=False))
  seg = (np.searchsorted(cuts, np.arange(seq + 1), side="right") + 1).astype(np.int32)
  return {"tokens": tokens, "segment_ids": np.broadcast_to(seg, tokens.shape).copy()}


def time_step(step, params, opt_state, batch, steps: int, warmup: int):
  """Times a (params, opt_state, batch) -> (params, opt_state, metrics) step.

  Returns (seconds per step, first-call seconds (compile + run), final loss).
  """
  t0 = time.perf_counter()
  params, opt_state, m = step(params, opt_state, batch)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    params, opt_state, m = step(params, opt_state, batch)
  jax.block_until_ready(m["loss"])
  t0 = time.perf_counter()
  for _ in range(steps):
    params, opt_state, m = step(params, opt_state, batch)
  jax.block_until_ready(m["loss"])
  return (time.perf_counter() - t0) / steps, compile_s, float(m["loss"])


def experts_balanced(x, expert_idx, weights, wi_gate, wi_up, wo):
  """The routed expert FLOPs of top-k routing as one batched matmul with tokens*k/E rows per expert.

  Ignores which expert each token chose (rows are split evenly), so it times what a perfect grouped
  GEMM would cost: the floor the MoE implementations are compared with.  Same contract as
  `mx01.layers.moe.experts_grouped`; x [tokens, hidden] -> [tokens, hidden].
  """
  t, k = expert_idx.shape
  e = wi_gate.shape[0]
  rows = t * k // e
  xs = jnp.repeat(x, k, axis=0)[: rows * e].reshape(e, rows, -1)
  dt = x.dtype
  ys = moe_lib.swiglu(xs, wi_gate.astype(dt), wi_up.astype(dt), wo.astype(dt)).reshape(rows * e, -1)
  ys = ys * weights.reshape(-1)[: rows * e, None].astype(ys.dtype)
  return jnp.sum(ys.reshape(t, k, -1), axis=1) if rows * e == t * k else ys[:t]


# --small in the benchmarks that build MiniMax-Text-01's layer shape: the same pattern at shapes a CPU runs
# in seconds (as --config.model.* overrides of the preset).
SMALL_MODEL = {"model.vocab_size": 512, "model.hidden_size": 256, "model.num_heads": 4, "model.num_kv_heads": 2,
               "model.head_dim": 64, "model.intermediate_size": 512, "model.num_experts": 4, "model.rotary_dim": 32}
