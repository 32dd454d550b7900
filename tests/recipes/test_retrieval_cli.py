"""recipes.retrieval on the command line: outputs never replace recorded results, one-line errors for bad flags."""

import pytest

from recipes import retrieval

# One tiny run (never reached: every test here stops before training or only merges).
TINY = ["--kinds", "softmax", "--sizes", "xs", "--lengths", "16", "--steps", "2", "--steps-per-call", "2",
        "--batch-size", "2", "--config.model.vocab_size=32", "--num-pairs", "2", "--eval-batches", "1", "--log-every", "0"]


def _main(capsys, *argv):
  rc = retrieval.main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def _part(tmp_path):
  part = tmp_path / "part.csv"
  retrieval.write_csv([{"kind": "softmax", "size": "xs", "params": 1, "seq_len": 16, "num_pairs": 2,
                        "eval_accuracy": 0.5}], str(part))
  return part


def test_default_out_is_not_the_recorded_results(monkeypatch, tmp_path, capsys):
  monkeypatch.chdir(tmp_path)  # relative defaults land here
  rc, out, err = _main(capsys, "--merge", str(_part(tmp_path)))
  assert rc == 0, err
  assert (tmp_path / "runs" / "retrieval" / "retrieval.csv").exists()
  assert (tmp_path / "runs" / "retrieval" / "retrieval.png").exists()
  assert not (tmp_path / "results").exists()


def test_existing_output_is_not_overwritten_without_the_flag(tmp_path, capsys):
  out_csv, out_png = tmp_path / "study.csv", tmp_path / "study.png"
  out_csv.write_text("kind,size\nrecorded,xs\n")
  rc, out, err = _main(capsys, *TINY, "--out", str(out_csv))
  assert rc == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err
  assert out_csv.read_text() == "kind,size\nrecorded,xs\n" and not out_png.exists()
  # Its plot is protected the same way, also when merging.
  out_csv.unlink()
  out_png.write_bytes(b"png")
  part = _part(tmp_path)
  rc, out, err = _main(capsys, "--merge", str(part), "--out", str(out_csv))
  assert rc == 2 and "study.png exists" in err and not out_csv.exists() and out_png.read_bytes() == b"png"
  rc, out, err = _main(capsys, "--merge", str(part), "--out", str(out_csv), "--overwrite")
  assert rc == 0 and out_csv.exists() and out_png.read_bytes() != b"png"


@pytest.mark.parametrize("flags,named", [
    (["--kinds", "softmax,mamba"], "--kinds"), (["--sizes", "xl"], "--sizes"), (["--lengths", "64,abc"], "--lengths"),
    (["--lengths", "0"], "--lengths"), (["--num-pairs", "8", "--lengths", "16"], "--num-pairs 8"),
    (["--num-pairs", "40", "--lengths", "256", "--config.model.vocab_size=64"], "--num-pairs 40"),
    (["--pairs-per-token", "0.5", "--lengths", "64"], "--pairs-per-token"),
])
def test_bad_flags_are_one_line_errors_before_training(flags, named, tmp_path, capsys):
  rc, out, err = _main(capsys, *TINY, *flags, "--out", str(tmp_path / "x.csv"))
  assert rc == 2 and out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {named}"), err
  assert not (tmp_path / "x.csv").exists()
