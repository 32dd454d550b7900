"""Tokenizers: text -> int32 token ids.

* `ByteTokenizer` - UTF-8 bytes, vocab 256 (the default; needs nothing).
* `HFTokenizer`   - a local `tokenizer.json` through the `tokenizers` library.

`load_tokenizer(spec)` takes `DataConfig.tokenizer`: "byte" or a path.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import numpy as np

from mx01.data.sources import DataError


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes as tokens: encode(text) -> [n_bytes] int32 in [0, 256)."""

  vocab_size: int = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizers` tokenizer.json: encode(text) -> [n_tokens] int32 (no special tokens added)."""

  def __init__(self, path: str):
    try:
      import tokenizers
    except ImportError as e:  # pragma: no cover - installed with transformers
      raise ImportError("data.tokenizer: a tokenizer.json needs the `tokenizers` package "
                        "(pip install tokenizers)") from e
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception for a file it cannot parse
      raise DataError(f"data.tokenizer: {path} is not a tokenizer.json the `tokenizers` library can read "
                      f"({' '.join(str(e).split())}); point data.tokenizer at a valid file or use 'byte'") from e
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
  """"byte", a tokenizer.json file, or a folder that holds one."""
  if spec == "byte":
    return ByteTokenizer()
  path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
  if not os.path.isfile(path):
    raise DataError(f"data.tokenizer: {spec!r} is neither 'byte' nor a tokenizer.json file (or a folder holding one)")
  return HFTokenizer(path)
