"""Mixture of experts: top-k router, SwiGLU experts, capacity and the GShard aux loss.

Pure functions over an explicit parameter dict, so the same math serves the
single-device model and the expert-parallel version in `mx01/parallel/`
(mx01/ops.py's MOE table maps `ModelConfig.moe_impl` to one of them):

  params = {"router": [hidden, E], "wi_gate": [E, hidden, I], "wi_up": [E, hidden, I], "wo": [E, I, hidden]}

Routing (as MiniMax-Text-01): softmax over experts in float32, top-k, the k
weights renormalised to sum to one.  The experts themselves run one of four
ways (`ModelConfig.moe_impl`), none with a dense one-hot dispatch matmul:

  "capacity"  with a capacity (MiniMax's token-drop training): tokens are
              scattered into per-expert buffers [E, capacity, hidden] and the
              experts are one batched matmul -- dense-GEMM speed, capacity_factor
              times the routed FLOPs;
  "ragged"    dropless grouped matmuls over the tokens sorted by expert
              (`jax.lax.ragged_dot`);
  "ragged_mosaic"  the same with jax's Hopper (Mosaic GPU) ragged-dot kernels;
  "dense"     every expert on every token (the reference; fastest on CPUs for
              a handful of experts).

Tokens reach the expert slots and come back through gathers only, forward and
backward (`take_rows`: each gather's gradient is the gather by the inverse map,
not the scatter-add autodiff would make).
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


def capacity_positions(expert_idx, num_experts: int, *, token_mask=None):
  """Each (token, choice) assignment's place in its expert's queue, on one device.

  Priority is choice-major then token order (every token's first choice before
  any second choice), the GShard policy; `mx01.parallel.moe_ep.global_keep_mask`
  applies the same order across expert-parallel shards.  Masked tokens take no
  place.  expert_idx [tokens, k] -> positions [tokens, k] int32.
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
  if token_mask is not None:
    # A masked token (padding) takes no place and never fits: it gets no expert output.
    pos_in_expert = jnp.where(token_mask[None, :].astype(bool), pos_in_expert, jnp.iinfo(jnp.int32).max)
  return pos_in_expert.T


def capacity_keep_mask(expert_idx, num_experts: int, capacity: int, *, token_mask=None):
  """Which assignments fit in their expert's capacity.  expert_idx [tokens, k] -> keep [tokens, k] bool."""
  return capacity_positions(expert_idx, num_experts, token_mask=token_mask) < capacity


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
  """One expert (or the dense MLP): x [n, hidden] -> [n, hidden].

  Also every expert at once on per-expert buffers: x [E, n, hidden] with wi_* [E, hidden, I],
  wo [E, I, hidden] (matmul batches over the leading expert axis).
  """
  h = jax.nn.silu(x @ wi_gate) * (x @ wi_up)
  return h @ wo


@jax.custom_vjp
def take_rows(x, index, inverse):
  """x [n, d] -> [m, d]: row index[i] of x, zeros where index[i] is n (out of range).

  `inverse` [n, r] lists, for each row j of x, the positions i with index[i] == j (m where there are fewer
  than r): the gradient is then the gather  dx[j] = sum_r dy[inverse[j, r]]  instead of the scatter-add
  autodiff makes of a gather (colliding atomic adds on a GPU).  The MoE dispatch and combine are such pairs of
  gathers: tokens to expert slots and back.
  """
  del inverse
  return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x, index, inverse):
  return take_rows(x, index, inverse), inverse


def _take_rows_bwd(inverse, dy):
  rows = jnp.take(dy, inverse, axis=0, mode="fill", fill_value=0)  # [n, r, d]
  return jnp.sum(rows, axis=1, dtype=jnp.float32).astype(dy.dtype), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _inverse_permutation(order):
  """order [m] a permutation -> its inverse [m] (where each element went)."""
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype), unique_indices=True)


def _ragged_dot(x, w, group_sizes):
  return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)


def experts_grouped(x, expert_idx, weights, wi_gate, wi_up, wo, *, grouped_dot=_ragged_dot):
  """All routed experts as grouped matmuls over tokens sorted by expert.

  x [tokens, hidden], expert_idx/weights [tokens, k], wi_* [E, hidden, I], wo [E, I, hidden].
  grouped_dot(x [m, a], w [E, a, b], group_sizes [E]) -> [m, b] is the grouped
  matmul (default `jax.lax.ragged_dot`).
  Returns sum_k weights * expert_k(x) as [tokens, hidden] in x.dtype.
  """
  t, k = expert_idx.shape
  e = wi_gate.shape[0]
  flat_expert = expert_idx.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True).astype(jnp.int32)  # sorted place -> assignment (token * k + choice)
  place = _inverse_permutation(order)  # assignment -> sorted place
  group_sizes = jnp.bincount(flat_expert, length=e).astype(jnp.int32)
  xs = take_rows(x, order // k, place.reshape(t, k))  # [t * k, hidden], grouped by expert
  h = jax.nn.silu(grouped_dot(xs, wi_gate, group_sizes)) * grouped_dot(xs, wi_up, group_sizes)
  ys = take_rows(grouped_dot(h, wo, group_sizes), place, order[:, None]).reshape(t, k, -1)  # back in token order
  return jnp.sum(ys.astype(jnp.float32) * weights[..., None], axis=1).astype(x.dtype)


def _tokamax_ragged_dot(x, w, group_sizes):
  try:
    import tokamax  # optional, GPU only: needs jax >= 0.11.1
  except ImportError:
    raise ValueError("moe_impl='ragged_tokamax' needs the tokamax kernel library (pip install tokamax; jax >= "
                     "0.11.1); use moe_impl='ragged', 'ragged_mosaic', 'capacity' or 'dense'") from None
  return tokamax.ragged_dot(x, w.astype(x.dtype), group_sizes, preferred_element_type=x.dtype)


def experts_grouped_tokamax(x, expert_idx, weights, wi_gate, wi_up, wo):
  """`experts_grouped` on tokamax's `ragged_dot` (it picks its fastest kernel for the device: Mosaic GPU on
  Hopper, Triton elsewhere, XLA as the fallback), with tokamax's own gradients."""
  return experts_grouped(x, expert_idx, weights, wi_gate, wi_up, wo, grouped_dot=_tokamax_ragged_dot)


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


def experts_capacity(x, expert_idx, weights, positions, wi_gate, wi_up, wo, *, capacity: int):
  """All experts as one batched matmul over fixed-size per-expert buffers.

  x [tokens, hidden]; expert_idx/weights/positions [tokens, k], positions from
  `capacity_positions` (an assignment at or past `capacity` is dropped: it is
  never written to the buffer and contributes nothing).  The buffers are
  [E, capacity, hidden]; unfilled slots are zeros and are computed but never
  read back.  Returns sum_k weights * expert_k(x) over kept assignments, [tokens, hidden] in x.dtype.
  """
  t, k = expert_idx.shape
  e, d = wi_gate.shape[0], x.shape[-1]
  chex.assert_shape([expert_idx, weights, positions], (t, k))
  dt = x.dtype
  slots = e * capacity
  # Each kept assignment's place in the flattened buffers; dropped ones go out of range (`slots`).
  slot = jnp.where(positions < capacity, expert_idx * capacity + positions, slots)
  slot, assignment_of_slot = slot_maps(slot, slots)
  buf = to_slots(x, slot, assignment_of_slot).reshape(e, capacity, d)  # [E, C, hidden]; empty slots are zeros
  out = swiglu(buf, wi_gate.astype(dt), wi_up.astype(dt), wo.astype(dt))
  return from_slots(out.reshape(slots, d), slot, assignment_of_slot, weights).astype(dt)


def slot_maps(slot, num_slots: int):
  """slot [t, k]: each assignment's (token, choice) place among `num_slots` expert slots, out of range when
  dropped -> (slot as int32, assignment_of_slot [num_slots] int32: token * k + choice filling each slot, t * k
  for an empty one).  Kept assignments must have distinct slots."""
  t, k = slot.shape
  slot = slot.astype(jnp.int32)
  assignment = jnp.arange(t * k, dtype=jnp.int32)
  assignment_of_slot = jnp.full((num_slots,), t * k, jnp.int32).at[slot.reshape(-1)].set(assignment, mode="drop")
  return slot, assignment_of_slot


def to_slots(x, slot, assignment_of_slot):
  """Dispatch: x [t, hidden] -> [num_slots, hidden], each slot the token assigned to it (zeros when empty)."""
  t, k = slot.shape
  token_of_slot = jnp.where(assignment_of_slot < t * k, assignment_of_slot // k, t)
  return take_rows(x, token_of_slot, slot)


def from_slots(out, slot, assignment_of_slot, weights):
  """Combine: out [num_slots, hidden] -> [t, hidden] float32, sum over each token's kept assignments of
  weights [t, k] x its slot's row (dropped assignments add nothing)."""
  t, k = slot.shape
  gathered = take_rows(out, slot.reshape(-1), assignment_of_slot[:, None]).reshape(t, k, -1)
  return jnp.sum(gathered.astype(jnp.float32) * weights[..., None], axis=1)


def experts_grouped_mosaic(x, expert_idx, weights, wi_gate, wi_up, wo):
  """`experts_grouped` on jax's Hopper (Mosaic GPU) ragged-dot kernels (pallas_kernels/grouped_matmul.py)."""
  from pallas_kernels.grouped_matmul import grouped_matmul  # Hopper-only kernels, loaded on first use
  return experts_grouped(x, expert_idx, weights, wi_gate, wi_up, wo, grouped_dot=grouped_matmul)


def moe_forward(x, params, *, config, token_mask=None, experts_fn=experts_dense_reference,
                capacity_buffers: bool = False):
  """The MoE block on one device.

  x [batch, seq, hidden]; token_mask [batch, seq] excludes tokens (padding)
  from the load statistics and from expert capacity.  The experts run as
  `experts_fn` (a dropless experts function; default the dense reference) or,
  with `capacity_buffers`, as one batched matmul over per-expert buffers
  (needs config.capacity_factor).  With a capacity_factor, assignments past
  an expert's capacity are dropped either way.  mx01/ops.py picks these from
  config.moe_impl.  Returns (y [batch, seq, hidden], routing_stats).
  """
  b, t, d = x.shape
  chex.assert_shape(params["router"], (d, config.num_experts))
  xf = x.reshape(b * t, d)
  tm = None if token_mask is None else token_mask.reshape(b * t)
  probs, expert_idx, weights = route(xf, params["router"], config.num_experts_per_tok)
  w = (params["wi_gate"], params["wi_up"], params["wo"])
  cap = expert_capacity(b * t, config.num_experts, config.num_experts_per_tok, config.capacity_factor)
  if capacity_buffers and cap is None:
    raise ValueError("moe_impl='capacity' needs model.capacity_factor (e.g. 1.25); "
                     "set it, or pick a dropless moe_impl ('ragged', 'ragged_mosaic' or 'dense')")
  if cap is not None:
    positions = capacity_positions(expert_idx, config.num_experts, token_mask=tm)
    if capacity_buffers:
      y = experts_capacity(xf, expert_idx, weights, positions, *w, capacity=cap)
      return y.reshape(b, t, d), routing_stats(probs, expert_idx, tm)
    weights = weights * (positions < cap)  # dropped assignments pass through the residual only
  y = experts_fn(xf, expert_idx, weights, *w)
  return y.reshape(b, t, d), routing_stats(probs, expert_idx, tm)
