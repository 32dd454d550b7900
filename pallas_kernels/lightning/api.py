"""Lightning attention with Pallas kernels: the row layout, custom_vjp wiring, sequence splits.

`lightning_attention` matches the recurrence of mx01/lightning.py (its reference):

    S_t = lambda * S_{t-1} + k_t^T v_t,   o_t = q_t S_t,   lambda = exp(log_decay)

with state resets where `segment_ids` change, `initial_state` owned by each
row's first segment and the state after the last token returned.

Gradients: dq, dk, dv and d(initial_state) come from the backward kernels.
`log_decay` is treated as a constant (the model's decays are fixed, not
trained): its cotangent is zero.

Where batch * heads is too small to fill the GPU the sequence is cut into
super-chunks run as rows of their own (`_split_core`): a states-only sweep
(states.py) and the small combination of chunk_states give every row its
incoming state, and the forward kernel starts each row from it, so o is
written once; HBM traffic is k, v twice plus q read and o written (6 tensors
against the 4 of one unsplit sweep; on packed rows the states sweep reads only
each row's last segment).  The backward mirrors it: one extra sweep reads q
and dO (of each row's first segment) for the incoming-state cotangents; the
local states' gradient needs no pass of its own, as it enters the dK/dV sweep
as each row's end-state cotangent.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from pallas_kernels import _common as cm
from pallas_kernels.lightning import chunk_states
from pallas_kernels.lightning.bwd import lightning_backward
from pallas_kernels.lightning.config import DEFAULT_CONFIG, LightningConfig
from pallas_kernels.lightning.fwd import lightning_forward
from pallas_kernels.lightning.states import local_incoming_grad, local_states

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Below this many programs (one per (batch, head, value tile); about one wave on an
# H100's or H200's 132 SMs) the sequence is split into super-chunks, aiming at one full wave:
# on the H200 sweep, half the splits of a two-wave target were as fast or faster at every split row.
_MIN_PROGRAMS = 128
_TARGET_PROGRAMS = 132


class _Static(NamedTuple):
  rows: cm.Rows
  block: int
  block_v: int
  num_warps: int
  num_stages: int
  bwd_block: int
  bwd_block_k: int
  bwd_block_v: int
  bwd_num_warps: int
  bwd_num_stages: int
  bwd_split_dkdv: bool
  interpret: bool


def _launch(st: _Static, backward: bool) -> dict:
  """The launch settings of the forward or the backward kernels (a backward dK/dV sweep also takes block_k)."""
  if backward:
    return dict(rows=st.rows, block=st.bwd_block, block_v=st.bwd_block_v, num_warps=st.bwd_num_warps,
                num_stages=st.bwd_num_stages, interpret=st.interpret)
  return dict(rows=st.rows, block=st.block, block_v=st.block_v, num_warps=st.num_warps,
              num_stages=st.num_stages, interpret=st.interpret)


def _forward(q, k, v, log_decay, seg, init, st: _Static):
  return lightning_forward(q, k, v, log_decay, seg, init, **_launch(st, False))


def _backward(q, k, v, log_decay, seg, init, grad_out, grad_state, st: _Static):
  return lightning_backward(q, k, v, log_decay, seg, init, grad_out, grad_state, block_k=st.bwd_block_k,
                            split_dkdv=st.bwd_split_dkdv, **_launch(st, True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _lightning_core(q, k, v, log_decay, seg, init, st: _Static):
  return _forward(q, k, v, log_decay, seg, init, st)


def _core_fwd(q, k, v, log_decay, seg, init, st):
  return _forward(q, k, v, log_decay, seg, init, st), (q, k, v, log_decay, seg, init)


def _core_bwd(st, residuals, cotangents):
  q, k, v, log_decay, seg, init = residuals
  grad_out, grad_state = cotangents
  dq, dk, dv, d_init = _backward(q, k, v, log_decay, seg, init, grad_out, grad_state, st)
  d_init = None if init is None else d_init.astype(init.dtype)
  return dq, dk, dv, jnp.zeros_like(log_decay), None, d_init


_lightning_core.defvjp(_core_fwd, _core_bwd)


# ---------------------------------------------------------------------------------------------- sequence split
#
# The kernels see q, k, v [b, t, h, d] as b*n rows of L tokens (`_common.Rows`: the n super-chunks of each
# sequence, the last ones overhanging t where it is not a multiple of n*L).  Forward: `local_states` (reads k, v)
# gives each row's end state from zero; combine_chunk_states gives the state entering each row, kept only
# where the row's first token continues the segment that holds it (`enters`); the forward kernel then runs
# every row from that state and writes o once.  Backward, the mirror image: `local_incoming_grad` (reads q,
# dO) gives what each row's outputs send to its incoming state; the transposed combination gives each row's
# end-state cotangent; the backward kernels then run every row with its incoming state (dQ) and that
# end-state cotangent (dK, dV: through it the local states' gradient lands in dk, dv in the same sweep).


def _combine(local, chunk_decay, init, enters):
  """local [b*n, h, dk, dv] -> (states entering the rows [b*n, h, dk, dv] masked by enters, final [b, h, dk, dv])."""
  n = chunk_decay.shape[1]
  rows, h, dk, dv = local.shape
  states_in, final = chunk_states.combine_chunk_states(local.reshape(rows // n, n, h, dk, dv), chunk_decay, init)
  if enters is not None:
    states_in = jnp.where(enters[:, :, None, None, None], states_in, 0.0)
  return states_in.reshape(rows, h, dk, dv), final


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _split_core(q, k, v, log_decay, seg, chunk_decay, enters, init, st: _Static):
  return _split_fwd(q, k, v, log_decay, seg, chunk_decay, enters, init, st)[0]


def _split_fwd(q, k, v, log_decay, seg, chunk_decay, enters, init, st):
  local = local_states(k, v, log_decay, seg, **_launch(st, False))
  states_in, final = _combine(local, chunk_decay, init, enters)
  out, _ = _forward(q, k, v, log_decay, seg, states_in, st)
  return (out, final), (q, k, v, log_decay, seg, chunk_decay, enters, init, states_in)


def _split_bwd(st, residuals, cotangents):
  q, k, v, log_decay, seg, chunk_decay, enters, init, states_in = residuals
  grad_out, grad_final = cotangents
  d_in = local_incoming_grad(q, grad_out, log_decay, seg, **_launch(st, True))
  # _combine is linear in (local, init) for fixed decays: its transpose maps the incoming-state
  # cotangents and the final-state cotangent to the rows' end-state cotangents and d(initial state).
  init0 = jnp.zeros_like(grad_final) if init is None else init.astype(jnp.float32)
  _, transpose = jax.vjp(lambda local, s0: _combine(local, chunk_decay, s0, enters), jnp.zeros_like(d_in), init0)
  d_end, d_init = transpose((d_in, grad_final.astype(jnp.float32)))
  dq, dk, dv, _ = _backward(q, k, v, log_decay, seg, states_in, grad_out, d_end, st)
  d_init = None if init is None else d_init.astype(init.dtype)
  return dq, dk, dv, jnp.zeros_like(log_decay), None, jnp.zeros_like(chunk_decay), None, d_init


_split_core.defvjp(_split_fwd, _split_bwd)


def _pow2_floor(x: int) -> int:
  return 1 << (max(int(x), 1).bit_length() - 1)


def _pow2_ceil(x: int) -> int:
  return 1 << (max(int(x), 1) - 1).bit_length()


def _check_inputs(q, k, v, log_decay, segment_ids, initial_state):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, seq, heads, dim]; got q {q.shape}, k {k.shape}, v {v.shape}")
  if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q and k must have equal shapes and v the same [batch, seq, heads]; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLOAT_DTYPES:
    raise ValueError(f"q, k, v must share one dtype among float32/bfloat16/float16; got {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  for name, size in (("q/k head dim", dk), ("v head dim", dv)):
    if size < 16 or size & (size - 1):
      raise ValueError(f"{name} must be a power of two >= 16, got {size}")
  if t < 1:
    raise ValueError(f"sequence length must be >= 1, got {t}")
  if log_decay.shape != (h,):
    raise ValueError(f"log_decay must have shape ({h},), got {log_decay.shape}")
  if segment_ids is not None and (segment_ids.shape != (b, t) or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
    raise ValueError(f"segment_ids must be an integer array of shape {(b, t)}, got {segment_ids.dtype}"
                     f"{segment_ids.shape}")
  if initial_state is not None and initial_state.shape != (b, h, dk, dv):
    raise ValueError(f"initial_state must have shape {(b, h, dk, dv)}, got {initial_state.shape}")


def _segment_index(segment_ids, b, t, t_pad):
  """[b, t] ids -> [b, t_pad] int32 running index from 0, -1 on padding."""
  idx = chunk_states.segment_index(segment_ids)
  return jnp.pad(idx, ((0, 0), (0, t_pad - t)), constant_values=-1)


def _num_splits(cfg: LightningConfig, b, t, h, dv, block_v, block, interpret):
  if cfg.num_splits is not None:
    return cfg.num_splits
  programs = b * h * (dv // block_v)
  if interpret or programs >= _MIN_PROGRAMS:
    return 1
  wanted = _pow2_ceil(-(-_TARGET_PROGRAMS // programs))
  return max(1, min(wanted, _pow2_floor(t // (8 * block))))


def lightning_attention(q, k, v, log_decay, *, segment_ids=None, initial_state=None,
                        config: Optional[LightningConfig] = None,
                        interpret: bool = False) -> Tuple[jax.Array, jax.Array]:
  """Lightning attention on the Pallas kernels.

  q, k [batch, seq, heads, dk]; v [batch, seq, heads, dv]; log_decay [heads]
  (<= 0, treated as a constant); segment_ids [batch, seq] int or None;
  initial_state [batch, heads, dk, dv] or None.  Head dims: powers of two >= 16.
  Returns (out [batch, seq, heads, dv] in q.dtype, final_state [batch, heads, dk, dv] f32).

  Tiles come from `config` (default DEFAULT_CONFIG) as given; only a sequence
  shorter than a block runs on the smallest power-of-two block (>= 16) that
  holds it, which changes no result (padding is masked) and saves the padding.
  """
  cfg = config or DEFAULT_CONFIG
  cm.check_backend(interpret)
  _check_inputs(q, k, v, log_decay, segment_ids, initial_state)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  short = max(16, _pow2_ceil(t))
  block = min(cfg.block_size, short)
  bwd_block = min(cfg.backward_block_size, short)
  block_v = min(cfg.block_v, dv)
  splits = _num_splits(cfg, b, t, h, dv, block_v, block, interpret)

  # The stages are the tuned ones for 2-byte inputs; 4-byte inputs double every tile a stage holds, and at
  # head dim 128 a third stage no longer fits one SM's shared memory (264,704 of 232,448 bytes, measured).
  max_stages = 2 if jnp.dtype(q.dtype).itemsize > 2 else 8
  st = lambda rows: _Static(rows, block, block_v, cfg.num_warps, min(cfg.num_stages, max_stages), bwd_block,
                            min(cfg.bwd_block_k, dk), min(cfg.bwd_block_v, dv), cfg.bwd_num_warps,
                            min(cfg.bwd_num_stages, max_stages), cfg.bwd_split_dkdv, interpret)
  log_decay = log_decay.astype(jnp.float32)
  # The kernels read q, k, v and write o in place: a length that is not a multiple of the block (or of the
  # splits' rows) is masked inside them, with no padded copies.
  if splits == 1:
    t_pad = -(-t // block) * block
    # One row per sequence: the kernels need only where the ids change (`_common.segment_starts`), so the ids
    # go in as they are (the tail padding repeats the last id; the rows mask it anyway).
    seg = None if segment_ids is None else jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)),
                                                   mode="edge")
    return _lightning_core(q, k, v, log_decay, seg, initial_state, st(cm.Rows(t, t_pad)))

  # Super-chunks: each of `splits` pieces of chunk_len tokens is a row of its own (the last ones may be partly
  # or wholly past the end); segment ids restart from 0 in every row, so each row's first segment owns its
  # initial state.
  chunk_len = -(-t // (splits * block)) * block
  t_pad = splits * chunk_len
  lengths = chunk_states.chunk_lengths(t, splits, chunk_len)
  row_seg, bounds = None, None
  if segment_ids is not None:
    seg = _segment_index(segment_ids, b, t, t_pad).reshape(b, splits, chunk_len)
    per_row = seg.reshape(b * splits, chunk_len)
    row_seg = jnp.where(per_row >= 0, per_row - per_row[:, :1], -1)
    bounds = chunk_states.chunk_boundaries(seg, lengths)
  chunk_decay, enters = chunk_states.chunk_transitions(log_decay, bounds, lengths)
  return _split_core(q, k, v, log_decay, row_seg, chunk_decay, enters, initial_state,
                     st(cm.Rows(t, chunk_len, splits)))
