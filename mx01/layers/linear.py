"""The projection every layer uses: a float kernel or a W8A16 int8 one, through one `linear`.

A quantised weight keeps int8 values and one float32 scale per output channel,

    W[..., i, o] ~= qvalue[..., i, o] * scale[..., o]      |qvalue| <= 127,

and is a pytree (`QuantizedWeight`), so a params tree holding it goes through
`mx01.model.apply` unchanged: `Linear` reads whichever kernel the tree holds.
The int8 values are converted to the activation dtype inside the dot and the
scale is applied to the float32 output, exact because the scale is constant
along the contracted axis: x @ (q * s) == (x @ q) * s.  Converting a params
tree is `mx01.inference.quantize`'s job.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mx01.layers.param import param
from mx01.ops import ONE_DEVICE, LocalShards


@flax.struct.dataclass
class QuantizedWeight:
  """int8 weight with per-output-channel scales.

  qvalue [..., in, out] int8; scale [..., out] float32 (leading axes, e.g.
  experts, are kept: an expert weight [E, in, out] has scale [E, out]).
  """
  qvalue: jax.Array
  scale: jax.Array

  @property
  def shape(self):
    return self.qvalue.shape

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return (self.qvalue.astype(jnp.float32) * self.scale[..., None, :]).astype(dtype)


def is_quantized(w) -> bool:
  return isinstance(w, QuantizedWeight)


def linear(x, w, *, out_dtype=None):
  """x [..., in] @ w [in, out] -> [..., out] in x.dtype (or out_dtype).

  w is a float array (cast to x.dtype, as flax's Dense does) or a
  QuantizedWeight (int8 converted to x.dtype inside the dot, f32 accumulate,
  scaled per output channel).
  """
  out_dtype = out_dtype or x.dtype
  if is_quantized(w):
    y = jnp.dot(x, w.qvalue.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * w.scale).astype(out_dtype)
  return jnp.dot(x, w.astype(x.dtype)).astype(out_dtype)


def in_dtype(w, dtype):
  """A weight as a dense array of `dtype` (a QuantizedWeight is dequantised), for ops that take plain arrays."""
  return w.dequantize(dtype) if is_quantized(w) else w.astype(dtype)


class Linear(nn.Module):
  """y = x @ kernel without bias; kernel [in, features] float or QuantizedWeight.

  names: the logical axes (in, out) of the kernel.  Under tensor parallelism
  (`shards`) the kernel is this device's piece: split over `out` it is
  column-parallel (x whole, y this device's features); split over `in` it is
  row-parallel (x this device's slice, y a partial sum), and the partial sums
  are added over the devices sharing `in` here, so y is whole.
  """
  features: int  # global
  names: Tuple[Optional[str], Optional[str]]
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  kernel_init: Callable
  shards: LocalShards = ONE_DEVICE

  @nn.compact
  def __call__(self, x):
    """x [..., in / ways(in)] -> [..., features / ways(out)] in `dtype`."""
    in_features = x.shape[-1] * self.shards.ways(self.names[0])  # global
    kernel = param(self, "kernel", self.kernel_init, (in_features, self.features), self.names, self.param_dtype,
                   self.shards)
    return self.shards.psum(linear(x.astype(self.dtype), kernel), self.names[0])
