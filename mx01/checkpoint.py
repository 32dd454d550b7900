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
  checksum is reported and skipped: the previous step is tried.
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
    # Changes nothing silently: with it off, a malformed record stops the run when it starts.
    "data.skip_bad_records",
    # The layout: orbax reshards the arrays on restore.
    "parallel.data", "parallel.fsdp", "parallel.tensor", "parallel.sequence", "parallel.expert",
    "parallel.expert_tensor",
)

# Fault injection for tests: SIGKILL this process right after the save of this step has started.
KILL_DURING_SAVE_ENV = "MX01_FAULT_KILL_DURING_SAVE"


class CheckpointMismatchError(ValueError):
  """A checkpoint was written by a run with a different configuration."""


class NoValidCheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be restored."""


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
  """Fields (outside RESUMABLE_CHANGES) whose values differ: ["model.num_layers: 4 (checkpoint) != 2 (run)", ...]."""
  a, b = _flatten(saved), _flatten(config_lib.to_dict(current))
  out = []
  for key in sorted(set(a) | set(b)):
    if key in RESUMABLE_CHANGES:
      continue
    va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
    if va != vb:
      out.append(f"{key}: {va!r} (checkpoint) != {vb!r} (run)")
  return out


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


class _DataState:
  """A data-iterator state (JSON-serialisable) in the shape grain's checkpoint handler saves."""

  def __init__(self, state):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(_json_safe(self.state)).encode()


class Checkpointer:
  """Periodic, asynchronous, keep-last-k checkpoints of one run (see module docstring)."""

  def __init__(self, directory: str | os.PathLike, config: Config, *, keep: int = 3, async_save: bool = True,
               log: Callable[[str], None] = print):
    self.directory = pathlib.Path(directory).absolute()
    self.config = config
    self.log = log
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta", "data"), options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state, *, data_state, extra: Optional[dict] = None, force: bool = False) -> bool:
    """Starts saving `state` (a pytree of arrays) as step `step`; returns whether a save was started."""
    meta = {"step": int(step), "config": config_lib.to_dict(self.config),
            "checksum": tree_checksum(state), "extra": _json_safe(extra or {})}
    started = self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
        data=grain.checkpoint.CheckpointSave(_DataState(data_state))), force=force)
    if started and os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
      os.kill(os.getpid(), signal.SIGKILL)
    return started

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

  def restore(self, abstract_state, *, step: Optional[int] = None) -> Optional[RestoredCheckpoint]:
    """The latest valid checkpoint (or `step`), restored into the structure of `abstract_state`.

    abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) or arrays.
    Returns None when there is no checkpoint.  Raises CheckpointMismatchError
    for a checkpoint of another config and NoValidCheckpointError when every
    checkpoint is unreadable.
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    failures = []
    for s in steps:
      try:
        meta = self._read_meta(s)
      except Exception as e:  # unreadable metadata: a corrupt checkpoint
        failures.append(f"step {s}: metadata unreadable ({type(e).__name__}: {e})")
        self.log(f"checkpoint at step {s} is corrupt ({failures[-1]}); trying the previous one")
        continue
      mismatches = config_mismatches(meta.get("config", {}), self.config)
      if mismatches:
        raise CheckpointMismatchError(
            f"checkpoint {self.directory / str(s)} was written with a different config; mismatched fields:\n  "
            + "\n  ".join(mismatches)
            + "\nResume with the same config, or start a new run in another train.run_dir.")
      try:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        state = self._manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        data_state = self._read_data_state(s)
        expected = meta.get("checksum")
        if expected is not None:
          actual = tree_checksum(state)
          if actual is not None and actual != expected:
            raise ValueError(f"array checksum {actual} != saved {expected}")
      except CheckpointMismatchError:
        raise
      except Exception as e:
        failures.append(f"step {s}: arrays unreadable or corrupt ({type(e).__name__}: {str(e)[:300]})")
        self.log(f"checkpoint at step {s} is corrupt ({failures[-1]}); trying the previous one")
        continue
      return RestoredCheckpoint(step=int(meta["step"]), state=state, data_state=data_state,
                                extra=meta.get("extra", {}))
    raise NoValidCheckpointError(f"no checkpoint in {self.directory} could be restored:\n  " + "\n  ".join(failures))

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
