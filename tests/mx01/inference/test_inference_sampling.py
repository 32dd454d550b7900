"""Greedy / temperature / top-k / top-p selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mx01.inference.sampling import SamplingConfig, sample_tokens, truncate_logits


def _logits():
  return jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1], [0.05, 0.05, 0.1, 0.8]], jnp.float32))


def test_greedy_is_argmax_and_top1_truncations_agree():
  logits = _logits()
  key = jax.random.key(3)
  greedy = sample_tokens(logits, key, SamplingConfig())
  np.testing.assert_array_equal(greedy, [0, 3])
  np.testing.assert_array_equal(sample_tokens(logits, key, SamplingConfig(temperature=1.0, top_k=1)), greedy)
  np.testing.assert_array_equal(sample_tokens(logits, key, SamplingConfig(temperature=1.0, top_p=0.01)), greedy)


def test_truncation_sets():
  logits = _logits()
  kept = np.isfinite(truncate_logits(logits, top_k=2))
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
  kept = np.isfinite(truncate_logits(logits, top_p=0.7))  # row 0: 0.5 + 0.25 reaches 0.7; row 1: 0.8 alone
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 0, 1]])


def test_sampling_is_deterministic_per_key_and_follows_probabilities():
  logits = jnp.tile(_logits()[:1], (4000, 1))
  cfg = SamplingConfig(temperature=1.0)
  a = sample_tokens(logits, jax.random.key(0), cfg)
  np.testing.assert_array_equal(a, sample_tokens(logits, jax.random.key(0), cfg))
  assert not np.array_equal(a, sample_tokens(logits, jax.random.key(1), cfg))
  freq = np.bincount(np.asarray(a), minlength=4) / a.shape[0]
  np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1], atol=0.03)
  top2 = sample_tokens(logits, jax.random.key(0), SamplingConfig(temperature=1.0, top_k=2))
  freq = np.bincount(np.asarray(top2), minlength=4) / top2.shape[0]
  np.testing.assert_allclose(freq, [2 / 3, 1 / 3, 0, 0], atol=0.03)


def test_invalid_settings_raise():
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(temperature=1.0, top_p=0.0)
