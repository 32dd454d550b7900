"""Softmax vs lightning vs hybrid: per-kind scaling fits of the IsoFLOP study, beside the paper's, and verdicts.

    fits = fit_kinds(rows, convention="causal", n_bootstrap=200)   # rows: scaling/isoflop.py's CSV
    for c in claims(fits): print(c)

Per kind (`fit_kind`): Approach 1 (envelope), 2 (IsoFLOP parabolas) and 3 (parametric L(N, D)) of
scaling/fit.py, and L(C) = a C^b through the IsoFLOP minima, with compute under either FLOP convention
("causal": our count, the CSV's `compute`; "paper": MiniMax-01's Table 1, `compute_paper`).

Intervals: a profile has 5 runs, so resampling runs (scaling/fit.py's default bootstrap) mostly draws
degenerate sets with too few distinct sizes.  Here intervals come from a residual bootstrap instead: every
budget's losses are smoothed by a parabola in ln N, the log-residuals are pooled (degrees-of-freedom
corrected), and each resample adds redrawn residuals to the smooth losses, keeping every run's N, D and C;
all approaches are refitted on each resample.  Runs repeated with another seed are averaged first, and the
spread between seeds is reported (`seed_sd`) beside the residual scale (`residual_sd`): when seeds disagree
more than residuals, the intervals are too narrow and the report says so.

`claims` states per claim of the paper "supports", "contradicts" or "cannot decide" from interval overlap.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from scaling import fit as fit_lib

# MiniMax-01, section 2.2: L(C) = a C^b (C in FLOPs, Table-1 convention), 70M-7B models, context 8192.
PAPER_LOSS_VS_COMPUTE = {"softmax": (3.7087, -0.0798), "lightning": (3.5391, -0.0768), "hybrid": (3.4797, -0.0763)}
# The paper's Table 2 also gives N_opt(C) and D_opt(C) power laws per kind; their values are not in this
# repository (no offline copy of the paper) and stay None until copied from the paper, so no verdict uses them.
PAPER_TABLE2 = {kind: {"loss": PAPER_LOSS_VS_COMPUTE[kind], "n_opt": None, "d_opt": None}
                for kind in PAPER_LOSS_VS_COMPUTE}
CONVENTIONS = {"causal": "compute", "paper": "compute_paper"}
SUPPORTS, CONTRADICTS, UNDECIDED = "supports", "contradicts", "cannot decide"


@dataclasses.dataclass(frozen=True)
class KindFit:
  """One kind's fits.  Estimates carry residual-bootstrap intervals at `level`."""

  kind: str
  convention: str
  num_runs: int
  envelope: Optional[fit_lib.AllocationFit]
  isoflop: Optional[fit_lib.AllocationFit]
  parametric: Optional[fit_lib.ParametricFit]
  loss_vs_compute: fit_lib.LossComputeFit  # power law through the IsoFLOP minima
  residual_sd: float  # pooled log-residual scale of the profiles
  seed_sd: Optional[float]  # log-loss spread between seeds of the same point (None without repeats)
  errors: Dict[str, str]


def runs_from_rows(rows: Sequence[dict], kind: str, convention: str = "causal") -> dict:
  """One kind's runs as arrays, seeds averaged: n, d, compute, loss, budget; and the seed spread (log loss)."""
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
  groups: Dict[tuple, list] = {}
  for r in rows:
    if r["kind"] != kind or not r.get("eval_loss"):
      continue
    key = (r["size"], float(r["budget"]), float(r["learning_rate"]))
    groups.setdefault(key, []).append(r)
  # Per (size, budget) keep the learning rate with the lowest mean loss (the check runs several).
  best: Dict[tuple, list] = {}
  for (size, budget, _), rs in groups.items():
    mean = np.mean([float(r["eval_loss"]) for r in rs])
    if (size, budget) not in best or mean < np.mean([float(r["eval_loss"]) for r in best[(size, budget)]]):
      best[(size, budget)] = rs
  cols = {k: [] for k in ("n", "d", "compute", "loss", "budget")}
  diffs = []
  for rs in best.values():
    losses = np.array([float(r["eval_loss"]) for r in rs])
    cols["n"].append(float(rs[0]["n_params"]))
    cols["d"].append(float(rs[0]["tokens"]))
    cols["compute"].append(float(rs[0][CONVENTIONS[convention]]))
    cols["loss"].append(float(np.exp(np.mean(np.log(losses)))))
    cols["budget"].append(float(rs[0]["budget"]))
    if len(losses) > 1:
      diffs.extend(np.log(losses) - np.mean(np.log(losses)))
  out = {k: np.array(v) for k, v in cols.items()}
  out["seed_sd"] = float(np.sqrt(np.sum(np.square(diffs)) / max(1, len(diffs) - 1))) if len(diffs) > 1 else None
  return out


def smooth_profiles(n, budget, loss) -> tuple:
  """(smoothed loss, pooled log-residuals): a parabola of ln L in ln N per budget (>= 4 runs), else the mean."""
  pred = np.empty_like(loss)
  dof = 0
  for b in np.unique(budget):
    i = np.flatnonzero(budget == b)
    deg = 2 if i.size >= 4 else 0
    p = np.polyfit(np.log(n[i]), np.log(loss[i]), deg)
    pred[i] = np.exp(np.polyval(p, np.log(n[i])))
    dof += i.size - (deg + 1)
  resid = np.log(loss) - np.log(pred)
  if dof <= 0:
    raise ValueError("too few points: each budget needs more runs than its smoothing parabola has parameters")
  return pred, resid * math.sqrt(len(loss) / dof)


def residual_bootstrap(fit_fn, pred: np.ndarray, resid: np.ndarray, n_bootstrap: int, seed: int = 0) -> np.ndarray:
  """fit_fn(loss) -> parameter vector, on `n_bootstrap` resamples pred * exp(redrawn residuals); [ok, params]."""
  resid = resid - resid.mean()
  return fit_lib._bootstrap(lambda rng: fit_fn(pred * np.exp(rng.choice(resid, resid.size))), n_bootstrap, seed)


def _power_theta(compute, loss) -> np.ndarray:
  b, ln_a = np.polyfit(np.log(compute), np.log(loss), 1)
  return np.array([math.exp(ln_a), b, 0.0])


def fit_power_law_residual(compute, loss, *, n_bootstrap: int = 200, level: float = 0.95,
                           seed: int = 0) -> fit_lib.LossComputeFit:
  """L(C) = a C^b by least squares in log-log, with a residual bootstrap of its own residuals."""
  compute, loss = fit_lib._positive_arrays(3, compute=compute, loss=loss)
  theta = _power_theta(compute, loss)
  pred = theta[0] * compute ** theta[1]
  resid = (np.log(loss) - np.log(pred)) * math.sqrt(len(loss) / max(1, len(loss) - 2))
  samples = residual_bootstrap(lambda l: _power_theta(compute, l), pred, resid, n_bootstrap, seed)
  return fit_lib.LossComputeFit(form="power", a=float(theta[0]), b=float(theta[1]), c=0.0,
                                estimates=fit_lib._estimates(("a", "b", "c"), theta, samples, level),
                                num_points=len(loss), level=level, bootstrap_samples=samples)


def fit_kind(rows: Sequence[dict], kind: str, *, convention: str = "causal", n_bootstrap: int = 200,
             level: float = 0.95, seed: int = 0, parametric_starts: int = 64) -> KindFit:
  """Approaches 1-3 and L(C) for one kind, with residual-bootstrap intervals (see the module docstring).

  parametric_starts: L-BFGS starts of Approach 3's full fit (scaling/fit.py's num_starts); its resamples
  restart from the full fit's optimum.
  """
  r = runs_from_rows(rows, kind, convention)
  n, d, c, loss, budget = r["n"], r["d"], r["compute"], r["loss"], r["budget"]
  if len(np.unique(budget)) < 2:
    raise ValueError(f"{kind}: runs at {len(np.unique(budget))} budget(s); the fits need at least 2")
  pred, resid = smooth_profiles(n, budget, loss)
  labels = np.unique(budget, return_inverse=True)[1]
  errors: Dict[str, str] = {}
  kw = dict(level=level)

  def with_samples(make, refit):
    try:
      base = make(loss)
    except ValueError as e:
      return None, str(e)
    samples = residual_bootstrap(refit, pred, resid, n_bootstrap, seed) if n_bootstrap else None
    return base, samples

  # Approach 2 and its minima drive L(C).
  def iso(l):
    return fit_lib.fit_isoflop(n, d, c, l, budgets=labels, **kw)

  def iso_theta(l):
    f = iso(l)
    return np.array([f.n_opt.exponent, f.d_opt.exponent, math.log(f.n_opt.coefficient),
                     math.log(f.d_opt.coefficient)])

  isoflop, s = with_samples(iso, iso_theta)
  if isoflop is None:
    errors["isoflop"] = s
  elif s is not None:
    isoflop = fit_lib._allocation_result("isoflop", iso_theta(loss), s, level, isoflop.frontier_compute,
                                         isoflop.frontier_n, isoflop.frontier_d, isoflop.frontier_loss,
                                         isoflop.profiles)

  def env(l):
    return fit_lib.fit_envelope(n, d, c, l, num_bins=max(3, len(np.unique(budget))), **kw)

  def env_theta(l):
    f = env(l)
    return np.array([f.n_opt.exponent, f.d_opt.exponent, math.log(f.n_opt.coefficient),
                     math.log(f.d_opt.coefficient)])

  envelope, s = with_samples(env, env_theta)
  if envelope is None:
    errors["envelope"] = s
  elif s is not None:
    envelope = fit_lib._allocation_result("envelope", env_theta(loss), s, level, envelope.frontier_compute,
                                          envelope.frontier_n, envelope.frontier_d, envelope.frontier_loss, ())

  parametric = None
  try:
    parametric = fit_lib.fit_parametric(n, d, loss, num_starts=parametric_starts, **kw)
    best = {"a": (math.log(parametric.A),), "b": (math.log(parametric.B),), "e": (math.log(parametric.E),),
            "alpha": (parametric.alpha,), "beta": (parametric.beta,)}
    samples = (residual_bootstrap(lambda l: fit_lib._theta_to_params(_parametric_theta(n, d, l, best)), pred, resid,
                                  n_bootstrap, seed) if n_bootstrap else None)
    if samples is not None:
      A, B, E, al, be = samples.T
      derived = np.column_stack([samples, be / (al + be), al / (al + be), fit_lib._allocation_g(A, B, al, be)])
      values = (parametric.A, parametric.B, parametric.E, parametric.alpha, parametric.beta, parametric.a,
                parametric.b, parametric.G)
      parametric = dataclasses.replace(parametric, bootstrap_samples=samples, estimates=fit_lib._estimates(
          fit_lib.PARAM_NAMES + ("a", "b", "G"), values, derived, level))
  except ValueError as e:
    errors["parametric"] = str(e)

  # L(C) through the budget minima (each budget's lowest-loss run).
  c_min, l_min = budget_minima(c, budget, loss)
  base = _power_theta(c_min, l_min)
  samples = residual_bootstrap(lambda l: _power_theta(*budget_minima(c, budget, l)), pred, resid, n_bootstrap,
                               seed) if n_bootstrap else None
  lc = fit_lib.LossComputeFit(form="power", a=float(base[0]), b=float(base[1]), c=0.0,
                              estimates=fit_lib._estimates(("a", "b", "c"), base, samples, level),
                              num_points=len(c_min), level=level, bootstrap_samples=samples)
  return KindFit(kind=kind, convention=convention, num_runs=len(n), envelope=envelope, isoflop=isoflop,
                 parametric=parametric, loss_vs_compute=lc, residual_sd=float(np.std(resid, ddof=0)),
                 seed_sd=r["seed_sd"], errors=errors)


def _parametric_theta(n, d, loss, grid) -> np.ndarray:
  args = (np.log(n), np.log(d), np.log(loss), 1e-3)
  _, theta, _ = fit_lib._best_of(fit_lib._grid_starts(grid), args, 1e-12)
  return theta


def budget_minima(c, budget, loss):
  """Per budget: the lowest loss and that run's compute (under the paper's convention it differs per size)."""
  cs, ls = [], []
  for b in np.unique(budget):
    i = np.flatnonzero(budget == b)
    j = i[np.argmin(loss[i])]
    cs.append(float(c[j]))
    ls.append(float(loss[j]))
  return np.array(cs), np.array(ls)


def fit_kinds(rows: Sequence[dict], kinds: Sequence[str] = tuple(PAPER_LOSS_VS_COMPUTE), **kw) -> Dict[str, KindFit]:
  return {k: fit_kind(rows, k, **kw) for k in kinds}


# ---- verdicts --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Claim:
  claim: str
  ours: str
  verdict: str

  def __str__(self) -> str:
    return f"{self.verdict:13s} | {self.claim} | ours: {self.ours}"


def verdict_sign(low: float, high: float, expect_negative: bool = True) -> str:
  """An interval entirely on the expected side of 0 supports, entirely on the other contradicts."""
  if not (math.isfinite(low) and math.isfinite(high)):
    return UNDECIDED
  if high < 0:
    return SUPPORTS if expect_negative else CONTRADICTS
  if low > 0:
    return CONTRADICTS if expect_negative else SUPPORTS
  return UNDECIDED


def verdict_value(low: float, high: float, value: float, max_width: float) -> str:
  """Supports if `value` is inside [low, high]; contradicts if outside; cannot decide if the interval is wider
  than `max_width` (it would contain almost anything) or missing."""
  if not (math.isfinite(low) and math.isfinite(high)) or high - low > max_width:
    return UNDECIDED
  return SUPPORTS if low <= value <= high else CONTRADICTS


def _difference_interval(f1: fit_lib.LossComputeFit, f2: fit_lib.LossComputeFit, compute: float,
                         level: float) -> tuple:
  s1, s2 = f1.bootstrap_samples, f2.bootstrap_samples
  value = float(f1.predict(compute) - f2.predict(compute))
  if s1 is None or s2 is None:
    return value, math.nan, math.nan
  m = min(len(s1), len(s2))
  diff = s1[:m, 0] * compute ** s1[:m, 1] - s2[:m, 0] * compute ** s2[:m, 1]
  lo, hi = np.percentile(diff, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
  return value, float(lo), float(hi)


def claims(fits: Dict[str, KindFit], *, level: float = 0.95, exponent_width: float = 0.05) -> List[Claim]:
  """The paper's claims about L(C), judged on our fits (see verdict_sign / verdict_value).

  Loss differences are judged at the geometric middle of the budgets our softmax fit spans.
  """
  out = []
  if "softmax" in fits:
    soft = fits["softmax"].loss_vs_compute
    mid = float(np.exp(np.mean(np.log([fits["softmax"].isoflop.frontier_compute.min(),
                                       fits["softmax"].isoflop.frontier_compute.max()])))
                ) if fits["softmax"].isoflop is not None else 1e16
    for kind in ("lightning", "hybrid"):
      if kind in fits:
        v, lo, hi = _difference_interval(fits[kind].loss_vs_compute, soft, mid, level)
        out.append(Claim(f"{kind} reaches lower loss than softmax at equal compute (C={mid:.2g})",
                         f"L_{kind} - L_softmax = {v:+.4f} [{lo:+.4f}, {hi:+.4f}] nats", verdict_sign(lo, hi)))
  for kind, fit in fits.items():
    if kind in PAPER_LOSS_VS_COMPUTE:
      e = fit.loss_vs_compute.estimates["b"]
      paper_b = PAPER_LOSS_VS_COMPUTE[kind][1]
      out.append(Claim(f"{kind}: L(C) exponent {paper_b} ({fit.convention} FLOPs)", str(e),
                       verdict_value(e.low, e.high, paper_b, exponent_width)))
  return out
