"""The inter-chunk state pass of lightning attention, written once.

A sequence cut into chunks of L tokens can be processed chunk by chunk from a
zero state (the local pass: the XLA block-wise form, the Pallas kernels, or
one device of LASP+); the true state entering each chunk then follows from the
chunks' local end states by a decayed prefix combination

    S_in[0] = S0,   S_in[j+1] = a_j * S_in[j] + S_local[j],   a_j = keep_j * lambda^len_j

(keep_j = 0 when a segment starts inside chunk j or at its first token), and
every token p (offset r in its chunk) of the chunk's first segment, if that
segment continues from before, gets the missing term  o_p += lambda^(r+1) q_p S_in[j].
This is flash-linear-attention's fla/ops/common/chunk_h.py split into three
steps, shared by the XLA chunked form (mx01/lightning.py), the Pallas split
path (pallas_kernels/lightning/api.py) and LASP+ (mx01/parallel/lasp.py):

  chunk_boundaries   per-chunk segment summaries (local; LASP+ all-gathers them)
  chunk_transitions  a_j and whether chunk j's first token continues the incoming segment
  combine_chunk_states   the prefix combination above (a sequential scan over chunks)
  incoming_mask / apply_incoming_states   the missing term of each token

(The Pallas split path uses the first three only: its forward kernel takes
S_in[j] as each row's initial state, so the missing term is added on chip.)

Segments: `seg` [b, n, L] holds per-token segment ids; a new segment starts
wherever the id changes.  Padding exists only at the tail of the sequence and
is given by `lengths` [n] (real tokens per chunk, static), never by the ids.
All functions are plain XLA, differentiable, and import only jax; they
compute in float32 (float64 when given float64, for gradient checks).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common as cm


def _acc(x) -> jnp.dtype:
  """Accumulation dtype: float32, or float64 for float64 inputs."""
  return jnp.promote_types(x.dtype, jnp.float32)


def segment_index(segment_ids: jax.Array) -> jax.Array:
  """Maps arbitrary per-token segment ids to a running segment index.

  A new segment starts wherever the id changes; the result counts the starts
  so equal values mean "same contiguous segment".  [batch, seq] -> int32.
  """
  change = jnp.concatenate(
      [jnp.zeros_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return jnp.cumsum(change.astype(jnp.int32), axis=1)


def chunk_lengths(seq_len: int, num_chunks: int, chunk_len: int) -> np.ndarray:
  """[num_chunks] real tokens per chunk of a sequence of `seq_len` tokens padded at its tail."""
  return np.clip(seq_len - np.arange(num_chunks) * chunk_len, 0, chunk_len).astype(np.int32)


class ChunkBoundaries(NamedTuple):
  """Segment summaries of chunks, [b, n] each (all-gathered by LASP+)."""
  first: jax.Array  # id of the chunk's first token
  last: jax.Array  # id of its last real token
  inner: jax.Array  # bool: a segment starts after the chunk's first token


def _real(lengths, chunk_len: int) -> np.ndarray:
  """[n, L] bool: token is real (not tail padding)."""
  return np.arange(chunk_len)[None, :] < np.asarray(lengths)[:, None]


def chunk_boundaries(seg: jax.Array, lengths) -> ChunkBoundaries:
  """seg [b, n, L] segment ids; lengths [n] real tokens per chunk.  Returns ChunkBoundaries."""
  b, n, c = seg.shape
  real = jnp.asarray(_real(lengths, c))  # [n, L]
  change = (seg[:, :, 1:] != seg[:, :, :-1]) & real[None, :, 1:]
  last_pos = jnp.asarray(np.maximum(np.asarray(lengths) - 1, 0))  # [n]
  last = jnp.take_along_axis(seg, jnp.broadcast_to(last_pos[None, :, None], (b, n, 1)), axis=2)[..., 0]
  return ChunkBoundaries(first=seg[:, :, 0], last=last, inner=jnp.any(change, axis=-1))


def chunk_transitions(log_decay: jax.Array, bounds: Optional[ChunkBoundaries], lengths) -> Tuple[jax.Array,
                                                                                                   Optional[jax.Array]]:
  """How each chunk maps its incoming state to its outgoing one.

  log_decay [h]; bounds from `chunk_boundaries` (None: one segment per row);
  lengths [n].  Returns (chunk_decay [b or 1, n, h] = keep * lambda^len,
  enters [b, n] bool or None: chunk j's first token continues the segment that
  holds the incoming state; chunk 0 always does, as the initial state belongs
  to the row's first segment).  A chunk of padding only passes the state unchanged.
  """
  lengths = np.asarray(lengths)
  acc = _acc(log_decay)
  decay = jnp.exp(log_decay.astype(acc)[None, :] * jnp.asarray(lengths, acc)[:, None])  # [n, h]
  if bounds is None:
    return decay[None], None
  b = bounds.first.shape[0]
  enters = jnp.concatenate([jnp.ones((b, 1), bool), bounds.first[:, 1:] == bounds.last[:, :-1]], axis=1)
  keep = (enters & ~bounds.inner) | jnp.asarray(lengths == 0)[None]
  return decay[None] * keep[..., None].astype(acc), enters


def combine_chunk_states(local_states: jax.Array, chunk_decay: jax.Array,
                         initial_state: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """The decayed prefix combination of chunk end states.

  local_states [b, n, h, dk, dv] (each chunk run from a zero state);
  chunk_decay [b or 1, n, h]; initial_state [b, h, dk, dv] or None.
  Returns (states_in [b, n, h, dk, dv] float32, final_state [b, h, dk, dv] float32).
  A sequential scan over chunks: n is small where it runs on whole states
  (super-chunks, LASP+ chunks) and the XLA form keeps its per-block state memory.
  """
  b, n, h, dk, dv = local_states.shape
  acc = _acc(local_states)
  decay = jnp.broadcast_to(chunk_decay.astype(acc), (b, n, h))
  state0 = jnp.zeros((b, h, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
  # Inside shard_map the scan carry must vary over every mesh axis its updates vary over.
  (state0, local_states, decay), _ = cm.match_varying([state0, local_states, decay])

  def step(state, xs):
    local, a = xs  # [b, h, dk, dv], [b, h]
    return a[..., None, None] * state + local, state  # emit the state entering this chunk

  final, states_in = jax.lax.scan(step, state0, (jnp.moveaxis(local_states.astype(acc), 1, 0),
                                                 jnp.moveaxis(decay, 1, 0)))
  return jnp.moveaxis(states_in, 0, 1), final


def incoming_mask(seg: Optional[jax.Array], enters: Optional[jax.Array], lengths) -> Optional[jax.Array]:
  """[b, n, L] bool: token belongs to its chunk's first segment and that segment continues from before.

  seg [b, n, L] or None (then every real token continues; returns None).
  """
  if seg is None:
    return None
  c = seg.shape[-1]
  change = jnp.concatenate([jnp.zeros_like(seg[..., :1], dtype=bool), seg[..., 1:] != seg[..., :-1]], axis=-1)
  first_segment = jnp.cumsum(change.astype(jnp.int32), axis=-1) == 0
  return first_segment & enters[..., None] & jnp.asarray(_real(lengths, c))[None]


def apply_incoming_states(q: jax.Array, states_in: jax.Array, log_decay: jax.Array, mask: Optional[jax.Array], *,
                          precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """The incoming-state term of every token: (q_p * lambda^(r+1)) S_in[chunk of p] where mask allows.

  q [b, n, L, h, dk]; states_in [b, n, h, dk, dv]; mask [b, n, L] bool or None.
  Returns [b, n, L, h, dv] float32 (to be added to the local output).
  Low-precision q on GPU: the matmul runs in q's dtype with float32 accumulation
  (as the kernels do); otherwise in float32 at `precision` (the XLA form passes
  None, the default precision of its other matmuls).
  """
  c = q.shape[2]
  acc = _acc(q)
  pos = jnp.arange(c, dtype=acc)
  q_decay = jnp.exp(log_decay.astype(acc)[None, :] * (pos[:, None] + 1.0))  # [L, h]
  scale = q_decay[None, None]  # [1, 1, L, h]
  if mask is not None:
    scale = scale * mask[..., None].astype(acc)
  qw = q.astype(acc) * scale[..., None]
  if q.dtype == acc or jax.default_backend() != "gpu":
    return jnp.einsum("bnlhk,bnhkv->bnlhv", qw, states_in.astype(acc), precision=precision)
  return jnp.einsum("bnlhk,bnhkv->bnlhv", qw.astype(q.dtype), states_in.astype(q.dtype),
                    preferred_element_type=jnp.float32)
