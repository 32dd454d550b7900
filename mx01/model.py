"""The MiniMax-Text-01 decoder stack and its functional interface: training, chunked prefill and decode.

    params = init(config, rng)
    logits, aux = apply(params, tokens, segment_ids=None, positions=None, config=config)
    logits, aux = apply(params, tokens, config=config, cache=cache, token_mask=mask)   # aux["cache"]: the new cache

Each layer (post-norm with DeepNorm-style scaling, as the released model):

    h = RMSNorm(x);  x = h * alpha_attn + Attn(h) * beta_attn
    h = RMSNorm(x);  x = h * alpha_mlp  + MoE(h)  * beta_mlp

where Attn is lightning or softmax attention by `config.resolved_layer_types`.
The stack ends with a final RMSNorm and an untied LM head.  `aux` holds the
MoE load-balancing loss ("aux_loss") and the per-layer routing statistics
("routing_stats", stacked over layers in layer order).

Generation runs the same modules with a cache (allocated by
`mx01.inference.cache`): {"lengths": [batch] int32 tokens already cached per
row, "layers": per-layer caches in the params' layout}; lightning layers carry
their recurrent state, softmax layers a key/value cache.  The new tokens of
row b take positions lengths[b], lengths[b] + 1, ...; `token_mask` [batch, seq]
marks padding (False), which may only come before a row's first token.

Layers whose kinds repeat with a period (7 lightning + 1 softmax) run under
`nn.scan` over the repeats (`scan_plan`), so compile time does not grow with
depth.  Parameter tree:

    {"embed", "period": {"layer_0": ..., "layer_{p-1}": ...}   # leaves [repeats, ...]
     "layers_{i}": ... (the unrolled remainder, by global index), "final_norm", "lm_head"}

`layer_params` / `params_from_layers` convert to and from one dict per layer.

Each layer declares its parameters' logical axes where it creates them
(mx01/layers/param.py); `param_logical_axes(config)` reads them back as a tree
like the params (PartitionSpecs of logical names; the scanned period's leaves
start with "layers"), which mx01/parallel/rules.py maps to the mesh.  Under
tensor / expert parallelism the same modules run on each device's pieces, with
the split and its collectives in `ops.shards` (mx01/ops.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mx01.config import LIGHTNING, ModelConfig
from mx01.layers.embed import Embed
from mx01.layers.feedforward import DenseMLP, MoEBlock
from mx01.layers.lightning_layer import LightningAttentionLayer
from mx01.layers.linear import Linear
from mx01.layers.moe import load_balancing_loss
from mx01.layers.norms import RMSNorm
from mx01.layers.softmax_attention import SoftmaxAttentionLayer
from mx01.ops import ModelOps, default_ops

SCAN_NAME = "period"


def positions_from_segments(segment_ids):
  """Per-token position within its segment: [batch, seq] -> [batch, seq] int32."""
  t = segment_ids.shape[1]
  idx = jnp.arange(t, dtype=jnp.int32)[None]
  start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  seg_start = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return idx - seg_start


def scan_plan(config: ModelConfig) -> tuple[int, int]:
  """(period, repeats): layers [0, period * repeats) are `repeats` scanned copies of one period of kinds.

  The period minimises the layers compiled separately (one period plus the
  unrolled remainder); (0, 0) when nothing repeats at least twice or
  `config.scan_layers` is off.
  """
  kinds = config.resolved_layer_types
  n = len(kinds)
  best, best_cost = (0, 0), n
  if not config.scan_layers:
    return best
  for p in range(1, n // 2 + 1):
    r = 1
    while (r + 1) * p <= n and kinds[r * p:(r + 1) * p] == kinds[:p]:
      r += 1
    if r >= 2 and p + n - r * p < best_cost:
      best, best_cost = (p, r), p + n - r * p
  return best


def _unstack(x, i: int):
  """Entry i of a stacked leaf (an array or, for abstract params, a ShapeDtypeStruct)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  return x[i]


def _stack(*xs):
  return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)


def layer_params(params: dict, config: ModelConfig) -> list:
  """One dict per layer ({"input_norm", "attn", "post_attn_norm", "moe"|"mlp"}), unstacked from the scan.

  Also serves any tree in the params' layout (e.g. a cache's "layers").
  """
  p, r = scan_plan(config)
  out = []
  for i in range(config.num_layers):
    if i < p * r:
      rep, j = divmod(i, p)
      out.append(jax.tree.map(lambda x: _unstack(x, rep), params[SCAN_NAME][f"layer_{j}"]))
    else:
      out.append(params[f"layers_{i}"])
  return out


def params_from_layers(top: dict, layers: list, config: ModelConfig) -> dict:
  """Inverse of `layer_params`: top-level entries (embed, final_norm, lm_head) + per-layer dicts -> params."""
  if len(layers) != config.num_layers:
    raise ValueError(f"got {len(layers)} layers for num_layers={config.num_layers}")
  p, r = scan_plan(config)
  params = dict(top)
  if r:
    params[SCAN_NAME] = {f"layer_{j}": jax.tree.map(_stack, *[layers[rep * p + j] for rep in range(r)])
                         for j in range(p)}
  for i in range(p * r, config.num_layers):
    params[f"layers_{i}"] = layers[i]
  return params


class DecoderLayer(nn.Module):
  config: ModelConfig
  kind: str
  ops: Any
  kv_block: int = 4096

  @nn.compact
  def __call__(self, x, layer_idx, ctx, cache):
    """x [batch, seq, hidden]; layer_idx int (traced under scan); ctx (segment_ids, positions, token_mask).

    Returns (x, routing stats or None, new cache or None).
    """
    cfg = self.config
    segment_ids, positions, token_mask = ctx
    pd = jnp.dtype(cfg.param_dtype)
    h = RMSNorm(cfg.rms_norm_eps, pd, shards=self.ops.shards, name="input_norm")(x)
    if self.kind == LIGHTNING:
      attn_out, cache = LightningAttentionLayer(cfg, self.ops, name="attn")(
          h, layer_idx=layer_idx, segment_ids=segment_ids, cache=cache, token_mask=token_mask)
      alpha, beta = cfg.lightning_alpha, cfg.lightning_beta
    else:
      attn_out, cache = SoftmaxAttentionLayer(cfg, self.ops, self.kv_block, name="attn")(
          h, positions=positions, segment_ids=segment_ids, cache=cache, token_mask=token_mask)
      alpha, beta = cfg.softmax_alpha, cfg.softmax_beta
    x = h * alpha + attn_out.astype(h.dtype) * beta
    h = RMSNorm(cfg.rms_norm_eps, pd, shards=self.ops.shards, name="post_attn_norm")(x)
    if cfg.is_moe:
      ffn_out, stats = MoEBlock(cfg, self.ops, name="moe")(h, token_mask=token_mask)
    else:
      ffn_out, stats = DenseMLP(cfg, self.ops, name="mlp")(h)
    x = h * cfg.mlp_alpha + ffn_out.astype(h.dtype) * cfg.mlp_beta
    return x, stats, cache


_REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _layer_cls(cfg: ModelConfig):
  """The layer module, rematerialised per layer when the config asks."""
  if cfg.remat == "none":
    return DecoderLayer
  return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat])


class Period(nn.Module):
  """One period of layer kinds: the body that `nn.scan` repeats."""
  config: ModelConfig
  kinds: tuple
  ops: Any
  kv_block: int = 4096

  @nn.compact
  def __call__(self, x, xs, ctx):
    first, caches = xs  # first: [] int32, this repeat's first layer index; caches {"layer_j": ...} or None
    layer_cls = _layer_cls(self.config)
    stats, new_caches = [], {}
    for j, kind in enumerate(self.kinds):
      name = f"layer_{j}"
      x, s, c = layer_cls(self.config, kind, self.ops, self.kv_block, name=name)(
          x, first + j, ctx, None if caches is None else caches[name])
      stats.append(s)
      new_caches[name] = c
    return x, (tuple(stats), new_caches)


class Decoder(nn.Module):
  config: ModelConfig
  ops: Any = None
  kv_block: int = 4096  # key block of the cached softmax attention

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, cache=None, token_mask=None, return_hidden=False,
               last_only=False):
    """tokens [batch, seq] int -> logits [batch, seq, vocab] float32, aux dict.

    return_hidden=True returns the final-normed hidden states [batch, seq, hidden]
    instead of logits (the LM head is then `lm_head_matrix`, for a chunked loss).
    last_only=True keeps only the last position ([batch, 1, ...]).
    """
    cfg = self.config
    if cache is not None and cfg.capacity_factor is not None:
      # Token drop bounds the experts' work in a training step; generation routes every token (a drop would
      # make a token's output depend on the other tokens of the batch and on the prefill chunking).
      cfg = dataclasses.replace(cfg, capacity_factor=None,
                                moe_impl="auto" if cfg.moe_impl == "capacity" else cfg.moe_impl)
    ops = self.ops or default_ops(cfg)
    cd, pd = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    layer_caches = None
    if cache is not None:
      if segment_ids is not None or positions is not None:
        raise ValueError("with a cache, positions come from cache['lengths'] and token_mask; "
                         "do not pass segment_ids or positions")
      if token_mask is None:
        token_mask = jnp.ones(tokens.shape, bool)
      positions = cache["lengths"][:, None] + jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1
      layer_caches = cache["layers"]
    elif positions is None:
      positions = (positions_from_segments(segment_ids) if segment_ids is not None
                   else jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape))
    ctx = (segment_ids, positions, token_mask)
    embed = Embed(cfg, ops, name="embed")
    x = embed(tokens)

    kinds = cfg.resolved_layer_types
    p, r = scan_plan(cfg)
    stats, new_layers = [], {}  # stats: pieces stacked over layers, in layer order
    if r:
      scanned = nn.scan(Period, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(0, nn.broadcast),
                        length=r, metadata_params={nn.PARTITION_NAME: "layers"})
      xs = (jnp.arange(r, dtype=jnp.int32) * p, None if layer_caches is None else layer_caches[SCAN_NAME])
      x, (period_stats, new_layers[SCAN_NAME]) = scanned(cfg, kinds[:p], ops, self.kv_block, name=SCAN_NAME)(
          x, xs, ctx)
      if cfg.is_moe:  # [p] x [r, ...] -> [r * p, ...] in layer order r * p + j
        stats.append(jax.tree.map(lambda *s: jnp.stack(s, 1).reshape((r * p,) + s[0].shape[1:]), *period_stats))
    layer_cls = _layer_cls(cfg)
    for i in range(p * r, cfg.num_layers):
      name = f"layers_{i}"
      x, s, new_layers[name] = layer_cls(cfg, kinds[i], ops, self.kv_block, name=name)(
          x, i, ctx, None if layer_caches is None else layer_caches[name])
      if s is not None:
        stats.append(jax.tree.map(lambda a: a[None], s))
    if last_only:
      x = x[:, -1:]
    x = RMSNorm(cfg.rms_norm_eps, pd, shards=ops.shards, name="final_norm")(x)
    if return_hidden:
      logits = x
    elif cfg.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = Linear(cfg.vocab_size, ("embed", "vocab"), dtype=cd, param_dtype=pd, shards=ops.shards,
                      kernel_init=nn.initializers.normal(cfg.initializer_range), name="lm_head")(x)
    aux = {"aux_loss": jnp.zeros((), jnp.float32)}
    if stats:
      stacked = jax.tree.map(lambda *s: jnp.concatenate(s), *stats)
      aux["routing_stats"] = stacked
      aux["aux_loss"] = load_balancing_loss(stacked, cfg.aux_loss_reduction)
    if cache is not None:
      aux["cache"] = {"lengths": cache["lengths"] + jnp.sum(token_mask, axis=1, dtype=jnp.int32),
                      "layers": new_layers}
    return (logits if return_hidden else logits.astype(jnp.float32)), aux


def _boxed_init(config: ModelConfig, rng: jax.Array, seq_len: int = 8) -> dict:
  """Initial parameters, each in its `nn.LogicallyPartitioned` box (array + logical axis names)."""
  return Decoder(config).init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


@functools.lru_cache(maxsize=64)
def _compiled_init(config: ModelConfig, seq_len: int):
  # One compiled program, kept per config: op-by-op init dispatches (and compiles) hundreds of small ops,
  # and a fresh jit per call would compile the whole init again for every new key.
  return jax.jit(lambda r: nn.unbox(_boxed_init(config, r, seq_len)))


def init(config: ModelConfig, rng: jax.Array, *, seq_len: int = 8) -> dict:
  """Initial parameters (a plain pytree, see the module docstring for its layout)."""
  return _compiled_init(config, seq_len)(rng)


@functools.lru_cache(maxsize=None)
def param_logical_axes(config: ModelConfig) -> dict:
  """The logical axis names of every parameter, as the layers declare them: a tree like `init`'s with
  PartitionSpec leaves, e.g. PartitionSpec("embed", "heads") (scanned period: "layers" first).

  Shared (cached per config): do not modify it.
  """
  return nn.get_partition_spec(jax.eval_shape(lambda r: _boxed_init(config, r), jax.random.key(0)))


def abstract_params(config: ModelConfig) -> dict:
  """Shapes and dtypes of the parameters, without allocating them."""
  return jax.eval_shape(lambda r: init(config, r), jax.random.key(0))


def apply(params: dict, tokens, segment_ids=None, positions=None, *, config: ModelConfig,
          ops: Optional[ModelOps] = None, cache: Optional[dict] = None, token_mask=None, return_hidden: bool = False,
          last_only: bool = False, kv_block: int = 4096):
  """Forward pass: tokens [batch, seq] -> (logits [batch, seq, vocab] float32, aux).

  return_hidden=True: (final-normed hidden [batch, seq, hidden] in compute dtype, aux).
  cache (generation, see the module docstring): aux["cache"] is the cache
  after these tokens; token_mask [batch, seq] bool marks the real tokens.
  last_only=True: only the last position's logits ([batch, 1, vocab]).
  """
  return Decoder(config, ops, kv_block).apply({"params": params}, tokens, segment_ids, positions, cache, token_mask,
                                              return_hidden, last_only)


def lm_head_matrix(params: dict, config: ModelConfig):
  """The output projection [hidden, vocab] (the embedding, transposed, when tied)."""
  if config.tie_word_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]
