"""Scaling sweep: train a grid of small models per attention architecture and log (N, D, C, loss) to a CSV.

    python -m recipes.sweep --out results/sweep.csv --archs softmax,lightning,hybrid --sizes s1,s2,s3 \
        --tokens 2e5,5e5,1e6
    python -m recipes.sweep --out results/sweep.csv --dry_run      # print the grid: parameters, tokens, FLOPs
    python -m recipes.sweep --plan isoflop --dry_run            # the IsoFLOP study (scaling/isoflop.py)
    python -m recipes.sweep --sizes s3 --config.train.batch_size=32 --config.data.seq_len=256 \
        --config.model.block_size=64                               # overrides apply to every grid point

Each grid point's model is a preset, `sweep_{arch}_{size}` or `sweep_{arch}_moe_{size}`
(mx01/presets.py).  `--config.model.KEY=VALUE` overrides apply to every point's model;
`--config.train.batch_size`, `--config.data.seq_len`, `--config.train.learning_rate` and
`--config.train.seed` set the sweep's tokens per step, learning rate and seed (defaults: the
presets' 8, 128, 3e-3, 0); the number of steps follows from each point's token budget.

Every grid point (arch, size, ffn, tokens) is trained through `recipes.pretrain.train` and
appended to the CSV as soon as it finishes; runs already in the CSV are skipped, and a run
interrupted mid-training resumes from its last checkpoint (run_root/<run>/).  So the command
can be killed and re-run at any time.  A run is the grid point together with batch size,
sequence length, learning rate and seed (`run_key`): everything its config is made from, so
another learning rate is a new run, in its own run_root/<run>/ folder.

CSV columns (one row per run):
  arch, size, ffn         the grid point ("softmax" | "lightning" | "hybrid", a SIZES key, "dense" | "moe")
  n_params                non-embedding parameters (embedding and LM head excluded; all experts)
  n_params_active         non-embedding parameters one token uses (activated experts only)
  n_params_total          all parameters
  tokens                  training tokens D = steps * batch_size * seq_len
  compute                 training FLOPs C = scaling.flops.training_flops (causal attention, 3 x forward)
  flops_per_token         C / D
  final_loss, eval_loss   train loss (mean of the last logged steps) and held-out loss, nats/token
  wall_time_s, steps, batch_size, seq_len, learning_rate, seed, run_dir
  model_overrides         the --config.model.KEY=VALUE overrides of the run, sorted and ;-joined (empty: none)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import dataclasses
import math
import pathlib
import sys
import time
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from mx01 import config as config_lib
from mx01 import presets
from recipes import flags as flags_lib
from mx01.config import Config, DataConfig, ModelConfig, TrainConfig
from scaling import data as scaling_data
from scaling import flops

ARCHS = presets.KINDS
# The sweep's sizes are presets (mx01/presets.py): sweep_{arch}_{size}, sweep_{arch}_moe_{size}.
SIZES = presets.SWEEP_SIZES
layer_types = presets.layer_types


class SweepError(RuntimeError):
  """A run of the sweep cannot start (one line, exit code 2)."""

CSV_COLUMNS = ("arch", "size", "ffn", "n_params", "n_params_active", "n_params_total", "tokens", "compute",
               "flops_per_token", "final_loss", "eval_loss", "wall_time_s", "steps", "batch_size", "seq_len",
               "learning_rate", "seed", "run_dir", "model_overrides")


def small_model_config(arch: str, size: str, *, ffn: str = "dense", vocab_size: int = 256,
                       block_size: int = 32) -> ModelConfig:
  """The sweep's model for (arch, size): the preset `sweep_{arch}[_moe]_{size}` (byte vocabulary, head_dim 16).

  ffn="moe" uses 4 experts of half the dense width, top-2 (same activated FFN size as dense).
  """
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
  if ffn not in ("dense", "moe"):
    raise ValueError(f"ffn must be 'dense' or 'moe', got {ffn!r}")
  layer_types(arch, 1)  # names the valid archs
  model = presets.get_preset(presets.sweep_name(arch, size, ffn)).model
  return dataclasses.replace(model, vocab_size=vocab_size, block_size=block_size)


@dataclasses.dataclass(frozen=True)
class GridPoint:
  arch: str
  size: str
  ffn: str
  target_tokens: float

  @property
  def name(self) -> str:
    return f"{self.arch}_{self.size}_{self.ffn}_{self.target_tokens:.0e}".replace("+", "")


def run_config(point: GridPoint, *, batch_size: int, seq_len: int, learning_rate: float, seed: int,
               run_root: pathlib.Path, model_overrides: Sequence[str] = ()) -> Config:
  """The full training Config of one grid point (steps = ceil(target tokens / tokens per step)).

  model_overrides: ["num_layers=4", ...], applied to the point's model.  A function of the grid
  point and the arguments only (they make up `run_key`); its run_dir,
  run_root/<point>_b<batch>_L<seq_len>_lr<lr>_seed<seed>[_m<hash of the overrides>], is different
  for every run.
  """
  model = config_lib.apply_overrides(small_model_config(point.arch, point.size, ffn=point.ffn), model_overrides)
  steps = max(1, math.ceil(point.target_tokens / (batch_size * seq_len)))
  name = f"{point.name}_b{batch_size}_L{seq_len}_lr{learning_rate:g}_seed{seed}"
  if model_overrides:
    name += "_m" + hashlib.blake2b(overrides_text(model_overrides).encode(), digest_size=4).hexdigest()
  run_dir = run_root / name
  train = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                      warmup_steps=min(max(1, steps // 10), steps), seed=seed, log_every=max(1, steps // 10),
                      eval_every=steps, eval_batches=4, checkpoint_every=max(1, steps // 4), keep_checkpoints=1,
                      run_dir=str(run_dir), tensorboard=False)
  return Config(model=model, data=DataConfig(seq_len=seq_len), train=train)


def overrides_text(model_overrides: Sequence[str]) -> str:
  """The model overrides of a run as one canonical string (sorted, ';'-joined; '' for none)."""
  return ";".join(sorted(model_overrides))


def run_key(row: dict) -> tuple:
  """What decides a run's result, from a CSV row (or a new row): grid point, tokens, batch, length, LR, seed
  and the model overrides (absent in CSVs written before that column: none)."""
  return (row["arch"], row["size"], row["ffn"], int(float(row["tokens"])), int(float(row["batch_size"])),
          int(float(row["seq_len"])), float(row["learning_rate"]), int(float(row["seed"])),
          row.get("model_overrides") or "")


def _existing_keys(path: pathlib.Path) -> set:
  if not path.exists():
    return set()
  with open(path, newline="") as f:
    return {run_key(r) for r in csv.DictReader(f)}


def grid(archs: Iterable[str], sizes: Iterable[str], tokens: Iterable[float], ffn: str = "dense") -> List[GridPoint]:
  return [GridPoint(a, s, ffn, float(t)) for a in archs for s in sizes for t in tokens]


def run_sweep(points: Sequence[GridPoint], out: pathlib.Path, *, batch_size: int = 8, seq_len: int = 128,
              learning_rate: float = 3e-3, seed: int = 0, run_root: pathlib.Path = pathlib.Path("runs/sweep"),
              train_fn: Optional[Callable[..., dict]] = None, dry_run: bool = False,
              log: Callable[[str], None] = print, model_overrides: Sequence[str] = ()) -> List[dict]:
  """Trains every grid point not yet in `out` and appends its row; returns the new rows.

  train_fn(config, resume=True, log=...) -> summary dict (default: recipes.pretrain.train).
  """
  if train_fn is None and not dry_run:
    from recipes.pretrain import train as train_fn  # imported lazily: --dry_run needs no training stack
  out = pathlib.Path(out)
  done = _existing_keys(out)
  rows = []
  for i, point in enumerate(points):
    cfg = run_config(point, batch_size=batch_size, seq_len=seq_len, learning_rate=learning_rate, seed=seed,
                     run_root=run_root, model_overrides=model_overrides)
    tokens = cfg.train.steps * batch_size * seq_len
    key = run_key(dict(arch=point.arch, size=point.size, ffn=point.ffn, tokens=tokens, batch_size=batch_size,
                       seq_len=seq_len, learning_rate=learning_rate, seed=seed,
                       model_overrides=overrides_text(model_overrides)))
    pc = flops.param_count(cfg.model)
    compute = flops.training_flops(cfg.model, seq_len, tokens)
    head = (f"[{i + 1}/{len(points)}] {point.arch:9s} {point.size} {point.ffn}: N={pc.non_embedding:,} "
            f"D={tokens:,} C={compute:.3g} FLOPs ({cfg.train.steps} steps)")
    if key in done:
      log(head + " - already in CSV, skipped")
      continue
    if dry_run:
      log(head)
      continue
    log(head + " - training")
    t0 = time.time()
    from mx01.checkpoint import CheckpointMismatchError  # with the training stack: --dry_run needs neither
    try:
      summary = train_fn(cfg, resume=True, log=lambda s: None)
    except CheckpointMismatchError as e:  # e.g. a run_root written by an older version of this sweep
      first = e.mismatches[0] if e.mismatches else ""
      raise SweepError(f"{cfg.train.run_dir} holds checkpoints of another config ({first}, ...); pass another "
                       "--run_root, or delete that folder to retrain") from None
    row = dict(arch=point.arch, size=point.size, ffn=point.ffn, n_params=summary.get("n_params", pc.non_embedding),
               n_params_active=pc.active_non_embedding, n_params_total=summary.get("n_params_total", pc.total),
               tokens=summary.get("tokens_seen", tokens), compute=compute,
               flops_per_token=flops.training_flops_per_token(cfg.model, seq_len),
               final_loss=summary.get("final_train_loss"), eval_loss=summary.get("eval_loss"),
               wall_time_s=round(time.time() - t0, 2), steps=cfg.train.steps, batch_size=batch_size,
               seq_len=seq_len, learning_rate=learning_rate, seed=seed, run_dir=cfg.train.run_dir,
               model_overrides=overrides_text(model_overrides))
    scaling_data.append_csv_row(out, row, CSV_COLUMNS)
    done.add(key)
    rows.append(row)
    log(f"    loss {row['final_loss']:.4f} eval {row['eval_loss']:.4f} in {row['wall_time_s']:.1f}s")
  return rows


def _csv_list(s: str) -> List[str]:
  return [x.strip() for x in s.split(",") if x.strip()]


# The sweep-wide settings a --config.KEY override may set, besides any model.* key.
SWEEP_KEYS = ("train.batch_size", "data.seq_len", "train.learning_rate", "train.seed")


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a == "--plan" or a.startswith("--plan=") for a in argv):  # the IsoFLOP study: scaling/isoflop.py
    from scaling import isoflop
    return isoflop.main(argv)
  p = argparse.ArgumentParser(description="Scaling sweep over attention architectures (see module docstring).",
                              epilog=f"--config.model.KEY=VALUE applies to every grid point; also: "
                                     f"{', '.join('--config.' + k for k in SWEEP_KEYS)}")
  p.add_argument("--out", default="results/sweep.csv", help="CSV to append to (created if absent)")
  p.add_argument("--archs", default="softmax,lightning,hybrid", help=f"comma list of {ARCHS}")
  p.add_argument("--sizes", default="s1,s2,s3,s4", help=f"comma list of {', '.join(SIZES)}")
  p.add_argument("--tokens", default="2e5,5e5,1e6", help="comma list of training token budgets D")
  p.add_argument("--ffn", default="dense", choices=("dense", "moe"))
  p.add_argument("--run_root", default="runs/sweep", help="checkpoints of each grid point go under here")
  p.add_argument("--dry_run", action="store_true", help="print the grid (N, D, C) without training")
  try:
    args = flags_lib.parse_args(argv, p)
    archs, sizes = _csv_list(args.archs), _csv_list(args.sizes)
    for a in archs:
      layer_types(a, 1)
    for s in sizes:
      small_model_config("softmax", s)
    token_budgets = [float(t) for t in _csv_list(args.tokens)]
    if not token_budgets or min(token_budgets) <= 0:
      raise ValueError(f"--tokens must be a comma list of positive numbers, got {args.tokens!r}")
    overrides = dict(o.split("=", 1) for o in args.overrides)
    for key in overrides:
      if not key.startswith("model.") and key not in SWEEP_KEYS:
        raise ValueError(f"--config.{key}: the sweep sets it per grid point; pass --config.model.KEY=VALUE or one of "
                         f"{', '.join('--config.' + k for k in SWEEP_KEYS)}")
    # The sweep-wide settings and a check of every override, on the first point's preset.
    base = config_lib.apply_overrides(presets.get_preset(presets.sweep_name(archs[0], sizes[0], args.ffn)),
                                      args.overrides)
  except ValueError as e:  # ConfigError included
    print(f"error: {e}", file=sys.stderr)
    return 2
  points = grid(archs, sizes, token_budgets, args.ffn)
  try:
    run_sweep(points, pathlib.Path(args.out), batch_size=base.train.batch_size, seq_len=base.data.seq_len,
              learning_rate=base.train.learning_rate, seed=base.train.seed, run_root=pathlib.Path(args.run_root),
              dry_run=args.dry_run, model_overrides=[f"{k[len('model.'):]}={v}" for k, v in overrides.items()
                                                     if k.startswith("model.")])
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
