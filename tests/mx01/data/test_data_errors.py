"""Unusable data stops the run before it starts, with one line naming the file and the fix (mx01.data)."""

import json

import numpy as np
import pytest

from mx01 import config as config_lib
from mx01 import presets
from mx01.config import ConfigError
from mx01.data import DataError, DataPipeline, load_tokenizer
from mx01.data import sources as sources_lib


def _config(source, **overrides):
  base = {"data.seq_len": 32, "train.batch_size": 4, "data.source": str(source)}
  base.update(overrides)
  return config_lib.apply_overrides(presets.get_preset("tiny"), base)


def _pipeline(source, **overrides):
  return DataPipeline(_config(source, **overrides), process_index=0, process_count=1)


def _one_line(e) -> str:
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_missing_and_empty_sources_are_data_errors(tmp_path):
  with pytest.raises(DataError) as e:
    _pipeline(tmp_path / "nowhere")
  assert "nowhere" in _one_line(e) and "does not exist" in str(e.value)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.bin").write_bytes(b"\x00")  # not a document suffix
  with pytest.raises(DataError) as e:
    _pipeline(tmp_path / "empty")
  assert "no documents found" in _one_line(e)
  with pytest.raises(DataError, match="no documents found in ''"):
    _pipeline("")  # --config.data.source=
  assert issubclass(DataError, ConfigError)  # the recipes report config errors in one line


def test_folder_of_empty_documents_is_an_error_not_a_hang(tmp_path):
  for i in range(6):
    (tmp_path / f"doc{i}.txt").write_text("")
  with pytest.raises(DataError) as e:
    _pipeline(tmp_path, **{"data.eval_fraction": 0.0})
  assert "all empty" in _one_line(e)


def test_empty_held_out_documents_are_an_error_not_a_hang(tmp_path):
  # The one real document is kept for training (its key hashes above eval_fraction); the held-out
  # split gets only empty ones, from which eval_batches would wait forever for a token.
  real = next(f"real{k}.txt" for k in range(100) if sources_lib._unit_hash(f"real{k}.txt") > 0.6)
  (tmp_path / real).write_text("some text " * 20)
  for i in range(8):
    (tmp_path / f"empty{i}.txt").write_text("")
  with pytest.raises(DataError) as e:
    _pipeline(tmp_path, **{"data.eval_fraction": 0.6, "train.batch_size": 1})
  msg = _one_line(e)
  assert "held-out" in msg and "all empty" in msg and "data.eval_fraction" in msg


def _write_jsonl(path, bad_line: int, n: int = 6):
  lines = [json.dumps({"text": f"document number {i} " * 4}) for i in range(n)]
  lines[bad_line - 1] = '{"text": "cut off in the midd'
  path.write_text("\n".join(lines) + "\n")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
  _write_jsonl(tmp_path / "good.jsonl", bad_line=1)
  (tmp_path / "good.jsonl").write_text(json.dumps({"text": "fine " * 10}) + "\n")
  _write_jsonl(tmp_path / "bad.jsonl", bad_line=4)
  with pytest.raises(DataError) as e:
    _pipeline(tmp_path)
  msg = _one_line(e)
  assert f"{tmp_path / 'bad.jsonl'}:4" in msg and "data.skip_bad_records" in msg
  # A record without the text field is named the same way.
  (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok " * 9}) + "\n" + json.dumps({"body": "x"}) + "\n")
  with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object with a 'text' field"):
    _pipeline(tmp_path)


def test_skip_bad_records_skips_and_counts(tmp_path):
  _write_jsonl(tmp_path / "bad.jsonl", bad_line=2)
  data = _pipeline(tmp_path, **{"data.skip_bad_records": True, "data.eval_fraction": 0.0})
  assert data.skipped_records == (f"{tmp_path / 'bad.jsonl'}:2",)
  assert data.num_train_documents == 5
  texts = {src[i] for src in data.row_sources.values() for i in range(len(src))}
  assert texts == {f"document number {i} " * 4 for i in (0, 2, 3, 4, 5)}
  it = data.train_iterator()
  batch = next(it)
  it.close()
  assert batch["tokens"].shape == (4, 33) and (batch["segment_ids"] > 0).all()


def test_garbage_tokenizer_json_names_the_file(tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_bytes(np.random.default_rng(0).bytes(300))
  with pytest.raises(DataError) as e:
    load_tokenizer(str(path))
  msg = _one_line(e)
  assert str(path) in msg and "data.tokenizer" in msg
  with pytest.raises(DataError, match="neither 'byte' nor a tokenizer.json"):
    load_tokenizer(str(tmp_path / "missing.json"))


def test_runs_saved_before_the_switch_existed_still_resume(tmp_path):
  from mx01 import checkpoint as ckpt_lib
  cfg = _config(tmp_path)
  saved = config_lib.to_dict(cfg)
  del saved["data"]["skip_bad_records"]
  assert ckpt_lib.config_mismatches(saved, cfg) == []
  assert ckpt_lib.config_mismatches(saved, config_lib.apply_overrides(cfg, {"data.skip_bad_records": True})) == []
