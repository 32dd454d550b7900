"""Softmax attention: the XLA and Pallas flash paths against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mx01 import ops
from mx01.config import ModelConfig

ON_GPU = jax.default_backend() == "gpu"


def causal_attention(q, k, v, *, segment_ids=None, implementation, interpret=False):
  """The registry's attention for `implementation` (a model.attention_impl name)."""
  fn = ops.attention_op(ModelConfig(attention_impl=implementation), interpret=interpret)
  return fn(q, k, v, segment_ids=segment_ids)


def numpy_attention(q, k, v, seg):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  rep = h // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  mask = np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def _inputs(t, seed=0):
  r = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(r[0], (2, t, 4, 16))
  k = jax.random.normal(r[1], (2, t, 2, 16))
  v = jax.random.normal(r[2], (2, t, 2, 16))
  # Packed rows with a length-1 segment.
  seg = np.stack([np.repeat([1, 2], [t // 2, t - t // 2]), np.repeat([3, 4, 5], [3, 1, t - 4])]).astype(np.int32)
  return q, k, v, seg


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("t", [20, 37])
def test_matches_float64_reference(impl, t):
  q, k, v, seg = _inputs(t)
  out = causal_attention(q, k, v, segment_ids=jnp.asarray(seg), implementation=impl, interpret=not ON_GPU)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, seg), atol=2e-5, rtol=2e-5)  # float32


def test_pallas_gradients_match_xla():
  q, k, v, seg = _inputs(37, seed=1)
  w = jax.random.normal(jax.random.key(9), q.shape)

  def grads(impl):
    f = lambda q, k, v: jnp.sum(causal_attention(q, k, v, segment_ids=jnp.asarray(seg), implementation=impl,  # noqa: E731
                                                 interpret=not ON_GPU) * w)
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  for a, b in zip(grads("xla"), grads("pallas")):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)


def _numpy_runs(seg_row):
  starts = [i for i in range(len(seg_row)) if i == 0 or seg_row[i] != seg_row[i - 1]]
  return starts, list(np.diff(starts + [len(seg_row)]))


@pytest.mark.parametrize("max_runs", [1, 3, 8])
def test_segment_runs_match_numpy(max_runs):
  rng = np.random.default_rng(max_runs)
  t = 29
  rows = [np.ones(t, np.int32),
          np.repeat([1, 2, 3, 0], [5, 1, 20, 3]).astype(np.int32),  # a length-1 document and end padding
          np.cumsum(rng.random(t) < 0.3).astype(np.int32) + 1]  # random documents
  seg = np.stack(rows)
  offsets, lengths, fits = ops.segment_runs(jnp.asarray(seg), max_runs)
  assert offsets.shape == (3, max_runs + 1) and lengths.shape == (3, max_runs)
  counts = []
  for r, row in enumerate(rows):
    starts, lens = _numpy_runs(row)
    counts.append(len(starts))
    n = min(len(starts), max_runs)
    np.testing.assert_array_equal(offsets[r], starts[:n] + [-1] * (max_runs + 1 - n))
    if len(starts) <= max_runs:
      np.testing.assert_array_equal(lengths[r], lens + [-1] * (max_runs - n))
  assert bool(fits) == (max(counts) <= max_runs)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_cudnn_matches_reference_bf16():
  q, k, v, _ = _inputs(256)
  seg = np.ones((2, 256), np.int32)
  bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
  out = causal_attention(bf(q), bf(k), bf(v), implementation="cudnn")
  # bf16 inputs and output: ~3 significant digits.
  np.testing.assert_allclose(np.asarray(out, np.float32), numpy_attention(q, k, v, seg), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
# At 2 documents a row the rows overflow and the Pallas kernel runs.
@pytest.mark.parametrize("max_segments", [ModelConfig().cudnn_max_segments, 2])
def test_cudnn_packed_rows_match_reference(max_segments):
  # Packed rows of random documents (a length-1 one, padding at a row's end), GQA, head dim 64, bf16: values
  # against float64 NumPy, gradients against the XLA path in float32 (both from the same bf16 inputs).
  b, t, h, kvh, d = 2, 300, 4, 2, 64
  r = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(r[0], (b, t, h, d)).astype(jnp.bfloat16)
  k = jax.random.normal(r[1], (b, t, kvh, d)).astype(jnp.bfloat16)
  v = jax.random.normal(r[2], (b, t, kvh, d)).astype(jnp.bfloat16)
  rng = np.random.default_rng(0)
  seg = np.stack([np.repeat([1, 2, 3, 4, 0], [100, 1, 120, 60, 19]),
                  np.cumsum(rng.random(t) < 0.02) + 1]).astype(np.int32)
  attention = ops.attention_op(ModelConfig(attention_impl="cudnn", cudnn_max_segments=max_segments))
  cudnn = lambda q, k, v: attention(q, k, v, segment_ids=jnp.asarray(seg))  # noqa: E731
  out = jax.jit(cudnn)(q, k, v)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  real = seg != 0  # padding's outputs are never used (its loss is masked)
  want = numpy_attention(f32(q), f32(k), f32(v), seg)
  np.testing.assert_allclose(f32(out)[real], want[real], atol=3e-2, rtol=3e-2)
  w = jax.random.normal(r[3], q.shape) * real[:, :, None, None]

  def grads(fn, dtype):
    loss = lambda q, k, v: jnp.sum(fn(q.astype(dtype), k.astype(dtype), v.astype(dtype)).astype(jnp.float32) * w)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  xla = lambda q, k, v: ops.causal_attention(q, k, v, segment_ids=jnp.asarray(seg))  # noqa: E731
  for got, ref in zip(grads(cudnn, jnp.bfloat16), grads(xla, jnp.float32)):
    got, ref = f32(got), f32(ref)
    # bf16 attention in both directions: errors of a few percent of the gradient's scale.
    np.testing.assert_allclose(got, ref, atol=5e-2 * np.abs(ref).max(), rtol=5e-2)


def test_cudnn_op_holds_the_configs_documents_per_row():
  # The ragged layout's static size comes from the config (its buffers grow with it), not from a constant.
  op = ops.ATTENTION["cudnn"](ModelConfig(attention_impl="cudnn", cudnn_max_segments=5), False)
  assert op.func is ops._cudnn_attention and op.keywords == {"max_segments": 5}
