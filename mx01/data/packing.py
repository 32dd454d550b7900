"""Packing token streams into fixed-length rows, as a checkpointable grain IterDataset.

Documents (1-D int32 token arrays) are concatenated into rows of `row_len`
(= seq_len + 1) tokens with no padding between them:

    tokens      [row_len] int32  the concatenated stream, cut every row_len tokens
    segment_ids [row_len] int32  1, 2, 3, ... for the pieces of documents in this row;
                                 0 = padding, only at the very end of a finite stream

A document longer than what is left of a row continues in the next row (as a
new segment there, numbered from 1 again).  Every token of every document
appears exactly once, in order.  Empty documents are skipped (a repeated stream of
nothing but empty documents would never yield a row: DataPipeline refuses one up front).

The iterator's state is the parent iterator's state from just before the
current document was read plus the offset reached inside it, so it is small
(no buffered tokens) and restoring it reproduces the stream exactly.
"""

from __future__ import annotations

from typing import Any, Optional

import grain
import numpy as np


class PackedRowsIterator(grain.DatasetIterator):
  """Yields {"tokens": [row_len] int32, "segment_ids": [row_len] int32}."""

  def __init__(self, parent: grain.DatasetIterator, row_len: int):
    super().__init__(parent)
    self._row_len = row_len
    self._doc: Optional[np.ndarray] = None
    self._offset = 0
    self._state_before_doc: Any = None
    self._exhausted = False
    self._rows = 0
    self._real_tokens = 0

  def _next_document(self) -> bool:
    """Loads the next non-empty document; False at the end of the parent stream."""
    while True:
      state = self._parent.get_state()
      try:
        doc = next(self._parent)
      except StopIteration:
        self._doc, self._exhausted = None, True
        return False
      doc = np.asarray(doc, np.int32).reshape(-1)
      if doc.size:
        self._doc, self._offset, self._state_before_doc = doc, 0, state
        return True

  def __next__(self) -> dict[str, np.ndarray]:
    if self._exhausted:
      raise StopIteration
    tokens = np.zeros((self._row_len,), np.int32)
    segments = np.zeros((self._row_len,), np.int32)
    filled, segment = 0, 0
    while filled < self._row_len:
      if self._doc is None or self._offset >= self._doc.size:
        if not self._next_document():
          break
      take = min(self._row_len - filled, self._doc.size - self._offset)
      segment += 1
      tokens[filled:filled + take] = self._doc[self._offset:self._offset + take]
      segments[filled:filled + take] = segment
      filled += take
      self._offset += take
    if filled == 0:
      raise StopIteration
    self._rows += 1
    self._real_tokens += filled
    return {"tokens": tokens, "segment_ids": segments}

  def get_state(self) -> dict[str, Any]:
    if self._doc is None or self._offset >= self._doc.size:
      parent, offset = self._parent.get_state(), -1
    else:
      parent, offset = self._state_before_doc, self._offset
    return {"parent": parent, "offset": int(offset), "rows": int(self._rows),
            "real_tokens": int(self._real_tokens), "exhausted": bool(self._exhausted)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._rows, self._real_tokens = int(state["rows"]), int(state["real_tokens"])
    self._exhausted = bool(state.get("exhausted", False))
    self._doc, self._offset = None, 0
    if int(state["offset"]) >= 0:
      if not self._next_document():
        raise ValueError("data iterator state points past the end of the document stream")
      self._offset = int(state["offset"])

  @property
  def packing_efficiency(self) -> float:
    """Fraction of emitted row tokens that are real (not padding)."""
    return self._real_tokens / max(1, self._rows * self._row_len)


class PackedRowsIterDataset(grain.IterDataset):
  """Packs a dataset of 1-D token arrays into rows of `row_len` tokens (see module docstring)."""

  def __init__(self, parent: grain.IterDataset, row_len: int):
    if row_len < 2:
      raise ValueError(f"row_len must be >= 2 (seq_len + 1), got {row_len}")
    super().__init__(parent)
    self.row_len = row_len

  def __iter__(self) -> PackedRowsIterator:
    return PackedRowsIterator(self._parent.__iter__(), self.row_len)

  def __str__(self) -> str:
    return f"PackedRowsIterDataset(row_len={self.row_len})"


def stack_rows(rows) -> dict[str, np.ndarray]:
  """Batches rows: a list of {"tokens": [R], "segment_ids": [R]} -> {"tokens": [b, R], "segment_ids": [b, R]}."""
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def packing_efficiency(batch) -> float:
  """Fraction of a batch's tokens that are not padding (segment id != 0)."""
  return float(np.mean(np.asarray(batch["segment_ids"]) != 0))
