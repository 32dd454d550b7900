"""Next-token selection: greedy, temperature, top-k and top-p (nucleus), with explicit PRNG keys."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature == 0 means greedy (argmax); top_k / top_p None means no truncation."""
  temperature: float = 0.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def truncate_logits(logits, *, top_k: Optional[int] = None, top_p: Optional[float] = None):
  """Sets logits outside the top-k / top-p set to -inf.  logits [b, vocab] float32 -> same.

  top-p keeps the smallest set of most likely tokens whose probability reaches
  top_p (the most likely token is always kept).  Ties at the top-k threshold
  are all kept.
  """
  neg = jnp.full_like(logits, -jnp.inf)
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, neg)
  if top_p is not None and top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
    keep_sorted = mass_before < top_p
    # The smallest kept logit is the threshold.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, neg)
  return logits


def sample_tokens(logits, key, sampling: SamplingConfig):
  """logits [b, vocab] float32, key: a PRNG key -> tokens [b] int32."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits.astype(jnp.float32) / sampling.temperature
  scaled = truncate_logits(scaled, top_k=sampling.top_k, top_p=sampling.top_p)
  return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
