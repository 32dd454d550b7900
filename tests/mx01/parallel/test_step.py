"""The whole model on the mesh == the single-device model: forward, loss, aux loss, gradients, the train step
(with gradient accumulation, non-finite skipping and the chunked loss)."""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from mx01 import model as model_lib
from mx01 import training
from mx01.config import Config, DataConfig, ParallelConfig
from mx01.parallel import mesh as mesh_lib
from mx01.parallel import step as step_lib

from tests.mx01.parallel.util import max_abs_diff, packed_batch, tiny_config

B, L = 4, 16


def _layout_id(p):
  if not isinstance(p, ParallelConfig):
    return f"cf{p}"
  return f"d{p.data}s{p.sequence}t{p.tensor}e{p.expert}et{p.expert_tensor}" + ("-fsdp" if p.fsdp else "")


# Two layouts, each its own compile of the whole model's gradient.  Elsewhere: MoE without expert parallelism
# and every expert layout at the layer level (test_moe_ep.py), FSDP gradients through the train step
# (below), a sequence axis of 4 and 8 (test_sequence_parallel.py, the recipe's data x sequence run).
@pytest.mark.parametrize("parallel, capacity_factor", [
    (ParallelConfig(data=2, sequence=2, tensor=2, expert=2, expert_tensor=2), 0.5),  # all five axes, drops
    # Experts split over the whole data axis and expert_tensor over tensor: no expert_data replicas.
    pytest.param(ParallelConfig(data=4, tensor=2, expert=4, expert_tensor=2), 0.5, marks=pytest.mark.slow),
], ids=_layout_id)
def test_sharded_loss_and_grads_equal_single_device(parallel, capacity_factor):
  cfg = tiny_config(capacity_factor=capacity_factor)
  params = model_lib.init(cfg, jax.random.key(0))
  batch = packed_batch(jax.random.key(1), cfg, B, L)
  (loss_ref, m_ref), g_ref = jax.value_and_grad(training.loss_fn, has_aux=True)(params, batch, config=cfg)

  pm = mesh_lib.build_mesh(parallel)
  loss_fn = training.make_loss(cfg, pm)
  (loss, m), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(step_lib.shard_params(params, pm, cfg), batch)
  assert abs(float(loss) - float(loss_ref)) < 1e-5
  assert abs(float(m["aux_loss"]) - float(m_ref["aux_loss"])) < 1e-5
  assert float(m["tokens"]) == float(m_ref["tokens"])
  assert max_abs_diff(m["expert_load"], m_ref["expert_load"]) == 0.0
  assert jax.tree.structure(g) == jax.tree.structure(g_ref)
  assert max_abs_diff(g, g_ref) < 1e-6  # gradients are O(0.1)


@pytest.mark.slow
def test_sharded_forward_equals_single_device():
  cfg = tiny_config()
  params = model_lib.init(cfg, jax.random.key(0))
  batch = packed_batch(jax.random.key(2), cfg, B, L)
  inputs, _, seg, _ = training.split_batch(batch)
  logits_ref, aux_ref = model_lib.apply(params, inputs, seg, config=cfg)
  pm = mesh_lib.build_mesh(ParallelConfig(data=2, sequence=2, tensor=2, expert=4, expert_tensor=2))
  logits, aux = jax.jit(step_lib.make_sharded_apply(cfg, pm))(step_lib.shard_params(params, pm, cfg), inputs, seg)
  assert max_abs_diff(logits, logits_ref) < 1e-5
  assert abs(float(aux["aux_loss"]) - float(aux_ref["aux_loss"])) < 1e-6
  assert max_abs_diff(aux["routing_stats"], aux_ref["routing_stats"]) < 1e-4


def test_sharded_train_step_equals_single_device():
  cfg = tiny_config()
  parallel = ParallelConfig(data=2, sequence=2, tensor=2, expert=2, expert_tensor=1, fsdp=True)
  config = Config(model=cfg, parallel=parallel, data=DataConfig(seq_len=L))
  # SGD with momentum: Adam's first step ~ lr * sign(g) would amplify float noise in near-zero gradients.
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5, momentum=0.9))
  params = model_lib.init(cfg, jax.random.key(0))
  batch = packed_batch(jax.random.key(3), cfg, B, L)
  ref_step = jax.jit(training.make_train_step(cfg, None, optimizer))
  p_ref, _, m_ref = ref_step(params, optimizer.init(params), batch)

  pm = mesh_lib.build_mesh(parallel)
  sharded_params = step_lib.shard_params(params, pm, cfg)
  opt_state = jax.jit(optimizer.init)(sharded_params)
  step = jax.jit(training.make_train_step(config.model, pm, optimizer), donate_argnums=(0, 1))
  p_new, opt_state, m = step(sharded_params, opt_state, batch)
  assert abs(float(m["total_loss"]) - float(m_ref["total_loss"])) < 1e-5
  assert abs(float(m["grad_norm"]) - float(m_ref["grad_norm"])) < 1e-5
  assert max_abs_diff(p_new, p_ref) < 1e-5
  # Parameters keep their shardings (FSDP over data, experts over expert).
  wi = p_new["layers_0"]["moe"]["wi_gate"]
  axes = model_lib.param_logical_axes(cfg)
  expected = step_lib.rules.param_shardings(p_new, pm, axes)["layers_0"]["moe"]["wi_gate"]
  assert wi.sharding.is_equivalent_to(expected, wi.ndim), (wi.sharding, expected)
  # A second step runs on the returned (donated) state.
  _, _, m2 = step(p_new, opt_state, batch)
  assert bool(jnp.isfinite(m2["total_loss"]))


@pytest.mark.parametrize("parallel", [ParallelConfig(), ParallelConfig(data=8),
                                      ParallelConfig(data=2, sequence=4, expert=2)], ids=_layout_id)
def test_sharded_step_with_gpu_kernels_lowers_for_cuda(parallel, monkeypatch):
  # The sharded train step with the Pallas lightning kernels and jax's Pallas flash attention inside
  # shard_map(check_vma=True), lowered for CUDA without a GPU: every pallas_call declares how its
  # outputs vary over the mesh.  (Values are checked on GPUs by benchmarks/multi_gpu.py.)
  import dataclasses
  from pallas_kernels import _common
  monkeypatch.setattr(_common, "check_backend", lambda interpret: None)
  cfg = dataclasses.replace(tiny_config(), lightning_impl="pallas", attention_impl="pallas", compute_dtype="bfloat16",
                            head_dim=16, block_size=16)
  pm = mesh_lib.build_mesh(parallel, devices=jax.devices()[:parallel.num_devices])  # 1 device: every axis size 1
  params = jax.eval_shape(lambda: step_lib.shard_params(model_lib.init(cfg, jax.random.key(0)), pm, cfg))
  batch = jax.eval_shape(lambda: packed_batch(jax.random.key(1), cfg, 8, 64))
  loss_fn = training.make_loss(cfg, pm)
  grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))
  try:
    text = grad_fn.trace(params, batch).lower(lowering_platforms=("cuda",)).as_text()
  except TypeError as e:  # a jax without cross-platform lowering
    pytest.skip(f"cannot lower for cuda here: {e}")
  kernels = set(re.findall(r'name = "([^"]+)"', text))
  assert {"lightning_fwd", "lightning_bwd_dq", "lightning_bwd_dkdv"} <= kernels
  if parallel.sequence == 1:  # with a sequence axis the softmax layers use ring attention instead
    assert {"mha_forward", "mha_backward"} <= kernels


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_one_device_mesh_equals_single_device(capacity_factor):
  # A mesh of one device (every axis size 1): the sharded path must reduce to the plain model,
  # with token drops too (the drop order uses the flattened device index).
  cfg = tiny_config(capacity_factor=capacity_factor)
  params = model_lib.init(cfg, jax.random.key(0))
  batch = packed_batch(jax.random.key(3), cfg, B, L)
  (loss_ref, m_ref), g_ref = jax.value_and_grad(training.loss_fn, has_aux=True)(params, batch, config=cfg)
  pm = mesh_lib.build_mesh(ParallelConfig(), devices=jax.devices()[:1])
  loss_fn = training.make_loss(cfg, pm)
  (loss, m), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(step_lib.shard_params(params, pm, cfg), batch)
  assert abs(float(loss) - float(loss_ref)) < 1e-5
  assert max_abs_diff(m["expert_load"], m_ref["expert_load"]) == 0.0
  assert max_abs_diff(g, g_ref) < 1e-6


def test_sharded_loss_takes_rows_without_segment_ids():
  cfg = tiny_config()
  params = model_lib.init(cfg, jax.random.key(0))
  tokens = {"tokens": packed_batch(jax.random.key(3), cfg, B, L)["tokens"]}  # one document per row
  loss_ref, m_ref = training.loss_fn(params, tokens, config=cfg)
  pm = mesh_lib.build_mesh(ParallelConfig(data=4, sequence=2, expert=2))
  loss, m = jax.jit(training.make_loss(cfg, pm))(step_lib.shard_params(params, pm, cfg), tokens)
  assert abs(float(loss) - float(loss_ref)) < 1e-5
  assert float(m["tokens"]) == float(m_ref["tokens"]) == B * L


def test_sharded_forward_with_scanned_layers_equals_single_device():
  """Layers under nn.scan on the mesh: tensor-parallel decays indexed by the traced layer, expert-parallel MoE."""
  from mx01.config import LIGHTNING, SOFTMAX
  cfg = tiny_config(num_layers=5, layer_types=(LIGHTNING, SOFTMAX) * 2 + (LIGHTNING,))
  assert model_lib.scan_plan(cfg) == (2, 2)
  params = model_lib.init(cfg, jax.random.key(0))
  batch = packed_batch(jax.random.key(2), cfg, B, L)
  inputs, _, seg, _ = training.split_batch(batch)
  logits_ref, aux_ref = model_lib.apply(params, inputs, seg, config=cfg)
  pm = mesh_lib.build_mesh(ParallelConfig(data=4, tensor=2, expert=2, fsdp=True))
  logits, aux = jax.jit(step_lib.make_sharded_apply(cfg, pm))(step_lib.shard_params(params, pm, cfg), inputs, seg)
  assert max_abs_diff(logits, logits_ref) < 1e-5 * float(jnp.abs(logits_ref).max())
  assert max_abs_diff(aux["routing_stats"], aux_ref["routing_stats"]) < 1e-4


def test_train_step_options_on_a_layout_equal_one_device():
  # grad_accum, skip_nonfinite and the chunked loss (a chunk that does not divide L) under
  # data x tensor x expert with FSDP: the same metrics and parameters as on the trivial mesh.
  import dataclasses
  cfg = dataclasses.replace(tiny_config(), loss_chunk_size=5)
  parallel = ParallelConfig(data=2, tensor=2, expert=2, fsdp=True, sequence=2)
  optimizer = optax.sgd(0.5, momentum=0.9)
  params = model_lib.init(cfg, jax.random.key(0))
  batch = packed_batch(jax.random.key(4), cfg, 8, L)
  results = []
  for pm in (training.trivial_mesh(), mesh_lib.build_mesh(parallel)):
    step = jax.jit(training.make_train_step(cfg, pm, optimizer, grad_accum=2, skip_nonfinite=True))
    p = step_lib.shard_params(params, pm, cfg)
    results.append(step(p, optimizer.init(p), batch))
  (p_ref, _, m_ref), (p_new, _, m) = results
  for k in ("loss", "aux_loss", "total_loss", "grad_norm", "expert_load_max_over_mean"):
    assert abs(float(m[k]) - float(m_ref[k])) < 1e-5 * max(1.0, abs(float(m_ref[k]))), k
  assert float(m["tokens"]) == float(m_ref["tokens"]) and int(m["nonfinite"]) == 0
  assert max_abs_diff(p_new, p_ref) < 1e-5
  # A NaN weight: the update is skipped on the mesh too.
  pm = mesh_lib.build_mesh(parallel)
  bad = jax.tree.map(lambda x: x, params)
  bad["lm_head"]["kernel"] = bad["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
  bad = step_lib.shard_params(bad, pm, cfg)
  step = jax.jit(training.make_train_step(cfg, pm, optimizer, grad_accum=2, skip_nonfinite=True))
  new, _, m = step(bad, optimizer.init(bad), batch)
  assert int(m["nonfinite"]) == 1
  assert max_abs_diff(jax.tree.map(jnp.nan_to_num, new), jax.tree.map(jnp.nan_to_num, bad)) == 0.0
