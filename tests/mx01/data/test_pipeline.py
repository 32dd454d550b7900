"""Packing, splitting, sources, tokenizers and iterator state of mx01.data."""

import json
import os

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from mx01 import config as config_lib
from mx01 import presets
from mx01.data import DataPipeline, PackedRowsIterDataset, load_tokenizer, open_source, split_indices
from mx01.data import sources as sources_lib
from mx01.model import positions_from_segments


def _docs(seed=0, n=40):
  rng = np.random.default_rng(seed)
  # Lengths from empty to several rows long; token values encode (doc, position) for checking.
  lengths = rng.integers(0, 60, size=n)
  lengths[3] = 150  # longer than two rows
  return [np.arange(k, dtype=np.int32) + 1000 * (i + 1) for i, k in enumerate(lengths)]


def _pack(docs, row_len):
  ds = PackedRowsIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), row_len)
  return list(ds)


@pytest.mark.parametrize("row_len", [2, 17, 64])
def test_packing_keeps_every_token_once_in_order(row_len):
  docs = _docs()
  rows = _pack(docs, row_len)
  tokens = np.concatenate([r["tokens"] for r in rows])
  segs = np.concatenate([r["segment_ids"] for r in rows])
  stream = np.concatenate(docs)
  n = stream.size
  np.testing.assert_array_equal(tokens[:n], stream)  # nothing lost, duplicated or reordered
  assert (segs[:n] > 0).all()
  assert (segs[n:] == 0).all() and (tokens[n:] == 0).all()  # padding only at the very end
  assert segs.size - n < row_len
  for r in rows:  # segment ids count 1, 2, 3... within each row
    s = r["segment_ids"][r["segment_ids"] > 0]
    assert s[0] == 1 and set(np.diff(s)) <= {0, 1}


def test_segments_match_documents_and_positions():
  row_len = 32
  docs = _docs(1)
  rows = _pack(docs, row_len)
  for r in rows:
    tok, seg = r["tokens"], r["segment_ids"]
    pos = np.asarray(positions_from_segments(jnp.asarray(seg[None])))[0]
    for s in np.unique(seg[seg > 0]):
      piece = tok[seg == s]
      doc_ids = piece // 1000
      assert (doc_ids == doc_ids[0]).all(), "a segment mixes two documents"
      offsets = piece % 1000
      np.testing.assert_array_equal(np.diff(offsets), 1)  # contiguous slice of one document
      np.testing.assert_array_equal(pos[seg == s], np.arange(piece.size))
    # Neighbouring segments within a row are different documents.
    starts = np.nonzero(np.diff(seg) != 0)[0]
    for i in starts:
      if seg[i + 1] > 0:
        assert tok[i] // 1000 != tok[i + 1] // 1000


def test_packing_state_resumes_exactly():
  docs = _docs(2)
  ds = PackedRowsIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), 23)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = list(it)
  it2 = iter(ds)
  it2.set_state(state)
  rest2 = list(it2)
  assert len(rest) == len(rest2) > 0
  for a, b in zip(rest, rest2):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])


def _small_config(tmp_path, **overrides):
  cfg = presets.get_preset("tiny")
  base = {"data.seq_len": 32, "train.batch_size": 4, "data.source": str(tmp_path)}
  base.update(overrides)
  return config_lib.apply_overrides(cfg, base)


def _write_corpus(tmp_path):
  (tmp_path / "sub").mkdir()
  for i in range(12):
    (tmp_path / "sub" / f"doc{i:02d}.txt").write_text(f"document {i} " * (i + 3))
  with open(tmp_path / "more.jsonl", "w") as f:
    for i in range(10):
      f.write(json.dumps({"text": f"json line {i} " * 5, "id": i}) + "\n")


def test_text_and_jsonl_sources_and_split(tmp_path):
  _write_corpus(tmp_path)
  src = open_source(str(tmp_path))
  assert len(src) == 22
  texts = [src[i] for i in range(len(src))]
  assert "json line 3 " * 5 in texts and any(t.startswith("document 0 ") for t in texts)
  train, held = split_indices(src, 0.2)
  assert len(held) >= 1 and len(train) >= 1
  assert sorted(np.concatenate([train, held]).tolist()) == list(range(22))
  train2, held2 = split_indices(open_source(str(tmp_path)), 0.2)
  np.testing.assert_array_equal(held, held2)  # deterministic


def test_pipeline_batches_hosts_and_resume(tmp_path):
  _write_corpus(tmp_path)
  cfg = _small_config(tmp_path, **{"data.eval_fraction": 0.2})
  data = DataPipeline(cfg, process_index=0, process_count=1)
  it = data.train_iterator()
  b = next(it)
  assert b["tokens"].shape == (4, 33) and b["segment_ids"].shape == (4, 33)
  assert b["tokens"].dtype == np.int32 and (b["segment_ids"] > 0).all()
  state = json.loads(json.dumps(it.get_state()))
  after = [next(it) for _ in range(4)]
  it2 = data.train_iterator(state)
  for a in after:
    np.testing.assert_array_equal(a["tokens"], next(it2)["tokens"])
  it.close(), it2.close()
  # Two hosts read disjoint documents, half the batch each, and together the one-host batches.
  h0 = DataPipeline(cfg, process_index=0, process_count=2)
  h1 = DataPipeline(cfg, process_index=1, process_count=2)
  assert h0.host_batch_size == 2
  keys = lambda h: {s.key(i) for s in h.row_sources.values() for i in range(len(s))}  # noqa: E731
  k0, k1 = keys(h0), keys(h1)
  assert not k0 & k1 and len(k0 | k1) == data.num_train_documents
  one, i0, i1 = data.train_iterator(), h0.train_iterator(), h1.train_iterator()
  for _ in range(3):
    whole, a, b = next(one), next(i0), next(i1)
    for k in ("tokens", "segment_ids"):
      np.testing.assert_array_equal(whole[k], np.concatenate([a[k], b[k]]))
  # A host resumes from the merged states of the hosts of another run (here: one host's state).
  i1b = h1.train_iterator(one.get_state())
  np.testing.assert_array_equal(next(i1b)["tokens"], next(one)["tokens"][2:])
  one.close(), i0.close(), i1.close(), i1b.close()
  held = {data.eval_source.key(i) for i in range(len(data.eval_source))}
  assert not held & (k0 | k1)
  ev = data.eval_batches(2)
  assert len(ev) == 2 and ev[0]["tokens"].shape == (4, 33)
  # The held-out batches too are the one-host batches, split by rows (the held-out loss does not depend on
  # the number of hosts).
  for whole, a, b in zip(ev, h0.eval_batches(2), h1.eval_batches(2)):
    for k in ("tokens", "segment_ids"):
      np.testing.assert_array_equal(whole[k], np.concatenate([a[k], b[k]]))


def test_shuffle_seed_changes_order(tmp_path):
  _write_corpus(tmp_path)
  a = DataPipeline(_small_config(tmp_path), process_index=0, process_count=1).train_iterator()
  b = DataPipeline(_small_config(tmp_path, **{"data.shuffle_seed": 1}), process_index=0,
                   process_count=1).train_iterator()
  assert not all((next(a)["tokens"] == next(b)["tokens"]).all() for _ in range(3))
  a.close(), b.close()


def test_embedded_corpus_is_stdlib_and_sorted():
  src = sources_lib.stdlib_corpus()
  keys = [src.key(i) for i in range(len(src))]
  assert len(keys) > 500 and keys == sorted(keys)
  assert "os.py" in keys and not any("site-packages" in k for k in keys)


def test_array_record_source(tmp_path):
  array_record = pytest.importorskip("array_record.python.array_record_module")
  path = str(tmp_path / "docs.array_record")
  writer = array_record.ArrayRecordWriter(path, "group_size:1")
  for i in range(5):
    writer.write(f"record number {i}".encode())
  writer.write(json.dumps({"text": "from json"}).encode())
  writer.close()
  src = open_source(path)
  assert len(src) == 6 and src[2] == "record number 2" and src[5] == "from json"


def test_tokenizers(tmp_path):
  byte = load_tokenizer("byte")
  ids = byte.encode("héllo")
  assert ids.dtype == np.int32 and ids.max() < 256 and byte.decode(ids) == "héllo"
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, pre_tokenizers
  tok = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  hf = load_tokenizer(path)
  assert hf.vocab_size == 3
  np.testing.assert_array_equal(hf.encode("hello world foo"), [1, 2, 0])


def test_vocab_too_small_is_a_config_error(tmp_path):
  _write_corpus(tmp_path)
  cfg = _small_config(tmp_path, **{"model.vocab_size": 100})
  with pytest.raises(config_lib.ConfigError, match="model.vocab_size"):
    DataPipeline(cfg, process_index=0, process_count=1)
