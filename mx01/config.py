"""Typed, frozen, validated configuration for mx01.

Every knob of a run lives in one of four dataclasses, grouped under `Config`:

* `ModelConfig`    - the architecture (MiniMax-Text-01 family).
* `ParallelConfig` - the device mesh and how the model is laid out on it.
* `TrainConfig`    - optimisation, schedule, checkpointing, logging.
* `DataConfig`     - corpus, tokenizer and packing.

All dataclasses are frozen and validate themselves in `__post_init__`; an
invalid value raises `ConfigError` naming the field and the fix.  Presets are
plain data (`mx01/presets.py`).  This module also holds the one override
parser: `split_override_flags` takes the `--config.section.key=value` flags off
a command line and `apply_overrides` applies them, checking every key and value
against these classes (recipes/flags.py only wires argparse around it).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from typing import Any, Literal, Optional, Sequence, Tuple

LIGHTNING = "lightning"
SOFTMAX = "softmax"
LAYER_KINDS = (LIGHTNING, SOFTMAX)


# One error type for every invalid config value, the kernels' tuning configs included
# (defined with them, at the bottom layer, so that they can raise it).
from pallas_kernels.errors import ConfigError  # noqa: E402
from pallas_kernels.lightning.config import LightningConfig  # noqa: E402


def _require(cond: bool, field: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The MiniMax-Text-01 architecture.

  Attribute names follow the paper; the transformers names are given where
  they differ (see `mx01/convert.py`).
  """

  vocab_size: int = 256
  hidden_size: int = 128
  num_layers: int = 4
  num_heads: int = 4  # query heads (lightning layers use as many K/V heads)
  num_kv_heads: int = 2  # K/V heads of the softmax (GQA) layers
  head_dim: int = 32
  # Layer pattern, repeated cyclically over `num_layers` unless `layer_types`
  # spells out every layer.  MiniMax-Text-01: 7 lightning then 1 softmax.
  layer_pattern: Tuple[str, ...] = (LIGHTNING,) * 7 + (SOFTMAX,)
  layer_types: Optional[Tuple[str, ...]] = None
  # Feed-forward: "moe" (MiniMax) or "dense" (a SwiGLU MLP, for ablations).
  ffn_type: Literal["moe", "dense"] = "moe"
  intermediate_size: int = 256  # per expert (or of the dense MLP)
  num_experts: int = 4
  num_experts_per_tok: int = 2
  # Expert capacity as a multiple of the even share (tokens*k/E); None = no drop.
  capacity_factor: Optional[float] = None
  # How the experts run (mx01/layers/moe.py): "capacity" (batched matmul over
  # per-expert buffers; needs capacity_factor), "ragged" (dropless
  # jax.lax.ragged_dot), "ragged_mosaic" (dropless, jax's Hopper kernels),
  # "ragged_tokamax" (dropless, the tokamax library's ragged_dot; optional, GPU),
  # "dense" (every expert on every token: the reference); "auto" = capacity when
  # capacity_factor is set, else ragged_mosaic on Hopper GPUs, ragged on other
  # accelerators and dense on CPU (mx01/ops.py).
  moe_impl: Literal["auto", "capacity", "ragged", "ragged_mosaic", "ragged_tokamax", "dense"] = "auto"
  router_aux_loss_coef: float = 0.001
  # "per_layer": mean over layers of E*sum_e f_e*P_e (GShard/Switch per layer);
  # "pooled": the transformers formula, f and P pooled over all layers first.
  aux_loss_reduction: Literal["per_layer", "pooled"] = "per_layer"
  # Lightning attention: tokens per block of the XLA block-wise form (lightning_impl="xla").
  block_size: int = 256
  # "reference" (token-by-token recurrence), "xla" (block-wise form), "pallas"
  # (GPU kernels); "auto" = pallas on GPU, xla elsewhere (mx01/ops.py).
  lightning_impl: Literal["auto", "reference", "xla", "pallas"] = "auto"
  # The Pallas kernels' tiles and launch parameters, used as given
  # (pallas_kernels/lightning/config.py: its defaults are the fastest of the
  # H200 sweep; block_size at most 128).
  lightning_kernel: LightningConfig = dataclasses.field(default_factory=LightningConfig)
  # Softmax attention: "xla" (einsum, materialises the scores), "pallas" (jax's
  # Pallas flash attention with segment ids), "cudnn" (cuDNN's flash attention; packed rows in its ragged
  # layout, up to cudnn_max_segments documents a row, a batch with a longer row through the Pallas kernel);
  # "auto" = pallas on GPU, xla elsewhere.
  attention_impl: Literal["auto", "xla", "pallas", "cudnn"] = "auto"
  # Documents a row that cuDNN's ragged layout holds (attention_impl=cudnn, packed rows).  cuDNN sizes its
  # buffers for that many documents of the full row length, whatever the rows hold: the softmax statistics
  # are [batch x this, heads, seq] float32, and the backward's workspace grows the same way (BENCHMARKS.md,
  # "cuDNN on packed rows"), so step memory grows linearly with it.  Set it to the data's documents per
  # row (padding at a row's end counts as one).
  cudnn_max_segments: int = 16
  # Softmax attention: RoPE on the first `rotary_dim` dims of each head
  # (MiniMax-Text-01: 64 of 128).  None means the whole head.
  rotary_dim: Optional[int] = None
  rope_theta: float = 10_000.0
  # DeepNorm-style residual scaling: x <- norm(x)*alpha + branch*beta.
  lightning_alpha: float = 1.0
  lightning_beta: float = 1.0
  softmax_alpha: float = 1.0
  softmax_beta: float = 1.0
  mlp_alpha: float = 1.0
  mlp_beta: float = 1.0
  rms_norm_eps: float = 1e-5
  initializer_range: float = 0.02
  tie_word_embeddings: bool = False
  max_seq_len: int = 1 << 20
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  # Rematerialise each decoder layer in the backward pass.
  remat: Literal["none", "full", "save_dots"] = "none"
  # Run the layers that repeat with a period under nn.scan (params stacked
  # per period; compile time independent of depth); False unrolls every layer,
  # which XLA schedules better (the research presets, measured faster on GPUs).
  scan_layers: bool = True
  # Training loss: apply the LM head and cross-entropy in sequence chunks of
  # this many tokens (rematerialised), so [batch, seq, vocab] logits never
  # exist at once -- what makes 1M-token steps fit.  None = one piece.
  loss_chunk_size: Optional[int] = None

  def __post_init__(self):
    if isinstance(self.lightning_kernel, dict):  # a config saved with to_dict / to_json
      try:
        object.__setattr__(self, "lightning_kernel", LightningConfig(**self.lightning_kernel))
      except TypeError as e:
        raise ConfigError(f"lightning_kernel: {e}") from None
    _require(isinstance(self.lightning_kernel, LightningConfig), "lightning_kernel",
             f"must be a pallas_kernels.LightningConfig, got {type(self.lightning_kernel).__name__}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "intermediate_size", "block_size", "max_seq_len", "cudnn_max_segments"):
      v = getattr(self, name)
      _require(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
    _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
             f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}")
    _require(len(self.layer_pattern) > 0, "layer_pattern", "must name at least one layer kind")
    for kind in self.layer_pattern + tuple(self.layer_types or ()):
      _require(kind in LAYER_KINDS, "layer_types",
               f"unknown layer kind {kind!r}; choose from {LAYER_KINDS}")
    if self.layer_types is not None:
      _require(len(self.layer_types) == self.num_layers, "layer_types",
               f"has {len(self.layer_types)} entries but num_layers={self.num_layers}; "
               "give one kind per layer or set layer_types=None to repeat layer_pattern")
    if self.ffn_type == "moe":
      _require(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
      _require(1 <= self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
               f"top_k={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
    _require(self.ffn_type in ("moe", "dense"), "ffn_type", f"must be 'moe' or 'dense', got {self.ffn_type!r}")
    if self.capacity_factor is not None:
      _require(self.capacity_factor > 0, "capacity_factor", f"must be > 0 or None, got {self.capacity_factor}")
    _require(self.moe_impl in ("auto", "capacity", "ragged", "ragged_mosaic", "ragged_tokamax", "dense"),
             "moe_impl",
             f"must be one of auto/capacity/ragged/ragged_mosaic/ragged_tokamax/dense, got {self.moe_impl!r}")
    _require(not (self.moe_impl == "capacity" and self.capacity_factor is None), "moe_impl",
             "'capacity' needs capacity_factor (e.g. 1.25); set it or use a dropless moe_impl "
             "('ragged', 'ragged_mosaic', 'dense')")
    rd = self.rotary_dim if self.rotary_dim is not None else self.head_dim
    _require(0 < rd <= self.head_dim and rd % 2 == 0, "rotary_dim",
             f"must be even and in (0, head_dim={self.head_dim}], got {rd}")
    _require(self.aux_loss_reduction in ("per_layer", "pooled"), "aux_loss_reduction",
             f"must be 'per_layer' or 'pooled', got {self.aux_loss_reduction!r}")
    _require(self.lightning_impl in ("auto", "reference", "xla", "pallas"), "lightning_impl",
             f"must be one of auto/reference/xla/pallas, got {self.lightning_impl!r}")
    _require(self.attention_impl in ("auto", "xla", "pallas", "cudnn"), "attention_impl",
             f"must be one of auto/xla/pallas/cudnn, got {self.attention_impl!r}")
    if self.loss_chunk_size is not None:
      _require(isinstance(self.loss_chunk_size, int) and self.loss_chunk_size > 0, "loss_chunk_size",
               f"must be a positive integer or None, got {self.loss_chunk_size!r}")
    _require(self.remat in ("none", "full", "save_dots"), "remat",
             f"must be one of none/full/save_dots, got {self.remat!r}")
    for name in ("param_dtype", "compute_dtype"):
      _require(getattr(self, name) in ("float32", "bfloat16"), name,
               f"must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")

  # ---- derived -------------------------------------------------------------
  @property
  def resolved_layer_types(self) -> Tuple[str, ...]:
    """One layer kind per layer."""
    if self.layer_types is not None:
      return tuple(self.layer_types)
    p = self.layer_pattern
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  @property
  def resolved_rotary_dim(self) -> int:
    return self.rotary_dim if self.rotary_dim is not None else self.head_dim

  @property
  def is_moe(self) -> bool:
    return self.ffn_type == "moe"


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """Device mesh: the product of all axes must equal the device count.

  The attention part of the model uses (data, sequence, tensor); the MoE part
  re-factors the same devices into (expert_data, expert, expert_tensor) with
  expert_data = data*sequence*tensor / (expert*expert_tensor).
  """

  data: int = 1
  fsdp: bool = False  # shard parameters and optimizer state over `data`
  tensor: int = 1
  sequence: int = 1
  expert: int = 1
  expert_tensor: int = 1

  def __post_init__(self):
    for name in ("data", "tensor", "sequence", "expert", "expert_tensor"):
      v = getattr(self, name)
      _require(isinstance(v, int) and v >= 1, name, f"must be an integer >= 1, got {v!r}")
    dense = self.data * self.tensor * self.sequence
    _require(dense % (self.expert * self.expert_tensor) == 0, "expert",
             f"expert*expert_tensor={self.expert * self.expert_tensor} must divide "
             f"data*tensor*sequence={dense} (the MoE view re-factors the same devices)")

  @property
  def num_devices(self) -> int:
    return self.data * self.tensor * self.sequence

  @property
  def expert_data(self) -> int:
    return self.num_devices // (self.expert * self.expert_tensor)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "embedded"  # "embedded", a path to text/JSONL files or a folder, or ArrayRecord
  tokenizer: str = "byte"  # "byte" or a path to a tokenizer.json
  text_field: str = "text"  # the JSON field holding a document's text (JSONL / ArrayRecord)
  seq_len: int = 256
  eval_fraction: float = 0.02
  shuffle_seed: int = 0
  prefetch: int = 2
  skip_bad_records: bool = False  # skip (and count) malformed JSON Lines records instead of stopping

  def __post_init__(self):
    _require(self.seq_len > 0, "seq_len", f"must be positive, got {self.seq_len}")
    _require(0.0 <= self.eval_fraction < 1.0, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
    _require(isinstance(self.prefetch, int) and self.prefetch >= 0, "prefetch",
             f"must be an integer >= 0 (batches prefetched), got {self.prefetch!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 200
  batch_size: int = 8
  learning_rate: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 20
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  grad_accum: int = 1
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 4
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  max_nonfinite_steps: int = 10
  run_dir: str = "runs/default"
  # Learning rate: linear warmup to learning_rate, then decay to min_lr_ratio * learning_rate.
  lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
  async_checkpointing: bool = True
  tensorboard: bool = True

  def __post_init__(self):
    for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
      v = getattr(self, name)
      _require(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
    _require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
    _require(0 <= self.warmup_steps <= self.steps, "warmup_steps",
             f"must be in [0, steps={self.steps}], got {self.warmup_steps}")
    _require(self.batch_size % self.grad_accum == 0, "grad_accum",
             f"must divide batch_size={self.batch_size}, got {self.grad_accum}")
    for name in ("eval_every", "eval_batches", "max_nonfinite_steps"):
      v = getattr(self, name)
      _require(isinstance(v, int) and v >= 0, name, f"must be an integer >= 0 (0 disables), got {v!r}")
    _require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
    _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
    _require(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")
    _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "b1", f"Adam betas must be in [0, 1), got b1={self.b1}, b2={self.b2}")
    _require(self.lr_schedule in ("cosine", "linear", "constant"), "lr_schedule",
             f"must be cosine/linear/constant, got {self.lr_schedule!r}")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)

  def __post_init__(self):
    _require(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
             f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")


# ---- overrides ---------------------------------------------------------------
# The one override parser: the recipes' `--config.section.key=value` flags, the
# benchmarks' and `from_dict` all go through `apply_overrides` / `check_value`.

OVERRIDE_FLAG = "--config."


def field_types(cls) -> dict:
  """{field name: resolved type} of a config dataclass."""
  return typing.get_type_hints(cls)


def config_keys(cls=None, prefix: str = "") -> list[str]:
  """Every settable dotted key under `cls` (default `Config`), e.g. "model.num_layers"."""
  cls = Config if cls is None else cls
  out = []
  for name, typ in field_types(cls).items():
    out += config_keys(typ, f"{prefix}{name}.") if dataclasses.is_dataclass(typ) else [prefix + name]
  return out


def parse_value(raw: str, typ, key: str):
  """Parses a command-line string into `typ`, raising ConfigError on mismatch."""
  origin = typing.get_origin(typ)
  args = typing.get_args(typ)
  if origin is typing.Union:  # Optional[X]
    non_none = [a for a in args if a is not type(None)]
    if raw.lower() in ("none", "null"):
      return None
    return parse_value(raw, non_none[0], key)
  if origin is Literal:
    if raw not in args:
      close = difflib.get_close_matches(raw, [str(a) for a in args], n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"{key}: {raw!r} is not one of {list(args)}{hint}")
    return raw
  if origin in (tuple, Tuple):
    items = [s.strip() for s in raw.strip("()[]").split(",") if s.strip()]
    elem = args[0] if args else str
    return tuple(parse_value(s.strip("'\""), elem, key) for s in items)
  if typ is bool:
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"{key}: expected a bool (true/false), got {raw!r}")
  if typ is int:
    try:
      return int(raw)
    except ValueError:
      # "1e6" and "2048.0" are integers written as floats; anything else is not a number.
      try:
        as_float = float(raw)
      except ValueError:
        raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
      if as_float.is_integer():
        return int(as_float)
      raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
  if typ is float:
    try:
      return float(raw)
    except ValueError:
      raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
  return raw


def check_value(value, typ, key: str):
  """Validates a Python value (not a string) against a field type; returns it normalised (int -> float, list -> tuple)."""
  origin = typing.get_origin(typ)
  args = typing.get_args(typ)
  if origin is typing.Union:
    if value is None and type(None) in args:
      return value
    return check_value(value, [a for a in args if a is not type(None)][0], key)
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    return value
  if origin in (tuple, Tuple):
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"{key}: expected a sequence, got {type(value).__name__}")
    return tuple(value)
  if typ is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if typ in (int, float, bool, str) and not (isinstance(value, typ) and
                                             not (typ is int and isinstance(value, bool))):
    raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")
  return value


def _unknown_key(full: str, cls, root) -> ConfigError:
  """The error for an unknown dotted key: the nearest valid key of the whole config, and the section's keys."""
  fields = sorted(f.name for f in dataclasses.fields(cls))
  close = difflib.get_close_matches(full, config_keys(root), n=1)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  return ConfigError(f"unknown config key {full!r} in {cls.__name__}{hint} (valid: {', '.join(fields)})")


def _replace_many(cfg, items: list, prefix: str, root):
  """Sets several dotted paths at once; each dataclass is rebuilt (and validated) once, with all its changes."""
  fields = {f.name for f in dataclasses.fields(cfg)}
  types = field_types(type(cfg))
  changes, nested = {}, {}
  for path, value, from_string in items:
    head, _, rest = path.partition(".")
    full = prefix + path
    if head not in fields:
      raise _unknown_key(full, type(cfg), root)
    typ = types[head]
    if rest:
      if not dataclasses.is_dataclass(typ):
        raise ConfigError(f"{full!r}: {prefix + head!r} is a value, not a section")
      nested.setdefault(head, []).append((rest, value, from_string))
      continue
    if dataclasses.is_dataclass(typ):
      raise ConfigError(f"{full!r} is a section; set one of its fields, e.g. {full}.{dataclasses.fields(typ)[0].name}")
    changes[head] = parse_value(value, typ, full) if from_string else check_value(value, typ, full)
  for head, sub_items in nested.items():
    changes[head] = _replace_many(getattr(cfg, head), sub_items, prefix + head + ".", root)
  return dataclasses.replace(cfg, **changes)


def parse_overrides(overrides: dict[str, Any] | Sequence[str]) -> list[tuple[str, Any, bool]]:
  """[(dotted key, value, value is a string to parse)] from {"model.num_layers": 4} or ["model.num_layers=4"]."""
  if isinstance(overrides, dict):
    return [(k, v, isinstance(v, str)) for k, v in overrides.items()]
  items = []
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} must look like section.key=value, e.g. model.num_layers=4")
    k, v = item.split("=", 1)
    items.append((k.strip(), v.strip(), True))
  return items


def apply_overrides(cfg, overrides: dict[str, Any] | Sequence[str]):
  """Applies overrides given as {"model.num_layers": 4} or ["model.num_layers=4", ...].

  All overrides are applied together and validated once, so their order does
  not matter (model.moe_impl=capacity may come before model.capacity_factor=1.25);
  a key given twice takes its last value.  `cfg` is a `Config` or one of its
  sections (then the keys are relative to it, e.g. "num_layers" on a ModelConfig).
  Unknown keys raise ConfigError naming the nearest valid key.
  """
  last = {}
  for k, v, from_string in parse_overrides(overrides):
    last[k] = (k, v, from_string)
  return _replace_many(cfg, list(last.values()), "", type(cfg)) if last else cfg


def split_override_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits command-line arguments into (["model.num_layers=4", ...], the other arguments).

  Accepts `--config.model.num_layers=4` and `--config.model.num_layers 4`; `--config=NAME` (the preset)
  is left to the caller's argument parser.
  """
  overrides, rest = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(OVERRIDE_FLAG):
      body = arg[len(OVERRIDE_FLAG):]
      if "=" not in body:  # "--config.key value"
        if i + 1 >= len(argv):
          raise ConfigError(f"override {arg!r} needs a value: {arg}=VALUE")
        body = f"{body}={argv[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
  """Rebuilds a Config saved with `to_dict`/`to_json` (validating it)."""
  kw = {}
  for f in dataclasses.fields(Config):
    sub_cls = field_types(Config)[f.name]
    sub = d.get(f.name, {})
    unknown = set(sub) - {g.name for g in dataclasses.fields(sub_cls)}
    if unknown:
      raise ConfigError(f"{f.name}: unknown keys {sorted(unknown)}")
    vals = {}
    hints = field_types(sub_cls)
    for k, v in sub.items():
      vals[k] = check_value(v, hints[k], f"{f.name}.{k}")
    kw[f.name] = sub_cls(**vals)
  return Config(**kw)


def to_json(cfg: Config) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def diff(a: Config, b: Config, prefix: str = "") -> list[str]:
  """Lists the dotted keys whose values differ between two configs."""
  out = []
  for f in dataclasses.fields(a):
    va, vb = getattr(a, f.name), getattr(b, f.name)
    key = f"{prefix}{f.name}"
    if dataclasses.is_dataclass(va):
      out += diff(va, vb, key + ".")
    elif va != vb:
      out.append(f"{key}: {va!r} != {vb!r}")
  return out
