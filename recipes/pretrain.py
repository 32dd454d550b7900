"""Pretraining recipe: `python -m recipes.pretrain --config=NAME [--config.section.key=value ...]`.

    python -m recipes.pretrain                                   # tiny preset on the embedded corpus (CPU, minutes)
    python -m recipes.pretrain --config=hybrid_moe_100m --config.train.steps=500 --config.data.source=texts/
    python -m recipes.pretrain --config=tiny --resume            # continue from the latest checkpoint
    python -m recipes.pretrain --config=hybrid_456b              # prints the memory / layout plan
    python -m recipes.pretrain --config=hybrid_456b --dry_run    # ... and compiles the sharded step, 80 layers
    python -m recipes.pretrain --help                            # flags and presets

Writes to config.train.run_dir:
  config.json          the resolved config
  metrics.jsonl        one record per step (loss, aux loss, grad norm, lr, ...) plus throughput at log steps
  tensorboard/         the same scalars for TensorBoard
  checkpoints/<step>/  orbax checkpoints: params, optimizer state, step, RNG, data-iterator state
  summary.json         what `train` returns

Exit codes: 0 done (or plan printed: not enough devices for the config, nothing started),
2 config / usage error, 3 stopped on repeated non-finite steps, 4 no usable checkpoint or
a checkpoint of another config, 5 a checkpoint save failed (on any process: every process
stops at the same step with the same message naming the failed process).  After 3 and 5,
summary.json is written (status, halted_at_step, error, last_checkpoint: the one to resume,
which is kept intact).  Errors are one line on stderr.

Nothing in run_dir is deleted (--overwrite) or written before the run is known to start: the
layout, data and tokenizer are built and a resumed checkpoint is checked first.  A resume may
change the optimizer hyperparameters (see mx01/checkpoint.py RESUMABLE_CHANGES).

`train(config, resume=False)` is the programmatic entry point (used by the sweep).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import sys
import time
from typing import Callable, Optional

from mx01 import config as config_lib
from mx01.config import Config, ConfigError
from recipes import flags as flags_lib

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3
EXIT_CHECKPOINT_ERROR = 4
EXIT_SAVE_ERROR = 5


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient; `step` is the last of them."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class RunExistsError(RuntimeError):
  """run_dir already holds checkpoints and neither resume nor overwrite was asked for."""


class InsufficientDevicesError(RuntimeError):
  """The config's mesh needs more devices than are attached."""


def _peak_flops_per_device() -> Optional[float]:
  try:
    from scaling import flops as flops_lib
    return flops_lib.detect_peak_flops()
  except Exception:
    return None


def _mfu(tokens_per_sec_per_device: float, config: Config, peak: Optional[float]) -> Optional[float]:
  if peak is None:
    return None
  from scaling import flops as flops_lib
  return flops_lib.mfu(tokens_per_sec_per_device, config.model, config.data.seq_len, peak)


def state_bytes_per_device(state) -> int:
  """The largest, over this process's devices, bytes of parameter + optimizer-state shards held on one device."""
  import jax
  per_device: dict = {}
  for leaf in jax.tree.leaves((state["params"], state["opt_state"])):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values()) if per_device else 0


def _sync(name: str) -> None:
  """Barrier across processes (no-op with one)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _check_run_dir(config: Config, *, resume: bool, overwrite: bool) -> pathlib.Path:
  """Raises (writing nothing) when run_dir cannot take this run: a file, or a run that needs --resume/--overwrite."""
  run_dir = pathlib.Path(config.train.run_dir)
  for p in (run_dir, *run_dir.parents):
    if p.exists() and not p.is_dir():
      raise ConfigError(f"train.run_dir={str(run_dir)!r}: {p} is a file, not a directory; choose another "
                        "--config.train.run_dir")
  ckpt_dir = run_dir / "checkpoints"
  has_checkpoints = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
  if has_checkpoints and not resume and not overwrite:
    raise RunExistsError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, "
                         "--overwrite to start over, or choose another --config.train.run_dir")
  return run_dir


def _clear_run_dir(run_dir: pathlib.Path) -> None:
  """--overwrite: deletes the old run's checkpoints, metrics, summary and TensorBoard (once the new one is built)."""
  shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
  for name in ("metrics.jsonl", "summary.json"):
    (run_dir / name).unlink(missing_ok=True)
  shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)


def _finite_or_none(x):
  """x, or None for a non-finite float (summary.json stays valid JSON: no bare NaN)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def train(config: Config, *, resume: bool = False, overwrite: bool = False, log: Callable[[str], None] = print,
          devices=None) -> dict:
  """Trains `config` and returns a summary.

  Returns {"final_train_loss" (mean over the last finite steps; None when the run ended on non-finite
  steps), "eval_loss", "n_params" (non-embedding), "n_params_total", "tokens_seen", "wall_time_s",
  "tokens_per_sec" and "mfu" (None on CPU) over the training steps after the first (evaluation,
  checkpoints and logging excluded; the progress line shows them per log window), "steps" (the last
  step run), "start_step", "nonfinite_steps",
  "final_nonfinite_steps" (in a row at the end), "last_finite_loss", "last_checkpoint", "status"
  ("completed", "halted_nonfinite" or "save_failed"), "halted_at_step", "error" (why it stopped early,
  else None), "run_dir"}; non-finite floats are None.  tokens are input positions (batch_size * seq_len per step).
  Also "mesh" (logical axis -> size) and "state_bytes_per_device" (the largest, over local devices, bytes
  of parameter + optimizer-state shards).

  The model runs on the mesh of config.parallel over the first data*sequence*tensor devices, parameters
  and optimizer state placed by the rules table (mx01/parallel/rules.py), each device fed its rows.
  Under several processes (jax.distributed) every process calls `train`; only process 0 prints and
  writes metrics, TensorBoard and summary.json.

  resume=True continues from the latest valid checkpoint in train.run_dir
  (bit-for-bit: same parameters, same data order) or starts fresh if there is
  none.  Raises RunExistsError if run_dir has checkpoints and neither resume
  nor overwrite is set, CheckpointMismatchError for a checkpoint of another
  config, NonFiniteError after train.max_nonfinite_steps consecutive
  non-finite steps (0: never halts; such steps skip their update and are
  counted), InsufficientDevicesError if the mesh does not fit, ConfigError
  (DataError, MeshError) for a config that cannot run, all before anything in
  run_dir is deleted or written.  A failed checkpoint save (on any process: the
  processes agree, see mx01/checkpoint.py) or the non-finite halt stops the run:
  the summary (with "status" and "error") is written, then CheckpointSaveError or
  NonFiniteError is raised.
  """
  t_start = time.time()
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from mx01 import checkpoint as ckpt_lib
  from mx01 import metrics as metrics_lib
  from mx01 import training
  from mx01.data import DataPipeline
  from mx01.params import count_params

  tc, dc = config.train, config.data
  from mx01.parallel import mesh as mesh_lib
  devices = list(devices) if devices is not None else jax.devices()
  n_needed = config.parallel.num_devices
  if n_needed > len(devices):
    raise InsufficientDevicesError(
        f"parallel mesh data*tensor*sequence = {n_needed} devices, but {len(devices)} "
        "are attached; see `python -m recipes.pretrain --config=... --plan`")
  if jax.process_count() > 1 and n_needed != len(devices):
    raise ConfigError(f"parallel: data*tensor*sequence = {n_needed} but the {jax.process_count()} processes hold "
                      f"{len(devices)} devices; a multi-host mesh spans every device")
  if jax.process_count() > 1 and config.parallel.data % jax.process_count():
    raise ConfigError(f"parallel.data={config.parallel.data} must be a multiple of the {jax.process_count()} "
                      "processes (each host feeds its own rows of the batch)")
  # The layout must divide the model and the batch before anything is allocated.
  mesh_lib.validate_layout(config.parallel, config.model, seq_len=dc.seq_len,
                           batch_size=tc.batch_size // max(tc.grad_accum, 1))
  pmesh = mesh_lib.build_mesh(config.parallel, devices[:n_needed])
  is_main = jax.process_index() == 0
  if not is_main:
    log = lambda _: None  # noqa: E731  (only process 0 prints, writes metrics and TensorBoard)
  # Everything that can refuse the run (run_dir, layout, data, tokenizer) runs before anything in run_dir
  # is deleted or written.
  run_dir = _check_run_dir(config, resume=resume, overwrite=overwrite)

  replicated = NamedSharding(pmesh.mesh, P())
  batch_sharding = pmesh.sharding("data", None)  # rows over data; each process feeds its own rows

  data = DataPipeline(config)
  optimizer, schedule = training.make_optimizer(tc)
  key = jax.random.key(tc.seed)
  init_key, run_key = jax.random.split(key)

  def make_state(k):
    return training.init_train_state(config.model, optimizer, k, run_key)

  abstract = jax.eval_shape(make_state, init_key)
  state_shardings = training.state_shardings(abstract, optimizer, pmesh, config.model)
  init_state = jax.jit(make_state, out_shardings=state_shardings)

  if overwrite and not resume and is_main:
    _clear_run_dir(run_dir)
  _sync("run_dir")
  ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", config, keep=tc.keep_checkpoints,
                               async_save=tc.async_checkpointing, log=log)
  start_step, data_state, state = 0, None, None
  if resume:
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, state_shardings)
    try:
      restored = ckpt.restore(abstract_sharded, quarantine=True)
    except BaseException:
      ckpt.close()
      raise
    if restored is None:
      log(f"no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
    else:
      state, start_step, data_state = restored.state, restored.step, restored.data_state
      log(f"resumed from {run_dir / 'checkpoints' / str(start_step)} (step {start_step})")
  # The run starts: only now is its config recorded, and the metrics of steps not in the restored
  # checkpoint (all of them on a fresh start) dropped.
  if is_main:
    (run_dir / "config.json").write_text(config_lib.to_json(config) + "\n")
  writer = (metrics_lib.MetricsWriter(run_dir, tensorboard=tc.tensorboard) if is_main else metrics_lib.NullWriter())
  writer.truncate_after(start_step)
  if state is None:
    state = init_state(init_key)

  mesh_sizes = dict(pmesh.mesh.shape) if pmesh.all_axes else {}
  mesh_report = {name: getattr(config.parallel, name) for name in
                 ("data", "sequence", "tensor", "expert", "expert_tensor")}
  mesh_report["expert_data"] = config.parallel.expert_data
  bytes_per_device = state_bytes_per_device(state)
  counts = count_params(config.model)
  n_params, n_params_total = counts["non_embedding"], counts["total"]
  tokens_per_step = tc.batch_size * dc.seq_len
  peak = _peak_flops_per_device()
  log(f"mesh {mesh_report} (fsdp={config.parallel.fsdp}; physical axes {mesh_sizes or 'none'}) over "
      f"{n_needed} {devices[0].platform} device(s) in {jax.process_count()} process(es); "
      f"state {bytes_per_device / 2**20:.2f} MiB per device")
  if n_needed < len(devices):
    log(f"note: the mesh uses {n_needed} of the {len(devices)} attached devices; set parallel.data (or another "
        "axis) to use them all")
  log(f"{config.model.num_layers} layers, {n_params:,} non-embedding parameters ({n_params_total:,} total), "
      f"{tc.batch_size} x {dc.seq_len} tokens per step, "
      f"{data.num_train_documents} train / {data.num_eval_documents} held-out documents, run_dir={run_dir}")

  train_step = training.make_train_step(config.model, pmesh, optimizer, grad_accum=tc.grad_accum,
                                        skip_nonfinite=True)
  eval_step = jax.jit(training.make_eval_step(config.model, pmesh))

  def step_fn(state, batch):
    params, opt_state, metrics = train_step(state["params"], state["opt_state"], batch)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}, metrics

  step_fn = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_shardings, replicated))
  eval_batches = [jax.make_array_from_process_local_data(batch_sharding, b) for b in data.eval_batches()]

  def evaluate(params) -> Optional[float]:
    if not eval_batches:
      return None
    sums = [eval_step(params, b) for b in eval_batches]
    nll = sum(float(s["nll_sum"]) for s in sums)
    count = sum(float(s["tokens"]) for s in sums)
    return nll / max(count, 1.0)

  it = data.train_iterator(data_state)
  pending: list[tuple[int, dict]] = []
  consecutive_nonfinite, nonfinite_total = 0, 0
  recent_losses: list[float] = []
  last_finite_loss: Optional[float] = None
  # Throughput clocks: a segment runs from the end of the last non-training work (the first, compiling
  # step; evaluation, checkpoint, logging) to the start of the next; the log window sums its segments and
  # the run sums its windows, so both count training steps only.
  seg_time, seg_step = None, start_step
  win_time, win_steps, run_time, run_steps = 0.0, 0, 0.0, 0
  tokens_per_sec, mfu, eval_loss = None, None, None

  def close_segment(step: int, metrics) -> None:
    nonlocal win_time, win_steps
    jax.block_until_ready(metrics)
    win_time += time.time() - seg_time
    win_steps += step - seg_step
  last_log: dict = {}

  def flush_pending(step: int, window: Optional[dict]) -> None:
    nonlocal consecutive_nonfinite, nonfinite_total, last_log, last_finite_loss
    host = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, host):
      record = {"loss": float(m["loss"]), "aux_loss": float(m["aux_loss"]), "total_loss": float(m["total_loss"]),
                "grad_norm": float(m["grad_norm"]), "learning_rate": float(schedule(s - 1)),
                "nonfinite": int(m["nonfinite"])}
      if "expert_load_max_over_mean" in m:
        record["expert_load_max_over_mean"] = float(m["expert_load_max_over_mean"])
      if m["nonfinite"]:
        consecutive_nonfinite += 1
        nonfinite_total += 1
        log(f"step {s}: non-finite loss or gradients; update skipped ({consecutive_nonfinite} in a row)")
      else:
        consecutive_nonfinite = 0
        last_finite_loss = record["loss"]
        recent_losses.append(record["loss"])
        del recent_losses[:-max(1, min(tc.log_every, 20))]
      if s == step and window:
        record.update(window)
      writer.write(s, record, tensorboard=(s == step))
      last_log = record
      if tc.max_nonfinite_steps and consecutive_nonfinite >= tc.max_nonfinite_steps:
        raise NonFiniteError(
            f"{consecutive_nonfinite} consecutive steps (up to step {s}) had a non-finite loss or gradient; "
            f"stopping (train.max_nonfinite_steps={tc.max_nonfinite_steps}). Last checkpoint: "
            f"{ckpt.latest_step()}. Resume from it with --resume and a lower --config.train.learning_rate "
            "(or train.grad_clip).", step=s)
    pending.clear()

  step = start_step
  # What stopped the run early (raised once summary.json is written): a failed save or non-finite steps.
  save_error: Optional[ckpt_lib.CheckpointSaveError] = None
  halt_error: Optional[NonFiniteError] = None
  try:
    for step in range(start_step + 1, tc.steps + 1):
      ckpt.check()  # a failed asynchronous save stops the run here, not at the next save
      batch = next(it)
      packing = float(np.mean(batch["segment_ids"] != 0))
      state, metrics = step_fn(state, jax.make_array_from_process_local_data(batch_sharding, batch))
      pending.append((step, metrics))
      is_log = step % tc.log_every == 0 or step == tc.steps or step == start_step + 1
      is_ckpt = step % tc.checkpoint_every == 0 or step == tc.steps
      is_eval = (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps
      if seg_time is not None and (is_log or is_ckpt or is_eval):
        close_segment(step, metrics)
      window = None
      if is_log:
        jax.block_until_ready(metrics)
        if win_steps:  # tokens/s and MFU over this log window (the previous rate until one is measured)
          tokens_per_sec = win_steps * tokens_per_step / win_time
          mfu = _mfu(tokens_per_sec / n_needed, config, peak)
          run_time, run_steps, win_time, win_steps = run_time + win_time, run_steps + win_steps, 0.0, 0
        eta = (tc.steps - step) * tokens_per_step / tokens_per_sec if tokens_per_sec else None
        window = {"tokens_per_sec": tokens_per_sec, "mfu": mfu, "packing_efficiency": packing,
                  "tokens_seen": step * tokens_per_step, "elapsed_s": time.time() - t_start}
      if is_eval:
        eval_loss = evaluate(state["params"])
        if window is None:
          window = {}
        window["eval_loss"] = eval_loss
      if pending and (is_log or is_ckpt or is_eval or len(pending) >= 100):
        flush_pending(step, window)
        if is_log:
          log(metrics_lib.progress_line(step, tc.steps, dict(last_log, tokens_per_sec=tokens_per_sec, mfu=mfu,
                                                             nonfinite_skipped=nonfinite_total),
                                        eta if is_log else None)
              + (f" | eval {eval_loss:.4f}" if is_eval and eval_loss is not None else ""))
      if is_ckpt:
        ckpt.save(step, state, data_state=it.get_state(), extra={"tokens_seen": step * tokens_per_step})
      if seg_time is None or is_log or is_ckpt or is_eval:  # the first step includes compilation
        jax.block_until_ready(metrics)
        seg_time, seg_step = time.time(), step
    if pending:
      flush_pending(step, None)
    ckpt.wait()  # the last save, written: its failure is this run's failure
    if eval_loss is None:  # e.g. resumed a run that had already finished
      eval_loss = evaluate(state["params"])
  except ckpt_lib.CheckpointSaveError as e:
    save_error = e
    log(f"error: {e}; stopping at step {step}")
  except NonFiniteError as e:
    halt_error = e
  finally:
    it.close()
    try:
      ckpt.close()
    except ckpt_lib.CheckpointSaveError as e:
      save_error = save_error or e
    writer.close()

  wall = time.time() - t_start
  if save_error:
    status, halted_at = "save_failed", step
  elif halt_error:
    status, halted_at = "halted_nonfinite", halt_error.step
  else:
    status, halted_at = "completed", None
  summary = {
      # "completed", "halted_nonfinite" (train.max_nonfinite_steps in a row, the last at halted_at_step) or
      # "save_failed" (at halted_at_step); "error" says why in one line, "last_checkpoint" is the one to resume.
      "status": status,
      "halted_at_step": halted_at,
      # The mean loss of the last finite steps; None when the run ended on non-finite steps.
      "final_train_loss": (float(np.mean(recent_losses)) if recent_losses and not consecutive_nonfinite
                           else None),
      "eval_loss": eval_loss,
      "n_params": n_params,
      "n_params_total": n_params_total,
      "tokens_seen": step * tokens_per_step,
      "wall_time_s": wall,
      # Over every training step after the first (evaluation, checkpoints and logging excluded).
      "tokens_per_sec": run_steps * tokens_per_step / run_time if run_steps else tokens_per_sec,
      "mfu": _mfu(run_steps * tokens_per_step / run_time / n_needed, config, peak) if run_steps else mfu,
      "steps": step,
      "start_step": start_step,
      "nonfinite_steps": nonfinite_total,
      "final_nonfinite_steps": consecutive_nonfinite,  # the non-finite steps in a row the run ended on
      "last_finite_loss": last_finite_loss,
      "last_checkpoint": ckpt.latest_step(),
      "error": " ".join(str(save_error or halt_error).split()) if save_error or halt_error else None,
      "run_dir": str(run_dir),
      "mesh": mesh_report,
      "state_bytes_per_device": bytes_per_device,
      "processes": jax.process_count(),
  }
  summary = {k: _finite_or_none(v) for k, v in summary.items()}
  if is_main:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
  if save_error or halt_error:
    raise save_error or halt_error
  return summary


# Environment variables by which jax's cluster detection (jax.distributed.initialize() without arguments)
# recognises a multi-process launch.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


def _init_distributed(args) -> None:
  """jax's multi-controller runtime: from the flags, else from what jax detects (SLURM, Open MPI, ...).

  One process (no flags, no cluster environment, or a one-task SLURM job) starts nothing.
  """
  import os
  given = [args.coordinator_address, args.num_processes, args.process_id]
  if any(v is not None for v in given) and not all(v is not None for v in given):
    raise ConfigError("--coordinator_address, --num_processes and --process_id go together: give all three "
                      "(or none, to let jax detect SLURM / Open MPI / JAX_COORDINATOR_ADDRESS)")
  detected = any(os.environ.get(k) for k in _CLUSTER_ENV)
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) <= 1 \
      and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
    detected = False  # a single-task SLURM job (e.g. an interactive shell) is one process
  if given[0] is None and not detected:
    return
  import jax
  # CPU collectives across processes go through gloo (GPUs use NCCL regardless).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if given[0] is not None:
    if not 0 <= args.process_id < args.num_processes:
      raise ConfigError(f"--process_id={args.process_id} must be in 0 .. --num_processes-1 = {args.num_processes - 1}")
    jax.distributed.initialize(args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id)
  else:
    jax.distributed.initialize()


def main(argv: Optional[list[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = flags_lib.build_parser("Pretrain an mx01 (MiniMax-Text-01 family) model.")
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run_dir")
  parser.add_argument("--overwrite", action="store_true", help="delete run_dir's checkpoints and start over")
  parser.add_argument("--plan", action="store_true",
                      help="print the memory / parallel-layout plan for the config and exit")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the plan, then lower and compile the real sharded train step on the config's "
                           "mesh (emulated CPU devices when no accelerators) and print XLA's per-device memory "
                           "beside the plan's; trains nothing")
  parser.add_argument("--dry_run_layers", type=int, default=None,
                      help="decoder layers compiled by --dry_run (default: the model's full depth)")
  parser.add_argument("--coordinator_address", metavar="HOST:PORT",
                      help="multi-host: address of process 0's coordinator (with --num_processes, --process_id); "
                           "without these flags jax detects SLURM, Open MPI or JAX_COORDINATOR_ADDRESS by itself")
  parser.add_argument("--num_processes", type=int, help="multi-host: the number of processes")
  parser.add_argument("--process_id", type=int, help="multi-host: this process's index, 0 .. num_processes - 1")
  parser.add_argument("--gpu_memory_gib", type=float, default=80.0, help="memory of one GPU for the plan")
  parser.add_argument("--assumed_mfu", type=float, default=0.4, help="MFU the plan's step time assumes")
  try:
    config, args = flags_lib.parse_flags(argv, parser)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return EXIT_CONFIG_ERROR

  if args.dry_run:
    # Emulated CPU devices for the config's mesh (used when no accelerators are attached).  jax is
    # imported by now (the config imports the kernels' config), but its backends start lazily.
    import jax
    try:
      jax.config.update("jax_num_cpu_devices", config.parallel.num_devices)
    except RuntimeError:  # backends already started (e.g. called in-process by a test): use what is there
      pass
  try:
    _init_distributed(args)
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_CONFIG_ERROR
  import jax
  from recipes import plan as plan_lib
  n_devices = jax.device_count()
  if args.plan or args.dry_run or config.parallel.num_devices > n_devices:
    plan = plan_lib.make_plan(config, device_memory_gib=args.gpu_memory_gib, assumed_mfu=args.assumed_mfu)
    print(plan_lib.format_plan(plan))
    if args.dry_run:
      print(plan_lib.format_dry_run(plan_lib.dry_run(config, num_layers=args.dry_run_layers)))
    if config.parallel.num_devices > n_devices and not (args.plan or args.dry_run):
      print(f"\nNot started: this config's mesh needs {config.parallel.num_devices} devices "
            f"(parallel.data*tensor*sequence) and the plan above needs {plan.devices_needed} GPUs of "
            f"{args.gpu_memory_gib:g} GiB; {n_devices} {jax.devices()[0].platform} device(s) are attached. "
            f"Nothing was allocated.")
    return EXIT_OK

  import logging
  from mx01 import checkpoint as ckpt_lib
  # orbax reports a failed save or restore through absl logging, tracebacks included, and raises it to
  # `train`, which reports it in one line: keep the one line.
  logging.getLogger("absl").setLevel(logging.CRITICAL)
  codes = ((RunExistsError, EXIT_CONFIG_ERROR), (InsufficientDevicesError, EXIT_CONFIG_ERROR),
           (ConfigError, EXIT_CONFIG_ERROR), (NonFiniteError, EXIT_NONFINITE),
           (ckpt_lib.CheckpointMismatchError, EXIT_CHECKPOINT_ERROR),
           (ckpt_lib.NoValidCheckpointError, EXIT_CHECKPOINT_ERROR), (ckpt_lib.CheckpointSaveError, EXIT_SAVE_ERROR))
  try:
    summary = train(config, resume=args.resume, overwrite=args.overwrite)
  except tuple(cls for cls, _ in codes) as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
    return next(code for cls, code in codes if isinstance(e, cls))
  print(json.dumps(summary, indent=2))
  return EXIT_OK


if __name__ == "__main__":
  sys.exit(main())
