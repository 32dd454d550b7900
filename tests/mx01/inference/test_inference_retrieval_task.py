"""The MQAR study of recipes/retrieval.py: generator shapes, determinism, answers; training loop; merging."""

import numpy as np
import pytest

from recipes import retrieval
from recipes.retrieval import FILLER, KINDS, elimination_baseline, model_config, mqar_batch, num_pairs_for


def test_shapes_and_determinism():
  a = mqar_batch(np.random.default_rng(7), 3, 63, 8, vocab_size=64)
  b = mqar_batch(np.random.default_rng(7), 3, 63, 8, vocab_size=64)
  assert a["tokens"].shape == (3, 64) and a["tokens"].dtype == np.int32
  assert a["loss_mask"].shape == (3, 63) and a["loss_mask"].dtype == bool
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
  c = mqar_batch(np.random.default_rng(8), 3, 63, 8, vocab_size=64)
  assert not np.array_equal(a["tokens"], c["tokens"])


@pytest.mark.parametrize("seq_len,pairs", [(16, 4), (64, 8), (255, 64)])
def test_every_key_is_queried_once_and_answers_are_its_value(seq_len, pairs):
  vocab = 256
  batch = mqar_batch(np.random.default_rng(0), 4, seq_len, pairs, vocab_size=vocab)
  for toks, mask in zip(batch["tokens"], batch["loss_mask"]):
    keys, values = toks[0:2 * pairs:2], toks[1:2 * pairs:2]
    assert len(set(keys.tolist())) == pairs
    assert np.all((keys >= 1) & (keys < vocab // 2)) and np.all(values >= vocab // 2)
    table = dict(zip(keys.tolist(), values.tolist()))
    query_pos = np.nonzero(mask)[0]
    assert len(query_pos) == pairs and np.all(query_pos >= 2 * pairs)  # answers only in the query region
    assert sorted(toks[query_pos].tolist()) == sorted(keys.tolist())
    for t in query_pos:
      assert toks[t + 1] == table[toks[t]]  # the target of a masked position is the key's value
    rest = np.ones(seq_len + 1, bool)
    rest[:2 * pairs] = False
    rest[query_pos] = rest[query_pos + 1] = False
    assert np.all(toks[rest] == FILLER)


def test_invalid_sizes_raise_and_configs_build():
  with pytest.raises(ValueError, match="num_pairs"):
    mqar_batch(np.random.default_rng(0), 1, 15, 8)
  assert num_pairs_for(1024, 1 / 8, 256) == 127
  assert num_pairs_for(1024, None, 256, num_pairs=8) == 8  # fixed pairs at every length...
  assert num_pairs_for(16, None, 256, num_pairs=8) == 4  # ...capped by what fits
  cfg = model_config("hybrid", "s", vocab_size=64, seq_len=32)
  assert cfg.resolved_layer_types == ("lightning", "lightning", "lightning", "softmax")


def test_elimination_baseline_matches_simulation():
  # Guessing uniformly among the not-yet-answered values of the sequence, simulated.
  rng = np.random.default_rng(0)
  for pairs in (1, 4, 8):
    hits = [rng.integers(0, pairs - j) == 0 for _ in range(4000) for j in range(pairs)]
    assert abs(np.mean(hits) - elimination_baseline(pairs)) < 0.02
  assert abs(elimination_baseline(8) - 0.3397) < 1e-3


@pytest.mark.slow
def test_steps_per_call_trains_on_the_same_batches():
  kw = dict(steps=7, batch_size=4, lr=1e-3, vocab_size=32, pairs_per_token=None, eval_batches=1, seed=3, num_pairs=2)
  one = retrieval.train_one("softmax", "xs", 16, steps_per_call=1, **kw)
  scan = retrieval.train_one("softmax", "xs", 16, steps_per_call=3, **kw)  # 3 + 3 + 1 steps
  np.testing.assert_allclose(one["final_train_loss"], scan["final_train_loss"], rtol=1e-5)
  assert one["eval_accuracy"] == scan["eval_accuracy"]
  assert one["init_std"] == 64 ** -0.5


def test_merge_concatenates_runs(tmp_path):
  rows = [{"kind": k, "size": "xs", "params": 1, "seq_len": 16, "num_pairs": 2, "eval_accuracy": 0.5} for k in KINDS]
  paths = []
  for i, row in enumerate(rows):
    paths.append(str(tmp_path / f"r{i}.csv"))
    retrieval.write_csv([dict(row, extra=i)] if i else [row], paths[-1])
  assert retrieval.main(["--merge", *paths, "--out", str(tmp_path / "all.csv")]) == 0
  assert [r["kind"] for r in retrieval.read_csv(str(tmp_path / "all.csv"))] == list(KINDS)
  assert (tmp_path / "all.png").exists()
