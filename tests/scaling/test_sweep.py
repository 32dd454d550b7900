"""Tests of the scaling sweep (recipes/sweep.py): configs, FLOPs, CSV rows and resumability."""

from __future__ import annotations

import csv
import pathlib

import numpy as np
import pytest

from mx01 import checkpoint as ckpt_lib
from mx01 import config as config_lib
from mx01.config import LIGHTNING, SOFTMAX
from recipes import sweep
from scaling import flops


def test_layer_types():
  assert sweep.layer_types("softmax", 3) == (SOFTMAX,) * 3
  assert sweep.layer_types("lightning", 3) == (LIGHTNING,) * 3
  assert sweep.layer_types("hybrid", 16) == ((LIGHTNING,) * 7 + (SOFTMAX,)) * 2
  assert sweep.layer_types("hybrid", 4) == (LIGHTNING,) * 3 + (SOFTMAX,)
  with pytest.raises(ValueError, match="unknown arch"):
    sweep.layer_types("mamba", 4)


@pytest.mark.parametrize("size", sorted(sweep.SIZES))
def test_small_model_configs_grow(size):
  cfgs = {arch: sweep.small_model_config(arch, size) for arch in sweep.ARCHS}
  assert all(c.hidden_size == sweep.SIZES[size][0] for c in cfgs.values())
  moe = sweep.small_model_config("hybrid", size, ffn="moe")
  assert flops.param_count(moe).ffn_active == flops.param_count(cfgs["hybrid"]).ffn_active


def test_bad_grid_values():
  with pytest.raises(ValueError, match="unknown size"):
    sweep.small_model_config("softmax", "s99")
  assert sweep.main(["--sizes", "s99", "--dry_run"]) == 2
  assert sweep.main(["--tokens", "-5", "--dry_run"]) == 2
  for key in ("train.batch_size", "data.seq_len", "train.learning_rate"):
    assert sweep.main([f"--config.{key}=0", "--dry_run"]) == 2


def test_sweep_writes_rows_and_resumes(tmp_path):
  calls = []

  def fake_train(cfg, resume, log):
    calls.append(cfg.train.run_dir)
    n = flops.param_count(cfg.model).non_embedding
    return {"final_train_loss": 3.0 - 1e-6 * n, "eval_loss": 3.1 - 1e-6 * n, "n_params": n,
            "n_params_total": flops.param_count(cfg.model).total,
            "tokens_seen": cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len}

  out = tmp_path / "sweep.csv"
  points = sweep.grid(["softmax", "lightning"], ["s1", "s2"], [4096, 8192])
  kw = dict(batch_size=2, seq_len=64, run_root=tmp_path / "runs", train_fn=fake_train, log=lambda s: None)
  rows = sweep.run_sweep(points, out, **kw)
  assert len(rows) == len(calls) == 8
  with open(out) as f:
    table = list(csv.DictReader(f))
  assert len(table) == 8 and tuple(table[0]) == sweep.CSV_COLUMNS
  for r in table:
    cfg = sweep.small_model_config(r["arch"], r["size"])
    assert int(r["n_params"]) == flops.param_count(cfg).non_embedding
    assert float(r["compute"]) == pytest.approx(flops.training_flops(cfg, 64, int(r["tokens"])))
  # Re-running skips everything; extending the grid runs only the new points.
  assert sweep.run_sweep(points, out, **kw) == []
  more = sweep.run_sweep(sweep.grid(["softmax", "lightning", "hybrid"], ["s1"], [4096]), out, **kw)
  assert [(r["arch"], r["size"]) for r in more] == [("hybrid", "s1")]
  assert len(calls) == 9


@pytest.mark.slow
def test_sweep_one_real_run(tmp_path):
  out = tmp_path / "sweep.csv"
  rows = sweep.run_sweep(sweep.grid(["hybrid"], ["s1"], [1024]), out, batch_size=2, seq_len=64,
                         run_root=tmp_path / "runs", log=lambda s: None)
  assert len(rows) == 1 and rows[0]["final_loss"] > 0 and rows[0]["eval_loss"] > 0


def _fake_train_with_checkpoints(calls):
  """Stands in for pretrain.train: a run_dir keeps the config it was first trained with, as its checkpoints do.

  Resuming a run_dir with another config is refused like Checkpointer.restore refuses it.
  """
  saved = {}

  def train(cfg, resume, log):
    run_dir = cfg.train.run_dir
    if run_dir in saved:
      mismatches = ckpt_lib.config_mismatches(config_lib.to_dict(saved[run_dir]), cfg)
      if mismatches:
        raise ckpt_lib.CheckpointMismatchError(
            f"checkpoint {run_dir}/4 was written with a different config; mismatched fields:\n  "
            + "\n  ".join(mismatches))
    saved.setdefault(run_dir, cfg)
    calls.append(cfg)
    return {"final_train_loss": 3.0, "eval_loss": 3.1,
            "tokens_seen": cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len}

  return train


@pytest.mark.parametrize("changed", [{"learning_rate": 1e-2}, {"seed": 1}, {"batch_size": 4}, {"seq_len": 32}])
def test_skip_key_and_run_dir_cover_every_setting(changed, tmp_path):
  calls = []
  points = sweep.grid(["softmax"], ["s1"], [4096])
  base = dict(batch_size=2, seq_len=64, learning_rate=3e-3, seed=0, run_root=tmp_path / "runs",
              train_fn=_fake_train_with_checkpoints(calls), log=lambda s: None)
  assert len(sweep.run_sweep(points, tmp_path / "a.csv", **base)) == 1
  assert sweep.run_sweep(points, tmp_path / "a.csv", **base) == []  # the same run: skipped
  # The same grid point with another setting is another run, into the same CSV or a new one (no
  # CheckpointMismatchError from the first run's folder).
  other = dict(base, **changed)
  rows = sweep.run_sweep(points, tmp_path / "a.csv", **other)
  assert len(rows) == 1 and all(rows[0][k] == v for k, v in changed.items())
  assert len(sweep.run_sweep(points, tmp_path / "b.csv", **dict(other, learning_rate=2e-2))) == 1
  assert len({c.train.run_dir for c in calls}) == len(calls) == 3
  with open(tmp_path / "a.csv") as f:
    assert len(list(csv.DictReader(f))) == 2


def test_run_dir_of_another_config_is_a_one_line_error(tmp_path, capsys):
  """A run_root holding a checkpoint of another config (e.g. from an older sweep) stops with one line, exit 2."""
  point = sweep.grid(["softmax"], ["s1"], [1024])[0]
  kw = dict(batch_size=2, seq_len=64, learning_rate=3e-3, seed=0, run_root=tmp_path / "runs")
  cfg = sweep.run_config(point, **kw)
  other = config_lib.from_dict(dict(config_lib.to_dict(cfg), model=dict(config_lib.to_dict(cfg.model),
                                                                         num_layers=3, layer_types=["softmax"] * 3)))
  ckpt = ckpt_lib.Checkpointer(pathlib.Path(cfg.train.run_dir) / "checkpoints", other, async_save=False,
                               log=lambda s: None)
  ckpt.save(1, {"x": np.zeros(2, np.float32)}, data_state={})
  ckpt.close()
  rc = sweep.main(["--out", str(tmp_path / "s.csv"), "--archs", "softmax", "--sizes", "s1", "--tokens", "1024",
                   "--config.train.batch_size=2", "--config.data.seq_len=64", "--run_root", str(tmp_path / "runs")])
  err = capsys.readouterr().err
  assert rc == 2 and len(err.strip().splitlines()) == 1, err
  assert "(checkpoint) !=" in err and "--run_root" in err
