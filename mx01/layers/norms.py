"""RMSNorm, computed in float32 and cast back (as the released model does)."""

import flax.linen as nn
import jax.numpy as jnp


def rms_norm(x, scale, eps: float):
  """x [..., d], scale [d] -> [..., d] in x.dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
  return (scale.astype(jnp.float32) * y).astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float = 1e-5
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return rms_norm(x, scale, self.eps)
