"""Expert-parallel MoE == the single-device MoE, with and without token dropping (global routing)."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from mx01 import model as model_lib
from mx01.config import ParallelConfig
from mx01.layers import moe as moe_lib
from mx01.parallel import comm, rules
from mx01.parallel import mesh as mesh_lib
from mx01.parallel.layout import SequenceLayout
from mx01.parallel.moe_ep import moe_expert_parallel

from tests.mx01.parallel.util import max_abs_diff, tiny_config

B, L, D, E, I = 8, 16, 16, 4, 32

LAYOUTS = [
    ParallelConfig(data=2, sequence=2, tensor=2, expert=2, expert_tensor=2),  # all axes
    ParallelConfig(data=8, expert=2, expert_tensor=2),  # data x expert x expert_tensor
    ParallelConfig(data=1, sequence=4, tensor=2, expert=4, expert_tensor=2),  # rows split over sequence
    ParallelConfig(data=4, tensor=2),  # no expert parallelism: local grouped matmuls
]


def _params(key):
  ks = jax.random.split(key, 4)
  return {"router": jax.random.normal(ks[0], (D, E)), "wi_gate": 0.2 * jax.random.normal(ks[1], (E, D, I)),
          "wi_up": 0.2 * jax.random.normal(ks[2], (E, D, I)), "wo": 0.2 * jax.random.normal(ks[3], (E, I, D))}


def _sharded_moe(cfg, parallel):
  pm = mesh_lib.build_mesh(parallel)
  layout = SequenceLayout(L, parallel.sequence)
  moe_axes = model_lib.param_logical_axes(cfg)["layers_0"]["moe"]  # the MoE layer's own declaration
  specs = rules.param_specs({"moe": _params(jax.random.key(0))}, pm, {"moe": moe_axes})["moe"]
  fn = functools.partial(moe_expert_parallel, config=cfg, pmesh=pm, layout=layout, global_batch=B)
  act = pm.spec("data", "sequence", None)
  mapped = comm.shard_map(fn, mesh=pm.mesh, in_specs=(act, specs), out_specs=(act, P()))

  def run(x, params):
    y, stats = mapped(layout.to_layout(x), params)
    return layout.from_layout(y), stats

  return run


def _layout_id(p):
  return f"d{p.data}s{p.sequence}t{p.tensor}e{p.expert}et{p.expert_tensor}"


@pytest.mark.parametrize("parallel, capacity_factor",
                         [(LAYOUTS[0], None), (LAYOUTS[0], 0.5), (LAYOUTS[3], 0.5)] +
                         [pytest.param(p, 0.5, marks=pytest.mark.slow) for p in LAYOUTS[1:3]],
                         ids=[_layout_id(LAYOUTS[0]) + "-dropless"] +
                         [_layout_id(p) + "-drops" for p in (LAYOUTS[0], LAYOUTS[3], LAYOUTS[1], LAYOUTS[2])])
def test_expert_parallel_equals_single_device(parallel, capacity_factor):
  cfg = tiny_config(hidden_size=D, intermediate_size=I, num_experts=E, capacity_factor=capacity_factor)
  params = _params(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  run = _sharded_moe(cfg, parallel)
  y, stats = jax.jit(run)(x, params)
  y_ref, stats_ref = moe_lib.moe_forward(x, params, config=cfg)
  if capacity_factor is None:  # no drops: also the dense every-expert reference
    y_dense, _ = moe_lib.moe_forward(x, params, config=cfg, experts_fn=moe_lib.experts_dense_reference)
    assert max_abs_diff(y, y_dense) < 1e-5
  else:  # drops happen, and they follow the global single-device policy
    y_nodrop, _ = moe_lib.moe_forward(x, params, config=tiny_config(hidden_size=D, intermediate_size=I, num_experts=E))
    assert max_abs_diff(y_ref, y_nodrop) > 1e-2
  assert max_abs_diff(y, y_ref) < 1e-5
  # Expert loads and the aux loss are global.
  assert max_abs_diff(stats, stats_ref) < 1e-4
  stack = lambda s: jax.tree.map(lambda a: a[None], s)
  assert abs(float(moe_lib.load_balancing_loss(stack(stats)) - moe_lib.load_balancing_loss(stack(stats_ref)))) < 1e-6

  def loss(run_fn, x, params):
    return jnp.sum(jnp.sin(run_fn(x, params)[0]))

  g = jax.jit(jax.grad(functools.partial(loss, run), argnums=(0, 1)))(x, params)
  g_ref = jax.grad(functools.partial(loss, lambda x, p: moe_lib.moe_forward(x, p, config=cfg)), argnums=(0, 1))(
      x, params)
  assert max_abs_diff(g, g_ref) < 2e-5


def test_global_keep_mask_matches_capacity_keep_mask():
  """The cross-device capacity order equals the single-device one on a split batch."""
  parallel = ParallelConfig(data=2, sequence=2, tensor=2)
  pm = mesh_lib.build_mesh(parallel)
  layout = SequenceLayout(L, parallel.sequence)
  from mx01.parallel.moe_ep import global_keep_mask, token_placement
  placement = token_placement(pm, layout, B)
  expert_idx = jax.random.randint(jax.random.key(3), (B, L, 2), 0, E)
  cap = 9
  keep_ref = moe_lib.capacity_keep_mask(expert_idx.reshape(B * L, 2), E, cap).reshape(B, L, 2)

  def local(idx):  # idx [b, t_local, k] in layout order, then this tensor rank's share of each chunk
    b = idx.shape[0]
    n, c, blk = layout.chunks_per_device, layout.chunk_len, placement.block_len
    tp = comm.axis_index(pm.axes("tensor"))
    mine = jax.lax.dynamic_slice_in_dim(idx.reshape(b, n, c, 2), tp * blk, blk, axis=2)
    keep = global_keep_mask(mine, E, cap, placement, pm.all_axes)
    return comm.all_gather_replicated(keep, pm.axes("tensor"), axis=2).reshape(b, n * c, 2)

  spec = pm.spec("data", "sequence", None)
  keep = comm.shard_map(local, mesh=pm.mesh, in_specs=spec, out_specs=spec)(layout.to_layout(expert_idx))
  assert bool(jnp.all(layout.from_layout(keep) == keep_ref))
  assert not bool(jnp.all(keep_ref))
