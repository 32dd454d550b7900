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
import types
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mx01 import lightning as lightning_lib
from mx01.config import ModelConfig
from mx01.layers import moe as moe_lib


def causal_attention(q, k, v, *, segment_ids=None, implementation: str = "xla", interpret: bool = False):
  """Causal softmax attention with GQA and packed-sequence masking.

  q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads, head_dim],
  segment_ids [batch, seq] (tokens attend only within their segment).
  Returns [batch, seq, heads, head_dim] in q.dtype; softmax in float32.

  implementation: "xla" (materialises the [seq, seq] scores), "pallas" (jax's
  Pallas flash attention, which takes segment ids), or "cudnn" (cuDNN flash
  attention; rows must not be packed).
  """
  b, t, h, d = q.shape
  kvh = k.shape[2]
  scale = d ** -0.5
  if implementation == "pallas":
    return _pallas_flash_attention(q, k, v, segment_ids, scale, interpret)
  if implementation == "cudnn":
    if segment_ids is not None:
      raise ValueError("attention_impl='cudnn' does not take packed rows (segment_ids); use 'pallas' or 'xla'")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation="cudnn")
  if implementation != "xla":
    raise ValueError(f"implementation must be 'xla', 'pallas' or 'cudnn', got {implementation!r}")
  qg = q.reshape(b, t, kvh, h // kvh, d)
  logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k, preferred_element_type=jnp.float32) * scale
  mask = jnp.tril(jnp.ones((t, t), bool))[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bgrts,bsgd->btgrd", probs, v)
  return out.reshape(b, t, h, d)


def _flash_attention_module():
  """jax's Pallas (Triton) flash attention module, made usable inside `shard_map(check_vma=True)`.

  Inside shard_map a pallas_call must state how its outputs vary across the
  mesh (`manual_axis_type`), and jax's attention kernels do not.  Their module
  reaches `pallas_call` through its global `pl`; pointing that at a namespace
  whose `pallas_call` declares the inputs' varying axes on every output (as
  our own kernels do, pallas_kernels/_common.py) lets the same kernels run in
  the sharded step.  Outside shard_map the wrapper changes nothing.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas.ops.gpu import attention as module

  if not getattr(module.pl, "_mx01_declares_varying_axes", False):
    from pallas_kernels._common import match_varying, out_struct

    def pallas_call(kernel, *args, out_shape, **kwargs):
      def call(*operands):
        operands, axis_type = match_varying(operands)
        shapes = jax.tree.map(lambda s: out_struct(s.shape, s.dtype, axis_type), out_shape)
        return pl.pallas_call(kernel, *args, out_shape=shapes, **kwargs)(*operands)
      return call

    namespace = types.SimpleNamespace(**{n: getattr(pl, n) for n in dir(pl) if not n.startswith("__")})
    namespace.pallas_call = pallas_call
    namespace._mx01_declares_varying_axes = True
    module.pl = namespace
  return module


def _pallas_flash_attention(q, k, v, segment_ids, scale, interpret):
  """jax's Pallas (Triton) flash attention; K/V heads repeated for GQA, the tail padded to a block."""
  pallas_attention = _flash_attention_module()
  b, t, h, d = q.shape
  rep = h // k.shape[2]
  if rep > 1:
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  block = 128 if t >= 128 else max(16, 1 << (t - 1).bit_length())
  pad = -t % block
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)  # padding attends only to padding
  sizes = pallas_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block, block_kv_dkv=block,
                                      block_q_dq=block, block_kv_dq=block)
  out = pallas_attention.mha(q, k, v, seg, sm_scale=scale, causal=True, block_sizes=sizes, interpret=interpret)
  return out[:, :t]


def resolve_attention_impl(impl: str) -> str:
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl


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
  lightning_decode(q, k, v, log_decay, state) -> (out, new_state): one token per row (generation)
  """
  lightning: Callable
  attention: Callable
  moe: Callable
  lightning_decode: Callable = lightning_lib.lightning_decode_step


def default_ops(config: ModelConfig) -> ModelOps:
  """Single-device ops chosen by the config."""
  impl = resolve_lightning_impl(config.lightning_impl)
  return ModelOps(
      lightning=functools.partial(lightning_lib.lightning_attention, impl=impl),
      attention=functools.partial(causal_attention, implementation=resolve_attention_impl(config.attention_impl)),
      moe=moe_lib.moe_forward,
      lightning_decode=_lightning_decode_fn(impl),
  )


def _lightning_decode_fn(impl: str) -> Callable:
  """The one-token lightning update: the Pallas kernel with the Pallas implementation, else XLA."""
  if impl == "pallas":
    import pallas_kernels  # imported lazily: the model works without the kernels
    return pallas_kernels.lightning_decode
  return lightning_lib.lightning_decode_step
