"""Mesh views, the logical axes the layers declare, the sharding rules table and the errors of bad layouts."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from mx01 import model as model_lib
from mx01.config import LIGHTNING, SOFTMAX, ParallelConfig
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


def _flat(tree):
  """{"layers_0/attn/q_proj/kernel": PartitionSpec, ...}"""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))
  return {rules.path_str(p): s for p, s in leaves}


@pytest.mark.parametrize("moe", [True, False], ids=["moe", "dense"])
@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scanned"])
def test_layers_declare_the_logical_axes_of_every_parameter(moe, scanned):
  """The logical axes come from the modules that create the parameters: every leaf has one per dimension,
  the scanned period's leaves start with "layers", and a few representative ones are as expected."""
  kw = {} if moe else {"ffn_type": "dense"}
  if scanned:
    kw.update(num_layers=5, layer_types=(LIGHTNING, SOFTMAX) * 2 + (LIGHTNING,))
  cfg = tiny_config(**kw)
  axes = model_lib.param_logical_axes(cfg)
  abstract = model_lib.abstract_params(cfg)
  assert jax.tree.structure(jax.tree.map(lambda _: 0, axes, is_leaf=lambda x: isinstance(x, P))) == \
      jax.tree.structure(jax.tree.map(lambda _: 0, abstract))
  table = rules.logical_to_mesh(ParallelConfig())
  for path, shape in _flat(jax.tree.map(lambda x: P(*x.shape), abstract)).items():
    names = _flat(axes)[path]
    assert len(names) == len(shape), path
    assert all(n is None or n in table for n in names), (path, names)  # every name is in the one rules table
    assert (names[0] == "layers") == path.startswith("period/"), path
  flat = _flat(axes)
  lightning, softmax = ("period/layer_0/", "period/layer_1/") if scanned else ("layers_0/", "layers_1/")
  stack = ("layers",) if scanned else ()
  assert flat["embed/embedding"] == P("vocab", "embed")
  assert flat["lm_head/kernel"] == P("embed", "vocab")
  assert flat["final_norm/scale"] == P("norm")
  assert flat[lightning + "attn/qkv_proj/kernel"] == P(*stack, "embed", "heads")
  assert flat[lightning + "attn/norm/scale"] == P(*stack, "heads")  # the RMSNorm over all heads splits with them
  assert flat[lightning + "attn/out_proj/kernel"] == P(*stack, "heads", "embed")
  assert flat[softmax + "attn/k_proj/kernel"] == P(*stack, "embed", "kv_heads")
  assert flat[softmax + "attn/o_proj/kernel"] == P(*stack, "heads", "embed")
  if moe:
    assert flat[lightning + "moe/router"] == P(*stack, "embed", None)
    assert flat[softmax + "moe/wi_up"] == P(*stack, "experts", "expert_embed", "expert_mlp")
    assert flat[softmax + "moe/wo"] == P(*stack, "experts", "expert_mlp", "expert_embed")
  else:
    assert flat[lightning + "mlp/wi_gate"] == P(*stack, "embed", "mlp")
    assert flat[softmax + "mlp/wo"] == P(*stack, "mlp", "embed")
  if scanned:
    assert flat["layers_4/attn/qkv_proj/kernel"] == P("embed", "heads")  # the unrolled remainder


def test_rules_cover_every_parameter():
  cfg = tiny_config()
  pm = mesh_lib.build_mesh(ParallelConfig(data=4, sequence=1, tensor=2, expert=2, expert_tensor=2, fsdp=True))
  axes = model_lib.param_logical_axes(cfg)
  flat = _flat(rules.param_specs(model_lib.abstract_params(cfg), pm, axes))
  t, e, et, ed, d = (pm.axes(a) for a in ("tensor", "expert", "expert_tensor", "expert_data", "data"))
  assert flat["embed/embedding"] == P(None, d)
  assert flat["layers_0/attn/qkv_proj/kernel"] == P(d, t)
  assert flat["layers_0/attn/norm/scale"] == P(t)
  assert flat["layers_1/attn/k_proj/kernel"] == P(d, t)
  assert flat["layers_1/attn/o_proj/kernel"] == P(t, d)
  assert flat["layers_0/moe/router"] == P(d, None)
  assert flat["layers_0/moe/wi_gate"] == P(e, ed, et)
  assert flat["layers_0/moe/wo"] == P(e, et, ed)
  assert flat["final_norm/scale"] == P(None)
  assert flat["lm_head/kernel"] == P(d, None)


def test_specs_of_trees_that_mirror_the_params():
  """Optimizer state (leaves under a path ending with a parameter's) and W8A16 weights follow the params."""
  import optax
  from mx01.inference.quantize import quantize_params
  cfg = tiny_config()
  pm = mesh_lib.build_mesh(ParallelConfig(data=4, tensor=2, expert=2, fsdp=True))
  axes = model_lib.param_logical_axes(cfg)
  abstract = model_lib.abstract_params(cfg)
  t, e, d, ed = (pm.axes(a) for a in ("tensor", "expert", "data", "expert_data"))
  opt_state = jax.eval_shape(optax.adam(1e-3).init, abstract)
  flat = _flat(rules.param_specs(opt_state, pm, axes))
  assert flat["[0]/mu/layers_0/attn/qkv_proj/kernel"] == P(d, t)
  assert flat["[0]/nu/layers_1/moe/wo"] == P(e, None, ed)
  assert flat["[0]/count"] == P()  # a scalar beside the params: replicated
  quantized = jax.eval_shape(quantize_params, abstract)
  flat = _flat(rules.param_specs(quantized, pm, axes))
  assert flat["layers_0/attn/out_proj/kernel/qvalue"] == P(t, d)
  assert flat["layers_0/attn/out_proj/kernel/scale"] == P(d)  # per output channel: the contracted axis goes
  assert flat["layers_1/moe/wi_gate/qvalue"] == P(e, ed, None)
  assert flat["layers_1/moe/wi_gate/scale"] == P(e, None)
  with pytest.raises(MeshError, match=r"no parameter's path ends 'extra/w'"):
    rules.param_specs({"extra": {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}}, pm, axes)


def test_local_shards_split_what_the_layers_compute_on():
  """Inside shard_map the layers see tensor/expert splits; FSDP's "embed" is gathered first, so not split."""
  pm = mesh_lib.build_mesh(ParallelConfig(data=4, tensor=2, expert=4, expert_tensor=2, fsdp=True))
  shards = rules.local_shards(pm)
  assert {n: shards.ways(n) for n in ("heads", "kv_heads", "mlp", "experts", "expert_mlp", "embed", None)} == \
      {"heads": 2, "kv_heads": 2, "mlp": 2, "experts": 4, "expert_mlp": 2, "embed": 1, None: 1}
  assert shards.local_shape((32, 96), ("embed", "heads")) == (32, 48)
  with pytest.raises(ValueError, match=r"dimension 'experts' of size 6 does not split 4 ways"):
    shards.local_shape((6, 32, 32), ("experts", "expert_embed", "expert_mlp"))


def test_indivisible_parameter_names_it():
  pm = mesh_lib.build_mesh(ParallelConfig(data=8, fsdp=True))
  cfg = tiny_config(hidden_size=36, num_heads=4, head_dim=9)
  with pytest.raises(MeshError, match=r"parameter embed/embedding dimension 'embed' of size 36"):
    rules.param_specs(model_lib.abstract_params(cfg), pm, model_lib.param_logical_axes(cfg))


def test_stacked_parameters_get_a_leading_layers_dim():
  """Parameters of the scanned period are [repeats, ...]: their leading "layers" dimension is never sharded."""
  cfg = tiny_config(num_layers=5, layer_types=(LIGHTNING, SOFTMAX) * 2 + (LIGHTNING,))
  assert model_lib.scan_plan(cfg) == (2, 2)
  pm = mesh_lib.build_mesh(ParallelConfig(data=4, tensor=2, expert=2, fsdp=True))
  abstract = model_lib.abstract_params(cfg)
  axes = model_lib.param_logical_axes(cfg)
  flat = _flat(rules.param_specs(abstract, pm, axes))
  t, e, d = (pm.axes(a) for a in ("tensor", "expert", "data"))
  assert flat["period/layer_0/attn/qkv_proj/kernel"] == P(None, d, t)
  assert flat["period/layer_1/attn/o_proj/kernel"] == P(None, t, d)
  assert flat["layers_4/attn/qkv_proj/kernel"] == P(d, t)
  stacked = rules.param_logical_axes(abstract, axes)["period"]["layer_0"]["moe"]["wi_gate"]
  assert stacked == ("layers", "experts", "expert_embed", "expert_mlp")
