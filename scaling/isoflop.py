"""The IsoFLOP study: softmax vs lightning vs hybrid (7:1) at fixed training compute, resumable and partitionable.

    python -m recipes.sweep --plan isoflop --corpus /tmp/pycorpus --dry_run            # the table and its cost
    python -m recipes.sweep --plan isoflop --corpus /tmp/pycorpus --budgets 1e15,3e15 \
        --time_budget_s 1400 --out results/isoflop.csv                                  # one device call

The plan, in a fixed order:

1. Learning-rate check on the smallest budget (`BUDGETS[0]`): per kind, its smallest, middle and largest
   width (`lr_check_sizes`) at each rate of `LR_GRID`, and past the grid's edge where the best rate sits on
   it (`lr_check_rates`: doubling or halving up to `LR_EXTEND` times); that budget's other sizes then run at
   the rate of the nearest checked width.
2. Per budget (ascending), per kind: `sizes_per_budget` presets `isoflop_{kind}_{size}` (mx01/presets.py)
   around a first guess of the optimum (20 tokens per parameter), at the rate the check found best for that
   kind and the nearest checked width (the base rate until the check is complete, with a note). Where a
   kind's lowest loss at a budget sits at an end of these sizes, the next size past that end follows
   (`edge_sizes`, up to `SIZE_EXTEND` each way; below i64 from the sizes kept for this), so every profile's
   minimum is bracketed.
3. Once a (kind, budget) profile is complete in the CSV, a second seed at its lowest-loss size
   (`extra_seed_points`) and, with `seed_neighbours`, its neighbours.

Tokens per run follow from the budget through `scaling.flops.training_flops_per_token` (our causal count);
the CSV also records the paper's Table-1 count (`flops.paper_training_flops`).  Every point is keyed by a
hash of every config value that changes its result (`point_key`: model, optimiser, steps, batch, context,
seed, data and the corpus fingerprint; not run_dir, logging or checkpoint cadence), so a point already in the
CSV is skipped, and a run cut off mid-training resumes from its last checkpoint under run_root.  Before each
point the runner checks that its estimated time fits in what is left of `--time_budget_s`; if not, it runs
the first later point that fits and whose config is final, and stops cleanly when none does.  The estimate
is FLOPs / (790 TFLOP/s x MFU) + a fixed overhead per run (compilation, evaluation, checkpoints) + a fixed
cost per step; once the CSV has measured runs, a fit of their wall times replaces the assumptions.

Held-out loss: the corpus (scaling/corpus.py) names its files so that the data pipeline's own split
(`mx01.data.sources.split_indices` at the manifest's eval_fraction) holds out exactly its held-out packages;
each run evaluates on at least `EVAL_TOKENS` held-out tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mx01 import presets
from mx01.config import Config
from scaling import data as scaling_data
from scaling import flops

BUDGETS = (1e15, 3e15, 1e16, 3e16)  # FLOPs (our causal count); the first is the learning-rate check's
DEFAULT_BUDGETS = BUDGETS[:3]
SEQ_LEN = 2048
SIZES_PER_BUDGET = 5
BASE_LR = 3e-3
LR_GRID = (1.5e-3, 3e-3, 6e-3)
# Where a width's best checked rate sits at an edge of the grid, the check goes on past it, doubling (or
# halving) at most this many times, so the chosen rate is bracketed rather than clipped by the grid.
LR_EXTEND = 2
# The budgets' grids take their sizes from i64 up; the smaller ISOFLOP_SIZES serve only the extension past a
# grid's end: where a kind's lowest held-out loss at a budget sits at an end of its sizes, the next size
# beyond that end is added, at most SIZE_EXTEND times each way (`edge_sizes`), so the minimum is bracketed.
GRID_SIZES = tuple(list(presets.ISOFLOP_SIZES)[list(presets.ISOFLOP_SIZES).index("i64"):])
SIZE_EXTEND = 2
TOKENS_PER_PARAM_GUESS = 20.0  # centres each budget's sizes; the fits find the real optimum
EVAL_TOKENS = 1_000_000
H200_PEAK_FLOPS = 790e12  # bf16 dense, the figure the plan's estimates assume
ASSUMED_MFU = 0.3
ASSUMED_OVERHEAD_S = 20.0  # compile + held-out evaluation + checkpoints per run, until measured
# Fixed cost of one step of an 8-layer width-64 model (launches, optimizer, data), until measured: 32-37 ms
# with three runs sharing one H200 (results/isoflop.csv, the first runs; 65,536 tokens a step).
ASSUMED_STEP_S = 0.035

CSV_COLUMNS = ("key", "kind", "size", "budget", "phase", "learning_rate", "seed", "n_params", "n_params_paper",
               "n_params_total", "num_layers", "hidden_size", "tokens", "steps", "batch_size", "seq_len",
               "compute", "compute_paper", "flops_per_token", "final_loss", "eval_loss", "eval_tokens",
               "wall_time_s", "tokens_per_sec", "mfu", "epochs", "corpus", "run_dir")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Where a run's documents come from: a built corpus (scaling/corpus.py) or the embedded stdlib."""

  source: str = "embedded"
  eval_fraction: float = 0.02
  fingerprint: str = "embedded"
  train_bytes: Optional[int] = None  # byte tokens of the training split (None: not known)

  @classmethod
  def from_dir(cls, path) -> "Corpus":
    from scaling import corpus as corpus_lib
    manifest = corpus_lib.load_manifest(path)
    return cls(source=str(pathlib.Path(path) / manifest["docs_dir"]), eval_fraction=manifest["eval_fraction"],
               fingerprint=manifest["fingerprint"], train_bytes=manifest["bytes"]["train"])


@dataclasses.dataclass(frozen=True)
class Point:
  """One training run of the plan.  phase ("lr" | "grid" | "seed") says why it is planned, not what it is."""

  kind: str
  size: str
  budget: float
  learning_rate: float
  seed: int = 0
  phase: str = "grid"

  @property
  def name(self) -> str:
    return f"{self.kind}_{self.size}_C{self.budget:.0e}_lr{self.learning_rate:g}_s{self.seed}".replace("+", "")


def batch_size_for(budget: float) -> int:
  """Sequences of 2048 per step: 32 up to 5e15 FLOPs, 64 up to 2e16, 128 above.

  Grows with the budget so runs stay at a few hundred to ~3,000 steps: at these sizes a step costs about as
  much in fixed overhead as in FLOPs, and 65k-262k tokens per step stay small next to each run's 10-650M.
  """
  return 32 if budget <= 5e15 else 64 if budget <= 2e16 else 128


def model_config(kind: str, size: str):
  return presets.get_preset(presets.isoflop_name(kind, size)).model


def sizes_for_budget(budget: float, n: int = SIZES_PER_BUDGET, seq_len: int = SEQ_LEN) -> List[str]:
  """`n` consecutive sizes of `GRID_SIZES` centred on the one nearest 20 tokens per parameter.

  Judged on the hybrid model, so every kind gets the same sizes at a budget (profiles compare size for size).
  """
  names = list(GRID_SIZES)
  if not 1 <= n <= len(names):
    raise ValueError(f"sizes per budget must be in [1, {len(names)}], got {n}")

  def tokens_per_param(size):
    model = model_config("hybrid", size)
    return budget / flops.training_flops_per_token(model, seq_len) / flops.param_count(model).non_embedding

  centre = min(range(len(names)), key=lambda i: abs(math.log(tokens_per_param(names[i]) / TOKENS_PER_PARAM_GUESS)))
  start = min(max(0, centre - n // 2), len(names) - n)
  return names[start:start + n]


def run_config(point: Point, corpus: Corpus = Corpus(), *, run_root="runs/isoflop", seq_len: int = SEQ_LEN,
               batch_size: Optional[int] = None, eval_tokens: int = EVAL_TOKENS) -> Config:
  """The full training Config of a point: steps = round(budget / (FLOPs per token x tokens per step))."""
  base = presets.get_preset(presets.isoflop_name(point.kind, point.size))
  batch = batch_size_for(point.budget) if batch_size is None else batch_size
  per_step = flops.training_flops_per_token(base.model, seq_len) * batch * seq_len
  steps = max(1, round(point.budget / per_step))
  train = dataclasses.replace(
      base.train, steps=steps, batch_size=batch, learning_rate=point.learning_rate, lr_schedule="cosine",
      warmup_steps=max(1, min(steps // 20, 200)), seed=point.seed, log_every=max(1, steps // 20),
      eval_every=steps, eval_batches=max(1, math.ceil(eval_tokens / (batch * seq_len))),
      checkpoint_every=max(1, steps // 4), keep_checkpoints=1, run_dir=str(pathlib.Path(run_root) / point.name),
      tensorboard=False)
  data = dataclasses.replace(base.data, source=corpus.source, eval_fraction=corpus.eval_fraction, seq_len=seq_len,
                             shuffle_seed=point.seed)
  return dataclasses.replace(base, train=train, data=data)


# Config values that change no result: where a run writes and logs, the lightning kernels' launch settings
# (tiles, warps, pipeline stages: the same sums in another order; a retuned default must not orphan the CSV),
# and the size of cuDNN's ragged layout (buffers only).  A new config field that changes no result goes here
# too, or every row of results/isoflop.csv looks new (tests/scaling/test_isoflop.py checks the committed rows).
_NOT_IN_KEY = {"train": ("run_dir", "log_every", "checkpoint_every", "keep_checkpoints", "async_checkpointing",
                         "tensorboard"), "data": ("prefetch", "source"),
               "model": ("lightning_kernel", "cudnn_max_segments")}


def point_key(config: Config, corpus: Corpus) -> str:
  """A hash of every config value that changes the run's result, plus the corpus fingerprint."""
  d = dataclasses.asdict(config)
  for section, names in _NOT_IN_KEY.items():
    for name in names:
      d[section].pop(name, None)
  d["corpus"] = corpus.fingerprint
  return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the plan ------------------------------------------------------------------------


def _float(row, name) -> Optional[float]:
  try:
    v = float(row.get(name) or "nan")
  except ValueError:
    return None
  return v if math.isfinite(v) else None


def _budget_rows(rows, kind, budget, seed=None):
  return [r for r in rows if r["kind"] == kind and math.isclose(float(r["budget"]), budget, rel_tol=1e-6)
          and (seed is None or int(r["seed"]) == seed)]


def lr_check_sizes(sizes: Sequence[str]) -> List[str]:
  """The widths the learning-rate check runs: the smallest, middle and largest of a budget's sizes."""
  return list(dict.fromkeys([sizes[0], sizes[len(sizes) // 2], sizes[-1]]))


def lr_check_rates(rows: Sequence[dict], kind: str, size: str, lr_grid: Sequence[float] = LR_GRID,
                   extend: int = LR_EXTEND) -> Tuple[List[float], Optional[float]]:
  """(the rates the check runs at this kind and width, the best of them or None while some are not measured).

  The rates are `lr_grid`, extended while the best measured rate is the highest (or lowest) so far: twice
  the highest (half the lowest) is added, up to `extend` times each way (a grid of one rate is not extended).
  A run without a finite held-out loss (diverged) counts as measured and worst.
  """
  measured = {}  # rate -> held-out loss (inf: diverged)
  for r in _budget_rows(rows, kind, BUDGETS[0], seed=0):
    if r["size"] == size:
      loss = _float(r, "eval_loss")
      measured[float(r["learning_rate"])] = math.inf if loss is None else loss

  def loss_at(lr):
    return next((v for x, v in measured.items() if math.isclose(x, lr)), None)

  rates, up, down = sorted(lr_grid), 0, 0
  while True:
    losses = [loss_at(lr) for lr in rates]
    if any(v is None for v in losses):
      return rates, None
    i = min(range(len(rates)), key=losses.__getitem__)
    if len(lr_grid) == 1:  # one rate: no check to extend
      return rates, rates[0]
    if i == len(rates) - 1 and up < extend:
      rates, up = rates + [rates[-1] * 2], up + 1
    elif i == 0 and down < extend:
      rates, down = [rates[0] / 2] + rates, down + 1
    else:
      return rates, rates[i]


def chosen_learning_rates(rows: Sequence[dict], kinds: Sequence[str], lr_grid: Sequence[float] = LR_GRID,
                          sizes_per_budget: int = SIZES_PER_BUDGET, seq_len: int = SEQ_LEN) -> Dict[tuple, float]:
  """{(kind, size): learning rate} from the check on BUDGETS[0]: the lowest held-out loss per kind and width.

  Sizes not checked take the rate of the nearest checked width (in log hidden size).  A kind whose check is
  not complete (some width still has rates to run, `lr_check_rates`) gets no entry.
  """
  out = {}
  check_sizes = lr_check_sizes(sizes_for_budget(BUDGETS[0], sizes_per_budget, seq_len))
  for kind in kinds:
    best = {}
    for size in check_sizes:
      _, best_rate = lr_check_rates(rows, kind, size, lr_grid)
      if best_rate is None:
        break
      best[size] = best_rate
    else:
      for size in presets.ISOFLOP_SIZES:
        width = presets.ISOFLOP_SIZES[size][0]
        near = min(best, key=lambda s: abs(math.log(presets.ISOFLOP_SIZES[s][0] / width)))
        out[(kind, size)] = best[near]
  return out


def profile(rows: Sequence[dict], kind: str, budget: float, sizes: Sequence[str]) -> Tuple[List[str], Dict[str, tuple]]:
  """The (kind, budget) profile so far: (its sizes in order, the budget's grid `sizes` and any size measured
  beyond either end; {size: (lowest seed-0 held-out loss, its rate)} of the sizes measured, a diverged run
  counting as infinite loss)."""
  by_size = {}
  for r in _budget_rows(rows, kind, budget, seed=0):
    loss = _float(r, "eval_loss")
    loss = math.inf if loss is None else loss
    by_size[r["size"]] = min(by_size.get(r["size"], (math.inf, math.inf)), (loss, float(r["learning_rate"])))
  order = list(presets.ISOFLOP_SIZES)
  lo, hi = order.index(sizes[0]), order.index(sizes[-1])
  while lo > 0 and order[lo - 1] in by_size:
    lo -= 1
  while hi < len(order) - 1 and order[hi + 1] in by_size:
    hi += 1
  return order[lo:hi + 1], by_size


def edge_sizes(rows: Sequence[dict], kind: str, budget: float, sizes: Sequence[str],
               extend: int = SIZE_EXTEND) -> List[str]:
  """The size to add next to the (kind, budget) profile: once every size of it is measured, the one past the end
  where its lowest loss sits, while fewer than `extend` sizes were added at that end ([] otherwise)."""
  prof, by_size = profile(rows, kind, budget, sizes)
  if not all(s in by_size for s in prof):
    return []
  order = list(presets.ISOFLOP_SIZES)
  best = order.index(min(prof, key=lambda s: by_size[s][0]))
  if best == order.index(prof[0]) and best > 0 and order.index(sizes[0]) - best < extend:
    return [order[best - 1]]
  if best == order.index(prof[-1]) and best < len(order) - 1 and best - order.index(sizes[-1]) < extend:
    return [order[best + 1]]
  return []


def extra_seed_points(rows: Sequence[dict], kinds: Sequence[str], budgets: Sequence[float], *, seed: int = 1,
                      neighbours: int = 0, lr_grid: Sequence[float] = LR_GRID,
                      sizes_per_budget: int = SIZES_PER_BUDGET, seq_len: int = SEQ_LEN) -> List[Point]:
  """Second-seed points near each (kind, budget) optimum, for profiles complete in `rows` (seed 0).

  The optimum is the seed-0 size with the lowest held-out loss (on the smallest budget, each size at its best
  checked rate); the second seed reruns it at that rate.  `neighbours` sizes either side are added too.
  """
  checked = chosen_learning_rates(rows, kinds, lr_grid, sizes_per_budget, seq_len)
  out = []
  for budget in budgets:
    sizes = sizes_for_budget(budget, sizes_per_budget, seq_len)
    for kind in kinds:
      if math.isclose(budget, BUDGETS[0]) and (kind, sizes[0]) not in checked:
        continue  # the smallest budget's profile is complete only with every checked rate
      prof, by_size = profile(rows, kind, budget, sizes)
      if not all(s in by_size for s in prof) or edge_sizes(rows, kind, budget, sizes):
        continue  # the profile is not complete yet, or its minimum is still at an end being extended
      i = min(range(len(prof)), key=lambda j: by_size[prof[j]][0])
      for j in range(max(0, i - neighbours), min(len(prof), i + neighbours + 1)):
        out.append(Point(kind, prof[j], budget, by_size[prof[j]][1], seed, "seed"))
  return out


def plan(budgets: Sequence[float], kinds: Sequence[str], rows: Sequence[dict] = (), *,
         lr_grid: Sequence[float] = LR_GRID, sizes_per_budget: int = SIZES_PER_BUDGET, seed_neighbours: int = 0,
         second_seeds: bool = True, seq_len: int = SEQ_LEN, notes: Optional[List[str]] = None) -> List[Point]:
  """Every point of the plan for `budgets`, in run order, given the rows already measured."""
  budgets = sorted(budgets)
  lrs = chosen_learning_rates(rows, kinds, lr_grid, sizes_per_budget, seq_len)
  points = []
  for budget in budgets:
    sizes = sizes_for_budget(budget, sizes_per_budget, seq_len)
    for kind in kinds:
      checked = []
      if math.isclose(budget, BUDGETS[0]):
        checked = lr_check_sizes(sizes)
        for s in checked:
          points += [Point(kind, s, budget, lr, 0, "lr") for lr in lr_check_rates(rows, kind, s, lr_grid)[0]]
      for s in (s for s in sizes if s not in checked):
        lr = lrs.get((kind, s))
        if lr is None:
          lr = BASE_LR
          if notes is not None and f"lr:{kind}" not in notes:
            notes.append(f"lr:{kind}")
        points.append(Point(kind, s, budget, lr, 0, "grid"))
      # Past an end of the grid where the kind's minimum sits there (once its rates are chosen).
      prof, _ = profile(rows, kind, budget, sizes)
      for s in [s for s in prof if s not in sizes] + edge_sizes(rows, kind, budget, sizes):
        if (kind, s) in lrs:
          points.append(Point(kind, s, budget, lrs[(kind, s)], 0, "grid"))
  if second_seeds:
    points += extra_seed_points(rows, kinds, budgets, neighbours=seed_neighbours, lr_grid=lr_grid,
                                sizes_per_budget=sizes_per_budget, seq_len=seq_len)
  return points


# ---- cost ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Seconds of one run = compute / flops_per_s + steps * step_s + overhead_s."""

  flops_per_s: float = H200_PEAK_FLOPS * ASSUMED_MFU
  step_s: float = ASSUMED_STEP_S
  overhead_s: float = ASSUMED_OVERHEAD_S
  measured: bool = False

  def seconds(self, compute: float, steps: int) -> float:
    return compute / self.flops_per_s + steps * self.step_s + self.overhead_s

  @classmethod
  def from_rows(cls, rows: Sequence[dict]) -> "CostModel":
    """Non-negative least squares of wall time on (compute, steps, 1) over >= 6 measured rows, else assumed."""
    pts = [(float(r["compute"]), float(r["steps"]), _float(r, "wall_time_s")) for r in rows
           if _float(r, "wall_time_s")]
    if len(pts) < 6:
      return cls()
    import numpy as np
    from scipy import optimize
    c, steps, wall = np.array(pts).T
    # Columns in PFLOP and thousands of steps for conditioning: seconds per PFLOP, per 1000 steps, per run.
    coef, _ = optimize.nnls(np.column_stack([c / 1e15, steps / 1e3, np.ones_like(c)]), wall)
    per_pflop, per_kstep, overhead = coef
    if not per_pflop > 0:
      return cls()
    return cls(flops_per_s=1e15 / per_pflop, step_s=per_kstep / 1e3, overhead_s=float(overhead), measured=True)


# ---- running ------------------------------------------------------------------------


def read_rows(path) -> List[dict]:
  """The CSV's rows ([] when it does not exist yet)."""
  return scaling_data.read_csv_rows(path)


def describe(point: Point, cfg: Config) -> dict:
  """The plan-table entry of a point: sizes, tokens and FLOPs under both conventions."""
  seq_len, tokens = cfg.data.seq_len, cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
  pc = flops.param_count(cfg.model)
  return dict(kind=point.kind, size=point.size, budget=point.budget, phase=point.phase,
              learning_rate=point.learning_rate, seed=point.seed, n_params=pc.non_embedding,
              n_params_paper=flops.paper_param_count(cfg.model), n_params_total=pc.total,
              num_layers=cfg.model.num_layers, hidden_size=cfg.model.hidden_size, tokens=tokens,
              steps=cfg.train.steps, batch_size=cfg.train.batch_size, seq_len=seq_len,
              compute=flops.training_flops(cfg.model, seq_len, tokens),
              compute_paper=flops.paper_training_flops(cfg.model, seq_len, tokens),
              flops_per_token=flops.training_flops_per_token(cfg.model, seq_len))


def format_table(entries: Sequence[dict], cost: CostModel) -> str:
  head = (f"{'kind':9s} {'size':5s} {'budget':>7s} {'phase':5s} {'lr':>7s} {'seed':>4s} {'params':>11s} {'layers':>6s} "
          f"{'tokens':>12s} {'steps':>6s} {'C causal':>9s} {'C paper':>9s} {'est s':>7s}")
  lines = [head]
  total = 0.0
  for e in entries:
    est = cost.seconds(e["compute"], e["steps"])
    total += est
    status = "  (done)" if e.get("done") else ""
    lines.append(f"{e['kind']:9s} {e['size']:5s} {e['budget']:7.0e} {e['phase']:5s} {e['learning_rate']:7.2g} "
                 f"{e['seed']:4d} {e['n_params']:11,d} {e['num_layers']:6d} {e['tokens']:12,d} {e['steps']:6d} "
                 f"{e['compute']:9.3g} {e['compute_paper']:9.3g} {est:7.0f}{status}")
  pending = sum(cost.seconds(e["compute"], e["steps"]) for e in entries if not e.get("done"))
  basis = ("measured from the CSV" if cost.measured else
           f"assumed: {H200_PEAK_FLOPS / 1e12:.0f} TFLOP/s x MFU {ASSUMED_MFU}")
  lines.append(f"{len(entries)} points, est. {total / 60:.1f} GPU-min in all, {pending / 60:.1f} GPU-min not yet run "
               f"({cost.flops_per_s / 1e12:.0f} TFLOP/s effective + {cost.step_s * 1e3:.0f} ms per step + "
               f"{cost.overhead_s:.0f} s per run, {basis})")
  return "\n".join(lines)


def run_plan(budgets: Sequence[float], kinds: Sequence[str], out, *, corpus: Corpus = Corpus(),
             run_root="runs/isoflop", time_budget_s: float = math.inf, lr_grid: Sequence[float] = LR_GRID,
             sizes_per_budget: int = SIZES_PER_BUDGET, seed_neighbours: int = 0, second_seeds: bool = True,
             seq_len: int = SEQ_LEN, batch_size: Optional[int] = None, eval_tokens: int = EVAL_TOKENS, dry_run: bool = False,
             train_fn: Optional[Callable] = None,
             log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic) -> List[dict]:
  """Runs the plan's points not yet in `out`, in order, until done or none left would fit the time budget.

  When the next point would overrun the budget, a later one that fits runs instead if its config is final
  (not a grid point still at the base rate), so the end of a device call is not left idle.

  The plan is rebuilt after every run, so learning rates chosen by the check and second-seed points appear
  as soon as their inputs are in the CSV.  Returns the rows added (dry_run: prints the table, adds none).
  train_fn(config, resume=True, log=...) -> summary (default recipes.pretrain.train).
  """
  out = pathlib.Path(out)
  kw = dict(lr_grid=lr_grid, sizes_per_budget=sizes_per_budget, seed_neighbours=seed_neighbours,
            second_seeds=second_seeds, seq_len=seq_len)

  def configs(rows, notes=None):
    for p in plan(budgets, kinds, rows, notes=notes, **kw):
      cfg = run_config(p, corpus, run_root=run_root, seq_len=seq_len, batch_size=batch_size, eval_tokens=eval_tokens)
      yield p, cfg, point_key(cfg, corpus)

  rows = read_rows(out)
  if dry_run:
    done = {r["key"] for r in rows}
    notes: List[str] = []
    entries = [dict(describe(p, cfg), done=key in done) for p, cfg, key in configs(rows, notes)]
    log(format_table(entries, CostModel.from_rows(rows)))
    for n in notes:
      log(f"note: {n[3:]} runs at the base rate {BASE_LR:g} until the learning-rate check at {BUDGETS[0]:.0e} "
          "is in the CSV; the plan then changes (run that budget first)")
    log("note: second-seed points (one per kind and budget) appear once each profile is in the CSV")
    if corpus.train_bytes and entries:
      most = max(e["tokens"] for e in entries)
      log(f"note: the longest run reads {most / corpus.train_bytes:.2f} epochs of the corpus's "
          f"{corpus.train_bytes / 1e6:.0f} MB training split (byte tokens)")
    return []
  if train_fn is None:
    from recipes.pretrain import train as train_fn  # lazily: the plan and --dry_run need no training stack
  start, added, failed = clock(), [], set()
  while True:
    done = {r["key"] for r in rows}
    pending = [(p, cfg, key) for p, cfg, key in configs(rows) if key not in done and key not in failed]
    if not pending:
      log(f"plan complete for budgets {', '.join(f'{b:.0e}' for b in sorted(budgets))}")
      break
    cost, elapsed = CostModel.from_rows(rows), clock() - start
    estimate = lambda p, cfg: cost.seconds(**{k: describe(p, cfg)[k] for k in ("compute", "steps")})
    point, cfg, key = pending[0]
    est = estimate(point, cfg)
    if elapsed + est > time_budget_s:
      # Fill the time left with a later point that fits, if its config is final: any but a grid point still
      # at the base rate while the learning-rate check is incomplete (its key changes once the check ends).
      chosen = chosen_learning_rates(rows, kinds, lr_grid, sizes_per_budget, seq_len)
      fits = [(p, c, k) for p, c, k in pending[1:] if (p.phase != "grid" or (p.kind, p.size) in chosen)
              and elapsed + estimate(p, c) <= time_budget_s]
      if not fits:
        log(f"stopping: next point {point.name} needs ~{est:.0f} s, {time_budget_s - elapsed:.0f} s of the time "
            f"budget left; {len(pending)} point(s) pending")
        break
      point, cfg, key = fits[0]
      est = estimate(point, cfg)
      log(f"filling the {time_budget_s - elapsed:.0f} s left with {point.name} (~{est:.0f} s); the next point in "
          f"order, {pending[0][0].name}, needs more")
    entry = describe(point, cfg)
    log(f"[{len(added) + 1}] {point.name}: N={entry['n_params']:,} D={entry['tokens']:,} C={entry['compute']:.3g} "
        f"({cfg.train.steps} steps, est. {est:.0f} s)")
    t0 = clock()
    try:
      summary = train_fn(cfg, resume=True, log=lambda s: None)
    except Exception as e:  # one failed point must not end the call; it is retried by the next call
      log(f"    failed: {type(e).__name__}: {e}")
      failed.add(key)
      continue
    row = dict(entry, key=key, final_loss=summary.get("final_train_loss"), eval_loss=summary.get("eval_loss"),
               eval_tokens=cfg.train.eval_batches * cfg.train.batch_size * seq_len,
               wall_time_s=round(clock() - t0, 2), tokens_per_sec=summary.get("tokens_per_sec"),
               mfu=summary.get("mfu"), corpus=corpus.fingerprint, run_dir=cfg.train.run_dir,
               epochs=round(entry["tokens"] / corpus.train_bytes, 3) if corpus.train_bytes else None)
    scaling_data.append_csv_row(out, row, CSV_COLUMNS)
    rows.append({k: "" if row.get(k) is None else str(row.get(k)) for k in CSV_COLUMNS})
    added.append(row)
    log(f"    eval loss {row['eval_loss']} in {row['wall_time_s']:.0f} s")
  log(f"added {len(added)} row(s) to {out}" + (f"; {len(failed)} point(s) failed" if failed else "") + ":")
  for r in added:
    log(f"  {r['kind']:9s} {r['size']:5s} C={r['budget']:.0e} lr={r['learning_rate']:g} seed={r['seed']} "
        f"eval={r['eval_loss']}")
  return added


def _floats(s: str, what: str) -> List[float]:
  try:
    xs = [float(x) for x in s.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{what}: expected a comma list of numbers, got {s!r}") from None
  if not xs or min(xs) <= 0:
    raise ValueError(f"{what}: expected positive numbers, got {s!r}")
  return xs


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m recipes.sweep --plan isoflop",
                              description="IsoFLOP sweep of softmax / lightning / hybrid (scaling/isoflop.py).")
  p.add_argument("--plan", default="isoflop", choices=("isoflop",))
  p.add_argument("--budgets", default=",".join(f"{b:.0e}" for b in DEFAULT_BUDGETS),
                 help=f"comma list of FLOP budgets (causal count); the plan's are {', '.join(f'{b:.0e}' for b in BUDGETS)}")
  p.add_argument("--kinds", default=",".join(presets.KINDS))
  p.add_argument("--corpus", default=None, help="a corpus folder built by `python -m scaling.corpus` "
                 "(default: the embedded standard library, for smoke tests only)")
  p.add_argument("--out", default="results/isoflop.csv")
  p.add_argument("--run_root", default="runs/isoflop")
  p.add_argument("--time_budget_s", type=float, default=math.inf, help="stop before a point that would overrun")
  p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LR_GRID), help="the learning-rate check's rates")
  p.add_argument("--sizes_per_budget", type=int, default=SIZES_PER_BUDGET)
  p.add_argument("--seed_neighbours", type=int, default=0, help="second seeds also this many sizes either side")
  p.add_argument("--seq_len", type=int, default=SEQ_LEN, help="context (the study uses 2048)")
  p.add_argument("--dry_run", action="store_true", help="print the plan table and its estimated GPU time")
  args = p.parse_args(argv)
  try:
    budgets = _floats(args.budgets, "--budgets")
    lrs = _floats(args.lrs, "--lrs")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in kinds:
      presets.layer_types(k, 1)
    if args.seq_len <= 0:
      raise ValueError(f"--seq_len must be positive, got {args.seq_len}")
    sizes_for_budget(budgets[0], args.sizes_per_budget, args.seq_len)
    corpus = Corpus.from_dir(args.corpus) if args.corpus else Corpus()
  except (ValueError, FileNotFoundError) as e:  # ConfigError included
    print(f"error: {e}", file=sys.stderr)
    return 2
  run_plan(budgets, kinds, args.out, corpus=corpus, run_root=args.run_root, time_budget_s=args.time_budget_s,
           lr_grid=lrs, sizes_per_budget=args.sizes_per_budget, seed_neighbours=args.seed_neighbours,
           seq_len=args.seq_len, dry_run=args.dry_run)
  return 0


if __name__ == "__main__":
  sys.exit(main())
