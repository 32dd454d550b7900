"""Backward kernels of lightning attention.

Two sweeps over the sequence, each keeping its running state on chip:

* dQ (forward sweep, one program per (batch, head, key tile)): recomputes the
  state S[key tile, :] block by block and forms
      dQ = (dO V^T * D) K + (dO * q_decay) S^T.
* dK/dV (reverse sweep, one program per (batch, head, value tile)): carries
  the state cotangent G = dL/dS (starting from the final-state cotangent),
      dV = (Q K^T * D)^T dO + (K * k_decay) G
      dK = (dO V^T * D)^T Q + (V G^T) * k_decay      (partial over value tiles)
      G  <- state_decay * G + (Q * q_decay)^T dO,
  and what is left in G at the start is d(initial_state).

With `split_dkdv` the reverse sweep runs as two kernels, each carrying only the part of G it needs: a dV
sweep over value tiles (G[:, tile]; it also returns d(initial_state)) and a dK sweep over key tiles
(G[tile, :]).  Each forms one of the two [block, block] products and recomputes G's update, so the pair
does about 20% more matmul work than the one sweep; in exchange a program holds one [block, block] product,
one accumulator and half the state, and dK needs no sum of partials over value tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm


def _dq_kernel(*refs, block, rows, has_seg, has_init, compute_dtype):
  k_ref, v_ref, do_ref, ld_ref = refs[:4]
  rest = list(refs[4:])
  starts_ref = rest.pop(0) if has_seg else None  # [length] segment_starts
  s0_ref = rest.pop(0) if has_init else None
  (dq_ref,) = rest

  log_decay = cm.read_log_decay(ld_ref)
  decay_ij = cm.intra_decay(log_decay, block)
  bk = k_ref.shape[-1]
  dv = v_ref.shape[-1]
  state0 = s0_ref[...].astype(jnp.float32) if has_init else jnp.zeros((bk, dv), jnp.float32)
  tokens = cm.row_tokens(rows)
  load = lambda ref, start: cm.load_block(ref, start, block, rows, tokens)

  def body(i, state):
    start = i * block
    k = load(k_ref, start)  # [C, bk]
    v = load(v_ref, start)  # [C, dv]
    do = load(do_ref, start)  # [C, dv]
    q_decay, k_decay, state_decay, decay = cm.block_masks(log_decay, decay_ij, starts_ref, block, tokens, start)
    dscores = cm.dot(do, v, trans_b=True) * decay  # [C, C]
    dq = cm.dot(dscores.astype(compute_dtype), k)
    dq += cm.dot((do * q_decay[:, None]).astype(compute_dtype), state.astype(compute_dtype), trans_b=True)
    cm.store_block(dq_ref, start, block, dq.astype(dq_ref.dtype), rows, tokens)
    return state * state_decay + cm.dot((k * k_decay[:, None]).astype(compute_dtype), v, trans_a=True)

  jax.lax.fori_loop(0, cm.row_blocks(rows, tokens, block), body, state0)


def _reverse_sweep(ld_ref, starts_ref, dst_ref, rows, block, block_step):
  """The reverse sweep shared by the dK/dV, dV and dK kernels: block_step(load, store, masks, grad_state) ->
  grad_state runs on a row's blocks from the last to the first, starting from the end-state cotangent in
  dst_ref; returns the cotangent left at the row's start.

  In block_step, load(ref) reads this block of a row view, store(ref, value) writes it (both masked past the
  row's real tokens), and masks is `_common.block_masks` of this block.
  """
  log_decay = cm.read_log_decay(ld_ref)
  decay_ij = cm.intra_decay(log_decay, block)
  tokens = cm.row_tokens(rows)
  num_blocks = cm.row_blocks(rows, tokens, block)

  def body(j, grad_state):
    start = (num_blocks - 1 - j) * block
    load = lambda ref: cm.load_block(ref, start, block, rows, tokens)
    store = lambda ref, value: cm.store_block(ref, start, block, value.astype(ref.dtype), rows, tokens)
    masks = cm.block_masks(log_decay, decay_ij, starts_ref, block, tokens, start)
    return block_step(load, store, masks, grad_state)

  return jax.lax.fori_loop(0, num_blocks, body, dst_ref[...].astype(jnp.float32))


def _dkdv_kernel(*refs, block, rows, has_seg, compute_dtype):
  q_ref, k_ref, v_ref, do_ref, ld_ref = refs[:5]
  rest = list(refs[5:])
  starts_ref = rest.pop(0) if has_seg else None
  dst_ref, dk_ref, dv_ref, ds0_ref = rest

  def step(load, store, masks, grad_state):  # grad_state [dk, bv]
    q, k = load(q_ref), load(k_ref)  # [C, dk]
    v, do = load(v_ref), load(do_ref)  # [C, bv]
    q_decay, k_decay, state_decay, mask = masks
    gs = grad_state.astype(compute_dtype)
    # dV is stored before dS is formed: the two [C, C] products and the two accumulators are never live at
    # once (fewer registers spilled, `benchmarks/kernel_resources.py`).
    scores = cm.dot(q, k, trans_b=True) * mask  # [C, C]
    dv = cm.dot(scores.astype(compute_dtype), do, trans_a=True)
    dv += cm.dot((k * k_decay[:, None]).astype(compute_dtype), gs)
    store(dv_ref, dv)
    dscores = cm.dot(do, v, trans_b=True) * mask
    dk = cm.dot(dscores.astype(compute_dtype), q, trans_a=True)
    dk += cm.dot(v, gs, trans_b=True) * k_decay[:, None]
    store(dk_ref, dk)
    return grad_state * state_decay + cm.dot((q * q_decay[:, None]).astype(compute_dtype), do, trans_a=True)

  ds0_ref[...] = _reverse_sweep(ld_ref, starts_ref, dst_ref, rows, block, step)


def _dv_kernel(*refs, block, rows, has_seg, compute_dtype):
  """dV and d(initial state) for one value tile: G[:, tile] carried in reverse, as `_dkdv_kernel` without dK."""
  q_ref, k_ref, do_ref, ld_ref = refs[:4]
  rest = list(refs[4:])
  starts_ref = rest.pop(0) if has_seg else None
  dst_ref, dv_ref, ds0_ref = rest

  def step(load, store, masks, grad_state):  # grad_state [dk, bv]
    q, k = load(q_ref), load(k_ref)  # [C, dk]
    do = load(do_ref)  # [C, bv]
    q_decay, k_decay, state_decay, mask = masks
    scores = cm.dot(q, k, trans_b=True) * mask  # [C, C]
    dv = cm.dot(scores.astype(compute_dtype), do, trans_a=True)
    dv += cm.dot((k * k_decay[:, None]).astype(compute_dtype), grad_state.astype(compute_dtype))
    store(dv_ref, dv)
    return grad_state * state_decay + cm.dot((q * q_decay[:, None]).astype(compute_dtype), do, trans_a=True)

  ds0_ref[...] = _reverse_sweep(ld_ref, starts_ref, dst_ref, rows, block, step)


def _dk_kernel(*refs, block, rows, has_seg, compute_dtype):
  """dK for one key tile: G[tile, :] carried in reverse, as `_dkdv_kernel` without dV."""
  q_ref, v_ref, do_ref, ld_ref = refs[:4]
  rest = list(refs[4:])
  starts_ref = rest.pop(0) if has_seg else None
  dst_ref, dk_ref = rest

  def step(load, store, masks, grad_state):  # grad_state [bk, dv]
    q = load(q_ref)  # [C, bk]
    v, do = load(v_ref), load(do_ref)  # [C, dv]
    q_decay, k_decay, state_decay, mask = masks
    dscores = cm.dot(do, v, trans_b=True) * mask  # [C, C]
    dk = cm.dot(dscores.astype(compute_dtype), q, trans_a=True)
    dk += cm.dot(v, grad_state.astype(compute_dtype), trans_b=True) * k_decay[:, None]
    store(dk_ref, dk)
    return grad_state * state_decay + cm.dot((q * q_decay[:, None]).astype(compute_dtype), do, trans_a=True)

  _reverse_sweep(ld_ref, starts_ref, dst_ref, rows, block, step)


def _key_tile(block_k, dv):
  """Spec of a [rows, h, dk, dv] state's key tile of program (row, head, key tile)."""
  sq = cm.SQUEEZED
  return pl.BlockSpec((sq, sq, block_k, dv), lambda ri, hi, ki: (ri, hi, ki, 0))


def _value_tile(dk, block_v):
  """Spec of a [rows, h, dk, dv] state's value tile of program (row, head, value tile)."""
  sq = cm.SQUEEZED
  return pl.BlockSpec((sq, sq, dk, block_v), lambda ri, hi, vi: (ri, hi, 0, vi))


def _sweep_inputs(rows, arrays, specs, decay, starts, extra=()):
  """(args, in_specs) of a backward sweep, in its kernels' order: the row arrays with their specs, the decay
  row, the segment starts (when there are segments), then `extra` (array, spec) pairs (states)."""
  sq = cm.SQUEEZED
  args = list(arrays) + [decay]
  in_specs = list(specs) + [pl.BlockSpec((sq, cm.DECAY_LANES), lambda ri, hi, xi: (hi, 0))]
  if starts is not None:
    args.append(starts)
    in_specs.append(pl.BlockSpec((sq, rows.length), lambda ri, hi, xi: (ri, 0)))
  for array, spec in extra:
    args.append(array)
    in_specs.append(spec)
  return args, in_specs


def lightning_backward(q, k, v, log_decay, segment_index, initial_state, grad_out, grad_state, *, rows,
                       block, block_k, block_v, num_warps, num_stages, interpret, split_dkdv=False):
  """Gradients of the forward sweep (arrays and rows as `lightning_forward`); `split_dkdv`: the reverse sweep
  as separate dV and dK kernels (module docstring).

  grad_out [b, t, h, dv]; grad_state [b * splits, h, dk, dv] f32 (cotangent of
  each row's end state).  Returns (dq, dk, dv in the input dtypes, d_initial_state
  [b * splits, h, dk, dv] f32).
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  assert t == rows.seq_len and rows.length % block == 0 and dk % block_k == 0 and dv % block_v == 0
  sq = cm.SQUEEZED
  n = b * rows.splits
  has_seg = segment_index is not None
  has_init = initial_state is not None
  compute_dtype = jnp.float32 if q.dtype == jnp.float32 else q.dtype
  grad_out = grad_out.astype(v.dtype)
  starts = cm.segment_starts(segment_index.astype(jnp.int32), block) if has_seg else None
  decay = cm.decay_rows(log_decay)
  params = cm.compiler_params(num_warps, num_stages)

  # dQ: forward sweep over key tiles.
  init = [(initial_state.astype(jnp.float32), _key_tile(block_k, dv))] if has_init else []
  args, in_specs = _sweep_inputs(rows, [k, v, grad_out],
                                 [rows.spec(block_k, tiled=True), rows.spec(dv), rows.spec(dv)], decay, starts, init)
  args, vary = cm.match_varying(args)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block=block, rows=rows, has_seg=has_seg, has_init=has_init,
                        compute_dtype=compute_dtype),
      out_shape=cm.out_struct((b, t, h, dk), q.dtype, vary), grid=(n, h, dk // block_k),
      in_specs=in_specs, out_specs=rows.spec(block_k, tiled=True),
      compiler_params=params, interpret=interpret, name="lightning_bwd_dq")(*args)

  grad_state = grad_state.astype(jnp.float32)
  if split_dkdv:
    return (dq,) + _split_reverse_sweeps(q, k, v, grad_out, decay, starts, grad_state, rows=rows, block=block,
                                         block_k=block_k, block_v=block_v, compute_dtype=compute_dtype,
                                         params=params, interpret=interpret)

  # dK, dV, d(initial state): reverse sweep over value tiles.
  num_v = dv // block_v
  dk_dtype = k.dtype if num_v == 1 else jnp.float32
  value_tile = _value_tile(dk, block_v)
  args, in_specs = _sweep_inputs(
      rows, [q, k, v, grad_out],
      [rows.spec(dk), rows.spec(dk), rows.spec(block_v, tiled=True), rows.spec(block_v, tiled=True)],
      decay, starts, [(grad_state, value_tile)])
  args, vary = cm.match_varying(args)
  out_shape = [
      cm.out_struct((num_v, b, t, h, dk), dk_dtype, vary),
      cm.out_struct((b, t, h, dv), v.dtype, vary),
      cm.out_struct((n, h, dk, dv), jnp.float32, vary),
  ]
  s = rows.splits
  out_specs = [
      pl.BlockSpec((sq, sq, rows.length, sq, dk), lambda ri, hi, vi: (vi, ri // s, ri % s, hi, 0)),
      rows.spec(block_v, tiled=True),
      value_tile,
  ]
  dk_parts, dv_out, d_init = pl.pallas_call(
      functools.partial(_dkdv_kernel, block=block, rows=rows, has_seg=has_seg, compute_dtype=compute_dtype),
      out_shape=out_shape, grid=(n, h, num_v), in_specs=in_specs, out_specs=out_specs,
      compiler_params=params, interpret=interpret, name="lightning_bwd_dkdv")(*args)
  dk_out = dk_parts[0] if num_v == 1 else jnp.sum(dk_parts, axis=0).astype(k.dtype)
  return dq, dk_out, dv_out, d_init


def _split_reverse_sweeps(q, k, v, grad_out, decay, starts, grad_state, *, rows, block, block_k, block_v,
                          compute_dtype, params, interpret):
  """(dk, dv, d_initial_state) from the dV sweep over value tiles and the dK sweep over key tiles;
  grad_state [b * splits, h, dk, dv] float32."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  n = b * rows.splits
  kernel_args = dict(block=block, rows=rows, has_seg=starts is not None, compute_dtype=compute_dtype)

  value_tile = _value_tile(dk, block_v)
  args, in_specs = _sweep_inputs(rows, [q, k, grad_out],
                                 [rows.spec(dk), rows.spec(dk), rows.spec(block_v, tiled=True)], decay, starts,
                                 [(grad_state, value_tile)])
  args, vary = cm.match_varying(args)
  dv_out, d_init = pl.pallas_call(
      functools.partial(_dv_kernel, **kernel_args),
      out_shape=[cm.out_struct((b, t, h, dv), v.dtype, vary), cm.out_struct((n, h, dk, dv), jnp.float32, vary)],
      grid=(n, h, dv // block_v), in_specs=in_specs, out_specs=[rows.spec(block_v, tiled=True), value_tile],
      compiler_params=params, interpret=interpret, name="lightning_bwd_dv")(*args)

  args, in_specs = _sweep_inputs(rows, [q, v, grad_out],
                                 [rows.spec(block_k, tiled=True), rows.spec(dv), rows.spec(dv)], decay, starts,
                                 [(grad_state, _key_tile(block_k, dv))])
  args, vary = cm.match_varying(args)
  dk_out = pl.pallas_call(
      functools.partial(_dk_kernel, **kernel_args),
      out_shape=cm.out_struct((b, t, h, dk), k.dtype, vary),
      grid=(n, h, dk // block_k), in_specs=in_specs, out_specs=rows.spec(block_k, tiled=True),
      compiler_params=params, interpret=interpret, name="lightning_bwd_dk")(*args)
  return dk_out, dv_out, d_init
