"""Run reporting: metrics to JSONL and TensorBoard, and the live progress line.

    writer = MetricsWriter(run_dir, tensorboard=True)
    writer.write(step, {"loss": 2.3, "lr": 1e-3})   # one JSON object per line in run_dir/metrics.jsonl
    writer.truncate_after(step)                      # on resume: drop records of steps not in the checkpoint
    print(progress_line(step, total, {...}, eta_s))
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Mapping, Optional


class MetricsWriter:
  """Appends {"step": s, **scalars} records to `metrics.jsonl` and scalars to TensorBoard (tensorboardX)."""

  def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, filename: str = "metrics.jsonl"):
    self.run_dir = pathlib.Path(run_dir)
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.path = self.run_dir / filename
    self._file = open(self.path, "a", buffering=1)
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
      except ImportError:  # pragma: no cover - tensorboardX is a runtime requirement
        self._tb = None

  def write(self, step: int, scalars: Mapping[str, float], *, tensorboard: bool = True) -> None:
    record = {"step": int(step)}
    for k, v in scalars.items():
      if v is None:
        continue
      v = float(v) if not isinstance(v, (str, bool)) else v
      record[k] = v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
    self._file.write(json.dumps(record) + "\n")
    if self._tb is not None and tensorboard:
      for k, v in record.items():
        if k != "step" and isinstance(v, float):
          self._tb.add_scalar(k, v, int(step))

  def truncate_after(self, step: int) -> None:
    """Drops records with record["step"] > step (they belong to work lost when a run was killed)."""
    self._file.close()
    kept = []
    if self.path.exists():
      for line in self.path.read_text().splitlines():
        try:
          if json.loads(line).get("step", 0) <= step:
            kept.append(line)
        except json.JSONDecodeError:  # a line cut short by a kill
          continue
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in kept))
    os.replace(tmp, self.path)
    self._file = open(self.path, "a", buffering=1)

  def flush(self) -> None:
    self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


class NullWriter:
  """A MetricsWriter that writes nothing: the other processes of a multi-host run."""

  def write(self, step: int, scalars: Mapping[str, float], *, tensorboard: bool = True) -> None:
    pass

  def truncate_after(self, step: int) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """All records of a metrics.jsonl file."""
  out = []
  with open(path) as f:
    for line in f:
      if line.strip():
        out.append(json.loads(line))
  return out


def format_duration(seconds: Optional[float]) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(step: int, total_steps: int, m: Mapping[str, Optional[float]], eta_s: Optional[float]) -> str:
  """"step  50/300 | loss 2.345 | aux 0.0123 | gnorm 0.53 | lr 2.9e-03 | 12,345 tok/s | MFU 41.2% | ETA 4m12s"."""
  width = len(str(total_steps))
  parts = [f"step {step:>{width}}/{total_steps}", f"loss {m['loss']:.4f}"]
  if m.get("aux_loss") is not None:
    parts.append(f"aux {m['aux_loss']:.4f}")
  if m.get("grad_norm") is not None:
    parts.append(f"gnorm {m['grad_norm']:.3f}")
  if m.get("learning_rate") is not None:
    parts.append(f"lr {m['learning_rate']:.2e}")
  if m.get("tokens_per_sec") is not None:
    parts.append(f"{m['tokens_per_sec']:,.0f} tok/s")
  mfu = m.get("mfu")
  parts.append(f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a")
  if m.get("expert_load_max_over_mean") is not None:
    parts.append(f"load max/mean {m['expert_load_max_over_mean']:.2f}")
  if m.get("nonfinite_skipped"):
    parts.append(f"skipped {int(m['nonfinite_skipped'])}")
  parts.append(f"ETA {format_duration(eta_s)}")
  return " | ".join(parts)
