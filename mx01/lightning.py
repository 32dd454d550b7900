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
  Attention-2 that the model uses: for each block of `block_size` tokens an
  intra-block masked product (Q K^T * D) V with the decay mask D, plus an
  inter-block term (Q * decay) S from the running state; the running state is
  carried from block to block with one decayed update per block.

`lightning_attention(..., impl=...)` dispatches between them and the Pallas
kernels in `pallas_kernels/`.

Shapes: q, k [batch, seq, heads, head_dim_k]; v [batch, seq, heads, head_dim_v];
log_decay [heads] (<= 0); segment_ids [batch, seq] (int); state
[batch, heads, head_dim_k, head_dim_v] (float32).
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

Impl = Literal["recurrent", "chunked", "pallas"]


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


def segment_starts_to_index(segment_ids: jax.Array) -> jax.Array:
  """Maps arbitrary per-token segment ids to a running segment index.

  A new segment starts wherever the id changes; the result counts the starts
  so equal values mean "same contiguous segment".  [batch, seq] -> int32.
  """
  change = jnp.concatenate(
      [jnp.zeros_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return jnp.cumsum(change.astype(jnp.int32), axis=1)


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
    idx = segment_starts_to_index(segment_ids)
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
  f32 = jnp.float32
  ld = log_decay.astype(f32)  # [h]

  if segment_ids is None:
    seg = jnp.zeros((b, t), jnp.int32)
  else:
    seg = segment_starts_to_index(segment_ids)
  # Padded positions get their own segment id (-1) so they touch nothing.
  seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1).reshape(b, n, c)

  def blocks(x):
    return jnp.pad(x.astype(f32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, c, h, x.shape[-1])

  qb, kb, vb = blocks(q), blocks(k), blocks(v)  # [b, n, c, h, d]

  pos = jnp.arange(c, dtype=f32)
  valid_len = jnp.minimum(c, t - jnp.arange(n) * c).astype(f32)  # [n] real tokens per block
  last = (valid_len - 1).astype(jnp.int32)
  last_seg = jnp.take_along_axis(seg, jnp.broadcast_to(last[None, :, None], (b, n, 1)), axis=2)[..., 0]  # [b, n]
  # Segment of the token just before each block (block 0: the first segment, which owns the initial state).
  prev_seg = jnp.concatenate([seg[:, :1, 0], last_seg[:, :-1]], axis=1)  # [b, n]

  # Intra-block: (Q K^T * D) V, D_ij = lambda^(i-j) for j <= i within one segment.
  diff = pos[:, None] - pos[None, :]  # [c, c]
  causal = diff >= 0
  same_seg = seg[:, :, :, None] == seg[:, :, None, :]  # [b, n, c, c]
  decay_ij = jnp.exp(jnp.where(causal[None], ld[:, None, None] * diff[None], -jnp.inf))  # [h, c, c]
  scores = jnp.einsum("bnihd,bnjhd->bnhij", qb, kb)
  scores = scores * decay_ij[None, None] * same_seg[:, :, None]
  o_intra = jnp.einsum("bnhij,bnjhv->bnihv", scores, vb)

  # Each block's own contribution to the state at its last real token.
  k_exp = (valid_len[:, None] - 1.0 - pos[None, :])  # [n, c], <0 on padding
  k_mask = (k_exp >= 0)[None] & (seg == last_seg[:, :, None])  # [b, n, c]
  k_decay = jnp.exp(jnp.where(k_exp[None, :, :, None] >= 0, ld * k_exp[None, :, :, None], -jnp.inf))  # [1, n, c, h]
  k_w = kb * (k_decay * k_mask[..., None])[..., None]
  kv_block = jnp.einsum("bnchk,bnchv->bnhkv", k_w, vb)  # [b, n, h, dk, dv]
  keep = (last_seg == prev_seg).astype(f32)  # no boundary inside the block
  block_decay = jnp.exp(ld[None, :] * valid_len[:, None])  # [n, h]

  # Inter-block: carry the state across blocks (a short scan over n).
  state0 = jnp.zeros((b, h, dk, dv), f32) if initial_state is None else initial_state.astype(f32)

  def carry(state, xs):
    kv_c, keep_c, bd_c = xs
    new = state * (keep_c[:, None, None, None] * bd_c[None, :, None, None]) + kv_c
    return new, state  # emit the state entering this block

  final_state, states_in = jax.lax.scan(
      carry, state0, (jnp.moveaxis(kv_block, 1, 0), jnp.moveaxis(keep, 1, 0), block_decay))
  states_in = jnp.moveaxis(states_in, 0, 1)  # [b, n, h, dk, dv]

  q_decay = jnp.exp(ld[None, :] * (pos[:, None] + 1.0))  # [c, h]
  q_mask = (seg == prev_seg[:, :, None]).astype(f32)  # [b, n, c]
  q_w = qb * (q_decay[None, None] * q_mask[..., None])[..., None]
  o_inter = jnp.einsum("bnchk,bnhkv->bnchv", q_w, states_in)

  out = (o_intra + o_inter).reshape(b, n * c, h, dv)[:, :t]
  return out.astype(q.dtype), final_state


def lightning_attention(q, k, v, log_decay, *, block_size: int = 256, segment_ids=None, initial_state=None,
                        impl: Impl = "chunked", interpret: bool = False) -> Tuple[jax.Array, jax.Array]:
  """Lightning attention; returns (out [b, t, h, dv] in q.dtype, final_state [b, h, dk, dv] float32).

  impl: "recurrent" (oracle), "chunked" (XLA block-wise) or "pallas" (GPU kernels;
  `interpret=True` runs them on any backend).
  """
  if impl == "recurrent":
    return lightning_attention_recurrent(q, k, v, log_decay, segment_ids=segment_ids, initial_state=initial_state)
  if impl == "chunked":
    return lightning_attention_chunked(q, k, v, log_decay, block_size=block_size, segment_ids=segment_ids,
                                       initial_state=initial_state)
  if impl == "pallas":
    import pallas_kernels  # imported lazily: the model works without the kernels
    return pallas_kernels.lightning_attention(q, k, v, log_decay, block_size=block_size, segment_ids=segment_ids,
                                              initial_state=initial_state, interpret=interpret)
  raise ValueError(f"impl must be 'recurrent', 'chunked' or 'pallas', got {impl!r}")


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
