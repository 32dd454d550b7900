"""Associative recall (MQAR) study: softmax vs lightning vs hybrid, by context length and model size.

The study on one GPU, in four parts of about 10 minutes of GPU time or more each (the minutes are `--dry_run`'s
estimate at an assumed 30 TFLOP/s, float32; `--config.model.compute_dtype=bfloat16` is the lever if slower);
every part trains 4 learning rates x 3 seeds per point, the three kinds in parallel processes sharing the
GPU (`bash benchmarks/gpu_suite.sh mqar_xs` ... `mqar_s_long`); the parts of one kind and size append to one
CSV (results/mqar/KIND-SIZE.csv), and a part cut off before its end is resumed by running it again:

    for kind in softmax lightning hybrid; do
      python -m recipes.retrieval --kinds $kind --sizes xs --out results/mqar/$kind-xs.csv                 # ~7 min
      python -m recipes.retrieval --kinds $kind --sizes s --lengths 64,128 --out results/mqar/$kind-s.csv   # ~6 min
      python -m recipes.retrieval --kinds $kind --sizes s --lengths 256,512 --out results/mqar/$kind-s.csv  # ~8 min
      python -m recipes.retrieval --kinds $kind --sizes s --lengths 1024 --out results/mqar/$kind-s.csv     # ~5 min
    done
    python -m recipes.retrieval --merge results/mqar/*-xs.csv results/mqar/*-s.csv \
        --out results/mqar/study.csv                     # runs, summary (mean, SE, best LR), plot
    python -m recipes.retrieval --dry_run                # the grid, its steps, tokens, FLOPs, minutes; trains nothing
    python -m recipes.retrieval --cpu-smoke              # minutes on CPU (2 cores): tiny vocabulary, data, budget

The task follows Zoology (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
Models", the multi-query associative recall of its Figure 2): vocabulary 8,192 (keys in [1, 4096), values in
[4096, 8192), 0 = filler); a sequence of `seq_len` input tokens starts with `num_pairs` key-value pairs
(distinct keys, distinct values), then a query region where every key appears once more, the rest filler.
The target at a queried key is its value (the value itself is not in the input); only these answers count
in the loss and the accuracy.  Query placement is Zoology's: the query region has (seq_len - 2 P) / 2
two-token slots, and pair j's query goes to slot g_j, the j-th of P slots drawn without replacement with
probability proportional to g^(a - 1), g = 1, 2, ... (a = `--power-a`, 0.01: a power law, so the first
pairs tend to be asked for soon and in order, the last ones far away).  Lengths and pairs are Zoology's
(64, 4), (128, 8), (256, 16), continued at 16 tokens per pair to (512, 32) and (1024, 64).

Per (length, pairs) a FIXED training set (`--train-examples`, 100,000) and a held-out test set
(`--test-examples`, 3,000) are generated once from `--data-seed`; every model of the study sees the same
sets (each seed reads the training set in its own shuffled order, epoch after epoch).  The batch follows
Zoology's rule, 512 rows up to 128 tokens and then 65,536 tokens per batch (256, 128, 64 rows).  The
budget is `--steps` (1,000) per point: 5.1 epochs of the set at 64 and 128 tokens, 2.6 at 256, 1.3 at 512,
0.64 at 1,024 -- far below Zoology's 64 epochs, so the study compares the kinds at one fixed budget.

Models: the presets retrieval_{kind}_{size} (mx01/presets.py; xs = width 64, 2 layers; s = width 128, 4
layers; hybrid = the 7:1 pattern of `presets.layer_types`, so at 2 and 4 layers its last layer is the one
softmax layer), trained by the project's one train step, `mx01.training.make_train_step`, on the one-device
mesh.  A batch is the step's {"tokens" (the inputs), "targets", "loss_mask"} with the mask true exactly at
the answers (`step_batch`); the step's loss hook `answer_loss` receives the final hidden states and the LM
head, gathers the answer positions and runs the 8,192-way head there only (P of the L positions; the same
logits as the full head there), and counts the correct answers.  The evaluation runs the same hook through
`training.make_eval_step`.  For one (kind, size, length) every (learning rate, seed) model -- `--lrs`
(Zoology's logspace(-4, -2, 4)) x `--seeds` (0,1,2) -- trains AT ONCE: parameters and optimizer states are
stacked along a leading model axis and the one step under `jax.vmap` over the models (`lax.scan` over
`--steps-per-call` steps: one compiled call, `make_grid_steps`) trains them all.  Optimizer as Zoology's:
AdamW (weight decay 0.01), cosine decay to 0, no warmup, no clipping.

Per point the summary takes, for every learning rate, the mean test accuracy over the seeds, and reports
the best learning rate by that mean (the LR is chosen on the mean over seeds, never per seed), with the
standard error over the seeds at that LR (sample std / sqrt(seeds)).

Needle in a haystack (after training, every model of the points at `--niah-lengths`, default 1,024): a
held-out test at `--niah-factor` (2) times the training length where the input is filler (0) but for one
key-value pair, placed so that its key sits at depth
0%, 25%, 50%, 75% or 100% of the context before the query, and the key queried at the last position;
accuracy per depth, `--niah-examples` sequences each.  Columns niah_0 ... niah_100 of every run; the
summary gives them at the best learning rate.

Outputs (default runs/retrieval/retrieval.csv): one CSV row per (kind, size, length, lr, seed); a summary
CSV beside it (`*_summary.csv`: per point mean, SE, best LR, NIAH per depth) and a plot (`*.png`: accuracy
vs context length per size with SE bars; NIAH accuracy by depth).  The run CSV is written after every point
and a run with an existing --out resumes it: points already there are skipped.  `--merge A.csv B.csv`
combines parts (no training).  Bad flags are one-line errors (exit 2) before anything trains.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import math
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mx01 import config as config_lib
from mx01 import model as model_lib
from mx01 import presets
from mx01 import training
from mx01.config import ModelConfig
from recipes import flags as flags_lib

FILLER = 0
SIZES = presets.RETRIEVAL_SIZES  # the study's models are presets: retrieval_{kind}_{size}
KINDS = presets.KINDS
LEARNING_RATES = tuple(float(x) for x in np.logspace(-4, -2, 4))  # Zoology's grid
NIAH_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NIAH_COLUMNS = tuple(f"niah_{round(100 * d)}" for d in NIAH_DEPTHS)
# One row per trained model; the columns, in order (a resumed --out must have exactly these).
FIELDS = ("kind", "size", "params", "seq_len", "num_pairs", "vocab_size", "train_examples", "test_examples",
          "batch_size", "steps", "epochs", "lr", "seed", "data_seed", "power_a", "init_std", "compute_dtype",
          "final_train_loss", "final_train_accuracy", "test_accuracy", "niah_len") + NIAH_COLUMNS + (
          "train_seconds", "backend")
SUMMARY_FIELDS = ("kind", "size", "params", "seq_len", "num_pairs", "seeds", "best_lr", "mean_accuracy",
                  "se_accuracy", "no_recall", "lr_means", "niah_len") + tuple(f"{c}_{s}" for c in NIAH_COLUMNS
                                                                  for s in ("mean", "se"))


# ---- the task ------------------------------------------------------------------------

def gap_probabilities(slots: int, power_a: float) -> np.ndarray:
  """Zoology's query-slot law: P(slot g) proportional to (g + 1)^(a - 1), g = 0 .. slots - 1.  [slots] float64."""
  p = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1.0)
  return p / p.sum()


def check_task(seq_len: int, num_pairs: int, vocab_size: int):
  """ValueError unless the sequence holds the pairs and their queries and the vocabulary the distinct keys/values."""
  if seq_len % 2 or num_pairs < 1 or 4 * num_pairs > seq_len:
    raise ValueError(f"seq_len={seq_len}, num_pairs={num_pairs}: needs an even length and 1 <= 4 * pairs <= length")
  if num_pairs > vocab_size // 2 - 1:
    raise ValueError(f"num_pairs={num_pairs} needs that many distinct keys; vocab_size={vocab_size} "
                     f"gives {vocab_size // 2 - 1}")


def mqar_dataset(num_examples: int, seq_len: int, num_pairs: int, vocab_size: int, seed, *,
                 power_a: float = 0.01) -> dict:
  """Zoology's MQAR examples (see the module docstring), reproducible from `seed` (an int or a tuple of ints).

  Returns {"inputs": [N, seq_len] int32, "answer_pos": [N, P] int32 (input position of each queried key,
  pair order), "answers": [N, P] int32 (the value to predict there)}.
  """
  check_task(seq_len, num_pairs, vocab_size)
  rng = np.random.default_rng(seed)
  n, p, half = num_examples, num_pairs, vocab_size // 2
  keys = distinct_rows(rng, n, p, 1, half)  # [N, P] distinct keys in [1, half)
  values = distinct_rows(rng, n, p, half, vocab_size)  # [N, P] distinct values in [half, vocab)
  # Query slots: P draws without replacement with probabilities q (Zoology's power law), pair j taking the
  # j-th draw.  Vectorised as exponential races: sorting -log(u) / q ascending orders the slots exactly as
  # successive weighted draws without replacement would (Efraimidis & Spirakis 2006).
  slots = (seq_len - 2 * p) // 2
  q = gap_probabilities(slots, power_a)
  race = -np.log(rng.random((n, slots))) / q  # [N, slots]
  first = np.argpartition(race, p - 1, axis=1)[:, :p]  # the P smallest, unordered
  gaps = np.take_along_axis(first, np.argsort(np.take_along_axis(race, first, axis=1), axis=1), axis=1)  # [N, P]
  answer_pos = (2 * p + 2 * gaps).astype(np.int32)
  inputs = np.full((n, seq_len), FILLER, np.int32)
  inputs[:, 0:2 * p:2], inputs[:, 1:2 * p:2] = keys, values
  rows = np.arange(n)[:, None]
  inputs[rows, answer_pos] = keys
  return {"inputs": inputs, "answer_pos": answer_pos, "answers": values}


def distinct_rows(rng: np.random.Generator, n: int, k: int, low: int, high: int) -> np.ndarray:
  """[n, k] int32, each row k distinct integers of [low, high), uniformly (every k-subset in every order)."""
  if 4 * k > high - low:  # dense: the first k of a random order
    return (np.argsort(rng.random((n, high - low)), axis=1)[:, :k] + low).astype(np.int32)
  # sparse: draw, and draw again the rows that repeat a number (few: k^2 / 2 / (high - low) of them)
  out = rng.integers(low, high, size=(n, k))
  redo = np.arange(n)
  while True:
    ordered = np.sort(out[redo], axis=1)
    redo = redo[np.any(ordered[:, 1:] == ordered[:, :-1], axis=1)]
    if not len(redo):
      return out.astype(np.int32)
    out[redo] = rng.integers(low, high, size=(len(redo), k))


def study_data(seq_len: int, num_pairs: int, vocab_size: int, *, train_examples: int, test_examples: int,
               data_seed: int = 0, power_a: float = 0.01) -> tuple[dict, dict]:
  """The fixed (train, test) sets of one (length, pairs): seeds (data_seed, length, pairs, split)."""
  return tuple(mqar_dataset(n, seq_len, num_pairs, vocab_size, (data_seed, seq_len, num_pairs, split),
                            power_a=power_a) for split, n in enumerate((train_examples, test_examples)))


def niah_dataset(num_examples: int, seq_len: int, depth: float, vocab_size: int, seed) -> dict:
  """One key-value pair in filler, its key queried at the last input position; the pair's key at
  round(depth * (seq_len - 3)), so depth 0 = the first token, 1 = just before the query.  Same dict as
  `mqar_dataset` with P = 1."""
  if seq_len < 4 or not 0.0 <= depth <= 1.0:
    raise ValueError(f"niah: needs seq_len >= 4 and 0 <= depth <= 1, got {seq_len}, {depth}")
  rng = np.random.default_rng(seed)
  half = vocab_size // 2
  keys = rng.integers(1, half, size=num_examples).astype(np.int32)
  values = rng.integers(half, vocab_size, size=num_examples).astype(np.int32)
  at = round(depth * (seq_len - 3))
  inputs = np.full((num_examples, seq_len), FILLER, np.int32)
  inputs[:, at], inputs[:, at + 1], inputs[:, -1] = keys, values, keys
  return {"inputs": inputs, "answer_pos": np.full((num_examples, 1), seq_len - 1, np.int32),
          "answers": values[:, None]}


def elimination_baseline(num_pairs: int) -> float:
  """Answer accuracy of recalling only which values are present and which keys were already asked for.

  A model without the key -> value lookup can still pick, at the j-th query, uniformly among the
  num_pairs - j + 1 values of pairs not queried yet: mean over queries of 1/(remaining) = H_P / P
  (0.52 at 4 pairs, 0.34 at 8, 0.074 at 64).  Accuracy at this level means no associative recall.
  """
  return float(sum(1.0 / k for k in range(1, num_pairs + 1)) / num_pairs)


def zoology_batch_size(seq_len: int) -> int:
  """Zoology's Figure 2 batch: 512 rows up to 128 tokens, then 65,536 tokens per batch (at least 1 row)."""
  return 512 if seq_len <= 128 else max(1, 65536 // seq_len)


# ---- models ------------------------------------------------------------------------------

def model_config(kind: str, size: str, *, vocab_size: int, seq_len: int, compute_dtype: str = "float32",
                 init_std: Optional[float] = None, overrides: Sequence[str] = ()) -> ModelConfig:
  """The preset retrieval_{kind}_{size} at this vocabulary and (longest) context length.

  init_std: the weights' initial std; None = 1/sqrt(hidden) (`default_init_std`).
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
  for thousands of steps.  Measured on the CPU, softmax xs, 4 pairs, 32 tokens, constant LR: std 0.02
  ended at 0.53 accuracy after 2,500 steps (LR 1e-3) and 0.19 after 3,000 (LR 3e-3); std 0.125 reached
  0.875 at step 1,000 and 1.000 at step 1,250 (LR 1e-3).
  """
  return float(hidden) ** -0.5


def step_batch(data: dict) -> dict:
  """MQAR rows {"inputs" [B, L], "answer_pos" [B, P], "answers" [B, P]} (numpy or jax) as the train step's
  batch with explicit targets (`training.split_batch`): {"tokens": the inputs [B, L], "targets" [B, L] (each
  answer at its query's position, filler elsewhere), "loss_mask" [B, L] (true exactly at the P answers)}."""
  inputs, pos = jnp.asarray(data["inputs"]), jnp.asarray(data["answer_pos"])
  rows = jnp.arange(inputs.shape[0])[:, None]
  targets = jnp.full(inputs.shape, FILLER, inputs.dtype).at[rows, pos].set(jnp.asarray(data["answers"]))
  return {"tokens": inputs, "targets": targets, "loss_mask": jnp.zeros(inputs.shape, bool).at[rows, pos].set(True)}


def answer_loss(num_answers: int) -> training.TokenLoss:
  """The study's loss (a `training.TokenLoss`, for the train step and the evaluation): cross-entropy at the
  positions of loss_mask, with the LM head run there only -- P of the L positions, so no [B, L, vocab]
  logits (the same logits as the full head at those positions).  Extra sum "correct": answers whose argmax
  is right (the step reports it over the answers, the accuracy).

  num_answers: the most true loss_mask positions of a row (the study's P).  A row's answers are found in its
  mask (a stable sort puts them first, in order), so the loss holds on any piece of the sequence the step
  gives a device; a row with more answers would lose the ones past num_answers.
  """

  def loss(hidden, head, targets, mask):  # [b, t, hidden], [hidden, vocab], [b, t], [b, t]
    at = jnp.argsort(~mask, axis=1, stable=True)[:, :num_answers]  # [b, P]: the answers' positions first
    h = jnp.take_along_axis(hidden, at[..., None], axis=1)  # [b, P, hidden]
    tgt, m = jnp.take_along_axis(targets, at, axis=1), jnp.take_along_axis(mask, at, axis=1)  # [b, P]
    logits = jnp.einsum("bpd,dv->bpv", h, head.astype(h.dtype)).astype(jnp.float32)  # [b, P, vocab]
    nll_sum, count = training.cross_entropy(logits, tgt, m)
    correct = jnp.sum((jnp.argmax(logits, -1) == tgt) & m).astype(jnp.float32)
    return nll_sum, count, {"correct": correct}

  return loss


def optimizer(lr, steps: int) -> optax.GradientTransformation:
  """Zoology's optimizer: AdamW (weight decay 0.01, not on norms), cosine decay from lr to 0 over `steps`."""
  return optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1)), weight_decay=0.01,
                     mask=training.weight_decay_mask)


def grid_optimizer(steps: int) -> optax.GradientTransformation:
  """`optimizer` with its learning rate in the state (state.hyperparams["lr"]), so that stacked states
  carry one learning rate per model: init with `grid_optimizer(s).init(params)` under vmap after setting
  the rate via `init_grid_state`."""
  return optax.inject_hyperparams(lambda lr: optimizer(lr, steps))(lr=0.0)


def stack(trees: Sequence) -> dict:
  """[tree, ...] -> one tree with a leading model axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def init_grid(config: ModelConfig, lrs: Sequence[float], seeds: Sequence[int], steps: int):
  """Stacked (params, opt_state) of the grid, model m = (lrs[m // len(seeds)], seeds[m % len(seeds)]).

  Models of one seed start from the same weights, model_lib.init(config, key(seed)).  Placed as the train
  step keeps them (replicated on the one-device mesh), so that its compiled call serves every call."""
  per_seed = {s: model_lib.init(config, jax.random.key(s)) for s in seeds}
  params = stack([per_seed[s] for _ in lrs for s in seeds])
  opt = grid_optimizer(steps)
  rates = jnp.asarray([lr for lr in lrs for _ in seeds], jnp.float32)

  def one(p, lr):
    state = opt.init(p)
    return state._replace(hyperparams=dict(state.hyperparams, lr=lr))

  replicated = NamedSharding(training.trivial_mesh().mesh, PartitionSpec())
  return jax.device_put((params, jax.vmap(one)(params, rates)), replicated)


def batch_order(seed: int, num_examples: int, batch_size: int, steps: int, start: int = 0) -> np.ndarray:
  """Example indices [steps, batch] of steps start .. start + steps - 1 for one seed: a new shuffle of the
  training set every epoch, read in order (a batch may straddle two epochs)."""
  first, last = start * batch_size, (start + steps) * batch_size
  epochs = range(first // num_examples, (last - 1) // num_examples + 1)
  order = np.concatenate([np.random.default_rng((seed, 1, e)).permutation(num_examples) for e in epochs])
  offset = epochs[0] * num_examples
  return order[first - offset:last - offset].reshape(steps, batch_size).astype(np.int32)


def make_grid_steps(config: ModelConfig, steps: int, num_answers: int):
  """The grid's compiled call: (stacked params, stacked opt_state, data, idx [k, models, batch]) -> (params,
  opt_state, answer loss [models], answer accuracy [models] of the last step).

  `jax.vmap` over the models of the project's one train step (`training.make_train_step` with `answer_loss`
  and `grid_optimizer(steps)`), `lax.scan` over the k steps; model m's batch t is rows idx[t, m] of `data`
  (an `mqar_dataset`-style dict on the device)."""
  step = training.make_train_step(config, None, grid_optimizer(steps), loss_fn=answer_loss(num_answers))
  grid_step = jax.vmap(step)

  @jax.jit
  def run_steps(params, opt_state, data, idx):
    def body(carry, idx_t):
      batch = jax.vmap(step_batch)(jax.tree.map(lambda a: a[idx_t], data))  # [models, batch, ...]
      params, opt_state, metrics = grid_step(*carry, batch)
      return (params, opt_state), (metrics["loss"], metrics["correct"])
    (params, opt_state), (loss, accuracy) = jax.lax.scan(body, (params, opt_state), idx)
    return params, opt_state, loss[-1], accuracy[-1]

  return run_steps


def fit_grid(config: ModelConfig, train: dict, *, lrs: Sequence[float], seeds: Sequence[int], steps: int,
             batch_size: int, steps_per_call: int = 100, log_every: int = 0, label: str = ""):
  """Trains every (lr, seed) model of one point at once (`init_grid`, then `make_grid_steps` calls of
  steps_per_call steps, model m reading `batch_order` of its seed); returns (stacked params, answer loss
  [models], answer accuracy [models] of the last step), models lrs outer, seeds inner.

  train: an `mqar_dataset`-style dict.  It lives on the device (an argument of the compiled call, not a
  constant baked into it); each call gathers its batches there from the seeds' example indices.
  """
  models = [(lr, s) for lr in lrs for s in seeds]
  params, opt_state = init_grid(config, lrs, seeds, steps)
  run_steps = make_grid_steps(config, steps, train["answers"].shape[1])
  data = jax.device_put(train)
  n_train = train["inputs"].shape[0]
  t0, done = time.perf_counter(), 0
  loss = acc = np.full(len(models), np.nan)
  while done < steps:
    k = min(steps_per_call, steps - done)
    idx = np.stack([batch_order(s, n_train, batch_size, k, done) for _, s in models], axis=1)
    params, opt_state, loss, acc = run_steps(params, opt_state, data, idx)
    done += k
    if log_every and (done // log_every != (done - k) // log_every or done == steps):
      loss, acc = np.asarray(loss), np.asarray(acc)
      print(f"  {label} step {done:6d}  answer loss {np.nanmin(loss):.3f}-{np.nanmax(loss):.3f}  train acc "
            f"{acc.min():.3f}-{acc.max():.3f} (over {len(models)} models)  "
            f"{done / (time.perf_counter() - t0):.1f} steps/s", flush=True)
  return params, np.asarray(loss), np.asarray(acc)


def train_grid(config: ModelConfig, train: dict, test: dict, *, lrs: Sequence[float], seeds: Sequence[int],
               steps: int, batch_size: int, steps_per_call: int = 100, log_every: int = 0,
               niah: Sequence[dict] = (), eval_batch: Optional[int] = None, label: str = "") -> list[dict]:
  """`fit_grid`, then every model's test (and NIAH) accuracy; returns one dict per model (lrs outer, seeds
  inner): {"lr", "seed", "final_train_loss", "final_train_accuracy", "test_accuracy", "niah": [accuracy per set]}.

  test/niah: `mqar_dataset`-style dicts.  eval_batch: rows per evaluation call (default batch_size; NIAH sets
  the same tokens per call).
  """
  params, loss, acc = fit_grid(config, train, lrs=lrs, seeds=seeds, steps=steps, batch_size=batch_size,
                               steps_per_call=steps_per_call, log_every=log_every, label=label)
  evaluate = make_evaluate(config)
  eval_batch = eval_batch or batch_size
  test_acc = evaluate(params, test, eval_batch)
  niah_acc = [evaluate(params, d, max(1, eval_batch * train["inputs"].shape[1] // d["inputs"].shape[1]))
              for d in niah]
  return [{"lr": lr, "seed": s, "final_train_loss": float(loss[m]), "final_train_accuracy": float(acc[m]),
           "test_accuracy": float(test_acc[m]), "niah": [float(a[m]) for a in niah_acc]}
          for m, (lr, s) in enumerate((lr, s) for lr in lrs for s in seeds)]


def make_evaluate(config: ModelConfig):
  """(stacked params, data, batch) -> answer accuracy of every model on `data` ([models] float64), in
  batches of `batch` rows (the last one padded with repeated rows that do not count, so one shape compiles):
  the project's eval step (`training.make_eval_step`) with the training loss, `answer_loss`, vmapped over
  the models."""

  @functools.cache
  def program(num_answers: int):  # (stacked params, rows, valid [batch] bool) -> correct answers [models]
    eval_step = training.make_eval_step(config, None, loss_fn=answer_loss(num_answers))

    def correct(params, data, valid):  # one model
      batch = step_batch(data)
      batch["loss_mask"] &= valid[:, None]
      return eval_step(params, batch)["correct"]

    return jax.jit(jax.vmap(correct, in_axes=(0, None, None)))

  def evaluate(params, data: dict, batch: int) -> np.ndarray:
    n, num_answers = data["answers"].shape
    batch = min(batch, n)
    count = program(num_answers)
    correct = 0.0
    for i in range(0, n, batch):
      rows = np.arange(i, i + batch) % n
      got = count(params, {k: v[rows] for k, v in data.items()}, np.arange(batch) < n - i)  # [models]
      correct = correct + np.asarray(got, np.float64)
    return correct / data["answers"].size

  return evaluate


# ---- statistics and outputs ----------------------------------------------------------------

def _order(kind: str, size: str, seq_len: int) -> tuple:
  return (KINDS.index(kind) if kind in KINDS else 9, list(SIZES).index(size) if size in SIZES else 9, seq_len)


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
  """Mean and standard error (sample std / sqrt(n)); SE is nan for one value."""
  a = np.asarray(xs, np.float64)
  return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan"))


def summarize(rows: list) -> list:
  """Per (kind, size, length): the best learning rate by mean test accuracy over seeds, that mean, its SE,
  every LR's mean (`lr_means`, "lr:mean;..."), and the NIAH accuracies at that LR (mean, SE per depth)."""
  points = {}
  for r in rows:
    points.setdefault((r["kind"], r["size"], int(r["seq_len"])), []).append(r)
  out = []
  for (kind, size, seq_len), runs in sorted(points.items(), key=lambda kv: _order(*kv[0])):
    by_lr = {}
    for r in runs:
      by_lr.setdefault(float(r["lr"]), []).append(r)
    means = {lr: mean_se([float(r["test_accuracy"]) for r in rs])[0] for lr, rs in by_lr.items()}
    best = max(sorted(means), key=lambda lr: means[lr])  # ties: the smallest rate
    mean, se = mean_se([float(r["test_accuracy"]) for r in by_lr[best]])
    row = {"kind": kind, "size": size, "params": runs[0]["params"], "seq_len": seq_len,
           "num_pairs": int(runs[0]["num_pairs"]), "seeds": len(by_lr[best]), "best_lr": best,
           "mean_accuracy": mean, "se_accuracy": se, "no_recall": elimination_baseline(int(runs[0]["num_pairs"])),
           "lr_means": ";".join(f"{lr:.3g}:{means[lr]:.4f}" for lr in sorted(means)),
           "niah_len": runs[0].get("niah_len", "")}
    for col in NIAH_COLUMNS:
      vals = [r.get(col, "") for r in by_lr[best]]
      m, s = mean_se([float(v) for v in vals]) if all(v != "" for v in vals) else (float("nan"), float("nan"))
      row[f"{col}_mean"], row[f"{col}_se"] = m, s
    out.append(row)
  return out


def write_csv(rows: list, path: str, fieldnames: Sequence[str]):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(fieldnames), restval="")
    writer.writeheader()
    writer.writerows(rows)


def read_csv(path: str) -> list:
  with open(path) as f:
    return list(csv.DictReader(f))


def plot(summary: list, path: str):
  """Top: mean test accuracy (best LR) vs context length, one panel per size, SE bars, one line per kind.
  Bottom: NIAH accuracy by needle depth at each size's longest length (best LR, SE bars)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sizes = sorted({g["size"] for g in summary}, key=lambda s: list(SIZES).index(s) if s in SIZES else 99)
  fig, axes = plt.subplots(2, len(sizes), figsize=(5 * len(sizes), 7.2), squeeze=False)
  depths = [100 * d for d in NIAH_DEPTHS]
  for col, size in enumerate(sizes):
    top, bottom = axes[0][col], axes[1][col]
    points = [g for g in summary if g["size"] == size]
    longest = max(g["seq_len"] for g in points)
    for i, (kind, marker) in enumerate(zip(KINDS, "os^")):
      mine = sorted((g for g in points if g["kind"] == kind), key=lambda g: g["seq_len"])
      if not mine:
        continue
      params = mine[0]["params"]
      top.errorbar([g["seq_len"] for g in mine], [g["mean_accuracy"] for g in mine],
                   yerr=[0 if math.isnan(g["se_accuracy"]) else g["se_accuracy"] for g in mine], marker=marker,
                   color=f"C{i}", capsize=3, label=f"{kind} ({params} params)")
      last = [g for g in mine if g["seq_len"] == longest]
      if last and not math.isnan(last[0][f"{NIAH_COLUMNS[0]}_mean"]):
        g = last[0]
        bottom.errorbar(depths, [g[f"{c}_mean"] for c in NIAH_COLUMNS],
                        yerr=[0 if math.isnan(g[f"{c}_se"]) else g[f"{c}_se"] for c in NIAH_COLUMNS],
                        marker=marker, color=f"C{i}", capsize=3, label=kind)
    lines = sorted({(g["seq_len"], g["no_recall"]) for g in points})
    top.plot(*zip(*lines), color="gray", ls="--", lw=1, label="no recall (H_P / P, `elimination_baseline`)")
    seeds = sorted({g["seeds"] for g in points})
    top.set_title(f"MQAR, size {size}: best-LR mean over {'/'.join(map(str, seeds))} seeds (+- SE)", fontsize=9)
    top.set_xscale("log", base=2)
    top.set_xlabel("context length (tokens)")
    top.set_ylabel("test answer accuracy")
    top.set_ylim(0, 1.02)
    top.legend(fontsize=7)
    niah_len = next((g["niah_len"] for g in points if g["seq_len"] == longest), "")
    bottom.set_title(f"needle in a haystack, size {size}: trained at {longest}, tested at {niah_len} tokens",
                     fontsize=9)
    bottom.set_xlabel("needle depth (% of the context before the query)")
    bottom.set_ylabel("answer accuracy")
    bottom.set_ylim(0, 1.02)
    if bottom.has_data():
      bottom.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(rows: list, out: str, plot_path: str) -> list:
  """The run CSV, its summary CSV and the plot; returns the summary."""
  rows = sorted(rows, key=lambda r: (_order(r["kind"], r["size"], int(r["seq_len"])), float(r["lr"]),
                                     int(r["seed"])))
  write_csv(rows, out, FIELDS)
  summary = summarize(rows)
  write_csv(summary, summary_path(out), SUMMARY_FIELDS)
  plot(summary, plot_path)
  return summary


def summary_path(out: str) -> str:
  return os.path.splitext(out)[0] + "_summary.csv"


def print_summary(summary: list):
  print("| kind | size | context | pairs | seeds | best LR | accuracy (mean +- SE) | "
        + " | ".join(f"NIAH {round(100 * d)}%" for d in NIAH_DEPTHS) + " |")
  print("|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(NIAH_DEPTHS))
  for g in summary:
    print(f"| {g['kind']} | {g['size']} | {g['seq_len']} | {g['num_pairs']} | {g['seeds']} | {g['best_lr']:.2g} | "
          f"{g['mean_accuracy']:.3f} +- {g['se_accuracy']:.3f} | "
          + " | ".join(f"{g[f'{c}_mean']:.2f}" for c in NIAH_COLUMNS) + " |")


# ---- the command line ----------------------------------------------------------------------

class UsageError(ValueError):
  """A bad command line: one line on stderr, exit code 2."""


def _int_list(flag: str, text: str, example: str) -> list:
  try:
    values = [int(x) for x in text.split(",")]
  except ValueError:
    values = []
  if not values or min(values) < 0:
    raise UsageError(f"{flag}: {text!r} is not a comma list of non-negative integers, e.g. {example}")
  return values


def check_args(args) -> tuple[list, list, list, list, list]:
  """(kinds, sizes, lengths, lrs, seeds) of the flags; UsageError naming the flag for anything bad."""
  kinds, sizes = args.kinds.split(","), args.sizes.split(",")
  for flag, names, valid in (("--kinds", kinds, KINDS), ("--sizes", sizes, tuple(SIZES))):
    unknown = [n for n in names if n not in valid]
    if unknown:
      raise UsageError(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose a comma list of {', '.join(valid)}")
  lengths = _int_list("--lengths", args.lengths, "64,128,256")
  for seq_len in lengths:
    pairs = seq_len // args.tokens_per_pair if args.tokens_per_pair > 0 else 0
    try:
      check_task(seq_len, pairs, args.vocab_size)
    except ValueError as e:
      raise UsageError(f"--lengths {seq_len} with --tokens-per-pair {args.tokens_per_pair} and --vocab-size "
                       f"{args.vocab_size}: {e}") from None
  try:
    lrs = [float(x) for x in args.lrs.split(",")]
  except ValueError:
    lrs = []
  if not lrs or min(lrs) <= 0:
    raise UsageError(f"--lrs: {args.lrs!r} is not a comma list of positive numbers, e.g. 1e-4,1e-3")
  seeds = _int_list("--seeds", args.seeds, "0,1,2")
  for flag, value in (("--steps", args.steps), ("--train-examples", args.train_examples),
                      ("--test-examples", args.test_examples), ("--steps-per-call", args.steps_per_call)):
    if value < 1:
      raise UsageError(f"{flag} must be a positive integer, got {value}")
  _int_list("--niah-lengths", args.niah_lengths, "1024")
  if args.niah_factor < 1 or args.niah_examples < 0:
    raise UsageError(f"--niah-factor must be >= 1 and --niah-examples >= 0, got {args.niah_factor}, "
                     f"{args.niah_examples}")
  return kinds, sizes, lengths, lrs, seeds


def check_outputs(args, plot_path: str, resuming: bool):
  """Training resumes an existing --out only when it is a run CSV of this study; otherwise (and when
  merging) no existing CSV, summary or plot is replaced without --overwrite (the recorded results/ stay)."""
  if args.overwrite:
    return
  if resuming:
    with open(args.out, newline="") as f:
      header = next(csv.reader(f), [])
    if tuple(header) != FIELDS:
      raise UsageError(f"{args.out} exists and is not a run CSV of this study (other columns); choose another "
                       "--out, or pass --overwrite to replace it")
    return
  for path in (args.out, plot_path, summary_path(args.out)):
    if os.path.exists(path):
      raise UsageError(f"{path} exists; choose another --out (or --plot), or pass --overwrite to replace it")


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="--config.model.KEY=VALUE overrides every model, e.g. "
                                      "--config.model.compute_dtype=bfloat16 --config.model.hidden_size=256")
  ap.add_argument("--kinds", default=",".join(KINDS))
  ap.add_argument("--sizes", default=",".join(SIZES))
  ap.add_argument("--lengths", default="64,128,256,512,1024", help="context lengths (input tokens)")
  ap.add_argument("--tokens-per-pair", type=int, default=16, help="key-value pairs = length // this (Zoology: 16)")
  ap.add_argument("--vocab-size", type=int, default=8192)
  ap.add_argument("--power-a", type=float, default=0.01, help="Zoology's query-placement power law")
  ap.add_argument("--train-examples", type=int, default=100_000)
  ap.add_argument("--test-examples", type=int, default=3_000)
  ap.add_argument("--data-seed", type=int, default=0, help="seed of the fixed train/test sets")
  ap.add_argument("--lrs", default=",".join(f"{x:.6g}" for x in LEARNING_RATES))
  ap.add_argument("--seeds", default="0,1,2", help="model seeds (init and data order)")
  ap.add_argument("--steps", type=int, default=1000, help="training steps per point")
  ap.add_argument("--batch-size", type=int, default=0, help="rows per step; 0 = Zoology's rule by length")
  ap.add_argument("--steps-per-call", type=int, default=100, help="steps per compiled call (a scan)")
  ap.add_argument("--log-every", type=int, default=500)
  ap.add_argument("--niah-lengths", default="1024",
                  help="training lengths whose models get the NIAH test (each is one more compiled program)")
  ap.add_argument("--niah-factor", type=int, default=2, help="NIAH context = this x the training length")
  ap.add_argument("--niah-examples", type=int, default=256, help="NIAH sequences per depth (0: no NIAH)")
  ap.add_argument("--cpu-smoke", action="store_true",
                  help="a few minutes on CPU: vocabulary 64, lengths 16,32, 1,000 examples, 2 LRs x 2 seeds, "
                       "200 steps of 16 rows, xs only")
  ap.add_argument("--dry_run", action="store_true", help="print the grid, steps, tokens and FLOPs; train nothing")
  ap.add_argument("--tflops", type=float, default=30.0,
                  help="--dry_run's assumed sustained TFLOP/s of the grid (for its time estimate)")
  ap.add_argument("--out", default="runs/retrieval/retrieval.csv",
                  help="run CSV; an existing one of this study is resumed (its points are skipped)")
  ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
  ap.add_argument("--overwrite", action="store_true", help="start --out afresh; replace its plot and summary")
  ap.add_argument("--merge", nargs="+", default=None, metavar="CSV",
                  help="no training: combine these run CSVs into --out, its summary and plot")
  args = flags_lib.parse_args(argv, ap)
  if args.cpu_smoke:
    # The smoke run's values; flags given after --cpu-smoke on the command line do not change them, except
    # the slice (--kinds, --lengths) and --steps, which the test of it shortens.
    given = {a.split("=", 1)[0] for a in argv}
    args.vocab_size, args.train_examples, args.test_examples, args.sizes = 64, 1000, 100, "xs"
    args.lrs, args.seeds, args.batch_size, args.steps_per_call, args.log_every = "3e-3,1e-2", "0,1", 16, 50, 100
    args.niah_examples, args.niah_lengths = 16, "32"
    if "--lengths" not in given:
      args.lengths = "16,32"
    if "--steps" not in given:
      args.steps = 200
  return args


def dry_run(args, kinds, sizes, lengths, lrs, seeds, model_overrides) -> int:
  """The grid and its cost: per (kind, size, length) the steps, batch, sequences and tokens of every model,
  and the training FLOPs of the whole grid (6 x non-embedding params x tokens + causal attention + the head
  on the answers)."""
  models = len(lrs) * len(seeds)
  print(f"grid: {len(kinds)} kinds x {len(sizes)} sizes x {len(lengths)} lengths; {len(lrs)} LRs "
        f"({', '.join(f'{x:.3g}' for x in lrs)}) x {len(seeds)} seeds = {models} models per compiled program")
  print("| kind | size | params | context | pairs | batch | steps | epochs | tokens/model | grid PFLOP | minutes |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  minutes = {}
  total_tokens = total_flops = 0.0
  for kind in kinds:
    for size in sizes:
      for seq_len in lengths:
        cfg = model_config(kind, size, vocab_size=args.vocab_size, seq_len=seq_len, overrides=model_overrides)
        shapes = model_lib.abstract_params(cfg)
        n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
        table = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
        batch = args.batch_size or zoology_batch_size(seq_len)
        tokens = args.steps * batch * seq_len
        pairs = seq_len // args.tokens_per_pair
        softmax = cfg.resolved_layer_types.count("softmax")
        # causal attention: QK^T and PV, half the square, x3 for forward + backward
        attn = 3 * 2 * 2 * (seq_len / 2) * cfg.num_heads * cfg.head_dim * softmax
        head = 6 * cfg.hidden_size * cfg.vocab_size * pairs / seq_len
        flops = models * tokens * (6 * (n_params - table) + attn + head)
        total_tokens, total_flops = total_tokens + models * tokens, total_flops + flops
        # + about a minute per point to generate the data and compile (the train program, the evaluations)
        minutes[kind, size] = minutes.get((kind, size), 0.0) + flops / (args.tflops * 1e12) / 60 + 1.0
        print(f"| {kind} | {size} | {n_params:,} | {seq_len} | {pairs} | {batch} | {args.steps} | "
              f"{args.steps * batch / args.train_examples:.1f} | {tokens:.3g} | {flops / 1e15:.3g} | "
              f"{flops / (args.tflops * 1e12) / 60 + 1.0:.1f} |")
  print(f"total: {total_tokens:.3g} tokens, {total_flops / 1e15:.3g} PFLOP over "
        f"{len(kinds) * len(sizes) * len(lengths)} compiled programs; at an assumed {args.tflops:g} TFLOP/s "
        f"(--tflops) and a minute per point: " + ", ".join(f"{k} {s} {m:.0f} min" for (k, s), m in minutes.items())
        + f"; {sum(minutes.values()):.0f} min in all")
  return 0


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  plot_path = args.plot or os.path.splitext(args.out)[0] + ".png"
  try:
    for key in (o.split("=", 1)[0] for o in args.overrides):
      if not key.startswith("model.") or key == "model.vocab_size":
        raise config_lib.ConfigError(f"--config.{key}: the study sets this itself (--steps, --lrs, --vocab-size, "
                                     "...); only --config.model.KEY=VALUE overrides of the model apply")
    model_overrides = [o[len("model."):] for o in args.overrides]
    kinds, sizes, lengths, lrs, seeds = check_args(args)
    model_config(kinds[0], sizes[0], vocab_size=args.vocab_size, seq_len=max(lengths),
                 overrides=model_overrides)  # a bad override fails here, naming its key
    resuming = not args.merge and not args.dry_run and os.path.exists(args.out)
    if not args.dry_run:
      check_outputs(args, plot_path, resuming)
  except (UsageError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    return dry_run(args, kinds, sizes, lengths, lrs, seeds, model_overrides)
  if args.merge:
    rows = [row for path in args.merge for row in read_csv(path)]
    print_summary(write_outputs(rows, args.out, plot_path))
    return 0
  rows = read_csv(args.out) if resuming and not args.overwrite else []
  niah_lengths = _int_list("--niah-lengths", args.niah_lengths, "1024")
  done = {(r["kind"], r["size"], int(r["seq_len"])) for r in rows}
  for seq_len in lengths:
    todo = [(k, s) for s in sizes for k in kinds if (k, s, seq_len) not in done]
    if not todo:
      continue
    pairs = seq_len // args.tokens_per_pair
    train, test = study_data(seq_len, pairs, args.vocab_size, train_examples=args.train_examples,
                             test_examples=args.test_examples, data_seed=args.data_seed, power_a=args.power_a)
    niah_len = args.niah_factor * seq_len
    niah = [niah_dataset(args.niah_examples, niah_len, d, args.vocab_size, (args.data_seed, niah_len, i, 2))
            for i, d in enumerate(NIAH_DEPTHS)] if args.niah_examples and seq_len in niah_lengths else []
    batch = args.batch_size or zoology_batch_size(seq_len)
    for kind, size in todo:
      cfg = model_config(kind, size, vocab_size=args.vocab_size, seq_len=niah_len if niah else seq_len,
                         overrides=model_overrides)
      t0 = time.perf_counter()
      results = train_grid(cfg, train, test, lrs=lrs, seeds=seeds, steps=args.steps, batch_size=batch,
                           steps_per_call=args.steps_per_call, log_every=args.log_every, niah=niah,
                           label=f"{kind} {size} L={seq_len}")
      seconds = time.perf_counter() - t0
      n_params = sum(x.size for x in jax.tree.leaves(model_lib.abstract_params(cfg)))
      for r in results:
        rows.append({"kind": kind, "size": size, "params": n_params, "seq_len": seq_len, "num_pairs": pairs,
                     "vocab_size": args.vocab_size, "train_examples": args.train_examples,
                     "test_examples": args.test_examples, "batch_size": batch, "steps": args.steps,
                     "epochs": round(args.steps * batch / args.train_examples, 3), "lr": r["lr"], "seed": r["seed"],
                     "data_seed": args.data_seed, "power_a": args.power_a, "init_std": cfg.initializer_range,
                     "compute_dtype": cfg.compute_dtype, "final_train_loss": r["final_train_loss"],
                     "final_train_accuracy": r["final_train_accuracy"], "test_accuracy": r["test_accuracy"],
                     "niah_len": niah_len if niah else "",
                     **dict(zip(NIAH_COLUMNS, r["niah"] or [""] * len(NIAH_COLUMNS))), "train_seconds": round(seconds, 1),
                     "backend": jax.default_backend()})
      accs = [r["test_accuracy"] for r in results]
      print(f"{kind:9s} size={size} L={seq_len:5d} pairs={pairs:3d} test acc {min(accs):.3f}-{max(accs):.3f} over "
            f"{len(results)} models ({seconds:.0f}s)", flush=True)
      write_outputs(rows, args.out, plot_path)  # after every point, so a cut-off part keeps what finished
  if rows:
    print_summary(write_outputs(rows, args.out, plot_path))
  return 0


if __name__ == "__main__":
  sys.exit(main())
