"""Associative recall (MQAR) study: softmax vs lightning vs hybrid, by context length and model size.

    python -m recipes.retrieval --kinds hybrid --sizes xs --seed 1 --out run.csv    # one slice of the study (GPU)
    python -m recipes.retrieval --merge run*.csv --out results/retrieval.csv --overwrite  # merge, plot, summary
    python -m recipes.retrieval --cpu-smoke                # minutes on CPU; writes runs/retrieval/retrieval.csv

The task (multi-query associative recall, as in Zoology): a sequence starts
with `num_pairs` key-value pairs, then a query region of filler tokens in
which every key appears once more, in random order and at random places,
followed by its value.  The loss and the accuracy count only the answer
tokens (predicting the value after a queried key); everything else is
unsupervised.  Keys are distinct within a sequence; values are drawn with
replacement.  Vocabulary: 0 = filler, keys in [1, vocab/2), values in
[vocab/2, vocab).

The default study holds the number of pairs fixed (`--num-pairs 8`) and
grows the context around them, so a longer context means the same facts
spread over more filler: softmax attention can look them up at any distance,
a lightning layer must keep them in its decaying fixed-size state.
(`--pairs-per-token` instead scales the pairs with the length.)

For every (kind, size, context length) a fresh model is trained for `--steps`
steps (AdamW; warmup + cosine or a constant rate, `--lr-schedule`) on freshly generated batches and evaluated on
held-out batches; a progress line every `--log-every` steps shows the answer
loss and accuracy.  Writes one CSV row per run and a plot (accuracy vs context
length, one panel per size) next to the CSV (default runs/retrieval/retrieval.csv; an existing
CSV or plot is replaced only with `--overwrite`, so the recorded results/ stay as they are).  Bad
flags (an unknown kind or size, a length that is not a positive integer, more pairs than fit a
length) are one-line errors, exit code 2, before anything trains.  The defaults are the recorded study's
settings (BENCHMARKS.md, "Retrieval study"); it ran several learning rates and seeds
per point, because whether a tiny model learns the lookup within the budget is a
sudden, seed-dependent transition (`summarize` counts the runs that did).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mx01 import config as config_lib
from mx01 import model as model_lib
from mx01 import presets
from mx01 import training
from mx01.config import ModelConfig
from recipes import flags as flags_lib

FILLER = 0

# The study's models are presets (mx01/presets.py): retrieval_{kind}_{size}.
SIZES = presets.RETRIEVAL_SIZES
KINDS = presets.KINDS


# ---- the task ------------------------------------------------------------------------

def mqar_batch(rng: np.random.Generator, batch_size: int, seq_len: int, num_pairs: int,
               vocab_size: int = 1024) -> dict:
  """A batch of MQAR sequences.

  Returns {"tokens": [batch, seq_len + 1] int32 (the model reads tokens[:, :-1]
  and predicts tokens[:, 1:]), "loss_mask": [batch, seq_len] bool, True where
  the target tokens[:, t + 1] is an answer (the value after a queried key)}.
  Needs 4 * num_pairs <= seq_len + 1 and num_pairs < vocab_size / 2.
  """
  half = vocab_size // 2
  total = seq_len + 1
  if 4 * num_pairs > total:
    raise ValueError(f"num_pairs={num_pairs} needs 4 * num_pairs <= seq_len + 1 = {total}")
  if num_pairs > half - 1:
    raise ValueError(f"num_pairs={num_pairs} needs at least num_pairs + 1 keys; vocab_size={vocab_size} gives {half - 1}")
  slots = (total - 2 * num_pairs) // 2  # two-token query slots after the key-value pairs
  rows = np.arange(batch_size)[:, None]
  # Vectorised over the batch: distinct keys and query slots from the first columns of random permutations.
  keys = np.argsort(rng.random((batch_size, half - 1)), axis=1)[:, :num_pairs] + 1  # [B, P] in [1, half)
  values = rng.integers(half, vocab_size, size=(batch_size, num_pairs))
  order = np.argsort(rng.random((batch_size, num_pairs)), axis=1)  # the order keys are queried in
  where = np.sort(np.argsort(rng.random((batch_size, slots)), axis=1)[:, :num_pairs], axis=1)
  key_pos = 2 * num_pairs + 2 * where  # [B, P]
  tokens = np.full((batch_size, total), FILLER, np.int32)
  tokens[:, 0:2 * num_pairs:2] = keys
  tokens[:, 1:2 * num_pairs:2] = values
  tokens[rows, key_pos] = keys[rows, order]
  tokens[rows, key_pos + 1] = values[rows, order]
  mask = np.zeros((batch_size, seq_len), bool)
  mask[rows, key_pos] = True  # input position of the queried key; its target is the value
  return {"tokens": tokens, "loss_mask": mask}


def elimination_baseline(num_pairs: int) -> float:
  """Answer accuracy of recalling nothing but which values are present and not yet answered.

  A model that has not learned the key -> value lookup can still pick, at the
  j-th query, uniformly among the num_pairs - j + 1 values of pairs that have
  not been queried yet: mean over queries of 1/(remaining) = H_P / P (0.34 for
  8 pairs).  Accuracy at this level means no associative recall.
  """
  return float(sum(1.0 / k for k in range(1, num_pairs + 1)) / num_pairs)


def num_pairs_for(seq_len: int, pairs_per_token: Optional[float], vocab_size: int, num_pairs: int = 8) -> int:
  """Pairs per sequence: `num_pairs`, or seq_len * pairs_per_token when that is given; capped by what fits."""
  want = num_pairs if pairs_per_token is None else int(seq_len * pairs_per_token)
  return int(max(1, min(want, (seq_len + 1) // 4, vocab_size // 2 - 1)))


# ---- models and training -----------------------------------------------------------------

def model_config(kind: str, size: str, *, vocab_size: int, seq_len: int, compute_dtype: str = "float32",
                 init_std: Optional[float] = None, overrides: Sequence[str] = ()) -> ModelConfig:
  """The preset retrieval_{kind}_{size} at this vocabulary and context length.

  init_std: the weights' initial standard deviation; None = 1/sqrt(hidden) (see `default_init_std`).
  overrides: ["num_layers=4", ...], applied last.
  """
  model = presets.get_preset(presets.retrieval_name(kind, size)).model
  model = dataclasses.replace(model, vocab_size=vocab_size, block_size=min(model.block_size, seq_len),
                              max_seq_len=max(seq_len, 8), compute_dtype=compute_dtype,
                              initializer_range=default_init_std(model.hidden_size) if init_std is None else init_std)
  return config_lib.apply_overrides(model, overrides)


def default_init_std(hidden: int) -> float:
  """1/sqrt(hidden): 0.125 for the xs models, 0.088 for s.

  The presets' 0.02 (right for hidden in the thousands) leaves these tiny models with near-uniform
  attention and an AdamW step that is large next to the weights; they then sit on the no-recall line
  (`elimination_baseline`) for thousands of steps.  Measured on the CPU, softmax xs, 4 pairs, 32 tokens,
  constant LR: std 0.02 ended at 0.53 accuracy after 2,500 steps (LR 1e-3) and 0.19 after 3,000 (LR 3e-3);
  std 0.125 reached 0.875 at step 1,000 and 1.000 at step 1,250 (LR 1e-3).
  """
  return float(hidden) ** -0.5


def answer_loss(logits, targets, mask):
  """The train step's token loss (`training.TokenLoss`): cross-entropy on answer tokens (batch["loss_mask"]),
  with the count of correct answers so that metrics["accuracy"] is the answer accuracy."""
  nll_sum, count = training.cross_entropy(logits, targets, mask)
  return nll_sum, count, {"accuracy": jnp.sum((jnp.argmax(logits, -1) == targets) & mask).astype(jnp.float32)}


def train_one(kind: str, size: str, seq_len: int, *, steps: int, batch_size: int, lr: float, vocab_size: int,
              pairs_per_token: Optional[float], eval_batches: int, seed: int, compute_dtype: str = "float32",
              num_pairs: int = 8, log_every: int = 0, lr_schedule: str = "cosine",
              init_std: Optional[float] = None, steps_per_call: int = 1, model_overrides: Sequence[str] = ()) -> dict:
  cfg = model_config(kind, size, vocab_size=vocab_size, seq_len=seq_len, compute_dtype=compute_dtype,
                     init_std=init_std, overrides=model_overrides)
  pairs = num_pairs_for(seq_len, pairs_per_token, vocab_size, num_pairs)
  params = model_lib.init(cfg, jax.random.key(seed))
  if lr_schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05)
  elif lr_schedule == "constant":
    schedule = optax.constant_schedule(lr)
  else:
    raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = optimizer.init(params)

  train_step = training.make_train_step(cfg, None, optimizer, loss_fn=answer_loss)

  def one_step(carry, batch):
    params, opt_state, metrics = train_step(*carry, batch)
    return (params, opt_state), (metrics["loss"], metrics["accuracy"])

  # `steps_per_call` steps per jitted call (a scan over stacked batches): a tiny model's step is
  # shorter than the launch overhead of a call, so one call per step leaves the GPU mostly idle.
  @jax.jit
  def run_steps(params, opt_state, batches):  # batches: each array [k, ...]
    (params, opt_state), (losses, accs) = jax.lax.scan(one_step, (params, opt_state), batches)
    return params, opt_state, losses[-1], accs[-1]

  loss_of = training.make_loss(cfg, training.trivial_mesh(), loss_fn=answer_loss)
  eval_fn = jax.jit(lambda p, b: loss_of(p, b)[1]["accuracy"])
  train_rng = np.random.default_rng(seed)
  t0 = time.perf_counter()
  loss = acc = float("nan")
  steps_to_90 = None  # first logged step with training answer accuracy >= 0.9
  done = 0
  while done < steps:
    k = min(steps_per_call, steps - done)
    # Same batches, in the same order, whatever steps_per_call is.
    parts = [mqar_batch(train_rng, batch_size, seq_len, pairs, vocab_size) for _ in range(k)]
    batches = {name: jnp.asarray(np.stack([b[name] for b in parts])) for name in parts[0]}
    params, opt_state, loss, acc = run_steps(params, opt_state, batches)
    done += k
    i = done - 1  # the last step of this call
    if log_every and (i // log_every != (i - k) // log_every or done == steps or done == k):
      loss, acc = float(loss), float(acc)
      if steps_to_90 is None and acc >= 0.9:
        steps_to_90 = i
      print(f"  {kind} {size} L={seq_len} step {i:5d}  answer loss {loss:.3f}  acc {acc:.3f}  "
            f"{done / (time.perf_counter() - t0):.0f} steps/s", flush=True)
  train_s = time.perf_counter() - t0
  eval_rng = np.random.default_rng(10_000 + seed)
  accs = [float(eval_fn(params, {k: jnp.asarray(v) for k, v in mqar_batch(eval_rng, batch_size, seq_len, pairs,
                                                                            vocab_size).items()}))
          for _ in range(eval_batches)]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  return {"kind": kind, "size": size, "params": n_params, "seq_len": seq_len, "num_pairs": pairs, "steps": steps,
          "batch_size": batch_size, "lr": lr, "lr_schedule": lr_schedule, "init_std": cfg.initializer_range,
          "seed": seed,
          "vocab_size": vocab_size, "final_train_loss": float(loss),
          "final_train_accuracy": float(acc), "steps_to_90": steps_to_90, "eval_accuracy": float(np.mean(accs)), "train_seconds": train_s, "backend": jax.default_backend()}


# ---- outputs -----------------------------------------------------------------------------

def write_csv(rows: list, path: str, fieldnames: Optional[list] = None):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]), restval="")
    writer.writeheader()
    writer.writerows(rows)


def read_csv(path: str) -> list:
  with open(path) as f:
    return list(csv.DictReader(f))


def summarize(rows: list, learned_at: float = 0.9) -> list:
  """Per (kind, size, context length): runs, runs that learned the recall (eval accuracy >= learned_at), best.

  Several runs per point (learning rates, seeds) are the norm here: whether a tiny model learns the
  lookup within the budget is a sudden, seed-dependent transition, so one run per point says little.
  """
  groups = {}
  for r in rows:
    groups.setdefault((r["kind"], r["size"], int(r["seq_len"])), []).append(float(r["eval_accuracy"]))
  order = lambda key: (KINDS.index(key[0]) if key[0] in KINDS else 9, list(SIZES).index(key[1])  # noqa: E731
                       if key[1] in SIZES else 9, key[2])
  return [{"kind": k, "size": s, "seq_len": t, "runs": len(a), "learned": sum(x >= learned_at for x in a),
           "best": max(a), "median": float(np.median(a))} for (k, s, t), a in sorted(groups.items(), key=lambda kv: order(kv[0]))]


def plot(rows: list, path: str, title: str = "MQAR accuracy"):
  """Accuracy vs context length, one panel per size: every run a dot, the best run per point a line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sizes = sorted({r["size"] for r in rows}, key=lambda s: list(SIZES).index(s) if s in SIZES else 99)
  fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.8), squeeze=False)
  summary = summarize(rows)
  for ax, size in zip(axes[0], sizes):
    for i, (kind, marker) in enumerate(zip(KINDS, "os^")):
      color = f"C{i}"
      runs = [(int(r["seq_len"]), float(r["eval_accuracy"])) for r in rows if r["size"] == size and r["kind"] == kind]
      best = [(g["seq_len"], g["best"]) for g in summary if g["size"] == size and g["kind"] == kind]
      if runs:
        # Spread the dots of one point a little so that equal accuracies stay visible.
        jitter = {0: 0.94, 1: 1.0, 2: 1.06}[i]
        ax.scatter([t * jitter for t, _ in runs], [a for _, a in runs], marker=marker, color=color, alpha=0.35, s=18)
        ax.plot(*zip(*best), marker=marker, color=color,
                label=f"{kind} (best of {max(g['runs'] for g in summary if g['size'] == size and g['kind'] == kind)})")
    pairs = sorted({int(r["num_pairs"]) for r in rows if r["size"] == size})
    if len(pairs) == 1:
      ax.axhline(elimination_baseline(pairs[0]), color="gray", ls="--", lw=1,
                 label=f"no recall (pick an unused value, H_P/P, P={pairs[0]})")
    params = {str(r["params"]) for r in rows if r["size"] == size}
    ax.set_title(f"{title}: size {size} ({', '.join(sorted(params))} params)", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("answer accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


class UsageError(ValueError):
  """A bad command line: one line on stderr, exit code 2."""


def check_args(args, vocab_size: int) -> tuple[list, list, list]:
  """(kinds, sizes, lengths) of the flags; UsageError for an unknown name, a bad length or pairs that do not fit."""
  kinds, sizes = args.kinds.split(","), args.sizes.split(",")
  for flag, names, valid in (("--kinds", kinds, KINDS), ("--sizes", sizes, tuple(SIZES))):
    unknown = [n for n in names if n not in valid]
    if unknown:
      raise UsageError(f"{flag}: unknown {', '.join(map(repr, unknown))}; "
                       f"choose a comma list of {', '.join(valid)}")
  try:
    lengths = [int(x) for x in args.lengths.split(",")]
  except ValueError:
    lengths = []
  if not lengths or min(lengths) < 1:
    raise UsageError(f"--lengths: {args.lengths!r} is not a comma list of positive integers, e.g. 64,256,1024")
  for seq_len in lengths:
    want = args.num_pairs if args.pairs_per_token is None else int(seq_len * args.pairs_per_token)
    if num_pairs_for(seq_len, args.pairs_per_token, vocab_size, args.num_pairs) != want:
      flag = (f"--num-pairs {args.num_pairs}" if args.pairs_per_token is None
              else f"--pairs-per-token {args.pairs_per_token} ({want} pairs at length {seq_len})")
      raise UsageError(f"{flag} does not fit length {seq_len} with vocab size {vocab_size}: it needs "
                       f"1 <= pairs, 4 * pairs <= length + 1 and pairs < vocab_size / 2, so at most "
                       f"{max(1, min((seq_len + 1) // 4, vocab_size // 2 - 1))}; lower it or drop that length")
  if not args.overwrite:
    for path in (args.out, args.plot or os.path.splitext(args.out)[0] + ".png"):
      if os.path.exists(path):
        raise UsageError(f"{path} exists; choose another --out (or --plot), or pass --overwrite to replace it")
  return kinds, sizes, lengths


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="--config.model.KEY=VALUE overrides every run's model, e.g. "
                                      "--config.model.vocab_size=128 --config.model.compute_dtype=bfloat16 "
                                      "--config.model.initializer_range=0.02")
  ap.add_argument("--kinds", default=",".join(KINDS))
  ap.add_argument("--sizes", default=",".join(SIZES))
  ap.add_argument("--lengths", default="64,256,1024")
  ap.add_argument("--steps", type=int, default=15000, help="training steps per run (the budget)")
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"])
  ap.add_argument("--num-pairs", type=int, default=8, help="key-value pairs per sequence, at every length")
  ap.add_argument("--pairs-per-token", type=float, default=None, help="scale the pairs with the length instead")
  ap.add_argument("--log-every", type=int, default=250)
  ap.add_argument("--steps-per-call", type=int, default=50,
                  help="training steps per jitted call (a scan): 50 or so on a GPU, where tiny steps are launch-bound")
  ap.add_argument("--eval-batches", type=int, default=4)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--cpu-smoke", action="store_true",
                  help="tiny budget for a CPU: lengths 32,64, 4 pairs, 250 steps, batch 32, lr 3e-3")
  ap.add_argument("--out", default="runs/retrieval/retrieval.csv",
                  help="CSV to write (an existing one is not replaced without --overwrite)")
  ap.add_argument("--plot", default=None, help="PNG path (default: the CSV path with .png)")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing --out CSV and its plot")
  ap.add_argument("--merge", nargs="+", default=None, metavar="CSV",
                  help="no training: concatenate these CSVs (e.g. one per GPU process) into --out and plot them")
  args = flags_lib.parse_args(sys.argv[1:] if argv is None else argv, ap)
  if args.cpu_smoke:
    args.lengths, args.steps, args.batch_size, args.eval_batches = "32,64", 250, 32, 2
    args.lr, args.num_pairs, args.steps_per_call = 3e-3, 4, 25
  try:
    for key in (o.split("=", 1)[0] for o in args.overrides):
      if not key.startswith("model."):
        raise config_lib.ConfigError(f"--config.{key}: the study sets its training flags itself (--steps, --lr, "
                                     "...); only --config.model.KEY=VALUE overrides apply")
    model_overrides = [o[len("model."):] for o in args.overrides]
    kinds, sizes = args.kinds.split(","), args.sizes.split(",")
    if all(k in KINDS for k in kinds) and all(s in SIZES for s in sizes):
      # A check of every override (errors name the full key), and the study's vocabulary (the task's tokens).
      vocab_size = config_lib.apply_overrides(presets.get_preset(presets.retrieval_name(kinds[0], sizes[0])),
                                              args.overrides).model.vocab_size
    else:
      vocab_size = 0  # check_args names the unknown kind or size first
    kinds, sizes, lengths = check_args(args, vocab_size)
  except (UsageError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.merge:
    rows = [row for path in args.merge for row in read_csv(path)]
    write_csv(rows, args.out, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    plot(rows, args.plot or os.path.splitext(args.out)[0] + ".png")
    print("| kind | size | context | runs | learned (>= 0.9) | best | median |\n|---|---|---:|---:|---:|---:|---:|")
    for g in summarize(rows):
      print(f"| {g['kind']} | {g['size']} | {g['seq_len']} | {g['runs']} | {g['learned']} | {g['best']:.3f} | "
            f"{g['median']:.3f} |")
    return 0
  rows = []
  for size in sizes:
    for seq_len in lengths:
      for kind in kinds:
        row = train_one(kind, size, seq_len, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        vocab_size=vocab_size, pairs_per_token=args.pairs_per_token,
                        eval_batches=args.eval_batches, seed=args.seed, num_pairs=args.num_pairs,
                        log_every=args.log_every, lr_schedule=args.lr_schedule,
                        steps_per_call=args.steps_per_call, model_overrides=model_overrides)
        rows.append(row)
        print(f"{kind:9s} size={size} L={seq_len:5d} pairs={row['num_pairs']:3d} acc={row['eval_accuracy']:.3f} "
              f"loss={row['final_train_loss']:.3f} ({row['train_seconds']:.0f}s)", flush=True)
        write_csv(rows, args.out)  # after every run, so a cut-off study keeps what finished
  plot(rows, args.plot or os.path.splitext(args.out)[0] + ".png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
