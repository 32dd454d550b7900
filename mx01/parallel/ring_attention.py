"""Varlen ring attention for the softmax (GQA) layers, for use inside `shard_map`.

Each device along the sequence axis holds its queries and one block of keys /
values; the K/V blocks travel around the ring with `ppermute` (S - 1 hops),
and every device folds each visiting block into an online softmax (running
max m, normaliser l and unnormalised output o, in float32), as in
FlashAttention / Ring Attention.  Masks are built from *global* token
positions and segment ids, so packed sequences with arbitrary boundaries work
(a token attends to earlier tokens with the same segment id, like
`mx01.ops.causal_attention`).

Load balance (layout.py): device s holds chunks s and 2S-1-s of the sequence
(zig-zag).  With a plain contiguous split, device S-1 would attend to the whole
sequence and device 0 to one block, so the ring would run at the pace of the
last device.  With zig-zag, when the visiting K/V come from device j != s:
  j < s: both local query chunks are after K/V chunk j and before chunk 2S-1-j,
         so only the first K/V chunk is needed (queries 2c x keys c);
  j > s: only the second query chunk (2S-1-s) sees anything, and it sees both
         K/V chunks (queries c x keys 2c);
every device does the same work (2c^2 scores) at every hop, and fully masked
block pairs are never computed.  With sequence = 1 this is plain masked
attention on one block.

Backward: autodiff through the ppermutes (which transpose to the reverse ring).
"""

from __future__ import annotations

import functools
from typing import Tuple

import chex
import jax
import jax.numpy as jnp

from mx01.parallel import comm
from mx01.parallel.layout import SequenceLayout

_NEG = -1e30


def _block_scores(q, k, pos_q, pos_k, seg_q, seg_k, scale):
  """q [b, tq, g, r, d], k [b, tk, g, d] -> masked logits [b, g, r, tq, tk] f32 and the mask."""
  logits = jnp.einsum("bqgrd,bkgd->bgrqk", q, k, preferred_element_type=jnp.float32) * scale
  mask = (pos_k[None, None, :] <= pos_q[None, :, None]) & (seg_q[:, :, None] == seg_k[:, None, :])  # [b, tq, tk]
  mask = mask[:, None, None]
  return jnp.where(mask, logits, _NEG), mask


def _fold(acc, q, k, v, pos_q, pos_k, seg_q, seg_k, scale):
  """Online-softmax update of acc = (o [b,g,r,tq,d], m [b,g,r,tq], l [b,g,r,tq]) with one K/V block."""
  o, m, l = acc
  logits, mask = _block_scores(q, k, pos_q, pos_k, seg_q, seg_k, scale)
  m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(logits, axis=-1)))
  p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
  correction = jnp.exp(m - m_new)
  l = l * correction + jnp.sum(p, axis=-1)
  o = o * correction[..., None] + jnp.einsum("bgrqk,bkgd->bgrqd", p.astype(v.dtype), v,
                                              preferred_element_type=jnp.float32)
  return o, m_new, l


def ring_attention(q, k, v, *, segment_ids=None, layout: SequenceLayout, sequence_axes: Tuple[str, ...]):
  """Causal softmax attention over the whole (sharded) sequence.

  q [b, t_local, h, d]; k, v [b, t_local, kv_heads, d]; segment_ids [b, t_local]
  (local tokens in layout order).  Returns [b, t_local, h, d] in q.dtype.
  """
  b, t, h, d = q.shape
  kvh = k.shape[2]
  chex.assert_shape([k, v], (b, t, kvh, d))
  n, c, s = layout.chunks_per_device, layout.chunk_len, layout.sequence
  chex.assert_equal(t, n * c)
  scale = d ** -0.5
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  chunk_ids = jnp.asarray(layout.chunk_ids())  # [S, n]
  me = comm.axis_index(sequence_axes)

  def positions(rank):  # [t] global positions of the tokens held by sequence rank `rank`
    return (chunk_ids[rank][:, None] * c + jnp.arange(c)[None]).reshape(-1)

  qg = q.reshape(b, t, kvh, h // kvh, d)
  pos_q = positions(me)
  vma = comm.vma_of(q)
  init = (jnp.zeros((b, kvh, h // kvh, t, d), jnp.float32), jnp.full((b, kvh, h // kvh, t), _NEG, jnp.float32),
          jnp.zeros((b, kvh, h // kvh, t), jnp.float32))
  acc = tuple(comm.as_varying(a, vma) for a in init)
  acc = _fold(acc, qg, k, v, pos_q, pos_q, seg, seg, scale)  # own block (the diagonal)
  if s == 1:
    o, _, l = acc
    return _finish(o, l, b, t, h, d, q.dtype)

  ring = [(i, (i + 1) % s) for i in range(s)]
  k_blk, v_blk, seg_blk = k, v, seg
  for hop in range(1, s):
    k_blk, v_blk, seg_blk = (jax.lax.ppermute(x, sequence_axes, ring) for x in (k_blk, v_blk, seg_blk))
    src = (me - hop) % s
    pos_k = positions(src)
    early = functools.partial(_fold_early_source, scale=scale, c=c)
    late = functools.partial(_fold_late_source, scale=scale, c=c)
    acc = jax.lax.cond(src < me, early, late, acc, qg, k_blk, v_blk, pos_q, pos_k, seg, seg_blk)
  o, _, l = acc
  return _finish(o, l, b, t, h, d, q.dtype)


def _fold_early_source(acc, q, k, v, pos_q, pos_k, seg_q, seg_k, *, scale, c):
  """Source rank j < me: all local queries against the first K/V chunk only."""
  return _fold(acc, q, k[:, :c], v[:, :c], pos_q, pos_k[:c], seg_q, seg_k[:, :c], scale)


def _fold_late_source(acc, q, k, v, pos_q, pos_k, seg_q, seg_k, *, scale, c):
  """Source rank j > me: only the second local query chunk, against both K/V chunks."""
  o, m, l = acc
  second = (o[..., c:, :], m[..., c:], l[..., c:])
  o2, m2, l2 = _fold(second, q[:, c:], k, v, pos_q[c:], pos_k, seg_q[:, c:], seg_k, scale)
  return (jnp.concatenate([o[..., :c, :], o2], axis=-2), jnp.concatenate([m[..., :c], m2], axis=-1),
          jnp.concatenate([l[..., :c], l2], axis=-1))


def _finish(o, l, b, t, h, d, dtype):
  out = o / jnp.maximum(l, 1e-30)[..., None]  # [b, g, r, t, d]
  return jnp.moveaxis(out, 3, 1).reshape(b, t, h, d).astype(dtype)
