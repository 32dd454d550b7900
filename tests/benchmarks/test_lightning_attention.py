"""The CPU side of benchmarks/lightning_attention.py --rows issue: cases, packed documents, floors, table."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from benchmarks import lightning_attention as bench


def test_issue_cases_cover_every_row_and_variant():
  cases = bench.issue_cases()
  assert len(cases) == len(bench.ISSUE_ROWS) * 3
  assert {(c["b"], c["h"]) for c in cases} == {(b, h) for b, _, h in bench.ISSUE_ROWS}
  for c in cases:
    if c["variant"] == "ragged":
      assert c["t"] % 16 and c["t"] % 64, c
    else:
      assert (c["b"], c["t"], c["h"]) in bench.ISSUE_ROWS
  assert (1, 1 << 20, 8) in bench.ISSUE_ROWS and (64, 2048, 64) in bench.ISSUE_ROWS
  with pytest.raises(ValueError, match="unknown variant 'dense'"):
    bench.issue_cases(["plain", "dense"])


@pytest.mark.parametrize("b,t", [(4, 32768), (1, 131072 - bench.RAGGED_CUT), (64, 2048), (2, 100)])
def test_packed_documents_agree_for_both_implementations(b, t):
  docs = bench.doc_lengths(b, t)
  assert docs == bench.doc_lengths(b, t), "both processes must build the same documents"
  assert len(docs) == b and all(sum(row) == t and min(row) >= 1 for row in docs)
  assert sum(len(row) for row in docs) > b  # packed: more documents than rows
  seg = bench.segment_ids_of(docs)  # ours: [b, t] ids
  assert seg.shape == (b, t) and seg.dtype == np.int32
  cu = bench.cu_seqlens_of(docs)  # fla: one concatenated sequence
  starts = np.flatnonzero(np.concatenate([np.r_[True, np.diff(row) != 0] for row in seg]))
  np.testing.assert_array_equal(cu[:-1], starts)
  assert cu[-1] == b * t and cu.dtype == np.int64


def test_floor_counts_the_tensors_moved():
  # 1 x 128k x 64 heads x 128 bf16 = 2 GiB per tensor; forward moves 4, forward+backward 11.
  tensor = 131072 * 64 * 128 * 2
  assert bench.floor_ms(1, 131072, 64, False) == pytest.approx(4 * tensor / 4.29e12 * 1e3)
  assert bench.floor_ms(1, 131072, 64, True) == pytest.approx(11 * tensor / 4.29e12 * 1e3)
  assert bench.floor_ms(1, 131072, 64, False) == pytest.approx(2.0024, rel=1e-4)


def test_issue_table_pairs_ours_with_fla():
  case = dict(b=4, t=32768, h=16, variant="packed", backward=False)
  floor = bench.floor_ms(4, 32768, 16, False)
  ours = [dict(case, impl="pallas", ms=2.0), dict(case, impl="pallas", backward=True, ms=7.0),
          dict(b=1, t=1 << 20, h=8, variant="plain", backward=False, impl="pallas", error="oom")]
  fla = [dict(case, impl="fla", ms=3.0), dict(case, impl="fla", variant="plain", ms=1.0)]
  lines = bench.issue_table(ours, fla).splitlines()
  row = next(line for line in lines if "| fwd | 4x32768x16 | packed |" in line)
  assert row == f"| fwd | 4x32768x16 | packed | auto | 2.00 | 3.00 | {floor:.3f} | 1.50 | {2.0 / floor:.2f} |"
  row = next(line for line in lines if "| fwd+bwd | 4x32768x16 | packed |" in line)
  assert "| 7.00 | - |" in row and row.endswith(f"| - | {7.0 / bench.floor_ms(4, 32768, 16, True):.2f} |")
  assert "| fwd | 1x1048576x8 | plain | auto | - | - |" in bench.issue_table(ours, fla)
  # A forced split count is its own line, against the same fla time.
  row = next(line for line in bench.issue_table(ours + [dict(case, impl="pallas", num_splits=8, ms=1.5)], fla)
             .splitlines() if "| packed | 8 |" in line)
  assert "| 1.50 | 3.00 |" in row and "| 2.00 |" in row
  # Forward rows first, each pass in ISSUE_ROWS order.
  body = [line for line in lines if line.startswith("| fwd")]
  assert body[0].startswith("| fwd | 4x32768x16") and body[1].startswith("| fwd | 1x1048576x8")


def test_dry_run_prints_every_case(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["lightning_attention.py", "--rows", "issue", "--dry_run", "--passes", "fwd"])
  bench.main()
  out = capsys.readouterr().out
  assert out.startswith("24 cases") and out.count("| fwd |") == 24 and "1x1048539x8 | ragged" in out
  monkeypatch.setattr(sys, "argv", ["lightning_attention.py", "--rows", "issue", "--passes", "bwd", "--out", "x"])
  with pytest.raises(SystemExit):
    bench.main()
  assert "--passes takes fwd and/or fwd_bwd" in capsys.readouterr().err
  monkeypatch.setattr(sys, "argv", ["lightning_attention.py", "--rows", "issue", "--num_splits", "4,0", "--dry_run"])
  with pytest.raises(SystemExit):
    bench.main()
  assert "expected comma-separated ints >= 1, got '4,0'" in capsys.readouterr().err


def test_issue_run_times_ours_on_cpu(monkeypatch, tmp_path):
  """run_issue end to end at a toy size, the kernels in interpret mode, fla skipped: JSON and table come out."""
  import json
  import types
  monkeypatch.setattr(bench, "HEAD_DIM", 16)
  cases = [dict(b=1, t=40, h=2, variant="packed", backward=False)]
  args = types.SimpleNamespace(skip_fla=True, out=str(tmp_path / "issue.json"), num_splits=[2], interpret=True,
                               tune=False, settings=None)
  bench.run_issue(args, cases)
  data = json.load(open(args.out))
  (entry,) = data["results"]
  assert "error" not in entry and entry["ms"] > 0 and entry["num_splits"] == 2
  assert "| fwd | 1x40x2 | packed | 2 |" in data["table"]


def test_tune_times_every_setting_and_tables_the_fastest(monkeypatch, tmp_path):
  """--tune at a toy size in interpret mode: each case at each setting of its pass, the fastest per case."""
  import json
  import types
  monkeypatch.setattr(bench, "HEAD_DIM", 16)
  monkeypatch.setattr(bench, "TUNE_FWD", (dict(), dict(block_size=16)))
  monkeypatch.setattr(bench, "TUNE_BWD", (dict(), dict(bwd_block_size=16, bwd_num_warps=4)))
  cases = [dict(b=1, t=40, h=2, variant="plain", backward=False), dict(b=1, t=40, h=2, variant="plain", backward=True)]
  args = types.SimpleNamespace(skip_fla=False, out=str(tmp_path / "tune.json"), num_splits=None, interpret=True,
                               tune=True, settings=None)
  bench.run_issue(args, cases)  # fla is not run when tuning
  data = json.load(open(args.out))
  assert data["fla"] == []
  got = [(e["backward"], e["overrides"]) for e in data["results"]]
  assert got == [(False, {}), (False, {"block_size": 16}), (True, {}),
                 (True, {"bwd_block_size": 16, "bwd_num_warps": 4})]
  assert all("error" not in e and e["ms"] > 0 and e["wall_s"] >= e["ms"] / 1e3 for e in data["results"])
  lines = [line for line in data["table"].splitlines() if "| 1x40x2 |" in line]
  assert len(lines) == 2 and lines[0].startswith("| fwd |") and lines[1].startswith("| fwd+bwd |")


def test_settings_time_each_case_at_each_override(monkeypatch, tmp_path):
  """--settings at a toy size in interpret mode: packed forward+backward with one dK/dV sweep and with the
  separate dK and dV sweeps; both timed, tabled as default against the other."""
  import json
  import types
  monkeypatch.setattr(bench, "HEAD_DIM", 16)
  cases = [dict(b=1, t=40, h=2, variant="packed", backward=True)]
  settings = [bench.parse_setting("default"), bench.parse_setting("bwd_split_dkdv=true,bwd_block_v=16")]
  assert settings == [{}, {"bwd_split_dkdv": True, "bwd_block_v": 16}]
  args = types.SimpleNamespace(skip_fla=True, out=str(tmp_path / "settings.json"), num_splits=None, interpret=True,
                               tune=False, settings=settings)
  bench.run_issue(args, cases)
  data = json.load(open(args.out))
  assert [e["overrides"] for e in data["results"]] == settings
  assert all("error" not in e and e["ms"] > 0 for e in data["results"])
  assert "| fwd+bwd | 1x40x2 | packed |" in data["table"]


def test_tune_table_picks_the_fastest_setting():
  case = dict(b=16, t=8192, h=16, variant="plain", backward=False)
  floor = bench.floor_ms(16, 8192, 16, False)
  entries = [dict(case, ms=1.4, overrides={}, floor_ms=floor), dict(case, ms=1.0, overrides={"num_warps": 4},
             floor_ms=floor), dict(case, error="smem", overrides={"block_size": 128}, floor_ms=floor)]
  (row,) = [line for line in bench.tune_table(entries).splitlines() if "16x8192x16" in line]
  assert row == (f"| fwd | 16x8192x16 | plain | 1.40 | 1.00 | {{'num_warps': 4}} | 1.40 | {1.0 / floor:.2f} | 1 |")


def test_tune_adds_split_counts_only_where_the_default_splits():
  args = types_ns(tune=True, num_splits=None)
  split_row = dict(b=1, t=131072, h=16, variant="plain", backward=False)
  auto = bench.default_splits(1, 131072, 16)
  assert auto > 1
  settings = bench.case_settings(args, split_row)
  assert settings[:len(bench.TUNE_FWD)] == [dict(o) for o in bench.TUNE_FWD]
  assert settings[len(bench.TUNE_FWD):] == [dict(num_splits=auto // 2), dict(num_splits=auto * 2)]
  assert bench.default_splits(64, 2048, 64) == 1
  assert bench.case_settings(args, dict(b=64, t=2048, h=64, variant="plain", backward=False)) == [
      dict(o) for o in bench.TUNE_FWD]
  assert bench.case_settings(args, dict(split_row, backward=True)) == [dict(o) for o in bench.TUNE_BWD]
  assert bench.case_settings(types_ns(tune=False, num_splits=[2, 4]), split_row) == [dict(num_splits=2),
                                                                                     dict(num_splits=4)]


def types_ns(**kw):
  import types
  return types.SimpleNamespace(**dict(dict(settings=None), **kw))
