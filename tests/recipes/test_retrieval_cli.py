"""recipes.retrieval on the command line: the CPU smoke run and its resume, merging, the dry run, outputs
that never replace recorded results, one-line errors for bad flags."""

import csv

import pytest

from recipes import retrieval

# A tiny slice (never trained by the error tests: they stop before training).
TINY = ["--kinds", "softmax", "--sizes", "xs", "--lengths", "32", "--vocab-size", "64", "--steps", "2",
        "--train-examples", "16", "--test-examples", "8", "--lrs", "1e-3", "--seeds", "0", "--log-every", "0"]


def _main(capsys, *argv):
  rc = retrieval.main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def _runs(path, kinds=("softmax", "hybrid"), lengths=(32,)):
  rows = [{**{f: "" for f in retrieval.FIELDS}, "kind": k, "size": "xs", "params": 100, "seq_len": t,
           "num_pairs": t // 16, "lr": lr, "seed": s, "test_accuracy": 0.25 + 0.5 * s + lr,
           **{c: 0.5 for c in retrieval.NIAH_COLUMNS}, "niah_len": 2 * t}
          for k in kinds for t in lengths for lr in (0.001, 0.01) for s in (0, 1)]
  retrieval.write_csv(rows, str(path), retrieval.FIELDS)
  return rows


@pytest.mark.slow
def test_cpu_smoke_slice_trains_writes_and_resumes(tmp_path, capsys):
  out = tmp_path / "smoke.csv"
  argv = ["--cpu-smoke", "--kinds", "hybrid", "--lengths", "32", "--steps", "50", "--out", str(out)]
  rc, text, err = _main(capsys, *argv)
  assert rc == 0, err
  rows = retrieval.read_csv(str(out))
  assert [(r["lr"], r["seed"]) for r in rows] == [(lr, s) for lr in ("0.003", "0.01") for s in ("0", "1")]
  assert all(r["kind"] == "hybrid" and r["seq_len"] == "32" and r["num_pairs"] == "2" for r in rows)
  assert all(0 <= float(r[c]) <= 1 for r in rows for c in ("test_accuracy",) + retrieval.NIAH_COLUMNS)
  assert rows[0]["niah_len"] == "64" and rows[0]["vocab_size"] == "64"
  summary = retrieval.read_csv(str(tmp_path / "smoke_summary.csv"))
  assert len(summary) == 1 and summary[0]["seeds"] == "2" and float(summary[0]["best_lr"]) in (3e-3, 1e-2)
  assert (tmp_path / "smoke.png").stat().st_size > 0
  assert "| hybrid | xs | 32 |" in text
  # Again with a second length: the point already in --out is skipped, the new one trained and appended.
  before = out.read_text()
  rc, text, err = _main(capsys, *argv[:-4], "--lengths", "32,16", "--steps", "2", "--out", str(out))
  assert rc == 0, err
  assert "L=   32" not in text and "L=   16" in text
  after = retrieval.read_csv(str(out))
  assert len(after) == 8 and [r for r in after if r["seq_len"] == "32"] == rows
  assert before.splitlines()[0] == out.read_text().splitlines()[0]


def test_merge_writes_runs_summary_and_plot(tmp_path, capsys):
  a, b = _runs(tmp_path / "a.csv", kinds=("softmax",)), _runs(tmp_path / "b.csv", kinds=("hybrid",), lengths=(32, 64))
  rc, out, err = _main(capsys, "--merge", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                       "--out", str(tmp_path / "all.csv"))
  assert rc == 0, err
  assert len(retrieval.read_csv(str(tmp_path / "all.csv"))) == len(a) + len(b)
  summary = retrieval.read_csv(str(tmp_path / "all_summary.csv"))
  assert [(g["kind"], g["seq_len"]) for g in summary] == [("softmax", "32"), ("hybrid", "32"), ("hybrid", "64")]
  assert all(float(g["best_lr"]) == 0.01 and abs(float(g["mean_accuracy"]) - 0.51) < 1e-9 for g in summary)
  assert (tmp_path / "all.png").exists() and "| softmax | xs | 32 | 2 | 2 | 0.01 | 0.510 +- 0.250 |" in out


def test_default_out_is_not_the_recorded_results(monkeypatch, tmp_path, capsys):
  monkeypatch.chdir(tmp_path)  # relative defaults land here
  _runs(tmp_path / "part.csv")
  rc, out, err = _main(capsys, "--merge", str(tmp_path / "part.csv"))
  assert rc == 0, err
  for name in ("retrieval.csv", "retrieval_summary.csv", "retrieval.png"):
    assert (tmp_path / "runs" / "retrieval" / name).exists()
  assert not (tmp_path / "results").exists()


def test_recorded_results_are_never_replaced_without_the_flag(tmp_path, capsys):
  old = tmp_path / "study.csv"
  old.write_text("kind,size,eval_accuracy\nsoftmax,xs,1.0\n")  # a CSV of the earlier study
  rc, out, err = _main(capsys, *TINY, "--out", str(old))
  assert rc == 2 and len(err.strip().splitlines()) == 1 and "not a run CSV of this study" in err
  assert old.read_text() == "kind,size,eval_accuracy\nsoftmax,xs,1.0\n"
  part = tmp_path / "part.csv"
  _runs(part)
  rc, out, err = _main(capsys, "--merge", str(part), "--out", str(old))  # merging does not resume
  assert rc == 2 and f"{old} exists" in err and old.read_text().startswith("kind,size,eval")
  # A plot or summary without its run CSV is protected too.
  png = tmp_path / "new.png"
  png.write_bytes(b"png")
  rc, out, err = _main(capsys, "--merge", str(part), "--out", str(tmp_path / "new.csv"))
  assert rc == 2 and "new.png exists" in err and png.read_bytes() == b"png"
  rc, out, err = _main(capsys, "--merge", str(part), "--out", str(tmp_path / "new.csv"), "--overwrite")
  assert rc == 0 and png.read_bytes() != b"png"


def test_dry_run_prints_the_grid_and_trains_nothing(tmp_path, capsys):
  rc, out, err = _main(capsys, "--dry_run", "--kinds", "softmax,hybrid", "--sizes", "xs,s", "--out",
                       str(tmp_path / "x.csv"))
  assert rc == 0, err
  assert "4 LRs (0.0001, 0.000464, 0.00215, 0.01) x 3 seeds = 12 models" in out
  lines = [line for line in out.splitlines() if line.startswith("| softmax") or line.startswith("| hybrid")]
  assert len(lines) == 2 * 2 * 5
  # Zoology's batch rule and pairs: (64, 4) at 512 rows, (1024, 64) at 64 rows
  assert any("| 64 | 4 | 512 |" in line for line in lines) and any("| 1024 | 64 | 64 |" in line for line in lines)
  assert "total:" in out and not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("flags,named", [
    (["--kinds", "softmax,mamba"], "--kinds"), (["--sizes", "xl"], "--sizes"), (["--lengths", "64,abc"], "--lengths"),
    (["--lengths", "0"], "--lengths 0"), (["--lengths", "63"], "--lengths 63"),
    (["--lengths", "256", "--tokens-per-pair", "4", "--vocab-size", "64"], "--lengths 256"),
    (["--lrs", "1e-3,x"], "--lrs"), (["--lrs", "0"], "--lrs"), (["--seeds", "a"], "--seeds"),
    (["--steps", "0"], "--steps"), (["--niah-factor", "0"], "--niah-factor"),
    (["--config.train.steps=3"], "--config.train.steps"), (["--config.model.vocab_size=32"], "--config.model.vocab"),
    (["--config.model.hidden_sise=32"], ""),
])
def test_bad_flags_are_one_line_errors_before_training(flags, named, tmp_path, capsys):
  rc, out, err = _main(capsys, *TINY, *flags, "--out", str(tmp_path / "x.csv"))
  assert rc == 2 and out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {named}"), err
  assert not (tmp_path / "x.csv").exists()
