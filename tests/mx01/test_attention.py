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


def test_cudnn_refuses_packed_rows():
  q, k, v, seg = _inputs(20)
  with pytest.raises(ValueError, match="segment_ids"):
    causal_attention(q, k, v, segment_ids=jnp.asarray(seg), implementation="cudnn")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_cudnn_matches_reference_bf16():
  q, k, v, _ = _inputs(256)
  seg = np.ones((2, 256), np.int32)
  bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
  out = causal_attention(bf(q), bf(k), bf(v), implementation="cudnn")
  # bf16 inputs and output: ~3 significant digits.
  np.testing.assert_allclose(np.asarray(out, np.float32), numpy_attention(q, k, v, seg), atol=3e-2, rtol=3e-2)
