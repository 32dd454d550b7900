"""Small models shared by the inference tests: fp32 at the presets' own init (std 0.02)."""

import jax
import pytest

from mx01 import model as model_lib
from mx01.config import LIGHTNING, SOFTMAX, ModelConfig


def small_config(**overrides) -> ModelConfig:
  base = dict(vocab_size=64, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
              layer_types=(LIGHTNING, SOFTMAX, LIGHTNING), ffn_type="moe", intermediate_size=64, num_experts=4,
              num_experts_per_tok=2, block_size=8, rotary_dim=8, initializer_range=0.02, lightning_impl="xla",
              max_seq_len=512)
  base.update(overrides)
  return ModelConfig(**base)


def scanned_config(**overrides) -> ModelConfig:
  """A hybrid pattern that repeats with a remainder: scan over 2 x (lightning, softmax), then one lightning."""
  return small_config(num_layers=5, layer_types=(LIGHTNING, SOFTMAX) * 2 + (LIGHTNING,), **overrides)


@pytest.fixture(scope="session")
def hybrid_model():
  cfg = small_config()
  return cfg, model_lib.init(cfg, jax.random.key(0))


@pytest.fixture(scope="session")
def scanned_model():
  cfg = scanned_config()
  assert model_lib.scan_plan(cfg) == (2, 2)
  return cfg, model_lib.init(cfg, jax.random.key(1))
