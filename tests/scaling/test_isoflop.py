"""Tests of the IsoFLOP plan (scaling/isoflop.py) and the paper's FLOP convention (scaling/flops.py)."""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
import shutil

import pytest

from mx01.config import SOFTMAX
from recipes import sweep
from scaling import flops, isoflop


def test_paper_flops_formulas():
  soft, light, hyb = (isoflop.model_config(k, "i256") for k in ("softmax", "lightning", "hybrid"))
  l, d, n = 8, 256, 2048
  base = 72 * l * d * d
  assert flops.paper_training_flops_per_token(soft, n) == pytest.approx(base * (1 + n / (6 * d) + 5 / (18 * d)))
  assert flops.paper_training_flops_per_token(light, n) == pytest.approx(base * (1 + 1 / (2 * n) + 5 / (18 * d)))
  assert flops.paper_training_flops_per_token(hyb, n) == pytest.approx(
      base * (1 + n / (48 * d) + 7 / (16 * n) + 5 / (18 * d)))
  assert flops.paper_training_flops(hyb, n, 10) == pytest.approx(10 * flops.paper_training_flops_per_token(hyb, n))
  # N = 12 l d^2 is within 1% of the preset's softmax non-embedding count (the presets are built for it).
  assert flops.param_count(soft).non_embedding == pytest.approx(flops.paper_param_count(soft), rel=0.01)


@pytest.mark.parametrize("budget", isoflop.BUDGETS)
def test_plan_points_meet_the_study_design(budget):
  points = isoflop.plan([budget], ["softmax", "lightning", "hybrid"])
  for kind in ("softmax", "lightning", "hybrid"):
    assert len({p.size for p in points if p.kind == kind}) >= 5
  for p in points:
    cfg = isoflop.run_config(p)
    assert cfg.model.num_layers >= 8 and cfg.data.seq_len >= 2048
    if p.kind == "hybrid":
      assert cfg.model.resolved_layer_types.count(SOFTMAX) * 8 == cfg.model.num_layers
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    assert flops.training_flops(cfg.model, 2048, tokens) == pytest.approx(budget, rel=0.05)
    assert cfg.train.eval_batches * cfg.train.batch_size * 2048 >= 1_000_000
  if budget == isoflop.BUDGETS[0]:
    assert {p.learning_rate for p in points} == set(isoflop.LR_GRID)


def test_point_key_tracks_result_changing_values_only(tmp_path):
  p = isoflop.Point("hybrid", "i128", 1e15, 3e-3)
  key = isoflop.point_key(isoflop.run_config(p), isoflop.Corpus())
  assert key == isoflop.point_key(isoflop.run_config(p, run_root=tmp_path), isoflop.Corpus())
  for other in (isoflop.Point("hybrid", "i128", 1e15, 6e-3), isoflop.Point("hybrid", "i128", 1e15, 3e-3, seed=1),
                isoflop.Point("softmax", "i128", 1e15, 3e-3), isoflop.Point("hybrid", "i128", 3e15, 3e-3)):
    assert isoflop.point_key(isoflop.run_config(other), isoflop.Corpus()) != key
  assert isoflop.point_key(isoflop.run_config(p), isoflop.Corpus(fingerprint="abc")) != key
  # The lightning kernels' launch settings change no result: a retuned default keeps every point's key.
  cfg = isoflop.run_config(p)
  tiles = dataclasses.replace(cfg.model.lightning_kernel, block_size=128, num_stages=2)
  retuned = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lightning_kernel=tiles))
  assert isoflop.point_key(retuned, isoflop.Corpus()) == key
  # ... while the model itself does.
  other_model = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, block_size=cfg.model.block_size * 2))
  assert isoflop.point_key(other_model, isoflop.Corpus()) != key


def test_committed_rows_keep_their_keys(tmp_path):
  # Every run in results/isoflop.csv is found again by today's plan: its key, from the config the run would
  # get now and the corpus the runs used (results/gpu/isoflop_corpus_manifest.json), is the one in its row.
  # A config field added without its place in the key (or in isoflop._NOT_IN_KEY, when it changes no
  # result) would make every committed run look new, and the next device call would train them all again.
  repo = pathlib.Path(__file__).resolve().parents[2]
  (tmp_path / "docs").mkdir()
  shutil.copy(repo / "results" / "gpu" / "isoflop_corpus_manifest.json", tmp_path / "manifest.json")
  corpus = isoflop.Corpus.from_dir(tmp_path)
  with open(repo / "results" / "isoflop.csv") as f:
    rows = list(csv.DictReader(f))
  assert rows
  for r in rows:
    point = isoflop.Point(r["kind"], r["size"], float(r["budget"]), float(r["learning_rate"]), int(r["seed"]))
    assert isoflop.point_key(isoflop.run_config(point, corpus), corpus) == r["key"], point.name


def _fake_loss(cfg):
  # A bowl in log N around 2M parameters, best at learning rate 6e-3, seed-dependent by 1e-3.
  n = flops.param_count(cfg.model).non_embedding
  return 2.0 + 0.1 * math.log(n / 2e6) ** 2 + abs(math.log(cfg.train.learning_rate / 6e-3)) * 0.05 + 1e-3 * cfg.train.seed


def _fake_train(calls):
  def train(cfg, resume, log):
    assert resume
    calls.append(cfg)
    return {"final_train_loss": _fake_loss(cfg), "eval_loss": _fake_loss(cfg), "tokens_per_sec": 1.0, "mfu": None}
  return train


def test_run_plan_resumes_checks_lr_adds_seeds_and_stops_on_time(tmp_path):
  out, calls, logs = tmp_path / "iso.csv", [], []
  kw = dict(kinds=["hybrid"], out=out, run_root=tmp_path / "runs", train_fn=_fake_train(calls), log=logs.append)
  # A clock that advances 100 s per call: the time budget stops the first call after a few points.
  t = [0.0]

  def clock():
    t[0] += 100.0
    return t[0]

  first = isoflop.run_plan([1e15, 3e15], time_budget_s=1000, clock=clock, **kw)
  assert 0 < len(first) < 11 and any(line.startswith("stopping") for line in logs)
  rows = isoflop.run_plan([1e15, 3e15], **kw)
  all_rows = isoflop.read_rows(out)
  assert len(all_rows) == len(first) + len(rows) == len(calls)
  assert len({r["key"] for r in all_rows}) == len(all_rows)
  # 3 checked sizes x 3 rates, plus 1.2e-2 at each (the fake loss is best at the grid's top edge, 6e-3), and
  # 2 more sizes at 1e15; 5 sizes at 3e15 at the checked rate; one second seed per budget.
  assert len(all_rows) == 9 + 3 + 2 + 5 + 2
  assert {float(r["learning_rate"]) for r in all_rows if r["phase"] == "lr"} == {1.5e-3, 3e-3, 6e-3, 1.2e-2}
  grid = [r for r in all_rows if r["phase"] == "grid"]
  assert len(grid) == 7 and {float(r["learning_rate"]) for r in grid} == {6e-3}
  seeds = [r for r in all_rows if r["phase"] == "seed"]
  assert {r["seed"] for r in seeds} == {"1"} and len(seeds) == 2
  for s in seeds:  # at the budget's lowest-loss size
    same = [r for r in all_rows if r["budget"] == s["budget"] and r["seed"] == "0"]
    assert s["size"] == min(same, key=lambda r: float(r["eval_loss"]))["size"]
  assert isoflop.run_plan([1e15, 3e15], **kw) == [] and len(calls) == len(all_rows)


def test_run_plan_fills_the_time_left_with_a_later_final_point(tmp_path):
  """When the next point would overrun the budget, the first later point that fits runs instead, never a grid
  point still at the base rate (its key changes once the learning-rate check is done)."""
  out, calls, logs = tmp_path / "iso.csv", [], []
  t = [0.0]

  def train(cfg, resume, log):
    calls.append(cfg)
    t[0] += 1e9  # the run ends the call's time
    return {"final_train_loss": 2.0, "eval_loss": 2.0, "tokens_per_sec": 1.0, "mfu": None}

  cost = isoflop.CostModel()
  est = {}
  for p in isoflop.plan([1e15], ["hybrid"]):
    est[p] = cost.seconds(**{k: isoflop.describe(p, isoflop.run_config(p))[k] for k in ("compute", "steps")})
  first = next(iter(est))
  budget = (min(e for p, e in est.items() if p.phase == "lr") + est[first]) / 2
  assert min(est.values()) < budget < est[first]
  isoflop.run_plan([1e15], ["hybrid"], out, run_root=tmp_path / "runs", time_budget_s=budget, train_fn=train,
                   log=logs.append, clock=lambda: t[0])
  assert len(calls) == 1 and any(line.startswith("filling") for line in logs)
  (ran,) = [p for p in est if isoflop.run_config(p, run_root=tmp_path / "runs").train.run_dir == calls[0].train.run_dir]
  assert ran != first and ran.phase == "lr" and est[ran] <= budget
  assert ran == next(p for p in est if p.phase == "lr" and p != first and est[p] <= budget)

  # Every rate of the check done but the first width's: only grid points at the base rate would fit, so the
  # call stops rather than run a point whose config is not final.
  out2, calls[:], logs[:] = tmp_path / "iso2.csv", [], []
  done = [p for p in est if p.phase == "lr" and p.size != first.size]
  cols = isoflop.CSV_COLUMNS
  with open(out2, "w") as f:
    f.write(",".join(cols) + "\n")
    for p in done:
      row = dict(isoflop.describe(p, isoflop.run_config(p)), key=isoflop.point_key(isoflop.run_config(p),
                 isoflop.Corpus()), eval_loss=2.0 + abs(math.log(p.learning_rate / 3e-3)), final_loss=2.0,
                 wall_time_s="")  # bracketed: best at the middle rate, so the check adds no rate
      f.write(",".join(str(row.get(c, "")) for c in cols) + "\n")
  grid = [p for p in est if p.phase == "grid"]
  budget = (max(est[p] for p in grid) + est[first]) / 2
  assert max(est[p] for p in grid) < budget < min(est[p] for p in est if p.size == first.size)
  isoflop.run_plan([1e15], ["hybrid"], out2, run_root=tmp_path / "runs", time_budget_s=budget, train_fn=train,
                   log=logs.append, clock=lambda: t[0])
  assert calls == [] and any(line.startswith("stopping") for line in logs)


def _lr_rows(kind, size, losses):
  return [dict(kind=kind, size=size, budget=str(isoflop.BUDGETS[0]), seed="0", learning_rate=str(lr),
               eval_loss=str(loss)) for lr, loss in losses.items()]


def test_lr_check_extends_past_the_edge_until_bracketed():
  grid = (1.5e-3, 3e-3, 6e-3)
  check = lambda losses, **kw: isoflop.lr_check_rates(_lr_rows("hybrid", "i64", losses), "hybrid", "i64", grid, **kw)
  assert check({}) == ([1.5e-3, 3e-3, 6e-3], None)
  assert check({1.5e-3: 2.0, 3e-3: 1.8}) == ([1.5e-3, 3e-3, 6e-3], None)  # one rate still to run
  assert check({1.5e-3: 2.0, 3e-3: 1.8, 6e-3: 1.9}) == ([1.5e-3, 3e-3, 6e-3], 3e-3)  # bracketed
  # Best at the top edge: twice the top is checked next, and the best of the four is chosen.
  assert check({1.5e-3: 2.0, 3e-3: 1.8, 6e-3: 1.7}) == ([1.5e-3, 3e-3, 6e-3, 1.2e-2], None)
  assert check({1.5e-3: 2.0, 3e-3: 1.8, 6e-3: 1.7, 1.2e-2: 1.75}) == ([1.5e-3, 3e-3, 6e-3, 1.2e-2], 6e-3)
  # Still at the edge after LR_EXTEND doublings: the best measured rate, no further points.
  losses = {1.5e-3: 2.0, 3e-3: 1.8, 6e-3: 1.7, 1.2e-2: 1.6, 2.4e-2: 1.5}
  assert check(losses) == ([1.5e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2], 2.4e-2)
  assert check(losses, extend=1) == ([1.5e-3, 3e-3, 6e-3, 1.2e-2], 1.2e-2)
  # Best at the bottom edge: half the lowest.
  assert check({1.5e-3: 1.5, 3e-3: 1.8, 6e-3: 2.0}) == ([7.5e-4, 1.5e-3, 3e-3, 6e-3], None)
  # A diverged run (no finite held-out loss) is measured and worst; other kinds' and widths' rows are ignored.
  rows = _lr_rows("hybrid", "i64", {1.5e-3: 2.0, 3e-3: 1.8, 6e-3: float("nan")}) + _lr_rows(
      "softmax", "i64", {6e-3: 0.1}) + _lr_rows("hybrid", "i128", {6e-3: 0.1})
  assert isoflop.lr_check_rates(rows, "hybrid", "i64", grid) == ([1.5e-3, 3e-3, 6e-3], 3e-3)
  assert isoflop.lr_check_rates(rows, "hybrid", "i64", (3e-3,)) == ([3e-3], 3e-3)  # one rate: nothing to extend


def _profile_rows(kind, budget, losses, lr=3e-3):
  return [dict(kind=kind, size=size, budget=str(budget), seed="0", learning_rate=str(lr), eval_loss=str(loss))
          for size, loss in losses.items()]


def test_profile_extends_past_an_end_until_the_minimum_is_bracketed():
  budget = isoflop.BUDGETS[1]
  sizes = isoflop.sizes_for_budget(budget)
  order = list(isoflop.presets.ISOFLOP_SIZES)
  lo, hi = order.index(sizes[0]), order.index(sizes[-1])
  edge = lambda losses, **kw: isoflop.edge_sizes(_profile_rows("softmax", budget, losses), "softmax", budget,
                                                 sizes, **kw)
  bowl = {s: 2.0 + abs(i - 2) * 0.1 for i, s in enumerate(sizes)}
  assert edge(bowl) == []  # interior minimum
  assert edge({s: 2.0 for s in sizes[:-1]}) == []  # a size still to run
  falling = {s: 2.0 + i * 0.1 for i, s in enumerate(sizes)}  # best at the small end
  assert edge(falling) == [order[lo - 1]]
  assert edge({**falling, order[lo - 1]: 1.9}) == [order[lo - 2]]  # still at the end: one more
  assert edge({**falling, order[lo - 1]: 1.9, order[lo - 2]: 1.8}) == []  # SIZE_EXTEND = 2 reached
  assert edge({**falling, order[lo - 1]: 2.5}) == []  # bracketed now
  rising = {s: 2.0 - i * 0.1 for i, s in enumerate(sizes)}  # best at the large end
  assert edge(rising) == [order[hi + 1]] and edge(rising, extend=0) == []
  # The profile takes in the added sizes; a diverged run counts as measured and worst.
  prof, by = isoflop.profile(_profile_rows("softmax", budget, {**falling, order[lo - 1]: float("nan")}),
                             "softmax", budget, sizes)
  assert prof == [order[lo - 1]] + list(sizes) and by[order[lo - 1]][0] == math.inf
  assert edge({**falling, order[lo - 1]: float("nan")}) == []
  # The plan adds the edge size at the kind's chosen rate, and holds back the second seed meanwhile.
  lr_rows = [r for s in isoflop.lr_check_sizes(isoflop.sizes_for_budget(isoflop.BUDGETS[0]))
             for r in _lr_rows("softmax", s, {1.5e-3: 2.0, 3e-3: 1.8, 6e-3: 1.9})]
  rows = lr_rows + _profile_rows("softmax", budget, falling)
  points = isoflop.plan([budget], ["softmax"], rows)
  assert [p.size for p in points if p.phase == "grid"] == list(sizes) + [order[lo - 1]]
  assert all(p.learning_rate == 3e-3 for p in points) and not [p for p in points if p.phase == "seed"]
  seeds = [p for p in isoflop.plan([budget], ["softmax"], rows + _profile_rows("softmax", budget, {order[lo - 1]: 2.5}))
           if p.phase == "seed"]
  assert [p.size for p in seeds] == [sizes[0]]


def test_dry_run_prints_table_and_total(capsys, tmp_path):
  assert sweep.main(["--plan", "isoflop", "--dry_run", "--budgets", "1e15,3e16", "--out", str(tmp_path / "x.csv")]) == 0
  text = capsys.readouterr().out
  assert "C paper" in text and "GPU-min in all" in text and "i768" not in text.split("\n")[1]
  assert not (tmp_path / "x.csv").exists()
  assert sweep.main(["--plan", "isoflop", "--budgets", "-1", "--dry_run"]) == 2
  assert sweep.main(["--plan", "isoflop", "--kinds", "mamba", "--dry_run"]) == 2
  assert sweep.main(["--plan", "isoflop", "--corpus", str(tmp_path / "none"), "--dry_run"]) == 2


@pytest.mark.slow
def test_end_to_end_two_points_three_steps(tmp_path):
  """Real training (recipes.pretrain.train) of 2 points (3 and 1 steps), then a call that adds nothing.

  Minutes on 2 busy CPU cores: most of it is compiling the 8-layer models.
  """
  budget = 3 * 2 * 64 * flops.training_flops_per_token(isoflop.model_config("hybrid", "i64"), 64)
  kw = dict(kinds=["hybrid"], out=tmp_path / "iso.csv", run_root=tmp_path / "runs", lr_grid=(3e-3,),
            sizes_per_budget=2, second_seeds=False, seq_len=64, batch_size=2, eval_tokens=256, log=lambda s: None)
  rows = isoflop.run_plan([budget], **kw)
  assert [r["size"] for r in rows] == ["i64", "i96"] and rows[0]["steps"] == 3
  assert all(math.isfinite(float(r["eval_loss"])) for r in rows)
  assert isoflop.run_plan([budget], **kw) == []
