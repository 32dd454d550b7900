"""The decoder stack: shapes, packing isolation, MoE against the dense reference, RoPE, bf16."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mx01 import model
from mx01.config import ModelConfig
from mx01.layers import moe as moe_lib
from mx01.layers.rope import apply_rope
from mx01 import ops
from mx01.ops import default_ops

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                  layer_types=("lightning", "softmax", "lightning", "lightning"), intermediate_size=24,
                  num_experts=4, num_experts_per_tok=2, block_size=8, rotary_dim=4)

# The forward compiled once per config and shape: run op by op, each call dispatches (and compiles) every
# primitive on its own, minutes on two CPU cores for the same values.
_apply = jax.jit(model.apply, static_argnames="config")


@pytest.fixture(scope="module")
def params():
  return model.init(CFG, jax.random.key(0))


def test_shapes_and_jit(params):
  tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, CFG.vocab_size)
  logits, aux = jax.jit(lambda p, t: model.apply(p, t, config=CFG))(params, tokens)
  assert logits.shape == (2, 21, CFG.vocab_size) and logits.dtype == jnp.float32
  assert aux["routing_stats"]["tokens_per_expert"].shape == (4, 4)
  assert np.isfinite(float(aux["aux_loss"]))
  # Every token routes to top-k experts in every layer.
  np.testing.assert_allclose(aux["routing_stats"]["tokens_per_expert"].sum(-1), 2 * 21 * 2)


def test_packed_documents_are_isolated(params):
  """Two documents packed into one row give the same logits as two separate rows."""
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 64, 13), rng.integers(0, 64, 11)
  packed = jnp.asarray(np.concatenate([a, b])[None])
  seg = jnp.asarray(np.array([[1] * 13 + [2] * 11]))
  lp, _ = _apply(params, packed, seg, config=CFG)
  la, _ = _apply(params, jnp.asarray(a[None]), config=CFG)
  lb, _ = _apply(params, jnp.asarray(b[None]), config=CFG)
  np.testing.assert_allclose(lp[0, :13], la[0], atol=2e-5)
  np.testing.assert_allclose(lp[0, 13:], lb[0], atol=2e-5)


def test_positions_from_segments():
  seg = jnp.array([[1, 1, 1, 2, 2, 3], [5, 5, 5, 5, 0, 0]])
  np.testing.assert_array_equal(model.positions_from_segments(seg), [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])


def test_lightning_impls_agree(params):
  tokens = jax.random.randint(jax.random.key(2), (1, 19), 0, CFG.vocab_size)
  ref, _ = _apply(params, tokens, config=dataclasses.replace(CFG, lightning_impl="reference"))
  xla, _ = _apply(params, tokens, config=dataclasses.replace(CFG, lightning_impl="xla"))
  np.testing.assert_allclose(ref, xla, atol=2e-5)


def test_moe_grouped_equals_dense_reference():
  rng = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(rng[0], (2, 9, 32))
  p = {"router": jax.random.normal(rng[1], (32, 4)), "wi_gate": jax.random.normal(rng[2], (4, 32, 24)) * 0.1,
       "wi_up": jax.random.normal(rng[3], (4, 32, 24)) * 0.1, "wo": jax.random.normal(rng[4], (4, 24, 32)) * 0.1}
  forward = jax.jit(lambda p, experts_fn: moe_lib.moe_forward(x, p, config=CFG, experts_fn=experts_fn),
                    static_argnums=1)
  y1, s1 = forward(p, moe_lib.experts_grouped)
  y2, s2 = forward(p, moe_lib.experts_dense_reference)
  np.testing.assert_allclose(y1, y2, atol=1e-5)
  w = jax.random.normal(jax.random.key(4), x.shape)
  loss = lambda p, x, experts_fn: jnp.sum(moe_lib.moe_forward(x, p, config=CFG, experts_fn=experts_fn)[0] * w)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  (g1, dx1), (g2, dx2) = grad(p, x, moe_lib.experts_grouped), grad(p, x, moe_lib.experts_dense_reference)
  for k in ("wi_gate", "wi_up", "wo", "router"):
    np.testing.assert_allclose(g1[k], g2[k], atol=1e-4)
  np.testing.assert_allclose(dx1, dx2, atol=1e-4)  # through the dispatch's gather-only gradient (take_rows)


def test_moe_capacity_drops_in_priority_order():
  # 6 tokens all preferring expert 0, then expert 1; capacity 3 per expert.
  idx = jnp.array([[0, 1]] * 6)
  keep = moe_lib.capacity_keep_mask(idx, 4, 3)
  np.testing.assert_array_equal(keep[:, 0], [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(keep[:, 1], [1, 1, 1, 0, 0, 0])
  assert moe_lib.expert_capacity(6, 4, 2, 1.0) == 3


def _capacity_positions_numpy(idx, num_experts, mask):
  # Choice-major, then token order; masked tokens take no place and never fit.
  t, k = idx.shape
  pos = np.full((t, k), np.iinfo(np.int32).max)
  filled = np.zeros(num_experts, int)
  for j in range(k):
    for i in range(t):
      if mask[i]:
        pos[i, j] = filled[idx[i, j]]
        filled[idx[i, j]] += 1
  return pos


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 4.0])
def test_moe_capacity_impl_equals_dense_with_drops(capacity_factor):
  # The batched-buffer experts ("capacity") against every-expert-on-every-token with the same drops.
  rng = jax.random.split(jax.random.key(5), 6)
  x = jax.random.normal(rng[0], (2, 13, 32))
  p = {"router": jax.random.normal(rng[1], (32, 4)), "wi_gate": jax.random.normal(rng[2], (4, 32, 24)) * 0.1,
       "wi_up": jax.random.normal(rng[3], (4, 32, 24)) * 0.1, "wo": jax.random.normal(rng[4], (4, 24, 32)) * 0.1}
  mask = jax.random.uniform(rng[5], (2, 13)) > 0.25
  cfg_cap = dataclasses.replace(CFG, capacity_factor=capacity_factor, moe_impl="capacity")
  cfg_ref = dataclasses.replace(CFG, capacity_factor=capacity_factor, moe_impl="dense")
  _, idx, _ = moe_lib.route(x.reshape(26, 32), p["router"], 2)
  pos = moe_lib.capacity_positions(idx, 4, token_mask=mask.reshape(26))
  np.testing.assert_array_equal(pos, _capacity_positions_numpy(np.asarray(idx), 4, np.asarray(mask).reshape(26)))
  cap = moe_lib.expert_capacity(26, 4, 2, capacity_factor)
  if capacity_factor < 1:
    assert int(jnp.sum(pos < cap)) < int(jnp.sum(mask)) * 2  # some assignments really are dropped

  # Each config's experts as the model runs them (mx01/ops.py's MOE table: "capacity" -> capacity buffers).
  forward = lambda cfg, p, x: ops.MOE[cfg.moe_impl](cfg, False)(x, p, config=cfg, token_mask=mask)
  run = jax.jit(lambda cfg, p: forward(cfg, p, x), static_argnums=0)
  (y1, s1), (y2, s2) = run(cfg_cap, p), run(cfg_ref, p)
  np.testing.assert_allclose(y1, y2, atol=1e-5)
  np.testing.assert_allclose(s1["tokens_per_expert"], s2["tokens_per_expert"])
  w = jax.random.normal(jax.random.key(6), y1.shape)
  loss = lambda cfg, p, x: jnp.sum(forward(cfg, p, x)[0] * w)
  grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
  (g1, dx1), (g2, dx2) = grad(cfg_cap, p, x), grad(cfg_ref, p, x)
  for k in ("wi_gate", "wi_up", "wo", "router"):
    np.testing.assert_allclose(g1[k], g2[k], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(dx1, dx2, atol=1e-4, rtol=1e-4)


def test_take_rows_gradient_is_the_gather_transpose():
  """take_rows' gather-only gradient against autodiff of a plain gather, with repeated, missing and
  out-of-range (zero) rows, in float32 and bfloat16."""
  rng = np.random.default_rng(0)
  n, m, d = 7, 12, 5
  index = rng.integers(0, n + 1, size=m)  # n: a zero row
  index[:2] = n - 1  # a row taken twice or more
  inverse = np.full((n, m), m)
  for j in range(n):
    hits = np.flatnonzero(index == j)
    inverse[j, :len(hits)] = hits
  inverse = inverse[:, :max(1, (inverse < m).sum(1).max())]
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
    x = jnp.asarray(rng.standard_normal((n, d)), dtype)
    w = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
    f = lambda take, x: jnp.sum(take(x).astype(jnp.float32) * w)
    plain = lambda x: jnp.take(x, jnp.asarray(index), axis=0, mode="fill", fill_value=0)
    ours = lambda x: moe_lib.take_rows(x, jnp.asarray(index), jnp.asarray(inverse))
    np.testing.assert_array_equal(ours(x), plain(x))
    got, want = jax.grad(lambda x: f(ours, x))(x), jax.grad(lambda x: f(plain, x))(x)
    assert got.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_moe_impl_config_errors():
  with pytest.raises(Exception, match="capacity_factor"):
    dataclasses.replace(CFG, moe_impl="capacity")
  with pytest.raises(Exception, match="moe_impl"):
    dataclasses.replace(CFG, moe_impl="megablocks")
  if jax.default_backend() != "gpu":
    x = jnp.ones((1, 4, 32))
    p = {"router": jnp.ones((32, 4)), "wi_gate": jnp.ones((4, 32, 24)), "wi_up": jnp.ones((4, 32, 24)),
         "wo": jnp.ones((4, 24, 32))}
    with pytest.raises(ValueError, match="Hopper GPU"):
      cfg = dataclasses.replace(CFG, moe_impl="ragged_mosaic")
      ops.moe_op(cfg)(x, p, config=cfg)
    try:
      import tokamax  # noqa: F401
    except ImportError:  # the optional library: a missing install names itself and the alternatives
      with pytest.raises(ValueError, match="tokamax"):
        cfg = dataclasses.replace(CFG, moe_impl="ragged_tokamax")
        ops.moe_op(cfg)(x, p, config=cfg)
  assert ops.moe_impl(dataclasses.replace(CFG, capacity_factor=1.25)) == "capacity"
  assert ops.moe_impl(dataclasses.replace(CFG, capacity_factor=None)) in ("ragged", "ragged_mosaic", "dense")


@pytest.mark.parametrize("backend,hopper,capacity,want", [
    ("cpu", False, None, "dense"), ("gpu", True, None, "ragged_mosaic"), ("gpu", False, None, "ragged"),
    ("tpu", False, None, "ragged"), ("gpu", True, 1.25, "capacity"), ("cpu", False, 1.25, "capacity")])
def test_moe_auto_picks_each_platforms_fast_path(monkeypatch, backend, hopper, capacity, want):
  monkeypatch.setattr(ops.jax, "default_backend", lambda: backend)
  monkeypatch.setattr(ops, "_on_hopper", lambda: hopper)
  big = dataclasses.replace(CFG, hidden_size=256, intermediate_size=384)  # the Mosaic kernels' tiles: 128
  assert ops.moe_impl(dataclasses.replace(big, moe_impl="auto", capacity_factor=capacity)) == want
  # CFG's sizes (32, 24) do not fit the Mosaic kernels' tiles: dropless on Hopper is then ragged_dot.
  small = ops.moe_impl(dataclasses.replace(CFG, moe_impl="auto", capacity_factor=capacity))
  assert small == ("ragged" if want == "ragged_mosaic" else want)
  assert ops.moe_impl(dataclasses.replace(CFG, moe_impl="ragged", capacity_factor=None)) == "ragged"  # as given


def test_hopper_is_compute_capability_9(monkeypatch):
  class Dev:
    def __init__(self, cc):
      self.compute_capability = cc
  monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
  for cc, want in (("9.0", True), ("8.0", False), ("10.0", False)):
    monkeypatch.setattr(ops.jax, "devices", lambda cc=cc: [Dev(cc)])
    assert ops._on_hopper() is want
  monkeypatch.setattr(ops.jax, "default_backend", lambda: "cpu")
  assert ops._on_hopper() is False


def test_aux_loss_formula():
  # Perfectly balanced routing gives E * sum_e (k/E)(1/E) = k.
  stats = {"tokens_per_expert": jnp.full((1, 4), 5.0), "prob_sum": jnp.full((1, 4), 2.5), "num_tokens": jnp.array([10.0])}
  np.testing.assert_allclose(moe_lib.load_balancing_loss(stats, "per_layer"), 2.0)
  np.testing.assert_allclose(moe_lib.load_balancing_loss(stats, "pooled"), 2.0)


def test_partial_rope_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 5, 2, 8)).astype(np.float32)
  pos = np.arange(5)[None]
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), rotary_dim=4, theta=100.0))
  inv = 100.0 ** (-np.arange(0, 4, 2) / 4)
  ang = pos[0][:, None] * inv  # [t, 2]
  want = x.copy()
  for i in range(2):  # dim i pairs with i + 2; dims 4..7 pass through
    c, s = np.cos(ang[:, i])[:, None], np.sin(ang[:, i])[:, None]
    want[0, :, :, i] = x[0, :, :, i] * c - x[0, :, :, i + 2] * s
    want[0, :, :, i + 2] = x[0, :, :, i + 2] * c + x[0, :, :, i] * s
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_bf16_compute_close_to_f32(params):
  tokens = jax.random.randint(jax.random.key(4), (2, 17), 0, CFG.vocab_size)
  f32, _ = _apply(params, tokens, config=CFG)
  bf, _ = _apply(params, tokens, config=dataclasses.replace(CFG, compute_dtype="bfloat16"))
  assert bf.dtype == jnp.float32
  assert np.abs(np.asarray(bf) - np.asarray(f32)).max() < 0.05 * np.abs(np.asarray(f32)).max() + 0.05


def test_remat_gives_same_gradients(params):
  tokens = jax.random.randint(jax.random.key(5), (1, 16), 0, CFG.vocab_size)
  def loss(p, cfg):
    return jnp.mean(model.apply(p, tokens, config=cfg)[0] ** 2)
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g1 = grad(params, CFG)
  g2 = grad(params, dataclasses.replace(CFG, remat="full"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_dense_ffn_variant():
  cfg = dataclasses.replace(CFG, ffn_type="dense")
  p = model.init(cfg, jax.random.key(0))
  assert "mlp" in p["layers_0"] and "moe" not in p["layers_0"]
  logits, aux = _apply(p, jnp.zeros((1, 5), jnp.int32), config=cfg)
  assert logits.shape == (1, 5, 64) and float(aux["aux_loss"]) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_kernels_in_the_model_match_xla():
  """The model with Pallas lightning + Pallas flash attention equals the XLA paths (logits and gradients)."""
  cfg = dataclasses.replace(CFG, head_dim=16, rotary_dim=8, block_size=16)
  p = model.init(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 45), 0, cfg.vocab_size)
  seg = jnp.asarray(np.array([[1] * 20 + [2] * 25, [1] * 45]))
  fast = dataclasses.replace(cfg, lightning_impl="pallas", attention_impl="pallas")
  slow = dataclasses.replace(cfg, lightning_impl="xla", attention_impl="xla")

  def loss(p, c):
    return jnp.mean(model.apply(p, tokens, seg, config=c)[0] ** 2)

  with jax.default_matmul_precision("float32"):
    lf, gf = jax.value_and_grad(loss)(p, fast)
    ls, gs = jax.value_and_grad(loss)(p, slow)
  np.testing.assert_allclose(lf, ls, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()) + 1e-7), gf, gs)


@pytest.mark.parametrize("kinds, plan", [
    (("lightning",) * 7 + ("softmax",), (1, 7)),  # 7 scanned lightning layers, the softmax one unrolled
    ((("lightning",) * 7 + ("softmax",)) * 10, (8, 10)),  # hybrid_456b
    (("lightning", "lightning", "softmax") * 3 + ("lightning",), (3, 3)),  # a remainder, unrolled
    (("lightning",) * 4 + ("softmax",), (1, 4)),
    (("lightning", "softmax", "lightning"), (0, 0)),
])
def test_scan_plan(kinds, plan):
  assert model.scan_plan(dataclasses.replace(CFG, num_layers=len(kinds), layer_types=kinds)) == plan


@pytest.mark.slow
def test_scanned_equals_unrolled_logits_and_grads():
  """7:1-like hybrid with a remainder (2 x (L, L, S) + L) at std 0.02: scan over layers changes nothing."""
  kinds = ("lightning", "lightning", "softmax") * 2 + ("lightning",)
  scanned = dataclasses.replace(CFG, num_layers=7, layer_types=kinds, remat="full")
  unrolled = dataclasses.replace(scanned, scan_layers=False)
  assert model.scan_plan(scanned) == (3, 2) and model.scan_plan(unrolled) == (0, 0)
  ps = model.init(scanned, jax.random.key(0))
  assert ps["period"]["layer_2"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 32) and "layers_6" in ps
  top = {k: ps[k] for k in ("embed", "final_norm", "lm_head")}
  pu = model.params_from_layers(top, model.layer_params(ps, scanned), unrolled)
  assert sorted(pu) == sorted(["embed", "final_norm", "lm_head"] + [f"layers_{i}" for i in range(7)])
  # The inverse reproduces the scanned tree exactly.
  back = model.params_from_layers(top, model.layer_params(pu, unrolled), scanned)
  jax.tree.map(np.testing.assert_array_equal, back, ps)
  tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, CFG.vocab_size)
  seg = jnp.asarray(np.array([[1] * 8 + [2] * 11, [1] * 19]))

  def loss(p, cfg):
    logits, aux = model.apply(p, tokens, seg, config=cfg)
    return jnp.mean(logits ** 2) + aux["aux_loss"], (logits, aux["routing_stats"])

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (ls, (logits_s, stats_s)), gs = grad_fn(ps, scanned)
  (lu, (logits_u, stats_u)), gu = grad_fn(pu, unrolled)
  np.testing.assert_allclose(logits_s, logits_u, atol=1e-6 * float(jnp.abs(logits_u).max()))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stats_s, stats_u)  # in layer order
  np.testing.assert_allclose(ls, lu, rtol=1e-6)
  gs_layers, gu_layers = model.layer_params(gs, scanned), model.layer_params(gu, unrolled)
  for a, b in zip(gs_layers, gu_layers):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5 * float(jnp.abs(y).max()) + 1e-12), a, b)
