"""W8A16: weight-only int8 quantisation with per-output-channel scales.

A quantised weight keeps int8 values and one float32 scale per output channel:

    W[..., i, o] ~= qvalue[..., i, o] * scale[..., o]      |qvalue| <= 127

(symmetric, scale = max_i |W[..., i, o]| / 127).  Activations stay in the
compute dtype (bf16).  The weight type and the matmul that reads it
(`QuantizedWeight`, `linear`) live with the layers (mx01/layers/linear.py):
the model's projections take a float or a quantised kernel alike, and the
MoE experts dequantise theirs to the compute dtype at use.

`quantize_params` converts a checkpoint (the plain params pytree of
`mx01.model.init`): the attention projections (lightning qkv/gate/out, softmax
q/k/v/o) and the expert weights (MoE wi_gate/wi_up/wo, or the dense MLP) become
`QuantizedWeight`s; embeddings, the LM head, norms and the router stay as they
are.  Converted params go through `mx01.model.apply` like float ones.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mx01.layers.linear import QuantizedWeight, linear  # noqa: F401 - linear re-exported for callers

# Param names (leaf keys) that get quantised, and the module names they sit under.
_ATTENTION_KERNELS = {"qkv_proj", "output_gate", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"}
_EXPERT_WEIGHTS = {"wi_gate", "wi_up", "wo"}


def quantize_weight(w) -> QuantizedWeight:
  """w [..., in, out] float -> QuantizedWeight (symmetric, per output channel, round to nearest)."""
  w32 = jnp.asarray(w, jnp.float32)
  absmax = jnp.max(jnp.abs(w32), axis=-2)  # [..., out]
  scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w32 / scale[..., None, :]), -127, 127).astype(jnp.int8)
  return QuantizedWeight(qvalue=q, scale=scale.astype(jnp.float32))


def _should_quantize(path: tuple[str, ...]) -> bool:
  names = set(path)
  if "lm_head" in names or "embed" in names:
    return False
  if path[-1] == "kernel" and len(path) >= 2 and path[-2] in _ATTENTION_KERNELS:
    return True
  # MoE experts ("moe") or the dense MLP ("mlp"); the router stays in float.
  return path[-1] in _EXPERT_WEIGHTS and len(path) >= 2 and path[-2] in ("moe", "mlp")


def quantize_params(params: dict) -> dict:
  """Returns a copy of `params` with attention and expert weights as QuantizedWeight.

  Other leaves are returned unchanged (cast them to bf16 for a W8A16 deployment
  with `cast_floats`).  Works on any layout of the mx01 params tree.
  """

  def walk(node, path):
    if isinstance(node, dict):
      return {k: walk(v, path + (k,)) for k, v in node.items()}
    return quantize_weight(node) if _should_quantize(path) else node

  return walk(params, ())


def cast_floats(params: Any, dtype) -> Any:
  """Casts the floating leaves (not int8 values, not quantisation scales) to `dtype`."""

  def cast(x):
    if isinstance(x, QuantizedWeight):
      return x
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return jax.tree.map(cast, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


def dequantize_params(params: Any, dtype=jnp.float32) -> Any:
  """Inverse of `quantize_params` (up to rounding): QuantizedWeight -> dense array of `dtype`."""
  return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, QuantizedWeight) else x, params,
                      is_leaf=lambda x: isinstance(x, QuantizedWeight))


def param_bytes(params: Any, *, only_quantizable: bool = False) -> int:
  """Bytes of all array leaves (int8 values and scales of quantised weights included).

  only_quantizable=True counts only the leaves that `quantize_params` converts
  (QuantizedWeight leaves in a converted tree, the same paths in a float tree).
  """
  total = 0

  def walk(node, path):
    nonlocal total
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, path + (k,))
      return
    if only_quantizable and not (isinstance(node, QuantizedWeight) or _should_quantize(path)):
      return
    for leaf in jax.tree.leaves(node):
      total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize

  walk(params, ())
  return total
