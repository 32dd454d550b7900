"""Parameter counting: analytic, and checked against the real init's shapes.

`param_count(config)` counts from the architecture alone, by group;
`count_params(config)` gives the headline numbers as a dict; `count_from_shapes`
sums the shapes that `jax.eval_shape` gives for `mx01.model.init` (nothing is
allocated).  The tests require the analytic and the real counts to agree
exactly.  This is the one parameter counter of the repository (`scaling/flops.py`
builds its FLOP model on it).
"""

from __future__ import annotations

import dataclasses
import math

import jax

from mx01.config import LIGHTNING, ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCount:
  """Parameter counts of a ModelConfig, by group.

  `ffn_total` holds every expert, `ffn_active` the `num_experts_per_tok` a token
  uses; `router` the MoE routers; `norms` every RMSNorm weight (two per layer,
  the lightning layers' head norm, the final norm).
  """

  embedding: int
  lm_head: int  # 0 when tied to the embedding
  attention: int
  ffn_total: int
  ffn_active: int
  router: int
  norms: int

  @property
  def total(self) -> int:
    return self.embedding + self.lm_head + self.attention + self.ffn_total + self.router + self.norms

  @property
  def non_embedding(self) -> int:
    """All parameters except the vocabulary matrices (embedding and LM head)."""
    return self.attention + self.ffn_total + self.router + self.norms

  @property
  def active_non_embedding(self) -> int:
    """Non-embedding parameters one token uses (activated experts only)."""
    return self.attention + self.ffn_active + self.router + self.norms

  @property
  def vocab_matmul(self) -> int:
    """The vocabulary matrix a token multiplies through at the output."""
    return self.lm_head if self.lm_head else self.embedding

  @property
  def matmul_active(self) -> int:
    """Parameters a token multiplies through: active non-embedding without norms, plus the LM head matrix."""
    return self.attention + self.ffn_active + self.router + self.vocab_matmul


def attention_params(config: ModelConfig, kind: str) -> int:
  """Projection weights of one attention layer (lightning: fused qkv, gate, out; softmax: q, k, v, o)."""
  d, h, hd = config.hidden_size, config.num_heads, config.head_dim
  if kind == LIGHTNING:
    return d * 3 * h * hd + d * h * hd + h * hd * d
  return d * h * hd + 2 * d * config.num_kv_heads * hd + h * hd * d


def param_count(config: ModelConfig) -> ParamCount:
  """Counts the parameters of `config` by group (no biases; mx01/model.py's layout)."""
  c = config
  d, v = c.hidden_size, c.vocab_size
  kinds = c.resolved_layer_types
  expert = 3 * d * c.intermediate_size  # SwiGLU gate, up, down
  if c.is_moe:
    ffn_total, ffn_active = c.num_layers * c.num_experts * expert, c.num_layers * c.num_experts_per_tok * expert
    router = c.num_layers * d * c.num_experts
  else:
    ffn_total = ffn_active = c.num_layers * expert
    router = 0
  n_lightning = sum(kind == LIGHTNING for kind in kinds)
  norms = c.num_layers * 2 * d + n_lightning * c.num_heads * c.head_dim + d
  return ParamCount(embedding=v * d, lm_head=0 if c.tie_word_embeddings else v * d,
                    attention=sum(attention_params(c, kind) for kind in kinds), ffn_total=ffn_total,
                    ffn_active=ffn_active, router=router, norms=norms)


def count_params(config: ModelConfig) -> dict:
  """Total and activated (per token) parameter counts.

  Returns {"total", "activated", "embedding", "non_embedding", "non_embedding_activated",
  "attention", "ffn", "norms"}.  "embedding" counts the input embedding and the LM
  head (once if tied); "activated" counts top-k experts per MoE layer; "ffn"
  includes the routers.
  """
  p = param_count(config)
  embedding = p.embedding + p.lm_head
  return {
      "total": p.total,
      "activated": embedding + p.active_non_embedding,
      "embedding": embedding,
      "non_embedding": p.non_embedding,
      "non_embedding_activated": p.active_non_embedding,
      "attention": p.attention,
      "ffn": p.ffn_total + p.router,
      "norms": p.norms,
  }


def count_from_shapes(config: ModelConfig) -> int:
  """Total parameters of `mx01.model.init(config, ...)`, from abstract shapes only."""
  from mx01.model import abstract_params
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))


def format_count(n: int) -> str:
  for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= div:
      return f"{n / div:.2f}{unit}"
  return str(n)
