"""The rematerialised norm and gated activations: same values and gradients as plain autodiff, less kept."""

import dataclasses
import io
import re
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from mx01 import model, training
from mx01.config import ModelConfig
from mx01.layers.activations import silu, silu_gate
from mx01.layers.norms import rms_norm


def _plain_rms_norm(x, scale, eps):
  x32 = x.astype(jnp.float32)
  y = x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (scale.astype(jnp.float32) * y).astype(x.dtype)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_values_and_gradients_match_plain_autodiff(dtype, tol):
  kx, ks, kg, ku, kc = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(kx, (3, 37, 96), dtype)
  scale = 1.0 + 0.1 * jax.random.normal(ks, (96,), jnp.float32)
  gate, up = (jax.random.normal(k, (3, 37, 200), dtype) for k in (kg, ku))
  cot_x = jax.random.normal(kc, x.shape, dtype)
  cot_h = jax.random.normal(kc, gate.shape, dtype)
  cases = [
      (lambda x, s: rms_norm(x, s, 1e-5), lambda x, s: _plain_rms_norm(x, s, 1e-5), (x, scale), cot_x),
      (silu_gate, lambda g, u: jax.nn.silu(g) * u, (gate, up), cot_h),
      (lambda g, u: silu(g), lambda g, u: jax.nn.silu(g), (gate, up), cot_h),
  ]
  for ours, plain, args, cot in cases:
    y, vjp = jax.vjp(jax.jit(ours), *args)
    y_ref, vjp_ref = jax.vjp(plain, *args)
    np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=tol, atol=tol)
    for g, g_ref in zip(vjp(cot), vjp_ref(cot)):
      np.testing.assert_allclose(np.float32(g), np.float32(g_ref), rtol=tol, atol=tol * float(jnp.abs(g_ref).max()))


def _saved_activations(fn, *args, batch: int):
  """(dtype, shape) of every residual the backward pass keeps whose leading dimension is the batch."""
  out = io.StringIO()
  with redirect_stdout(out):
    print_saved_residuals(fn, *args)
  saved = []
  for line in out.getvalue().splitlines():
    m = re.match(r"(\w+)\[([\d,]*)\]", line)
    if m and m.group(2):
      shape = tuple(int(s) for s in m.group(2).split(","))
      if shape[0] == batch:
        saved.append((m.group(1), shape))
  return saved


def test_a_dense_layer_keeps_no_float32_activations_and_three_mlp_tensors():
  # A dense-MLP decoder of lightning layers, as the dense research presets: the residual stream is bf16; the
  # norms keep no float32 copy of it, and the MLP keeps its two matmul outputs and silu(gate) * up (the down
  # projection's input, which its weight gradient needs), not the sigmoid or silu(gate).
  cfg = ModelConfig(vocab_size=256, hidden_size=96, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=48,
                    intermediate_size=352, ffn_type="dense", layer_pattern=("lightning",), block_size=16,
                    compute_dtype="bfloat16", scan_layers=False)
  params = model.init(cfg, jax.random.key(0), seq_len=32)
  b, t = 2, 48
  batch = {"tokens": jnp.ones((b, t + 1), jnp.int32), "segment_ids": jnp.ones((b, t + 1), jnp.int32)}
  saved = _saved_activations(lambda p: training.loss_fn(p, batch, config=cfg)[0], params, batch=b)
  hidden_f32 = [s for s in saved if s == ("f32", (b, t, cfg.hidden_size))]
  assert not hidden_f32, f"float32 copies of the residual stream kept for the backward pass: {len(hidden_f32)}"
  mlp = [s for s in saved if s[1] == (b, t, cfg.intermediate_size)]
  assert len(mlp) == 3 * cfg.num_layers, f"[batch, seq, intermediate] tensors kept: {mlp}"
