"""Executes the scaling notebooks (jupytext percent sources) and fails on any cell error.

    python -m pytest tests/scaling/test_notebooks.py

Each notebook runs in a fresh kernel with notebooks/ as its working directory and
writes its figures to notebooks/figures/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def _execute(name: str) -> list[str]:
  """Runs notebooks/<name>; returns the text printed by its cells."""
  nb = jupytext.read(NOTEBOOKS / name)
  client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute()  # raises CellExecutionError naming the failing cell
  return ["".join(o.get("text", "")) for c in nb.cells for o in c.get("outputs", [])]


def test_public_data_notebook():
  text = "\n".join(_execute("scaling_public_data.py"))
  assert "NO" not in text.split("inside?")[1].split("\n\n")[0], "a fitted parameter left its published interval"
  for fig in ("chinchilla_isoflop.png", "chinchilla_compute_optimal.png", "chinchilla_bootstrap.png"):
    assert (NOTEBOOKS / "figures" / fig).exists()


def test_sweep_notebook(tmp_path, monkeypatch):
  # Every cell on the stored sweep results; 10 bootstrap resamples (2 for L(N, D)) instead of 100 (20): the
  # fits' code paths are the same, the notebook's time (most of it resampling) a third.  Its figures, whose
  # bands differ with fewer resamples, go to tmp_path, not over the committed ones.
  monkeypatch.setenv("MX01_SWEEP_BOOTSTRAP", "10")
  monkeypatch.setenv("MX01_SWEEP_FIGURES", str(tmp_path))
  _execute("scaling_sweep.py")
  assert (tmp_path / "sweep_loss_vs_compute.png").exists()


def test_sweep_notebook_without_results(tmp_path, monkeypatch):
  monkeypatch.setenv("MX01_SWEEP_CSV", str(tmp_path / "absent.csv"))
  text = "\n".join(_execute("scaling_sweep.py"))
  assert "No sweep results yet" in text
