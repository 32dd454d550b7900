"""Mesh views, the sharding rules table and the error messages of bad layouts."""

import jax
import pytest

from mx01 import model as model_lib
from mx01.config import ParallelConfig
from mx01.parallel import mesh as mesh_lib
from mx01.parallel import rules
from mx01.parallel.mesh import MeshError

from tests.mx01.parallel.util import tiny_config


def test_dense_and_expert_views_share_devices():
  pm = mesh_lib.build_mesh(ParallelConfig(data=2, sequence=2, tensor=2, expert=4, expert_tensor=1))
  assert pm.all_axes == ("data/expert_data", "sequence/expert", "tensor/expert")
  assert pm.axes("expert") == ("sequence/expert", "tensor/expert")
  assert pm.axes("expert_tensor") == ()
  assert pm.size("data") == 2 and pm.size("expert") == 4 and pm.size("expert_data") == 2


def test_expert_view_crossing_dense_axes():
  # expert=4 spans the inner half of data and all of tensor.
  pm = mesh_lib.build_mesh(ParallelConfig(data=4, tensor=2, expert=4, expert_tensor=1))
  assert pm.axes("data") == ("data/expert_data", "data/expert")
  assert pm.axes("expert") == ("data/expert", "tensor/expert")
  assert pm.size("expert_data") == 2


def test_wrong_device_count_names_value_and_fix():
  with pytest.raises(MeshError, match=r"data\*sequence\*tensor = 2\*1\*2 = 4 but there are 8 devices; set "
                                      r"parallel.data=4"):
    mesh_lib.build_mesh(ParallelConfig(data=2, tensor=2))


def test_views_that_do_not_nest():
  with pytest.raises(MeshError, match="do not nest"):
    mesh_lib.physical_axes(ParallelConfig(data=1, sequence=3, tensor=2, expert=3, expert_tensor=1))


@pytest.mark.parametrize("parallel, model_kw, seq_len, match", [
    (ParallelConfig(data=1, tensor=8), {}, 16, r"parallel.tensor=8 must divide model.num_heads=4"),
    (ParallelConfig(data=2, tensor=4), {}, 16, r"parallel.tensor=4 must divide model.num_kv_heads=2"),
    (ParallelConfig(data=8, expert=8), {}, 16, r"parallel.expert=8 must divide model.num_experts=4"),
    (ParallelConfig(data=8, expert_tensor=8), {"intermediate_size": 36}, 16,
     r"expert_tensor=8 must divide model.intermediate_size=36"),
    (ParallelConfig(data=2, tensor=4), {"ffn_type": "dense", "num_heads": 8, "num_kv_heads": 4,
                                        "intermediate_size": 30}, 16,
     r"parallel.tensor=4 must divide model.intermediate_size=30"),
    (ParallelConfig(data=8, fsdp=True), {"hidden_size": 36}, 16, r"parallel.data=8 must divide model.hidden_size=36"),
    (ParallelConfig(data=2, sequence=4), {}, 20, r"sequence length 20 must be a multiple of 8"),
    (ParallelConfig(data=1, sequence=4, tensor=2), {}, 8, r"each sequence chunk \(1 tokens\) must split evenly"),
])
def test_layout_errors(parallel, model_kw, seq_len, match):
  with pytest.raises(MeshError, match=match):
    mesh_lib.validate_layout(parallel, tiny_config(**model_kw), seq_len=seq_len, batch_size=8)


def test_batch_error():
  with pytest.raises(MeshError, match=r"parallel.data=8 must divide the batch size 4"):
    mesh_lib.validate_layout(ParallelConfig(data=8), tiny_config(), seq_len=16, batch_size=4)


def test_rules_cover_every_parameter():
  cfg = tiny_config()
  pm = mesh_lib.build_mesh(ParallelConfig(data=4, sequence=1, tensor=2, expert=2, expert_tensor=2, fsdp=True))
  specs = rules.param_specs(model_lib.abstract_params(cfg), pm)
  flat = {rules.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
  t, e, et, ed, d = (pm.axes(a) for a in ("tensor", "expert", "expert_tensor", "expert_data", "data"))
  assert flat["layers_0/attn/qkv_proj/kernel"] == jax.sharding.PartitionSpec(d, t)
  assert flat["layers_1/attn/o_proj/kernel"] == jax.sharding.PartitionSpec(t, d)
  assert flat["layers_0/moe/wi_gate"] == jax.sharding.PartitionSpec(e, ed, et)
  assert flat["layers_0/moe/wo"] == jax.sharding.PartitionSpec(e, et, ed)
  assert flat["final_norm/scale"] == jax.sharding.PartitionSpec(None)


def test_indivisible_parameter_names_it():
  pm = mesh_lib.build_mesh(ParallelConfig(data=8, fsdp=True))
  params = model_lib.abstract_params(tiny_config(hidden_size=36, num_heads=4, head_dim=9))
  with pytest.raises(MeshError, match=r"parameter embed/embedding dimension 'embed' of size 36"):
    rules.param_specs(params, pm)


def test_stacked_parameters_get_a_leading_layers_dim():
  """Parameters of the scanned period are [repeats, ...]: the rules prepend an unsharded "layers" dimension."""
  from mx01.config import LIGHTNING, SOFTMAX
  cfg = tiny_config(num_layers=5, layer_types=(LIGHTNING, SOFTMAX) * 2 + (LIGHTNING,))
  assert model_lib.scan_plan(cfg) == (2, 2)
  pm = mesh_lib.build_mesh(ParallelConfig(data=4, tensor=2, expert=2, fsdp=True))
  abstract = model_lib.abstract_params(cfg)
  specs = rules.param_specs(abstract, pm)
  flat = {rules.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
  t, e, d = (pm.axes(a) for a in ("tensor", "expert", "data"))
  assert flat["period/layer_0/attn/qkv_proj/kernel"] == jax.sharding.PartitionSpec(None, d, t)
  assert flat["period/layer_1/attn/o_proj/kernel"] == jax.sharding.PartitionSpec(None, t, d)
  assert flat["layers_4/attn/qkv_proj/kernel"] == jax.sharding.PartitionSpec(d, t)
  stacked = rules.param_logical_axes(abstract)["period"]["layer_0"]["moe"]["wi_gate"]
  assert stacked == ("layers", "experts", "expert_embed", "expert_mlp")
