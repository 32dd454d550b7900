"""Helpers shared by the benchmarks: synthetic packed batches and step timing."""

from __future__ import annotations

import time

import jax
import numpy as np


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
