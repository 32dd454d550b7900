"""Tokenizers: text -> int32 token ids.

* `ByteTokenizer` - UTF-8 bytes, vocab 256 (the default; needs nothing).
* `HFTokenizer`   - a Hugging Face tokenizer: a `tokenizer.json` file, or a folder holding one (or GPT-2
                    style vocab.json + merges.txt), with its special tokens, eos ids and chat template
                    from tokenizer_config.json / generation_config.json, through the `tokenizers` library.

`load_tokenizer(spec)` takes `DataConfig.tokenizer`: "byte", a tokenizer.json or a tokenizer folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Protocol

import numpy as np

from mx01.data.sources import DataError

# tokenizer_config.json's special-token attributes, as transformers names them.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TokenizerError(DataError):
  """A tokenizer file or folder that cannot be read (a data error: one line naming the file)."""


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


def _read_json(path: str):
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _token_text(value):
  """A special token as tokenizer_config.json gives it: a string or {"content": ...}."""
  return value.get("content") if isinstance(value, dict) else value


def _tokenizers():
  try:
    import tokenizers
  except ImportError as e:  # pragma: no cover - in requirements.txt
    raise ImportError("a Hugging Face tokenizer needs the `tokenizers` package (pip install tokenizers)") from e
  return tokenizers


def _byte_level_bpe(vocab_path: str, merges_path: str):
  """GPT-2 style vocab.json + merges.txt -> a byte-level BPE `tokenizers.Tokenizer` (as transformers builds it)."""
  tk = _tokenizers()
  try:
    bpe = tk.models.BPE.from_file(vocab_path, merges_path, continuing_subword_prefix="", end_of_word_suffix="",
                                  fuse_unk=False)
  except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
    raise TokenizerError(f"{vocab_path} / {merges_path}: not a readable BPE vocabulary "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
  tok = tk.Tokenizer(bpe)
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
  return tok


class HFTokenizer:
  """A Hugging Face tokenizer file or folder: encode(text) -> [n_tokens] int32 (no special tokens added).

  Special tokens written in the text (e.g. "<|im_start|>") become their single ids, as with
  transformers' AutoTokenizer.  Attributes: vocab_size, special_tokens {"bos_token": text, ...},
  bos_id (or None), eos_ids (every id that ends generation: generation_config.json's eos_token_id,
  else tokenizer_config.json's eos_token), chat_template (or None).
  """

  def __init__(self, path: str):
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    tokenizer_json = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    tk = _tokenizers()
    if os.path.isfile(tokenizer_json):
      try:
        self._tok = tk.Tokenizer.from_file(tokenizer_json)
      except Exception as e:  # tokenizers raises plain Exceptions for a malformed file
        raise TokenizerError(f"{tokenizer_json}: not a valid tokenizer.json "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    elif os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
      self._tok = _byte_level_bpe(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    else:
      raise TokenizerError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt")
    self.path = path
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = _read_json(config_path) or {}
    self._add_special_tokens(config, config_path)
    self.special_tokens = {k: _token_text(config[k]) for k in _SPECIAL_KEYS if _token_text(config.get(k))}
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.bos_id = self.token_id(self.special_tokens["bos_token"]) if "bos_token" in self.special_tokens else None
    self.eos_ids = self._eos_ids(folder)
    self.chat_template = self._chat_template(folder, config, config_path)

  def _add_special_tokens(self, config: dict, config_path: str):
    """Registers the config's special and added tokens (tokenizer.json usually has them already)."""
    tk = _tokenizers()
    for key, entry in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
      content = entry["content"]  # added even when in the vocabulary: added tokens are matched whole in text
      self._tok.add_tokens([tk.AddedToken(content, special=bool(entry.get("special", True)),
                                          normalized=bool(entry.get("normalized", False)))])
      if self._tok.token_to_id(content) != int(key):
        raise TokenizerError(f"{config_path}: added token {content!r} should have id {key} but the vocabulary "
                             f"gives it {self._tok.token_to_id(content)}")
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    wanted = [_token_text(config.get(k)) for k in _SPECIAL_KEYS] + [_token_text(t) for t in extra]
    if any(wanted):
      self._tok.add_special_tokens([t for t in wanted if t])

  def _eos_ids(self, folder: str) -> tuple:
    gen = _read_json(os.path.join(folder, "generation_config.json")) or {}
    eos = gen.get("eos_token_id")
    if eos is None and "eos_token" in self.special_tokens:
      eos = self.token_id(self.special_tokens["eos_token"])
    if eos is None:
      eos = (_read_json(os.path.join(folder, "config.json")) or {}).get("eos_token_id")
    if eos is None:
      return ()
    return tuple(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))

  @staticmethod
  def _chat_template(folder: str, config: dict, config_path: str):
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):
      with open(jinja_file, encoding="utf-8") as f:
        return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      named = {t.get("name"): t.get("template") for t in template}
      if "default" not in named:
        raise TokenizerError(f"{config_path}: chat_template lists {sorted(named)} but no 'default' template")
      template = named["default"]
    return template

  def token_id(self, token: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise TokenizerError(f"{self.path}: token {token!r} is not in the vocabulary")
    return int(i)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list, *, add_generation_prompt: bool = True, **kwargs) -> str:
    """messages [{"role": ..., "content": ...}] -> the prompt text the model was tuned on."""
    if not self.chat_template:
      raise TokenizerError(f"{self.path}: this tokenizer has no chat template (tokenizer_config.json's "
                           "chat_template or chat_template.jinja); pass plain text instead")
    from mx01.data.chat_template import render_chat_template
    return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                **self.special_tokens, **kwargs)

  def encode_chat(self, messages: list, *, add_generation_prompt: bool = True, **kwargs) -> np.ndarray:
    """The chat template applied, then encoded (its special tokens are in the text already)."""
    return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs))


def load_tokenizer(spec: str) -> Tokenizer:
  """"byte", a tokenizer.json file, or a Hugging Face tokenizer folder."""
  if spec == "byte":
    return ByteTokenizer()
  if not (os.path.isdir(spec) or os.path.isfile(spec)):
    raise DataError(f"data.tokenizer: {spec!r} is neither 'byte' nor a tokenizer.json file or a tokenizer folder")
  try:
    return HFTokenizer(spec)
  except TokenizerError as e:
    raise TokenizerError(f"data.tokenizer: {e}; point data.tokenizer at a valid tokenizer or use 'byte'") from None
