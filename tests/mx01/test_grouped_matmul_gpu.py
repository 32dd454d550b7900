"""The GPU grouped-matmul experts against jax.lax.ragged_dot, on a GPU only: "ragged_mosaic" (jax's Mosaic
GPU ragged-dot ops, wgmma/TMA) and "ragged_tokamax" (the tokamax library's ragged_dot; skipped where tokamax
is not installed).

The kernels have no CPU path; these tests skip elsewhere.  Tolerances: bf16 operands with fp32
accumulation on both sides, so relative error <= 2e-2 (outputs and gradients).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mx01.layers import moe as moe_lib

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _tokamax_installed() -> bool:
  try:
    import tokamax  # noqa: F401
  except ImportError:
    return False
  return True


@pytest.mark.parametrize("impl", ["mosaic", "tokamax"])
@pytest.mark.parametrize("tokens,empty_expert", [(1000, False), (777, True)])
def test_grouped_experts_match_ragged_dot(impl, tokens, empty_expert):
  if impl == "tokamax" and not _tokamax_installed():
    pytest.skip("tokamax is not installed")
  experts_grouped_mosaic = {"mosaic": moe_lib.experts_grouped_mosaic, "tokamax": moe_lib.experts_grouped_tokamax}[impl]
  hidden, width, e, k = 256, 384, 8, 2
  ks = jax.random.split(jax.random.key(tokens), 6)
  dt = jnp.bfloat16
  x = jax.random.normal(ks[0], (tokens, hidden), dt)
  router = jax.random.normal(ks[1], (hidden, e), jnp.float32)
  w = [(jax.random.normal(ks[2 + i], shape, jnp.float32) * shape[1] ** -0.5).astype(dt)
       for i, shape in enumerate([(e, hidden, width), (e, hidden, width), (e, width, hidden)])]
  _, idx, weights = moe_lib.route(x, router, k)
  if empty_expert:
    idx = jnp.where(idx == 3, jnp.where(idx[:, ::-1] == 7, 6, 7), idx)  # expert 3 gets no tokens: an empty group
    assert not bool(jnp.any(idx == 3)) and bool(jnp.all(idx[:, 0] != idx[:, 1]))
  cot = jax.random.normal(ks[5], (tokens, hidden), jnp.float32)

  def loss(fn, x, *w):
    return jnp.sum(fn(x, idx, weights, *w).astype(jnp.float32) * cot)

  y_ref = moe_lib.experts_grouped(x, idx, weights, *w)
  y = jax.jit(experts_grouped_mosaic)(x, idx, weights, *w)
  assert _rel(y, y_ref) < 2e-2
  g_ref = jax.grad(lambda *a: loss(moe_lib.experts_grouped, *a), argnums=(0, 1, 2, 3))(x, *w)
  g = jax.jit(jax.grad(lambda *a: loss(experts_grouped_mosaic, *a), argnums=(0, 1, 2, 3)))(x, *w)
  for name, a, b in zip(("dx", "dwi_gate", "dwi_up", "dwo"), g, g_ref):
    assert np.all(np.isfinite(np.asarray(a, np.float32))), name
    assert _rel(a, b) < 2e-2, (name, _rel(a, b))
