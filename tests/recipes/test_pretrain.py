"""The pretraining recipe end to end: training, kill-and-resume equality, checkpoints, config errors, the 456B plan."""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mx01 import checkpoint as ckpt_lib
from mx01 import presets
from mx01.config import ConfigError, ParallelConfig
from mx01.metrics import read_metrics
from recipes import flags as flags_lib
from recipes import plan as plan_lib
from recipes import pretrain

# One xdist worker runs the whole module, so its module-scoped recipe runs are made once (pytest.ini).
pytestmark = pytest.mark.xdist_group("test_pretrain")

REPO = pathlib.Path(__file__).resolve().parents[2]

# A model small enough to compile and train in seconds on two CPU cores (tiny preset, cut down).
SMALL = [
    "--config.model.rotary_dim=4", "--config.model.hidden_size=32", "--config.model.num_layers=2",
    "--config.model.head_dim=8", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
    "--config.model.intermediate_size=32", "--config.model.block_size=8", "--config.data.seq_len=32",
    "--config.train.batch_size=4", "--config.train.steps=12", "--config.train.warmup_steps=2",
    "--config.train.log_every=4", "--config.train.checkpoint_every=4", "--config.train.eval_every=0",
    "--config.train.eval_batches=1", "--config.train.learning_rate=0.01", "--config.train.tensorboard=false",
]


def _config(run_dir, *extra):
  parser = flags_lib.build_parser("test")
  cfg, _ = flags_lib.parse_flags(SMALL + [f"--config.train.run_dir={run_dir}", *extra], parser)
  return cfg


def _losses(run_dir):
  return {r["step"]: r["loss"] for r in read_metrics(pathlib.Path(run_dir) / "metrics.jsonl")}


def _abstract_state(cfg):
  """Shapes of the checkpointed training state (for restoring outside the recipe)."""
  from mx01 import training
  opt, _ = training.make_optimizer(cfg.train)
  key = jax.random.key(0)
  return jax.eval_shape(lambda k: training.init_train_state(cfg.model, opt, k, k), key)


def _final_state(cfg, run_dir):
  ckpt = ckpt_lib.Checkpointer(pathlib.Path(run_dir) / "checkpoints", cfg, log=lambda s: None)
  steps = ckpt.all_steps()
  meta = ckpt._read_meta(steps[-1])
  restored = ckpt.restore(_abstract_state(cfg))
  ckpt.close()
  return restored, meta


def _run_cli(run_dir, *extra, env=None, wait=True):
  cmd = [sys.executable, "-m", "recipes.pretrain", *SMALL, f"--config.train.run_dir={run_dir}", *extra]
  full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
  proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if wait:
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out
  return proc


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 12-step run on the embedded corpus (in-process)."""
  run_dir = tmp_path_factory.mktemp("reference")
  cfg = _config(run_dir)
  summary = pretrain.train(cfg, log=lambda s: None)
  return cfg, run_dir, summary


def test_short_run_loss_drops_and_writes_run_dir(reference_run):
  cfg, run_dir, summary = reference_run
  losses = _losses(run_dir)
  assert sorted(losses) == list(range(1, 13))
  assert np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 0.3
  assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 4 * 32
  assert summary["n_params"] > 0 and summary["tokens_per_sec"] > 0 and summary["mfu"] is None
  assert summary["eval_loss"] is not None and np.isfinite(summary["final_train_loss"])
  saved = json.loads((run_dir / "config.json").read_text())
  assert saved["model"]["hidden_size"] == 32 and saved["train"]["steps"] == 12
  records = read_metrics(run_dir / "metrics.jsonl")
  assert {"loss", "aux_loss", "grad_norm", "learning_rate", "expert_load_max_over_mean"} <= set(records[3])
  assert "tokens_per_sec" in records[3]  # a log step
  assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8, 12]


@pytest.mark.slow
def test_kill_anytime_and_resume_is_bit_exact(reference_run, tmp_path):
  cfg, ref_dir, _ = reference_run
  run_dir = tmp_path / "killed"
  # 1) SIGKILL at an arbitrary moment once step 6 has been logged.
  proc = _run_cli(run_dir, wait=False)
  deadline = time.time() + 240
  metrics = run_dir / "metrics.jsonl"
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any(json.loads(l)["step"] >= 6 for l in metrics.read_text().splitlines() if l.strip()):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  # 2) resume, and SIGKILL again in the middle of the asynchronous save of step 8.
  rc, out = _run_cli(run_dir, "--resume", env={ckpt_lib.KILL_DURING_SAVE_ENV: "8"})
  assert rc == -signal.SIGKILL, out
  # 3) resume to the end.
  rc, out = _run_cli(run_dir, "--resume")
  assert rc == 0, out
  assert "resumed from" in out
  ref, killed = _losses(ref_dir), _losses(run_dir)
  assert ref == killed  # every step's loss, bit for bit (JSON floats round-trip exactly)
  (ref_state, ref_meta), (state, meta) = _final_state(cfg, ref_dir), _final_state(cfg, run_dir)
  assert ref_state.step == state.step == 12
  jax.tree.map(np.testing.assert_array_equal, ref_state.state, state.state)
  assert ref_state.data_state == state.data_state


def test_corrupt_latest_checkpoint_falls_back(reference_run, tmp_path):
  cfg, ref_dir, _ = reference_run
  run_dir = tmp_path / "corrupt"
  shutil.copytree(ref_dir, run_dir)
  for path in (run_dir / "checkpoints" / "12" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(os.urandom(max(16, path.stat().st_size)))
  messages = []
  ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", cfg, log=messages.append)
  restored = ckpt.restore(_abstract_state(cfg))
  ckpt.close()
  assert restored.step == 8
  assert any("step 12 is corrupt" in m for m in messages)


def test_checkpoint_of_another_config_is_refused(reference_run):
  cfg, ref_dir, _ = reference_run
  other = _config(ref_dir, "--config.model.num_layers=3", "--config.train.learning_rate=0.02",
                  "--config.data.seq_len=16")
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    pretrain.train(other, resume=True, log=lambda s: None)
  msg = str(e.value)
  assert "model.num_layers: 2 (checkpoint) != 3 (run)" in msg and "data.seq_len" in msg and "\n" not in msg
  assert "learning_rate" not in msg  # optimizer hyperparameters may change on resume


def test_existing_run_needs_resume_or_overwrite(reference_run):
  cfg, ref_dir, _ = reference_run
  with pytest.raises(pretrain.RunExistsError, match="--resume"):
    pretrain.train(cfg, log=lambda s: None)


def test_config_errors_name_the_key(capsys):
  parser = flags_lib.build_parser("test")
  with pytest.raises(ConfigError, match="did you mean 'model.num_layers'"):
    flags_lib.parse_flags(["--config.model.num_layer=4"], parser)
  with pytest.raises(ConfigError, match="train.steps: expected an integer"):
    flags_lib.parse_flags(["--config.train.steps=many"], parser)
  with pytest.raises(ConfigError, match="did you mean"):
    flags_lib.parse_flags(["--config.trian.steps=3"], parser)
  with pytest.raises(ConfigError, match="unknown preset"):
    flags_lib.parse_flags(["--config=tinny"], parser)
  with pytest.raises(ConfigError, match="warmup_steps"):
    flags_lib.parse_flags(["--config.train.steps=5", "--config.train.warmup_steps=10"], parser)
  # Overrides are applied together: the order of dependent fields does not matter.
  cfg, _ = flags_lib.parse_flags(["--config.model.head_dim=8", "--config.model.rotary_dim=4"], parser)
  assert cfg.model.head_dim == 8 and cfg.model.rotary_dim == 4
  assert pretrain.main(["--config.model.num_layer=4"]) == pretrain.EXIT_CONFIG_ERROR
  assert "did you mean" in capsys.readouterr().err


def test_help_lists_presets(capsys):
  with pytest.raises(SystemExit) as e:
    pretrain.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  # Presets are listed by family: every name is one of the families spelled out.
  for name in ("tiny", "hybrid_456b", "{softmax,lightning,hybrid}[_moe]_{20m,100m,400m,1b}",
               "retrieval_{softmax,lightning,hybrid}_{xs,s}"):
    assert name in out


def test_hybrid_456b_plan(capsys):
  cfg = presets.get_preset("hybrid_456b")
  plan = plan_lib.make_plan(cfg, device_memory_gib=80)
  assert round(plan.params_total / 1e9) == 456
  assert plan.num_devices == 64
  state = plan.param_bytes + plan.grad_bytes + plan.optimizer_bytes
  np.testing.assert_allclose(state * 64, plan.params_total * 16, rtol=1e-6)  # fp32 params+grads+Adam, FSDP
  assert plan.devices_needed is not None and plan.devices_needed >= 128 and plan.step_time_s > 0
  # Not enough devices: prints the plan, allocates nothing, exits 0.
  assert pretrain.main(["--config=hybrid_456b"]) == 0
  out = capsys.readouterr().out
  assert "GPUs needed" in out and "Not started" in out and "optimizer" in out
  assert "456.09B total, 45.94B activated per token (non-embedding" in out  # as the paper counts


@pytest.mark.slow
def test_hybrid_456b_dry_run_at_reduced_depth():
  # The real train step on the trivial mesh (the full 64-device mesh at 80 layers is the CLI's --dry_run).
  cfg = dataclasses.replace(presets.get_preset("hybrid_456b"), parallel=ParallelConfig())
  d = plan_lib.dry_run(cfg, num_layers=2, seq_len=256)
  assert d.layer_types == ("lightning", "softmax")
  # Arguments are params + optimizer state (fp32: 12 bytes/param) + the batch.
  n = plan_lib._param_groups(plan_lib.reduced_config(cfg, 2).model)["total"]
  assert d.argument_bytes >= 12 * n
  assert d.temp_bytes > 0
  assert "dry run" in plan_lib.format_dry_run(d)
