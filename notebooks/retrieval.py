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
# Multi-query associative recall (MQAR): key-value pairs, then every key queried once more in a filler
# region; the loss counts only the answers.  `recipes/retrieval.py` trains one model per
# (attention kind, size, context length) and writes a CSV; the recorded study ran one process per
# (kind, size) on one GPU, with two learning rates and three seeds, merged with `--merge`:
#
#     bash benchmarks/gpu_suite.sh retrieval   # the study's GPU runs (see BENCHMARKS.md for the options)
#     python -m recipes.retrieval --merge res/retrieval_*.csv --out results/retrieval.csv --overwrite
#     python -m recipes.retrieval --cpu-smoke --out results/retrieval_cpu_smoke.csv --overwrite  # minutes on CPU
#
# This notebook reads the study's CSV if present, else the CPU smoke run, else runs a micro version.
#
# How to read it: a model that has learned only *which* values are in the context, and which were already
# asked for, answers each query correctly with probability H_P / P (`retrieval.elimination_baseline`,
# 0.34 for 8 pairs).  Accuracy near that line means no associative recall; near 1 means the lookup was
# learned.  Whether a tiny model learns it within the budget is a sudden, seed-dependent transition, so the
# study counts, per point, how many runs learned it (BENCHMARKS.md, "Retrieval study").

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
# ## One example sequence

# %%
ex = retrieval.mqar_batch(np.random.default_rng(0), 1, 31, 4, vocab_size=64)
toks, mask = ex["tokens"][0], ex["loss_mask"][0]
print("tokens :", toks.tolist())
print("answers:", [(int(toks[t]), int(toks[t + 1])) for t in np.nonzero(mask)[0]], "(query key, value to predict)")

# %% [markdown]
# ## Results

# %%
candidates = [os.path.join(ROOT, "results", "retrieval.csv"), os.path.join(ROOT, "results", "retrieval_cpu_smoke.csv")]
path = next((p for p in candidates if os.path.exists(p)), None)
if path is None:  # nothing recorded yet: a micro run (seconds per model)
  path = "/tmp/retrieval_micro.csv"
  retrieval.main(["--cpu-smoke", "--steps", "30", "--lengths", "32", "--sizes", "xs", "--out", path])
rows = retrieval.read_csv(path)
print(f"{path} ({len(rows)} runs, backend {rows[0]['backend']})")
print(f"{'kind':10s} {'size':4s} {'params':>8s} {'seq_len':>7s} {'pairs':>5s} {'steps':>5s} {'accuracy':>8s} "
      f"{'no-recall line':>14s}")
for r in rows:
  print(f"{r['kind']:10s} {r['size']:4s} {int(r['params']):8d} {int(r['seq_len']):7d} {int(r['num_pairs']):5d} "
        f"{int(r['steps']):5d} {float(r['eval_accuracy']):8.3f} "
        f"{retrieval.elimination_baseline(int(r['num_pairs'])):14.3f}")

# %% [markdown]
# Per (kind, size, context length): runs, runs that learned the recall (accuracy >= 0.9), best and median.

# %%
for g in retrieval.summarize(rows):
  print(f"{g['kind']:10s} {g['size']:3s} {g['seq_len']:5d}  runs {g['runs']}  learned {g['learned']}  "
        f"best {g['best']:.3f}  median {g['median']:.3f}")

# %%
import tempfile
png = os.path.join(tempfile.gettempdir(), os.path.basename(os.path.splitext(path)[0]) + "_notebook.png")
retrieval.plot(rows, png)
try:
  from IPython.display import Image, display
  display(Image(png))
except ImportError:
  print("plot written to", png)
