"""RMSNorm, computed in float32 and cast back (as the released model does).

The normalised dimension may be split over devices (the lightning layer's norm
over all heads, under tensor parallelism): each device holds its slice of x
and of the scale, and the sum of squares is added over the devices first.
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from mx01.layers.param import param
from mx01.ops import ONE_DEVICE, LocalShards


def rms_norm(x, scale, eps: float, *, shards: LocalShards = ONE_DEVICE, axis: Optional[str] = None):
  """x [..., d], scale [d] -> [..., d] in x.dtype; d is this device's slice of logical axis `axis`."""
  x32 = x.astype(jnp.float32)
  sum_sq = shards.psum(jnp.sum(x32 * x32, axis=-1, keepdims=True), axis)
  mean_sq = sum_sq / (x.shape[-1] * shards.ways(axis))
  y = x32 * jnp.reciprocal(jnp.sqrt(mean_sq + eps))
  return (scale.astype(jnp.float32) * y).astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float = 1e-5
  param_dtype: jnp.dtype = jnp.float32
  axis: str = "norm"  # the logical axis of the normalised dimension (its scale's only axis)
  shards: LocalShards = ONE_DEVICE

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1] * self.shards.ways(self.axis)  # global
    scale = param(self, "scale", nn.initializers.ones, (width,), (self.axis,), self.param_dtype, self.shards)
    return rms_norm(x, scale, self.eps, shards=self.shards, axis=self.axis)
