"""The released MiniMax-Text-01 checkpoint (Hugging Face safetensors) <-> mx01 params, streamed and sharded.

    params, config = load_safetensors("path/to/checkpoint_dir", shardings=None)   # config from config.json
    save_safetensors(params, config, "out_dir", max_shard_size="5GB")
    params = from_hf_state_dict(model.state_dict(), config)    # a live transformers model (torch or numpy)
    config = config_from_hf(json.load(open("config.json")))     # the release's or transformers' config.json

Two tensor layouts are read, and the first is written:

* released (on disk; what transformers' `save_pretrained` writes and the Hub holds): one Linear per
  expert, `model.layers.N.block_sparse_moe.experts.E.w1|w2|w3.weight` ([I, H], [H, I], [I, H]) and the
  router `model.layers.N.block_sparse_moe.gate.weight` [E, H];
* transformers' in-memory names (`model.state_dict()`): `mlp.gate.weight`, `mlp.experts.gate_up_proj`
  [E, 2I, H] (gate rows first) and `mlp.experts.down_proj` [E, H, I].

Linear weights are stored [out, in]; our kernels are [in, out]; our experts are wi_gate/wi_up [E, H, I]
(w1 / w3) and wo [E, I, H] (w2).  `_layer_rows` / `_top_rows` are the one name table; how layers sit in the params tree
(repeating layers stacked for the scan) is `mx01.model.scan_plan` / `layer_params`.

Streaming: every parameter is built by `jax.make_array_from_callback` in its target sharding; the
callback reads only the slice that device needs, straight from the file into the array that is sent
(per-expert tensors into their place in the stack; `_SafetensorsSource`), and the load waits for the
transfers whenever its staging memory (an eighth of the checkpoint, at most a GiB, grown to the
largest parameter) is full, so a host holds about that beyond its own shards.  Weights go to the devices in
their stored [out, in] order and dtype and are transposed and cast there (strided and bfloat16 host
copies run at a fraction of a GB/s).  Names and shapes are all checked before any data is read.

The lightning layers' decay buffers (`slope_rate`, ...) are not weights: they follow from the config,
are checked on import (a wrong depth shows there) and are written on export, as transformers writes them.

RoPE: the release rotates the first `rotary_dim` = 64 of 128 head dims (`rope_parameters.
partial_rotary_factor` = 0.5 in newer configs); transformers 5.24's MiniMax ignores both and rotates
the whole head.  We follow the release; outputs agree with transformers only at full rotary.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from mx01.config import LIGHTNING, SOFTMAX, ConfigError, ModelConfig
from mx01.lightning import minimax_log_decay

_HF_KIND = {"linear_attention": LIGHTNING, "full_attention": SOFTMAX}
_OUR_KIND = {v: k for k, v in _HF_KIND.items()}
_RELEASE_KIND = {0: LIGHTNING, 1: SOFTMAX}  # attn_type_list
_DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
_MODEL_TYPES = ("minimax", "MiniMaxText01", "minimax_text_01")
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}
# DeepNorm factors: (our field, transformers' key, the release's key).
_DEEPNORM = (("lightning_alpha", "linear_attn_alpha_factor", "layernorm_linear_attention_alpha"),
             ("lightning_beta", "linear_attn_beta_factor", "layernorm_linear_attention_beta"),
             ("softmax_alpha", "full_attn_alpha_factor", "layernorm_full_attention_alpha"),
             ("softmax_beta", "full_attn_beta_factor", "layernorm_full_attention_beta"),
             ("mlp_alpha", "mlp_alpha_factor", "layernorm_mlp_alpha"),
             ("mlp_beta", "mlp_beta_factor", "layernorm_mlp_beta"))


_STAGING_BYTES = 1 << 30  # host staging memory of a load (`_Staging`): transfers run ahead this far


class ConversionError(ValueError):
  """A checkpoint or config that mx01 cannot represent (missing, extra or mis-shaped tensors, unsupported keys)."""


# ---- config ------------------------------------------------------------------

def config_from_hf(hf) -> ModelConfig:
  """A config.json (dict) or transformers MiniMaxConfig -> ModelConfig.

  Reads both the release's keys (attn_type_list, layernorm_*_alpha/beta, rotary_dim, rope_theta) and
  transformers' (layer_types, *_factor, rope_parameters); values mx01 does not implement raise
  ConversionError naming the key.
  """
  get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, Mapping) else (lambda k, d=None: getattr(hf, k, d))

  def unsupported(key, value, why):
    raise ConversionError(f"config.json: {key}={value!r} is not supported: {why}")

  model_type = get("model_type")
  if model_type is not None and model_type not in _MODEL_TYPES:
    unsupported("model_type", model_type, f"this converter reads MiniMax-Text-01 checkpoints {_MODEL_TYPES}")
  if get("postnorm", True) is not True:
    unsupported("postnorm", get("postnorm"), "mx01 implements the released post-norm (DeepNorm) layers only")
  if (get("shared_intermediate_size") or 0) > 0:
    unsupported("shared_intermediate_size", get("shared_intermediate_size"), "mx01's MoE has no shared expert")
  if get("hidden_act", "silu") != "silu":
    unsupported("hidden_act", get("hidden_act"), "mx01's experts are SwiGLU (silu) only")
  if get("sliding_window") is not None:
    unsupported("sliding_window", get("sliding_window"), "mx01's softmax layers attend to the whole context")
  rope = dict(get("rope_parameters") or get("rope_scaling") or {})
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    unsupported("rope_parameters.rope_type", rope.get("rope_type", rope.get("type")), "only plain RoPE is implemented")

  n_layers = get("num_hidden_layers")
  if get("layer_types") is not None:
    key, raw, table = "layer_types", list(get("layer_types")), _HF_KIND
  elif get("attn_type_list") is not None:
    key, raw, table = "attn_type_list", list(get("attn_type_list")), _RELEASE_KIND
  else:
    raise ConversionError("config.json: neither layer_types nor attn_type_list is given; "
                          "MiniMax needs one attention kind per layer")
  bad = [(i, t) for i, t in enumerate(raw) if t not in table]
  if bad:
    unsupported(f"{key}[{bad[0][0]}]", bad[0][1], f"mx01 knows {sorted(table, key=str)} (lightning / softmax)")
  if len(raw) != n_layers:
    raise ConversionError(f"config.json: {key} has {len(raw)} entries but num_hidden_layers={n_layers}")

  heads = get("num_attention_heads")
  head_dim = get("head_dim") or get("hidden_size") // heads
  rotary_dim, factor = get("rotary_dim"), rope.get("partial_rotary_factor", get("partial_rotary_factor"))
  if factor is not None:
    from_factor = int(head_dim * factor)
    if rotary_dim is not None and rotary_dim != from_factor:
      raise ConversionError(f"config.json: rotary_dim={rotary_dim} disagrees with partial_rotary_factor={factor} "
                            f"x head_dim={head_dim}; fix one of them")
    rotary_dim = from_factor
  if rotary_dim == head_dim:
    rotary_dim = None  # the whole head: ModelConfig's canonical spelling
  dtype_key = "dtype" if get("dtype") is not None else "torch_dtype"
  dtype = str(get(dtype_key) or "float32").replace("torch.", "")
  if dtype not in _DTYPES:
    unsupported(dtype_key, dtype, "mx01 keeps parameters in float32 or bfloat16; pass config= with the param_dtype "
                "you want to convert on load")


  try:
    return ModelConfig(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_layers=n_layers,
        num_heads=heads, num_kv_heads=get("num_key_value_heads") or heads, head_dim=head_dim,
        layer_types=tuple(table[t] for t in raw), ffn_type="moe", intermediate_size=get("intermediate_size"),
        num_experts=get("num_local_experts"), num_experts_per_tok=get("num_experts_per_tok"),
        router_aux_loss_coef=get("router_aux_loss_coef", 0.001), aux_loss_reduction="pooled",
        block_size=get("block_size", 256), rotary_dim=rotary_dim,
        rope_theta=float(rope.get("rope_theta", get("rope_theta", 10_000.0))),
        **{ours: float(get(h, get(r, 1.0))) for ours, h, r in _DEEPNORM},
        rms_norm_eps=get("rms_norm_eps", 1e-5), initializer_range=get("initializer_range", 0.02),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        max_seq_len=get("max_position_embeddings") or ModelConfig.max_seq_len, param_dtype=_DTYPES[dtype])
  except ConfigError as e:
    raise ConversionError(f"config.json does not make a valid mx01 model: {e}") from None


def config_to_hf(config: ModelConfig) -> dict:
  """ModelConfig -> config.json contents: transformers' MiniMax keys and the release's names for the same values.

  transformers 5.24 ignores rotary_dim / partial_rotary_factor (it rotates the whole head), so only a
  full-rotary config computes the same in transformers.
  """
  c = config
  if not c.is_moe:
    raise ConversionError("the MiniMax checkpoint format has only MoE feed-forward layers; "
                          "ffn_type='dense' has no equivalent")
  rd = c.resolved_rotary_dim
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if rd != c.head_dim:
    rope["partial_rotary_factor"] = rd / c.head_dim
  out = dict(
      model_type="minimax", architectures=["MiniMaxForCausalLM"], dtype=c.param_dtype,
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
      head_dim=c.head_dim, hidden_act="silu", rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
      num_experts_per_tok=c.num_experts_per_tok, num_local_experts=c.num_experts,
      router_aux_loss_coef=c.router_aux_loss_coef, layer_types=[_OUR_KIND[k] for k in c.resolved_layer_types],
      block_size=c.block_size, rope_parameters=rope, max_position_embeddings=c.max_seq_len,
      initializer_range=c.initializer_range,
      # The release's spelling of the same values (read by engines that follow the original config).
      attn_type_list=[1 if k == SOFTMAX else 0 for k in c.resolved_layer_types], rotary_dim=rd,
      postnorm=True, shared_intermediate_size=0)
  for ours, hf_key, release_key in _DEEPNORM:
    out[hf_key] = out[release_key] = getattr(c, ours)
  return out


# ---- the name table ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Row:
  """One parameter: our path and shape, how it is stored ("vector", "linear" = [out, in], "experts" = per
  expert [out, in]), its released name ("{e}" = expert index) and transformers' in-memory name
  ("name[k]" = the k-th of the equal row blocks of a fused tensor)."""
  path: tuple
  shape: tuple
  kind: str
  released: str
  in_memory: str


def _layer_rows(config: ModelConfig, i: int) -> list[_Row]:
  """The name table: every parameter of layer i."""
  c = config
  d, h, kv, hd, e, m = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.num_experts, c.intermediate_size
  rows = [
      (("input_norm", "scale"), (d,), "vector", "input_layernorm.weight", None),
      (("post_attn_norm", "scale"), (d,), "vector", "post_attention_layernorm.weight", None),
      (("moe", "router"), (d, e), "linear", "block_sparse_moe.gate.weight", "mlp.gate.weight"),
      (("moe", "wi_gate"), (e, d, m), "experts", "block_sparse_moe.experts.{e}.w1.weight", "mlp.experts.gate_up_proj[0]"),
      (("moe", "wi_up"), (e, d, m), "experts", "block_sparse_moe.experts.{e}.w3.weight", "mlp.experts.gate_up_proj[1]"),
      (("moe", "wo"), (e, m, d), "experts", "block_sparse_moe.experts.{e}.w2.weight", "mlp.experts.down_proj"),
  ]
  if c.resolved_layer_types[i] == LIGHTNING:
    rows += [
        (("attn", "qkv_proj", "kernel"), (d, 3 * h * hd), "linear", "self_attn.qkv_proj.weight", None),
        (("attn", "output_gate", "kernel"), (d, h * hd), "linear", "self_attn.output_gate.weight", None),
        (("attn", "out_proj", "kernel"), (h * hd, d), "linear", "self_attn.out_proj.weight", None),
        (("attn", "norm", "scale"), (h * hd,), "vector", "self_attn.norm.weight", None),
    ]
  else:
    rows += [
        (("attn", "q_proj", "kernel"), (d, h * hd), "linear", "self_attn.q_proj.weight", None),
        (("attn", "k_proj", "kernel"), (d, kv * hd), "linear", "self_attn.k_proj.weight", None),
        (("attn", "v_proj", "kernel"), (d, kv * hd), "linear", "self_attn.v_proj.weight", None),
        (("attn", "o_proj", "kernel"), (h * hd, d), "linear", "self_attn.o_proj.weight", None),
    ]
  p = f"model.layers.{i}."
  return [_Row(path, shape, kind, p + rel, p + (mem or rel)) for path, shape, kind, rel, mem in rows]


def _top_rows(config: ModelConfig) -> list[_Row]:
  c = config
  rows = [_Row(("embed", "embedding"), (c.vocab_size, c.hidden_size), "vector", "model.embed_tokens.weight",
               "model.embed_tokens.weight"),
          _Row(("final_norm", "scale"), (c.hidden_size,), "vector", "model.norm.weight", "model.norm.weight")]
  if not c.tie_word_embeddings:
    rows.append(_Row(("lm_head", "kernel"), (c.hidden_size, c.vocab_size), "linear", "lm_head.weight",
                     "lm_head.weight"))
  return rows


def _layers_of(tree: dict, config: ModelConfig) -> tuple[dict, list[dict]]:
  """A params tree -> (top-level entries, one dict per layer, unstacked from the scan)."""
  from mx01 import model as model_lib
  layers = model_lib.layer_params(tree, config)
  return {k: v for k, v in tree.items() if k != model_lib.SCAN_NAME and not k.startswith("layers_")}, layers


def _get(tree: dict, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# ---- reading -------------------------------------------------------------------

def _to_numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):  # torch.Tensor; bf16 has no torch->numpy path: via float32, exactly
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      return x.float().numpy().astype(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


class _DictSource:
  """Tensors held in memory (a state dict of torch tensors or numpy arrays)."""

  def __init__(self, state_dict: Mapping):
    self._sd = state_dict

  def shapes(self) -> dict:
    return {k: tuple(v.shape) for k, v in self._sd.items()}

  def shape(self, name: str) -> tuple:
    return tuple(self._sd[name].shape)

  def dtype(self, name: str) -> np.dtype:
    x = self._sd[name]
    return _to_numpy(x.reshape(-1)[:1]).dtype

  def read_into(self, name: str, index: tuple, out: np.ndarray) -> None:
    out[...] = _to_numpy(self._sd[name][index])

  def read(self, name: str, index: tuple) -> np.ndarray:
    return _read_new(self, name, index)


# safetensors dtype names -> numpy (ml_dtypes for bfloat16).
_SAFETENSORS_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
                       "I8": np.int8, "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
                       "BOOL": np.bool_}


class _SafetensorsSource:
  """Tensors in safetensors files, read slice by slice straight into the arrays that go to the devices.

  The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
  data_offsets}} and the row-major data.  We read the header and the byte ranges ourselves instead of
  going through safetensors' numpy API, which returns every slice as a fresh copy out of a memory map:
  here the stored rows land by `readinto` directly in their destination (the experts of a stacked leaf
  in their place in the stack), with no memory map whose touched pages stay resident, so a load holds
  about one tensor per in-flight transfer on the host.
  """

  def __init__(self, files: list[str], max_open: int = 4):
    self._entries = {}  # name -> (file, dtype, shape, first byte)
    for f in files:
      for name, entry in self._header(f).items():
        self._entries[name] = (f,) + entry
    self._handles = collections.OrderedDict()
    self._max_open = max_open

  @staticmethod
  def _header(f: str) -> dict:
    """{name: (dtype, shape, first byte)} of one file, every entry checked against the file's size."""
    try:
      with open(f, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        n = int.from_bytes(fh.read(8), "little")
        if size < 8 or not 2 <= n <= size - 8:
          raise ValueError(f"header length {n} does not fit the file's {size} bytes")
        header = json.loads(fh.read(n))
      data_start, out = 8 + n, {}
      for name, e in header.items():
        if name == "__metadata__":
          continue
        dtype = np.dtype(_SAFETENSORS_DTYPES[e["dtype"]])
        shape = tuple(int(d) for d in e["shape"])
        begin, end = (int(o) for o in e["data_offsets"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or data_start + end > size:
          raise ValueError(f"tensor {name}: offsets {begin}..{end} do not hold {e['dtype']}{list(shape)} "
                           f"inside the file")
        out[name] = (dtype, shape, data_start + begin)
      return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise ConversionError(f"{f}: not a readable safetensors file ({e})") from None

  def _handle(self, f: str):
    if f not in self._handles:
      if len(self._handles) >= self._max_open:
        self._handles.popitem(last=False)[1].close()
      self._handles[f] = open(f, "rb", buffering=0)
    self._handles.move_to_end(f)
    return self._handles[f]

  def shapes(self) -> dict:
    return {name: e[2] for name, e in self._entries.items()}

  def shape(self, name: str) -> tuple:
    return self._entries[name][2]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][1]

  def read_into(self, name: str, index: tuple, out: np.ndarray) -> None:
    """out[...] = stored[index]; index: one slice per dimension, explicit bounds.  Reads whole rows of the
    first dimension's range (a contiguous byte range) and, when the other dimensions are cut, copies the
    cut out of them."""
    f, dtype, shape, first = self._entries[name]
    if not shape:
      rows, row_bytes, whole_rows = slice(0, 1), dtype.itemsize, True
    else:
      rows = index[0]
      row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
      whole_rows = all(s.start == 0 and s.stop == n for s, n in zip(index[1:], shape[1:]))
    direct = whole_rows and out.dtype == dtype and out.flags.c_contiguous
    buf = out if direct else np.empty((rows.stop - rows.start,) + tuple(shape[1:]), dtype)
    fh = self._handle(f)
    fh.seek(first + rows.start * row_bytes)
    want = (rows.stop - rows.start) * row_bytes
    view, got = memoryview(buf.reshape(-1).view(np.uint8)), 0
    while got < want:  # one read returns at most ~2 GiB on Linux
      n = fh.readinto(view[got:])
      if not n:
        break
      got += n
    if got != want:
      raise ConversionError(f"{f}: tensor {name} is cut short ({got} of {want} bytes); the file is truncated")
    if not direct:
      out[...] = buf[(slice(None),) + tuple(index[1:])] if shape else buf.reshape(())

  def read(self, name: str, index: tuple) -> np.ndarray:
    return _read_new(self, name, index)

  def close(self):
    while self._handles:
      self._handles.popitem()[1].close()


def _extent(index: tuple) -> tuple:
  return tuple(s.stop - s.start for s in index)


def _read_new(source, name: str, index: tuple) -> np.ndarray:
  """stored[index] of one tensor as a new array (index slices may be open)."""
  index = _concrete(index, source.shape(name))
  out = np.empty(_extent(index), source.dtype(name))
  source.read_into(name, index, out)
  return out


def _block_of(in_memory: str):
  """"name[k]" -> (name, k); "name" -> (name, None)."""
  m = re.fullmatch(r"(.*)\[(\d)\]", in_memory)
  return (m.group(1), int(m.group(2))) if m else (in_memory, None)


def _stored(row: _Row, released: bool) -> dict:
  """{stored name: stored shape} of one row in the chosen layout."""
  if row.kind == "vector":
    return {row.released if released else row.in_memory: row.shape}
  if row.kind == "linear":
    return {row.released if released else row.in_memory: row.shape[::-1]}
  e, a, b = row.shape  # experts: ours [E, in, out], stored per expert [out, in]
  if released:
    return {row.released.format(e=i): (b, a) for i in range(e)}
  name, block = _block_of(row.in_memory)
  return {name: (e, 2 * b if block is not None else b, a)}


def _reader(row: _Row, released: bool, source):
  """(stored dtype, into): into(index, out) fills `out` with that slice of the parameter as stored: [n]
  vectors, Linear weights [out, in], experts [E, out, in] (each expert's tensor read into its place in the
  stack, or rows of transformers' fused tensor).  index: slices with explicit bounds."""
  if row.kind in ("vector", "linear"):
    name = row.released if released else row.in_memory
    return source.dtype(name), lambda idx, out: source.read_into(name, idx, out)
  if released:
    names = [row.released.format(e=i) for i in range(row.shape[0])]

    def into(idx, out):
      for k, e in enumerate(range(row.shape[0])[idx[0]]):
        source.read_into(names[e], idx[1:], out[k])
    return source.dtype(names[0]), into
  name, block = _block_of(row.in_memory)
  offset = 0 if block is None else block * row.shape[2]
  return source.dtype(name), lambda idx, out: source.read_into(
      name, (idx[0], slice(idx[1].start + offset, idx[1].stop + offset), idx[2]), out)


class _Staging:
  """Host memory for the slices on their way to the devices, reused from parameter to parameter.

  Fresh host memory costs a page fault per 4 KiB on first touch (seconds per GB on virtual machines),
  more than reading the file; so the slices of a parameter are read into one arena, and before the next
  parameter that does not fit in what is left, the load waits for the transfers (and the device-side
  copies that end each parameter, see `_on_device`) and starts the arena over.  The arena is `nbytes`,
  grown to the largest parameter; a parameter whose slices overflow it (replicated on several local
  devices) takes fresh memory for the rest.  The arena is never reset while a parameter is being built:
  its first slices wait in it for the transfer of the whole parameter.
  """

  def __init__(self, nbytes: int):
    self._arena = np.empty(0, np.uint8)
    self._nbytes, self._used, self._pending = nbytes, 0, []

  def begin(self, nbytes: int) -> None:
    """Before a parameter of `nbytes` (its stored size): make room, waiting for earlier transfers if needed."""
    if self._used + nbytes > self._arena.size:
      self.drain()
      if nbytes > self._arena.size or self._arena.size < self._nbytes:
        self._arena = np.empty(max(nbytes, self._nbytes, self._arena.size), np.uint8)

  def alloc(self, shape: tuple, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    slot = -(-size // 64) * 64  # 64-byte aligned slots
    if self._used + slot > self._arena.size:
      return np.empty(shape, dtype)
    out = self._arena[self._used:self._used + size]
    self._used += slot
    return out.view(dtype).reshape(shape)

  def track(self, array) -> None:
    """A parameter built from the arena: the arena is not reused before it is ready."""
    self._pending.append(array)

  def drain(self) -> None:
    import jax
    jax.block_until_ready(self._pending)
    self._pending, self._used = [], 0


def _read(reader, index: tuple, staging: _Staging) -> np.ndarray:
  """A reader's slice, in staging memory."""
  dtype, into = reader
  out = staging.alloc(_extent(index), dtype)
  into(index, out)
  return out


def _swap_last(x: tuple) -> tuple:
  return tuple(x[:-2]) + (x[-1], x[-2])


def _stored_sharding(sharding, ndim: int):
  """The sharding of the stored [.., out, in] array whose transpose has `sharding` (None: not derivable)."""
  from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
  if isinstance(sharding, SingleDeviceSharding):
    return sharding
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*_swap_last(spec)), memory_kind=sharding.memory_kind)
  return None


@functools.lru_cache(maxsize=None)
def _on_device(sharding, dtype: str, transpose: bool):
  """A jitted cast to `dtype` (and swap of the last two axes) whose result lands in `sharding`: the
  conversions run on the devices, not as slow strided or element-wise host copies."""
  import jax
  import jax.numpy as jnp

  def f(x):
    x = x.swapaxes(-1, -2) if transpose else x
    # Always a new device buffer (jnp.copy when nothing changes): the input may alias host staging
    # memory (a CPU device can take numpy memory without a copy), which the next slices overwrite.
    return x.astype(dtype) if x.dtype != dtype else jnp.copy(x)
  return jax.jit(f, out_shardings=sharding)


def _unstacked_sharding(sharding):
  """The sharding of one layer of a stacked leaf in `sharding` (None: the stacked axis is split)."""
  from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
  if isinstance(sharding, SingleDeviceSharding):
    return sharding
  if isinstance(sharding, NamedSharding) and (not sharding.spec or sharding.spec[0] is None):
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]), memory_kind=sharding.memory_kind)
  return None


@functools.lru_cache(maxsize=None)
def _empty_stack(sharding, shape: tuple, dtype: str):
  import jax
  import jax.numpy as jnp
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _put_layer(sharding):
  """stack [layers, ...], piece [...], index -> the stack with layer `index` replaced, in place (donated)."""
  import jax
  return jax.jit(lambda stack, piece, i: jax.lax.dynamic_update_index_in_dim(stack, piece.astype(stack.dtype), i, 0),
                 out_shardings=sharding, donate_argnums=0)


def _concrete(index: tuple, shape: tuple) -> tuple:
  """make_array_from_callback's index (slices, possibly open) -> slices with explicit bounds."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _check(source_shapes: dict, config: ModelConfig, released: bool) -> None:
  """Every missing, extra or mis-shaped tensor, before anything is read."""
  problems, used = [], set()
  for rows in [_top_rows(config)] + [_layer_rows(config, i) for i in range(config.num_layers)]:
    for row in rows:
      for name, shape in _stored(row, released).items():
        if name in used:
          continue
        used.add(name)
        if name not in source_shapes:
          problems.append(f"missing tensor {name} (expected shape {shape})")
        elif source_shapes[name] != shape:
          problems.append(f"{name}: shape {source_shapes[name]} but the config needs {shape}")
  for i, kind in enumerate(config.resolved_layer_types):
    if kind == LIGHTNING:
      used.update(f"model.layers.{i}.self_attn.{b}" for b in _DECAY_BUFFERS)
  if config.tie_word_embeddings:
    used.add("lm_head.weight")  # transformers may store the tied head too
  extra = sorted(set(source_shapes) - used)
  problems += [f"unexpected tensor {k} (not part of this config; wrong num_layers or layer_types?)" for k in extra]
  if problems:
    layout = "released (block_sparse_moe.experts.E.w1)" if released else "transformers in-memory (mlp.experts)"
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    raise ConversionError(f"checkpoint ({layout} layout) does not match the config ({len(problems)} problems):"
                          f"\n  {shown}")


def _check_decay(source, source_shapes: dict, config: ModelConfig) -> None:
  """The stored lightning decay rates (when present) must be the config's: catches a wrong depth."""
  for i, kind in enumerate(config.resolved_layer_types):
    name = f"model.layers.{i}.self_attn.slope_rate"
    if kind != LIGHTNING or name not in source_shapes:
      continue
    stored = source.read(name, tuple(slice(None) for _ in source_shapes[name]))
    got = -stored.astype(np.float32).reshape(-1)
    want = minimax_log_decay(config.num_heads, i, config.num_layers)
    rtol = 1e-2 if stored.dtype == ml_dtypes.bfloat16 else 1e-5
    if got.shape != want.shape or not np.allclose(got, want, rtol=rtol, atol=1e-7):
      raise ConversionError(f"{name}: decay rates differ from the config's (num_heads={config.num_heads}, "
                            f"layer {i} of {config.num_layers}); is num_hidden_layers right?")


def _convert(source, config: ModelConfig, shardings, progress=None) -> dict:
  """Source tensors -> params, each built in its target sharding from per-device slices.

  progress: called as progress(path, bytes_done, bytes_total) after each parameter (a scanned leaf: after
  each layer of it) is enqueued; bytes count the stored tensors."""
  import jax
  shapes = source.shapes()
  released = not any(".mlp.experts." in n or ".mlp.gate." in n for n in shapes)
  _check(shapes, config, released)
  _check_decay(source, shapes, config)
  dtype = np.dtype(config.param_dtype)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  single = isinstance(shardings, jax.sharding.Sharding)

  def pick(tree, path):
    if single:
      return tree
    try:
      return _get(tree, path)
    except (KeyError, TypeError):
      raise ConversionError(f"shardings: no entry for {'/'.join(path)}; give one jax Sharding or a tree "
                            "shaped like the params (e.g. jax.tree.map over model.abstract_params)") from None

  # An eighth of the checkpoint, at most _STAGING_BYTES (grown to the largest parameter).
  total = sum(int(np.prod(shape, dtype=np.int64)) * source.dtype(name).itemsize for name, shape in shapes.items())
  staging = _Staging(min(_STAGING_BYTES, total // 8))
  # For `progress`: stored bytes enqueued so far (of `weights`, the parameters' stored bytes), and the
  # parameter being placed.
  rows = _top_rows(config) + [row for i in range(config.num_layers) for row in _layer_rows(config, i)]
  weights = sum(int(np.prod(row.shape, dtype=np.int64)) * _reader(row, released, source)[0].itemsize for row in rows)
  done, where = 0, ""

  def place(shape, kind, reader, sharding):
    """One array of `shape` in `sharding`, from reader (see `_reader`) of the stored array."""
    # Weights are stored [.., out, in] and ours are [.., in, out]: the stored order goes to the devices
    # and is transposed there, into the target sharding.
    nonlocal done
    transpose = kind != "vector"
    nbytes = int(np.prod(shape, dtype=np.int64)) * reader[0].itemsize  # stored bytes
    staging.begin(nbytes)
    stored_shape, stored_sharding = shape, sharding
    if transpose:
      stored_shape, stored_sharding = _swap_last(shape), _stored_sharding(sharding, len(shape))
    if stored_sharding is None:  # a sharding we cannot permute: transpose each slice on the host
      stored = jax.make_array_from_callback(shape, sharding, lambda idx: np.ascontiguousarray(
          _read(reader, _swap_last(_concrete(idx, shape)), staging).swapaxes(-1, -2)))
      transpose = False
    else:
      stored = jax.make_array_from_callback(stored_shape, stored_sharding,
                                            lambda idx: _read(reader, _concrete(idx, stored_shape), staging))
    array = _on_device(sharding, dtype.name, transpose)(stored)
    staging.track(array)
    done += nbytes
    if progress is not None:
      progress(where, done, weights)
    return array

  def place_stacked(rows, sharding):
    """The scan's stacked leaf [layers, ...] of one parameter of several layers, in `sharding`.

    Layer by layer into the stacked array (updated in place), so a device holds the stack plus one layer
    (stored and transposed), not the whole stack twice: 23.6 GiB less than that for the 7 scanned lightning
    layers of an 8-layer slice of the paper's shape.
    """
    layer_sharding = _unstacked_sharding(sharding)
    if layer_sharding is None:  # the stacked axis itself is split: build the leaf from slices of the stack
      readers = [_reader(row, released, source) for row in rows]

      def into(idx, out):
        for k, r in enumerate(range(len(rows))[idx[0]]):
          readers[r][1](idx[1:], out[k])
      return place((len(rows),) + rows[0].shape, rows[0].kind, (readers[0][0], into), sharding)
    stacked = None
    for r, row in enumerate(rows):
      piece = place(row.shape, row.kind, _reader(row, released, source), layer_sharding)
      if stacked is None:
        stacked = _empty_stack(sharding, (len(rows),) + piece.shape, piece.dtype.name)()
      stacked = _put_layer(sharding)(stacked, piece, np.int32(r))
    staging.track(stacked)
    return stacked

  from mx01 import model as model_lib
  period, repeats = model_lib.scan_plan(config)
  params = {}
  for row in _top_rows(config):
    where = "/".join(row.path)
    _set(params, row.path, place(row.shape, row.kind, _reader(row, released, source), pick(shardings, row.path)))
  # Scanned layers: each stacked leaf [repeats, ...] is built directly from the layers' tensors, so no
  # per-layer copy is stacked on the devices afterwards.
  for j in range(period if repeats else 0):
    slot = (model_lib.SCAN_NAME, f"layer_{j}")
    per_rep = [_layer_rows(config, rep * period + j) for rep in range(repeats)]
    for rows in zip(*per_rep):
      path = slot + rows[0].path
      where = "/".join(path)
      _set(params, path, place_stacked(rows, pick(shardings, path)))
  for i in range(period * repeats, config.num_layers):
    for row in _layer_rows(config, i):
      path = (f"layers_{i}",) + row.path
      where = "/".join(path)
      _set(params, path, place(row.shape, row.kind, _reader(row, released, source), pick(shardings, path)))
  staging.drain()
  return params


def from_hf_state_dict(state_dict: Mapping, config: ModelConfig, *, shardings=None) -> dict:
  """A state dict (released or in-memory names; torch tensors or numpy arrays) -> mx01 params.

  shardings: one jax Sharding for every parameter or a params-shaped tree of them (default: the first
  local device).  Raises ConversionError listing every missing, extra or mis-shaped tensor.
  """
  return _convert(_DictSource(state_dict), config, shardings)


def _checkpoint_files(path: str) -> list[str]:
  if not os.path.isdir(path):
    if not os.path.isfile(path):
      raise ConversionError(f"{path}: no such checkpoint file or directory")
    return [path]
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError) as e:
      raise ConversionError(f"{index}: not a safetensors index ({e!r}); it needs a weight_map") from None
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise ConversionError(f"no .safetensors files in {path}")
  return [os.path.join(path, f) for f in files]


def read_config(folder: str) -> ModelConfig:
  """The ModelConfig of a checkpoint folder's config.json."""
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"no config given and no config.json in {folder}")
  try:
    with open(path) as f:
      return config_from_hf(json.load(f))
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from None


def load_safetensors(path: str, config: ModelConfig | None = None, *, shardings=None, progress=None):
  """A checkpoint file, a folder of them, or a sharded one (model.safetensors.index.json) -> (params, config).

  The config comes from config.json beside the weights when not given; parameters are cast to its
  param_dtype and placed in `shardings` (see `from_hf_state_dict`) one tensor at a time.  Memory: a host
  holds a staging arena (`_Staging`, at most 1 GiB or the largest parameter) beyond the transfers in flight;
  a device holds its shards plus, while one leaf is transposed, that leaf's shard in stored order (with
  scanned layers a leaf is the stack of one weight over the scanned layers).  progress: an optional
  progress(path, bytes_done, bytes_total), called as each parameter is enqueued.
  """
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  config = config or read_config(folder)
  source = _SafetensorsSource(_checkpoint_files(path))
  try:
    return _convert(source, config, shardings, progress), config
  finally:
    source.close()


# ---- writing -------------------------------------------------------------------

def _decay_buffers(config: ModelConfig, i: int) -> dict:
  """The transformers lightning layer's non-weight buffers, from the config."""
  slope = -minimax_log_decay(config.num_heads, i, config.num_layers).astype(np.float32)[:, None, None]
  r = np.arange(config.block_size, dtype=np.float32) + 1
  q_decay = np.exp(-slope * r[:, None])
  k_decay = np.exp(-slope * (config.block_size - r[:, None]))
  diff = (r[:, None] - r[None, :])[None, None]
  diag = slope * diff
  diag = np.exp(np.where(diag >= 0, -diag, -np.inf))
  return {"slope_rate": slope, "query_decay": q_decay, "key_decay": k_decay, "diagonal_decay": diag}


def _host_transposed(x) -> np.ndarray:
  """x [.., a, b] -> contiguous numpy [.., b, a]; a jax array is transposed on its devices (a strided
  host copy runs at a fraction of a GB/s)."""
  if hasattr(x, "addressable_shards"):
    return np.asarray(x.swapaxes(-1, -2))
  return np.ascontiguousarray(np.asarray(x).swapaxes(-1, -2))


def released_tensors(params: dict, config: ModelConfig, include_buffers: bool = True) -> list:
  """[(name, shape, dtype, make)] in the released layout; make() -> the numpy tensor, built when called.

  Leaves may be jax arrays (fully addressable), numpy arrays, or anything with .shape and .dtype when
  only the names, shapes and dtypes are wanted (e.g. `model.abstract_params(config)`).
  """
  top, layers = _layers_of(params, config)
  out = []

  def add(row, leaf):
    dtype = np.dtype(leaf.dtype)
    if row.kind == "vector":
      out.append((row.released, row.shape, dtype, lambda: np.ascontiguousarray(np.asarray(leaf))))
    elif row.kind == "linear":
      out.append((row.released, row.shape[::-1], dtype, lambda: _host_transposed(leaf)))
    else:
      for e in range(row.shape[0]):
        out.append((row.released.format(e=e), row.shape[:0:-1], dtype, lambda e=e: _host_transposed(leaf[e])))

  for row in _top_rows(config):
    add(row, _get(top, row.path))
  for i, layer in enumerate(layers):
    for row in _layer_rows(config, i):
      add(row, _get(layer, row.path))
    if include_buffers and config.resolved_layer_types[i] == LIGHTNING:
      for k, v in _decay_buffers(config, i).items():
        out.append((f"model.layers.{i}.self_attn.{k}", v.shape, v.dtype, lambda v=v: v))
  return out


def to_hf_state_dict(params: dict, config: ModelConfig, *, include_buffers: bool = True) -> dict:
  """mx01 params -> {released name: numpy array} in the parameters' dtype (decay buffers in float32)."""
  return {name: make() for name, _, _, make in released_tensors(params, config, include_buffers)}


def _parse_size(size) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)\s*", str(size).upper())
  if not m:
    raise ConversionError(f"max_shard_size={size!r}: give bytes as an int or a string like '5GB' or '200MB'")
  return int(float(m.group(1)) * 1000 ** "BKMGT".index(m.group(2)[0]))


def write_safetensors(tensors: Iterable, out_dir: str, max_shard_size="5GB") -> list[str]:
  """[(name, shape, dtype, make)] -> model.safetensors, or numbered shards plus model.safetensors.index.json.

  Shards are planned from the shapes first and filled one at a time, so one shard is in memory.
  """
  from safetensors.numpy import save_file
  limit = _parse_size(max_shard_size)
  shards, size, total = [[]], 0, 0
  for item in tensors:
    nbytes = int(np.prod(item[1], dtype=np.int64)) * np.dtype(item[2]).itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
    total += nbytes
  os.makedirs(out_dir, exist_ok=True)
  n = len(shards)
  names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
  weight_map = {}
  for fname, shard in zip(names, shards):
    tensors_here = {}
    for name, shape, dtype, make in shard:
      t = make()
      assert t.shape == tuple(shape) and t.dtype == dtype, (name, t.shape, t.dtype)
      tensors_here[name] = t
      weight_map[name] = fname
    save_file(tensors_here, os.path.join(out_dir, fname), metadata={"format": "pt"})
    del tensors_here
  if n > 1:
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return [os.path.join(out_dir, f) for f in names]


def save_safetensors(params: dict, config: ModelConfig, out_dir: str, *, max_shard_size="5GB") -> list[str]:
  """Writes params in the released layout (sharded with an index beyond max_shard_size) and config.json.

  Tensors keep the parameters' dtype; leaves may be jax arrays (fully addressable) or numpy arrays.
  Returns the weight files written.
  """
  files = write_safetensors(released_tensors(params, config), out_dir, max_shard_size)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_to_hf(config), f, indent=2)
  return files
