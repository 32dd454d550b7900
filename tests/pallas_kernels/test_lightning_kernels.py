"""Lightning attention Pallas kernels vs a float64 NumPy loop and the XLA reference.

On CPU every kernel runs in interpret mode; the `compiled` variants (marked
`gpu`) run the Triton kernels and skip unless the default backend is a GPU:
    pytest tests/pallas_kernels -q           # CPU: interpret mode
    pytest -m gpu tests/pallas_kernels -q    # GPU: compiled kernels
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from mx01 import lightning as ref

ON_GPU = jax.default_backend() == "gpu"
MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="compiled", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="compiled Pallas kernels need a GPU")]),
]

# Relative error ||x - ref|| / ||ref|| allowed per input dtype.
OUT_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
STATE_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
GRAD_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}

SMALL = pk.LightningConfig(block_size=16, block_v=16, bwd_block_k=16, bwd_block_v=16, decode_block_v=16)


def numpy_lightning(q, k, v, log_decay, segment_ids=None, initial_state=None):
  """The recurrence in float64 NumPy (mx01's reference loop): (out [b, t, h, dv], final_state [b, h, dk, dv])."""
  return ref.lightning_attention_numpy(q, k, v, log_decay, segment_ids=segment_ids, initial_state=initial_state)


def rel_err(x, y):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  y = np.asarray(y, np.float64)
  assert np.all(np.isfinite(x)), "non-finite values in kernel output"
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def make_inputs(seed, b, t, h, dk, dv, dtype, *, with_init=True, scale=0.5):
  rng = np.random.default_rng(seed)
  q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)) * scale, dtype) for _ in range(2))
  v = jnp.asarray(rng.standard_normal((b, t, h, dv)), dtype)
  init = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32) if with_init else None
  return q, k, v, init


def packed_segments(seed, b, t):
  """Random packing per row: several segments, always including length-1 ones."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(b):
    lengths = [1, 1] + list(rng.integers(1, max(2, t // 3), size=t))
    ids, seg_id = [], 7
    for length in rng.permutation(lengths):
      ids += [seg_id] * int(length)
      seg_id += int(rng.integers(1, 3))
    rows.append(ids[:t])
  return jnp.asarray(np.array(rows), jnp.int32)


# ---------------------------------------------------------------------------------------------- forward


# The sequence split (LightningConfig.num_splits) is tested in test_lightning_split.py.
FORWARD_CASES = [
    # (t, dtype, segments, initial state, heads)
    (5, jnp.float32, False, False, 2),      # shorter than one block
    (16, jnp.float32, False, True, 2),      # exactly one block
    (37, jnp.float32, True, True, 2),       # not a multiple, packed rows with length-1 segments
    (64, jnp.bfloat16, True, True, 2),
    (100, jnp.bfloat16, False, True, 3),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("t,dtype,with_seg,with_init,heads", FORWARD_CASES)
def test_forward_matches_numpy(interpret, t, dtype, with_seg, with_init, heads):
  b, dk, dv = 2, 16, 32
  q, k, v, init = make_inputs(t * 7 + heads, b, t, heads, dk, dv, dtype, with_init=with_init)
  seg = packed_segments(t, b, t) if with_seg else None
  log_decay = jnp.asarray(ref.minimax_log_decay(heads, 1, 4))
  # Under jit: interpret mode traces each kernel once instead of dispatching it op by op (3x faster on a CPU).
  out, state = jax.jit(functools.partial(pk.lightning_attention, config=SMALL, interpret=interpret))(
      q, k, v, log_decay, segment_ids=seg, initial_state=init)
  assert out.shape == (b, t, heads, dv) and out.dtype == q.dtype
  assert state.shape == (b, heads, dk, dv) and state.dtype == jnp.float32
  want_out, want_state = numpy_lightning(q, k, v, log_decay, seg, init)
  assert rel_err(out, want_out) < OUT_TOL[dtype]
  assert rel_err(state, want_state) < STATE_TOL[dtype]
  # Same answer as the XLA block-wise reference (in full float32: XLA's GPU default for float32 dots is TF32).
  with jax.default_matmul_precision("float32"):
    ref_out, _ = jax.jit(functools.partial(ref.lightning_attention_chunked, block_size=16))(
        q, k, v, log_decay, segment_ids=seg, initial_state=init)
  assert rel_err(out, np.asarray(ref_out, np.float64)) < 2 * OUT_TOL[dtype]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("heads,layer", [(1, 0), (8, 0), (64, 0), (64, 79)])
def test_model_decay_rates(interpret, heads, layer):
  """Per-head decays of the real model, from the fastest (lambda ~ 0.4) to nearly 1."""
  b, t, dk, dv = 1, 40, 16, 16
  q, k, v, init = make_inputs(heads + layer, b, t, heads, dk, dv, jnp.float32)
  log_decay = jnp.asarray(ref.minimax_log_decay(heads, layer, 80))
  out, state = pk.lightning_attention(q, k, v, log_decay, initial_state=init, config=SMALL, interpret=interpret)
  want_out, want_state = numpy_lightning(q, k, v, log_decay, None, init)
  assert rel_err(out, want_out) < OUT_TOL[jnp.float32]
  assert rel_err(state, want_state) < STATE_TOL[jnp.float32]


def test_preset_init_scale():
  """Inputs at the presets' initialisation scale (std 0.02 weights give q, k, v ~ 0.02), real decays, packed rows."""
  b, t, h, dk, dv = 2, 45, 4, 16, 32
  rng = np.random.default_rng(t)
  q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)) * 0.02, jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.standard_normal((b, t, h, dv)) * 0.02, jnp.float32)
  init = jnp.asarray(rng.standard_normal((b, h, dk, dv)) * 1e-3, jnp.float32)
  seg = packed_segments(t + 5, b, t)
  log_decay = jnp.asarray(ref.minimax_log_decay(h, 5, 40))
  out, state = jax.jit(functools.partial(pk.lightning_attention, config=SMALL, interpret=True))(
      q, k, v, log_decay, segment_ids=seg, initial_state=init)
  want_out, want_state = numpy_lightning(q, k, v, log_decay, seg, init)
  assert rel_err(out, want_out) < OUT_TOL[jnp.float32]
  assert rel_err(state, want_state) < STATE_TOL[jnp.float32]


def test_model_registry_uses_the_kernel_config():
  """ModelConfig.lightning_kernel reaches the kernels: its tile is used as given, the XLA block_size is not theirs."""
  import dataclasses

  from mx01 import ops
  from mx01.config import ModelConfig
  q, k, v, init = make_inputs(3, 1, 40, 2, 16, 16, jnp.float32)
  log_decay = jnp.asarray(ref.minimax_log_decay(2, 0, 2))
  want_out, want_state = numpy_lightning(q, k, v, log_decay, None, init)
  cfg = ModelConfig(lightning_impl="pallas", block_size=256, lightning_kernel=SMALL)
  lightning = ops.lightning_op(cfg, interpret=True)
  out, state = lightning(q, k, v, log_decay, block_size=cfg.block_size, initial_state=init)
  assert rel_err(out, want_out) < 1e-5 and rel_err(state, want_state) < 1e-5
  # The tile the kernels cannot hold is refused with the fix, not reduced.
  with pytest.raises(pk.ConfigError, match="block_size=256 exceeds 128.*lightning_impl='xla'"):
    dataclasses.replace(cfg.lightning_kernel, block_size=256)


# ---------------------------------------------------------------------------------------------- gradients


GRAD_CASES = [
    # (t, dtype, segments, heads)
    (32, jnp.float32, False, 2),
    (37, jnp.float32, True, 2),
    (40, jnp.bfloat16, True, 2),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("t,dtype,with_seg,heads", GRAD_CASES)
@pytest.mark.parametrize("split_dkdv", [False, True], ids=["dkdv", "dk+dv"])
def test_gradients_match_reference(interpret, t, dtype, with_seg, heads, split_dkdv):
  """Gradients against autodiff of the recurrence; "dk+dv": the reverse sweep as separate dV and dK kernels
  (dk 16 in one key tile, dv 32 in two value tiles of 16)."""
  b, dk, dv = 2, 16, 32
  q, k, v, init = make_inputs(100 + t, b, t, heads, dk, dv, dtype)
  seg = packed_segments(t + 1, b, t) if with_seg else None
  log_decay = jnp.asarray(ref.minimax_log_decay(heads, 2, 8))
  rng = np.random.default_rng(t)
  w_out = jnp.asarray(rng.standard_normal((b, t, heads, dv)), jnp.float32)
  w_state = jnp.asarray(rng.standard_normal((b, heads, dk, dv)), jnp.float32)

  def loss(fn, q, k, v, init):
    out, state = fn(q, k, v, log_decay, segment_ids=seg, initial_state=init)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(state * w_state)

  config = dataclasses.replace(SMALL, bwd_split_dkdv=split_dkdv)
  kernel = lambda *a, **kw: pk.lightning_attention(*a, **kw, config=config, interpret=interpret)
  got = jax.jit(jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2, 3)))(q, k, v, init)
  # Reference gradients: autodiff of the recurrence on float32 copies of the same inputs.
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("float32"):
    want = jax.grad(lambda *a: loss(ref.lightning_attention_recurrent, *a), argnums=(0, 1, 2, 3))(
        f32(q), f32(k), f32(v), init)
  for name, g, w in zip(("dq", "dk", "dv", "d_initial_state"), got, want):
    assert g.shape == w.shape, name
    err = rel_err(g, np.asarray(w, np.float64))
    assert err < GRAD_TOL[dtype], f"{name}: relative error {err:.2e}"


def test_log_decay_gets_zero_cotangent():
  q, k, v, _ = make_inputs(5, 1, 16, 2, 16, 16, jnp.float32, with_init=False)
  log_decay = jnp.asarray(ref.minimax_log_decay(2, 0, 2))
  g = jax.grad(lambda ld: jnp.sum(pk.lightning_attention(q, k, v, ld, config=SMALL, interpret=True)[0]))(log_decay)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---------------------------------------------------------------------------------------------- prefill + decode


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_matches_reference(interpret, dtype):
  b, h, dk, dv = 3, 4, 16, 32
  rng = np.random.default_rng(11)
  q, k = (jnp.asarray(rng.standard_normal((b, h, dk)), dtype) for _ in range(2))
  v = jnp.asarray(rng.standard_normal((b, h, dv)), dtype)
  state = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
  log_decay = jnp.asarray(ref.minimax_log_decay(h, 0, 4))
  out, new_state = pk.lightning_decode(q, k, v, log_decay, state, config=SMALL, interpret=interpret)
  want_out, want_state = numpy_lightning(q[:, None], k[:, None], v[:, None], log_decay, None, state)
  assert out.dtype == dtype and new_state.dtype == jnp.float32
  assert rel_err(out, want_out[:, 0]) < OUT_TOL[dtype]
  assert rel_err(new_state, want_state) < 1e-6


@pytest.mark.parametrize("interpret", MODES)
def test_chunked_prefill_then_decode(interpret):
  """A prompt in 3 uneven pieces equals one call; decoding token by token continues it exactly."""
  b, t, h, dk, dv, steps = 2, 41, 2, 16, 16, 4
  q, k, v, init = make_inputs(21, b, t + steps, h, dk, dv, jnp.float32)
  log_decay = jnp.asarray(ref.minimax_log_decay(h, 0, 4))
  run = lambda q_, k_, v_, s: pk.lightning_attention(q_, k_, v_, log_decay, initial_state=s, config=SMALL,
                                                     interpret=interpret)
  whole_out, whole_state = run(q[:, :t], k[:, :t], v[:, :t], init)
  outs, state = [], init
  for lo, hi in ((0, 13), (13, 14), (14, t)):
    o, state = run(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], state)
    outs.append(o)
  assert rel_err(jnp.concatenate(outs, axis=1), np.asarray(whole_out, np.float64)) < 1e-5
  assert rel_err(state, np.asarray(whole_state, np.float64)) < 1e-5

  want_out, _ = numpy_lightning(q, k, v, log_decay, None, init)
  for i in range(steps):
    o, state = pk.lightning_decode(q[:, t + i], k[:, t + i], v[:, t + i], log_decay, state, config=SMALL,
                                   interpret=interpret)
    assert rel_err(o, want_out[:, t + i]) < 1e-5


# ---------------------------------------------------------------------------------------------- chunk states


@pytest.mark.parametrize("block", [4, 16])
def test_segment_starts_match_numpy(block):
  """The kernels' per-token segment starts (offset in the token's block, -1 when the segment came in from an
  earlier block or is the row's first) against a plain loop, on packed rows with length-1 documents."""
  from pallas_kernels import _common
  seg = np.asarray(pk.chunk_states.segment_index(packed_segments(5, 3, 80)))  # rows of whole blocks
  got = np.asarray(_common.segment_starts(jnp.asarray(seg), block))
  want = np.full(seg.shape, -1)
  for r in range(seg.shape[0]):
    start = 0
    for p in range(seg.shape[1]):
      if p > 0 and seg[r, p] != seg[r, p - 1]:
        start = p
      if start > 0 and start // block == p // block:
        want[r, p] = start - p // block * block
  np.testing.assert_array_equal(got, want)
  assert (got >= 0).any() and (got < 0).any()


def test_combine_chunk_states_matches_sequential():
  rng = np.random.default_rng(4)
  b, n, h, dk, dv = 2, 5, 3, 4, 6
  local = jnp.asarray(rng.standard_normal((b, n, h, dk, dv)), jnp.float32)
  decay = jnp.asarray(rng.uniform(0, 1, (b, n, h)), jnp.float32)
  init = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
  states_in, final = pk.chunk_states.combine_chunk_states(local, decay, init)
  s = np.asarray(init, np.float64)
  for j in range(n):
    np.testing.assert_allclose(np.asarray(states_in[:, j]), s, rtol=1e-5, atol=1e-5)
    s = np.asarray(decay[:, j], np.float64)[..., None, None] * s + np.asarray(local[:, j], np.float64)
  np.testing.assert_allclose(np.asarray(final), s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,chunk,with_seg", [(45, 8, True), (45, 16, False), (30, 16, True)])
def test_chunk_states_rebuild_the_float64_loop(t, chunk, with_seg):
  """Chunks run independently from zero (float64 loop per chunk), then chunk_states joins them:
  equals the float64 loop over the whole row (tail padding, length-1 segments, an initial state), with gradients."""
  cs = pk.chunk_states
  b, h, dk, dv = 2, 3, 4, 5
  n = -(-t // chunk)
  q, k, v, init = make_inputs(t + chunk, b, t, h, dk, dv, jnp.float32, scale=0.02)
  v = v * 0.02
  seg = packed_segments(t, b, t) if with_seg else None
  log_decay = jnp.asarray(ref.minimax_log_decay(h, 1, 4))
  lengths = cs.chunk_lengths(t, n, chunk)
  pad = n * chunk - t
  seg_np = None if seg is None else np.pad(np.asarray(seg), ((0, 0), (0, pad)), constant_values=-1)
  # Local pass: every chunk's real tokens from a zero state, in float64.
  local_out = np.zeros((b, n * chunk, h, dv))
  local_states = np.zeros((b, n, h, dk, dv))
  for j in range(n):
    sl = slice(j * chunk, j * chunk + int(lengths[j]))
    o, s = numpy_lightning(q[:, sl], k[:, sl], v[:, sl], log_decay, None if seg is None else seg[:, sl])
    local_out[:, sl], local_states[:, j] = o, s
  seg_c = None if seg_np is None else jnp.asarray(seg_np.reshape(b, n, chunk))

  def joined(q, local_states, init):
    bounds = None if seg_c is None else cs.chunk_boundaries(seg_c, lengths)
    decay, enters = cs.chunk_transitions(log_decay, bounds, lengths)
    states_in, final = cs.combine_chunk_states(local_states, decay, init)
    mask = cs.incoming_mask(seg_c, enters, lengths)
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, h, dk)
    return cs.apply_incoming_states(qc, states_in, log_decay, mask).reshape(b, n * chunk, h, dv)[:, :t], final

  extra, final = jax.jit(joined)(q, jnp.asarray(local_states, jnp.float32), init)
  want_out, want_state = numpy_lightning(q, k, v, log_decay, seg, init)
  assert rel_err(np.asarray(extra, np.float64) + local_out[:, :t], want_out) < 1e-5
  assert rel_err(final, want_state) < 1e-5
  # Differentiable: gradients of the joined pass equal float64 finite differences along a random direction.
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
  loss = lambda q, ls, s0: jnp.sum(joined(q, ls, s0)[0] * w) + jnp.sum(joined(q, ls, s0)[1] ** 2)
  args = (q, jnp.asarray(local_states, jnp.float32), init)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)  # compiled: op by op it takes minutes on a CPU
  dirs = [jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in args]
  jax.config.update("jax_enable_x64", True)
  try:
    f64 = lambda x: jnp.asarray(x, jnp.float64)
    w64 = f64(w)
    loss64 = jax.jit(lambda *a: jnp.sum(joined(*a)[0] * w64) + jnp.sum(joined(*a)[1] ** 2))
    eps = 1e-6
    plus = loss64(*(f64(a) + eps * f64(d) for a, d in zip(args, dirs)))
    minus = loss64(*(f64(a) - eps * f64(d) for a, d in zip(args, dirs)))
    numeric = float((plus - minus) / (2 * eps))
  finally:
    jax.config.update("jax_enable_x64", False)
  analytic = sum(float(jnp.sum(g * d)) for g, d in zip(grads, dirs))
  assert abs(analytic - numeric) <= 1e-4 * max(abs(numeric), 1.0)


# ---------------------------------------------------------------------------------------------- errors


def test_config_validation_names_the_value():
  with pytest.raises(pk.ConfigError, match="bwd_block_size=64 exceeds block_size=32"):
    pk.LightningConfig(block_size=32, bwd_block_size=64)
  with pytest.raises(ValueError, match="block_size.*48"):
    pk.LightningConfig(block_size=48)
  with pytest.raises(ValueError, match="num_warps.*3"):
    pk.LightningConfig(num_warps=3)
  with pytest.raises(ValueError, match="num_splits.*0"):
    pk.LightningConfig(num_splits=0)
  with pytest.raises(ValueError, match="block_v.*8"):
    pk.LightningConfig(block_v=8)


def test_bad_inputs_raise():
  q, k, v, _ = make_inputs(0, 1, 8, 2, 16, 16, jnp.float32, with_init=False)
  ld = jnp.zeros((2,), jnp.float32)
  call = lambda *a, **kw: pk.lightning_attention(*a, **kw, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    call(q[..., :12], k[..., :12], v, ld)
  with pytest.raises(ValueError, match="dtype"):
    call(q.astype(jnp.bfloat16), k, v, ld)
  with pytest.raises(ValueError, match="log_decay"):
    call(q, k, v, jnp.zeros((3,)))
  with pytest.raises(ValueError, match="segment_ids"):
    call(q, k, v, ld, segment_ids=jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match="initial_state"):
    call(q, k, v, ld, initial_state=jnp.zeros((1, 2, 16, 8)))
  with pytest.raises(ValueError, match="state"):
    pk.lightning_decode(q[:, 0], k[:, 0], v[:, 0], ld, jnp.zeros((1, 2, 16, 8)), interpret=True)
  if not ON_GPU:
    with pytest.raises(ValueError, match="interpret=True"):
      pk.lightning_attention(q, k, v, ld)


# ---------------------------------------------------------------------------------------------- lowering


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_lower_to_triton(dtype, monkeypatch):
  """Forward, backward (one dK/dV sweep or separate ones), split-path and decode kernels pass the Triton lowering
  at head dim 128 (no GPU needed)."""
  from pallas_kernels import _common
  monkeypatch.setattr(_common, "check_backend", lambda interpret: None)
  S = jax.ShapeDtypeStruct
  b, t, h, d = 2, 200, 4, 128

  def lowered(config):
    def fwd_bwd(q, k, v, ld, seg, s0):
      def loss(q, k, v, s0):
        out, state = pk.lightning_attention(q, k, v, ld, segment_ids=seg, initial_state=s0, config=config)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state)
      return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s0)
    args = [S((b, t, h, d), dtype)] * 3 + [S((h,), jnp.float32), S((b, t), jnp.int32), S((b, h, d, d), jnp.float32)]
    return jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

  try:
    text = lowered(None)
  except TypeError as e:  # a jax without cross-platform lowering
    pytest.skip(f"cannot lower for cuda here: {e}")
  assert text.count("triton") >= 3
  text = lowered(pk.LightningConfig(num_splits=3))
  for name in ("lightning_local_states", "lightning_fwd", "lightning_local_incoming_grad", "lightning_bwd_dq",
               "lightning_bwd_dkdv"):
    assert name in text, name
  text = lowered(pk.LightningConfig(bwd_split_dkdv=True))
  assert "lightning_bwd_dv" in text and "lightning_bwd_dk\"" in text and "lightning_bwd_dkdv" not in text
  decode = lambda q, k, v, ld, s: pk.lightning_decode(q, k, v, ld, s)
  dargs = [S((8, h, d), dtype)] * 3 + [S((h,), jnp.float32), S((8, h, d, d), jnp.float32)]
  assert "triton" in jax.jit(decode).trace(*dargs).lower(lowering_platforms=("cuda",)).as_text()


# ---------------------------------------------------------------------------------------------- GPU sizes


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="compiled Pallas kernels need a GPU")
@pytest.mark.parametrize("splits", [None, 5], ids=["auto", "split5"])
@pytest.mark.parametrize("d,dtype", [(64, jnp.bfloat16), (128, jnp.bfloat16), (128, jnp.float32)])
def test_model_sized_heads_on_gpu(d, dtype, splits):
  """Default tiles at model head dims; `split5` forces the sequence split (rows of 256, 256, 256, 232 real tokens
  and one of padding only)."""
  b, t, h = 2, 1000, 4
  attention = functools.partial(pk.lightning_attention, config=pk.LightningConfig(num_splits=splits))
  q, k, v, init = make_inputs(d, b, t, h, d, d, dtype, scale=d ** -0.5)
  seg = packed_segments(9, b, t)
  log_decay = jnp.asarray(ref.minimax_log_decay(h, 3, 8))
  rng = np.random.default_rng(1)
  w_out = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)

  def loss(fn, q, k, v, init):
    out, state = fn(q, k, v, log_decay, segment_ids=seg, initial_state=init)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(state)

  out, state = attention(q, k, v, log_decay, segment_ids=seg, initial_state=init)
  want_out, want_state = numpy_lightning(q, k, v, log_decay, seg, init)
  assert rel_err(out, want_out) < OUT_TOL[dtype]
  assert rel_err(state, want_state) < STATE_TOL[dtype]
  got = jax.grad(lambda *a: loss(attention, *a), argnums=(0, 1, 2, 3))(q, k, v, init)
  f32 = lambda x: x.astype(jnp.float32)
  chunked = lambda *a, **kw: ref.lightning_attention_chunked(*a, **kw, block_size=64)
  with jax.default_matmul_precision("float32"):
    want = jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2, 3))(f32(q), f32(k), f32(v), init)
  for name, g, w in zip(("dq", "dk", "dv", "d_initial_state"), got, want):
    err = rel_err(g, np.asarray(w, np.float64))
    assert err < GRAD_TOL[dtype], f"{name}: relative error {err:.2e}"
