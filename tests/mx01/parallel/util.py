"""Shared helpers for the parallelism tests: a tiny hybrid MoE model and random packed batches."""

import jax
import jax.numpy as jnp
import numpy as np

from mx01.config import LIGHTNING, SOFTMAX, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
  """2 layers (lightning then softmax), MoE with 4 experts (top-2), head_dim 8."""
  base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              layer_types=(LIGHTNING, SOFTMAX), intermediate_size=32, num_experts=4, num_experts_per_tok=2,
              block_size=4, rotary_dim=4, router_aux_loss_coef=0.1)
  base.update(overrides)
  return ModelConfig(**base)


def packed_segments(key, batch: int, length: int, start_prob: float = 0.1):
  """[batch, length] int32 segment ids >= 1 with random boundaries (some inside, some across chunks)."""
  starts = jax.random.bernoulli(key, start_prob, (batch, length)).at[:, 0].set(True)
  return jnp.cumsum(starts, axis=1).astype(jnp.int32)


def packed_batch(key, cfg: ModelConfig, batch: int, length: int):
  """{"tokens", "segment_ids"} [batch, length + 1], with a padded tail (segment 0) on row 1."""
  k1, k2 = jax.random.split(key)
  tokens = jax.random.randint(k1, (batch, length + 1), 1, cfg.vocab_size)
  seg = packed_segments(k2, batch, length + 1)
  seg = seg.at[1, -3:].set(0)
  return {"tokens": tokens, "segment_ids": seg}


def max_abs_diff(a, b) -> float:
  """On the host: the two trees may live on different meshes."""
  return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_trees_close(actual, expected, atol: float, what: str = ""):
  assert jax.tree.structure(actual) == jax.tree.structure(expected), what
  err = max_abs_diff(actual, expected)
  assert err <= atol, f"{what}: max abs difference {err} > {atol}"
