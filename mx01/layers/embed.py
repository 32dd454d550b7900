"""The token embedding table [vocab, hidden], declared with its logical axes."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mx01.config import ModelConfig
from mx01.layers.param import param


class Embed(nn.Module):
  config: ModelConfig
  ops: Any  # mx01.ops.ModelOps (only its shards)

  @nn.compact
  def __call__(self, tokens):
    """tokens [batch, seq] int -> [batch, seq, hidden] in the compute dtype."""
    cfg = self.config
    table = param(self, "embedding", nn.initializers.normal(cfg.initializer_range), (cfg.vocab_size, cfg.hidden_size),
                  ("vocab", "embed"), jnp.dtype(cfg.param_dtype), self.ops.shards)
    return jnp.take(table, tokens, axis=0).astype(jnp.dtype(cfg.compute_dtype))
