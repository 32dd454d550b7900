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
# # Chinchilla scaling laws on public data: validating `scaling.fit`
#
# The 240 Chinchilla training runs of Hoffmann et al. (2022), as extracted from the paper's Figure 4 by
# Besiroglu et al. (2024) (shipped in `scaling/public_data/chinchilla_epoch/` with its provenance README; five highest-loss
# runs dropped).  We fit
#
# * **Approach 3**: $L(N, D) = E + A/N^\alpha + B/D^\beta$ by a Huber loss ($\delta = 10^{-3}$) on log-loss
#   residuals, L-BFGS from a grid of starts, with bootstrap intervals;
# * **Approach 2**: IsoFLOP parabolas in $\log N$, minima → $N^*(C)$;
# * **Approach 1**: lower envelope of loss vs compute → $N^*(C)$;
#
# and compare with the published estimates.  Figures go to `notebooks/figures/`.

# %%
import os
import sys
from pathlib import Path

ROOT = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "scaling" / "fit.py").exists()), None)
if ROOT is None:
  raise RuntimeError(f"run this notebook from inside the repository (cwd {Path.cwd()} is not)")
sys.path.insert(0, str(ROOT))
FIGURES = Path(os.environ.get("MX01_PUBLIC_FIGURES", ROOT / "notebooks" / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from scaling import data, fit

N_BOOTSTRAP = 30  # the paper uses 4,000 resamples; 30 keeps this notebook well under a minute

runs = data.load_chinchilla_epoch()
print(f"{len(runs)} runs, N from {runs.n.min():.3g} to {runs.n.max():.3g}, C from {runs.compute.min():.3g} "
      f"to {runs.compute.max():.3g} FLOPs")

# %% [markdown]
# ## Approach 3: parametric fit, against the published numbers

# %%
PUBLISHED = {  # Besiroglu et al. 2024: estimate, bootstrap 95% interval; Hoffmann et al. 2022
    "A": (482.01, (285.2, 743.6), 406.4),
    "B": (2085.43, (1042.4, 5810.3), 410.7),
    "E": (1.817, (1.769, 1.871), 1.69),
    "alpha": (0.3478, (0.317, 0.373), 0.34),
    "beta": (0.3658, (0.331, 0.415), 0.28),
}
p3 = fit.fit_parametric(runs.n, runs.d, runs.loss, n_bootstrap=N_BOOTSTRAP, bootstrap_starts=1)
print(f"{'':6s} {'ours [95% bootstrap]':>30s} {'Besiroglu et al. [95%]':>32s} {'Hoffmann':>9s}  inside?")
for name, (value, (lo, hi), hoffmann) in PUBLISHED.items():
  est = p3.estimates[name]
  print(f"{name:6s} {est.value:10.4g} [{est.low:8.4g}, {est.high:8.4g}]   {value:10.4g} [{lo:8.4g}, {hi:8.4g}]"
        f" {hoffmann:9.4g}  {'yes' if lo <= est.value <= hi else 'NO'}")
for name in ("a", "b", "G"):
  print(f"{name:6s} {p3.estimates[name]}")
n70, d70 = p3.compute_optimal(5.76e23)
print(f"\nCompute-optimal at Chinchilla's budget (5.76e23 FLOPs): N* = {n70 / 1e9:.1f}B parameters, "
      f"D* = {d70 / 1e12:.2f}T tokens (Chinchilla: 70B, 1.4T); tokens per parameter {d70 / n70:.1f}")

# %% [markdown]
# ## IsoFLOP profiles (Approach 2) with the Approach-3 surface
#
# Runs are grouped by compute (within 0.1 dex).  Each profile gets a parabola in $\log N$ (dashed); the solid
# line is the parametric fit along the same budget, $L(N, C/6N)$.

# %%
p2 = fit.fit_isoflop(runs.n, runs.d, runs.compute, runs.loss, tolerance_dex=0.1, min_runs=10,
                     n_bootstrap=N_BOOTSTRAP)
used = [p for p in p2.profiles if p.used]
print(f"{len(p2.profiles)} compute groups, {len(used)} usable IsoFLOP profiles")
for p in p2.profiles:
  print(f"  C={p.compute:9.3g}  runs={p.num_runs:3d}  " + (f"N*={p.n_opt:9.3g}" if p.used else p.reason))
print(f"Approach 2: N* ~ C^{p2.estimates['a']}, D* ~ C^{p2.estimates['b']}")

labels = fit.group_by_compute(runs.compute, 0.1)
cmap = matplotlib.colormaps["viridis"]
fig, ax = plt.subplots(figsize=(7.5, 5))
for k, p in enumerate(p2.profiles):
  if not p.used:
    continue
  color = cmap(np.log(p.compute / used[0].compute) / np.log(used[-1].compute / used[0].compute))
  idx = np.flatnonzero(labels == k)
  ax.scatter(runs.n[idx], runs.loss[idx], s=14, color=color)
  grid_n = np.geomspace(runs.n[idx].min() / 1.5, runs.n[idx].max() * 1.5, 100)
  ax.plot(grid_n, np.polyval(p.parabola_n, np.log(grid_n)), "--", color=color, lw=1)
  ax.plot(grid_n, p3.predict(grid_n, p.compute / (6 * grid_n)), "-", color=color, lw=1.5,
          label=f"C = {p.compute:.1e}")
  ax.plot(p.n_opt, p.loss_opt, "k*", ms=9)
ax.set_xscale("log")
ax.set_xlabel("parameters N")
ax.set_ylabel("final training loss (nats/token)")
ax.set_ylim(runs.loss.min() - 0.1, 3.6)
ax.set_title("Chinchilla IsoFLOP profiles: parabolas (dashed), Approach-3 fit (solid), minima (*)")
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
fig.savefig(FIGURES / "chinchilla_isoflop.png", dpi=110)
plt.show()

# %% [markdown]
# ## Compute-optimal model size: the three approaches
#
# Approach-3 band: 95% bootstrap band of $N^*(C)$.  Approach 1 uses the lowest-loss run per compute bin (only
# final losses are public, not whole training curves, so the envelope is coarse).

# %%
p1 = fit.fit_envelope(runs.n, runs.d, runs.compute, runs.loss, num_bins=12, n_bootstrap=N_BOOTSTRAP)
print(f"Approach 1: N* ~ C^{p1.estimates['a']}")
print(f"Approach 2: N* ~ C^{p2.estimates['a']}")
print(f"Approach 3: N* ~ C^{p3.estimates['a']}")
print("Hoffmann et al. 2022: a = 0.50 (1), 0.49 (2), 0.46 (3)")

c_grid = np.geomspace(1e18, 1e25, 200)
n3, _ = p3.compute_optimal(c_grid)
n_lo, n_hi, _, _ = p3.compute_optimal_band(c_grid)
fig, ax = plt.subplots(figsize=(7, 5))
ax.fill_between(c_grid, n_lo, n_hi, color="C2", alpha=0.25, label="Approach 3, 95% bootstrap band")
ax.plot(c_grid, n3, color="C2", label=f"Approach 3: a = {p3.a:.3f}")
ax.plot(c_grid, p2.n_opt(c_grid), color="C1", label=f"Approach 2: a = {p2.n_opt.exponent:.3f}")
ax.plot(c_grid, p1.n_opt(c_grid), color="C0", label=f"Approach 1: a = {p1.n_opt.exponent:.3f}")
ax.scatter(p2.frontier_compute, p2.frontier_n, color="C1", marker="s", s=25, zorder=3, label="IsoFLOP minima")
ax.scatter(p1.frontier_compute, p1.frontier_n, color="C0", s=12, zorder=3, label="envelope runs")
ax.scatter([5.76e23], [70e9], color="k", marker="*", s=120, zorder=4, label="Chinchilla (70B)")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("training compute C (FLOPs)")
ax.set_ylabel("compute-optimal parameters N*")
ax.legend(fontsize=8)
ax.set_title("Compute-optimal model size, three approaches")
fig.tight_layout()
fig.savefig(FIGURES / "chinchilla_compute_optimal.png", dpi=110)
plt.show()

# %% [markdown]
# ## Bootstrap distributions of the exponents
#
# Our bootstrap (grey) against the published 95% intervals (blue band) and Hoffmann et al.'s estimate (red).

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
for ax, name, col in zip(axes, ("alpha", "beta", "E"), (3, 4, 2)):
  value, (lo, hi), hoffmann = PUBLISHED[name]
  ax.hist(p3.bootstrap_samples[:, col], bins=15, color="0.6")
  ax.axvspan(lo, hi, color="C0", alpha=0.2, label="published 95%")
  ax.axvline(getattr(p3, name), color="k", label="ours")
  ax.axvline(hoffmann, color="C3", ls="--", label="Hoffmann 2022")
  ax.set_title(name)
axes[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(FIGURES / "chinchilla_bootstrap.png", dpi=110)
plt.show()
