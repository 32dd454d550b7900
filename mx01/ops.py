"""The swappable compute of the decoder, one registry per op.

The decoder (`mx01/model.py`) is a thin assembly of projections, norms and
residuals; the three pieces of heavy compute are called through a `ModelOps`
so that the same model runs with the plain reference, the Pallas kernels, or
the sharded versions in `mx01/parallel/` (LASP+, ring attention, expert
parallel MoE) without a second copy of the stack.

Each op has one table from the config's own names to a builder
`(config, interpret) -> callable` (`interpret` runs Pallas kernels on any
backend, for tests), and "auto" is resolved in one function per op:

  LIGHTNING  (model.lightning_impl)  reference | xla | pallas           auto: pallas on GPU, else xla
  ATTENTION  (model.attention_impl)  xla | pallas | cudnn               auto: pallas on GPU, else xla
                                     (cudnn: packed rows in cuDNN's ragged layout, up to
                                     model.cudnn_max_segments documents a row)
  MOE        (model.moe_impl)        capacity | ragged | ragged_mosaic | ragged_tokamax | dense
                                     auto: capacity with a capacity_factor; else (dropless) ragged_mosaic
                                     on Hopper GPUs, ragged on other accelerators, dense on CPU
  LIGHTNING_DECODE (model.lightning_impl, one token against the state)  reference | xla | pallas

`ModelOps.shards` (a `LocalShards`) is the tensor/expert-parallel split of the
per-device computation: how many ways each logical axis of the parameters is
split, this device's index along it, and the sum over the devices that split
it.  The layers create their parameters at the local shape and call these
collectives themselves (mx01/layers/param.py); the default is one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from mx01 import lightning as lightning_lib
from mx01.config import ModelConfig
from mx01.layers import moe as moe_lib


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _on_hopper() -> bool:
  """A Hopper GPU (compute capability 9.0): what jax's Mosaic GPU ragged-dot kernels (wgmma, TMA) need."""
  if not _on_gpu():
    return False
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def causal_attention(q, k, v, *, segment_ids=None):
  """Causal softmax attention with GQA and packed-sequence masking, in plain XLA (the reference).

  q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads, head_dim],
  segment_ids [batch, seq] (tokens attend only within their segment).
  Returns [batch, seq, heads, head_dim] in q.dtype; softmax in float32.
  Materialises the [seq, seq] scores.
  """
  b, t, h, d = q.shape
  kvh = k.shape[2]
  qg = q.reshape(b, t, kvh, h // kvh, d)
  logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
  mask = jnp.tril(jnp.ones((t, t), bool))[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bgrts,bsgd->btgrd", probs, v)
  return out.reshape(b, t, h, d)


# Packed rows through cuDNN: at most model.cudnn_max_segments documents (runs of equal segment ids) per row go
# to cuDNN's ragged layout, whose offset arrays have a static size; a batch with a longer row takes the
# fallback kernel (both are compiled into the program; `lax.cond` picks one per call).


def segment_runs(segment_ids, max_runs: int):
  """The runs of equal ids in each row of segment_ids [batch, seq], in cuDNN's ragged layout.

  Returns (offsets [batch, max_runs + 1] int32: each run's first position, then -1;
  lengths [batch, max_runs] int32: each run's length, then -1; fits: bool, every row has at most max_runs runs).
  Rows are cut into runs wherever the id changes, so padding (id 0 at a row's end) is a run of its own.
  """
  b, t = segment_ids.shape
  is_start = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  starts = jax.vmap(lambda row: jnp.nonzero(row, size=max_runs, fill_value=t)[0])(is_start)  # [b, max_runs]
  ends = jnp.concatenate([starts[:, 1:], jnp.full((b, 1), t, starts.dtype)], axis=1)
  real = starts < t
  lengths = jnp.where(real, ends - starts, -1).astype(jnp.int32)
  offsets = jnp.concatenate([jnp.where(real, starts, -1), jnp.full((b, 1), -1, starts.dtype)], axis=1)
  fits = jnp.all(jnp.sum(is_start, axis=1) <= max_runs)
  return offsets.astype(jnp.int32), lengths, fits


def _cudnn_attention(q, k, v, *, segment_ids=None, max_segments: int, fallback=None):
  """cuDNN flash attention; packed rows through its ragged layout (segment offsets and lengths).

  Packed rows use jax's cuDNN entry point with offsets (`jax._src.cudnn`: the public
  `jax.nn.dot_product_attention` takes lengths but no offsets); rows of more than `max_segments`
  documents go to `fallback` (default: the Pallas kernel).
  """
  scale = q.shape[-1] ** -0.5
  if segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation="cudnn")
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

  offsets, lengths, fits = segment_runs(segment_ids, max_segments)

  def packed(q, k, v, segment_ids):
    del segment_ids
    return cudnn_attention.dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets, scale=scale,
        mask_type=cudnn_attention.MaskType.PADDING_CAUSAL)

  def other(q, k, v, segment_ids):
    return (fallback or _pallas_attention)(q, k, v, segment_ids=segment_ids)

  return jax.lax.cond(fits, packed, other, q, k, v, segment_ids)


def _pallas_attention(q, k, v, *, segment_ids=None, interpret: bool = False):
  """jax's Pallas flash attention (pallas_kernels/flash_attention.py), which takes segment ids."""
  from pallas_kernels import flash_attention  # the kernels load on first use
  return flash_attention.flash_attention(q, k, v, segment_ids, scale=q.shape[-1] ** -0.5, interpret=interpret)


def _lightning_pallas(config: ModelConfig, interpret: bool):
  """The Pallas kernels, tiled by `config.lightning_kernel` (the XLA form's `block_size` is not theirs)."""
  import pallas_kernels  # the kernels load on first use

  def lightning(q, k, v, log_decay, *, block_size=None, segment_ids=None, initial_state=None):
    del block_size  # ModelOps.lightning's block_size is the XLA form's (ModelConfig.block_size)
    return pallas_kernels.lightning_attention(q, k, v, log_decay, segment_ids=segment_ids,
                                              initial_state=initial_state, config=config.lightning_kernel,
                                              interpret=interpret)

  return lightning


def _lightning_decode_pallas(config: ModelConfig, interpret: bool):
  import pallas_kernels
  return functools.partial(pallas_kernels.lightning_decode, config=config.lightning_kernel, interpret=interpret)


# Builders: (config, interpret) -> callable.  `interpret` runs Pallas kernels on any backend (tests).
LIGHTNING: Dict[str, Callable] = {
    "reference": lambda config, interpret: lightning_lib.lightning_attention_recurrent,
    "xla": lambda config, interpret: lightning_lib.lightning_attention_chunked,
    "pallas": _lightning_pallas,
}
LIGHTNING_DECODE: Dict[str, Callable] = {
    "reference": lambda config, interpret: lightning_lib.lightning_decode_step,
    "xla": lambda config, interpret: lightning_lib.lightning_decode_step,
    "pallas": _lightning_decode_pallas,
}
ATTENTION: Dict[str, Callable] = {
    "xla": lambda config, interpret: causal_attention,
    "pallas": lambda config, interpret: functools.partial(_pallas_attention, interpret=interpret),
    "cudnn": lambda config, interpret: functools.partial(_cudnn_attention,
                                                         max_segments=config.cudnn_max_segments),
}
# The dropless experts of each moe_impl (tokens grouped by expert), shared with the expert-parallel MoE.
DROPLESS_EXPERTS: Dict[str, Callable] = {
    "ragged": moe_lib.experts_grouped,
    "ragged_mosaic": moe_lib.experts_grouped_mosaic,
    "ragged_tokamax": moe_lib.experts_grouped_tokamax,
    "dense": moe_lib.experts_dense_reference,
}
MOE: Dict[str, Callable] = {
    "capacity": lambda config, interpret: functools.partial(moe_lib.moe_forward, capacity_buffers=True),
    **{name: (lambda fn: lambda config, interpret: functools.partial(moe_lib.moe_forward, experts_fn=fn))(fn)
       for name, fn in DROPLESS_EXPERTS.items()},
}


def lightning_impl(config: ModelConfig) -> str:
  """config.lightning_impl with "auto" resolved: the Pallas kernels on GPU, the XLA block-wise form elsewhere."""
  if config.lightning_impl == "auto":
    return "pallas" if _on_gpu() else "xla"
  return config.lightning_impl


def attention_impl(config: ModelConfig) -> str:
  """config.attention_impl with "auto" resolved: Pallas flash attention on GPU, XLA elsewhere."""
  if config.attention_impl == "auto":
    return "pallas" if _on_gpu() else "xla"
  return config.attention_impl


def moe_impl(config: ModelConfig) -> str:
  """config.moe_impl with "auto" resolved: "capacity" when a capacity is set (token-drop training); otherwise
  dropless: jax's Mosaic GPU grouped matmuls on Hopper ("ragged_mosaic": the hybrid_moe_1b train step at 8k
  runs at 36% MFU on an H200 against 15% with XLA's ragged_dot, BENCHMARKS.md) where the sizes fit their
  tiles (multiples of 128), "ragged" on other accelerators and sizes, and "dense" on CPUs, where ragged_dot is
  slow."""
  if config.moe_impl == "auto":
    if config.capacity_factor is not None:
      return "capacity"
    if jax.default_backend() == "cpu":
      return "dense"
    from pallas_kernels import grouped_matmul  # imports no kernel: the tile rule only
    mosaic = _on_hopper() and grouped_matmul.fits(config.hidden_size, config.intermediate_size)
    return "ragged_mosaic" if mosaic else "ragged"
  return config.moe_impl


def dropless_experts(config: ModelConfig) -> Callable:
  """The config's dropless experts function (ragged when its moe_impl is the capacity one)."""
  return DROPLESS_EXPERTS.get(moe_impl(config), moe_lib.experts_grouped)


def lightning_op(config: ModelConfig, *, interpret: bool = False) -> Callable:
  return LIGHTNING[lightning_impl(config)](config, interpret)


def lightning_decode_op(config: ModelConfig, *, interpret: bool = False) -> Callable:
  """(q, k [b, h, dk], v [b, h, dv], log_decay [h], state [b, h, dk, dv]) -> (out [b, h, dv], new state)."""
  return LIGHTNING_DECODE[lightning_impl(config)](config, interpret)


def attention_op(config: ModelConfig, *, interpret: bool = False) -> Callable:
  return ATTENTION[attention_impl(config)](config, interpret)


def moe_op(config: ModelConfig, *, interpret: bool = False) -> Callable:
  return MOE[moe_impl(config)](config, interpret)


@dataclasses.dataclass(frozen=True)
class LocalShards:
  """How one device's computation splits the parameters' logical axes, and the collectives that rejoin them.

  split: (logical axis name, its mesh axes, ways) for each logical axis split inside the per-device
  computation, e.g. ("heads", ("tensor",), 2) for two-way tensor parallelism
  (`mx01.parallel.rules.local_shards` builds it from the rules table).  An axis not listed is whole on
  every device: ways 1, index 0, and `psum` is the identity.  Use inside `shard_map` over those mesh axes.
  """
  split: Tuple[Tuple[str, Tuple[str, ...], int], ...] = ()

  def _find(self, name):
    return next((entry for entry in self.split if entry[0] == name), None)

  def ways(self, name) -> int:
    """How many devices share logical axis `name` (None: an unnamed, unsplit axis)."""
    entry = self._find(name)
    return 1 if entry is None else entry[2]

  def index(self, name):
    """This device's piece of logical axis `name`: 0 .. ways - 1 (traced int32 when split)."""
    entry = self._find(name)
    return 0 if entry is None else jax.lax.axis_index(entry[1])

  def psum(self, x, name):
    """x summed over the devices that split logical axis `name` (partial sums of a contraction over it)."""
    entry = self._find(name)
    return x if entry is None else jax.lax.psum(x, entry[1])

  def local_shape(self, shape, names) -> tuple:
    """The shape of this device's piece of an array of global `shape` whose dimensions are `names`."""
    if len(shape) != len(names):
      raise ValueError(f"shape {tuple(shape)} has {len(shape)} dimensions but {len(names)} axis names {names}")
    out = []
    for size, name in zip(shape, names):
      if size % self.ways(name):
        raise ValueError(f"dimension {name!r} of size {size} does not split {self.ways(name)} ways; "
                         "change the model size or the parallel layout")
      out.append(size // self.ways(name))
    return tuple(out)


ONE_DEVICE = LocalShards()


@dataclasses.dataclass(frozen=True)
class ModelOps:
  """lightning(q, k, v, log_decay, *, block_size, segment_ids, initial_state) -> (out, final_state)
      (block_size: the XLA block-wise form's, ModelConfig.block_size; the Pallas kernels tile by
      ModelConfig.lightning_kernel)
  attention(q, k, v, *, segment_ids) -> out
  moe(x, params, *, config, token_mask) -> (out, stats)
  lightning_decode(q, k, v, log_decay, state) -> (out, new_state): one token per row (generation)
  shards: the tensor/expert-parallel split the layers compute on (`LocalShards`; default one device)
  """
  lightning: Callable
  attention: Callable
  moe: Callable
  lightning_decode: Callable = lightning_lib.lightning_decode_step
  shards: LocalShards = ONE_DEVICE


def default_ops(config: ModelConfig, *, interpret: bool = False) -> ModelOps:
  """Single-device ops chosen by the config (`interpret`: run Pallas kernels on any backend)."""
  return ModelOps(lightning=lightning_op(config, interpret=interpret),
                  attention=attention_op(config, interpret=interpret),
                  moe=moe_op(config, interpret=interpret),
                  lightning_decode=lightning_decode_op(config, interpret=interpret))
