"""Orbax checkpoints of a training run: model, optimizer, step, RNG and data-iterator state.

    ckpt = Checkpointer(run_dir / "checkpoints", config, keep=3, async_save=True)
    ckpt.save(step, {"params": p, "opt_state": s, "step": step_array, "rng": key_data},
              data_state=iterator.get_state())
    restored = ckpt.restore(abstract_state)        # latest valid checkpoint, or None if there is none
    ckpt.close()

Layout: one directory per step with three items,
  state/  the array pytree (orbax StandardSave): every process writes the shards it holds
  meta/   JSON (written by process 0): step, the run's config, and a checksum (BLAKE2b) of
          every array of `state` (None when the arrays span several processes)
  data/   the data iterator state of each process (grain's checkpoint handler:
          process_<i>-of-<n>.json); restore merges them, so each host resumes its own rows
          of the data even when the number of processes changed

Saving is asynchronous: orbax copies the arrays to host memory inside
`save` and writes them in a background thread into a temporary directory
that is renamed into place only once complete, so a process killed mid-save
leaves the previous checkpoints intact and no half-written step visible.

Restoring:
* the arrays are read straight into the shardings of `abstract_state`: a run may
  resume onto another parallel layout (other data / tensor / expert sizes, fewer
  or more devices), as long as the model and optimizer config match;
* a checkpoint whose config differs from the run's in a field that changes the
  computation (anything but RESUMABLE_CHANGES) is refused with
  `CheckpointMismatchError`, listing the mismatched fields;
* a checkpoint that cannot be read or whose arrays do not match their
  checksum is reported (one line) and skipped: the previous step is tried.  With
  `quarantine=True` (a resuming run) the skipped steps are moved aside to
  `corrupt-<step>-<unix time>/` (nothing is deleted) so the run's next saves land;
* a key absent from a saved config (a field added since) counts as that field's default.

A save that fails in the background is raised by `check()` (cheap: it waits on nothing) as
`CheckpointSaveError`; a save that orbax declines (a step not above the latest) raises at once.

Several processes (jax.distributed) agree on every outcome, so that all stop together, at the same
step, with the same message, when the save fails on only one of them:
* `check()`, `save()` and `wait()` end in a round through jax's coordination service: a process whose
  save failed publishes why (a key-value entry), all meet at a barrier (bounded by AGREE_TIMEOUT_S), and
  every process raises the same CheckpointSaveError naming the failed processes.  One barrier per step.
* orbax's background save waits at barriers for every process's writes; a process whose write failed
  never arrives.  Its barriers here (AsyncOptions.barrier_sync_fn) give up as soon as a failure is
  published, so the other processes' saves end at once instead of at orbax's timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

import dataclasses
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from mx01 import config as config_lib
from mx01.config import Config

# Config fields that may differ between the run that saved a checkpoint and the one resuming it.
RESUMABLE_CHANGES = (
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.keep_checkpoints", "train.max_nonfinite_steps", "train.run_dir", "train.async_checkpointing",
    "train.tensorboard", "data.prefetch",
    # Optimizer hyperparameters: they change the schedule and the update, not the state's shapes, so a
    # diverged run can resume from its last good checkpoint with a lower learning rate or a longer schedule.
    "train.learning_rate", "train.min_lr_ratio", "train.warmup_steps", "train.lr_schedule", "train.weight_decay",
    "train.b1", "train.b2", "train.grad_clip",
    # Changes nothing silently: with it off, a malformed record stops the run when it starts.
    "data.skip_bad_records",
    # The layout: orbax reshards the arrays on restore.
    "parallel.data", "parallel.fsdp", "parallel.tensor", "parallel.sequence", "parallel.expert",
    "parallel.expert_tensor",
)

# Fault injection for tests: SIGKILL this process right after the save of this step has started.
KILL_DURING_SAVE_ENV = "MX01_FAULT_KILL_DURING_SAVE"
# Fault injection for tests: "STEP" or "STEP@PROCESS".  The save of step STEP fails in orbax's background
# thread (as a full or read-only disk would; chmod does not stop root), on every process or with @PROCESS
# on that jax.process_index() only.  One process: the metadata cannot be encoded.  Several: the process's
# background save raises before its first barrier, as a failed write of its shards would.
FAIL_SAVE_ENV = "MX01_FAULT_FAIL_SAVE"


class CheckpointMismatchError(ValueError):
  """A checkpoint was written by a run with a different configuration; `mismatches` lists the fields."""

  def __init__(self, message: str, mismatches: tuple[str, ...] = ()):
    super().__init__(message)
    self.mismatches = tuple(mismatches)


class NoValidCheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be restored."""


class CheckpointSaveError(RuntimeError):
  """A save failed (in the background) or was declined; the checkpoints before it are intact."""


def _fault_fails_save(step: int) -> bool:
  """Whether FAIL_SAVE_ENV ("STEP" or "STEP@PROCESS") makes this process's save of `step` fail."""
  spec = os.environ.get(FAIL_SAVE_ENV, "")
  at_step, _, process = spec.partition("@")
  return at_step == str(step) and (not process or int(process) == jax.process_index())


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
  step: int
  state: Any  # the pytree given to `save`
  data_state: Any  # the data iterator state given to `save`
  extra: dict


def tree_checksum(tree) -> Optional[str]:
  """BLAKE2b over the dtype, shape and bytes of every leaf (None if some array is not fully addressable)."""
  h = hashlib.blake2b(digest_size=16)
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return None
    a = np.asarray(leaf)
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def config_mismatches(saved: dict, current: Config) -> list[str]:
  """Fields (outside RESUMABLE_CHANGES) whose values differ: ["model.num_layers: 4 (checkpoint) != 2 (run)", ...].

  A field absent from `saved` (added to the code after the checkpoint was written) counts as its default.
  """
  a, b = _flatten(saved), _flatten(config_lib.to_dict(current))
  defaults = _flatten(config_lib.to_dict(Config()))
  out = []
  for key in sorted(set(a) | set(b)):
    if key in RESUMABLE_CHANGES:
      continue
    va, vb = a.get(key, defaults.get(key, "<absent>")), b.get(key, "<absent>")
    if va != vb:
      out.append(f"{key}: {va!r} (checkpoint) != {vb!r} (run)")
  # Clipping on or off changes the optimizer state's structure (optax.chain's parts); its value does not.
  clip_a, clip_b = a.get("train.grad_clip", defaults["train.grad_clip"]), b["train.grad_clip"]
  if (clip_a > 0) != (clip_b > 0):
    out.append(f"train.grad_clip: {clip_a!r} (checkpoint) != {clip_b!r} (run) (clipping on/off changes the "
               "optimizer state; any other positive value resumes)")
  return out


def _first_line(e: BaseException, limit: int = 200) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:limit] if text else ""


def _json_safe(x):
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, bytes):
    return x.decode("latin-1")
  return x


def latest_saved_config(directory: str | os.PathLike) -> Optional[dict]:
  """The config (a `config.to_dict` tree) saved with the newest checkpoint in `directory` whose metadata reads.

  For loading a run whose config is not known yet (recipes/generate.py): read it here, then
  `Checkpointer(directory, config).restore(...)` verifies and falls back as a resume does.
  Returns None when `directory` holds no checkpoint; reads only, creates nothing.  A checkpoint
  whose metadata does not read is passed over here and reported by `restore`.
  """
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    return None
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["config"]
      except Exception:  # a corrupt checkpoint: try the previous one
        continue
    return None
  finally:
    manager.close()


@contextlib.contextmanager
def dropped_reads_silenced():
  """Keeps the reports of orbax's abandoned reads off stderr while a checkpoint is restored.

  When one array of a checkpoint cannot be read, orbax raises the first error and abandons the
  other reads; Python then reports each abandoned coroutine's exception, and each callback that
  finds its event loop closed, through `sys.unraisablehook` -- hundreds to thousands of lines
  of TensorStore specs around the one line `Checkpointer.restore` logs.  Other unraisable
  exceptions are still reported.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    abandoned = inspect.iscoroutine(unraisable.object) or (
        isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value))
    if not abandoned:
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    sys.unraisablehook = previous


# Seconds a process waits at an agreement round for the others (a process that died or hangs).
AGREE_TIMEOUT_S = 300
_POLL_S = 0.02


class _SaveAborted(RuntimeError):
  """This process's save gave up because another process's save failed (not a failure of its own)."""


def _aborted(e: BaseException) -> bool:
  """Whether `e` (or what it wraps) is a _SaveAborted."""
  while e is not None:
    if isinstance(e, _SaveAborted):
      return True
    e = e.__cause__ or e.__context__
  return False


class _Agreement:
  """Save outcomes agreed across processes through jax's coordination service (key-value store, barriers).

  Every process creates its Checkpointers in the same order and makes the same calls, so the names
  (`namespace`, round numbers, barrier uses) match across processes without being exchanged.
  """

  _instances = 0

  def __init__(self):
    from jax._src import distributed  # the client orbax's own barriers use
    self.client = distributed.global_state.client
    _Agreement._instances += 1
    self.namespace = f"mx01/checkpoint/{_Agreement._instances}"
    self.rounds = 0
    self.barrier_uses: dict = {}
    self.published = False
    self.fault: Optional[str] = None  # FAIL_SAVE_ENV: raised by the next barrier of a background save

  def publish(self, why: str) -> None:
    """Tells every process (now, not at the next round) that this process's save failed."""
    if not self.published:
      self.published = True
      self.client.key_value_set(f"{self.namespace}/failed/{jax.process_index()}", why)

  def failures(self) -> list[tuple[int, str]]:
    """[(process, why)] of the failures published so far."""
    entries = self.client.key_value_dir_get(f"{self.namespace}/failed/")
    return sorted((int(k.rsplit("/", 1)[1]), v) for k, v in entries)

  def round(self) -> list[tuple[int, str]]:
    """A barrier of every process, then the failures published before it: the same list on every process."""
    self.rounds += 1
    n = self.rounds
    self.client.key_value_set(f"{self.namespace}/round/{n}/{jax.process_index()}",
                              ";".join(str(p) for p, _ in self.failures()))
    try:
      self.client.wait_at_barrier(f"{self.namespace}/round/{n}", AGREE_TIMEOUT_S * 1000)
    except Exception as e:
      raise CheckpointSaveError(f"the processes did not agree on the checkpoint saves within {AGREE_TIMEOUT_S} s "
                                f"(a process died or hangs: {_first_line(e)})") from e
    # What each process published before it reached the barrier: the union is complete and identical for all.
    failed = set()
    for _, v in self.client.key_value_dir_get(f"{self.namespace}/round/{n}/"):
      failed.update(int(p) for p in v.split(";") if p)
    return [(p, why) for p, why in self.failures() if p in failed]

  def barrier(self, *, key: str, timeout_ms: int) -> None:
    """orbax's barrier for its saves (BarrierSyncFn), giving up once some process's save has failed."""
    if self.fault and threading.current_thread() is not threading.main_thread():
      fault, self.fault = self.fault, None
      raise OSError(fault)
    pending = sys.exc_info()[1]
    if pending is not None:
      # Called from orbax's clean-up (a `finally`) after this process's save failed: the others wait at
      # another barrier and would never come.  Tell them, and do not wait.
      if not _aborted(pending):
        self.publish(f"{type(pending).__name__}: {_first_line(pending)}")
      raise _SaveAborted("this process's save failed; not waiting for the others")
    use = self.barrier_uses[key] = self.barrier_uses.get(key, 0) + 1  # orbax reuses some keys
    prefix = f"{self.namespace}/barrier/{key}#{use}/"
    self.client.key_value_set(prefix + str(jax.process_index()), "")
    deadline = time.monotonic() + timeout_ms / 1000
    while len(self.client.key_value_dir_get(prefix)) < jax.process_count():
      failed = self.failures()
      if failed:
        raise _SaveAborted(f"stopped waiting for the other processes: process {failed[0][0]}'s save failed")
      if time.monotonic() > deadline:
        raise TimeoutError(f"the processes did not all reach barrier {key} within {timeout_ms / 1000:.0f} s")
      time.sleep(_POLL_S)


class _DataState:
  """A data-iterator state (JSON-serialisable) in the shape grain's checkpoint handler saves."""

  def __init__(self, state):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(_json_safe(self.state)).encode()


class _Unwritable:
  """Stands in the metadata of a save made to fail by FAIL_SAVE_ENV: JSON cannot encode it."""


class Checkpointer:
  """Periodic, asynchronous, keep-last-k checkpoints of one run (see module docstring)."""

  def __init__(self, directory: str | os.PathLike, config: Config, *, keep: int = 3, async_save: bool = True,
               log: Callable[[str], None] = print):
    self.directory = pathlib.Path(directory).absolute()
    self.config = config
    self.log = log
    self._agreement = _Agreement() if jax.process_count() > 1 else None
    self._agreed_failure: Optional[str] = None
    async_options = ocp.AsyncOptions(barrier_sync_fn=self._agreement.barrier) if self._agreement else None
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           async_options=async_options)
    self._manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta", "data"), options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state, *, data_state, extra: Optional[dict] = None, force: bool = False) -> bool:
    """Starts saving `state` (a pytree of arrays) as step `step`; returns whether a save was started.

    Several processes first agree that the previous save succeeded (`wait`), then that this one started.
    """
    self.wait()
    meta = {"step": int(step), "config": config_lib.to_dict(self.config),
            "checksum": tree_checksum(state), "extra": _json_safe(extra or {})}
    if _fault_fails_save(step):
      if self._agreement is None:
        meta["fault"] = _Unwritable()
      else:
        self._agreement.fault = f"injected fault ({FAIL_SAVE_ENV}): process {jax.process_index()}'s write failed"
    try:
      started = self._manager.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
          data=grain.checkpoint.CheckpointSave(_DataState(data_state))), force=force)
    except Exception as e:  # e.g. the arrays could not be copied to host memory
      self._agree(e)  # raises, on every process alike
      raise CheckpointSaveError(self._failure(e)) from e  # never continue past a failed save
    if not started:
      raise CheckpointSaveError(
          f"orbax declined to save step {step} in {self.directory} (latest step {self.latest_step()}): "
          "a step at or below the newest checkpoint; move that checkpoint aside or start a new run_dir")
    self._agree(None)
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
      os.kill(os.getpid(), signal.SIGKILL)
    return started

  def _failure(self, e: BaseException) -> str:
    return (f"saving a checkpoint in {self.directory} failed ({type(e).__name__}: {_first_line(e)}); "
            f"the last good checkpoint is step {self._last_good_step()}")

  def _last_good_step(self) -> Optional[int]:
    """The newest step written in full (orbax renames a step's directory into place once complete)."""
    steps = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()] if self.directory.is_dir() else []
    return max(steps, default=None)

  def _agree(self, error: Optional[BaseException]) -> None:
    """Several processes: publishes this process's `error`, meets the others, and raises (on every process
    alike) CheckpointSaveError naming each process whose save failed.  One process: raises `error`."""
    if self._agreement is None:
      if error is not None:
        raise CheckpointSaveError(self._failure(error)) from error
      return
    if self._agreed_failure is not None:
      raise CheckpointSaveError(self._agreed_failure)
    if error is not None and not _aborted(error):
      self._agreement.publish(f"{type(error).__name__}: {_first_line(error)}")
    failed = self._agreement.round()
    if failed:
      self._agreed_failure = (
          f"saving a checkpoint in {self.directory} failed on "
          + "; ".join(f"process {p} ({why})" for p, why in failed)
          + f"; the last good checkpoint is step {self._last_good_step()}")
      raise CheckpointSaveError(self._agreed_failure)

  def _local_error(self, *, block: bool) -> Optional[BaseException]:
    """This process's failed save (waiting for the one in progress if `block`), else None."""
    if not block and self._manager.is_saving_in_progress():
      return None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # published by `_agree`, which every caller but close() calls next
      return e
    return None

  def check(self) -> None:
    """Raises CheckpointSaveError if an asynchronous save has failed; never waits for one in progress.

    With several processes, every process raises if any process's save failed (one barrier).
    """
    self._agree(self._local_error(block=False))

  def _read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _read_data_state(self, step: int):
    """The data-iterator states of every process that saved `step`, merged: {"rows": {row: state}}.

    A process restores its own rows from it, whatever the number of processes of the run that saved.
    """
    files = sorted((self.directory / str(step) / "data").glob("process_*.json"))
    states = [json.loads(f.read_text()) for f in files]
    if not states:
      raise ValueError(f"no data-iterator state in {self.directory / str(step) / 'data'}")
    if not all(isinstance(st, dict) and "rows" in st for st in states):
      return states[0]
    return {"rows": {r: v for st in states for r, v in st["rows"].items()}}

  def restore(self, abstract_state, *, step: Optional[int] = None,
              quarantine: bool = False) -> Optional[RestoredCheckpoint]:
    """The latest valid checkpoint (or `step`), restored into the structure of `abstract_state`.

    abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) or arrays.
    quarantine: move the corrupt steps newer than the one restored to `corrupt-<step>-<time>/`, so that
      saves of those steps land (orbax saves only steps above the newest).
    Returns None when there is no checkpoint.  Raises CheckpointMismatchError
    for a checkpoint of another config and NoValidCheckpointError when every
    checkpoint is unreadable.
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    failures, corrupt = [], []
    for s in steps:
      with dropped_reads_silenced():
        restored, failure = self._try_restore(s, abstract_state)
      if restored is not None:
        if quarantine and corrupt:
          self._move_aside(corrupt)
        return restored
      failures.append(failure)
      corrupt.append(s)
      self.log(f"checkpoint at step {s} is corrupt ({failure}); trying the previous one")
    raise NoValidCheckpointError(f"no checkpoint in {self.directory} could be restored: " + "; ".join(failures)
                                 + ". Start over with --overwrite or choose another train.run_dir")

  def _try_restore(self, s: int, abstract_state) -> tuple[Optional[RestoredCheckpoint], Optional[str]]:
    """(the checkpoint of step `s`, None) or (None, why it is corrupt); raises CheckpointMismatchError."""
    try:
      meta = self._read_meta(s)
    except Exception as e:  # unreadable metadata: a corrupt checkpoint
      return None, f"step {s}: metadata unreadable ({type(e).__name__}: {_first_line(e)})"
    mismatches = config_mismatches(meta.get("config", {}), self.config)
    if mismatches:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory / str(s)} was written with a different config; mismatched fields: "
          + "; ".join(mismatches)
          + ". Resume with the same config (optimizer hyperparameters may differ), or start a new run in "
          "another train.run_dir.", mismatches)
    try:
      target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
      state = self._manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
      data_state = self._read_data_state(s)
      expected = meta.get("checksum")
      if expected is not None:
        actual = tree_checksum(state)
        if actual is not None and actual != expected:
          raise ValueError(f"array checksum {actual} != saved {expected}")
    except Exception as e:
      return None, f"step {s}: arrays unreadable or corrupt ({type(e).__name__}: {_first_line(e)})"
    return RestoredCheckpoint(step=int(meta["step"]), state=state, data_state=data_state,
                              extra=meta.get("extra", {})), None

  def _move_aside(self, steps: list[int]) -> None:
    """Renames each step's directory to corrupt-<step>-<unix time>/ (process 0), then re-reads the steps."""
    if jax.process_index() == 0:
      stamp = int(time.time())
      for s in steps:
        target = self.directory / f"corrupt-{s}-{stamp}"
        os.replace(self.directory / str(s), target)
        self.log(f"moved the corrupt checkpoint of step {s} to {target}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("checkpoint_move_aside")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written; raises CheckpointSaveError if one failed
    (with several processes: on any process)."""
    self._agree(self._local_error(block=True))

  def close(self) -> None:
    """Waits for pending saves and closes; raises CheckpointSaveError (after closing) if one failed.

    After a failure the processes agreed on, only waits (orbax's barriers give up at once) and closes.
    """
    try:
      if self._agreed_failure is None:
        self.wait()
      else:
        self._local_error(block=True)
    finally:
      self._manager.close()
