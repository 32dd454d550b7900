"""Causal softmax attention on jax's Pallas (Triton) flash-attention kernels.

`flash_attention` runs jax.experimental.pallas.ops.gpu.attention.mha (forward
and backward kernels, segment ids for packed rows), with GQA by repeating the
K/V heads and the tail padded to a block.

Varying mesh axes.  Inside `shard_map(check_vma=True)` a pallas_call must
state in its `out_shape` how its outputs vary over the mesh
(`jax.ShapeDtypeStruct(..., manual_axis_type=...)`); jax's `mha` builds its
out_shapes without it, so its outputs would be typed as replicated and the
custom_vjp's cotangents would not match its varying inputs.  The routes:
  * patching `pl` in jax's own attention module changes it for every user in
    the process (rejected);
  * casting the outputs to varying afterwards transposes to a psum in the
    backward pass: wrong gradients (rejected);
  * copying mha's 300 lines of wiring means maintaining a fork (rejected);
  * chosen: a private instance of jax's module - its unchanged source loaded
    once more by importlib under a name of ours - whose global
    `pl` is a namespace where `pallas_call` gives every output the inputs'
    varying axes (`_common.match_varying`, as our own kernels do).  jax's
    module stays untouched, the kernels and their tiling are jax's own, and
    outside shard_map nothing changes.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp

from pallas_kernels import _common as cm

_JAX_ATTENTION = "jax.experimental.pallas.ops.gpu.attention"
_PRIVATE_NAME = "pallas_kernels._jax_attention_declaring_vma"


def _declaring_pallas_call(pallas_call):
  """`pallas_call` whose outputs vary over the union of the operands' varying mesh axes."""

  def declaring(kernel, *args, out_shape, **kwargs):
    def call(*operands):
      operands, axis_type = cm.match_varying(operands)
      shapes = jax.tree.map(lambda s: cm.out_struct(s.shape, s.dtype, axis_type), out_shape)
      return pallas_call(kernel, *args, out_shape=shapes, **kwargs)(*operands)
    return call

  return declaring


@functools.cache
def _attention_module():
  """A private instance of jax's Pallas attention module whose pallas_calls declare varying axes."""
  from jax.experimental import pallas as pl

  source = importlib.util.find_spec(_JAX_ATTENTION).origin
  spec = importlib.util.spec_from_file_location(_PRIVATE_NAME, source)
  module = importlib.util.module_from_spec(spec)
  sys.modules[_PRIVATE_NAME] = module  # dataclasses look their module up while the source runs
  spec.loader.exec_module(module)
  namespace = types.SimpleNamespace(**{n: getattr(pl, n) for n in dir(pl) if not n.startswith("__")})
  namespace.pallas_call = _declaring_pallas_call(pl.pallas_call)
  module.pl = namespace
  return module


def flash_attention(q, k, v, segment_ids=None, *, scale: float, interpret: bool = False):
  """Causal attention with packed-row masking on jax's Pallas flash-attention kernels.

  q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim];
  segment_ids [batch, seq] int or None.  Returns [batch, seq, heads, head_dim] in q.dtype.
  Blocks: 128 tokens (smaller for shorter rows).
  """
  module = _attention_module()
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
  sizes = module.BlockSizes(block_q=block, block_k=block, block_q_dkv=block, block_kv_dkv=block,
                            block_q_dq=block, block_kv_dq=block)
  out = module.mha(q, k, v, seg, sm_scale=scale, causal=True, block_sizes=sizes, interpret=interpret)
  return out[:, :t]
