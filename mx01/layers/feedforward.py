"""Feed-forward blocks: the MoE (MiniMax) and a dense SwiGLU MLP (for ablations).

Weights may be W8A16 `QuantizedWeight`s: the dense MLP's go through `linear`,
the experts are dequantised to the compute dtype at use (the MoE ops take
plain arrays).

Under expert / tensor parallelism (`ops.shards`) each device creates its piece
of the weights: the MoE's experts split over "experts" and their intermediate
dimension over "expert_mlp" (`ops.moe` is then the expert-parallel MoE, which
routes over all experts); the dense MLP's intermediate dimension over "mlp"
(column-split in, row-split out, its output summed over the devices).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mx01.config import ModelConfig
from mx01.layers.linear import in_dtype, linear
from mx01.layers.param import param


class MoEBlock(nn.Module):
  config: ModelConfig
  ops: Any  # mx01.ops.ModelOps

  @nn.compact
  def __call__(self, x, *, token_mask=None):
    """x [batch, seq, hidden] -> (y [batch, seq, hidden], routing stats)."""
    cfg, shards = self.config, self.ops.shards
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    init = nn.initializers.normal(cfg.initializer_range)
    pd = jnp.dtype(cfg.param_dtype)
    w_in = lambda name: param(self, name, init, (e, d, i), ("experts", "expert_embed", "expert_mlp"), pd, shards)
    params = {
        "router": param(self, "router", init, (d, e), ("embed", None), pd, shards),  # all experts on every device
        "wi_gate": w_in("wi_gate"),
        "wi_up": w_in("wi_up"),
        "wo": param(self, "wo", init, (e, i, d), ("experts", "expert_mlp", "expert_embed"), pd, shards),
    }
    cd = jnp.dtype(cfg.compute_dtype)
    params = {k: (v if k == "router" else in_dtype(v, cd)) for k, v in params.items()}
    return self.ops.moe(x.astype(cd), params, config=cfg, token_mask=token_mask)


class DenseMLP(nn.Module):
  config: ModelConfig
  ops: Any  # mx01.ops.ModelOps (only its shards)

  @nn.compact
  def __call__(self, x, *, token_mask=None):
    """x [batch, seq, hidden] -> (y [batch, seq, hidden], None)."""
    cfg, shards = self.config, self.ops.shards
    d, i = cfg.hidden_size, cfg.intermediate_size
    init = nn.initializers.normal(cfg.initializer_range)
    pd, cd = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
    wi_gate = param(self, "wi_gate", init, (d, i), ("embed", "mlp"), pd, shards)
    wi_up = param(self, "wi_up", init, (d, i), ("embed", "mlp"), pd, shards)
    wo = param(self, "wo", init, (i, d), ("mlp", "embed"), pd, shards)
    x = x.astype(cd)
    # wo contracts this device's slice of "mlp": partial sums, added over the devices that split it.
    return shards.psum(linear(jax.nn.silu(linear(x, wi_gate)) * linear(x, wi_up), wo), "mlp"), None
