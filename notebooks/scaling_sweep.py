# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Our scaling sweep: softmax vs lightning vs hybrid attention
#
# Reads `results/sweep.csv` (written by `python -m recipes.sweep`; another file with `MX01_SWEEP_CSV=...`),
# whatever rows it holds.  Per architecture:
# held-out loss against training compute $C$ (from `scaling.flops`, causal attention, 3 × forward), the
# compute frontier (runs no cheaper run beats), a fitted $L(C) = c + a\,C^{b}$ on the frontier with a
# bootstrap band, and the compute at which one architecture's frontier overtakes another's.
# With enough runs per architecture, Approach 3 ($L(N, D)$) is fitted as well.  Figures go to
# `notebooks/figures/`.

# %%
import os
import sys
import warnings
from pathlib import Path

ROOT = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "scaling" / "fit.py").exists()), None)
if ROOT is None:
  raise RuntimeError(f"run this notebook from inside the repository (cwd {Path.cwd()} is not)")
sys.path.insert(0, str(ROOT))
FIGURES = Path(os.environ.get("MX01_SWEEP_FIGURES", ROOT / "notebooks" / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
SWEEP_CSV = Path(os.environ.get("MX01_SWEEP_CSV", ROOT / "results" / "sweep.csv"))

import itertools

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from scaling import data, fit

# Bootstrap resamples of the frontier fits (the L(N, D) fits take a fifth as many); the tests, which only
# check that every cell runs, ask for fewer.
N_BOOTSTRAP = int(os.environ.get("MX01_SWEEP_BOOTSTRAP", "100"))
LOSS_COLUMN = "eval_loss"  # held-out loss; "final_loss" for the training loss
COLORS = {"softmax": "C3", "lightning": "C0", "hybrid": "C2"}

rows = data.read_csv_rows(SWEEP_CSV)
if not rows:
  print(f"No sweep results yet: {SWEEP_CSV} is missing or empty.  Run for example\n"
        "  python -m recipes.sweep --out results/sweep.csv --archs softmax,lightning,hybrid "
        "--sizes s1,s2,s3 --tokens 5e4,1.5e5\n"
        "and re-run this notebook.  The cells below do nothing until then.")
  by_arch = {}
else:
  by_arch = {}
  for r in rows:
    if r.get(LOSS_COLUMN) in (None, "", "None"):
      continue
    by_arch.setdefault(r["arch"], []).append(r)
  for arch, rs in by_arch.items():
    sizes = sorted({r["size"] for r in rs})
    print(f"{arch:9s}: {len(rs):3d} runs, sizes {', '.join(sizes)}, "
          f"C from {min(float(r['compute']) for r in rs):.3g} to {max(float(r['compute']) for r in rs):.3g} FLOPs")


def columns(rs):
  """(N non-embedding, D tokens, C FLOPs, loss) arrays of a list of CSV rows."""
  return tuple(np.array([float(r[k]) for r in rs]) for k in ("n_params", "tokens", "compute", LOSS_COLUMN))


# %% [markdown]
# ## Loss vs compute and the fitted frontiers

# %%
frontier_fits = {}
if by_arch:
  fig, ax = plt.subplots(figsize=(7.5, 5))
  c_all = np.concatenate([columns(rs)[2] for rs in by_arch.values()])
  loss_all = np.concatenate([columns(rs)[3] for rs in by_arch.values()])
  c_grid = np.geomspace(c_all.min() / 1.5, c_all.max() * 1.5, 200)  # bands only near the data
  for arch, rs in sorted(by_arch.items()):
    n, d, c, loss = columns(rs)
    color = COLORS.get(arch, None)
    ax.scatter(c, loss, s=np.interp(np.log(n), np.log([n.min(), n.max() + 1]), [12, 60]), color=color,
               alpha=0.45)
    front = fit.pareto_frontier(c, loss)
    ax.plot(c[front], loss[front], "o", color=color, mfc="none", ms=9)
    form = "saturating" if len(front) >= 4 else "power" if len(front) >= 3 else None
    if form is None:
      print(f"{arch}: {len(front)} frontier point(s); need >= 3 to fit L(C)")
      continue
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      f = fit.fit_loss_vs_compute(c[front], loss[front], form=form, n_bootstrap=N_BOOTSTRAP)
    frontier_fits[arch] = f
    lo, hi = f.band(c_grid)
    ax.fill_between(c_grid, lo, hi, color=color, alpha=0.15)
    ax.plot(c_grid, f.predict(c_grid), color=color,
            label=f"{arch}: L = {f.c:.2f} + {f.a:.3g} C^{f.b:.3f}" if form == "saturating"
            else f"{arch}: L = {f.a:.3g} C^{f.b:.3f}")
    print(f"{arch:9s} frontier fit ({form}, {len(front)} points): a={f.estimates['a']}, b={f.estimates['b']}, "
          f"c={f.estimates['c']}")
  ax.set_xscale("log")
  ax.set_ylim(loss_all.min() - 0.1, loss_all.max() + 0.15)
  ax.set_xlabel("training compute C (FLOPs)")
  ax.set_ylabel(f"{LOSS_COLUMN} (nats/byte)")
  ax.set_title("Sweep: loss vs compute (marker size ~ N; circled: frontier; bands: 95% bootstrap)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(FIGURES / "sweep_loss_vs_compute.png", dpi=110)
  plt.show()

# %% [markdown]
# ## Crossovers
#
# For each pair of architectures: the compute where the fitted frontiers cross, within the swept range
# extended by 10× on either side, with the bootstrap interval and the share of resamples that cross there.

# %%
if len(frontier_fits) >= 2:
  c_lo, c_hi = c_all.min() / 10, c_all.max() * 10
  for (name_1, f1), (name_2, f2) in itertools.combinations(sorted(frontier_fits.items()), 2):
    x = fit.crossover(f1, f2, c_lo, c_hi)
    better = name_1 if x.better_above == 1 else name_2
    if x.compute is None:
      print(f"{name_1} vs {name_2}: no crossover in [{c_lo:.2g}, {c_hi:.2g}] FLOPs; {better} is better throughout "
            f"({x.fraction_crossing:.0%} of bootstrap resamples cross)")
    else:
      print(f"{name_1} vs {name_2}: cross at C = {x.compute:.3g} FLOPs [{x.low:.3g}, {x.high:.3g}], "
            f"{better} better above; {x.fraction_crossing:.0%} of resamples cross in range")
elif by_arch:
  print("Need fitted frontiers for at least two architectures to look for crossovers.")

# %% [markdown]
# ## Approach 3 per architecture (when the grid allows)
#
# $L(N, D)$ needs runs spanning both model size and tokens; with few runs the exponents are poorly
# constrained, so treat these as indicative and read the bootstrap intervals.

# %%
param_fits = {}
for arch, rs in sorted(by_arch.items()):
  n, d, c, loss = columns(rs)
  if len(rs) < 6 or np.unique(n).size < 2 or np.unique(d).size < 2:
    print(f"{arch}: {len(rs)} runs, {np.unique(n).size} sizes, {np.unique(d).size} token budgets - "
          "too few for L(N, D) (needs >= 6 runs over >= 2 sizes and >= 2 budgets)")
    continue
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    p = fit.fit_parametric(n, d, loss, num_starts=32, n_bootstrap=max(2, N_BOOTSTRAP // 5),
                             bootstrap_starts=1)
  param_fits[arch] = p
  print(f"{arch:9s} E={p.estimates['E']}  alpha={p.estimates['alpha']}  beta={p.estimates['beta']}  "
        f"a={p.estimates['a']}")

if param_fits:
  fig, axes = plt.subplots(1, len(param_fits), figsize=(4.2 * len(param_fits), 3.6), squeeze=False)
  for ax, (arch, p) in zip(axes[0], param_fits.items()):
    n, d, c, loss = columns(by_arch[arch])
    for tokens in np.unique(d):
      sel = d == tokens
      ax.scatter(n[sel], loss[sel], s=15)
      grid_n = np.geomspace(n.min() / 1.5, n.max() * 1.5, 50)
      ax.plot(grid_n, p.predict(grid_n, tokens), lw=1, label=f"D = {tokens:.2g}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("non-embedding parameters N")
    ax.set_title(f"{arch}: L(N, D) fit")
  axes[0][0].set_ylabel(f"{LOSS_COLUMN} (nats/byte)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(FIGURES / "sweep_parametric.png", dpi=110)
  plt.show()
