"""The sequence split of the lightning kernels: the states-only kernels and the whole split path.

The states-only kernels are checked against their float64 formulas; the split
path (forced with LightningConfig(num_splits=k)) against the float64 loop
(outputs, final state) and autodiff of the recurrence (dq, dk, dv,
d_initial_state), on packed rows whose document boundaries fall on and off
the split edges, a split made only of padding, lengths not multiples of the
block and inputs at the presets' init scale (std 0.02).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import _common as cm
from mx01 import lightning as ref
from pallas_kernels.lightning import states
from tests.pallas_kernels.test_lightning_kernels import MODES, SMALL, numpy_lightning, rel_err

# Relative error ||x - ref|| / ||ref|| allowed per input dtype (bf16: inputs rounded, bf16 matmul operands).
STATE_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
OUT_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
GRAD_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}
BLOCK = SMALL.block_size


def edge_segments(seed, b, t, chunk_len):
  """[b, t] ids of random documents; even rows also cut at every split edge (and a length-1 document
  right after the first edge), odd rows never at an edge, so their documents run across the splits."""
  rng = np.random.default_rng(seed)
  edges = set(range(chunk_len, t, chunk_len))
  rows = []
  for r in range(b):
    cuts = set(int(c) for c in rng.choice(np.arange(1, t), size=min(4, t - 1), replace=False))
    cuts = cuts | edges | {chunk_len + 1} if r % 2 == 0 else cuts - edges
    starts = np.isin(np.arange(t), sorted(c for c in cuts if c < t))
    rows.append(5 + 2 * np.cumsum(starts))  # arbitrary, non-contiguous ids
  return jnp.asarray(np.stack(rows), jnp.int32)


def row_index(ids):
  """[rows, L] ids (-1 padding) -> running index from 0 per row, -1 on padding (the kernels' segment_index)."""
  idx = np.asarray(pk.chunk_states.segment_index(jnp.asarray(ids)))
  return np.where(ids >= 0, idx - idx[:, :1], -1)


# ---------------------------------------------------------------------------------------------- states-only kernels


def float64_local_sums(a, b, log_decay, seg, last):
  """sum over the last (first) segment of each row of lambda^(last - s) a_s^T b_s (lambda^(s+1) a_s^T b_s).

  a [rows, L, h, da], b [rows, L, h, db], seg [rows, L] (-1 padding) -> [rows, h, da, db] float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  lam = np.exp(np.asarray(log_decay, np.float64))
  out = np.zeros((a.shape[0], a.shape[2], a.shape[3], b.shape[3]))
  for r in range(a.shape[0]):
    real = np.flatnonzero(seg[r] >= 0)
    if not len(real):
      continue
    which = seg[r, real[-1]] if last else seg[r, 0]
    for s in real[seg[r, real] == which]:
      w = lam ** (real[-1] - s) if last else lam ** (s + 1)  # [h]
      out[r] += w[:, None, None] * np.einsum("hk,hv->hkv", a[r, s], b[r, s])
  return out


@pytest.mark.parametrize("interpret", MODES)
def test_states_only_kernels_match_float64(interpret):
  """Rows as the split makes them from one sequence of 133 tokens cut into 4 rows of 48: packed, unpacked, packed
  and ending in padding inside a block (37 real tokens), padding only (the kernels take the padding from the rows'
  real tokens, `_common.Rows`, and -1 in the segment index).  (bf16 inputs go through the same sweeps in the
  split-path cases below.)"""
  dtype = jnp.float32
  rows, length, h, dk, dv = 4, 3 * BLOCK, 2, 16, 32
  seq_len = 2 * length + 37
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.standard_normal((rows, length, h, dk)), dtype)
  b = jnp.asarray(rng.standard_normal((rows, length, h, dv)), dtype)
  ids = np.array(edge_segments(1, rows, length, BLOCK))
  ids[1] = 0  # a row that is one segment
  ids[2, 37:] = -1  # tail padding inside a block
  ids[3] = -1  # a split made only of padding
  seg = row_index(ids)
  as_sequence = lambda x: x.reshape(1, rows * length, *x.shape[2:])[:, :seq_len]
  log_decay = jnp.asarray(ref.minimax_log_decay(h, 1, 4))
  launch = dict(rows=cm.Rows(seq_len, length, rows), block=BLOCK, block_v=16, num_warps=4, num_stages=2,
                interpret=interpret)
  sweep = lambda fn, seg: jax.jit(functools.partial(fn, **launch))(as_sequence(a), as_sequence(b), log_decay, seg)
  got = sweep(states.local_states, jnp.asarray(seg))
  assert got.shape == (rows, h, dk, dv) and got.dtype == jnp.float32
  assert rel_err(got, float64_local_sums(a, b, log_decay, seg, last=True)) < STATE_TOL[dtype]
  np.testing.assert_array_equal(np.asarray(got[3]), 0.0)
  got = sweep(states.local_incoming_grad, jnp.asarray(seg))
  assert rel_err(got, float64_local_sums(a, b, log_decay, seg, last=False)) < STATE_TOL[dtype]
  np.testing.assert_array_equal(np.asarray(got[3]), 0.0)
  # Without segments the rows' real tokens mask the tail: 40 tokens read as one row of 48, its last block
  # overhanging the arrays (masked loads), and as rows of 16 (3 per sequence, the third partly past the end).
  want = float64_local_sums(a, b, log_decay, np.where(np.arange(length) < 40, 0, -1)[None].repeat(rows, 0), True)
  a40, b40 = a[:, :40], b[:, :40]
  got = jax.jit(functools.partial(states.local_states, **{**launch, "rows": cm.Rows(40, length)}))(
      a40, b40, log_decay, None)
  assert rel_err(got, want) < STATE_TOL[dtype]
  got = jax.jit(functools.partial(states.local_states, **{**launch, "rows": cm.Rows(40, BLOCK, 3)}))(
      a40, b40, log_decay, None)
  assert got.shape == (rows * 3, h, dk, dv)
  for piece in range(3):
    sl = slice(piece * BLOCK, min((piece + 1) * BLOCK, 40))
    real = np.zeros((rows, length), int) - 1
    real[:, : sl.stop - sl.start] = 0
    part = float64_local_sums(a[:, sl], b[:, sl], log_decay, real[:, : sl.stop - sl.start], True)
    assert rel_err(got[piece::3], part) < STATE_TOL[dtype], piece


# ---------------------------------------------------------------------------------------------- the split path


SPLIT_CASES = [
    # (t, num_splits, dtype, segments, initial state, dv); block 16, value tile 16
    (45, 3, jnp.float32, True, True, 32),     # cuts at both split edges and across them, tail padding
    (33, 4, jnp.float32, True, True, 16),     # the fourth split is padding only (rows of 16, 16, 1, 0 tokens)
    (64, 2, jnp.float32, False, True, 16),    # no segments, no padding
    (35, 4, jnp.float32, False, False, 16),   # no segments, rows of 16, 16, 3 and 0 real tokens
    (50, 2, jnp.bfloat16, True, True, 32),
    (61, 4, jnp.bfloat16, True, False, 16),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("t,splits,dtype,with_seg,with_init,dv", SPLIT_CASES)
def test_split_path_matches_reference(interpret, t, splits, dtype, with_seg, with_init, dv):
  check_split_path(interpret, t, splits, dtype, with_seg, with_init, dv, split_dkdv=False)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("t,splits,dtype,with_seg,with_init,dv", [SPLIT_CASES[i] for i in (0, 1, 5)])
def test_split_path_with_separate_dk_and_dv_sweeps(interpret, t, splits, dtype, with_seg, with_init, dv):
  check_split_path(interpret, t, splits, dtype, with_seg, with_init, dv, split_dkdv=True)


def check_split_path(interpret, t, splits, dtype, with_seg, with_init, dv, *, split_dkdv):
  b, h, dk = 2, 2, 16
  rng = np.random.default_rng(t * 10 + splits)
  # The presets' init scale: std 0.02 weights make q, k, v ~ 0.02.
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)) * 0.02, dtype) for d in (dk, dk, dv))
  init = jnp.asarray(rng.standard_normal((b, h, dk, dv)) * 1e-3, jnp.float32) if with_init else None
  chunk_len = -(-t // (splits * BLOCK)) * BLOCK
  seg = edge_segments(t + splits, b, t, chunk_len) if with_seg else None
  log_decay = jnp.asarray(ref.minimax_log_decay(h, 1, 8))
  cfg = dataclasses.replace(SMALL, num_splits=splits, bwd_split_dkdv=split_dkdv)
  w_out = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
  w_state = jnp.asarray(rng.standard_normal((b, h, dk, dv)) * 0.02, jnp.float32)

  def run(fn, q, k, v, init):
    return fn(q, k, v, log_decay, segment_ids=seg, initial_state=init)

  kernel = lambda *a, **kw: pk.lightning_attention(*a, **kw, config=cfg, interpret=interpret)

  @jax.jit  # interpret mode traces each kernel once instead of dispatching it op by op
  def outputs_and_grads(q, k, v, init):
    outs, vjp = jax.vjp(lambda *a: run(kernel, *a), q, k, v, init)
    return outs, vjp((w_out.astype(dtype), w_state))

  (out, state), got = outputs_and_grads(q, k, v, init)
  assert out.shape == (b, t, h, dv) and out.dtype == dtype and state.dtype == jnp.float32
  want_out, want_state = numpy_lightning(q, k, v, log_decay, seg, init)
  assert rel_err(out, want_out) < OUT_TOL[dtype]
  assert rel_err(state, want_state) < STATE_TOL[dtype]

  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("float32"):
    want = jax.jit(lambda *a: jax.vjp(lambda *a: run(ref.lightning_attention_recurrent, *a), *a)[1](
        (w_out, w_state)))(f32(q), f32(k), f32(v), init)
  for name, g, w in zip(("dq", "dk", "dv", "d_initial_state"), got, want):
    if name == "d_initial_state" and not with_init:
      assert g is None
      continue
    assert g.shape == w.shape and g.dtype == (jnp.float32 if name == "d_initial_state" else dtype), name
    err = rel_err(g, np.asarray(w, np.float64))
    assert err < GRAD_TOL[dtype], f"{name}: relative error {err:.2e}"


def test_split_path_lowers_inside_shard_map(monkeypatch):
  """The model runs the kernels inside shard_map (check_vma): forward and backward of the split path
  lower to Triton there, at head dim 128 (interpret mode cannot run under check_vma; no GPU needed)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from pallas_kernels import _common
  monkeypatch.setattr(_common, "check_backend", lambda interpret: None)
  b, t, h, d = 4, 200, 4, 128
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  cfg = pk.LightningConfig(num_splits=3)

  def grads(q, k, v, init, seg, log_decay):
    def loss(q, k, v, init):
      out, state = pk.lightning_attention(q, k, v, log_decay, segment_ids=seg, initial_state=init, config=cfg)
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state)
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, init)

  fn = jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=(P("data"),) * 5 + (P(),), out_specs=(P("data"),) * 4))
  S = jax.ShapeDtypeStruct
  rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  args = [S((b, t, h, d), jnp.bfloat16, sharding=rows)] * 3 + [
      S((b, h, d, d), jnp.float32, sharding=rows), S((b, t), jnp.int32, sharding=rows),
      S((h,), jnp.float32, sharding=rep)]
  try:
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  except TypeError as e:  # a jax without cross-platform lowering
    pytest.skip(f"cannot lower for cuda here: {e}")
  for name in ("lightning_local_states", "lightning_fwd", "lightning_local_incoming_grad", "lightning_bwd_dq",
               "lightning_bwd_dkdv"):
    assert name in text, name
