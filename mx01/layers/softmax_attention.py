"""The softmax attention layer: grouped-query attention with partial RoPE."""

from typing import Any

import flax.linen as nn

from mx01.config import ModelConfig
from mx01.layers.lightning_layer import dense
from mx01.layers.rope import apply_rope


class SoftmaxAttentionLayer(nn.Module):
  config: ModelConfig
  layer_idx: int
  ops: Any  # mx01.ops.ModelOps

  @nn.compact
  def __call__(self, x, *, positions, segment_ids=None):
    """x [batch, seq, hidden], positions [batch, seq] -> (y [batch, seq, hidden], (k, v) after RoPE)."""
    cfg = self.config
    b, t, _ = x.shape
    h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = dense(h * d, cfg, "q_proj")(x).reshape(b, t, h, d)
    k = dense(kvh * d, cfg, "k_proj")(x).reshape(b, t, kvh, d)
    v = dense(kvh * d, cfg, "v_proj")(x).reshape(b, t, kvh, d)
    rd = cfg.resolved_rotary_dim
    q = apply_rope(q, positions, rotary_dim=rd, theta=cfg.rope_theta)
    k = apply_rope(k, positions, rotary_dim=rd, theta=cfg.rope_theta)
    o = self.ops.attention(q, k, v, segment_ids=segment_ids)
    return dense(cfg.hidden_size, cfg, "o_proj")(o.reshape(b, t, h * d)), (k, v)
