"""Parameter counts: the analytic count matches the real init's shapes, and MiniMax-Text-01's published sizes."""

import pytest

from mx01.config import ModelConfig
from mx01.params import count_from_shapes, count_params
from mx01.presets import get_preset


def test_hybrid_456b_published_counts():
  c = count_params(get_preset("hybrid_456b").model)
  assert round(c["total"] / 1e9) == 456  # 456.09B
  assert round(c["non_embedding_activated"] / 1e8) == 459  # 45.9B activated (two experts per layer)
  assert c["total"] == 456_089_655_296


@pytest.mark.parametrize("name", ["tiny", "hybrid_456b", "softmax_100m", "lightning_moe_20m", "hybrid_moe_1b"])
def test_analytic_count_equals_eval_shape(name):
  cfg = get_preset(name).model
  assert count_params(cfg)["total"] == count_from_shapes(cfg)


def test_tied_embeddings_counted_once():
  a = count_params(ModelConfig(tie_word_embeddings=False))
  b = count_params(ModelConfig(tie_word_embeddings=True))
  assert a["total"] - b["total"] == 256 * 128
  assert count_from_shapes(ModelConfig(tie_word_embeddings=True)) == b["total"]
