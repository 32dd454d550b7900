"""Mixture of experts: top-k router, SwiGLU experts, capacity and the GShard aux loss.

Pure functions over an explicit parameter dict, so the same math serves the
single-device model and the expert-parallel version in `mx01/parallel/`:

  params = {"router": [hidden, E], "wi_gate": [E, hidden, I], "wi_up": [E, hidden, I], "wo": [E, I, hidden]}

Routing (as MiniMax-Text-01): softmax over experts in float32, top-k, the k
weights renormalised to sum to one.  Experts run as a grouped matmul over the
tokens sorted by expert (`jax.lax.ragged_dot`): no dense one-hot dispatch.
"""

from __future__ import annotations

import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp


def route(x, router_kernel, top_k: int):
  """x [tokens, hidden] -> (probs [tokens, E] f32, expert_idx [tokens, k] i32, weights [tokens, k] f32)."""
  logits = jnp.dot(x, router_kernel.astype(x.dtype), preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  top_vals, expert_idx = jax.lax.top_k(probs, top_k)
  weights = top_vals / jnp.sum(top_vals, axis=-1, keepdims=True)
  return probs, expert_idx.astype(jnp.int32), weights


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: Optional[float]) -> Optional[int]:
  """Slots per expert: ceil(capacity_factor * tokens * k / E); None means unlimited."""
  if capacity_factor is None:
    return None
  return max(1, int(math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def capacity_keep_mask(expert_idx, num_experts: int, capacity: int, *, token_mask=None):
  """Which (token, choice) assignments fit in their expert's capacity, on one device.

  Priority is choice-major then token order (every token's first choice before
  any second choice), the GShard policy; `mx01.parallel.moe_ep.global_keep_mask`
  applies the same order across expert-parallel shards.
  expert_idx [tokens, k] -> keep [tokens, k] bool.
  """
  t, k = expert_idx.shape
  one_hot = jax.nn.one_hot(expert_idx.T, num_experts, dtype=jnp.int32)  # [k, t, E]
  if token_mask is not None:
    one_hot = one_hot * token_mask.astype(jnp.int32)[None, :, None]
  per_rank = jnp.sum(one_hot, axis=1)  # [k, E]
  # Assignments of earlier choice ranks (all tokens) come first.
  earlier_ranks = jnp.cumsum(per_rank, axis=0) - per_rank  # [k, E]
  pos = jnp.cumsum(one_hot, axis=1) - one_hot + earlier_ranks[:, None, :]  # [k, t, E]
  pos_in_expert = jnp.sum(pos * one_hot, axis=-1)  # [k, t]
  return (pos_in_expert < capacity).T


def routing_stats(probs, expert_idx, token_mask=None):
  """Per-expert load statistics for the load-balancing loss (summable across layers and devices).

  Returns {"tokens_per_expert": [E] assignments, "prob_sum": [E], "num_tokens": []} as float32.
  """
  e = probs.shape[-1]
  m = jnp.ones(probs.shape[:1], jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
  counts = jnp.sum(jax.nn.one_hot(expert_idx, e, dtype=jnp.float32) * m[:, None, None], axis=(0, 1))
  return {"tokens_per_expert": counts, "prob_sum": jnp.sum(probs * m[:, None], axis=0), "num_tokens": jnp.sum(m)}


def load_balancing_loss(stats, reduction: str = "per_layer"):
  """GShard/Switch auxiliary loss E * sum_e f_e * P_e from stacked per-layer stats.

  stats: routing_stats with a leading [layers] axis.  f_e is the fraction of
  tokens routed to expert e (summing to top_k over e, as in transformers) and
  P_e the mean router probability.  "per_layer" averages the loss over layers;
  "pooled" pools f and P over all layers first (the transformers formula).
  Global routing: sum the stats over the expert-parallel group before calling.
  """
  counts, prob_sum, n = stats["tokens_per_expert"], stats["prob_sum"], stats["num_tokens"]
  e = counts.shape[-1]
  if reduction == "pooled":
    total = jnp.sum(n)
    return e * jnp.sum((jnp.sum(counts, 0) / total) * (jnp.sum(prob_sum, 0) / total))
  if reduction == "per_layer":
    n = jnp.maximum(n, 1.0)[..., None]
    return jnp.mean(e * jnp.sum((counts / n) * (prob_sum / n), axis=-1))
  raise ValueError(f"reduction must be 'per_layer' or 'pooled', got {reduction!r}")


def swiglu(x, wi_gate, wi_up, wo):
  """One expert (or the dense MLP): x [n, hidden] -> [n, hidden]."""
  h = jax.nn.silu(x @ wi_gate) * (x @ wi_up)
  return h @ wo


def experts_grouped(x, expert_idx, weights, wi_gate, wi_up, wo):
  """All routed experts as grouped matmuls over tokens sorted by expert.

  x [tokens, hidden], expert_idx/weights [tokens, k], wi_* [E, hidden, I], wo [E, I, hidden].
  Returns sum_k weights * expert_k(x) as [tokens, hidden] in x.dtype.
  """
  t, k = expert_idx.shape
  e = wi_gate.shape[0]
  flat_expert = expert_idx.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True)
  token_of = order // k
  group_sizes = jnp.bincount(flat_expert, length=e).astype(jnp.int32)
  xs = x[token_of]
  dt = x.dtype
  h = jax.nn.silu(jax.lax.ragged_dot(xs, wi_gate.astype(dt), group_sizes)) * jax.lax.ragged_dot(
      xs, wi_up.astype(dt), group_sizes)
  ys = jax.lax.ragged_dot(h, wo.astype(dt), group_sizes)
  ys = ys.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
  return jnp.zeros((t, x.shape[-1]), jnp.float32).at[token_of].add(ys).astype(dt)


def experts_dense_reference(x, expert_idx, weights, wi_gate, wi_up, wo):
  """Every expert on every token, combined with the routing weights.

  The obvious reference for `experts_grouped`, and the faster choice on CPUs
  for a handful of experts (E/k times the FLOPs, but plain batched matmuls).
  """
  e = wi_gate.shape[0]
  comb = jnp.sum(jax.nn.one_hot(expert_idx, e, dtype=jnp.float32) * weights[..., None], axis=1)  # [t, E]
  out = jnp.zeros(x.shape, jnp.float32)
  for i in range(e):
    out = out + comb[:, i:i + 1] * swiglu(x, wi_gate[i], wi_up[i], wo[i]).astype(jnp.float32)
  return out.astype(x.dtype)


def default_experts_fn():
  """Grouped matmuls on accelerators; all experts densely on CPU, where ragged_dot is slow."""
  return experts_dense_reference if jax.default_backend() == "cpu" else experts_grouped


def moe_forward(x, params, *, config, token_mask=None, experts_fn=None):
  """The MoE block on one device.

  x [batch, seq, hidden]; token_mask [batch, seq] excludes tokens (padding)
  from the load statistics.  Returns (y [batch, seq, hidden], routing_stats).
  """
  b, t, d = x.shape
  chex.assert_shape(params["router"], (d, config.num_experts))
  xf = x.reshape(b * t, d)
  tm = None if token_mask is None else token_mask.reshape(b * t)
  probs, expert_idx, weights = route(xf, params["router"], config.num_experts_per_tok)
  cap = expert_capacity(b * t, config.num_experts, config.num_experts_per_tok, config.capacity_factor)
  if cap is not None:
    keep = capacity_keep_mask(expert_idx, config.num_experts, cap, token_mask=tm)
    weights = weights * keep  # dropped assignments pass through the residual only
  experts_fn = experts_fn or default_experts_fn()
  y = experts_fn(xf, expert_idx, weights, params["wi_gate"], params["wi_up"], params["wo"])
  return y.reshape(b, t, d), routing_stats(probs, expert_idx, tm)
