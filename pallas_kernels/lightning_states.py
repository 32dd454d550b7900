"""Combining per-chunk states of lightning attention (shared with sequence parallelism).

A sequence cut into chunks can be processed chunk by chunk from a zero state;
the true state entering each chunk follows from the chunks' end states by a
decayed prefix combination (the LASP+ step, done here within one device):

    S_in[0] = S0,   S_in[j+1] = keep_j * lambda^len_j * S_in[j] + S_local[j]

and every token p (offset r in its chunk) that continues the incoming
segment gets the missing term  o_p += lambda^(r+1) q_p S_in[j].
All functions are plain XLA and differentiable.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp


def chunk_transitions(log_decay: jax.Array, segment_index: Optional[jax.Array], num_chunks: int,
                      chunk_len: int, seq_len: int) -> Tuple[jax.Array, jax.Array]:
  """How each chunk maps its incoming state to its outgoing one.

  segment_index [b, num_chunks * chunk_len] running index (-1 on padding) or
  None.  Returns (chunk_decay [b, n, h] = keep * lambda^len, carries
  [b, n * chunk_len] bool: token continues the chunk's incoming segment).
  """
  h = log_decay.shape[0]
  lengths = jnp.clip(seq_len - jnp.arange(num_chunks) * chunk_len, 0, chunk_len).astype(jnp.float32)  # [n]
  decay = jnp.exp(log_decay.astype(jnp.float32)[None, :] * lengths[:, None])  # [n, h]
  if segment_index is None:
    return decay[None], None
  b = segment_index.shape[0]
  seg = segment_index.reshape(b, num_chunks, chunk_len)
  last = jnp.max(seg, axis=2)  # [b, n] (padding is -1)
  prev = jnp.concatenate([jnp.zeros((b, 1), last.dtype), last[:, :-1]], axis=1)
  keep = (last == prev).astype(jnp.float32)
  carries = (seg == prev[:, :, None]).reshape(b, num_chunks * chunk_len)
  return decay[None] * keep[:, :, None], carries


def combine_chunk_states(local_states: jax.Array, chunk_decay: jax.Array,
                         initial_state: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """Decayed prefix combination of chunk end states.

  local_states [b, n, h, dk, dv] (each chunk run from a zero state);
  chunk_decay [b or 1, n, h]; initial_state [b, h, dk, dv] or None.
  Returns (states_in [b, n, h, dk, dv], final_state [b, h, dk, dv]).
  """
  b, n = local_states.shape[:2]
  decay = jnp.broadcast_to(chunk_decay, (b, n, chunk_decay.shape[-1]))[..., None, None]  # [b, n, h, 1, 1]
  local_states = local_states.astype(jnp.float32)
  if initial_state is not None:
    # Fold S0 into the first chunk's end state: S_out[0] = a_0 S0 + S_local[0].
    local_states = local_states.at[:, 0].add(decay[:, 0] * initial_state.astype(jnp.float32))

  def combine(left, right):
    a_left, s_left = left
    a_right, s_right = right
    return a_left * a_right, a_right * s_left + s_right

  _, outs = jax.lax.associative_scan(combine, (decay, local_states), axis=1)  # S_out[j]
  first = (jnp.zeros_like(outs[:, :1]) if initial_state is None
           else initial_state.astype(jnp.float32)[:, None])
  states_in = jnp.concatenate([first, outs[:, :-1]], axis=1)
  return states_in, outs[:, -1]


def apply_incoming_states(q: jax.Array, out_local: jax.Array, states_in: jax.Array, log_decay: jax.Array,
                          carries: Optional[jax.Array], chunk_len: int) -> jax.Array:
  """Adds each chunk's incoming-state term to its locally computed output.

  q [b, n * L, h, dk]; out_local [b, n * L, h, dv]; states_in [b, n, h, dk, dv];
  carries [b, n * L] bool or None.  Returns out [b, n * L, h, dv] in out_local.dtype.
  """
  b, t, h, dk = q.shape
  n = states_in.shape[1]
  pos = jnp.arange(chunk_len, dtype=jnp.float32)
  q_decay = jnp.exp(log_decay.astype(jnp.float32)[None, :] * (pos[:, None] + 1.0))  # [L, h]
  qc = q.astype(jnp.float32).reshape(b, n, chunk_len, h, dk) * q_decay[None, None, :, :, None]
  if carries is not None:
    qc = qc * carries.reshape(b, n, chunk_len)[..., None, None]
  # Low-precision inputs on GPU: matmul in their dtype with float32 accumulation (as the
  # kernels do); float32 inputs, or a backend without such dots (CPU), use float32.
  if q.dtype == jnp.float32 or jax.default_backend() != "gpu":
    extra = jnp.einsum("bnlhk,bnhkv->bnlhv", qc, states_in, precision=jax.lax.Precision.HIGHEST)
  else:
    extra = jnp.einsum("bnlhk,bnhkv->bnlhv", qc.astype(q.dtype), states_in.astype(q.dtype),
                       preferred_element_type=jnp.float32)
  out = out_local.astype(jnp.float32) + extra.reshape(b, t, h, -1)
  return out.astype(out_local.dtype)
