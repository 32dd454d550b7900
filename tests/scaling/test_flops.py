"""Tests of the analytic FLOP model (scaling/flops.py).

Three levels of checking:
1. hand-computed values for small configs (the arithmetic);
2. the matmul FLOPs of small reference JAX functions (a GQA softmax layer, the
   repository's block-wise lightning attention, a MoE layer, a whole
   reference model forward and forward+backward), counted exactly from the
   jaxpr (`scaling.measure.matmul_flops`), and XLA's `cost_analysis()` total,
   which must agree within a few percent (XLA also counts elementwise ops);
3. the same against mx01/model.py once it exists (skipped until then).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mx01.config import LIGHTNING, SOFTMAX, ModelConfig
from mx01.lightning import lightning_attention_chunked
from scaling import flops
from scaling.measure import matmul_flops, xla_flops

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   layer_pattern=(LIGHTNING, SOFTMAX), ffn_type="moe", intermediate_size=16, num_experts=4,
                   num_experts_per_tok=2, block_size=4)


# ---- 1. arithmetic ----------------------------------------------------------------

def test_param_count_by_hand():
  pc = flops.param_count(TINY)
  h, v, H, KV, D, I, E, k = 32, 64, 4, 2, 8, 16, 4, 2
  assert pc.embedding == v * h and pc.lm_head == v * h
  assert pc.attention == (h * 3 * H * D + h * H * D + H * D * h) + (h * H * D + 2 * h * KV * D + H * D * h)
  assert pc.ffn_total == 2 * E * 3 * h * I and pc.ffn_active == 2 * k * 3 * h * I
  assert pc.router == 2 * h * E
  assert pc.norms == 2 * 2 * h + H * D + h
  assert pc.total == pc.non_embedding + 2 * v * h
  tied = dataclasses.replace(TINY, tie_word_embeddings=True)
  assert flops.param_count(tied).lm_head == 0 and flops.param_count(tied).matmul_active == pc.matmul_active


def test_forward_flops_by_hand():
  T = 10  # block 4 -> blocks of 4, 4, 2 real tokens
  h, v, H, KV, D, I, E, k = 32, 64, 4, 2, 8, 16, 4, 2
  b = flops.forward_flops_breakdown(TINY, T, "causal")
  assert b.embedding == 0
  assert b.lm_head == 2 * h * v
  assert b.attention_projections == 2 * ((5 * h * H * D) + (2 * h * H * D + 2 * h * KV * D))
  assert b.router == 2 * 2 * h * E
  assert b.ffn == 2 * k * 6 * h * I
  # softmax: T(T+1)/2 pairs, 4*D FLOPs per pair per head.
  assert b.softmax_attention == pytest.approx(H * 4 * D * (T * (T + 1) / 2) / T)
  # lightning intra (causal pairs: 10 + 10 + 3), inter + state update 4*D^2 per token.
  assert b.lightning_intra == pytest.approx(H * 4 * D * (10 + 10 + 3) / T)
  assert b.lightning_inter == pytest.approx(H * 4 * D * D)
  m = flops.forward_flops_breakdown(TINY, T, "masked")
  assert m.softmax_attention == pytest.approx(H * 4 * D * T)
  assert m.lightning_intra == pytest.approx(H * 4 * D * (3 * 16) / T)  # 3 padded blocks of 4x4
  assert m.lightning_inter == pytest.approx(H * 4 * D * D * 12 / T)
  assert flops.training_flops_per_token(TINY, T) == pytest.approx(3 * b.total)
  assert flops.training_flops(TINY, T, 1e6) == pytest.approx(3e6 * b.total)


def test_six_nd_differs_only_by_attention_mixing():
  for T in (1, 7, 64, 1000):
    b = flops.forward_flops_breakdown(TINY, T)
    assert 3 * (b.total - b.attention_mixing) == pytest.approx(flops.six_nd_flops_per_token(TINY))


def test_context_scaling_softmax_quadratic_lightning_linear():
  soft = dataclasses.replace(TINY, layer_pattern=(SOFTMAX,), block_size=64)
  light = dataclasses.replace(TINY, layer_pattern=(LIGHTNING,), block_size=64)
  per_tok = lambda cfg, T: flops.forward_flops_breakdown(cfg, T).attention_mixing
  # softmax per-token mixing grows ~linearly in T (quadratic per sequence); lightning saturates at block size.
  assert per_tok(soft, 4096) / per_tok(soft, 2048) == pytest.approx(4097 / 2049)
  assert per_tok(light, 4096) == pytest.approx(per_tok(light, 2048))
  # Decode: softmax cost grows with context, lightning's does not.
  assert flops.inference_flops_per_token(light, 10) == flops.inference_flops_per_token(light, 10_000)
  d = flops.inference_flops_per_token(soft, 2000) - flops.inference_flops_per_token(soft, 1000)
  assert d == pytest.approx(2 * 4 * 8 * 4 * 1000)  # 2 layers x 4 heads x 4*D x 1000 keys


def test_dense_ffn_and_bad_arguments():
  dense = dataclasses.replace(TINY, ffn_type="dense", intermediate_size=64)
  b = flops.forward_flops_breakdown(dense, 8)
  assert b.router == 0 and b.ffn == 2 * 6 * 32 * 64
  with pytest.raises(ValueError, match="seq_len"):
    flops.forward_flops_per_token(TINY, 0)
  with pytest.raises(ValueError, match="attention mode"):
    flops.forward_flops_per_token(TINY, 8, "sparse")
  with pytest.raises(ValueError, match="tokens"):
    flops.training_flops(TINY, 8, 0)


def test_mfu_and_peak_table():
  assert flops.peak_flops_for_device_kind("NVIDIA H100 80GB HBM3") == 989.4e12
  assert flops.peak_flops_for_device_kind("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops_for_device_kind("NVIDIA H200") == 989.4e12
  assert flops.peak_flops_for_device_kind("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops.peak_flops_for_device_kind("cpu") is None
  assert flops.detect_peak_flops() is None or flops.detect_peak_flops() > 0
  per_tok = flops.training_flops_per_token(TINY, 16)
  assert flops.mfu(1e6, TINY, 16, 989.4e12) == pytest.approx(1e6 * per_tok / 989.4e12)
  assert flops.mfu(1e6, TINY, 16, None) is None
  with pytest.raises(ValueError, match="peak_flops"):
    flops.mfu(1e6, TINY, 16, 0.0)


# ---- 2. reference JAX functions ------------------------------------------------------

def _dense(key, shape):
  return jax.random.normal(key, shape, jnp.float32) * 0.1


def _init_reference(cfg: ModelConfig, key):
  """A plain-jnp model with exactly the architecture the FLOP model describes."""
  h, H, KV, D, I, E = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                       cfg.num_experts)
  keys = iter(jax.random.split(key, 64))
  layers = []
  for kind in cfg.resolved_layer_types:
    if kind == LIGHTNING:
      attn = dict(qkv=_dense(next(keys), (h, 3 * H * D)), gate=_dense(next(keys), (h, H * D)),
                  out=_dense(next(keys), (H * D, h)))
    else:
      attn = dict(q=_dense(next(keys), (h, H * D)), k=_dense(next(keys), (h, KV * D)),
                  v=_dense(next(keys), (h, KV * D)), o=_dense(next(keys), (H * D, h)))
    if cfg.is_moe:
      ffn = dict(router=_dense(next(keys), (h, E)), wg=_dense(next(keys), (E, h, I)),
                 wu=_dense(next(keys), (E, h, I)), wd=_dense(next(keys), (E, I, h)))
    else:
      ffn = dict(wg=_dense(next(keys), (h, I)), wu=_dense(next(keys), (h, I)), wd=_dense(next(keys), (I, h)))
    layers.append(dict(attn=attn, ffn=ffn))
  return dict(embed=_dense(next(keys), (cfg.vocab_size, h)), layers=layers,
              head=_dense(next(keys), (h, cfg.vocab_size)))


def _softmax_attention(cfg, p, x):
  b, t, _ = x.shape
  H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q = (x @ p["q"]).reshape(b, t, KV, H // KV, D)
  k = (x @ p["k"]).reshape(b, t, KV, D)
  v = (x @ p["v"]).reshape(b, t, KV, D)
  s = jnp.einsum("bqgrd,bkgd->bgrqk", q, k) / np.sqrt(D)
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
  o = jnp.einsum("bgrqk,bkgd->bqgrd", jax.nn.softmax(s, axis=-1), v)
  return o.reshape(b, t, H * D) @ p["o"]


def _lightning_attention(cfg, p, x):
  b, t, _ = x.shape
  H, D = cfg.num_heads, cfg.head_dim
  q, k, v = jnp.split(jax.nn.silu(x @ p["qkv"]).reshape(b, t, H, 3 * D), 3, axis=-1)
  o, _ = lightning_attention_chunked(q, k, v, -jnp.linspace(0.1, 0.9, H), block_size=cfg.block_size)
  return (o.reshape(b, t, H * D) * jax.nn.sigmoid(x @ p["gate"])) @ p["out"]


def _ffn(cfg, p, x):
  if not cfg.is_moe:
    return (jax.nn.silu(x @ p["wg"]) * (x @ p["wu"])) @ p["wd"]
  weights, experts = jax.lax.top_k(jax.nn.softmax(x @ p["router"], axis=-1), cfg.num_experts_per_tok)
  wg, wu, wd = p["wg"][experts], p["wu"][experts], p["wd"][experts]  # [b, t, k, ...] gathered experts
  hid = jax.nn.silu(jnp.einsum("bth,btkhi->btki", x, wg)) * jnp.einsum("bth,btkhi->btki", x, wu)
  return jnp.einsum("btki,btkih->bth", hid * weights[..., None], wd)  # weighted sum fused into the down proj


def _reference_forward(cfg, params, tokens):
  x = params["embed"][tokens]
  for kind, layer in zip(cfg.resolved_layer_types, params["layers"]):
    attn = _lightning_attention if kind == LIGHTNING else _softmax_attention
    x = x + attn(cfg, layer["attn"], x)
    x = x + _ffn(cfg, layer["ffn"], x)
  return x @ params["head"]


def _reference_loss(cfg, params, tokens):
  logits = _reference_forward(cfg, params, tokens)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1))


REFERENCE_CONFIGS = {
    "hybrid_moe": TINY,
    "softmax_dense": dataclasses.replace(TINY, layer_pattern=(SOFTMAX,), ffn_type="dense", intermediate_size=64),
    "lightning_moe_ragged": dataclasses.replace(TINY, layer_pattern=(LIGHTNING,), num_layers=3, block_size=8),
    "hybrid_wide": dataclasses.replace(TINY, hidden_size=128, head_dim=32, num_layers=4,
                                       layer_pattern=(LIGHTNING, LIGHTNING, LIGHTNING, SOFTMAX), block_size=16,
                                       intermediate_size=128, vocab_size=256),
}


def test_matmul_matches_cost_analysis_for_plain_matmul():
  f = lambda a, b: a @ b
  a, b = jnp.ones((8, 16)), jnp.ones((16, 32))
  assert matmul_flops(f, a, b) == xla_flops(f, a, b) == 2 * 8 * 16 * 32


@pytest.mark.parametrize("seq_len", [16, 24])
def test_softmax_and_lightning_layers_against_jaxpr_and_xla(seq_len):
  cfg = dataclasses.replace(TINY, hidden_size=64, head_dim=16, block_size=16)
  params = _init_reference(cfg, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, seq_len, cfg.hidden_size))
  n_tok = 2 * seq_len
  for kind, fn, p in ((SOFTMAX, _softmax_attention, params["layers"][1]["attn"]),
                      (LIGHTNING, _lightning_attention, params["layers"][0]["attn"])):
    one = dataclasses.replace(cfg, layer_pattern=(kind,), num_layers=1)
    b = flops.forward_flops_breakdown(one, seq_len, "masked")
    expected = b.attention_projections + b.attention_mixing
    f = lambda p, x: fn(cfg, p, x)
    assert matmul_flops(f, p, x) == pytest.approx(expected * n_tok, rel=1e-12), kind
    assert xla_flops(f, p, x) == pytest.approx(expected * n_tok, rel=0.10), kind


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_reference_model_forward_and_backward(name):
  """Exact matmul agreement; XLA's total within a few percent (the rest is elementwise work)."""
  cfg = REFERENCE_CONFIGS[name]
  batch, seq_len = 2, 20
  params = _init_reference(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len), 0, cfg.vocab_size)
  n_tok = batch * seq_len
  fwd = lambda p, t: _reference_forward(cfg, p, t)
  train = jax.grad(lambda p, t: _reference_loss(cfg, p, t))
  fwd_model = flops.forward_flops_per_token(cfg, seq_len, "masked") * n_tok
  assert matmul_flops(fwd, params, tokens) == pytest.approx(fwd_model, rel=1e-12)
  assert matmul_flops(train, params, tokens) == pytest.approx(3 * fwd_model, rel=1e-12)
  # XLA counts elementwise ops too (softmax, silu, decay masks, log-softmax): a few percent here.
  assert xla_flops(fwd, params, tokens) == pytest.approx(fwd_model, rel=0.10)
  assert xla_flops(train, params, tokens) == pytest.approx(3 * fwd_model, rel=0.10)


# ---- 3. the real model ------------------------------------------------------------------

_HAVE_MODEL = importlib.util.find_spec("mx01.model") is not None


def _model_fns(cfg):
  """init, forward and gradient of mx01/model.py with the routed (grouped-matmul) MoE experts.

  The FLOP model counts the activated experts only.  On CPU the model may run
  every expert on every token instead (E/k times the expert FLOPs, a speed
  choice for few experts), so the routed path is pinned here.
  """
  import functools
  from mx01 import model as mx01_model
  from mx01 import ops as ops_lib
  from mx01.layers import moe as moe_lib
  ops = dataclasses.replace(ops_lib.default_ops(cfg),
                            moe=functools.partial(moe_lib.moe_forward, experts_fn=moe_lib.experts_grouped))
  fwd = lambda p, t: mx01_model.apply(p, t, config=cfg, ops=ops)[0]
  loss = lambda p, t: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(fwd(p, t)), t[..., None], axis=-1))
  return mx01_model.init, fwd, jax.grad(loss)


@pytest.mark.skipif(not _HAVE_MODEL, reason="mx01/model.py does not exist yet")
@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_mx01_model_matmul_flops_and_params(name):
  """mx01/model.py does exactly the matmuls the FLOP model counts, forward and backward."""
  cfg = REFERENCE_CONFIGS[name]
  init, fwd, grad = _model_fns(cfg)
  batch, seq_len = 2, 20
  params = init(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len), 0, cfg.vocab_size)
  fwd_model = flops.forward_flops_per_token(cfg, seq_len, "masked") * batch * seq_len
  assert matmul_flops(fwd, params, tokens) == pytest.approx(fwd_model, rel=1e-9)
  assert matmul_flops(grad, params, tokens) == pytest.approx(3 * fwd_model, rel=1e-9)
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == flops.param_count(cfg).total


@pytest.mark.skipif(not _HAVE_MODEL, reason="mx01/model.py does not exist yet")
@pytest.mark.parametrize("name", ["softmax_dense", "hybrid_wide_dense"])
def test_mx01_model_against_xla_cost_analysis(name):
  """XLA's total (elementwise ops included) is within 10% of the matmul model on dense-FFN models.

  MoE configs are not compared with XLA: on CPU `ragged_dot` is expanded into a
  masked product over every expert (E/k times the routed work, plus the masks),
  so cost_analysis reports what that expansion executes, not the routed FLOPs.
  The layers are unrolled: cost_analysis counts a scan's body once, not once per iteration.
  """
  cfg = REFERENCE_CONFIGS.get(name) or dataclasses.replace(REFERENCE_CONFIGS["hybrid_wide"], ffn_type="dense",
                                                           intermediate_size=256)
  cfg = dataclasses.replace(cfg, scan_layers=False)
  init, fwd, grad = _model_fns(cfg)
  batch, seq_len = 2, 20
  params = init(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len), 0, cfg.vocab_size)
  fwd_model = flops.forward_flops_per_token(cfg, seq_len, "masked") * batch * seq_len
  assert xla_flops(fwd, params, tokens) == pytest.approx(fwd_model, rel=0.10)
  assert xla_flops(grad, params, tokens) == pytest.approx(3 * fwd_model, rel=0.10)
