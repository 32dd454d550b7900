"""The lightning attention layer of MiniMax-Text-01.

x -> SiLU(x W_qkv) split per head into q, k, v -> lightning attention with the
layer's per-head decay -> RMSNorm over the concatenated heads -> * sigmoid(x W_gate)
-> W_out.  No 1/sqrt(d) scaling and no positional encoding: the decay is the
position signal.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mx01.config import ModelConfig
from mx01.lightning import minimax_log_decay
from mx01.layers.norms import RMSNorm


LIGHTNING_NORM_EPS = 1e-6


def dense(features, cfg: ModelConfig, name: str):
  return nn.Dense(features, use_bias=False, name=name, dtype=jnp.dtype(cfg.compute_dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype),
                  kernel_init=nn.initializers.normal(cfg.initializer_range))


class LightningAttentionLayer(nn.Module):
  config: ModelConfig
  layer_idx: int
  ops: Any  # mx01.ops.ModelOps

  @nn.compact
  def __call__(self, x, *, segment_ids=None, initial_state=None):
    """x [batch, seq, hidden] -> (y [batch, seq, hidden], final_state [batch, heads, head_dim, head_dim])."""
    cfg = self.config
    b, t, _ = x.shape
    h, d = cfg.num_heads, cfg.head_dim
    # Fused projection laid out [hidden, heads * (q|k|v) * head_dim], as the released checkpoint.
    qkv = jax.nn.silu(dense(3 * h * d, cfg, "qkv_proj")(x)).reshape(b, t, h, 3 * d)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    log_decay = jnp.asarray(minimax_log_decay(h, self.layer_idx, cfg.num_layers))
    o, state = self.ops.lightning(q, k, v, log_decay, block_size=cfg.block_size, segment_ids=segment_ids,
                                  initial_state=initial_state)
    # The released model normalises the heads with a fixed eps of 1e-6 (not config.rms_norm_eps).
    o = RMSNorm(LIGHTNING_NORM_EPS, jnp.dtype(cfg.param_dtype), name="norm")(o.reshape(b, t, h * d))
    o = jax.nn.sigmoid(dense(h * d, cfg, "output_gate")(x)) * o
    return dense(cfg.hidden_size, cfg, "out_proj")(o), state
