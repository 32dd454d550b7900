"""The softmax attention layer: grouped-query attention with partial RoPE.

With a cache (generation) the layer writes its post-RoPE keys/values into a
preallocated cache {"k", "v": [batch, max_len, kv_heads, head_dim]} at each
token's position (rows of a batch have their own lengths) and attends over it
(`cached_attention`).

Tensor parallel (`ops.shards` splits "heads" and "kv_heads"): each device
holds whole query and key/value heads (column-split q/k/v projections) and its
rows of o_proj, whose partial sums are added over the devices (linear.py).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mx01.config import ModelConfig
from mx01.layers.lightning_layer import dense
from mx01.layers.rope import apply_rope


def cached_attention(q, k_cache, v_cache, q_pos, *, kv_block: int = 4096):
  """Causal softmax attention of new queries over a key/value cache (GQA).

  q [b, c, heads, d]; k_cache, v_cache [b, L, kv_heads, d] (slot j holds the
  key of position j); q_pos [b, c] int32, the position of each query.  Slot j
  is visible to query i of row b iff j <= q_pos[b, i].  Softmax in float32; the
  result is [b, c, heads, d] in q.dtype.  When L > kv_block the keys are
  visited in blocks of kv_block with an online softmax (memory O(c * kv_block)
  per head instead of O(c * L)).  A query with no visible slot gets zeros.
  """
  b, c, h, d = q.shape
  L, kvh = k_cache.shape[1], k_cache.shape[2]
  scale = d ** -0.5
  g, r = kvh, h // kvh
  qg = q.reshape(b, c, g, r, d)
  neg = jnp.finfo(jnp.float32).min

  def visible(cols):  # cols [n] -> [b, 1, 1, c, n]
    return (cols[None, None, :] <= q_pos[:, :, None])[:, None, None]

  if L <= kv_block:
    s = jnp.einsum("btgrd,bsgd->bgrts", qg, k_cache, preferred_element_type=jnp.float32) * scale
    mask = visible(jnp.arange(L, dtype=jnp.int32))
    probs = jax.nn.softmax(jnp.where(mask, s, neg), axis=-1)
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0).astype(v_cache.dtype)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v_cache)
    return out.reshape(b, c, h, d).astype(q.dtype)

  num_blocks = -(-L // kv_block)
  pad = num_blocks * kv_block - L
  if pad:
    k_cache = jnp.pad(k_cache, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v_cache = jnp.pad(v_cache, ((0, 0), (0, pad), (0, 0), (0, 0)))

  def body(carry, blk):
    m, l, acc = carry  # [b, g, r, c], [b, g, r, c], [b, c, g, r, d]
    k_blk = jax.lax.dynamic_slice_in_dim(k_cache, blk * kv_block, kv_block, axis=1)
    v_blk = jax.lax.dynamic_slice_in_dim(v_cache, blk * kv_block, kv_block, axis=1)
    cols = blk * kv_block + jnp.arange(kv_block, dtype=jnp.int32)
    mask = visible(cols) & (cols < L)[None, None, None, None]  # [b, 1, 1, c, n]
    s = jnp.einsum("btgrd,bsgd->bgrts", qg, k_blk, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, neg)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = l * alpha + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bgrts,bsgd->btgrd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
    acc = acc * jnp.moveaxis(alpha, -1, 1)[..., None] + pv
    return (m_new, l, acc), None

  init = (jnp.full((b, g, r, c), neg, jnp.float32), jnp.zeros((b, g, r, c), jnp.float32),
          jnp.zeros((b, c, g, r, d), jnp.float32))
  (_, l, acc), _ = jax.lax.scan(body, init, jnp.arange(num_blocks))
  l = jnp.moveaxis(l, -1, 1)[..., None]  # [b, c, g, r, 1]
  out = jnp.where(l > 0, acc / jnp.maximum(l, 1e-30), 0.0)
  return out.reshape(b, c, h, d).astype(q.dtype)


class SoftmaxAttentionLayer(nn.Module):
  config: ModelConfig
  ops: Any  # mx01.ops.ModelOps
  kv_block: int = 4096  # cached attention's key block (generation only)

  @nn.compact
  def __call__(self, x, *, positions, segment_ids=None, cache: Optional[dict] = None, token_mask=None):
    """x [batch, seq, hidden], positions [batch, seq] -> (y [batch, seq, hidden], new cache or None).

    cache {"k", "v"}: keys/values of positions < each row's length; the new
    tokens' keys go to their positions (token_mask False: not written).
    """
    cfg, shards = self.config, self.ops.shards
    b, t, _ = x.shape
    d = cfg.head_dim
    h, kvh = cfg.num_heads // shards.ways("heads"), cfg.num_kv_heads // shards.ways("kv_heads")  # this device's
    q = dense(cfg.num_heads * d, ("embed", "heads"), cfg, self.ops, "q_proj")(x).reshape(b, t, h, d)
    k = dense(cfg.num_kv_heads * d, ("embed", "kv_heads"), cfg, self.ops, "k_proj")(x).reshape(b, t, kvh, d)
    v = dense(cfg.num_kv_heads * d, ("embed", "kv_heads"), cfg, self.ops, "v_proj")(x).reshape(b, t, kvh, d)
    rd = cfg.resolved_rotary_dim
    q = apply_rope(q, positions, rotary_dim=rd, theta=cfg.rope_theta)
    k = apply_rope(k, positions, rotary_dim=rd, theta=cfg.rope_theta)
    if cache is None:
      o, new_cache = self.ops.attention(q, k, v, segment_ids=segment_ids), None
    else:
      max_len = cache["k"].shape[1]
      slot = positions if token_mask is None else jnp.where(token_mask, positions, max_len)  # max_len: dropped
      rows = jnp.arange(b)[:, None]
      new_cache = {name: cache[name].at[rows, slot].set(new.astype(cache[name].dtype), mode="drop")
                   for name, new in (("k", k), ("v", v))}
      o = cached_attention(q, new_cache["k"], new_cache["v"], positions, kv_block=self.kv_block)
    return dense(cfg.hidden_size, ("heads", "embed"), cfg, self.ops, "o_proj")(o.reshape(b, t, h * d)), new_cache
