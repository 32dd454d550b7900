"""The grain input pipeline: documents -> tokens -> packed rows -> batches.

    data = DataPipeline(config)             # opens the source, splits it, loads the tokenizer
    it = data.train_iterator()              # infinite, shuffled, sharded per host, prefetched
    batch = next(it)                        # {"tokens": [b, L+1] int32, "segment_ids": [b, L+1] int32}
    state = it.get_state()                  # JSON-serialisable; it.set_state(state) resumes exactly
    eval_batches = data.eval_batches()      # a fixed list of held-out batches

Train pipeline (grain):

    MapDataset.source(train documents of this host)   # documents process_index::process_count
      .shuffle(seed).repeat()                          # reshuffled every epoch
      .map(tokenize)
      .to_iter_dataset()
    PackedRowsIterDataset(row_len = seq_len + 1)       # concatenation, no padding
      .batch(per-host batch)
    ThreadPrefetchIterDataset(prefetch)                # background thread

b is the per-host batch, train.batch_size / jax.process_count().

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
    host_train = train_idx[process_index::process_count]
    if len(host_train) == 0:
      raise sources_lib.DataError(f"data.source: host {process_index} of {process_count} has no training documents")
    self.train_source = sources_lib.SubsetSource(self.source, host_train)
    self.eval_source = (sources_lib.SubsetSource(self.source, eval_idx[process_index::process_count])
                        if len(eval_idx) >= process_count else None)
    self._require_tokens(self.train_source, "training")
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

  def _rows(self, source, *, shuffle_seed: Optional[int], repeat: bool) -> grain.IterDataset:
    ds = grain.MapDataset.source(source)
    if shuffle_seed is not None:
      ds = ds.shuffle(seed=shuffle_seed)
    if repeat:
      ds = ds.repeat()
    ds = ds.map(_Tokenize(self.tokenizer))
    # A few threads read and tokenize ahead; the result is deterministic.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=32))
    return PackedRowsIterDataset(it, self.row_len)

  def train_dataset(self) -> grain.IterDataset:
    """Infinite stream of per-host batches {"tokens": [b, L+1], "segment_ids": [b, L+1]} int32."""
    seed = self.config.data.shuffle_seed + 1_000_003 * self.process_index
    ds = self._rows(self.train_source, shuffle_seed=seed, repeat=True)
    ds = ds.batch(self.host_batch_size, drop_remainder=True, batch_fn=stack_rows)
    if self.config.data.prefetch > 0:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=self.config.data.prefetch)
    return ds

  def train_iterator(self, state: Optional[dict] = None) -> grain.DatasetIterator:
    it = iter(self.train_dataset())
    if state is not None:
      it.set_state(state)
    return it

  def eval_batches(self, num_batches: Optional[int] = None) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` (default train.eval_batches) batches of the held-out stream (repeated if short)."""
    n = self.config.train.eval_batches if num_batches is None else num_batches
    if self.eval_source is None or n == 0:
      return []
    ds = self._rows(self.eval_source, shuffle_seed=None, repeat=True)
    ds = ds.batch(self.host_batch_size, drop_remainder=True, batch_fn=stack_rows)
    it = iter(ds)
    return [next(it) for _ in range(n)]


__all__ = ["DataPipeline", "packing_efficiency"]
