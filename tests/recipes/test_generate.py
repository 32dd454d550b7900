"""recipes.generate on the command line: verified checkpoint loading with fallback, one-line usage errors."""

import json
import pathlib
import shutil
import sys
import types

import jax
import numpy as np
import pytest

from mx01 import checkpoint as ckpt_lib
from mx01 import training
from recipes import flags as flags_lib
from recipes import generate

# A model that compiles in seconds on two CPU cores (the tiny preset, cut down).
SMALL = ["--config.model.rotary_dim=4", "--config.model.hidden_size=32", "--config.model.num_layers=2",
         "--config.model.head_dim=8", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
         "--config.model.intermediate_size=32", "--config.model.block_size=8", "--config.data.seq_len=32",
         "--config.train.tensorboard=false"]
GEN = ["--prompt", "def ", "--max-new-tokens", "6", "--json"]


def _state_of_step(cfg, step):
  """A training state of the run's structure with random values (different for every step)."""
  optimizer, _ = training.make_optimizer(cfg.train)
  abstract = jax.eval_shape(lambda k: training.init_train_state(cfg.model, optimizer, k, k), jax.random.key(0))
  rng = np.random.default_rng(step)
  return jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, run directory) as recipes.pretrain leaves it: checkpoints of steps 4 and 8 (different parameters)."""
  run_dir = tmp_path_factory.mktemp("run")
  cfg, _ = flags_lib.parse_flags(SMALL + [f"--config.train.run_dir={run_dir}"], flags_lib.build_parser("test"))
  ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", cfg, async_save=False, log=lambda s: None)
  for step in (4, 8):
    ckpt.save(step, _state_of_step(cfg, step), data_state={"step": step})
  ckpt.close()
  return cfg, run_dir


@pytest.fixture
def run_dir(run):
  return run[1]


def _generate(capsys, *argv):
  rc = generate.main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def _copy(run_dir, tmp_path, drop=()):
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)
  for step in drop:
    shutil.rmtree(copy / "checkpoints" / str(step))
  return copy


def _largest_array_file(run, step):
  files = [p for p in (run / "checkpoints" / str(step) / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


def _flip_a_bit(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def test_bit_flipped_checkpoint_falls_back_to_the_previous_one(run, tmp_path):
  cfg, run_dir = run
  flipped = _copy(run_dir, tmp_path)
  _flip_a_bit(_largest_array_file(flipped, 8))
  messages = []
  loaded_cfg, params = generate.load_checkpoint_params(str(flipped), log=messages.append)
  assert loaded_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, params, _state_of_step(cfg, 4)["params"])  # step 4, not garbage
  notes = [m for m in messages if "step 8" in m]
  assert len(notes) == 1 and "corrupt" in notes[0] and "checksum" in notes[0] and "\n" not in notes[0]
  assert messages[-1].startswith("restored params of step 4")


def test_truncated_checkpoint_falls_back_with_a_one_line_note(run_dir, tmp_path, capsys):
  truncated = _copy(run_dir, tmp_path)
  path = _largest_array_file(truncated, 8)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  rc, out, err = _generate(capsys, "--run-dir", str(truncated), *GEN)
  assert rc == 0, err
  assert "restored params of step 4" in err and "Traceback" not in err
  assert len(err.strip().splitlines()) == 2, err  # the note on step 8, then the step restored


def test_no_usable_checkpoint_is_one_line(run_dir, tmp_path, capsys):
  broken = _copy(run_dir, tmp_path)
  for step in (4, 8):
    _flip_a_bit(_largest_array_file(broken, step))
  rc, out, err = _generate(capsys, "--run-dir", str(broken), *GEN)
  assert rc == 2 and out == ""
  assert err.strip().splitlines()[-1].startswith("error: no checkpoint in") and "Traceback" not in err


def test_missing_run_dir_is_not_created(tmp_path, capsys):
  missing = tmp_path / "no_such_run"
  rc, out, err = _generate(capsys, "--run-dir", str(missing), *GEN)
  assert rc == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err
  assert not missing.exists()
  empty = tmp_path / "empty_run"
  empty.mkdir()
  rc, out, err = _generate(capsys, "--run-dir", str(empty), *GEN)
  assert rc == 2 and "no checkpoint in" in err and not (empty / "checkpoints").exists()


def test_run_dir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "run.txt"
  path.write_text("not a run")
  rc, out, err = _generate(capsys, "--run-dir", str(path), *GEN)
  assert rc == 2 and len(err.strip().splitlines()) == 1 and "is a file" in err


@pytest.mark.parametrize("flags,named", [
    (["--temperature", "-1"], "--temperature"), (["--top-p", "2"], "--top-p"), (["--top-k", "0"], "--top-k"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--prompt", ""], "--prompt"),
    (["--stop", "é"], "--stop"), (["--stop", "ab"], "--stop"), (["--prefill-chunk", "0"], "--prefill-chunk"),
])
def test_bad_flags_are_one_line_errors(flags, named, capsys):
  rc, out, err = _generate(capsys, "--random-init", *SMALL, *GEN, *flags)
  assert rc == 2 and out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {named}"), err


def test_single_byte_stops_still_work():
  assert generate.stop_tokens(["\\n", ".", "\\x00", "\\xff"]) == [10, 46, 0, 255]


def test_reports_of_abandoned_reads_are_silenced_others_are_not(monkeypatch):
  reported = []
  monkeypatch.setattr(sys, "unraisablehook", reported.append)  # stands for Python's report on stderr

  async def read():
    pass

  abandoned = read()
  report = lambda obj, exc: types.SimpleNamespace(object=obj, exc_value=exc, exc_type=type(exc))  # noqa: E731
  with ckpt_lib.dropped_reads_silenced():
    sys.unraisablehook(report(abandoned, Exception("Encountered error while reading array index")))
    sys.unraisablehook(report(None, RuntimeError("Event loop is closed")))
    sys.unraisablehook(report(None, ValueError("something else")))
  abandoned.close()
  assert [str(r.exc_value) for r in reported] == ["something else"]
  assert sys.unraisablehook == reported.append  # restored
