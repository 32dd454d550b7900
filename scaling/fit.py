"""Compute-optimal scaling fits: the three approaches of Hoffmann et al. (2022).

Inputs are training runs as parallel 1-D arrays: N (parameters), D (training
tokens), C (training compute, FLOPs) and the final loss (nats/token).  All must
be finite and positive; anything else raises ValueError naming the array and
the offending index.

* Approach 1, `fit_envelope`: the lower envelope of loss against compute (the
  lowest loss in each log-spaced compute bin) gives the compute-optimal runs;
  power laws N*(C) = G_N C^a and D*(C) = G_D C^b are fitted to them.
* Approach 2, `fit_isoflop`: runs are grouped by compute budget (IsoFLOP
  profiles); a parabola in log N (and one in log D) per budget locates the
  loss-optimal size; power laws are fitted to the minima.
* Approach 3, `fit_parametric`: L(N, D) = E + A / N^alpha + B / D^beta,
  fitted as in the paper and in Besiroglu et al. (2024): minimise
  sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i)
  (A = e^a, B = e^b, E = e^e, delta = 1e-3) with L-BFGS from a grid of starting
  points (by default the 64 grid points with the lowest initial objective),
  keeping the best optimum.  With C = k N D (k = 6 by default) the
  compute-optimal allocation is N*(C) = G (C/k)^a, D*(C) = G^-1 (C/k)^b with
  a = beta/(alpha+beta), b = alpha/(alpha+beta), G = (alpha A / (beta B))^(1/(alpha+beta)).

Architectures are compared with `fit_loss_vs_compute` (L(C) = c + a C^b, or
a pure power law) on their compute frontier (`pareto_frontier`), and
`crossover` finds the compute at which one architecture overtakes another.

Every fitter takes `n_bootstrap` and returns percentile-bootstrap intervals
(`Estimate.low/high` at `level`) and bootstrap standard errors (`Estimate.se`)
for each fitted parameter.  Bootstrap resamples runs with replacement (within
each budget for Approach 2).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import optimize, special

# ---- results -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A fitted value with its bootstrap interval [low, high] (at the fit's level) and standard error."""

  value: float
  low: float = math.nan
  high: float = math.nan
  se: float = math.nan

  def contains(self, x: float) -> bool:
    return self.low <= x <= self.high

  def __str__(self) -> str:
    if math.isnan(self.low):
      return f"{self.value:.4g}"
    return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """y = coefficient * x ** exponent."""

  coefficient: float
  exponent: float

  def __call__(self, x):
    return self.coefficient * np.asarray(x, dtype=float) ** self.exponent


@dataclasses.dataclass(frozen=True)
class IsoFlopProfile:
  """One compute budget of Approach 2.

  `parabola_n` / `parabola_d` are polyfit coefficients (highest power first) of
  loss against ln N / ln D.  `used` is False when the profile has too few
  distinct sizes, opens downwards or has its minimum outside the sampled range
  (`reason` says which).
  """

  compute: float  # geometric mean of the runs' C (FLOPs)
  num_runs: int
  n_opt: float
  d_opt: float
  loss_opt: float
  parabola_n: Tuple[float, float, float]
  parabola_d: Tuple[float, float, float]
  used: bool
  reason: str = ""


@dataclasses.dataclass(frozen=True)
class AllocationFit:
  """Result of Approach 1 or 2: compute-optimal N*(C) and D*(C) power laws.

  estimates: "a" and "b" (exponents of N* and D*), "G_N" and "G_D" (their
  coefficients), each with bootstrap intervals.  frontier_*: the
  compute-optimal points the power laws were fitted to.
  """

  method: str  # "envelope" or "isoflop"
  n_opt: PowerLaw
  d_opt: PowerLaw
  estimates: Dict[str, Estimate]
  frontier_compute: np.ndarray
  frontier_n: np.ndarray
  frontier_d: np.ndarray
  frontier_loss: np.ndarray
  profiles: Tuple[IsoFlopProfile, ...] = ()
  level: float = 0.95
  bootstrap_samples: Optional[np.ndarray] = None  # [n_ok, 4]: a, b, log G_N, log G_D


PARAM_NAMES = ("A", "B", "E", "alpha", "beta")


@dataclasses.dataclass(frozen=True)
class ParametricFit:
  """Approach 3: L(N, D) = E + A / N^alpha + B / D^beta.

  estimates: A, B, E, alpha, beta and the allocation a, b, G, each with
  bootstrap intervals.  bootstrap_samples: [n_ok, 5] rows of (A, B, E, alpha,
  beta), for bands on derived quantities.
  """

  A: float
  B: float
  E: float
  alpha: float
  beta: float
  estimates: Dict[str, Estimate]
  objective: float  # summed Huber loss at the optimum
  num_runs: int
  delta: float
  level: float = 0.95
  bootstrap_samples: Optional[np.ndarray] = None

  @property
  def a(self) -> float:
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    return self.alpha / (self.alpha + self.beta)

  @property
  def G(self) -> float:
    return _allocation_g(self.A, self.B, self.alpha, self.beta)

  def predict(self, n, d) -> np.ndarray:
    """Loss L(N, D) (nats/token) for parameters n and tokens d (broadcast)."""
    return _law(np.asarray(n, float), np.asarray(d, float), self.A, self.B, self.E, self.alpha, self.beta)

  def compute_optimal(self, compute, flops_per_param_token: float = 6.0) -> Tuple[np.ndarray, np.ndarray]:
    """(N*, D*) minimising L subject to C = k N D, k = flops_per_param_token."""
    return _allocation(np.asarray(compute, float) / flops_per_param_token, self.A, self.B, self.alpha,
                       self.beta)

  def compute_optimal_band(self, compute, flops_per_param_token: float = 6.0,
                           level: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bootstrap percentile bands (n_low, n_high, d_low, d_high) of the compute-optimal allocation."""
    if self.bootstrap_samples is None or len(self.bootstrap_samples) < 2:
      raise ValueError("compute_optimal_band needs a fit with n_bootstrap >= 2")
    level = self.level if level is None else level
    x = np.asarray(compute, float)[..., None] / flops_per_param_token
    s = self.bootstrap_samples
    n_opt, d_opt = _allocation(x, s[:, 0], s[:, 1], s[:, 3], s[:, 4])
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    n_lo, n_hi = np.percentile(n_opt, q, axis=-1)
    d_lo, d_hi = np.percentile(d_opt, q, axis=-1)
    return n_lo, n_hi, d_lo, d_hi


@dataclasses.dataclass(frozen=True)
class LossComputeFit:
  """Loss against training compute: L(C) = c + a C^b ("saturating") or a C^b ("power", c = 0).

  The fit is done in units of C / compute_scale for conditioning; `a` is
  reported for raw C (FLOPs).  bootstrap_samples: [n_ok, 3] rows of (a, b, c).
  """

  form: str
  a: float
  b: float
  c: float
  estimates: Dict[str, Estimate]
  num_points: int
  level: float = 0.95
  bootstrap_samples: Optional[np.ndarray] = None

  def predict(self, compute) -> np.ndarray:
    return _loss_compute(np.asarray(compute, float), self.a, self.b, self.c)

  def band(self, compute, level: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Bootstrap percentile band (low, high) of the predicted loss at `compute`."""
    if self.bootstrap_samples is None or len(self.bootstrap_samples) < 2:
      raise ValueError("band needs a fit with n_bootstrap >= 2")
    level = self.level if level is None else level
    s = self.bootstrap_samples
    pred = _loss_compute(np.asarray(compute, float)[..., None], s[:, 0], s[:, 1], s[:, 2])
    lo, hi = np.percentile(pred, [(1 - level) / 2 * 100, (1 + level) / 2 * 100], axis=-1)
    return lo, hi


@dataclasses.dataclass(frozen=True)
class Crossover:
  """Where `fit_2` overtakes `fit_1` (or the reverse) within [compute_min, compute_max].

  compute: first C (FLOPs) where the two predicted losses are equal, None if
  they do not cross in range.  low/high: bootstrap interval of that C over
  the resamples that cross; fraction_crossing: the share of resamples that do.
  better_above: 1 or 2, the fit with the lower loss just above the crossover
  (or over the whole range when there is none).
  """

  compute: Optional[float]
  low: float
  high: float
  fraction_crossing: float
  better_above: int


# ---- validation ------------------------------------------------------------------


def _positive_arrays(min_points: int, **arrays) -> List[np.ndarray]:
  """Validates 1-D, equal-length, finite, positive arrays; returns them as float64."""
  out, length = [], None
  for name, x in arrays.items():
    try:
      a = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{name}: cannot be read as numbers ({e})") from None
    if a.ndim != 1:
      raise ValueError(f"{name}: must be a 1-D array, got shape {a.shape}")
    if length is None:
      length = a.size
    elif a.size != length:
      raise ValueError(f"{name}: has {a.size} values but the other arrays have {length}")
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
      raise ValueError(f"{name}: {bad.size} NaN/infinite value(s), first at index {bad[0]} ({a[bad[0]]})")
    bad = np.flatnonzero(a <= 0)
    if bad.size:
      raise ValueError(f"{name}: {bad.size} non-positive value(s), first at index {bad[0]} ({a[bad[0]]}); "
                       "scaling fits need positive sizes, tokens, compute and losses")
    out.append(a)
  if length < min_points:
    raise ValueError(f"too few points: this fit needs at least {min_points} runs, got {length}")
  return out


def _check_level(level: float, n_bootstrap: int) -> None:
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if n_bootstrap < 0:
    raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")


def _estimates(names: Sequence[str], values: Sequence[float], samples: Optional[np.ndarray],
               level: float) -> Dict[str, Estimate]:
  out = {}
  for j, (name, value) in enumerate(zip(names, values)):
    if samples is None or len(samples) < 2:
      out[name] = Estimate(float(value))
      continue
    col = samples[:, j]
    lo, hi = np.percentile(col, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    out[name] = Estimate(float(value), float(lo), float(hi), float(np.std(col, ddof=1)))
  return out


def _fit_power_law(x: np.ndarray, y: np.ndarray) -> Tuple[float, float]:
  """Least squares of ln y = ln G + p ln x: returns (p, ln G)."""
  p, log_g = np.polyfit(np.log(x), np.log(y), 1)
  return float(p), float(log_g)


# ---- Approach 1: lower envelope ------------------------------------------------------


def _envelope_indices(compute: np.ndarray, loss: np.ndarray, num_bins: int) -> np.ndarray:
  """Index of the lowest-loss run in each non-empty log-spaced compute bin (sorted by compute)."""
  log_c = np.log(compute)
  edges = np.linspace(log_c.min(), log_c.max(), num_bins + 1)
  which = np.clip(np.digitize(log_c, edges[1:-1]), 0, num_bins - 1)
  idx = []
  for k in range(num_bins):
    members = np.flatnonzero(which == k)
    if members.size:
      idx.append(members[np.argmin(loss[members])])
  return np.array(idx, dtype=int)


def fit_envelope(n, d, compute, loss, *, num_bins: Optional[int] = None, n_bootstrap: int = 0,
                 level: float = 0.95, seed: int = 0) -> AllocationFit:
  """Approach 1: power laws N*(C), D*(C) through the lower envelope of loss vs compute.

  n, d, compute, loss: [runs] (parameters, tokens, FLOPs, nats/token); rows may
  also be points along training curves (intermediate checkpoints).
  num_bins: log-spaced compute bins (default: runs // 4, between 4 and 30).
  """
  _check_level(level, n_bootstrap)
  n, d, compute, loss = _positive_arrays(4, n=n, d=d, compute=compute, loss=loss)
  num_bins = int(np.clip(len(n) // 4, 4, 30)) if num_bins is None else num_bins
  if num_bins < 3:
    raise ValueError(f"num_bins must be >= 3, got {num_bins}")
  if np.ptp(np.log(compute)) <= 0:
    raise ValueError("compute: all runs have the same compute; the envelope needs a range of budgets")

  def fit_once(idx_all):
    idx = idx_all[_envelope_indices(compute[idx_all], loss[idx_all], num_bins)]
    if np.unique(compute[idx]).size < 3:
      raise ValueError("too few points: fewer than 3 non-empty compute bins on the envelope")
    a, log_gn = _fit_power_law(compute[idx], n[idx])
    b, log_gd = _fit_power_law(compute[idx], d[idx])
    return idx, np.array([a, b, log_gn, log_gd])

  idx, theta = fit_once(np.arange(len(n)))
  samples = _bootstrap(lambda rng: fit_once(rng.choice(len(n), len(n)))[1], n_bootstrap, seed)
  return _allocation_result("envelope", theta, samples, level, compute[idx], n[idx], d[idx], loss[idx], ())


def _allocation_result(method, theta, samples, level, c, n, d, l, profiles) -> AllocationFit:
  a, b, log_gn, log_gd = theta
  derived = None
  if samples is not None:
    derived = np.column_stack([samples[:, 0], samples[:, 1], np.exp(samples[:, 2]), np.exp(samples[:, 3])])
  est = _estimates(("a", "b", "G_N", "G_D"), (a, b, math.exp(log_gn), math.exp(log_gd)), derived, level)
  order = np.argsort(c)
  return AllocationFit(method=method, n_opt=PowerLaw(math.exp(log_gn), a), d_opt=PowerLaw(math.exp(log_gd), b),
                       estimates=est, frontier_compute=c[order], frontier_n=n[order], frontier_d=d[order],
                       frontier_loss=l[order], profiles=tuple(profiles), level=level, bootstrap_samples=samples)


def _bootstrap(fit_fn: Callable[[np.random.Generator], np.ndarray], n_bootstrap: int,
               seed: int) -> Optional[np.ndarray]:
  """Runs `fit_fn` on n_bootstrap resamples; resamples whose fit fails are dropped."""
  if n_bootstrap == 0:
    return None
  rng = np.random.default_rng(seed)
  rows, failed = [], 0
  for _ in range(n_bootstrap):
    try:
      rows.append(fit_fn(rng))
    except (ValueError, np.linalg.LinAlgError, RuntimeError):
      failed += 1
  if failed > n_bootstrap // 2:
    raise ValueError(f"bootstrap: {failed} of {n_bootstrap} resamples could not be fitted; "
                     "the data do not constrain this fit")
  if failed:
    warnings.warn(f"bootstrap: dropped {failed} of {n_bootstrap} resamples that could not be fitted")
  return np.array(rows)


# ---- Approach 2: IsoFLOP profiles ---------------------------------------------------------


def group_by_compute(compute, tolerance_dex: float = 0.1) -> np.ndarray:
  """Budget labels: runs whose log10 C is within `tolerance_dex` of a group's smallest C share it.

  compute [runs] FLOPs -> int labels [runs], numbered by increasing compute.
  """
  (compute,) = _positive_arrays(1, compute=compute)
  log_c = np.log10(compute)
  order = np.argsort(log_c)
  labels = np.empty(len(compute), dtype=int)
  group, start = -1, -np.inf
  for i in order:
    if log_c[i] - start > tolerance_dex:
      group, start = group + 1, log_c[i]
    labels[i] = group
  return labels


def isoflop_profile(c, n, d, loss, min_runs: int = 3) -> IsoFlopProfile:
  """One budget's IsoFLOP profile: the parabola of loss in ln N (and ln D) and its minimum, or why it is unusable.

  c, n, d, loss: [runs] of one budget.  `used` is False with fewer than max(3, min_runs) distinct sizes, a
  parabola opening downwards or a minimum outside the sampled sizes (`reason` says which).
  """
  c_mean = float(np.exp(np.mean(np.log(c))))
  nan3 = (math.nan,) * 3
  if np.unique(n).size < max(3, min_runs):
    return IsoFlopProfile(c_mean, len(n), math.nan, math.nan, math.nan, nan3, nan3, False,
                          f"{np.unique(n).size} distinct sizes (needs {max(3, min_runs)})")
  ln_n, ln_d = np.log(n), np.log(d)
  pn = np.polyfit(ln_n, loss, 2)
  pd = np.polyfit(ln_d, loss, 2)
  if pn[0] <= 0 or pd[0] <= 0:
    return IsoFlopProfile(c_mean, len(n), math.nan, math.nan, math.nan, tuple(pn), tuple(pd), False,
                          "parabola opens downwards (no interior minimum)")
  x_n, x_d = -pn[1] / (2 * pn[0]), -pd[1] / (2 * pd[0])
  if not (ln_n.min() <= x_n <= ln_n.max() and ln_d.min() <= x_d <= ln_d.max()):
    with np.errstate(over="ignore"):
      n_x, d_x = float(np.exp(x_n)), float(np.exp(x_d))
    return IsoFlopProfile(c_mean, len(n), n_x, d_x, float(np.polyval(pn, x_n)), tuple(pn), tuple(pd), False,
                          "minimum outside the sampled sizes (extrapolated)")
  return IsoFlopProfile(c_mean, len(n), math.exp(x_n), math.exp(x_d), float(np.polyval(pn, x_n)), tuple(pn),
                        tuple(pd), True)


def fit_isoflop(n, d, compute, loss, *, budgets=None, tolerance_dex: float = 0.1, min_runs: int = 3,
                n_bootstrap: int = 0, level: float = 0.95, seed: int = 0) -> AllocationFit:
  """Approach 2: parabola minima of IsoFLOP profiles -> power laws N*(C), D*(C).

  budgets: optional [runs] labels of the compute budget of each run; by
  default runs are grouped by compute with `group_by_compute(tolerance_dex)`.
  Profiles with fewer than `min_runs` distinct sizes, a downward parabola or
  a minimum outside the sampled sizes are reported but not used.  At least two
  usable profiles are needed.
  """
  _check_level(level, n_bootstrap)
  n, d, compute, loss = _positive_arrays(6, n=n, d=d, compute=compute, loss=loss)
  labels = group_by_compute(compute, tolerance_dex) if budgets is None else np.asarray(budgets)
  if labels.shape != n.shape:
    raise ValueError(f"budgets: has shape {labels.shape} but there are {len(n)} runs")
  groups = [np.flatnonzero(labels == g) for g in np.unique(labels)]

  def fit_once(groups_idx):
    profiles = [isoflop_profile(compute[i], n[i], d[i], loss[i], min_runs) for i in groups_idx]
    used = [p for p in profiles if p.used]
    if len(used) < 2:
      reasons = "; ".join(f"C={p.compute:.3g}: {p.reason}" for p in profiles if not p.used)
      raise ValueError(f"too few points: {len(used)} usable IsoFLOP profile(s), need >= 2 ({reasons})")
    c_opt = np.array([p.compute for p in used])
    a, log_gn = _fit_power_law(c_opt, np.array([p.n_opt for p in used]))
    b, log_gd = _fit_power_law(c_opt, np.array([p.d_opt for p in used]))
    return profiles, np.array([a, b, log_gn, log_gd])

  profiles, theta = fit_once(groups)

  def resample(rng):
    return fit_once([rng.choice(i, len(i)) for i in groups])[1]

  samples = _bootstrap(resample, n_bootstrap, seed)
  used = [p for p in profiles if p.used]
  return _allocation_result("isoflop", theta, samples, level, np.array([p.compute for p in used]),
                            np.array([p.n_opt for p in used]), np.array([p.d_opt for p in used]),
                            np.array([p.loss_opt for p in used]), profiles)


# ---- Approach 3: parametric loss ----------------------------------------------------------

# Besiroglu et al. (2024) grid of starting points, in (a, b, e, alpha, beta) = (ln A, ln B, ln E, alpha, beta).
DEFAULT_INIT_GRID = {
    "a": tuple(np.arange(0.0, 25.1, 5.0)),
    "b": tuple(np.arange(0.0, 25.1, 5.0)),
    "e": tuple(np.arange(-1.0, 1.01, 0.5)),
    "alpha": tuple(np.arange(0.0, 2.01, 0.5)),
    "beta": tuple(np.arange(0.0, 2.01, 0.5)),
}


def _law(n, d, A, B, E, alpha, beta):
  return E + A / n ** alpha + B / d ** beta


def _allocation_g(A, B, alpha, beta):
  return (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))


def _allocation(c_over_k, A, B, alpha, beta):
  g = _allocation_g(A, B, alpha, beta)
  a, b = beta / (alpha + beta), alpha / (alpha + beta)
  return g * c_over_k ** a, c_over_k ** b / g


def _huber_objective(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_l: np.ndarray,
                     delta: float) -> Tuple[float, np.ndarray]:
  """Summed Huber loss of LSE(a - alpha ln N, b - beta ln D, e) - ln L, and its gradient."""
  a, b, e, alpha, beta = theta
  u1, u2 = a - alpha * ln_n, b - beta * ln_d
  m = np.maximum(np.maximum(u1, u2), e)
  w1, w2, w3 = np.exp(u1 - m), np.exp(u2 - m), np.exp(e - m)
  total = w1 + w2 + w3
  r = m + np.log(total) - ln_l
  abs_r = np.abs(r)
  loss = np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta)).sum()
  g = np.clip(r, -delta, delta) / total  # d loss / d lse, divided by the softmax normaliser
  g1, g2 = g * w1, g * w2
  grad = np.array([g1.sum(), g2.sum(), (g * w3).sum(), -(g1 @ ln_n), -(g2 @ ln_d)])
  return float(loss), grad


def _huber_objective_batch(thetas: np.ndarray, ln_n, ln_d, ln_l, delta: float) -> np.ndarray:
  """The objective at many parameter vectors at once: thetas [starts, 5] -> [starts]."""
  a, b, e, alpha, beta = (thetas[:, j:j + 1] for j in range(5))
  u = np.stack([a - alpha * ln_n, b - beta * ln_d, np.broadcast_to(e, (len(thetas), len(ln_n)))])
  r = special.logsumexp(u, axis=0) - ln_l
  abs_r = np.abs(r)
  return np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta)).sum(axis=1)


def _minimise(theta0, args, tol):
  res = optimize.minimize(_huber_objective, theta0, args=args, jac=True, method="L-BFGS-B",
                          options=dict(maxiter=2000, ftol=tol, gtol=tol, maxcor=20))
  return res.fun, res.x


def _best_of(starts: np.ndarray, args, tol) -> Tuple[float, np.ndarray, List[Tuple[float, np.ndarray]]]:
  results = []
  with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
    for theta0 in starts:
      f, x = _minimise(theta0, args, tol)
      if np.isfinite(f) and np.all(np.isfinite(x)):
        results.append((f, x))
  if not results:
    raise ValueError("L-BFGS failed from every starting point")
  results.sort(key=lambda r: r[0])
  return results[0][0], results[0][1], results


def _grid_starts(grid: Dict[str, Iterable[float]]) -> np.ndarray:
  missing = {"a", "b", "e", "alpha", "beta"} - set(grid)
  if missing:
    raise ValueError(f"init_grid: missing keys {sorted(missing)}")
  return np.array(list(itertools.product(*(tuple(grid[k]) for k in ("a", "b", "e", "alpha", "beta")))),
                  dtype=float)


def _theta_to_params(theta: np.ndarray) -> np.ndarray:
  a, b, e, alpha, beta = theta
  return np.array([math.exp(a), math.exp(b), math.exp(e), alpha, beta])


def fit_parametric(n, d, loss, *, delta: float = 1e-3, init_grid: Optional[Dict[str, Iterable[float]]] = None,
                   num_starts: Optional[int] = 64, tol: float = 1e-12, n_bootstrap: int = 0,
                   bootstrap_starts: int = 4, level: float = 0.95, seed: int = 0) -> ParametricFit:
  """Approach 3: L(N, D) = E + A/N^alpha + B/D^beta by Huber-on-log-loss and L-BFGS from a grid.

  n, d, loss: [runs] parameters, tokens, final loss (nats/token).
  init_grid: starting values of a = ln A, b = ln B, e = ln E, alpha, beta
    (default: Besiroglu et al.'s 6 x 6 x 5 x 5 x 5 grid, 4,500 starts).
  num_starts: run L-BFGS only from the `num_starts` grid points with the
    lowest initial objective (None: from every grid point, minutes of CPU).
    On the Chinchilla runs the best of the 64 best starts is the optimum
    the replication reports for its full grid.
  bootstrap_starts: each bootstrap refit starts from the full-data optimum and
    the next best distinct optima of the full-data grid search, this many in
    all (re-running the whole grid per resample costs minutes).
  """
  _check_level(level, n_bootstrap)
  if not delta > 0:
    raise ValueError(f"delta must be positive, got {delta}")
  n, d, loss = _positive_arrays(6, n=n, d=d, loss=loss)
  args = (np.log(n), np.log(d), np.log(loss), delta)
  starts = _grid_starts(DEFAULT_INIT_GRID if init_grid is None else init_grid)
  if num_starts is not None:
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
      f0 = _huber_objective_batch(starts, *args)
    starts = starts[np.argsort(np.nan_to_num(f0, nan=np.inf))[:num_starts]]
  best_f, best_theta, all_results = _best_of(starts, args, tol)
  if best_theta[3] <= 0 or best_theta[4] <= 0:
    warnings.warn(f"fit_parametric: non-positive exponent at the optimum (alpha={best_theta[3]:.3g}, "
                  f"beta={best_theta[4]:.3g}); the data may not constrain L(N, D)")

  # Distinct local optima of the full fit, best first, as bootstrap starting points.
  boot_starts = [best_theta]
  for _, x in all_results[1:]:
    if len(boot_starts) >= bootstrap_starts:
      break
    if all(np.max(np.abs(x - y)) > 1e-2 for y in boot_starts):
      boot_starts.append(x)
  boot_starts = np.array(boot_starts)

  def refit(rng):
    idx = rng.choice(len(n), len(n))
    _, theta, _ = _best_of(boot_starts, (args[0][idx], args[1][idx], args[2][idx], delta), tol)
    return _theta_to_params(theta)

  samples = _bootstrap(refit, n_bootstrap, seed)
  params = _theta_to_params(best_theta)
  A, B, E, alpha, beta = params
  names = PARAM_NAMES + ("a", "b", "G")
  values = tuple(params) + (beta / (alpha + beta), alpha / (alpha + beta), _allocation_g(A, B, alpha, beta))
  derived = None
  if samples is not None:
    sa, sb, _, sal, sbe = samples.T
    derived = np.column_stack([samples, sbe / (sal + sbe), sal / (sal + sbe), _allocation_g(sa, sb, sal, sbe)])
  return ParametricFit(A=float(A), B=float(B), E=float(E), alpha=float(alpha), beta=float(beta),
                       estimates=_estimates(names, values, derived, level), objective=float(best_f),
                       num_runs=len(n), delta=delta, level=level, bootstrap_samples=samples)


# ---- loss vs compute per architecture -------------------------------------------------------


def pareto_frontier(compute, loss) -> np.ndarray:
  """Indices of runs no cheaper run beats: loss lower than every run with less compute (sorted by C)."""
  compute, loss = _positive_arrays(1, compute=compute, loss=loss)
  order = np.lexsort((loss, compute))
  keep, best = [], np.inf
  for i in order:
    if loss[i] < best:
      keep.append(i)
      best = loss[i]
  return np.array(keep, dtype=int)


def _loss_compute(c, a, b, cst):
  return cst + a * c ** b


def _fit_loss_compute_once(c: np.ndarray, loss: np.ndarray, form: str, scale: float) -> np.ndarray:
  x = c / scale
  ln_x, ln_l = np.log(x), np.log(loss)
  b0, ln_a0 = np.polyfit(ln_x, ln_l, 1)
  if form == "power":
    return np.array([math.exp(ln_a0) * scale ** (-b0), b0, 0.0])

  def residuals(p):  # p = (ln a, b, c): relative (log) residuals
    return np.log(np.maximum(p[2] + np.exp(p[0]) * x ** p[1], 1e-300)) - ln_l

  best = None
  lmin = loss.min()
  for frac in (0.0, 0.5, 0.8, 0.95):
    c0 = frac * lmin
    span = np.maximum(loss - c0, 1e-12)
    bb, la = np.polyfit(ln_x, np.log(span), 1)
    p0 = np.array([la, min(bb, -1e-3), c0])
    try:
      res = optimize.least_squares(residuals, p0, bounds=([-50, -5.0, 0.0], [50, 0.0, lmin]), method="trf",
                                   xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=2000)
    except ValueError:
      continue
    if best is None or res.cost < best.cost:
      best = res
  if best is None:
    raise ValueError("L(C) fit failed from every starting point")
  ln_a, b, cst = best.x
  return np.array([math.exp(ln_a) * scale ** (-b), b, cst])


def fit_loss_vs_compute(compute, loss, *, form: str = "saturating", n_bootstrap: int = 0, level: float = 0.95,
                        seed: int = 0) -> LossComputeFit:
  """Fits L(C) = c + a C^b (form="saturating", b < 0, 0 <= c <= min loss) or L = a C^b (form="power").

  compute, loss: [points] FLOPs and nats/token, typically one architecture's
  compute frontier (`pareto_frontier`).  Least squares on log-loss residuals.
  Needs >= 4 points (saturating) or >= 3 (power).
  """
  if form not in ("saturating", "power"):
    raise ValueError(f"form must be 'saturating' or 'power', got {form!r}")
  _check_level(level, n_bootstrap)
  compute, loss = _positive_arrays(4 if form == "saturating" else 3, compute=compute, loss=loss)
  if np.unique(compute).size < 3:
    raise ValueError("too few points: L(C) needs at least 3 distinct compute values")
  scale = float(np.exp(np.mean(np.log(compute))))
  theta = _fit_loss_compute_once(compute, loss, form, scale)

  def refit(rng):
    idx = rng.choice(len(compute), len(compute))
    if np.unique(compute[idx]).size < 3:
      raise ValueError("degenerate resample")
    return _fit_loss_compute_once(compute[idx], loss[idx], form, scale)

  samples = _bootstrap(refit, n_bootstrap, seed)
  return LossComputeFit(form=form, a=float(theta[0]), b=float(theta[1]), c=float(theta[2]),
                        estimates=_estimates(("a", "b", "c"), theta, samples, level), num_points=len(compute),
                        level=level, bootstrap_samples=samples)


def _first_crossing(f1: Callable, f2: Callable, log_grid: np.ndarray) -> Optional[float]:
  diff = f1(np.exp(log_grid)) - f2(np.exp(log_grid))
  sign = np.sign(diff)
  change = np.flatnonzero(sign[:-1] * sign[1:] < 0)
  if change.size == 0:
    zero = np.flatnonzero(diff == 0)
    return float(np.exp(log_grid[zero[0]])) if zero.size else None
  k = change[0]
  root = optimize.brentq(lambda lc: f1(np.exp(lc)) - f2(np.exp(lc)), log_grid[k], log_grid[k + 1], xtol=1e-12)
  return float(np.exp(root))


def crossover(fit_1: LossComputeFit, fit_2: LossComputeFit, compute_min: float, compute_max: float,
              level: float = 0.95, num_grid: int = 2000) -> Crossover:
  """Compute (FLOPs) in [compute_min, compute_max] at which the two fitted L(C) curves cross.

  The bootstrap interval pairs the i-th resample of each fit (both fits need
  bootstrap samples for an interval; otherwise low = high = nan).
  """
  if not (0 < compute_min < compute_max) or not math.isfinite(compute_max):
    raise ValueError(f"need 0 < compute_min < compute_max, got {compute_min}, {compute_max}")
  grid = np.linspace(math.log(compute_min), math.log(compute_max), num_grid)
  c_x = _first_crossing(fit_1.predict, fit_2.predict, grid)
  probe = math.exp(grid[-1]) if c_x is None else min(c_x * 1.01, compute_max)
  better_above = 1 if fit_1.predict(probe) <= fit_2.predict(probe) else 2
  low = high = math.nan
  fraction = math.nan
  s1, s2 = fit_1.bootstrap_samples, fit_2.bootstrap_samples
  if s1 is not None and s2 is not None and min(len(s1), len(s2)) >= 2:
    found = []
    m = min(len(s1), len(s2))
    for i in range(m):
      p1, p2 = s1[i], s2[i]
      x = _first_crossing(lambda c: _loss_compute(c, *p1), lambda c: _loss_compute(c, *p2), grid)
      if x is not None:
        found.append(x)
    fraction = len(found) / m
    if len(found) >= 2:
      low, high = np.percentile(found, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
  return Crossover(compute=c_x, low=float(low), high=float(high), fraction_crossing=fraction,
                   better_above=better_above)
