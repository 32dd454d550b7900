"""Forward kernel of lightning attention (Lightning Attention-2 sweep).

One program per (row, head, value tile) walks its row block by block
and keeps the running state [head_dim_k, block_v] in registers; per-block
states never go to HBM.  For each block (C tokens):

    o     = (Q K^T * D) V + (Q * q_decay) S           D_ij = lambda^(i-j), j <= i
    S_new = state_decay * S + (K * k_decay)^T V

Rows are `_common.Rows`: a sequence is one row (or `splits` rows of the split
path); the last block of a row may overhang the array, and is masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm


def _fwd_kernel(*refs, block, rows, has_seg, has_init, compute_dtype):
  q_ref, k_ref, v_ref, ld_ref = refs[:4]
  rest = list(refs[4:])
  starts_ref = rest.pop(0) if has_seg else None  # [length] segment_starts
  s0_ref = rest.pop(0) if has_init else None
  o_ref, state_ref = rest

  log_decay = cm.read_log_decay(ld_ref)
  decay_ij = cm.intra_decay(log_decay, block)
  dk = q_ref.shape[-1]
  bv = v_ref.shape[-1]
  state0 = s0_ref[...].astype(jnp.float32) if has_init else jnp.zeros((dk, bv), jnp.float32)
  tokens = cm.row_tokens(rows)
  load = lambda ref, start: cm.load_block(ref, start, block, rows, tokens)

  def body(i, state):
    start = i * block
    q = load(q_ref, start)  # [C, dk]
    k = load(k_ref, start)
    v = load(v_ref, start)  # [C, bv]
    q_decay, k_decay, state_decay, decay = cm.block_masks(log_decay, decay_ij, starts_ref, block, tokens, start)
    scores = cm.dot(q, k, trans_b=True) * decay  # [C, C]
    out = cm.dot(scores.astype(compute_dtype), v)
    out += cm.dot((q * q_decay[:, None]).astype(compute_dtype), state.astype(compute_dtype))
    cm.store_block(o_ref, start, block, out.astype(o_ref.dtype), rows, tokens)
    return state * state_decay + cm.dot((k * k_decay[:, None]).astype(compute_dtype), v, trans_a=True)

  state_ref[...] = jax.lax.fori_loop(0, cm.row_blocks(rows, tokens, block), body, state0)


def lightning_forward(q, k, v, log_decay, segment_index, initial_state, *, rows, block, block_v,
                      num_warps, num_stages, interpret):
  """Runs the forward sweep over the rows `rows` (a `_common.Rows`) makes of each sequence.

  q, k [b, t, h, dk]; v [b, t, h, dv]; log_decay [h]; segment_index
  [b * splits, rows.length] int segment ids, a new segment wherever the id changes (or None; the padding past
  each row's real tokens comes from `rows`, and the ids there are ignored); initial_state [b * splits, h, dk,
  dv] (or None).
  Returns (out [b, t, h, dv] q.dtype, state [b * splits, h, dk, dv] f32: each row's end state).
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  assert t == rows.seq_len and rows.length % block == 0 and dv % block_v == 0
  sq = cm.SQUEEZED
  n = b * rows.splits
  grid = (n, h, dv // block_v)
  has_seg = segment_index is not None
  has_init = initial_state is not None
  compute_dtype = jnp.float32 if q.dtype == jnp.float32 else q.dtype

  in_specs = [rows.spec(dk), rows.spec(dk), rows.spec(block_v, tiled=True),
              pl.BlockSpec((sq, cm.DECAY_LANES), lambda ri, hi, vi: (hi, 0))]
  args = [q, k, v, cm.decay_rows(log_decay)]
  if has_seg:
    in_specs.append(pl.BlockSpec((sq, rows.length), lambda ri, hi, vi: (ri, 0)))
    args.append(cm.segment_starts(segment_index.astype(jnp.int32), block))
  if has_init:
    in_specs.append(pl.BlockSpec((sq, sq, dk, block_v), lambda ri, hi, vi: (ri, hi, 0, vi)))
    args.append(initial_state.astype(jnp.float32))
  out_specs = [rows.spec(block_v, tiled=True), pl.BlockSpec((sq, sq, dk, block_v), lambda ri, hi, vi: (ri, hi, 0, vi))]
  args, vary = cm.match_varying(args)
  out_shape = [cm.out_struct((b, t, h, dv), q.dtype, vary), cm.out_struct((n, h, dk, dv), jnp.float32, vary)]
  kernel = functools.partial(_fwd_kernel, block=block, rows=rows, has_seg=has_seg, has_init=has_init,
                             compute_dtype=compute_dtype)
  out, state = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      compiler_params=cm.compiler_params(num_warps, num_stages), interpret=interpret,
      name="lightning_fwd")(*args)
  return out, state
