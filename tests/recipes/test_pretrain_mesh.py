"""The recipe on a mesh: the same losses as on one device, state sharded by the layout, resume onto another
layout, and two processes (jax.distributed, gloo) that stop together when a save fails on one of them and,
resumed, equal one process.  Needs 8 host devices (tests/conftest.py)."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mx01.metrics import read_metrics
from recipes import flags as flags_lib
from recipes import pretrain

# One xdist worker runs the whole module, so its module-scoped recipe runs are made once (pytest.ini).
pytestmark = pytest.mark.xdist_group("test_pretrain_mesh")

REPO = pathlib.Path(__file__).resolve().parents[2]

# The tiny preset cut down (MoE with 4 experts, lightning + softmax), fp32, batch 8 so data=2 and data=4 divide it.
SMALL = [
    "--config.model.rotary_dim=4", "--config.model.hidden_size=32", "--config.model.num_layers=2",
    "--config.model.head_dim=8", "--config.model.num_heads=2", "--config.model.num_kv_heads=2",
    "--config.model.intermediate_size=32", "--config.model.block_size=8", "--config.data.seq_len=32",
    "--config.train.batch_size=8", "--config.train.steps=3", "--config.train.warmup_steps=1",
    "--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
    "--config.train.eval_batches=1", "--config.train.learning_rate=0.01", "--config.train.tensorboard=false",
    "--config.model.compute_dtype=float32",
]


def _config(run_dir, *extra):
  cfg, _ = flags_lib.parse_flags(SMALL + [f"--config.train.run_dir={run_dir}", *extra],
                                 flags_lib.build_parser("test"))
  return cfg


def _losses(run_dir):
  return [r["loss"] for r in read_metrics(pathlib.Path(run_dir) / "metrics.jsonl")]


LAYOUTS = {
    # data x tensor x expert with FSDP: every parameter split 2 (FSDP or tensor) to 8 (experts) ways.
    "dte_fsdp": ["--config.parallel.data=2", "--config.parallel.tensor=2", "--config.parallel.sequence=2",
                 "--config.parallel.expert=2", "--config.parallel.fsdp=true"],
    "data_x_sequence": ["--config.parallel.data=2", "--config.parallel.sequence=4"],
}


def _xla_flags(devices):
  """The run's XLA_FLAGS (tests/conftest.py's compile flags) with `devices` host devices."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  return f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def _need_devices(n):
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count={n})")


@pytest.fixture(scope="module")
def dte_run(tmp_path_factory):
  """The data x tensor x expert (FSDP) layout, uninterrupted, in-process."""
  _need_devices(8)
  run_dir = tmp_path_factory.mktemp("dte")
  summary = pretrain.train(_config(run_dir, *LAYOUTS["dte_fsdp"]), log=lambda s: None)
  return run_dir, summary


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("one")
  summary = pretrain.train(_config(run_dir), log=lambda s: None)
  return run_dir, summary




@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recipe_on_a_mesh_equals_one_device(one_device, dte_run, layout, tmp_path):
  ref_dir, ref = one_device
  if layout == "dte_fsdp":
    run_dir, summary = dte_run
  else:
    run_dir, summary = tmp_path, pretrain.train(_config(tmp_path, *LAYOUTS[layout]), log=lambda s: None)
  np.testing.assert_allclose(_losses(run_dir), _losses(ref_dir), rtol=1e-5)
  assert ref["mesh"]["data"] == 1 and summary["mesh"]["data"] == 2
  written = json.loads((run_dir / "summary.json").read_text())
  assert written["state_bytes_per_device"] == summary["state_bytes_per_device"]
  ratio = ref["state_bytes_per_device"] / summary["state_bytes_per_device"]
  if layout == "dte_fsdp":
    # Dense matrices split 2 (FSDP over data) x 2 (tensor), experts 2 (expert) x 4 (FSDP over expert_data):
    # at least 3.5x smaller (norm scales and the router's expert axis stay whole).
    assert ratio > 3.5, ratio
  else:
    assert ratio == 1.0  # data x sequence replicates parameters


@pytest.mark.slow
def test_resume_onto_another_layout(one_device, dte_run, tmp_path):
  # The data x tensor x expert (FSDP) run as it stood after its sharded save of step 2, then the last step
  # resumed on one device.
  ref_dir, _ = one_device
  dte_dir, _ = dte_run
  shutil.copytree(dte_dir, tmp_path, dirs_exist_ok=True)
  shutil.rmtree(tmp_path / "checkpoints" / "3")
  lines = []
  pretrain.train(_config(tmp_path), resume=True, log=lines.append)
  assert any("resumed from" in line and "(step 2)" in line for line in lines)
  np.testing.assert_allclose(_losses(tmp_path), _losses(ref_dir), rtol=1e-5)


def test_layout_errors_are_clear(tmp_path):
  cfg = _config(tmp_path, "--config.parallel.tensor=3")
  with pytest.raises(Exception, match="parallel.tensor=3 must divide model.num_heads"):
    pretrain.train(cfg, log=lambda s: None)
  cfg = _config(tmp_path, "--config.parallel.data=64")
  with pytest.raises(pretrain.InsufficientDevicesError, match="64 devices"):
    pretrain.train(cfg, log=lambda s: None)
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_kill_and_resume_on_a_mesh_is_bit_exact(dte_run, tmp_path):
  # SIGKILL right after the (asynchronous, sharded) save of step 2 has started, then --resume.
  from mx01 import checkpoint as ckpt_lib
  ref_dir, _ = dte_run
  cmd = [sys.executable, "-m", "recipes.pretrain", *SMALL, *LAYOUTS["dte_fsdp"], f"--config.train.run_dir={tmp_path}"]
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=_xla_flags(8))
  killed = subprocess.run(cmd, cwd=REPO, env=dict(env, **{ckpt_lib.KILL_DURING_SAVE_ENV: "2"}), capture_output=True,
                          text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
  done = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  assert _losses(tmp_path) == _losses(ref_dir)  # bit for bit


@pytest.mark.slow
def test_two_processes_stop_together_on_a_failed_save_then_resume_to_equal_one(dte_run, tmp_path):
  # 2 processes x 4 devices (jax.distributed over localhost, gloo collectives), the dte_fsdp layout of dte_run
  # (1 process x 8 devices), a checkpoint every step.  One scenario, two launches (each launch starts and
  # compiles two processes, most of this test's time):
  # 1) the save of step 2 fails on process 1 only.  Both stop with exit 5 and the same one-line error naming
  #    process 1; summary.json records the failure and step 1.  Without the agreement both hang for orbax's
  #    and the coordination service's barrier timeouts (5 min or more): the whole launch gets 240 s (start-up
  #    and compilation on a loaded 2-core machine included), the second process 20 s after the first.
  # 2) --resume from step 1 on both: every step's loss equals the one-process run, each process having read
  #    only the documents of its rows of the same global batch, and the checkpoints hold every process's
  #    data-iterator state.
  from mx01 import checkpoint as ckpt_lib
  ref_dir, _ = dte_run
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=_xla_flags(4))
  run_dir = tmp_path / "multi"
  cmd = [sys.executable, "-m", "recipes.pretrain", *SMALL, *LAYOUTS["dte_fsdp"], "--config.train.checkpoint_every=1",
         f"--config.train.run_dir={run_dir}", "--num_processes=2"]

  def launch(extra_env, *flags):
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    procs = [subprocess.Popen(cmd + [*flags, f"--coordinator_address=localhost:{port}", f"--process_id={i}"],
                              cwd=REPO, env=dict(env, **extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = []
    try:
      for i, p in enumerate(procs):
        outs.append(p.communicate(timeout=240 if i == 0 else 20))
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    return [p.returncode for p in procs], outs

  codes, outs = launch({ckpt_lib.FAIL_SAVE_ENV: "2@1"})
  assert codes == [pretrain.EXIT_SAVE_ERROR] * 2, "\n".join(o[1][-3000:] for o in outs)
  assert "step 1/3" in outs[0][0] and "step 1/3" not in outs[1][0]  # only process 0 prints
  errors = [[l for l in err.splitlines() if l.startswith("error: ")] for _, err in outs]
  assert errors[0] == errors[1] and len(errors[0]) == 1, errors
  assert "failed on process 1 (" in errors[0][0] and "process 0" not in errors[0][0]
  assert "injected fault" in errors[0][0] and "last good checkpoint is step 1" in errors[0][0]
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["status"] == "save_failed" and summary["last_checkpoint"] == 1
  assert "failed on process 1" in summary["error"]
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]

  codes, outs = launch({}, "--resume")
  assert codes == [0, 0], "\n".join(o[1][-3000:] for o in outs)
  assert "resumed from" in outs[0][0]
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["status"] == "completed" and summary["processes"] == 2 and summary["mesh"]["tensor"] == 2
  np.testing.assert_allclose(_losses(run_dir), _losses(ref_dir), rtol=1e-5)
  assert sorted(p.name for p in (run_dir / "checkpoints" / "3" / "data").glob("process_*")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
