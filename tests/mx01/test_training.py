"""Optimizer, weight-decay mask, gradient accumulation and non-finite skipping of mx01.training (one device)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mx01 import model as model_lib
from mx01 import presets
from mx01 import training
from recipes.flags import apply_overrides

# Compiled once per config and batch structure: run eagerly, every primitive is dispatched (and compiled) on its
# own, which costs minutes on two CPU cores for the same values.
_loss_and_grad = jax.jit(jax.value_and_grad(training.loss_fn, has_aux=True), static_argnames="config")


def _small():
  return apply_overrides(presets.get_preset("tiny"), {
      "model.rotary_dim": 4, "model.hidden_size": 32, "model.num_layers": 2, "model.head_dim": 8,
      "model.intermediate_size": 32, "model.block_size": 8, "data.seq_len": 16, "train.batch_size": 4,
      "train.steps": 20, "train.warmup_steps": 5})


@pytest.fixture(scope="module")
def params():
  """The parameters of `_small()` at key 0, initialised once (init compiles the model's forward)."""
  return model_lib.init(_small().model, jax.random.key(0))


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  b, r = cfg.train.batch_size, cfg.data.seq_len + 1
  seg = np.ones((b, r), np.int32)
  seg[:, r // 2:] = 2
  return {"tokens": jnp.asarray(rng.integers(0, 256, (b, r)), jnp.int32), "segment_ids": jnp.asarray(seg)}


def test_weight_decay_mask_excludes_norms_and_vectors():
  cfg = _small()
  params = model_lib.abstract_params(cfg.model)
  mask = training.weight_decay_mask(params)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  shapes = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, decays in flat:
    name = str(getattr(path[-1], "key", path[-1]))
    leaf = shapes[path]
    if name in ("scale", "bias") or leaf.ndim < 2:
      assert not decays, path
    else:
      assert decays, path
  assert any(d for _, d in flat) and not all(d for _, d in flat)


def test_schedule_warmup_and_decay():
  cfg = _small().train
  sched = training.learning_rate_schedule(cfg)
  lrs = np.asarray([sched(i) for i in range(cfg.steps + 1)])
  assert 0 < lrs[0] < lrs[cfg.warmup_steps - 1]
  np.testing.assert_allclose(lrs[cfg.warmup_steps], cfg.learning_rate, rtol=1e-6)
  np.testing.assert_allclose(lrs[cfg.steps], cfg.learning_rate * cfg.min_lr_ratio, rtol=1e-5)
  assert (np.diff(lrs[cfg.warmup_steps:]) <= 1e-12).all()


@pytest.mark.slow
def test_grad_accumulation_matches_full_batch():
  cfg = apply_overrides(_small(), {"model.ffn_type": "dense"})
  params = model_lib.init(cfg.model, jax.random.key(0))
  opt, _ = training.make_optimizer(cfg.train)
  batch = _batch(cfg)
  full = jax.jit(training.make_train_step(cfg.model, None, opt))(params, opt.init(params), batch)
  acc = jax.jit(training.make_train_step(cfg.model, None, opt, grad_accum=2))(params, opt.init(params), batch)
  # Equal token counts per micro-batch: the mean of means is the full-batch mean.
  np.testing.assert_allclose(full[2]["loss"], acc[2]["loss"], rtol=1e-5)
  np.testing.assert_allclose(full[2]["grad_norm"], acc[2]["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), full[0], acc[0])


def test_nonfinite_update_is_skipped(params):
  cfg = _small()
  opt, _ = training.make_optimizer(cfg.train)
  step = jax.jit(training.make_train_step(cfg.model, None, opt, skip_nonfinite=True))
  state = opt.init(params)
  bad = jax.tree.map(lambda x: x, params)
  bad["lm_head"]["kernel"] = bad["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
  new_params, new_state, metrics = step(bad, state, _batch(cfg))
  assert int(metrics["nonfinite"]) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new_params, bad)
  new_params, _, metrics = step(params, state, _batch(cfg))
  assert int(metrics["nonfinite"]) == 0
  assert not np.array_equal(new_params["lm_head"]["kernel"], params["lm_head"]["kernel"])
  assert float(metrics["expert_load_max_over_mean"]) >= 1.0


def test_train_step_with_a_plain_optax_optimizer(params):
  cfg = _small()
  opt = optax.adamw(1e-3)
  p, s, m = jax.jit(training.make_train_step(cfg.model, None, opt))(params, opt.init(params), _batch(cfg))
  assert set(m) >= {"loss", "aux_loss", "tokens", "total_loss", "grad_norm"}


@pytest.mark.slow
def test_chunked_loss_equals_full_loss_and_grads():
  # loss_chunk_size that does not divide the sequence (16 targets in chunks of 5), tied and untied heads.
  for tied in (False, True):
    cfg = apply_overrides(_small(), {"model.tie_word_embeddings": tied})
    chunked = apply_overrides(cfg, {"model.loss_chunk_size": 5})
    params = model_lib.init(cfg.model, jax.random.key(1))
    batch = _batch(cfg, seed=3)
    (l1, m1), g1 = _loss_and_grad(params, batch, config=cfg.model)
    (l2, m2), g2 = _loss_and_grad(params, batch, config=chunked.model)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    assert float(m1["tokens"]) == float(m2["tokens"])
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)


def test_batch_without_segment_ids_is_one_document_per_row(params):
  cfg = _small()
  tokens = _batch(cfg)["tokens"]
  ones = {"tokens": tokens, "segment_ids": jnp.ones(tokens.shape, jnp.int32)}
  (l1, m1), g1 = _loss_and_grad(params, {"tokens": tokens}, config=cfg.model)
  (l2, m2), g2 = _loss_and_grad(params, ones, config=cfg.model)
  assert float(m1["tokens"]) == tokens.shape[0] * (tokens.shape[1] - 1)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), g1, g2)
  # Two documents per row differ from one: the test would catch a mask that ignores segments.
  assert abs(float(_loss_and_grad(params, _batch(cfg), config=cfg.model)[0][0]) - float(l1)) > 1e-4


def test_batch_with_explicit_targets_splits_like_next_token_rows():
  # {"tokens" [B, L], "targets" [B, L]} (targets that are not the next input, e.g. recipes/retrieval.py's
  # answers) gives the step the same (inputs, targets, mask) as next-token rows of those values.
  tokens = jax.random.randint(jax.random.key(0), (3, 9), 0, 50)
  mask = jax.random.bernoulli(jax.random.key(1), 0.5, (3, 8))
  rows = {"tokens": tokens, "loss_mask": mask}
  explicit = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}
  for a, b in zip(training.split_batch(explicit), training.split_batch(rows)):
    assert (a is None and b is None) or np.array_equal(a, b)
  _, _, _, every = training.split_batch({"tokens": tokens[:, :-1], "targets": tokens[:, 1:]})
  assert every.shape == (3, 8) and bool(jnp.all(every))
  with pytest.raises(ValueError, match="segment_ids"):
    training.split_batch(dict(explicit, segment_ids=jnp.ones((3, 8), jnp.int32)))
