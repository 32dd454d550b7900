"""Faults and bad input in the pretraining recipe: nothing saved is lost, nothing silently wrong, one-line errors.

Through `recipes.pretrain.main` (exit codes, one line on stderr) on the cut-down tiny preset of test_pretrain.
"""

import json
import logging
import os
import pathlib
import shutil

import pytest

from mx01 import checkpoint as ckpt_lib
from mx01 import config as config_lib
from mx01.metrics import read_metrics
from recipes import pretrain
from tests.recipes.test_pretrain import SMALL, _abstract_state, _config

# One xdist worker runs the whole module, so its module-scoped recipe runs are made once (pytest.ini).
pytestmark = pytest.mark.xdist_group("test_faults")

BASE = ["--config.train.steps=8", "--config.train.log_every=4", "--config.train.checkpoint_every=4"]


def _main(run_dir, *extra):
  return pretrain.main(SMALL + BASE + [f"--config.train.run_dir={run_dir}", *extra])


def _one_line_error(capsys):
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
  return err


def _files(run_dir):
  """{relative path: BLAKE2b of the bytes} of every file under run_dir."""
  import hashlib
  return {str(p.relative_to(run_dir)): hashlib.blake2b(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(run_dir).rglob("*")) if p.is_file()}


def _steps(run_dir):
  return sorted(int(p.name) for p in (pathlib.Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit())


def _corrupt(step_dir):
  for path in (step_dir / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(os.urandom(max(16, path.stat().st_size)))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """8 steps, checkpoints at 4 and 8."""
  run_dir = tmp_path_factory.mktemp("base") / "run"
  assert _main(run_dir) == 0
  assert _steps(run_dir) == [4, 8]
  return run_dir


def _copy(base_run, tmp_path):
  run_dir = tmp_path / "run"
  shutil.copytree(base_run, run_dir)
  return run_dir


def test_resume_moves_a_corrupt_checkpoint_aside_so_later_saves_land(base_run, tmp_path, capsys):
  run_dir = _copy(base_run, tmp_path)
  _corrupt(run_dir / "checkpoints" / "8")
  assert _main(run_dir, "--resume", "--config.train.steps=12") == 0
  out = capsys.readouterr().out
  corrupt_lines = [l for l in out.splitlines() if "is corrupt" in l]
  assert len(corrupt_lines) == 1 and "Traceback" not in out  # the fallback is one line
  moved = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("corrupt-8-")]
  assert len(moved) == 1
  assert _steps(run_dir) == [4, 8, 12]  # step 8 saved again, valid
  cfg = _config(run_dir, *BASE, "--config.train.steps=12")
  ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", cfg, log=lambda s: None)
  try:
    restored = ckpt.restore(_abstract_state(cfg), step=8)
    assert restored.step == 8
    # A save orbax declines (a step not above the newest) is an error, never silent.
    with pytest.raises(ckpt_lib.CheckpointSaveError, match="declined"):
      ckpt.save(4, restored.state, data_state=restored.data_state)
  finally:
    ckpt.close()


def test_overwrite_with_a_bad_data_path_deletes_nothing(base_run, tmp_path, capsys):
  run_dir = _copy(base_run, tmp_path)
  before = _files(run_dir)
  assert _main(run_dir, "--overwrite", f"--config.data.source={tmp_path / 'no_such_corpus'}") == 2
  assert "no_such_corpus" in _one_line_error(capsys)
  assert _files(run_dir) == before
  # A layout that does not divide the model (MeshError): the same.
  assert _main(run_dir, "--overwrite", "--config.parallel.tensor=3") == 2
  _one_line_error(capsys)
  assert _files(run_dir) == before


def test_refused_resume_keeps_config_json(base_run, tmp_path, capsys):
  run_dir = _copy(base_run, tmp_path)
  saved = (run_dir / "config.json").read_text()
  assert _main(run_dir, "--resume", "--config.model.num_layers=3") == pretrain.EXIT_CHECKPOINT_ERROR
  err = _one_line_error(capsys)
  assert "model.num_layers: 2 (checkpoint) != 3 (run)" in err
  assert (run_dir / "config.json").read_text() == saved
  assert (run_dir / "metrics.jsonl").read_bytes() == (base_run / "metrics.jsonl").read_bytes()


def test_no_valid_checkpoint_is_one_line(base_run, tmp_path, capsys):
  run_dir = _copy(base_run, tmp_path)
  for step in (4, 8):
    _corrupt(run_dir / "checkpoints" / str(step))
  assert _main(run_dir, "--resume") == pretrain.EXIT_CHECKPOINT_ERROR
  err = _one_line_error(capsys)
  assert "step 8" in err and "step 4" in err
  assert _steps(run_dir) == [4, 8]  # nothing moved when nothing could be restored


def test_run_dir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "a_file"
  path.write_text("not a run\n")
  assert _main(path) == 2
  assert "is a file" in _one_line_error(capsys)
  assert path.read_text() == "not a run\n"


def test_resume_with_other_optimizer_hyperparameters(base_run, tmp_path):
  run_dir = _copy(base_run, tmp_path)
  assert _main(run_dir, "--resume", "--config.train.steps=10", "--config.train.learning_rate=0.002",
               "--config.train.warmup_steps=1", "--config.train.grad_clip=0.5") == 0
  records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
  assert sorted(records) == list(range(1, 11))
  from mx01 import training
  new = _config(run_dir, *BASE, "--config.train.steps=10", "--config.train.learning_rate=0.002",
                "--config.train.warmup_steps=1")
  assert records[9]["learning_rate"] == pytest.approx(float(training.learning_rate_schedule(new.train)(8)))
  assert json.loads((run_dir / "config.json").read_text())["train"]["learning_rate"] == 0.002


def test_config_mismatches_absent_keys_and_clipping():
  cfg = config_lib.Config()
  saved = config_lib.to_dict(cfg)
  del saved["data"]["skip_bad_records"]  # written before the field existed: counts as its default
  assert ckpt_lib.config_mismatches(saved, cfg) == []
  changed = config_lib.to_dict(cfg)
  changed["train"]["learning_rate"] *= 10
  changed["train"]["steps"] *= 2
  assert ckpt_lib.config_mismatches(changed, cfg) == []
  no_clip = config_lib.to_dict(cfg)
  no_clip["train"]["grad_clip"] = 0.0  # clipping off: another optimizer state structure
  assert any("grad_clip" in m for m in ckpt_lib.config_mismatches(no_clip, cfg))


def _reject_constant(name):
  raise ValueError(f"bare {name} in JSON")


def test_fresh_start_truncates_metrics_and_nonfinite_summary_is_valid_json(tmp_path, capsys):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  # A run killed before its first checkpoint left metrics behind.
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 99.0}) + "\n" for s in (1, 2, 3)))
  # Diverges at once; max_nonfinite_steps=0 never halts: every update is skipped and counted.
  assert _main(run_dir, "--config.train.steps=4", "--config.train.learning_rate=1e38",
               "--config.train.max_nonfinite_steps=0") == 0
  summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=_reject_constant)
  records = read_metrics(run_dir / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] != 99.0 for r in records)
  assert records[-1]["nonfinite"] == 1
  assert summary["final_train_loss"] is None and summary["final_nonfinite_steps"] >= 1
  assert summary["nonfinite_steps"] >= summary["final_nonfinite_steps"]


def test_nonfinite_halt_writes_summary(tmp_path, capsys):
  # Diverges at once; two non-finite steps in a row stop the run (exit 3) with summary.json written.
  run_dir = tmp_path / "run"
  assert _main(run_dir, "--config.train.learning_rate=1e38", "--config.train.max_nonfinite_steps=2",
               "--config.train.checkpoint_every=1") == pretrain.EXIT_NONFINITE
  assert "non-finite" in _one_line_error(capsys)
  summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=_reject_constant)
  records = read_metrics(run_dir / "metrics.jsonl")
  finite = [r for r in records if not r["nonfinite"]]
  assert summary["status"] == "halted_nonfinite" and summary["halted_at_step"] == records[-1]["step"]
  assert f"up to step {summary['halted_at_step']}" in summary["error"]
  assert summary["final_nonfinite_steps"] == 2 and summary["final_train_loss"] is None
  assert finite and summary["last_finite_loss"] == finite[-1]["loss"]
  assert summary["last_checkpoint"] == _steps(run_dir)[-1]


@pytest.mark.slow
def test_failed_async_save_stops_at_once_on_a_sharded_mesh(tmp_path, capsys, caplog, monkeypatch):
  import jax
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  run_dir = tmp_path / "run"
  monkeypatch.setenv(ckpt_lib.FAIL_SAVE_ENV, "4")  # the save of step 4 fails in orbax's background thread
  layout = ["--config.parallel.data=4", "--config.parallel.tensor=2", "--config.model.num_kv_heads=2",
            "--config.train.checkpoint_every=2", "--config.train.log_every=1"]
  assert _main(run_dir, *layout) == pretrain.EXIT_SAVE_ERROR
  err = _one_line_error(capsys)
  # orbax's own report of the failure (tracebacks, through absl logging) is kept off stderr.
  assert not [r for r in caplog.records if r.name == "absl" and r.levelno >= logging.ERROR]
  assert "saving a checkpoint" in err and "last good checkpoint is step 2" in err
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["last_checkpoint"] == 2 and summary["error"] and summary["steps"] <= 6
  assert summary["status"] == "save_failed" and summary["halted_at_step"] == summary["steps"]
  assert summary["mesh"]["data"] == 4 and summary["mesh"]["tensor"] == 2
  assert _steps(run_dir) == [2]
  # The last good checkpoint resumes, on the same mesh.
  monkeypatch.delenv(ckpt_lib.FAIL_SAVE_ENV)
  assert _main(run_dir, *layout, "--resume") == 0
  assert "resumed from" in capsys.readouterr().out
  assert _steps(run_dir)[-1] == 8
