"""The grain input pipeline: documents -> tokens -> packed rows -> batches.

    data = DataPipeline(config)             # opens the source, splits it, loads the tokenizer
    it = data.train_iterator()              # infinite, shuffled, sharded per host, prefetched
    batch = next(it)                        # {"tokens": [b, L+1] int32, "segment_ids": [b, L+1] int32}
    state = it.get_state()                  # JSON-serialisable; it.set_state(state) resumes exactly
    eval_batches = data.eval_batches()      # a fixed list of held-out batches

Train pipeline (grain): row r of every global batch (r < train.batch_size) comes from its own stream

    MapDataset.source(train documents r::batch_size)  # row r's documents
      .shuffle(seed_r).repeat()                        # reshuffled every epoch
      .map(tokenize)
      .to_iter_dataset()
    PackedRowsIterDataset(row_len = seq_len + 1)       # concatenation, no padding

and a host reads only the streams of its rows, process_index * b .. (process_index + 1) * b - 1, stacked
into its batch (then ThreadPrefetchIterDataset(prefetch), a background thread).  b is the per-host batch,
train.batch_size / jax.process_count().  The global batch is thus the same whatever the number of hosts
and the parallel layout: a run on 2 hosts sees the data of a run on 1, and resumes onto another layout
continue the same stream.  The iterator state is {"rows": {r: row r's state}}; a host restores its rows
from the merged states of every host (see mx01/checkpoint.py).

Unusable data raises `DataError` (a ConfigError) on construction, before any
training: a missing path, no documents, only empty documents in the train or the
held-out split (packing would wait forever for a token), a malformed JSON Lines
record (or, with data.skip_bad_records, those records are left out and listed in
`skipped_records`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import grain
import numpy as np

from mx01.config import Config, ConfigError
from mx01.data import sources as sources_lib
from mx01.data.packing import PackedRowsIterDataset, packing_efficiency, stack_rows
from mx01.data.tokenizers import Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class _Tokenize(grain.transforms.Map):
  tokenizer: Tokenizer

  def map(self, text: str) -> np.ndarray:
    return self.tokenizer.encode(text)


def _process_index_count() -> tuple[int, int]:
  import jax
  return jax.process_index(), jax.process_count()


class _RowStreamsIterator(grain.DatasetIterator):
  """Stacks one row from each row stream into a batch; state {"rows": {str(global row): stream state}}."""

  def __init__(self, streams: dict[int, grain.DatasetIterator]):
    super().__init__(list(streams.values()))
    self._streams = streams

  def __next__(self) -> dict[str, np.ndarray]:
    return stack_rows([next(it) for it in self._streams.values()])

  def get_state(self) -> dict:
    return {"rows": {str(r): it.get_state() for r, it in self._streams.items()}}

  def set_state(self, state: dict) -> None:
    rows = state.get("rows", {}) if isinstance(state, dict) else {}
    missing = [r for r in self._streams if str(r) not in rows]
    if missing:
      raise ValueError(f"data iterator state has no state for rows {missing[:4]}... (a checkpoint of another "
                       "train.batch_size or data pipeline); resume with the same data and batch configuration")
    for r, it in self._streams.items():
      it.set_state(rows[str(r)])


class _RowStreams(grain.IterDataset):
  def __init__(self, streams: dict[int, grain.IterDataset]):
    super().__init__(list(streams.values()))
    self._row_streams = streams

  def __iter__(self) -> _RowStreamsIterator:
    return _RowStreamsIterator({r: ds.__iter__() for r, ds in self._row_streams.items()})

  def __str__(self) -> str:
    return f"_RowStreams(rows={list(self._row_streams)[:1]}..{list(self._row_streams)[-1:]})"


class DataPipeline:
  """Source, split, tokenizer and the train / eval pipelines of a Config."""

  def __init__(self, config: Config, *, process_index: Optional[int] = None,
               process_count: Optional[int] = None, source: Optional[sources_lib.DocumentSource] = None):
    self.config = config
    dc = config.data
    if process_index is None or process_count is None:
      process_index, process_count = _process_index_count()
    self.process_index, self.process_count = process_index, process_count
    if config.train.batch_size % process_count:
      raise ConfigError(f"train.batch_size: {config.train.batch_size} must be divisible by the "
                        f"number of hosts ({process_count})")
    self.host_batch_size = config.train.batch_size // process_count
    self.tokenizer = load_tokenizer(dc.tokenizer)
    if self.tokenizer.vocab_size > config.model.vocab_size:
      raise ConfigError(f"model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
                        f"vocabulary ({self.tokenizer.vocab_size}, data.tokenizer={dc.tokenizer!r})")
    self.source = source if source is not None else sources_lib.open_source(dc.source, dc.text_field,
                                                                            dc.skip_bad_records)
    self.skipped_records: tuple[str, ...] = getattr(self.source, "skipped", ())  # "file:line" of each
    train_idx, eval_idx = sources_lib.split_indices(self.source, dc.eval_fraction)
    self.num_train_documents, self.num_eval_documents = len(train_idx), len(eval_idx)
    batch = config.train.batch_size
    if len(train_idx) < batch:
      raise sources_lib.DataError(f"data.source: {len(train_idx)} training documents for train.batch_size={batch} rows; "
                        "every row streams its own documents: use a larger corpus or a smaller batch")
    self.host_rows = range(process_index * self.host_batch_size, (process_index + 1) * self.host_batch_size)
    self.row_sources = {r: sources_lib.SubsetSource(self.source, train_idx[r::batch]) for r in self.host_rows}
    # Every host reads the whole held-out stream and keeps its rows of each global batch (`eval_batches`), so
    # the held-out loss is the same whatever the number of hosts.
    self.eval_source = sources_lib.SubsetSource(self.source, eval_idx) if len(eval_idx) else None
    for r in self.host_rows:  # a row whose documents are all empty could never be packed
      self._require_tokens(self.row_sources[r], "training")
    if self.eval_source is not None:
      self._require_tokens(self.eval_source, "held-out")
    self.row_len = dc.seq_len + 1

  def _require_tokens(self, source, split: str) -> None:
    """Raises DataError if every document of `source` tokenizes to nothing (reads up to the first that does not)."""
    for i in range(len(source)):
      if self.tokenizer.encode(source[i]).size:
        return
    fix = ("add text to them" if split == "training" else
           "set data.eval_fraction=0 (no held-out loss) or a larger fraction")
    raise sources_lib.DataError(f"data.source: the {len(source)} {split} document(s) of "
                                f"{self.config.data.source!r} on this host are all empty, so no row can be packed; "
                                f"{fix}")

  # ---- pipelines -------------------------------------------------------------

  def _rows(self, source, *, shuffle_seed: Optional[int], repeat: bool, threads: int = 2) -> grain.IterDataset:
    ds = grain.MapDataset.source(source)
    if shuffle_seed is not None:
      ds = ds.shuffle(seed=shuffle_seed)
    if repeat:
      ds = ds.repeat()
    ds = ds.map(_Tokenize(self.tokenizer))
    # Threads read and tokenize ahead; the result is deterministic.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=16 * threads))
    return PackedRowsIterDataset(it, self.row_len)

  def train_dataset(self) -> grain.IterDataset:
    """Infinite stream of per-host batches {"tokens": [b, L+1], "segment_ids": [b, L+1]} int32."""
    seed = self.config.data.shuffle_seed
    ds = _RowStreams({r: self._rows(src, shuffle_seed=seed + 1_000_003 * r, repeat=True, threads=1)
                      for r, src in self.row_sources.items()})
    if self.config.data.prefetch > 0:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=self.config.data.prefetch)
    return ds

  def train_iterator(self, state: Optional[dict] = None) -> grain.DatasetIterator:
    it = iter(self.train_dataset())
    if state is not None:
      it.set_state(state)
    return it

  def eval_batches(self, num_batches: Optional[int] = None) -> list[dict[str, np.ndarray]]:
    """This host's rows of the first `num_batches` (default train.eval_batches) global batches of the held-out
    stream (repeated if short): the same global batches on any number of hosts."""
    n = self.config.train.eval_batches if num_batches is None else num_batches
    if self.eval_source is None or n == 0:
      return []
    ds = self._rows(self.eval_source, shuffle_seed=None, repeat=True)
    ds = ds.batch(self.config.train.batch_size, drop_remainder=True, batch_fn=stack_rows)
    it = iter(ds)
    rows = slice(self.host_rows.start, self.host_rows.stop)
    return [{k: v[rows] for k, v in next(it).items()} for _ in range(n)]


__all__ = ["DataPipeline", "packing_efficiency"]
