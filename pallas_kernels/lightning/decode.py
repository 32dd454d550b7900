"""Decode kernel: one new token per sequence against the running state.

    S_new = lambda * S + k^T v,   o = q S_new

One program per (batch, head, value tile); the state tile is read once and
written once (in place when the caller donates it), so the kernel is bound by
HBM bandwidth on the float32 state.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm
from pallas_kernels.lightning.config import DEFAULT_CONFIG, LightningConfig


def _decode_kernel(q_ref, k_ref, v_ref, ld_ref, state_ref, o_ref, new_state_ref):
  lam = jnp.exp(cm.read_log_decay(ld_ref))
  q = q_ref[...].astype(jnp.float32)  # [dk]
  k = k_ref[...].astype(jnp.float32)  # [dk]
  v = v_ref[...].astype(jnp.float32)  # [bv]
  state = state_ref[...] * lam + k[:, None] * v[None, :]  # [dk, bv]
  new_state_ref[...] = state
  o_ref[...] = jnp.sum(q[:, None] * state, axis=0).astype(o_ref.dtype)


def lightning_decode(q, k, v, log_decay, state, *, config: LightningConfig | None = None, interpret: bool = False):
  """One decoding step for a batch of sequences.

  q, k [batch, heads, dk]; v [batch, heads, dv]; log_decay [heads];
  state [batch, heads, dk, dv] float32.  Returns (out [batch, heads, dv] in
  q.dtype, new_state [batch, heads, dk, dv] float32).  The state buffer is
  aliased to the new state, so donating it under jit updates it in place.
  """
  cfg = config or DEFAULT_CONFIG
  cm.check_backend(interpret)
  if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
    raise ValueError(f"lightning_decode expects q, k [b, h, dk] and v [b, h, dv]; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  b, h, dk = q.shape
  dv = v.shape[-1]
  if log_decay.shape != (h,):
    raise ValueError(f"log_decay must have shape ({h},), got {log_decay.shape}")
  if state.shape != (b, h, dk, dv):
    raise ValueError(f"state must have shape {(b, h, dk, dv)}, got {state.shape}")
  for name, size in (("dk", dk), ("dv", dv)):
    if size < 16 or size & (size - 1):
      raise ValueError(f"head dim {name} must be a power of two >= 16, got {size}")
  block_v = min(cfg.decode_block_v, dv)
  sq = cm.SQUEEZED
  args, vary = cm.match_varying([q, k, v, cm.decay_rows(log_decay), state.astype(jnp.float32)])
  out, new_state = pl.pallas_call(
      _decode_kernel,
      out_shape=[cm.out_struct((b, h, dv), q.dtype, vary), cm.out_struct((b, h, dk, dv), jnp.float32, vary)],
      grid=(b, h, dv // block_v),
      in_specs=[
          pl.BlockSpec((sq, sq, dk), lambda bi, hi, vi: (bi, hi, 0)),
          pl.BlockSpec((sq, sq, dk), lambda bi, hi, vi: (bi, hi, 0)),
          pl.BlockSpec((sq, sq, block_v), lambda bi, hi, vi: (bi, hi, vi)),
          pl.BlockSpec((sq, cm.DECAY_LANES), lambda bi, hi, vi: (hi, 0)),
          pl.BlockSpec((sq, sq, dk, block_v), lambda bi, hi, vi: (bi, hi, 0, vi)),
      ],
      out_specs=[
          pl.BlockSpec((sq, sq, block_v), lambda bi, hi, vi: (bi, hi, vi)),
          pl.BlockSpec((sq, sq, dk, block_v), lambda bi, hi, vi: (bi, hi, 0, vi)),
      ],
      input_output_aliases={4: 1},
      compiler_params=cm.compiler_params(cfg.decode_num_warps, 1),
      interpret=interpret, name="lightning_decode")(*args)
  return out, new_state
