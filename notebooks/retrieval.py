# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Associative recall: softmax vs lightning vs hybrid
#
# Multi-query associative recall (MQAR) as in Zoology (Arora et al. 2023): key-value pairs, then every key
# queried once more, the value the target; the loss counts only the answers.  `recipes/retrieval.py` trains,
# per (attention kind, size, context length), 4 learning rates x 3 seeds at once on a fixed training set and
# writes one CSV row per model, a summary (best learning rate by the mean over seeds, that mean and its
# standard error) and a plot; its docstring lists the GPU commands and the merge:
#
#     python -m recipes.retrieval --merge runs/retrieval/*-xs.csv runs/retrieval/*-s.csv --out runs/retrieval/study.csv
#     python -m recipes.retrieval --cpu-smoke --out runs/retrieval/smoke.csv    # minutes on CPU
#
# This notebook reads the study's summary ($MX01_RETRIEVAL_CSV, else runs/retrieval/study.csv, else the CPU
# smoke run), else runs a micro version.  (The first version of the study, `results/retrieval*.csv`, had
# other columns; BENCHMARKS.md keeps its results.)
#
# How to read it: a model that has learned only *which* values are in the context, and which keys were already
# asked for, answers each query correctly with probability H_P / P (`retrieval.elimination_baseline`, the
# dashed line; 0.52 at 4 pairs down to 0.074 at 64).  Near that line means no associative recall; near 1 means
# the lookup was learned.

# %%
import os
import sys

# The repository root: $MX01_ROOT, else the first of cwd and its parents that holds recipes/retrieval.py.
ROOT = os.environ.get("MX01_ROOT") or next(
    (d for d in (os.getcwd(), os.path.dirname(os.getcwd())) if os.path.exists(os.path.join(d, "recipes", "retrieval.py"))),
    os.getcwd())
sys.path.insert(0, ROOT)

import numpy as np
from recipes import retrieval

# %% [markdown]
# ## One example sequence (vocabulary 64, 32 tokens, 2 pairs)

# %%
ex = retrieval.mqar_dataset(1, 32, 2, 64, seed=0)
toks = ex["inputs"][0]
print("inputs :", toks.tolist())
print("answers:", [(int(p), int(toks[p]), int(a)) for p, a in zip(ex["answer_pos"][0], ex["answers"][0])],
      "(position, queried key, value to predict)")
needle = retrieval.niah_dataset(1, 16, 0.5, 64, seed=0)
print("NIAH at depth 50%:", needle["inputs"][0].tolist(), "-> answer", int(needle["answers"][0, 0]))

# %% [markdown]
# ## Results

# %%
candidates = [os.environ.get("MX01_RETRIEVAL_CSV", ""), os.path.join(ROOT, "runs", "retrieval", "study.csv"),
              os.path.join(ROOT, "runs", "retrieval", "smoke.csv")]
path = next((p for p in candidates if p and os.path.exists(p)), None)
if path is None:  # nothing recorded yet: a micro run (seconds per model on CPU)
  path = "/tmp/retrieval_micro.csv"
  retrieval.main(["--cpu-smoke", "--kinds", "softmax", "--lengths", "16", "--steps", "30", "--out", path,
                  "--overwrite"])
rows = retrieval.read_csv(path)
summary = retrieval.summarize(rows)
print(f"{path}: {len(rows)} models, {len(summary)} points, backend {rows[0]['backend']}")
print(f"{'kind':10s} {'size':4s} {'params':>9s} {'context':>7s} {'pairs':>5s} {'seeds':>5s} {'best LR':>8s} "
      f"{'accuracy':>15s} {'no recall':>9s}  LR means")
for g in summary:
  print(f"{g['kind']:10s} {g['size']:4s} {int(g['params']):9d} {g['seq_len']:7d} {g['num_pairs']:5d} {g['seeds']:5d} "
        f"{g['best_lr']:8.2g} {g['mean_accuracy']:7.3f} +- {g['se_accuracy']:5.3f} {g['no_recall']:9.3f}  "
        f"{g['lr_means']}")

# %% [markdown]
# Needle in a haystack (models trained at the lengths of `--niah-lengths`): accuracy by the depth of the one
# key-value pair in a context twice the training length, at the best learning rate (mean over seeds).

# %%
for g in summary:
  if not np.isnan(g["niah_0_mean"]):
    print(f"{g['kind']:10s} {g['size']:4s} trained at {g['seq_len']:5d}, tested at {g['niah_len']}: " + "  ".join(
        f"{round(100 * d):3d}%: {g[f'{c}_mean']:.2f}" for d, c in zip(retrieval.NIAH_DEPTHS, retrieval.NIAH_COLUMNS)))

# %%
import tempfile
png = os.path.join(tempfile.gettempdir(), os.path.basename(os.path.splitext(path)[0]) + "_notebook.png")
retrieval.plot(summary, png)
try:
  from IPython.display import Image, display
  display(Image(png))
except ImportError:
  print("plot written to", png)
