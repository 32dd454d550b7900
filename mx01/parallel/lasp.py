"""LASP+: lightning attention sharded along the sequence, for use inside `shard_map`.

The sequence of every row is cut into chunks (layout.py: two zig-zag chunks per
device when sequence > 1).  Lightning attention is a linear recurrence
S_t = lambda S_{t-1} + k_t^T v_t, so each chunk can be processed on its own
and corrected afterwards:

1. Local pass.  Every chunk runs the configured lightning implementation
   (`inner`, e.g. the XLA block-wise form or the Pallas kernels) with a zero
   initial state, giving its output o_loc and final state S_loc (which only
   holds the chunk's last segment).
2. All-gather S_loc of every chunk over the sequence axis, with each chunk's
   segment summary (first/last segment id, whether a segment starts inside).
3. The inter-chunk state pass (pallas_kernels/lightning/chunk_states.py, the
   same code the XLA form and the Pallas split path use), on every device at
   once over the G global chunks (nobody waits for the previous device,
   unlike the serial ring of LASP): S_in[g+1] = a_g S_in[g] + S_loc[g].
4. Correct: o_t += (q_t * lambda^(t+1)) S_in for the tokens t of the chunk's
   first segment, if that segment continues from the previous chunk.

Autodiff through the all-gather (-> reduce-scatter) gives the backward pass.
Communication per layer: one all-gather of [chunks, batch, heads, dk, dv]
float32 states, independent of the sequence length.
"""

from __future__ import annotations

from typing import Callable, Tuple

import chex
import jax.numpy as jnp
import numpy as np

from mx01.parallel import comm
from mx01.parallel.layout import SequenceLayout
from pallas_kernels.lightning import chunk_states


def _to_global_chunks(gathered, layout: SequenceLayout):
  """[S, b, n_local, ...] gathered per device -> [b, G, ...] in global chunk order."""
  s, b, n = gathered.shape[:3]
  flat = jnp.moveaxis(gathered, 0, 1).reshape((b, s * n) + gathered.shape[3:])
  order = np.argsort(layout.chunk_ids().reshape(-1))  # global chunk g lives at flat index order[g]
  return jnp.take(flat, order, axis=1)


def lasp_lightning(q, k, v, log_decay, *, block_size: int = 256, segment_ids=None, initial_state=None,
                   inner: Callable, layout: SequenceLayout, sequence_axes: Tuple[str, ...]):
  """Sequence-parallel lightning attention with the interface of `ModelOps.lightning` (mx01/ops.py).

  q, k [b, t_local, h, dk]; v [b, t_local, h, dv]; log_decay [h]; segment_ids
  [b, t_local]; initial_state [b, h, dk, dv] (state entering the first chunk of
  the global sequence) or None.  Returns (out [b, t_local, h, dv] in q.dtype,
  final_state [b, h, dk, dv] float32 after the last global token).
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  n, c = layout.chunks_per_device, layout.chunk_len
  chex.assert_equal(t, n * c)
  chex.assert_shape(log_decay, (h,))
  f32 = jnp.float32
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  chex.assert_shape(seg, (b, t))

  def chunks(x):  # [b, n*c, ...] -> [b*n, c, ...]
    return x.reshape((b * n, c) + x.shape[2:])

  seg_c = chunks(seg)
  zero_state = comm.as_varying(jnp.zeros((b * n, h, dk, dv), f32), comm.vma_of(q))
  o_loc, s_loc = inner(chunks(q), chunks(k), chunks(v), log_decay, block_size=block_size, segment_ids=seg_c,
                       initial_state=zero_state)
  o_loc = o_loc.reshape(b, n, c, h, dv).astype(f32)
  s_loc = s_loc.reshape(b, n, h, dk, dv)

  seg_c = seg_c.reshape(b, n, c)
  local_lengths = chunk_states.chunk_lengths(c * n, n, c)  # every local token is real

  # All-gather per-chunk summaries over the sequence axis, into global chunk order [b, G, ...].
  def gather(x):
    if not sequence_axes:
      return x
    gathered = comm.all_gather_replicated(x[None], sequence_axes, axis=0)  # [S, b, n, ...], same on every rank
    return _to_global_chunks(gathered, layout)

  if initial_state is not None:
    chex.assert_shape(initial_state, (b, h, dk, dv))
  g = layout.num_chunks
  bounds = chunk_states.ChunkBoundaries(*(gather(x) for x in chunk_states.chunk_boundaries(seg_c, local_lengths)))
  chunk_decay, enters = chunk_states.chunk_transitions(log_decay, bounds, chunk_states.chunk_lengths(c * g, g, c))
  states_in, s_final = chunk_states.combine_chunk_states(gather(s_loc), chunk_decay, initial_state)

  my_chunks = jnp.asarray(layout.chunk_ids())[comm.axis_index(sequence_axes)]  # [n]
  mask = chunk_states.incoming_mask(seg_c, jnp.take(enters, my_chunks, axis=1), local_lengths)
  # float32 q at the default precision: the correction's matmul as before the shared pass existed.
  extra = chunk_states.apply_incoming_states(q.reshape(b, n, c, h, dk).astype(f32),
                                             jnp.take(states_in, my_chunks, axis=1), log_decay, mask, precision=None)
  out = o_loc + extra
  return out.reshape(b, t, h, dv).astype(q.dtype), s_final
