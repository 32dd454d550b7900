"""W8A16: the converter, byte count, matmul and logits against bf16."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from mx01 import model as model_lib
from mx01.inference import quantize
from mx01.inference.generate import generate


def test_quantize_weight_per_output_channel():
  w = jax.random.normal(jax.random.key(0), (3, 16, 8)) * jnp.arange(1, 9)  # channels of different ranges
  qw = quantize.quantize_weight(w)
  assert qw.qvalue.dtype == jnp.int8 and qw.scale.shape == (3, 8)
  np.testing.assert_allclose(qw.scale, jnp.max(jnp.abs(w), axis=1) / 127, rtol=1e-6)
  err = jnp.abs(qw.dequantize() - w)
  assert bool(jnp.all(err <= qw.scale[:, None, :] / 2 + 1e-6))


def test_linear_dequantises_on_the_fly():
  x = jax.random.normal(jax.random.key(1), (5, 16), jnp.bfloat16)
  qw = quantize.quantize_weight(jax.random.normal(jax.random.key(2), (16, 8)))
  y = quantize.linear(x, qw)
  ref = x.astype(jnp.float32) @ qw.dequantize()
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)


def test_converter_halves_weight_bytes(hybrid_model):
  cfg, params = hybrid_model
  q = quantize.quantize_params(params)
  layer = model_lib.layer_params(q, cfg)[0]
  assert isinstance(layer["attn"]["qkv_proj"]["kernel"], quantize.QuantizedWeight)
  assert isinstance(layer["moe"]["wi_gate"], quantize.QuantizedWeight)
  assert not isinstance(layer["moe"]["router"], quantize.QuantizedWeight)
  assert not isinstance(q["lm_head"]["kernel"], quantize.QuantizedWeight)
  bf16_bytes = quantize.param_bytes(quantize.cast_floats(params, jnp.bfloat16), only_quantizable=True)
  int8_values = sum(x.qvalue.size for x in jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, quantize.QuantizedWeight))
                    if isinstance(x, quantize.QuantizedWeight))
  w8_bytes = quantize.param_bytes(q, only_quantizable=True)
  assert int8_values == bf16_bytes // 2  # the int8 values are exactly half of bf16
  # f32 scales add 4 bytes per output channel (1/16 of the int8 bytes here, 1/1536 at hidden 6144).
  assert w8_bytes <= 0.5 * bf16_bytes * (1 + 4 / 16 + 1e-9)
  assert w8_bytes < 0.6 * bf16_bytes


@pytest.mark.slow
def test_w8a16_logits_close_to_float(scanned_model):
  """At the presets' init (std 0.02): W8A16 error is of the order of bf16's own rounding error (~1%).

  The quantised weights (stacked under the scan, and unrolled) go through `model.apply` itself.
  """
  cfg, params = scanned_model
  cfg16 = dataclasses.replace(cfg, compute_dtype="bfloat16")
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, size=(2, 16)), jnp.int32)

  def run(p, c):
    return jax.jit(lambda p: model_lib.apply(p, tokens, config=c)[0])(p)

  p8 = quantize.cast_floats(quantize.quantize_params(params), jnp.bfloat16)
  l32 = run(params, cfg)
  l16 = run(quantize.cast_floats(params, jnp.bfloat16), cfg16)
  l8 = run(p8, cfg16)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert rel(l8, l32) < 0.03 and rel(l8, l32) < 3 * rel(l16, l32), (rel(l8, l32), rel(l16, l32))
  assert float(jnp.mean(jnp.argmax(l8, -1) == jnp.argmax(l32, -1))) > 0.9
  res = generate(p8, [[1, 2, 3]], config=cfg16, max_new_tokens=3)
  assert len(res.tokens[0]) == 3
