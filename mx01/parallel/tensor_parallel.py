"""Megatron-style tensor parallelism for the unmodified decoder, via Flax method interception.

Inside `shard_map` every device runs `mx01.model.Decoder` on its parameter
shards (rules.py).  Three things make the shards add up to the full layer:

* The model is built with a *local* config (`local_model_config`): num_heads,
  num_kv_heads (and the dense MLP's intermediate_size) divided by `tensor`, so
  the layers' reshapes and parameter shapes match the column-split projections.
* `model_hooks` intercepts the module calls that need a collective:
    - the row-split projections back to hidden (lightning `out_proj`, softmax
      `o_proj`, the dense MLP) produce partial sums -> psum over `tensor`;
    - the lightning layer's RMSNorm spans all heads -> the sum of squares is
      psum'd over `tensor` before normalising the local heads;
    - each lightning layer's per-head decay depends on the global head index
      -> the layer's slice of the global decay is published for the sharded
      lightning op (sharded_ops.py) to use;
    - `MoEBlock` holds expert-parallel shards whose shapes differ from the
      global config -> its parameters are read directly and handed to
      `ops.moe` (the expert-parallel MoE), skipping Flax's shape check.
The decoder code itself is unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mx01.config import ModelConfig
from mx01.layers.feedforward import DenseMLP, MoEBlock
from mx01.layers.lightning_layer import LightningAttentionLayer, layer_log_decay
from mx01.layers.linear import Linear
from mx01.layers.norms import RMSNorm
from mx01.parallel import comm
from mx01.parallel.mesh import ParallelMesh

# The current lightning layer's log decay for this device's heads ([heads / tensor] float32), or None.
LAYER_LOG_DECAY: contextvars.ContextVar[Optional[jax.Array]] = contextvars.ContextVar("layer_log_decay",
                                                                                      default=None)

ROW_PARALLEL_PROJECTIONS = ("out_proj", "o_proj")


def local_model_config(config: ModelConfig, tensor: int) -> ModelConfig:
  """The config of one tensor-parallel rank's slice of the model (heads and dense MLP split)."""
  if tensor == 1:
    return config
  return dataclasses.replace(
      config, num_heads=config.num_heads // tensor, num_kv_heads=config.num_kv_heads // tensor,
      intermediate_size=config.intermediate_size if config.is_moe else config.intermediate_size // tensor)


def _distributed_rms_norm(module: RMSNorm, x, tensor_axes, global_width: int):
  """RMSNorm over a feature dimension split across `tensor_axes`: x [..., width / T] -> same."""
  scale = module.get_variable("params", "scale")
  x32 = x.astype(jnp.float32)
  sum_sq = comm.psum(jnp.sum(x32 * x32, axis=-1, keepdims=True), tensor_axes)
  y = x32 * jnp.reciprocal(jnp.sqrt(sum_sq / global_width + module.eps))
  return (scale.astype(jnp.float32) * y).astype(x.dtype)


def _moe_block(module: MoEBlock, x, token_mask=None):
  """MoEBlock.__call__ on parameter shards: same casts, straight to ops.moe."""
  cfg = module.config
  names = ("router", "wi_gate", "wi_up", "wo")
  params = {k: module.get_variable("params", k) for k in names}
  cd = jnp.dtype(cfg.compute_dtype)
  params = {k: (v if k == "router" else v.astype(cd)) for k, v in params.items()}
  return module.ops.moe(x.astype(cd), params, config=cfg, token_mask=token_mask)


@contextlib.contextmanager
def model_hooks(config: ModelConfig, pmesh: ParallelMesh):
  """Context in which `Decoder.apply` on tensor/expert-parallel shards computes the global model.

  `config` is the *global* model config.
  """
  tensor_axes = pmesh.axes("tensor")
  tensor = pmesh.parallel.tensor
  heads_per_rank = config.num_heads // tensor

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(module, MoEBlock):
      return _moe_block(module, *args, **kwargs)
    if tensor == 1:
      return next_fun(*args, **kwargs)
    if isinstance(module, LightningAttentionLayer):
      # layer_idx is traced for layers under nn.scan: index the table of decays on device.
      decay = layer_log_decay(kwargs["layer_idx"], config.num_heads, config.num_layers)
      mine = decay.reshape(tensor, heads_per_rank)[comm.axis_index(tensor_axes)]
      token = LAYER_LOG_DECAY.set(mine)
      try:
        return next_fun(*args, **kwargs)
      finally:
        LAYER_LOG_DECAY.reset(token)
    if isinstance(module, RMSNorm) and module.name == "norm" and isinstance(module.parent, LightningAttentionLayer):
      return _distributed_rms_norm(module, args[0], tensor_axes, config.num_heads * config.head_dim)
    if isinstance(module, Linear) and module.name in ROW_PARALLEL_PROJECTIONS:
      return comm.psum(next_fun(*args, **kwargs), tensor_axes)
    if isinstance(module, DenseMLP):
      y, stats = next_fun(*args, **kwargs)
      return comm.psum(y, tensor_axes), stats
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield
