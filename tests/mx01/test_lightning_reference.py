"""The lightning attention reference: recurrent oracle, block-wise form and a float64 NumPy loop agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mx01.lightning import (lightning_attention_chunked, lightning_attention_numpy, lightning_attention_recurrent,
                            lightning_decode_step, minimax_log_decay)

# float32 compute against float64 truth: errors grow with length and state magnitude.
F32_ATOL = 2e-4
F32_RTOL = 2e-4


def _inputs(seed, b=2, t=37, h=3, dk=8, dv=6, segments=True, init=True):
  rng = np.random.default_rng(seed)
  q, k = (rng.standard_normal((b, t, h, dk)).astype(np.float32) * 0.5 for _ in range(2))
  v = rng.standard_normal((b, t, h, dv)).astype(np.float32)
  log_decay = -rng.uniform(0.005, 1.5, h).astype(np.float32)
  seg = None
  if segments:
    # Several segments per row, including length-1 segments.
    cuts = np.sort(rng.choice(np.arange(1, t), size=min(5, t - 1), replace=False))
    seg = np.stack([np.searchsorted(cuts, np.arange(t), side="right") + 1 for _ in range(b)]).astype(np.int32)
    seg[0, 3] = seg[0, 2] + 100 if t > 4 else seg[0, 3]  # a length-1 segment
    seg[0, 4:] += 200
  s0 = rng.standard_normal((b, h, dk, dv)).astype(np.float32) if init else None
  return q, k, v, log_decay, seg, s0


@pytest.mark.parametrize("t,block", [(5, 16), (16, 16), (37, 16), (64, 16), (37, 1), (37, 37)])
@pytest.mark.parametrize("segments,init", [(False, False), (True, True), (True, False)])
def test_chunked_and_recurrent_match_numpy(t, block, segments, init):
  q, k, v, ld, seg, s0 = _inputs(t * 7 + block, t=t, segments=segments, init=init)
  want_o, want_s = lightning_attention_numpy(q, k, v, ld, segment_ids=seg, initial_state=s0)
  args = [jnp.asarray(x) for x in (q, k, v, ld)]
  kw = dict(segment_ids=None if seg is None else jnp.asarray(seg), initial_state=None if s0 is None else jnp.asarray(s0))
  for fn in (lambda: lightning_attention_chunked(*args, block_size=block, **kw),
             lambda: lightning_attention_recurrent(*args, **kw)):
    o, s = fn()
    np.testing.assert_allclose(o, want_o, atol=F32_ATOL, rtol=F32_RTOL)
    np.testing.assert_allclose(s, want_s, atol=F32_ATOL, rtol=F32_RTOL)


def test_segments_do_not_interact():
  """Packing two documents in one row equals running them separately."""
  q, k, v, ld, _, _ = _inputs(3, b=1, t=40, segments=False, init=False)
  seg = np.array([[1] * 23 + [2] * 17], np.int32)
  o, _ = lightning_attention_chunked(q, k, v, ld, block_size=16, segment_ids=seg)
  o1, _ = lightning_attention_chunked(q[:, :23], k[:, :23], v[:, :23], ld, block_size=16)
  o2, s2 = lightning_attention_chunked(q[:, 23:], k[:, 23:], v[:, 23:], ld, block_size=16)
  np.testing.assert_allclose(o[:, :23], o1, atol=1e-5)
  np.testing.assert_allclose(o[:, 23:], o2, atol=1e-5)


def test_real_model_decays_long_sequence():
  """The decay rates of MiniMax-Text-01's first and last lightning layers, over many blocks."""
  rng = np.random.default_rng(0)
  h = 8
  for layer in (0, 78):
    ld = minimax_log_decay(h, layer, 80)
    q, k, v = (rng.standard_normal((1, 300, h, 4)).astype(np.float32) * 0.3 for _ in range(3))
    want_o, want_s = lightning_attention_numpy(q, k, v, ld)
    o, s = lightning_attention_chunked(q, k, v, ld, block_size=32)
    scale = np.abs(want_o).max()
    np.testing.assert_allclose(o / scale, want_o / scale, atol=2e-5)
    np.testing.assert_allclose(s, want_s, atol=1e-3 * np.abs(want_s).max())


def test_minimax_log_decay_values():
  ld = minimax_log_decay(64, 0, 80)
  # ALiBi slopes 2^(-8 (h+1) / H) at depth factor 1 + 1e-5.
  np.testing.assert_allclose(-ld, (2.0 ** (-8.0 * (np.arange(64) + 1) / 64)) * (1 + 1e-5), rtol=1e-6)
  assert np.all(np.abs(minimax_log_decay(64, 79, 80)) < 1e-4 * np.abs(ld))  # last layer barely decays


def test_gradients_chunked_vs_recurrent():
  q, k, v, ld, seg, s0 = _inputs(11, t=29, segments=True, init=True)
  rng = np.random.default_rng(1)
  w_o = jnp.asarray(rng.standard_normal((2, 29, 3, 6)).astype(np.float32))
  w_s = jnp.asarray(rng.standard_normal(s0.shape).astype(np.float32))

  def loss(fn):
    def f(q, k, v, s0):
      o, s = fn(q, k, v, jnp.asarray(ld), segment_ids=jnp.asarray(seg), initial_state=s0)
      return jnp.sum(o * w_o) + jnp.sum(s * w_s)
    return f

  chunked = lambda *a, **kw: lightning_attention_chunked(*a, block_size=8, **kw)  # noqa: E731
  g1 = jax.grad(loss(chunked), argnums=(0, 1, 2, 3))(q, k, v, s0)
  g2 = jax.grad(loss(lightning_attention_recurrent), argnums=(0, 1, 2, 3))(q, k, v, s0)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=5e-4, rtol=5e-4)


def test_gradients_vs_finite_differences():
  jax.config.update("jax_enable_x64", True)
  try:
    q, k, v, ld, seg, s0 = _inputs(5, b=1, t=11, h=2, dk=3, dv=2, segments=True, init=True)
    f64 = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731
    fn = lambda q, k, v, s0: lightning_attention_chunked(  # noqa: E731
        q, k, v, f64(ld), block_size=4, segment_ids=jnp.asarray(seg), initial_state=s0)
    jax.test_util.check_grads(lambda *a: jnp.sum(jnp.sin(fn(*a)[0])) + jnp.sum(fn(*a)[1] ** 2),
                              tuple(f64(x) for x in (q, k, v, s0)), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)
  finally:
    jax.config.update("jax_enable_x64", False)


def test_bfloat16_inputs():
  q, k, v, ld, seg, s0 = _inputs(2, t=40, segments=True, init=False)
  want_o, _ = lightning_attention_numpy(q, k, v, ld, segment_ids=seg)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  o, s = lightning_attention_chunked(bf(q), bf(k), bf(v), ld, block_size=16, segment_ids=seg)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  # bf16 inputs (8 mantissa bits): errors of a few percent of the output scale.
  np.testing.assert_allclose(np.asarray(o, np.float32), want_o, atol=0.03 * np.abs(want_o).max())


def test_chunked_prefill_then_decode_equals_full():
  q, k, v, ld, _, _ = _inputs(9, b=2, t=30, segments=False, init=False)
  full, full_s = lightning_attention_chunked(q, k, v, ld, block_size=8)
  o1, s = lightning_attention_chunked(q[:, :13], k[:, :13], v[:, :13], ld, block_size=8)
  o2, s = lightning_attention_chunked(q[:, 13:25], k[:, 13:25], v[:, 13:25], ld, block_size=8, initial_state=s)
  outs = [o1, o2]
  for j in range(25, 30):
    o, s = lightning_decode_step(q[:, j], k[:, j], v[:, j], ld, s)
    outs.append(o[:, None])
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)
  np.testing.assert_allclose(s, full_s, atol=1e-4)


def test_bad_shapes_raise():
  q, k, v, ld, _, _ = _inputs(0, segments=False, init=False)
  with pytest.raises(AssertionError):
    lightning_attention_chunked(q, k[:, :5], v, ld)
  with pytest.raises(AssertionError):
    lightning_attention_chunked(q, k, v, ld[:2])


@pytest.mark.parametrize("t,block", [(45, 16), (130, 32)])
def test_chunked_at_preset_init_scale(t, block):
  """Inputs at the presets' initialisation scale (std 0.02 weights: q, k, v ~ 0.02), real decays, packed rows."""
  rng = np.random.default_rng(t)
  b, h, dk, dv = 2, 4, 16, 16
  q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) * 0.02 for d in (dk, dk, dv))
  ld = minimax_log_decay(h, 3, 8)
  seg = np.sort(rng.integers(0, 4, (b, t)), axis=1).astype(np.int32)
  s0 = rng.standard_normal((b, h, dk, dv)).astype(np.float32) * 1e-3
  want_o, want_s = lightning_attention_numpy(q, k, v, ld, segment_ids=seg, initial_state=s0)
  o, s = lightning_attention_chunked(*(jnp.asarray(x) for x in (q, k, v, ld)), block_size=block,
                                     segment_ids=jnp.asarray(seg), initial_state=jnp.asarray(s0))
  # float32 against float64: relative to the output's scale (~1e-4 here).
  assert np.linalg.norm(np.asarray(o) - want_o) <= 1e-5 * np.linalg.norm(want_o)
  assert np.linalg.norm(np.asarray(s) - want_s) <= 1e-5 * np.linalg.norm(want_s)
