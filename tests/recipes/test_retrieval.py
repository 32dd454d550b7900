"""The MQAR study of recipes/retrieval.py: the data (Zoology's task), the NIAH sets, the vmapped grid trainer
against training each model alone, and the summary statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mx01 import model as model_lib
from recipes import retrieval
from recipes.retrieval import FILLER, mqar_dataset, niah_dataset


@pytest.mark.parametrize("seq_len,pairs,vocab", [(16, 4, 64), (64, 4, 8192), (70, 17, 256), (256, 16, 64)])
def test_mqar_keys_distinct_answers_correct_shapes(seq_len, pairs, vocab):
  d = mqar_dataset(200, seq_len, pairs, vocab, 5)
  inputs, pos, answers = d["inputs"], d["answer_pos"], d["answers"]
  assert inputs.shape == (200, seq_len) and pos.shape == answers.shape == (200, pairs)
  assert inputs.dtype == pos.dtype == answers.dtype == np.int32
  half = vocab // 2
  for x, p, a in zip(inputs, pos, answers):
    keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
    assert len(set(keys.tolist())) == pairs and len(set(values.tolist())) == pairs
    assert np.all((keys >= 1) & (keys < half)) and np.all((values >= half) & (values < vocab))
    # pair j's query: its key, at an even offset of the query region, answered by its value
    np.testing.assert_array_equal(x[p], keys)
    np.testing.assert_array_equal(a, values)
    assert np.all(p >= 2 * pairs) and np.all((p - 2 * pairs) % 2 == 0) and np.all(p < seq_len)
    assert len(set(p.tolist())) == pairs
    rest = np.ones(seq_len, bool)
    rest[:2 * pairs] = False
    rest[p] = False
    assert np.all(x[rest] == FILLER)  # values are targets, never inputs, in the query region


def test_fixed_sets_are_reproducible_from_the_seed():
  a_train, a_test = retrieval.study_data(64, 4, 8192, train_examples=300, test_examples=50, data_seed=3)
  b_train, b_test = retrieval.study_data(64, 4, 8192, train_examples=300, test_examples=50, data_seed=3)
  c_train, _ = retrieval.study_data(64, 4, 8192, train_examples=300, test_examples=50, data_seed=4)
  for k in a_train:
    np.testing.assert_array_equal(a_train[k], b_train[k])
    np.testing.assert_array_equal(a_test[k], b_test[k])
  assert not np.array_equal(a_train["inputs"], c_train["inputs"])
  # train and test are different draws (Zoology's leakage check: none of the test rows in the training set)
  assert not {r.tobytes() for r in a_test["inputs"]} & {r.tobytes() for r in a_train["inputs"]}
  # the seed is the whole story: a fresh generator on the same seed gives the same set
  again = mqar_dataset(300, 64, 4, 8192, (3, 64, 4, 0))
  np.testing.assert_array_equal(again["inputs"], a_train["inputs"])


def test_query_placement_follows_zoologys_power_law():
  # Pair j takes the j-th of successive draws without replacement with P(slot g) ~ (g + 1)^(a - 1):
  # the first pair's slot follows q exactly, the second's the law of a second draw.
  seq_len, pairs, a, n = 40, 4, 0.3, 40_000
  d = mqar_dataset(n, seq_len, pairs, 256, 0, power_a=a)
  slots = (seq_len - 2 * pairs) // 2
  gaps = (d["answer_pos"] - 2 * pairs) // 2  # [N, P]
  q = retrieval.gap_probabilities(slots, a)
  np.testing.assert_allclose(q, np.arange(1, slots + 1) ** (a - 1) / np.sum(np.arange(1, slots + 1) ** (a - 1)))
  first = np.bincount(gaps[:, 0], minlength=slots) / n
  second = np.array([sum(q[i] * q[g] / (1 - q[i]) for i in range(slots) if i != g) for g in range(slots)])
  tol = 4 * np.sqrt(q * (1 - q) / n) + 1e-3
  assert np.all(np.abs(first - q) < tol), (first[:4], q[:4])
  assert np.all(np.abs(np.bincount(gaps[:, 1], minlength=slots) / n - second) < 4 * np.sqrt(second / n) + 1e-3)
  # Zoology's default a = 0.01: the first query almost always right at the start of the query region
  d = mqar_dataset(2000, 256, 16, 8192, 0)
  assert np.mean(d["answer_pos"][:, 0] == 32) > 0.15 and np.median(d["answer_pos"][:, -1]) > 64


def test_bad_task_sizes_raise():
  with pytest.raises(ValueError, match="4 \\* pairs"):
    mqar_dataset(1, 60, 16, 8192, 0)
  with pytest.raises(ValueError, match="even"):
    mqar_dataset(1, 63, 4, 8192, 0)
  with pytest.raises(ValueError, match="distinct keys"):
    mqar_dataset(1, 256, 40, 64, 0)


@pytest.mark.parametrize("depth", retrieval.NIAH_DEPTHS)
def test_niah_places_the_needle_at_its_depth(depth):
  seq_len = 101
  d = niah_dataset(30, seq_len, depth, 64, 1)
  at = round(depth * (seq_len - 3))
  x = d["inputs"]
  assert x.shape == (30, seq_len) and d["answer_pos"].shape == d["answers"].shape == (30, 1)
  np.testing.assert_array_equal(x[:, at], x[:, -1])  # the key, queried at the last position
  np.testing.assert_array_equal(x[:, at + 1], d["answers"][:, 0])
  assert np.all(d["answer_pos"] == seq_len - 1) and np.all(x[:, at] < 32) and np.all(d["answers"] >= 32)
  rest = np.ones(seq_len, bool)
  rest[[at, at + 1, seq_len - 1]] = False
  assert np.all(x[:, rest] == FILLER)
  if depth == 0:
    assert at == 0
  if depth == 1:
    assert at + 2 == seq_len - 1  # right before the query


def test_batch_order_is_a_shuffle_per_epoch_and_resumes():
  whole = retrieval.batch_order(7, 10, 4, 5)  # 20 indices = 2 epochs of 10
  assert whole.shape == (5, 4)
  flat = whole.reshape(-1)
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
  np.testing.assert_array_equal(np.concatenate([retrieval.batch_order(7, 10, 4, 2), retrieval.batch_order(7, 10, 4, 3, 2)]),
                                whole)  # the calls of the trainer read the same stream
  assert not np.array_equal(retrieval.batch_order(8, 10, 4, 5), whole)


def _tiny_config(kind="hybrid"):
  return retrieval.model_config(kind, "xs", vocab_size=64, seq_len=32, overrides=["num_heads=2", "head_dim=8",
                                                                                 "rotary_dim=8", "hidden_size=16",
                                                                                 "intermediate_size=32"])


@pytest.mark.slow
def test_vmapped_grid_equals_training_each_model_alone():
  cfg = _tiny_config("softmax")
  train, test = retrieval.study_data(32, 2, 64, train_examples=20, test_examples=16, data_seed=0)
  lrs, seeds, steps, batch = (3e-3, 1e-2), (0, 5), 4, 8  # 32 rows of 20: the second epoch starts in step 3
  grid = retrieval.train_grid(cfg, train, test, lrs=lrs, seeds=seeds, steps=steps, batch_size=batch,
                              steps_per_call=2, eval_batch=16)
  assert [(r["lr"], r["seed"]) for r in grid] == [(lr, s) for lr in lrs for s in seeds]
  @jax.jit
  def alone(lr, params, batches):  # the plain reference: one model, optax's AdamW and schedule, step by step
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.01,
                      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    step, state = retrieval.make_step(cfg, opt), opt.init(params)
    for t in range(steps):
      params, state, loss, correct = step(params, state, jax.tree.map(lambda a: a[t], batches))
    return params, loss, correct

  for r in grid:
    order = retrieval.batch_order(r["seed"], 20, batch, steps)  # [steps, batch]
    params, loss, correct = alone(r["lr"], model_lib.init(cfg, jax.random.key(r["seed"])),
                                  {k: v[order] for k, v in train.items()})
    # float32: the vmapped programs may sum in another order; a few Adam steps keep that at ~1e-6
    np.testing.assert_allclose(r["final_train_loss"], float(loss), rtol=2e-5)
    assert r["final_train_accuracy"] == float(correct) / (batch * 2)
    logits, _ = model_lib.apply(params, jnp.asarray(test["inputs"]), config=cfg)
    pred = np.take_along_axis(np.asarray(logits).argmax(-1), test["answer_pos"], axis=1)
    assert abs(r["test_accuracy"] - np.mean(pred == test["answers"])) <= 1 / test["answers"].size + 1e-9


def test_grid_optimizer_matches_plain_adamw():
  # The learning rate lives in the stacked state: one rate per model, each step like optax.adamw's.
  params = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "scale": jnp.ones(3)}
  grads = jax.tree.map(lambda x: jnp.sin(x + 1), params)
  lrs, steps = (1e-3, 3e-2), 4
  stacked = retrieval.stack([params, params])
  opt = retrieval.grid_optimizer(steps)
  state = jax.vmap(lambda p, lr: opt.init(p)._replace(hyperparams={"lr": lr}))(stacked, jnp.asarray(lrs))
  new = stacked
  for _ in range(steps):
    upd, state = jax.vmap(opt.update, in_axes=(None, 0, 0))(grads, state, new)
    new = optax.apply_updates(new, upd)
  for m, lr in enumerate(lrs):
    ref, plain = params, retrieval.optimizer(lr, steps)
    s = plain.init(ref)
    for _ in range(steps):
      upd, s = plain.update(grads, s, ref)
      ref = optax.apply_updates(ref, upd)
    for k in params:
      np.testing.assert_allclose(new[k][m], ref[k], rtol=1e-6, atol=1e-7)
  # weight decay on matrices only (the project's mask): the norm scale moves by Adam alone
  assert not np.allclose(new["scale"][0], params["scale"])


def _row(kind, lr, seed, acc, seq_len=64, niah=None):
  row = {"kind": kind, "size": "xs", "params": 10, "seq_len": seq_len, "num_pairs": seq_len // 16, "lr": lr,
         "seed": seed, "test_accuracy": acc, "niah_len": 2 * seq_len}
  row.update({c: (niah if niah is not None else acc) for c in retrieval.NIAH_COLUMNS})
  return row


def test_summary_picks_the_lr_by_mean_over_seeds():
  rows = ([_row("softmax", 1e-3, s, a) for s, a in enumerate((0.9, 0.5, 0.4))]  # mean 0.6, best single run 0.9
          + [_row("softmax", 1e-2, s, a) for s, a in enumerate((0.7, 0.7, 0.8))]  # mean 0.7333
          + [_row("lightning", 1e-3, s, a, niah=0.25) for s, a in enumerate((0.2, 0.4))]
          + [_row("softmax", 1e-3, 0, 1.0, seq_len=128)])
  by = {(g["kind"], g["seq_len"]): g for g in retrieval.summarize(rows)}
  g = by["softmax", 64]
  assert g["best_lr"] == 1e-2 and g["seeds"] == 3
  assert math.isclose(g["mean_accuracy"], 2.2 / 3)
  assert math.isclose(g["se_accuracy"], np.std([0.7, 0.7, 0.8], ddof=1) / math.sqrt(3))
  assert g["lr_means"] == "0.001:0.6000;0.01:0.7333"
  assert math.isclose(g["niah_0_mean"], 2.2 / 3)
  g = by["lightning", 64]
  assert math.isclose(g["mean_accuracy"], 0.3) and math.isclose(g["se_accuracy"], 0.1)
  assert g["niah_100_mean"] == 0.25 and g["niah_100_se"] == 0.0
  assert math.isnan(by["softmax", 128]["se_accuracy"])  # one seed: no standard error
  # order: kinds as in KINDS, then length
  assert [(g["kind"], g["seq_len"]) for g in retrieval.summarize(rows)] == [("softmax", 64), ("softmax", 128),
                                                                              ("lightning", 64)]


def test_elimination_baseline_matches_simulation():
  # Guessing uniformly among the not-yet-answered values of the sequence, simulated.
  rng = np.random.default_rng(0)
  for pairs in (1, 4, 8):
    hits = [rng.integers(0, pairs - j) == 0 for _ in range(4000) for j in range(pairs)]
    assert abs(np.mean(hits) - retrieval.elimination_baseline(pairs)) < 0.02
  assert abs(retrieval.elimination_baseline(8) - 0.3397) < 1e-3
