"""Lightning attention: the definition and its block-wise (chunked) XLA form.

Lightning attention is causal linear attention with a per-head scalar decay:

    S_t = lambda * S_{t-1} + k_t^T v_t          S: [head_dim_k, head_dim_v]
    o_t = q_t S_t                                lambda = exp(log_decay) in (0, 1]

with the state reset to zero where `segment_ids` change (packed sequences), an
optional initial state for the first segment of each row, and the final state
(after the last token) returned so long inputs can be processed in pieces.

Two implementations share one signature:

* `lightning_attention_recurrent` - token by token; the oracle.
* `lightning_attention_chunked`   - the block-wise form of Lightning
  Attention-2: for each block of `block_size` tokens an intra-block masked
  product (Q K^T * D) V with the decay mask D and the block's own end state
  from a zero start (the local pass); the states entering the blocks and
  their term (Q * decay) S_in come from the inter-chunk state pass shared
  with the Pallas kernels and LASP+ (pallas_kernels/lightning/chunk_states.py).

`lightning_attention_numpy` is the float64 loop every implementation is tested
against; mx01/ops.py chooses between these and the Pallas kernels.

Shapes: q, k [batch, seq, heads, head_dim_k]; v [batch, seq, heads, head_dim_v];
log_decay [heads] (<= 0); segment_ids [batch, seq] (int); state
[batch, heads, head_dim_k, head_dim_v] (float32).
"""

from __future__ import annotations

from typing import Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.lightning import chunk_states


def minimax_log_decay(num_heads: int, layer_idx: int, num_layers: int) -> np.ndarray:
  """Per-head log decay of MiniMax-Text-01's lightning layer `layer_idx`.

  ALiBi-style slopes s_h = (2^(-8/H))^(h+1), scaled by the layer's depth so
  that deeper layers decay more slowly: s_h * (1 - l/(L-1) + 1e-5).  The
  transformers port writes the denominator as (L - 1 + 1e-5), which also
  keeps L = 1 finite; we follow it so converted checkpoints match exactly.
  Returns log(lambda_h) = -s_h as float32 [num_heads].
  """
  base = 1.0 / (2.0 ** (8.0 / num_heads))
  slopes = base ** (np.arange(num_heads, dtype=np.float64) + 1.0)
  factor = 1.0 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
  return (-(slopes * factor)).astype(np.float32)


def _check_inputs(q, k, v, log_decay, segment_ids, initial_state):
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([q, k])
  chex.assert_equal_shape_prefix([q, v], 3)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  chex.assert_shape(log_decay, (h,))
  if segment_ids is not None:
    chex.assert_shape(segment_ids, (b, t))
  if initial_state is not None:
    chex.assert_shape(initial_state, (b, h, dk, dv))


def lightning_attention_recurrent(q, k, v, log_decay, *, segment_ids=None, initial_state=None,
                                  block_size: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
  """Token-by-token recurrence (the oracle).  `block_size` is ignored."""
  del block_size
  _check_inputs(q, k, v, log_decay, segment_ids, initial_state)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  f32 = jnp.float32
  lam = jnp.exp(log_decay.astype(f32))[None, :, None, None]  # [1, h, 1, 1]
  state0 = jnp.zeros((b, h, dk, dv), f32) if initial_state is None else initial_state.astype(f32)
  if segment_ids is None:
    reset = jnp.zeros((b, t), bool)
  else:
    idx = chunk_states.segment_index(segment_ids)
    reset = jnp.concatenate([jnp.zeros((b, 1), bool), idx[:, 1:] != idx[:, :-1]], axis=1)

  def step(state, xs):
    q_t, k_t, v_t, r_t = xs  # [b, h, d], [b]
    state = jnp.where(r_t[:, None, None, None], 0.0, state * lam)
    state = state + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
    o_t = jnp.einsum("bhk,bhkv->bhv", q_t, state)
    return state, o_t

  xs = (jnp.moveaxis(q.astype(f32), 1, 0), jnp.moveaxis(k.astype(f32), 1, 0),
        jnp.moveaxis(v.astype(f32), 1, 0), jnp.moveaxis(reset, 1, 0))
  state, out = jax.lax.scan(step, state0, xs)
  return jnp.moveaxis(out, 0, 1).astype(q.dtype), state


def lightning_attention_chunked(q, k, v, log_decay, *, block_size: int = 256, segment_ids=None,
                                initial_state=None) -> Tuple[jax.Array, jax.Array]:
  """Block-wise lightning attention in plain XLA (differentiable by autodiff).

  Any sequence length: the tail block is masked, and every decay is measured
  from the last *real* token of its block, so no padding leaks into the state.
  """
  _check_inputs(q, k, v, log_decay, segment_ids, initial_state)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = int(min(block_size, t))
  n = -(-t // c)
  pad = n * c - t
  f32 = jnp.promote_types(q.dtype, jnp.float32)  # float64 inputs stay float64 (gradient checks)
  ld = log_decay.astype(f32)  # [h]
  lengths = chunk_states.chunk_lengths(t, n, c)  # [n] real tokens per block

  seg = None  # [b, n, c] running segment index, -1 on padding
  if segment_ids is not None:
    seg = jnp.pad(chunk_states.segment_index(segment_ids), ((0, 0), (0, pad)), constant_values=-1).reshape(b, n, c)

  def blocks(x):
    return jnp.pad(x.astype(f32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, c, h, x.shape[-1])

  qb, kb, vb = blocks(q), blocks(k), blocks(v)  # [b, n, c, h, d]; padded keys and values are zero
  pos = jnp.arange(c, dtype=f32)

  # Intra-block: (Q K^T * D) V, D_ij = lambda^(i-j) for j <= i within one segment.
  diff = pos[:, None] - pos[None, :]  # [c, c]
  decay_ij = jnp.exp(jnp.where((diff >= 0)[None], ld[:, None, None] * diff[None], -jnp.inf))  # [h, c, c]
  scores = jnp.einsum("bnihd,bnjhd->bnhij", qb, kb) * decay_ij[None, None]
  bounds = None
  if seg is not None:
    scores = scores * (seg[:, :, :, None] == seg[:, :, None, :])[:, :, None]
    bounds = chunk_states.chunk_boundaries(seg, lengths)
  o_intra = jnp.einsum("bnhij,bnjhv->bnihv", scores, vb)

  # Each block's end state from a zero start: its last segment's keys, decayed to its last real token.
  k_exp = jnp.asarray(lengths, f32)[:, None] - 1.0 - pos[None, :]  # [n, c], < 0 on padding
  k_decay = jnp.exp(jnp.where(k_exp[..., None] >= 0, ld * k_exp[..., None], -jnp.inf))[None]  # [1, n, c, h]
  if seg is not None:
    k_decay = k_decay * (seg == bounds.last[:, :, None])[..., None]
  local_states = jnp.einsum("bnchk,bnchv->bnhkv", kb * k_decay[..., None], vb)  # [b, n, h, dk, dv]

  # Inter-block: the shared state pass.
  chunk_decay, enters = chunk_states.chunk_transitions(ld, bounds, lengths)
  states_in, final_state = chunk_states.combine_chunk_states(local_states, chunk_decay, initial_state)
  mask = chunk_states.incoming_mask(seg, enters, lengths)
  o_inter = chunk_states.apply_incoming_states(qb, states_in, ld, mask, precision=None)

  out = (o_intra + o_inter).reshape(b, n * c, h, dv)[:, :t]
  return out.astype(q.dtype), final_state


def lightning_decode_step(q, k, v, log_decay, state) -> Tuple[jax.Array, jax.Array]:
  """One token per sequence: q, k [b, h, dk], v [b, h, dv], state [b, h, dk, dv] -> (o [b, h, dv], new state)."""
  lam = jnp.exp(log_decay.astype(jnp.float32))[None, :, None, None]
  new = state.astype(jnp.float32) * lam + jnp.einsum("bhk,bhv->bhkv", k.astype(jnp.float32), v.astype(jnp.float32))
  o = jnp.einsum("bhk,bhkv->bhv", q.astype(jnp.float32), new)
  return o.astype(q.dtype), new


def lightning_attention_numpy(q, k, v, log_decay, *, segment_ids=None, initial_state=None):
  """The recurrence as a float64 NumPy loop: the ground truth for every implementation's tests."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  lam = np.exp(np.asarray(log_decay, np.float64))[:, None, None]
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  out = np.zeros((b, t, h, dv))
  final = np.zeros((b, h, dk, dv))
  seg = None if segment_ids is None else np.asarray(segment_ids)
  for i in range(b):
    s = np.zeros((h, dk, dv)) if initial_state is None else np.asarray(initial_state[i], np.float64).copy()
    for j in range(t):
      if seg is not None and j > 0 and seg[i, j] != seg[i, j - 1]:
        s = np.zeros_like(s)
      else:
        s = s * lam
      s = s + k[i, j][:, :, None] * v[i, j][:, None, :]
      out[i, j] = np.einsum("hk,hkv->hv", q[i, j], s)
    final[i] = s
  return out, final
