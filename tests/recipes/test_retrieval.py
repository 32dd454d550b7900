"""The MQAR study of recipes/retrieval.py: the data (Zoology's task), the NIAH sets, the answer loss against
the full logits, the vmapped grid of the one train step against that step on each model alone, and the
summary statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mx01 import model as model_lib
from mx01 import training
from recipes import retrieval
from recipes.retrieval import FILLER, mqar_dataset, niah_dataset
from tests.mx01.parallel.util import max_abs_diff


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


def _alone(cfg, steps, num_answers):
  """The reference: one model trained by the project's one train step with the study's loss hook, step by
  step ((lr, params, mqar batches [steps, batch, ...]) -> (params, last loss, last accuracy)).  Its optimizer is
  `grid_optimizer` for one compile over the learning rates (== optax's AdamW and schedule:
  test_grid_optimizer_matches_plain_adamw)."""
  opt = retrieval.grid_optimizer(steps)
  step = jax.jit(training.make_train_step(cfg, None, opt, loss_fn=retrieval.answer_loss(num_answers)))

  def run(lr, params, batches):
    state = opt.init(params)
    state = {"params": params, "opt_state": state._replace(hyperparams=dict(state.hyperparams, lr=jnp.float32(lr)))}
    state = jax.device_put(state, training.state_shardings(state, opt, training.trivial_mesh(), cfg))
    params, state = state["params"], state["opt_state"]
    for t in range(batches["inputs"].shape[0]):
      params, state, metrics = step(params, state, retrieval.step_batch({k: v[t] for k, v in batches.items()}))
    return params, metrics["loss"], metrics["correct"]

  return run


def _full_logits_loss(hidden, head, answer_pos, answers):
  """The plain reference: logits at every position [B, L, vocab], then read at the answers: (mean
  cross-entropy, correct answers)."""
  logits = jnp.einsum("bld,dv->blv", hidden, head)  # [B, L, vocab]
  at = jnp.take_along_axis(logits, answer_pos[..., None], axis=1)  # [B, P, vocab]
  nll = -jnp.take_along_axis(jax.nn.log_softmax(at), answers[..., None], axis=-1)
  return jnp.mean(nll), jnp.sum(jnp.argmax(at, -1) == answers)


def test_answer_loss_equals_full_logits_reference():
  # The hook alone, on random hidden states: its loss and gradients (hidden and head) == the full logits'
  # at the answers; and on the sequence cut in pieces (a device's share under sequence parallelism, here
  # 3 answers over 2 pieces, so a piece may hold none of a row's), the pieces' sums add up to the whole.
  # float32: 1e-6 relative on the loss, 1e-6 absolute on gradients of size ~1e-2.
  pairs, b, l, d, v = 3, 5, 26, 16, 64
  data = mqar_dataset(b, l, pairs, v, 2)
  hidden = jax.random.normal(jax.random.key(0), (b, l, d))
  head = 0.3 * jax.random.normal(jax.random.key(1), (d, v))
  batch = retrieval.step_batch(data)
  targets, mask = batch["targets"], batch["loss_mask"]
  hook = jax.jit(retrieval.answer_loss(pairs))

  def mean_loss(hidden, head):
    nll, count, extra = hook(hidden, head, targets, mask)
    return nll / count, (count, extra["correct"])

  (loss, (count, correct)), grads = jax.jit(jax.value_and_grad(mean_loss, (0, 1), has_aux=True))(hidden, head)
  (ref, ref_correct), ref_grads = jax.jit(jax.value_and_grad(_full_logits_loss, (0, 1), has_aux=True))(
      hidden, head, jnp.asarray(data["answer_pos"]), jnp.asarray(data["answers"]))
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
  assert float(count) == b * pairs and float(correct) == float(ref_correct)
  assert max_abs_diff(grads, ref_grads) < 1e-6
  order = np.random.default_rng(0).permutation(l)
  pieces = [hook(hidden[:, i], head, targets[:, i], mask[:, i]) for i in np.split(order, [l // 2])]
  np.testing.assert_allclose(sum(float(p[0]) for p in pieces) / (b * pairs), float(ref), rtol=1e-6)
  assert sum(float(p[1]) for p in pieces) == b * pairs
  assert sum(float(p[2]["correct"]) for p in pieces) == float(ref_correct)
  # The batch in the step's format: the answers are the targets at the query positions, nothing else counts.
  rows = np.arange(b)[:, None]
  assert np.asarray(mask).sum() == b * pairs and np.all(np.asarray(mask)[rows, data["answer_pos"]])
  np.testing.assert_array_equal(np.asarray(targets)[rows, data["answer_pos"]], data["answers"])


def test_step_loss_is_the_full_logits_loss_at_the_answers():
  # Through the step's loss on the mesh (explicit targets, the hook on the final hidden states and the head)
  # == mx01.model's full logits read at the answer positions.  float32: 1e-5 relative.
  cfg = _tiny_config("hybrid")
  data = mqar_dataset(5, 26, 3, 64, 2)
  params = model_lib.init(cfg, jax.random.key(3))
  logits, _ = jax.jit(lambda p, x: model_lib.apply(p, x, config=cfg))(params, data["inputs"])  # [B, L, vocab]
  at = np.take_along_axis(np.asarray(logits), data["answer_pos"][..., None], axis=1)  # [B, P, vocab]
  ref = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(at)), data["answers"][..., None], axis=-1))
  ref_correct = np.sum(at.argmax(-1) == data["answers"])
  loss, metrics = jax.jit(training.make_loss(cfg, training.trivial_mesh(), loss_fn=retrieval.answer_loss(3)))(
      params, retrieval.step_batch(data))
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  assert float(metrics["tokens"]) == 15 and round(float(metrics["correct"]) * 15) == int(ref_correct)


def test_answer_loss_on_a_data_by_sequence_mesh_equals_one_device():
  # The hook on each device's piece of rows and sequence (data 2 x sequence 4: the sequence layout hands a
  # device two non-adjacent pieces of a row, so its answers sit anywhere in its piece, or none at all) sums
  # to the one-device loss and correct count.  float32: 1e-5 relative.
  from mx01.parallel import mesh as mesh_lib
  from mx01.config import ParallelConfig
  from mx01.parallel import step as step_lib
  if jax.device_count() < 8:
    pytest.skip("needs 8 host devices (tests/conftest.py sets them)")
  cfg = _tiny_config("hybrid")
  data = mqar_dataset(4, 32, 3, 64, 7)
  params = model_lib.init(cfg, jax.random.key(4))
  hook, batch = retrieval.answer_loss(3), retrieval.step_batch(data)
  loss_ref, m_ref = jax.jit(training.make_loss(cfg, training.trivial_mesh(), loss_fn=hook))(params, batch)
  pm = mesh_lib.build_mesh(ParallelConfig(data=2, sequence=4))
  loss, m = jax.jit(training.make_loss(cfg, pm, loss_fn=hook))(step_lib.shard_params(params, pm, cfg), batch)
  np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
  assert float(m["tokens"]) == float(m_ref["tokens"]) == 12 and float(m["correct"]) == float(m_ref["correct"])


@pytest.mark.slow
def test_grid_equals_the_train_step_on_each_model_alone():
  # fit_grid (vmap of make_train_step over the stacked models, scanned, two calls of 2 steps) == each model
  # trained by make_train_step alone: same parameters, same last loss and accuracy; and make_evaluate's test
  # accuracy == the plain forward's full logits read at the answers.
  cfg = _tiny_config("hybrid")
  train, test = retrieval.study_data(32, 2, 64, train_examples=20, test_examples=16, data_seed=0)
  lrs, seeds, steps, batch = (3e-3, 1e-2), (0, 5), 4, 8  # 32 rows of 20: the second epoch starts in step 3
  params, loss, acc = retrieval.fit_grid(cfg, train, lrs=lrs, seeds=seeds, steps=steps, batch_size=batch,
                                         steps_per_call=2)
  test_acc = retrieval.make_evaluate(cfg)(params, test, 16)
  alone, forward = _alone(cfg, steps, 2), jax.jit(lambda p, x: model_lib.apply(p, x, config=cfg)[0])
  for m, (lr, s) in enumerate((lr, s) for lr in lrs for s in seeds):
    order = retrieval.batch_order(s, 20, batch, steps)  # [steps, batch]
    p, l, a = alone(lr, model_lib.init(cfg, jax.random.key(s)), {k: v[order] for k, v in train.items()})
    # float32: the vmapped program may sum in another order; 4 Adam steps of lr <= 1e-2 keep that below 1e-5
    assert max_abs_diff(jax.tree.map(lambda x: x[m], params), p) < 1e-5
    np.testing.assert_allclose(loss[m], float(l), rtol=1e-5)
    assert acc[m] == float(a)
    logits = forward(p, test["inputs"])  # [B, L, vocab]
    pred = np.take_along_axis(np.asarray(logits).argmax(-1), test["answer_pos"], axis=1)
    assert abs(test_acc[m] - np.mean(pred == test["answers"])) <= 1 / test["answers"].size + 1e-9


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
