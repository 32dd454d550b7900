"""The lightning attention layer of MiniMax-Text-01.

x -> SiLU(x W_qkv) split per head into q, k, v -> lightning attention with the
layer's per-head decay -> RMSNorm over the concatenated heads -> * sigmoid(x W_gate)
-> W_out.  No 1/sqrt(d) scaling and no positional encoding: the decay is the
position signal.

With a cache (generation) the layer carries the recurrent state
{"state": [batch, heads, head_dim, head_dim] float32} from call to call; a
call of one token per row is a decode step (`ops.lightning_decode`).

Tensor parallel (`ops.shards` splits "heads"): each device holds whole heads
-- its columns of the fused q|k|v and gate projections, its slice of the norm
and its rows of out_proj -- and takes its own heads' decays; the norm over all
heads and out_proj sum over the devices (mx01/layers/linear.py, norms.py).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mx01.config import ModelConfig
from mx01.layers.linear import Linear
from mx01.layers.norms import RMSNorm
from mx01.lightning import minimax_log_decay


LIGHTNING_NORM_EPS = 1e-6


def dense(features, names, cfg: ModelConfig, ops, name: str):
  """The layers' projection: global `features` out, kernel logical axes `names` (in, out)."""
  return Linear(features, names, dtype=jnp.dtype(cfg.compute_dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                kernel_init=nn.initializers.normal(cfg.initializer_range), shards=ops.shards, name=name)


def log_decay_table(num_heads: int, num_layers: int) -> np.ndarray:
  """[num_layers, num_heads] float32: every layer's per-head log decay (indexable by a traced layer index)."""
  return np.stack([minimax_log_decay(num_heads, i, num_layers) for i in range(num_layers)]).astype(np.float32)


def layer_log_decay(layer_idx, num_heads: int, num_layers: int):
  """The layer's [num_heads] log decay; layer_idx may be traced (layers under `nn.scan`)."""
  return jnp.asarray(log_decay_table(num_heads, num_layers))[layer_idx]


class LightningAttentionLayer(nn.Module):
  config: ModelConfig
  ops: Any  # mx01.ops.ModelOps

  @nn.compact
  def __call__(self, x, *, layer_idx, segment_ids=None, cache: Optional[dict] = None, token_mask=None):
    """x [batch, seq, hidden] -> (y [batch, seq, hidden], new cache or None).

    layer_idx: int or traced int32 (picks the decay).  cache {"state"}: the
    state before x; token_mask [batch, seq] marks real tokens (padding, which
    may only precede a row's first token, adds nothing to the state).
    """
    cfg, shards = self.config, self.ops.shards
    b, t, _ = x.shape
    d = cfg.head_dim
    h = cfg.num_heads // shards.ways("heads")  # this device's heads
    # Fused projection laid out [hidden, heads * (q|k|v) * head_dim], as the released checkpoint: a
    # column split keeps each head's q, k, v together.
    qkv = dense(3 * cfg.num_heads * d, ("embed", "heads"), cfg, self.ops, "qkv_proj")(x)
    qkv = jax.nn.silu(qkv).reshape(b, t, h, 3 * d)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    # The decay depends on the global head index: this device's heads of the layer's [num_heads] decays.
    log_decay = jax.lax.dynamic_slice_in_dim(layer_log_decay(layer_idx, cfg.num_heads, cfg.num_layers),
                                             shards.index("heads") * h, h)
    if cache is None:
      o, _ = self.ops.lightning(q, k, v, log_decay, block_size=cfg.block_size, segment_ids=segment_ids,
                                initial_state=None)
      new_cache = None
    else:
      if token_mask is not None:  # zero keys: the state stays exactly zero through left padding
        k = jnp.where(token_mask[:, :, None, None], k, jnp.zeros_like(k))
      if t == 1:
        o, state = self.ops.lightning_decode(q[:, 0], k[:, 0], v[:, 0], log_decay, cache["state"])
        o = o[:, None]
      else:
        o, state = self.ops.lightning(q, k, v, log_decay, block_size=cfg.block_size, segment_ids=None,
                                      initial_state=cache["state"])
      new_cache = {"state": state}
    # The released model normalises the heads with a fixed eps of 1e-6 (not config.rms_norm_eps).
    o = RMSNorm(LIGHTNING_NORM_EPS, jnp.dtype(cfg.param_dtype), axis="heads", shards=shards,
                name="norm")(o.reshape(b, t, h * d))
    o = jax.nn.sigmoid(dense(cfg.num_heads * d, ("embed", "heads"), cfg, self.ops, "output_gate")(x)) * o
    return dense(cfg.hidden_size, ("heads", "embed"), cfg, self.ops, "out_proj")(o), new_cache
