"""States-only kernels of the sequence split (pallas_kernels/lightning/api.py).

A sequence cut into super-chunks runs each piece as its own row; what joins the
rows is small, and these two sweeps produce it while reading half the inputs:

* `local_states` (forward; reads k, v): each row's end state from a zero start,
      S_local = sum over tokens s of the row's last segment of  lambda^(last - s) k_s^T v_s
  which `chunk_states.combine_chunk_states` turns into the state entering every row.
* `local_incoming_grad` (backward; reads q, dO): the cotangent a row's own
  outputs send to the state entering it,
      D = sum over tokens r (offset in the row) of its first segment of  lambda^(r+1) q_r^T dO_r
  which the transposed combination turns into every row's end-state cotangent.

One program per (row, head, value tile) walks the row block by block with
`_common.block_masks`, the forward kernel's masks (from `_common.segment_starts`), so S_local is the state the
forward sweep would end with.  On packed rows each sweep reads only the blocks
of the segment it sums over (from the block where the last segment starts;
up to the block where the first one ends).  Rows are `_common.Rows` views of
the [b, t, h, d] inputs (a row's last block may overhang the array: masked);
`segment_index` is [rows, length], -1 on padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm


def _local_states_kernel(*refs, block, rows, has_seg, compute_dtype):
  k_ref, v_ref, ld_ref = refs[:3]
  starts_ref, first_ref = refs[3:5] if has_seg else (None, None)
  state_ref = refs[-1]
  log_decay = cm.read_log_decay(ld_ref)
  first = jnp.max(first_ref[...]) if has_seg else 0  # blocks before the last segment add nothing
  tokens = cm.row_tokens(rows)

  def body(i, state):
    start = i * block
    k = cm.load_block(k_ref, start, block, rows, tokens)  # [C, dk]
    v = cm.load_block(v_ref, start, block, rows, tokens)  # [C, bv]
    _, k_decay, state_decay, _ = cm.block_masks(log_decay, None, starts_ref, block, tokens, start)
    return state * state_decay + cm.dot((k * k_decay[:, None]).astype(compute_dtype), v, trans_a=True)

  state0 = jnp.zeros((k_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
  state_ref[...] = jax.lax.fori_loop(first, cm.row_blocks(rows, tokens, block), body, state0)


def _incoming_grad_kernel(*refs, block, rows, has_seg, compute_dtype):
  q_ref, do_ref, ld_ref = refs[:3]
  starts_ref, end_ref = refs[3:5] if has_seg else (None, None)
  grad_ref = refs[-1]
  log_decay = cm.read_log_decay(ld_ref)
  tokens = cm.row_tokens(rows)
  # Blocks after the first segment add nothing.
  end = jnp.max(end_ref[...]) if has_seg else cm.row_blocks(rows, tokens, block)

  def body(i, carry):
    grad, scale = carry  # scale = lambda^start while the first segment lasts, then 0
    start = i * block
    q = cm.load_block(q_ref, start, block, rows, tokens)  # [C, dk]
    do = cm.load_block(do_ref, start, block, rows, tokens)  # [C, bv]
    q_decay, _, state_decay, _ = cm.block_masks(log_decay, None, starts_ref, block, tokens, start)
    grad += cm.dot((q * (q_decay * scale)[:, None]).astype(compute_dtype), do, trans_a=True)
    return grad, scale * state_decay

  grad0 = jnp.zeros((q_ref.shape[-1], do_ref.shape[-1]), jnp.float32)
  grad_ref[...] = jax.lax.fori_loop(0, end, body, (grad0, jnp.float32(1.0)))[0]


def _row_sum(kernel, name, a, b, log_decay, segment_index, bound, *, rows, block, block_v, num_warps, num_stages,
             interpret):
  """Launches a [batch, t, h, da] x [batch, t, h, db] -> [batch * splits, h, da, db] float32 sweep over `rows`.

  bound(segment_index, block) -> [rows] int32: the sweep's first or end block on packed rows."""
  batch, t, h, da = a.shape
  db = b.shape[-1]
  assert t == rows.seq_len and rows.length % block == 0 and db % block_v == 0
  sq = cm.SQUEEZED
  n = batch * rows.splits
  has_seg = segment_index is not None
  in_specs = [rows.spec(da), rows.spec(block_v, tiled=True),
              pl.BlockSpec((sq, cm.DECAY_LANES), lambda ri, hi, vi: (hi, 0))]
  args = [a, b.astype(a.dtype), cm.decay_rows(log_decay)]
  if has_seg:
    in_specs += [pl.BlockSpec((sq, rows.length), lambda ri, hi, vi: (ri, 0)),
                 pl.BlockSpec((sq, cm.DECAY_LANES), lambda ri, hi, vi: (ri, 0))]
    segment_index = segment_index.astype(jnp.int32)
    # One value per row, repeated over DECAY_LANES lanes (a loadable power-of-two row, as the decays).
    args += [cm.segment_starts(segment_index, block),
             jnp.broadcast_to(bound(segment_index, block)[:, None], (n, cm.DECAY_LANES))]
  args, vary = cm.match_varying(args)
  compute_dtype = jnp.float32 if a.dtype == jnp.float32 else a.dtype
  return pl.pallas_call(
      functools.partial(kernel, block=block, rows=rows, has_seg=has_seg, compute_dtype=compute_dtype),
      out_shape=cm.out_struct((n, h, da, db), jnp.float32, vary), grid=(n, h, db // block_v),
      in_specs=in_specs, out_specs=pl.BlockSpec((sq, sq, da, block_v), lambda ri, hi, vi: (ri, hi, 0, vi)),
      compiler_params=cm.compiler_params(num_warps, num_stages), interpret=interpret, name=name)(*args)


def _last_segment_first_block(seg, block):
  """[rows, length] -> [rows]: the block holding the first token of each row's last segment (0 on padding-only rows)."""
  first_token = jnp.argmax(seg == jnp.max(seg, axis=1, keepdims=True), axis=1)
  return (first_token // block).astype(jnp.int32)


def _first_segment_end_block(seg, block):
  """[rows, length] -> [rows]: blocks covering each row's first segment (ids start at 0; 0 on padding-only rows)."""
  return (-(-jnp.sum(seg == 0, axis=1) // block)).astype(jnp.int32)


def local_states(k, v, log_decay, segment_index, **launch):
  """Each row's end state from a zero start.

  k [b, t, h, dk]; v [b, t, h, dv]; log_decay [h]; segment_index [b * splits,
  rows.length] int32 running index from 0 per row, -1 on padding (or None: the
  row's real tokens from `rows`).  Keywords: rows (a `_common.Rows`), block,
  block_v, num_warps, num_stages, interpret.  Returns [b * splits, h, dk, dv] float32.
  """
  return _row_sum(_local_states_kernel, "lightning_local_states", k, v, log_decay, segment_index,
                  _last_segment_first_block, **launch)


def local_incoming_grad(q, grad_out, log_decay, segment_index, **launch):
  """Cotangent of each row's incoming state from that row's outputs (the row's first segment only).

  q [b, t, h, dk]; grad_out [b, t, h, dv]; other arguments as `local_states`.
  Returns [b * splits, h, dk, dv] float32.
  """
  return _row_sum(_incoming_grad_kernel, "lightning_local_incoming_grad", q, grad_out, log_decay, segment_index,
                  _first_segment_end_block, **launch)
