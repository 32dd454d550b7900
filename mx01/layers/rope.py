"""Rotary position embedding on the first `rotary_dim` dims of each head.

MiniMax-Text-01 rotates half of each 128-dim head (rotary_dim=64) and passes
the rest through.  The rotation pairs dim i with dim i + rotary_dim/2
("rotate_half" layout, as in GPT-NeoX and the transformers port).
"""

import jax.numpy as jnp


def rope_inv_freq(rotary_dim: int, theta: float):
  """[rotary_dim // 2] inverse frequencies theta^(-2i/rotary_dim)."""
  return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


def apply_rope(x, positions, *, rotary_dim: int, theta: float):
  """x [batch, seq, heads, head_dim], positions [batch, seq] -> same shape and dtype."""
  angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(rotary_dim, theta)  # [b, t, r/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
  x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
  return jnp.concatenate([rotated, rest], axis=-1) if rest.shape[-1] else rotated
