"""Scaling sweep: train a grid of small models per attention architecture and log (N, D, C, loss) to a CSV.

    python -m recipes.sweep --out results/sweep.csv --archs softmax,lightning,hybrid --sizes s1,s2,s3 \
        --tokens 2e5,5e5,1e6
    python -m recipes.sweep --out results/sweep.csv --dry_run      # print the grid: parameters, tokens, FLOPs

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
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import pathlib
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from mx01.config import LIGHTNING, SOFTMAX, Config, DataConfig, ModelConfig, TrainConfig
from scaling import flops

ARCHS = ("softmax", "lightning", "hybrid")


class SweepError(RuntimeError):
  """A run of the sweep cannot start (one line, exit code 2)."""

# (hidden, layers, heads, kv_heads, intermediate) of the sweep sizes; head_dim 16 throughout.
SIZES: Dict[str, Tuple[int, int, int, int, int]] = {
    "s1": (32, 2, 2, 1, 96),
    "s2": (48, 2, 3, 1, 128),
    "s3": (64, 4, 4, 2, 176),
    "s4": (96, 4, 6, 2, 256),
    "s5": (128, 6, 8, 2, 352),
    "s6": (192, 8, 12, 4, 512),
    "s7": (256, 8, 16, 4, 704),
}
HEAD_DIM = 16

CSV_COLUMNS = ("arch", "size", "ffn", "n_params", "n_params_active", "n_params_total", "tokens", "compute",
               "flops_per_token", "final_loss", "eval_loss", "wall_time_s", "steps", "batch_size", "seq_len",
               "learning_rate", "seed", "run_dir")


def layer_types(arch: str, num_layers: int) -> Tuple[str, ...]:
  """Layer kinds of an architecture.

  hybrid: MiniMax-Text-01's 7 lightning + 1 softmax per 8 layers; models
  shallower than 8 layers make their last layer the softmax one.
  """
  if arch == "softmax":
    return (SOFTMAX,) * num_layers
  if arch == "lightning":
    return (LIGHTNING,) * num_layers
  if arch == "hybrid":
    return tuple(SOFTMAX if (i % 8 == 7 or (num_layers < 8 and i == num_layers - 1)) else LIGHTNING
                 for i in range(num_layers))
  raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def small_model_config(arch: str, size: str, *, ffn: str = "dense", vocab_size: int = 256,
                       block_size: int = 32) -> ModelConfig:
  """The sweep's model for (arch, size): byte vocabulary, DeepNorm residual scaling, head_dim 16.

  ffn="moe" uses 4 experts of half the dense width, top-2 (same activated FFN size as dense).
  """
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
  if ffn not in ("dense", "moe"):
    raise ValueError(f"ffn must be 'dense' or 'moe', got {ffn!r}")
  hidden, layers, heads, kv_heads, inter = SIZES[size]
  alpha = (2.0 * layers) ** 0.25
  moe = ffn == "moe"
  return ModelConfig(
      vocab_size=vocab_size, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
      head_dim=HEAD_DIM, layer_types=layer_types(arch, layers), ffn_type=ffn,
      intermediate_size=inter // 2 if moe else inter, num_experts=4 if moe else 1,
      num_experts_per_tok=2 if moe else 1, block_size=block_size, rotary_dim=HEAD_DIM // 2,
      lightning_alpha=alpha, softmax_alpha=alpha, mlp_alpha=alpha)


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
               run_root: pathlib.Path) -> Config:
  """The full training Config of one grid point (steps = ceil(target tokens / tokens per step)).

  A function of the grid point and the arguments only (they make up `run_key`); its run_dir,
  run_root/<point>_b<batch>_L<seq_len>_lr<lr>_seed<seed>, is different for every run.
  """
  model = small_model_config(point.arch, point.size, ffn=point.ffn)
  steps = max(1, math.ceil(point.target_tokens / (batch_size * seq_len)))
  run_dir = run_root / f"{point.name}_b{batch_size}_L{seq_len}_lr{learning_rate:g}_seed{seed}"
  train = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                      warmup_steps=min(max(1, steps // 10), steps), seed=seed, log_every=max(1, steps // 10),
                      eval_every=steps, eval_batches=4, checkpoint_every=max(1, steps // 4), keep_checkpoints=1,
                      run_dir=str(run_dir), tensorboard=False)
  return Config(model=model, data=DataConfig(seq_len=seq_len), train=train)


def run_key(row: dict) -> tuple:
  """What decides a run's result, from a CSV row (or a new row): grid point, tokens, batch, length, LR, seed."""
  return (row["arch"], row["size"], row["ffn"], int(float(row["tokens"])), int(float(row["batch_size"])),
          int(float(row["seq_len"])), float(row["learning_rate"]), int(float(row["seed"])))


def _existing_keys(path: pathlib.Path) -> set:
  if not path.exists():
    return set()
  with open(path, newline="") as f:
    return {run_key(r) for r in csv.DictReader(f)}


def _append_row(path: pathlib.Path, row: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  new = not path.exists() or path.stat().st_size == 0
  with open(path, "a", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    if new:
      writer.writeheader()
    writer.writerow({k: row.get(k) for k in CSV_COLUMNS})


def grid(archs: Iterable[str], sizes: Iterable[str], tokens: Iterable[float], ffn: str = "dense") -> List[GridPoint]:
  return [GridPoint(a, s, ffn, float(t)) for a in archs for s in sizes for t in tokens]


def run_sweep(points: Sequence[GridPoint], out: pathlib.Path, *, batch_size: int = 8, seq_len: int = 128,
              learning_rate: float = 3e-3, seed: int = 0, run_root: pathlib.Path = pathlib.Path("runs/sweep"),
              train_fn: Optional[Callable[..., dict]] = None, dry_run: bool = False,
              log: Callable[[str], None] = print) -> List[dict]:
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
                     run_root=run_root)
    tokens = cfg.train.steps * batch_size * seq_len
    key = run_key(dict(arch=point.arch, size=point.size, ffn=point.ffn, tokens=tokens, batch_size=batch_size,
                       seq_len=seq_len, learning_rate=learning_rate, seed=seed))
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
      first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "")
      raise SweepError(f"{cfg.train.run_dir} holds checkpoints of another config ({first}, ...); pass another "
                       "--run_root, or delete that folder to retrain") from None
    row = dict(arch=point.arch, size=point.size, ffn=point.ffn, n_params=summary.get("n_params", pc.non_embedding),
               n_params_active=pc.active_non_embedding, n_params_total=summary.get("n_params_total", pc.total),
               tokens=summary.get("tokens_seen", tokens), compute=compute,
               flops_per_token=flops.training_flops_per_token(cfg.model, seq_len),
               final_loss=summary.get("final_train_loss"), eval_loss=summary.get("eval_loss"),
               wall_time_s=round(time.time() - t0, 2), steps=cfg.train.steps, batch_size=batch_size,
               seq_len=seq_len, learning_rate=learning_rate, seed=seed, run_dir=cfg.train.run_dir)
    _append_row(out, row)
    done.add(key)
    rows.append(row)
    log(f"    loss {row['final_loss']:.4f} eval {row['eval_loss']:.4f} in {row['wall_time_s']:.1f}s")
  return rows


def _csv_list(s: str) -> List[str]:
  return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(description="Scaling sweep over attention architectures (see module docstring).")
  p.add_argument("--out", default="results/sweep.csv", help="CSV to append to (created if absent)")
  p.add_argument("--archs", default="softmax,lightning,hybrid", help=f"comma list of {ARCHS}")
  p.add_argument("--sizes", default="s1,s2,s3,s4", help=f"comma list of {', '.join(SIZES)}")
  p.add_argument("--tokens", default="2e5,5e5,1e6", help="comma list of training token budgets D")
  p.add_argument("--ffn", default="dense", choices=("dense", "moe"))
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--learning_rate", type=float, default=3e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--run_root", default="runs/sweep", help="checkpoints of each grid point go under here")
  p.add_argument("--dry_run", action="store_true", help="print the grid (N, D, C) without training")
  args = p.parse_args(argv)
  try:
    archs, sizes = _csv_list(args.archs), _csv_list(args.sizes)
    for a in archs:
      layer_types(a, 1)
    for s in sizes:
      small_model_config("softmax", s)
    token_budgets = [float(t) for t in _csv_list(args.tokens)]
    if not token_budgets or min(token_budgets) <= 0:
      raise ValueError(f"--tokens must be a comma list of positive numbers, got {args.tokens!r}")
    for flag in ("batch_size", "seq_len", "learning_rate"):
      if getattr(args, flag) <= 0:
        raise ValueError(f"--{flag} must be positive, got {getattr(args, flag)}")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  points = grid(archs, sizes, token_budgets, args.ffn)
  try:
    run_sweep(points, pathlib.Path(args.out), batch_size=args.batch_size, seq_len=args.seq_len,
              learning_rate=args.learning_rate, seed=args.seed, run_root=pathlib.Path(args.run_root),
              dry_run=args.dry_run)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
