"""Training-run tables for the scaling fits: the public Chinchilla runs and our sweep CSV."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
# Public data ships inside the repository, each set with a provenance README (scaling/public_data/README.md).
PUBLIC_DATA = Path(__file__).resolve().parent / "public_data"
CHINCHILLA_EPOCH_CSV = PUBLIC_DATA / "chinchilla_epoch" / "svg_extracted_data.csv"


@dataclasses.dataclass(frozen=True)
class Runs:
  """Parallel arrays, one entry per training run: N (parameters), D (tokens), C (FLOPs), loss (nats/token)."""

  n: np.ndarray
  d: np.ndarray
  compute: np.ndarray
  loss: np.ndarray

  def __len__(self) -> int:
    return len(self.n)

  def take(self, idx) -> "Runs":
    return Runs(self.n[idx], self.d[idx], self.compute[idx], self.loss[idx])


def load_chinchilla_epoch(path: Optional[Path] = None, drop_highest_loss: int = 5) -> Runs:
  """The 245 Chinchilla runs extracted by Besiroglu et al. (2024), D = C / (6 N).

  drop_highest_loss: the replication drops the five runs with the highest
  loss (240 remain).  Raises FileNotFoundError when the file is absent.
  """
  path = CHINCHILLA_EPOCH_CSV if path is None else Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} not found; the public Chinchilla runs ship in scaling/public_data/chinchilla_epoch/")
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  n = np.array([float(r["Model Size"]) for r in rows])
  c = np.array([float(r["Training FLOP"]) for r in rows])
  loss = np.array([float(r["loss"]) for r in rows])
  keep = np.sort(np.argsort(loss)[:len(loss) - drop_highest_loss]) if drop_highest_loss else np.arange(len(loss))
  n, c, loss = n[keep], c[keep], loss[keep]
  return Runs(n=n, d=c / (6.0 * n), compute=c, loss=loss)


def read_csv_rows(path: Path) -> List[Dict[str, str]]:
  """All rows of a CSV as dicts (empty list if the file does not exist)."""
  path = Path(path)
  if not path.exists():
    return []
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def append_csv_row(path: Path, row: dict, columns) -> None:
  """Appends one row (the `columns`, in order) to a CSV, writing the header first when the file is new or empty."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  new = not path.exists() or path.stat().st_size == 0
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=columns)
  if new:
    writer.writeheader()
  writer.writerow({k: row.get(k) for k in columns})
  # One write on a file opened for appending: runs of several processes (one per kind) can share one CSV
  # without interleaving their rows.
  with open(path, "a", newline="") as f:
    f.write(text.getvalue())
