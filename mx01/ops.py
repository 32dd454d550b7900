"""The swappable compute of the decoder: attention kernels and the MoE.

The decoder (`mx01/model.py`) is a thin assembly of projections, norms and
residuals; the three pieces of heavy compute are called through a `ModelOps`
so that the same model runs with the plain reference, the Pallas kernels, or
the sharded versions in `mx01/parallel/` (LASP+, ring attention, expert
parallel MoE) without a second copy of the stack.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mx01 import lightning as lightning_lib
from mx01.config import ModelConfig
from mx01.layers import moe as moe_lib


def causal_attention(q, k, v, *, segment_ids=None, implementation: Optional[str] = None):
  """Causal softmax attention with GQA and packed-sequence masking.

  q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads, head_dim],
  segment_ids [batch, seq] (tokens attend only within their segment).
  Returns [batch, seq, heads, head_dim] in q.dtype; softmax in float32.
  """
  b, t, h, d = q.shape
  kvh = k.shape[2]
  scale = d ** -0.5
  if implementation is not None:
    mask = None
    if segment_ids is not None:
      mask = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=scale,
                                        implementation=implementation)
  qg = q.reshape(b, t, kvh, h // kvh, d)
  logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k, preferred_element_type=jnp.float32) * scale
  mask = jnp.tril(jnp.ones((t, t), bool))[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bgrts,bsgd->btgrd", probs, v)
  return out.reshape(b, t, h, d)


def resolve_lightning_impl(impl: str) -> str:
  """Maps the config's lightning_impl to an implementation name of mx01.lightning."""
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "chunked"
  return {"reference": "recurrent", "xla": "chunked", "pallas": "pallas"}[impl]


@dataclasses.dataclass(frozen=True)
class ModelOps:
  """lightning(q, k, v, log_decay, *, block_size, segment_ids, initial_state) -> (out, final_state)
  attention(q, k, v, *, segment_ids) -> out
  moe(x, params, *, config, token_mask) -> (out, stats)
  """
  lightning: Callable
  attention: Callable
  moe: Callable


def default_ops(config: ModelConfig) -> ModelOps:
  """Single-device ops chosen by the config."""
  impl = resolve_lightning_impl(config.lightning_impl)
  return ModelOps(
      lightning=functools.partial(lightning_lib.lightning_attention, impl=impl),
      attention=causal_attention,
      moe=moe_lib.moe_forward,
  )
