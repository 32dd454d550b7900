"""Chunked prefill + decode through `model.apply` with caches, against the full forward without a cache.

Models at the presets' init (std 0.02), fp32: logits must agree to fp32
precision, measured against the largest logit (`_close`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from mx01 import model as model_lib
from mx01.config import LIGHTNING, SOFTMAX
from mx01.inference import cache as cache_lib
from mx01.inference.generate import PromptTooLongError, generate, plan_lengths
from mx01.layers import lightning_layer
from mx01.layers.softmax_attention import cached_attention

FP32_TOL = 2e-5  # of the largest |logit|; a few ulps of accumulated fp32 rounding


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
  return jax.jit(lambda p, t: model_lib.apply(p, t, config=cfg)[0])


def _prompts(lengths, vocab, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


def _max_rel_err(got, ref) -> float:
  return float(np.max(np.abs(np.asarray(got) - np.asarray(ref))) / np.max(np.abs(np.asarray(ref))))


def _prefill_logits(params, cfg, prompts, chunk):
  """Every prompt position's logits [b, padded, V] from left-padded chunked prefill with a cache."""
  b, n = len(prompts), max(len(p) for p in prompts)
  padded = -(-n // chunk) * chunk
  tokens = np.zeros((b, padded), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, padded - len(p):] = p
  mask = np.arange(padded)[None] >= np.asarray([padded - len(p) for p in prompts])[:, None]
  cache = cache_lib.init_cache(cfg, b, n)
  step = jax.jit(lambda p, t, c, m: model_lib.apply(p, t, config=cfg, cache=c, token_mask=m, kv_block=4))
  out = []
  for c0 in range(0, padded, chunk):
    logits, aux = step(params, jnp.asarray(tokens[:, c0:c0 + chunk]), cache, jnp.asarray(mask[:, c0:c0 + chunk]))
    cache = aux["cache"]
    out.append(logits)
  np.testing.assert_array_equal(cache["lengths"], [len(p) for p in prompts])
  return np.concatenate(out, 1), padded


@pytest.mark.parametrize("model", ["hybrid_model", "scanned_model"])
def test_generate_matches_full_forward(model, request):
  """Mixed lengths, chunked prefill (the chunk does not divide the prompt), 6 decode steps: each row's logits
  are those of one full forward over that row alone, for lightning and softmax layers, scanned or unrolled."""
  cfg, params = request.getfixturevalue(model)
  prompts = _prompts([5, 11, 16], cfg.vocab_size)
  res = generate(params, prompts, config=cfg, max_new_tokens=6, prefill_chunk=7, kv_block=8, return_logits=True)
  assert res.padded_prompt_len == 21 and res.cache_len == 21  # 16 + 6 - 1: chunk padding takes no cache
  assert res.logits.shape == (3, 6, cfg.vocab_size)
  for row, (prompt, gen) in enumerate(zip(prompts, res.tokens)):
    assert len(gen) == 6
    full = jnp.asarray(prompt + gen[:-1], jnp.int32)[None]
    ref = np.asarray(_jitted_apply(cfg)(params, full))[0, len(prompt) - 1:]  # logits that chose gen[0..5]
    assert _max_rel_err(res.logits[row], ref) < FP32_TOL
    np.testing.assert_array_equal(np.argmax(ref, -1), gen)  # greedy


@pytest.mark.parametrize("model", ["hybrid_model", "scanned_model"])
def test_prefill_all_positions_match_full_forward(model, request):
  """Chunks of 5 over prompts of 13 and 6 tokens: every real position's logits match the uncached forward."""
  cfg, params = request.getfixturevalue(model)
  prompts = _prompts([13, 6], cfg.vocab_size, seed=1)
  got, padded = _prefill_logits(params, cfg, prompts, chunk=5)
  for row, prompt in enumerate(prompts):
    ref = _jitted_apply(cfg)(params, jnp.asarray([prompt], jnp.int32))[0]
    assert _max_rel_err(got[row, padded - len(prompt):], ref) < FP32_TOL


def test_parity_tolerance_catches_the_lightning_norm_eps_drift(hybrid_model, monkeypatch):
  """The lightning heads are normalised with eps 1e-6 (the released model), not rms_norm_eps (1e-5).

  A stack that used rms_norm_eps there (as a former second decoder did) is off by far more than FP32_TOL
  at std 0.02, so the parity tests above would catch it.
  """
  cfg, params = hybrid_model
  assert cfg.rms_norm_eps != lightning_layer.LIGHTNING_NORM_EPS
  tokens = jnp.asarray(_prompts([12], cfg.vocab_size, seed=3), jnp.int32)
  ref = model_lib.apply(params, tokens, config=cfg)[0]
  monkeypatch.setattr(lightning_layer, "LIGHTNING_NORM_EPS", cfg.rms_norm_eps)
  drifted = model_lib.apply(params, tokens, config=cfg)[0]
  assert _max_rel_err(drifted, ref) > 50 * FP32_TOL, _max_rel_err(drifted, ref)


def test_cached_attention_blocked_equals_direct():
  rng = np.random.default_rng(0)
  b, c, h, kvh, d, L = 2, 3, 4, 2, 8, 19
  q = jnp.asarray(rng.normal(size=(b, c, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, L, kvh, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, L, kvh, d)), jnp.float32)
  q_pos = jnp.asarray([[10, 11, 12], [3, 4, 5]], jnp.int32)
  direct = cached_attention(q, k, v, q_pos, kv_block=64)
  blocked = cached_attention(q, k, v, q_pos, kv_block=4)
  np.testing.assert_allclose(blocked, direct, atol=1e-5)
  # Row 1 must ignore slots past its queries' positions: perturbing them changes nothing.
  k2 = k.at[1, 6:].set(100.0)
  np.testing.assert_allclose(cached_attention(q, k2, v, q_pos, kv_block=4)[1], direct[1], atol=1e-5)
  # Against a plain softmax over the visible slots.
  kg = jnp.repeat(k, h // kvh, axis=2)
  vg = jnp.repeat(v, h // kvh, axis=2)
  s = jnp.einsum("bchd,bshd->bhcs", q, kg) * d ** -0.5
  s = jnp.where(jnp.arange(L)[None, None, None] <= q_pos[:, None, :, None], s, -jnp.inf)
  ref = jnp.einsum("bhcs,bshd->bchd", jax.nn.softmax(s, -1), vg)
  np.testing.assert_allclose(direct, ref, atol=1e-5)


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
  assert plan_lengths(20, 4, config=cfg, prefill_chunk=8) == (24, 8, 23)
  assert plan_lengths(60, 5, config=cfg, prefill_chunk=16, max_cache_len=64) == (64, 16, 64)  # padding is free


def test_prompt_at_max_length_gets_one_token(hybrid_model):
  """A prompt of exactly max_seq_len tokens: its one new token needs no further position."""
  cfg, params = hybrid_model
  cfg16 = small_config(max_seq_len=16)
  prompt = _prompts([16], cfg.vocab_size, seed=4)
  res = generate(params, prompt, config=cfg16, max_new_tokens=1, prefill_chunk=6, return_logits=True)
  ref = np.asarray(_jitted_apply(cfg)(params, jnp.asarray(prompt, jnp.int32)))[0, -1]
  assert len(res.tokens[0]) == 1 and _max_rel_err(res.logits[0, 0], ref) < FP32_TOL
  with pytest.raises(PromptTooLongError, match=r"needs 17 positions"):
    generate(params, prompt, config=cfg16, max_new_tokens=2)


def test_lightning_only_model_has_constant_size_cache():
  cfg = small_config(layer_types=(LIGHTNING, LIGHTNING), num_layers=2)
  cache = cache_lib.init_cache(cfg, 2, 1000)
  assert cache_lib.max_len(cfg, cache) is None
  assert cache_lib.cache_bytes(cache) == 2 * 2 * cfg.num_heads * cfg.head_dim ** 2 * 4
  hybrid = small_config(layer_types=(LIGHTNING, SOFTMAX) * 2, num_layers=4)  # scanned: caches stacked per period
  assert cache_lib.max_len(hybrid, cache_lib.init_cache(hybrid, 2, 100)) == 100


def test_generate_cli_reports_too_long_prompt(capsys):
  from recipes import generate as generate_cli
  code = generate_cli.main(["--config", "tiny", "--random-init", "--prompt", "x" * 40, "--max-new-tokens", "8",
                            "--max-cache-len", "32"])
  assert code == 2
  assert "max_cache_len=32" in capsys.readouterr().err


def test_generation_routes_every_token_when_training_drops(hybrid_model):
  """A capacity factor drops tokens in training forwards only: with a cache (prefill, decode) every token is
  routed, so a small capacity gives the dropless model's logits there and different ones without a cache."""
  cfg, params = hybrid_model
  capped = dataclasses.replace(cfg, capacity_factor=0.5, moe_impl="capacity")
  tokens = jnp.asarray(_prompts([12, 12], cfg.vocab_size, seed=5))

  def cached(c):
    cache = cache_lib.init_cache(c, tokens.shape[0], 16)
    return model_lib.apply(params, tokens, config=c, cache=cache)[0]

  np.testing.assert_array_equal(cached(capped), cached(cfg))
  dropped = model_lib.apply(params, tokens, config=capped)[0]
  assert _max_rel_err(dropped, model_lib.apply(params, tokens, config=cfg)[0]) > 1e-3  # training drops
