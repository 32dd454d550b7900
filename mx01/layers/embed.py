"""The token embedding table [vocab, hidden], declared with its logical axes; `attend` is the tied LM head."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mx01.config import ModelConfig
from mx01.layers.param import param


class Embed(nn.Module):
  config: ModelConfig
  ops: Any  # mx01.ops.ModelOps (only its shards)

  def setup(self):
    cfg = self.config
    self.embedding = param(self, "embedding", nn.initializers.normal(cfg.initializer_range),
                           (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), jnp.dtype(cfg.param_dtype),
                           self.ops.shards)

  def __call__(self, tokens):
    """tokens [batch, seq] int -> [batch, seq, hidden] in the compute dtype."""
    return jnp.take(self.embedding, tokens, axis=0).astype(jnp.dtype(self.config.compute_dtype))

  def attend(self, x):
    """x [..., hidden] -> logits [..., vocab] float32 against the table (tied input and output embeddings)."""
    return jnp.dot(x, self.embedding.astype(jnp.dtype(self.config.compute_dtype)).T,
                   preferred_element_type=jnp.float32)
