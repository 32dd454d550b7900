"""Generation caches: their allocation and size (the model's layers read and write them).

    cache = init_cache(config, batch_size, max_len)
    logits, aux = model.apply(params, tokens, config=config, cache=cache, token_mask=mask)
    cache = aux["cache"]

Layout (what `mx01.model.apply` expects):
  {"lengths": [batch] int32, tokens already cached per row,
   "layers": per-layer caches in the params' layout (`model.params_from_layers`;
             stacked over the repeats of a scanned period)}
  lightning layer: {"state": [batch, heads, head_dim, head_dim] float32}
  softmax layer:   {"k", "v": [batch, max_len, kv_heads, head_dim]} (post-RoPE keys; slot j = position j)

On a mesh (`cache_shardings`) the cache is split over heads as the attention params are (tensor
parallel), so each device keeps the keys, values and lightning states of its own heads.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mx01 import model as model_lib
from mx01.config import LIGHTNING, SOFTMAX, ModelConfig


def init_cache(config: ModelConfig, batch_size: int, max_len: int, *, kv_dtype=None) -> dict:
  """An empty cache for `batch_size` rows of up to `max_len` positions.

  kv_dtype defaults to the compute dtype.  A model without softmax layers
  keeps no keys: its cache does not grow with `max_len`.
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
  return {"lengths": jnp.zeros((batch_size,), jnp.int32),
          "layers": model_lib.params_from_layers({}, layers, config)}


def cache_shardings(cache: dict, pmesh) -> dict:
  """NamedShardings for `cache` on a ParallelMesh: the heads dimension over `tensor`, the rest replicated.

  Stacked (scanned) layers have a leading repeats dimension; the heads dimension is found from the end.
  """

  def spec(path, x):
    name = getattr(path[-1], "key", None)
    if name in ("k", "v"):  # [..., batch, max_len, kv_heads, head_dim]
      return pmesh.sharding(*([None] * (x.ndim - 2)), "tensor", None)
    if name == "state":  # [..., batch, heads, head_dim, head_dim]
      return pmesh.sharding(*([None] * (x.ndim - 3)), "tensor", None, None)
    return pmesh.sharding()

  return jax.tree_util.tree_map_with_path(spec, cache)


def max_len(config: ModelConfig, cache: dict) -> Optional[int]:
  """Positions the key/value cache holds (None for a model without softmax layers)."""
  if SOFTMAX not in config.resolved_layer_types:
    return None
  kinds = config.resolved_layer_types
  return model_lib.layer_params(cache["layers"], config)[kinds.index(SOFTMAX)]["k"].shape[1]


def cache_bytes(cache: dict) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache["layers"]))
