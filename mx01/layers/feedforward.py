"""Feed-forward blocks: the MoE (MiniMax) and a dense SwiGLU MLP (for ablations).

Weights may be W8A16 `QuantizedWeight`s: the dense MLP's go through `linear`,
the experts are dequantised to the compute dtype at use (the MoE ops take
plain arrays).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mx01.config import ModelConfig
from mx01.layers.linear import in_dtype, linear


class MoEBlock(nn.Module):
  config: ModelConfig
  ops: Any  # mx01.ops.ModelOps

  @nn.compact
  def __call__(self, x, *, token_mask=None):
    """x [batch, seq, hidden] -> (y [batch, seq, hidden], routing stats)."""
    cfg = self.config
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    init = nn.initializers.normal(cfg.initializer_range)
    pd = jnp.dtype(cfg.param_dtype)
    params = {
        "router": self.param("router", init, (d, e), pd),
        "wi_gate": self.param("wi_gate", init, (e, d, i), pd),
        "wi_up": self.param("wi_up", init, (e, d, i), pd),
        "wo": self.param("wo", init, (e, i, d), pd),
    }
    cd = jnp.dtype(cfg.compute_dtype)
    params = {k: (v if k == "router" else in_dtype(v, cd)) for k, v in params.items()}
    return self.ops.moe(x.astype(cd), params, config=cfg, token_mask=token_mask)


class DenseMLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, *, token_mask=None):
    cfg = self.config
    d, i = cfg.hidden_size, cfg.intermediate_size
    init = nn.initializers.normal(cfg.initializer_range)
    pd, cd = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
    wi_gate = self.param("wi_gate", init, (d, i), pd)
    wi_up = self.param("wi_up", init, (d, i), pd)
    wo = self.param("wo", init, (i, d), pd)
    x = x.astype(cd)
    return linear(jax.nn.silu(linear(x, wi_gate)) * linear(x, wi_up), wo), None
