"""benchmarks/load_checkpoint.py at a tiny size: writes, loads, checks and reports."""

import json

from benchmarks import load_checkpoint


def test_tiny_run_reports_and_cleans_up(tmp_path):
  out = tmp_path / "result.jsonl"
  ckpt = tmp_path / "ckpt"
  r = load_checkpoint.main(["--tiny", "--layers", "9", "--dir", str(ckpt), "--max-shard-size", "200KB", "--cold",
                            "--out", str(out)])
  assert r["layers"] == 9 and r["files"] > 2 and r["checkpoint_gb"] > 0
  assert r["load_s"] > 0 and r["load_gb_per_s"] > 0 and r["host_transient_gb"] is not None
  assert json.loads(out.read_text().splitlines()[-1]) == r
  assert not list(ckpt.iterdir())  # the checkpoint is removed unless --keep
