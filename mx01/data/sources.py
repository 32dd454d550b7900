"""Document sources: random-access collections of text documents.

Every source is a `grain.sources.RandomAccessDataSource`-like object
(`__len__`, `__getitem__ -> str`) plus a stable string key per document
(`key(i)`), which decides the train / held-out split independently of the
order in which files are listed.

* `stdlib_corpus()`      - the embedded default: the Python standard library's
  own `.py` files, read from the running interpreter, sorted by relative path.
  Needs no download.
* `TextFilesSource`      - plain-text files (one document per file).
* `JsonlSource`          - JSON Lines files (one document per line, field `text`); every line is
  checked on opening, so a malformed one stops the run before it starts, naming file and line
  (or is skipped and counted with `DataConfig.skip_bad_records`).
* `ArrayRecordSource`    - ArrayRecord files (one document per record: UTF-8
  text, or a JSON object with field `text`).

`open_source(spec)` picks one from `DataConfig.source`: "embedded", a file, a
folder (every .txt/.md/.py/.jsonl/.array_record file below it), or a
comma-separated list of those.

Unusable data (a missing path, no documents, a malformed record) raises
`DataError`, a `ConfigError` whose one-line message names the file and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sysconfig
from typing import Protocol, Sequence

import numpy as np

from mx01.config import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")


class DataError(ConfigError):
  """The data named by `Config.data` cannot be used (missing, empty, malformed); the message names file and fix."""


class DocumentSource(Protocol):
  """Random access to text documents."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> str: ...

  def key(self, index: int) -> str: ...


@dataclasses.dataclass(frozen=True)
class TextFilesSource:
  """One document per text file.  `root` is stripped from keys so they do not depend on where files live."""

  paths: tuple[str, ...]
  root: str = ""

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> str:
    with open(self.paths[index], "rb") as f:
      return f.read().decode("utf-8", errors="replace")

  def key(self, index: int) -> str:
    return os.path.relpath(self.paths[index], self.root) if self.root else self.paths[index]


class JsonlSource:
  """One document per line of JSON Lines files.

  Opening reads every line once: it records byte offsets and checks that the line is a JSON
  string or an object with `text_field`.  A line that is not raises DataError naming file and
  line, unless skip_bad_records: then it is left out and listed in `skipped` ("file:line").
  """

  def __init__(self, paths: Sequence[str], text_field: str = "text", root: str = "",
               skip_bad_records: bool = False):
    self.paths = tuple(paths)
    self.text_field = text_field
    self.root = root
    file_idx, offsets, skipped = [], [], []
    for fi, path in enumerate(self.paths):
      with open(path, "rb") as f:
        pos = 0
        for line_no, line in enumerate(f, start=1):
          if line.strip():
            problem = _record_problem(line, text_field)
            if problem is None:
              file_idx.append(fi)
              offsets.append(pos)
            elif skip_bad_records:
              skipped.append(f"{path}:{line_no}")
            else:
              raise DataError(f"data.source: {path}:{line_no}: {problem}; fix or delete that line, or set "
                              "data.skip_bad_records=true to skip such records")
          pos += len(line)
    self._file_idx = np.asarray(file_idx, np.int64)
    self._offsets = np.asarray(offsets, np.int64)
    self.skipped = tuple(skipped)

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, index: int) -> str:
    with open(self.paths[self._file_idx[index]], "rb") as f:
      f.seek(int(self._offsets[index]))
      record = json.loads(f.readline())
    return _text_of(record, self.text_field, f"{self.key(index)}")

  def key(self, index: int) -> str:
    path = self.paths[self._file_idx[index]]
    rel = os.path.relpath(path, self.root) if self.root else path
    return f"{rel}@{int(self._offsets[index])}"


class ArrayRecordSource:
  """One document per ArrayRecord record (UTF-8 text or a JSON object with `text_field`)."""

  def __init__(self, paths: Sequence[str], text_field: str = "text", root: str = ""):
    import grain
    self.paths = tuple(paths)
    self.text_field = text_field
    self.root = root
    self._source = grain.sources.ArrayRecordDataSource(list(self.paths))
    # Record index -> (file, index within file) for stable keys.
    sizes = []
    for p in self.paths:
      sizes.append(len(grain.sources.ArrayRecordDataSource([p])))
    self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    raw = self._source[index]
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    stripped = text.lstrip()
    if stripped.startswith("{"):
      try:
        return _text_of(json.loads(text), self.text_field, self.key(index))
      except json.JSONDecodeError:
        pass
    return text

  def key(self, index: int) -> str:
    fi = int(np.searchsorted(self._starts, index, side="right") - 1)
    path = self.paths[fi]
    rel = os.path.relpath(path, self.root) if self.root else path
    return f"{rel}#{index - int(self._starts[fi])}"


class ConcatSource:
  """Several sources back to back."""

  def __init__(self, sources: Sequence[DocumentSource]):
    self.sources = tuple(sources)
    self._starts = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])]).astype(np.int64)
    self.skipped = tuple(x for s in self.sources for x in getattr(s, "skipped", ()))

  def _locate(self, index: int) -> tuple[DocumentSource, int]:
    si = int(np.searchsorted(self._starts, index, side="right") - 1)
    return self.sources[si], index - int(self._starts[si])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> str:
    src, i = self._locate(index)
    return src[i]

  def key(self, index: int) -> str:
    src, i = self._locate(index)
    return src.key(i)


class SubsetSource:
  """The documents of `base` at `indices` (a split or a host's shard)."""

  def __init__(self, base: DocumentSource, indices: np.ndarray):
    self.base = base
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> str:
    return self.base[int(self.indices[index])]

  def key(self, index: int) -> str:
    return self.base.key(int(self.indices[index]))


def _record_problem(line: bytes, field: str):
  """Why a JSON Lines line is not a document (None if it is one)."""
  try:
    record = json.loads(line)
  except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
    return f"not valid JSON ({e})"
  if isinstance(record, str) or (isinstance(record, dict) and field in record):
    return None
  return f"expected a JSON object with a {field!r} field (data.text_field)"


def _text_of(record, field: str, where: str) -> str:
  if isinstance(record, str):
    return record
  if not isinstance(record, dict) or field not in record:
    raise DataError(f"data.source: {where}: expected a JSON object with a {field!r} field (data.text_field)")
  return str(record[field])


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus() -> TextFilesSource:
  """The embedded corpus: every .py file of the running interpreter's standard library.

  Sorted by path relative to the stdlib directory; third-party packages
  (site-packages / dist-packages) are excluded.  About 1,800 files / 30 MB for
  CPython 3.11.
  """
  root = stdlib_root()
  paths = sorted((p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()),
                 key=lambda p: p.relative_to(root).as_posix())
  return TextFilesSource(tuple(str(p) for p in paths), root=str(root))


def _files_under(path: pathlib.Path) -> list[pathlib.Path]:
  suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + ARRAY_RECORD_SUFFIXES
  return sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes),
                key=lambda p: p.relative_to(path).as_posix())


def open_source(spec: str, text_field: str = "text", skip_bad_records: bool = False) -> DocumentSource:
  """Opens `DataConfig.source`: "embedded", a file, a folder, or a comma-separated list of them."""
  if spec == "embedded":
    return stdlib_corpus()
  parts = [s.strip() for s in spec.split(",") if s.strip()]
  sources: list[DocumentSource] = []
  for part in parts:
    path = pathlib.Path(part)
    if not path.exists():
      raise DataError(f"data.source: {part!r} does not exist (use 'embedded', a file or a folder)")
    root = str(path) if path.is_dir() else str(path.parent)
    files = _files_under(path) if path.is_dir() else [path]
    text = [str(p) for p in files if p.suffix not in JSONL_SUFFIXES + ARRAY_RECORD_SUFFIXES]
    jsonl = [str(p) for p in files if p.suffix in JSONL_SUFFIXES]
    arec = [str(p) for p in files if p.suffix in ARRAY_RECORD_SUFFIXES]
    if text:
      sources.append(TextFilesSource(tuple(text), root=root))
    if jsonl:
      sources.append(JsonlSource(jsonl, text_field, root=root, skip_bad_records=skip_bad_records))
    if arec:
      sources.append(ArrayRecordSource(arec, text_field, root=root))
  if not sources:
    raise DataError(f"data.source: no documents found in {spec!r} (files ending in "
                    f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + ARRAY_RECORD_SUFFIXES)})")
  return sources[0] if len(sources) == 1 else ConcatSource(sources)


def _unit_hash(key: str) -> float:
  """A deterministic number in [0, 1) from a string (independent of PYTHONHASHSEED)."""
  digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0 ** 64


def split_indices(source: DocumentSource, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) document indices: a document is held out iff hash(key) < eval_fraction.

  Deterministic and order-independent.  With eval_fraction > 0 at least one
  document is held out and at least one kept for training.
  """
  n = len(source)
  if n == 0:
    raise DataError("data.source: the corpus has no documents")
  if eval_fraction <= 0:
    return np.arange(n, dtype=np.int64), np.zeros((0,), np.int64)
  h = np.asarray([_unit_hash(source.key(i)) for i in range(n)])
  is_eval = h < eval_fraction
  if not is_eval.any():
    is_eval[int(np.argmin(h))] = True
  if is_eval.all():
    if n == 1:
      raise DataError("data.source: a single document cannot be split into train and eval; "
                      "set data.eval_fraction=0")
    is_eval[int(np.argmax(h))] = False
  return np.nonzero(~is_eval)[0].astype(np.int64), np.nonzero(is_eval)[0].astype(np.int64)
