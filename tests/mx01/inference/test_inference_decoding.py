"""Prefill + decode against a full forward, the cache attention, size checks and stop tokens."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mx01 import model as model_lib
from mx01.inference import decoding
from mx01.inference.generate import PromptTooLongError, generate, plan_lengths


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
  return jax.jit(lambda p, t: model_lib.apply(p, t, config=cfg)[0])


def _prompts(lengths, vocab, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


def test_generate_matches_full_forward(hybrid_model):
  """Chunked prefill (2 chunks, left padding) + 6 decode steps give the logits of one full forward per row."""
  cfg, params = hybrid_model
  prompts = _prompts([5, 11, 16], cfg.vocab_size)
  res = generate(params, prompts, config=cfg, max_new_tokens=6, prefill_chunk=8, kv_block=8, return_logits=True)
  assert res.padded_prompt_len == 16 and res.cache_len == 21
  assert res.logits.shape == (3, 6, cfg.vocab_size)
  for row, (prompt, gen) in enumerate(zip(prompts, res.tokens)):
    assert len(gen) == 6
    full = jnp.asarray(prompt + gen[:-1], jnp.int32)[None]
    ref = np.asarray(_jitted_apply(cfg)(params, full))[0, len(prompt) - 1:]  # logits that chose gen[0..5]
    assert np.abs(ref).max() > 1.0  # the model is not trivially flat
    np.testing.assert_allclose(res.logits[row], ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.argmax(ref, -1), gen)  # greedy


def test_prefill_all_positions_match_full_forward(hybrid_model):
  cfg, params = hybrid_model
  tokens = jnp.asarray(_prompts([24], cfg.vocab_size, seed=1))
  cache = decoding.init_cache(cfg, 1, 24)
  chunks = []
  for c0 in range(0, 24, 8):  # three chunks: lightning state and KV cache carried across them
    logits, cache = decoding.forward_chunk(params, tokens[:, c0:c0 + 8], cache, config=cfg, logits_mode="all")
    chunks.append(logits)
  ref = _jitted_apply(cfg)(params, tokens)
  np.testing.assert_allclose(np.concatenate(chunks, 1), ref, atol=2e-4, rtol=1e-4)
  assert int(cache.index) == 24


def test_cached_attention_blocked_equals_direct():
  rng = np.random.default_rng(0)
  b, c, h, kvh, d, L = 2, 3, 4, 2, 8, 19
  q = jnp.asarray(rng.normal(size=(b, c, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, L, kvh, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, L, kvh, d)), jnp.float32)
  q_cols = jnp.asarray([10, 11, 12], jnp.int32)
  start = jnp.asarray([0, 7], jnp.int32)
  direct = decoding.cached_attention(q, k, v, q_cols, start, kv_block=64)
  blocked = decoding.cached_attention(q, k, v, q_cols, start, kv_block=4)
  np.testing.assert_allclose(blocked, direct, atol=1e-5)
  # Row 1 must ignore columns < 7 and > q_col: perturbing them changes nothing.
  k2 = k.at[1, :7].set(100.0).at[1, 13:].set(-100.0)
  np.testing.assert_allclose(decoding.cached_attention(q, k2, v, q_cols, start, kv_block=4)[1], direct[1], atol=1e-5)


def test_stop_tokens_end_rows(hybrid_model):
  cfg, params = hybrid_model
  prompts = _prompts([4, 7], cfg.vocab_size, seed=2)
  free = generate(params, prompts, config=cfg, max_new_tokens=5)
  stop_tok = free.tokens[0][2]
  res = generate(params, prompts, config=cfg, max_new_tokens=5, stop_tokens=[stop_tok])
  first_hit = free.tokens[0].index(stop_tok)
  assert res.tokens[0] == free.tokens[0][:first_hit + 1] and res.finish_reasons[0] == "stop"
  if stop_tok not in free.tokens[1]:
    assert res.tokens[1] == free.tokens[1] and res.finish_reasons[1] == "length"
  assert res.prefill_tokens_per_s > 0 and res.decode_tokens_per_s > 0


def test_too_long_prompt_errors_name_sizes_and_fix(hybrid_model):
  cfg, _ = hybrid_model
  with pytest.raises(PromptTooLongError, match=r"600 tokens.*max_seq_len=512"):
    plan_lengths(600, 4, config=cfg, prefill_chunk=64)
  with pytest.raises(PromptTooLongError, match=r"100 tokens.*max_cache_len=64.*raise max_cache_len to at least"):
    plan_lengths(100, 4, config=cfg, prefill_chunk=128, max_cache_len=64)
  with pytest.raises(PromptTooLongError, match=r"max_cache_len=64; raise max_cache_len to 67 or lower max_new_tokens to 5"):
    plan_lengths(60, 8, config=cfg, prefill_chunk=128, max_cache_len=64)
  assert plan_lengths(20, 4, config=cfg, prefill_chunk=8) == (24, 8, 27)


def test_lightning_only_model_has_constant_size_cache():
  from conftest import small_config
  from mx01.config import LIGHTNING
  cfg = small_config(layer_types=(LIGHTNING, LIGHTNING), num_layers=2)
  cache = decoding.init_cache(cfg, 2, 1000)
  assert cache.max_len is None
  assert decoding.cache_bytes(cache) == 2 * 2 * cfg.num_heads * cfg.head_dim ** 2 * 4


def test_generate_cli_reports_too_long_prompt(capsys):
  from recipes import generate as generate_cli
  code = generate_cli.main(["--config", "tiny", "--random-init", "--prompt", "x" * 40, "--max-new-tokens", "8",
                            "--max-cache-len", "32"])
  assert code == 2
  assert "max_cache_len=32" in capsys.readouterr().err
