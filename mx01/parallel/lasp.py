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
   first/last segment id and whether a segment starts inside it.
3. Prefix combine, on every device at once (nobody waits for the previous
   device, unlike the serial ring of LASP):
       S_in[g] = sum_{g' < g} W[g, g'] S_loc[g'] + W0[g] S_init
       W[g, g'] = lambda^(c (g - 1 - g')) if no segment boundary lies between
                  the end of chunk g' and the start of chunk g, else 0,
   where c is the chunk length (a whole chunk decays its incoming state by
   lambda^c).
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

from mx01.lightning import segment_starts_to_index
from mx01.parallel import comm
from mx01.parallel.layout import SequenceLayout


def _to_global_chunks(gathered, layout: SequenceLayout):
  """[S, b, n_local, ...] gathered per device -> [b, G, ...] in global chunk order."""
  s, b, n = gathered.shape[:3]
  flat = jnp.moveaxis(gathered, 0, 1).reshape((b, s * n) + gathered.shape[3:])
  order = np.argsort(layout.chunk_ids().reshape(-1))  # global chunk g lives at flat index order[g]
  return jnp.take(flat, order, axis=1)


def lasp_lightning(q, k, v, log_decay, *, block_size: int = 256, segment_ids=None, initial_state=None,
                   inner: Callable, layout: SequenceLayout, sequence_axes: Tuple[str, ...]):
  """Sequence-parallel lightning attention with the `mx01.lightning.lightning_attention` interface.

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
  first_seg, last_seg = seg_c[:, :, 0], seg_c[:, :, -1]  # [b, n]
  inner_boundary = jnp.any(seg_c[:, :, 1:] != seg_c[:, :, :-1], axis=-1)  # [b, n]

  # All-gather per-chunk summaries over the sequence axis, into global chunk order [b, G, ...].
  def gather(x):
    if not sequence_axes:
      return x
    gathered = comm.all_gather_replicated(x[None], sequence_axes, axis=0)  # [S, b, n, ...], same on every rank
    return _to_global_chunks(gathered, layout)

  s_all = gather(s_loc)  # [b, G, h, dk, dv]
  first_all, last_all, inner_all = gather(first_seg), gather(last_seg), gather(inner_boundary)
  g = layout.num_chunks
  # enters[g]: chunk g's first token continues the segment of chunk g-1's last token (chunk 0: the initial state).
  enters = jnp.concatenate([jnp.ones((b, 1), bool), first_all[:, 1:] == last_all[:, :-1]], axis=1)  # [b, G]
  passes = enters & ~inner_all  # the incoming state survives the whole chunk
  breaks = jnp.cumsum((~passes).astype(jnp.int32), axis=1)  # [b, G]: non-passing chunks among 0..g
  breaks_before = jnp.pad(breaks[:, :-1], ((0, 0), (1, 0)))  # [b, G]: among 0..g-1
  ld = log_decay.astype(f32)
  idx = jnp.arange(g)

  # Weight of S_loc[g'] in S_in[g] (g' < g, every chunk strictly between passes): [b, G, G, h].
  connected = (idx[None, :] < idx[:, None])[None] & (breaks_before[:, :, None] == breaks[:, None, :])
  hops = jnp.maximum(idx[:, None] - 1 - idx[None, :], 0).astype(f32)
  w = connected[..., None] * jnp.exp(ld * c * hops[..., None])[None]
  my_chunks = jnp.asarray(layout.chunk_ids())[comm.axis_index(sequence_axes)]  # [n]
  s_in = jnp.einsum("bngh,bghkv->bnhkv", jnp.take(w, my_chunks, axis=1), s_all)  # [b, n, h, dk, dv]
  # State after the last global chunk (the final state of the row).
  w_final = (breaks[:, -1:] == breaks)[..., None] * jnp.exp(ld * c * (g - 1 - idx).astype(f32)[:, None])[None]
  s_final = jnp.einsum("bgh,bghkv->bhkv", w_final, s_all)
  if initial_state is not None:
    chex.assert_shape(initial_state, (b, h, dk, dv))
    init = initial_state.astype(f32)
    w0 = (breaks_before == 0)[..., None] * jnp.exp(ld * c * idx.astype(f32)[:, None])[None]  # [b, G, h]
    s_in = s_in + jnp.einsum("bnh,bhkv->bnhkv", jnp.take(w0, my_chunks, axis=1), init)
    s_final = s_final + ((breaks[:, -1] == 0)[:, None] * jnp.exp(ld * c * g)[None])[..., None, None] * init

  # Correct the tokens of each chunk's first segment (if it continues from before).
  enters_mine = jnp.take(enters, my_chunks, axis=1)  # [b, n]
  if initial_state is None:
    enters_mine = enters_mine & (my_chunks > 0)[None]
  first_segment = segment_starts_to_index(seg_c.reshape(b * n, c)).reshape(b, n, c) == 0
  mask = first_segment & enters_mine[..., None]  # [b, n, c]
  q_decay = jnp.exp(ld[None, :] * (jnp.arange(c, dtype=f32)[:, None] + 1.0))  # [c, h]
  q_w = q.reshape(b, n, c, h, dk).astype(f32) * (q_decay[None, None] * mask[..., None])[..., None]
  out = o_loc + jnp.einsum("bnchk,bnhkv->bnchv", q_w, s_in)
  return out.reshape(b, t, h, dv).astype(q.dtype), s_final
