"""Parameter counting: analytic, and checked against the real init's shapes.

`count_params(config)` counts from the architecture alone; `count_from_shapes`
sums the shapes that `jax.eval_shape` gives for `mx01.model.init` (nothing is
allocated).  The tests require the two to agree exactly.
"""

from __future__ import annotations

import math

import jax

from mx01.config import LIGHTNING, ModelConfig


def layer_params(config: ModelConfig, kind: str) -> dict:
  """Parameters of one decoder layer: {"attention", "ffn_total", "ffn_activated", "norms"}."""
  c = config
  d, h, kv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  if kind == LIGHTNING:
    attn = d * 3 * h * hd + d * h * hd + h * hd * d + h * hd  # qkv, gate, out, head norm
  else:
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d  # q, k, v, o
  if c.is_moe:
    expert = 3 * d * c.intermediate_size
    ffn_total = d * c.num_experts + c.num_experts * expert
    ffn_active = d * c.num_experts + c.num_experts_per_tok * expert
  else:
    ffn_total = ffn_active = 3 * d * c.intermediate_size
  return {"attention": attn, "ffn_total": ffn_total, "ffn_activated": ffn_active, "norms": 2 * d}


def count_params(config: ModelConfig) -> dict:
  """Total and activated (per token) parameter counts.

  Returns {"total", "activated", "embedding", "non_embedding", "non_embedding_activated",
  "attention", "ffn", "norms"}.  "embedding" counts the input embedding and the LM
  head (once if tied); "activated" counts top-k experts per MoE layer.
  """
  c = config
  embedding = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
  attn = ffn_total = ffn_active = norms = 0
  for kind in c.resolved_layer_types:
    p = layer_params(c, kind)
    attn += p["attention"]
    ffn_total += p["ffn_total"]
    ffn_active += p["ffn_activated"]
    norms += p["norms"]
  norms += c.hidden_size  # final norm
  non_emb = attn + ffn_total + norms
  non_emb_active = attn + ffn_active + norms
  return {
      "total": embedding + non_emb,
      "activated": embedding + non_emb_active,
      "embedding": embedding,
      "non_embedding": non_emb,
      "non_embedding_activated": non_emb_active,
      "attention": attn,
      "ffn": ffn_total,
      "norms": norms,
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
