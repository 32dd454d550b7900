"""Cache-aware forward pass of the decoder: chunked prefill and one-token decode.

The same layer math as `mx01.model.Decoder` (tests check logits against
`mx01.model.apply`), written as pure functions over the params pytree so that

* every layer reads and writes an explicit cache (`DecodeCache`): lightning
  layers a fixed-size state per head [batch, heads, head_dim, head_dim]
  (float32), softmax layers a key/value cache preallocated to `max_len`
  columns and written with `dynamic_update_slice`;
* attention and expert weights may be int8 `QuantizedWeight`s (W8A16, see
  `mx01.inference.quantize`).

Batch layout: prompts are LEFT-padded (right-aligned).  Row b's real tokens
occupy cache columns [start[b], index); every row's next token goes to the
same column `index`, so one decode step writes one cache column for the whole
batch.  Padding columns are masked out of softmax attention and have their
lightning keys zeroed (the state stays exactly zero through them), and RoPE
positions are `column - start[b]`, so each row computes exactly what an
unpadded forward over its own tokens computes.

`forward_chunk(params, tokens [b, c], cache)` processes c new columns for
every row (a prefill chunk, or c = 1 for a decode step) and returns the logits
and the updated cache; it is pure and jit-friendly.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from mx01.config import LIGHTNING, ModelConfig
from mx01.inference.quantize import grouped_linear, linear
from mx01.layers import moe as moe_lib
from mx01.layers.norms import rms_norm
from mx01.layers.rope import apply_rope
from mx01.lightning import minimax_log_decay
from mx01.ops import ModelOps, default_ops, lightning_decode_op


@flax.struct.dataclass
class DecodeCache:
  """Per-layer inference state.

  layers: one dict per layer: lightning {"state": [b, heads, head_dim, head_dim] f32},
    softmax {"k": [b, max_len, kv_heads, head_dim], "v": same} (post-RoPE keys).
  index: [] int32, the next column to write (= padded prompt length + tokens decoded).
  start: [b] int32, the first real column of each row (its amount of left padding).
  """
  layers: tuple
  index: jax.Array
  start: jax.Array

  @property
  def max_len(self) -> Optional[int]:
    """Columns of the key/value cache (None for a model without softmax layers)."""
    for layer in self.layers:
      if "k" in layer:
        return layer["k"].shape[1]
    return None


def init_cache(config: ModelConfig, batch_size: int, max_len: int, start=None, *, kv_dtype=None) -> DecodeCache:
  """An empty cache for `batch_size` rows and `max_len` columns.

  start [batch] int32: left padding of each row (zeros if None).  kv_dtype
  defaults to the compute dtype.
  """
  kv_dtype = jnp.dtype(kv_dtype or config.compute_dtype)
  h, kvh, d = config.num_heads, config.num_kv_heads, config.head_dim
  layers = []
  for kind in config.resolved_layer_types:
    if kind == LIGHTNING:
      layers.append({"state": jnp.zeros((batch_size, h, d, d), jnp.float32)})
    else:
      layers.append({"k": jnp.zeros((batch_size, max_len, kvh, d), kv_dtype),
                     "v": jnp.zeros((batch_size, max_len, kvh, d), kv_dtype)})
  start = jnp.zeros((batch_size,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
  return DecodeCache(layers=tuple(layers), index=jnp.zeros((), jnp.int32), start=start)


def cache_bytes(cache: DecodeCache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.layers))


# ---- attention over the cache ----------------------------------------------------

def cached_attention(q, k_cache, v_cache, q_cols, start, *, kv_block: int = 4096):
  """Softmax attention of new queries over the key/value cache (GQA).

  q [b, c, heads, d]; k_cache, v_cache [b, L, kv_heads, d]; q_cols [c] int32,
  the cache column of each query; start [b] int32.  Key column j is visible to
  query i of row b iff start[b] <= j <= q_cols[i].  Softmax in float32; the
  result is [b, c, heads, d] in q.dtype.  When L > kv_block the keys are
  visited in blocks of kv_block with an online softmax (memory O(c * kv_block)
  per head instead of O(c * L)).
  """
  b, c, h, d = q.shape
  L, kvh = k_cache.shape[1], k_cache.shape[2]
  scale = d ** -0.5
  qg = q.reshape(b, c, kvh, h // kvh, d)

  def visible(cols):  # cols [n] -> [b, c, n]
    return (cols[None, None, :] <= q_cols[None, :, None]) & (cols[None, None, :] >= start[:, None, None])

  if L <= kv_block:
    logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k_cache, preferred_element_type=jnp.float32) * scale
    mask = visible(jnp.arange(L, dtype=jnp.int32))
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v_cache)
    return out.reshape(b, c, h, d).astype(q.dtype)

  num_blocks = -(-L // kv_block)
  pad = num_blocks * kv_block - L
  if pad:
    k_cache = jnp.pad(k_cache, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v_cache = jnp.pad(v_cache, ((0, 0), (0, pad), (0, 0), (0, 0)))
  neg = jnp.finfo(jnp.float32).min

  def body(carry, blk):
    m, l, acc = carry  # [b, g, r, c], [b, g, r, c], [b, c, g, r, d]
    k_blk = jax.lax.dynamic_slice_in_dim(k_cache, blk * kv_block, kv_block, axis=1)
    v_blk = jax.lax.dynamic_slice_in_dim(v_cache, blk * kv_block, kv_block, axis=1)
    cols = blk * kv_block + jnp.arange(kv_block, dtype=jnp.int32)
    mask = (visible(cols) & (cols < L)[None, None])[:, None, None]  # [b, 1, 1, c, n]
    s = jnp.einsum("btgrd,bsgd->bgrts", qg, k_blk, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, neg)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = l * alpha + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bgrts,bsgd->btgrd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
    acc = acc * jnp.moveaxis(alpha, -1, 1)[..., None] + pv
    return (m_new, l, acc), None

  g, r = kvh, h // kvh
  init = (jnp.full((b, g, r, c), neg, jnp.float32), jnp.zeros((b, g, r, c), jnp.float32),
          jnp.zeros((b, c, g, r, d), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(body, init, jnp.arange(num_blocks))
  l = jnp.moveaxis(l, -1, 1)[..., None]  # [b, c, g, r, 1]
  out = jnp.where(l > 0, acc / jnp.maximum(l, 1e-30), 0.0)  # rows with no visible key (padding) -> 0
  return out.reshape(b, c, h, d).astype(q.dtype)


# ---- layers ------------------------------------------------------------------------

def experts_grouped(x, expert_idx, weights, wi_gate, wi_up, wo):
  """`mx01.layers.moe.experts_grouped` that also takes QuantizedWeight experts.

  x [tokens, hidden], expert_idx/weights [tokens, k]; weights [E, in, out].
  """
  t, k = expert_idx.shape
  e = wi_gate.shape[0]
  flat_expert = expert_idx.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True)
  token_of = order // k
  row_group = flat_expert[order]
  group_sizes = jnp.bincount(flat_expert, length=e).astype(jnp.int32)
  xs = x[token_of]
  h = jax.nn.silu(grouped_linear(xs, wi_gate, group_sizes, row_group)) * grouped_linear(
      xs, wi_up, group_sizes, row_group)
  ys = grouped_linear(h, wo, group_sizes, row_group)
  ys = ys.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
  return jnp.zeros((t, x.shape[-1]), jnp.float32).at[token_of].add(ys).astype(x.dtype)


def lightning_decode_fn(config: ModelConfig):
  """The one-token lightning update the config selects (mx01/ops.py's LIGHTNING_DECODE)."""
  return lightning_decode_op(config)


def _lightning_attention(p, x, state, key_mask, *, cfg: ModelConfig, layer_idx: int, ops: ModelOps):
  """x [b, t, hidden] -> (y [b, t, hidden], new state [b, h, d, d])."""
  b, t, _ = x.shape
  h, d = cfg.num_heads, cfg.head_dim
  qkv = jax.nn.silu(linear(x, p["qkv_proj"]["kernel"])).reshape(b, t, h, 3 * d)
  q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
  k = jnp.where(key_mask[:, :, None, None], k, jnp.zeros_like(k))  # padding adds nothing to the state
  log_decay = jnp.asarray(minimax_log_decay(h, layer_idx, cfg.num_layers))
  if t == 1:
    o, state = lightning_decode_fn(cfg)(q[:, 0], k[:, 0], v[:, 0], log_decay, state)
    o = o[:, None]
  else:
    o, state = ops.lightning(q, k, v, log_decay, block_size=cfg.block_size, segment_ids=None, initial_state=state)
  o = rms_norm(o.reshape(b, t, h * d), p["norm"]["scale"], cfg.rms_norm_eps)
  o = jax.nn.sigmoid(linear(x, p["output_gate"]["kernel"])) * o
  return linear(o, p["out_proj"]["kernel"]), state


def _softmax_attention(p, x, layer_cache, q_cols, start, index, *, cfg: ModelConfig, kv_block: int):
  """x [b, t, hidden] -> (y [b, t, hidden], updated {"k", "v"} cache)."""
  b, t, _ = x.shape
  h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q = linear(x, p["q_proj"]["kernel"]).reshape(b, t, h, d)
  k = linear(x, p["k_proj"]["kernel"]).reshape(b, t, kvh, d)
  v = linear(x, p["v_proj"]["kernel"]).reshape(b, t, kvh, d)
  positions = q_cols[None, :] - start[:, None]  # [b, t]; negative on padding, never attended
  rd = cfg.resolved_rotary_dim
  q = apply_rope(q, positions, rotary_dim=rd, theta=cfg.rope_theta)
  k = apply_rope(k, positions, rotary_dim=rd, theta=cfg.rope_theta)
  k_cache = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, index, 0, 0))
  v_cache = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, index, 0, 0))
  o = cached_attention(q, k_cache, v_cache, q_cols, start, kv_block=kv_block)
  return linear(o.reshape(b, t, h * d), p["o_proj"]["kernel"]), {"k": k_cache, "v": v_cache}


def _feed_forward(p, x, *, cfg: ModelConfig, ops: ModelOps):
  if cfg.is_moe:
    moe_params = {name: p["moe"][name] for name in ("router", "wi_gate", "wi_up", "wo")}
    y, _ = moe_lib.moe_forward(x, moe_params, config=cfg, experts_fn=experts_grouped)
    return y
  mlp = p["mlp"]
  hid = jax.nn.silu(linear(x, mlp["wi_gate"])) * linear(x, mlp["wi_up"])
  return linear(hid, mlp["wo"])


def forward_chunk(params: dict, tokens, cache: DecodeCache, *, config: ModelConfig, ops: Optional[ModelOps] = None,
                  logits_mode: str = "last", kv_block: int = 4096):
  """Runs c new columns through the model, reading and updating the cache.

  tokens [b, c] int32 (padding columns may hold any token id).  Returns
  (logits, new_cache): logits [b, vocab] float32 for the last column
  (logits_mode="last") or [b, c, vocab] (logits_mode="all").  The MoE runs
  without capacity limits (dropless), like the training forward with
  capacity_factor=None.
  """
  cfg = config
  ops = ops or default_ops(cfg)
  cd = jnp.dtype(cfg.compute_dtype)
  b, c = tokens.shape
  q_cols = cache.index + jnp.arange(c, dtype=jnp.int32)
  key_mask = q_cols[None, :] >= cache.start[:, None]  # [b, c] real (non-padding) columns
  x = jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(cd)
  new_layers = []
  for i, kind in enumerate(cfg.resolved_layer_types):
    p = params[f"layers_{i}"]
    h = rms_norm(x, p["input_norm"]["scale"], cfg.rms_norm_eps)
    if kind == LIGHTNING:
      attn_out, state = _lightning_attention(p["attn"], h, cache.layers[i]["state"], key_mask, cfg=cfg, layer_idx=i,
                                             ops=ops)
      new_layers.append({"state": state})
      alpha, beta = cfg.lightning_alpha, cfg.lightning_beta
    else:
      attn_out, kv = _softmax_attention(p["attn"], h, cache.layers[i], q_cols, cache.start, cache.index, cfg=cfg,
                                        kv_block=kv_block)
      new_layers.append(kv)
      alpha, beta = cfg.softmax_alpha, cfg.softmax_beta
    x = h * alpha + attn_out.astype(h.dtype) * beta
    h = rms_norm(x, p["post_attn_norm"]["scale"], cfg.rms_norm_eps)
    x = h * cfg.mlp_alpha + _feed_forward(p, h.astype(cd), cfg=cfg, ops=ops).astype(h.dtype) * cfg.mlp_beta
  if logits_mode == "last":
    x = x[:, -1:]
  elif logits_mode != "all":
    raise ValueError(f"logits_mode must be 'last' or 'all', got {logits_mode!r}")
  x = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps)
  if cfg.tie_word_embeddings:
    logits = jnp.dot(x, params["embed"]["embedding"].astype(cd).T, preferred_element_type=jnp.float32)
  else:
    logits = linear(x, params["lm_head"]["kernel"])
  logits = logits.astype(jnp.float32)
  if logits_mode == "last":
    logits = logits[:, 0]
  new_cache = DecodeCache(layers=tuple(new_layers), index=cache.index + c, start=cache.start)
  return logits, new_cache


def decode_step(params: dict, cache: DecodeCache, tokens, *, config: ModelConfig, ops: Optional[ModelOps] = None,
                kv_block: int = 4096):
  """One token per row: tokens [b] -> (logits [b, vocab] float32, cache advanced by one column)."""
  return forward_chunk(params, tokens[:, None], cache, config=config, ops=ops, logits_mode="last", kv_block=kv_block)

