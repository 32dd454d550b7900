"""Tests of the per-kind fits and verdicts (scaling/compare.py) on synthetic data with a known law."""

from __future__ import annotations

import numpy as np
import pytest

from scaling import compare
from scaling import fit as fit_lib

# L(N, D) = E + A / N^alpha + B / D^beta, C = 6 N D.
TRUE = dict(A=60.0, B=80.0, E=1.2, alpha=0.3, beta=0.3)


def _rows(kind, shift=0.0, noise=0.003, seed=0, budgets=(1e15, 3e15, 1e16, 3e16)):
  rng = np.random.default_rng(seed)
  rows = []
  for c in budgets:
    n_opt = (c / 6) ** 0.5
    for n in n_opt * np.geomspace(0.25, 4, 5):
      d = c / (6 * n)
      loss = (TRUE["E"] + shift + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"])
      loss *= np.exp(noise * rng.standard_normal())
      rows.append(dict(kind=kind, size=f"{n:.0f}", budget=str(c), learning_rate="0.003", seed="0",
                       n_params=str(n), tokens=str(d), compute=str(c), compute_paper=str(1.1 * c),
                       eval_loss=str(loss)))
  return rows


def test_fit_kind_recovers_the_allocation_exponents():
  f = compare.fit_kind(_rows("hybrid"), "hybrid", n_bootstrap=10, parametric_starts=8)
  assert not f.errors
  # alpha = beta: N* and D* both grow as C^0.5.
  assert f.isoflop.estimates["a"].value == pytest.approx(0.5, abs=0.08)
  assert f.parametric.alpha == pytest.approx(0.3, abs=0.1) and f.parametric.beta == pytest.approx(0.3, abs=0.1)
  e = f.isoflop.estimates["a"]
  assert e.low < e.value < e.high
  assert f.loss_vs_compute.b < 0 and f.seed_sd is None
  paper = compare.fit_kind(_rows("hybrid"), "hybrid", convention="paper", n_bootstrap=0, parametric_starts=8)
  assert paper.loss_vs_compute.a > 0 and paper.loss_vs_compute.b == pytest.approx(f.loss_vs_compute.b, abs=0.02)


def test_power_law_residual_bootstrap_covers_truth_and_differs_from_run_resampling():
  covered = 0
  for seed in range(5):
    rng = np.random.default_rng(seed)
    c = np.array([1e15, 3e15, 1e16, 3e16, 1e17])
    loss = 3.5 * c ** -0.077 * np.exp(0.004 * rng.standard_normal(c.size))
    f = compare.fit_power_law_residual(c, loss, n_bootstrap=300, seed=seed)
    assert f.b == pytest.approx(-0.077, abs=0.01)
    covered += f.estimates["b"].contains(-0.077)
    if seed == 0:
      with pytest.warns(UserWarning, match="dropped"):
        runs = fit_lib.fit_loss_vs_compute(c, loss, form="power", n_bootstrap=300, seed=0)
      assert runs.estimates["b"].value == pytest.approx(f.b)
      # Resampling 5 runs draws sets with < 3 distinct budgets (dropped) and gives another interval.
      width = lambda e: e.high - e.low
      assert abs(width(runs.estimates["b"]) / width(f.estimates["b"]) - 1) > 0.2
  assert covered >= 3


def test_budget_minima_take_each_budgets_lowest_run():
  c = np.array([1.0e15, 1.1e15, 0.9e15, 3e15, 3.2e15])
  budget = np.array([1e15, 1e15, 1e15, 3e15, 3e15])
  loss = np.array([2.0, 1.8, 1.9, 1.5, 1.6])
  cs, ls = compare.budget_minima(c, budget, loss)
  np.testing.assert_allclose(cs, [1.1e15, 3e15])
  np.testing.assert_allclose(ls, [1.8, 1.5])


def test_verdicts():
  assert compare.verdict_sign(-0.2, -0.1) == compare.SUPPORTS
  assert compare.verdict_sign(0.1, 0.2) == compare.CONTRADICTS
  assert compare.verdict_sign(-0.1, 0.2) == compare.UNDECIDED
  assert compare.verdict_value(-0.09, -0.07, -0.0798, 0.05) == compare.SUPPORTS
  assert compare.verdict_value(-0.2, -0.15, -0.0798, 0.1) == compare.CONTRADICTS
  assert compare.verdict_value(-1.0, 0.5, -0.0798, 0.1) == compare.UNDECIDED


@pytest.mark.slow  # three kinds' parametric fits: ~15 s idle, a minute on busy cores
def test_claims_on_synthetic_kinds():
  rows = _rows("softmax") + _rows("hybrid", shift=-0.1, seed=1) + _rows("lightning", shift=0.0, seed=2)
  rows.append(dict(rows[0], seed="1", eval_loss=str(float(rows[0]["eval_loss"]) * 1.002)))
  fits = compare.fit_kinds(rows, n_bootstrap=20, parametric_starts=8)
  assert fits["softmax"].seed_sd is not None
  by_claim = {c.claim.split(" reaches")[0]: c for c in compare.claims(fits)}
  assert by_claim["hybrid"].verdict == compare.SUPPORTS
  assert by_claim["lightning"].verdict != compare.SUPPORTS or "-0.0" in by_claim["lightning"].ours
  assert compare.PAPER_LOSS_VS_COMPUTE["softmax"] == (3.7087, -0.0798)
