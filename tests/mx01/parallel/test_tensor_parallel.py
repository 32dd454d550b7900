"""Tensor parallelism declared by the layers: one layer on `tensor` devices == the layer on one device.

Each device runs the layer on its pieces of the parameters (`rules.param_specs` of the axes the layer declares)
with `ops.shards = rules.local_shards(pmesh)`; the layer slices its own heads' decays and sums its row-parallel
projections and its norm over all heads.
"""

import dataclasses
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from mx01.config import LIGHTNING, SOFTMAX, ParallelConfig
from mx01.layers.feedforward import DenseMLP
from mx01.layers.lightning_layer import LightningAttentionLayer
from mx01.ops import default_ops
from mx01.parallel import comm, rules
from mx01.parallel import mesh as mesh_lib

from tests.mx01.parallel.util import max_abs_diff, tiny_config

B, T = 8, 10  # T: not a multiple of the block (4)


def _config():
  # 8 heads: whole heads on each of 2 or 4 devices; 6 layers: decays differ per layer and per head.
  return tiny_config(num_heads=8, num_kv_heads=4, num_layers=6, ffn_type="dense", intermediate_size=64,
                     layer_types=(LIGHTNING,) * 5 + (SOFTMAX,))


def _sharded(module_fn, cfg, params, axes, tensor: int):
  """(x [B, T, hidden], extra args) -> module output computed on data=8/tensor x tensor devices."""
  pm = mesh_lib.build_mesh(ParallelConfig(data=8 // tensor, tensor=tensor))
  ops = dataclasses.replace(default_ops(cfg), shards=rules.local_shards(pm))
  specs = rules.param_specs(params, pm, axes)
  act = pm.spec("data", None, None)

  def local(p, x, layer_idx):
    return module_fn(cfg, ops).apply({"params": p}, x, layer_idx)

  return jax.jit(comm.shard_map(local, mesh=pm.mesh, in_specs=(specs, act, P()), out_specs=act)), pm, specs


def _lightning(cfg, ops):
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, layer_idx):
      return LightningAttentionLayer(cfg, ops, name="attn")(x, layer_idx=layer_idx)[0]
  return Layer()


def _dense_mlp(cfg, ops):
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, layer_idx):
      del layer_idx
      return DenseMLP(cfg, ops, name="mlp")(x)[0]
  return Layer()


@pytest.mark.parametrize("module_fn", [_lightning, _dense_mlp], ids=["lightning", "dense_mlp"])
@pytest.mark.parametrize("tensor", [2, 4])
def test_layer_on_tensor_devices_equals_one_device(module_fn, tensor):
  cfg = _config()
  x = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size), jnp.float32)
  layer_idx = jnp.int32(3)  # > 0, and traced (a jit argument), as for layers under nn.scan
  module = module_fn(cfg, default_ops(cfg))
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), x, layer_idx))["params"]
  axes = nn.get_partition_spec(boxed)
  params = nn.unbox(module.init(jax.random.key(0), x, layer_idx))["params"]  # init std 0.02, as the presets
  ref = jax.jit(lambda p, x, i: module.apply({"params": p}, x, i))(params, x, layer_idx)
  run, pm, specs = _sharded(module_fn, cfg, params, axes, tensor)
  placed = jax.device_put(params, jax.tree.map(lambda s: jax.sharding.NamedSharding(pm.mesh, s), specs,
                                               is_leaf=lambda s: isinstance(s, P)))
  out = run(placed, x, layer_idx)
  scale = float(jnp.abs(ref).max())
  assert max_abs_diff(out, ref) < 1e-5 * scale  # float32
  if module_fn is _lightning:  # the layer index matters: another layer's decays give another output
    other = jax.jit(lambda p, x, i: module.apply({"params": p}, x, i))(params, x, jnp.int32(0))
    assert max_abs_diff(other, ref) > 1e-3 * scale


def test_no_interception_and_no_context_variables_in_the_package():
  """Tensor/expert parallelism goes through `ModelOps.shards`, not by catching modules by name or class."""
  root = pathlib.Path(__file__).resolve().parents[3] / "mx01"
  offenders = [str(p) for p in root.rglob("*.py")
               if re.search(r"intercept_methods|contextvars|ContextVar", p.read_text())]
  assert not offenders, offenders
