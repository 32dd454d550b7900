"""The sharded forward, loss and train step: the whole model inside one `shard_map`.

    pmesh = mesh.build_mesh(config.parallel)
    params = shard_params(model.init(config.model, rng), pmesh)
    opt_state = jax.jit(optimizer.init)(params)          # follows the params' shardings
    step = make_sharded_train_step(config, pmesh, optimizer)
    params, opt_state, metrics = step(params, opt_state, batch)

Data flow of one step (global arrays outside, shards inside):
  1. `split_batch` and per-segment positions on the global batch; with
     sequence > 1 the sequence is permuted to the zig-zag layout (layout.py).
  2. shard_map: batch over (data, sequence); parameters by rules.py.  Each
     device gathers its FSDP shards, runs the unmodified decoder with the
     tensor-local config, the tensor-parallel hooks and the sharded ModelOps,
     and psums the summed token loss and count over (data, sequence); the MoE
     statistics are already global, so the aux loss is that of the whole batch.
  3. `jax.value_and_grad` around the shard_map: JAX transposes every
     collective, so gradients come out with the parameters' shardings
     (replicated parameters get their gradient all-reduced, FSDP shards a
     reduce-scatter).
  4. The optax update runs on the sharded arrays (GSPMD partitions it).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from mx01 import model as model_lib
from mx01 import training
from mx01.config import Config, ModelConfig
from mx01.parallel import comm, rules, tensor_parallel
from mx01.parallel.layout import SequenceLayout
from mx01.parallel.mesh import ParallelMesh, build_mesh, validate_layout
from mx01.parallel.sharded_ops import sharded_model_ops


def shard_params(params, pmesh: ParallelMesh):
  """Places a parameter (or optimizer-state-like) pytree on the mesh by the rules."""
  return jax.device_put(params, rules.param_shardings(params, pmesh))


def _local_forward(params, inputs, segment_ids, positions, *, config: ModelConfig, pmesh: ParallelMesh,
                   layout: SequenceLayout, global_batch: int):
  """Per-device decoder forward: shards in, (local logits, aux with global routing stats) out."""
  params = rules.gather_fsdp(params, pmesh)
  ops = sharded_model_ops(config, pmesh, layout, global_batch)
  local_config = tensor_parallel.local_model_config(config, pmesh.parallel.tensor)
  with tensor_parallel.model_hooks(config, pmesh):
    return model_lib.apply(params, inputs, segment_ids, positions, config=local_config, ops=ops)


def make_sharded_apply(config: ModelConfig, pmesh: ParallelMesh):
  """(params, tokens [B, L], segment_ids [B, L]) -> (logits [B, L, V], aux) computed on the mesh.

  Same results as `mx01.model.apply` (aux: "aux_loss", "routing_stats").
  """

  def apply(params, tokens, segment_ids):
    b, l = tokens.shape
    validate_layout(pmesh.parallel, config, seq_len=l, batch_size=b)
    layout = SequenceLayout(l, pmesh.parallel.sequence)
    positions = model_lib.positions_from_segments(segment_ids)
    tokens, seg, positions = (layout.to_layout(a) for a in (tokens, segment_ids, positions))
    bspec = rules.batch_spec(pmesh)

    def local(params, tokens, seg, positions):
      logits, aux = _local_forward(params, tokens, seg, positions, config=config, pmesh=pmesh, layout=layout,
                                   global_batch=b)
      return logits, {k: v for k, v in aux.items() if k in ("aux_loss", "routing_stats")}

    aux_specs = {"aux_loss": PartitionSpec()}
    if config.is_moe:
      aux_specs["routing_stats"] = {"tokens_per_expert": PartitionSpec(), "prob_sum": PartitionSpec(),
                                    "num_tokens": PartitionSpec()}
    logits, aux = comm.shard_map(
        local, mesh=pmesh.mesh, in_specs=(rules.param_specs(params, pmesh), bspec, bspec, bspec),
        out_specs=(pmesh.spec("data", "sequence", None), aux_specs))(params, tokens, seg, positions)
    return layout.from_layout(logits), aux

  return apply


def make_sharded_loss(config: ModelConfig, pmesh: ParallelMesh):
  """(params, batch) -> (loss, metrics) on the mesh; same values as `mx01.training.loss_fn`."""

  def loss_fn(params, batch):
    inputs, targets, seg, mask = training.split_batch(batch)
    if seg is None:  # one document per row: the sharded layers take it as one segment
      seg = jnp.ones(inputs.shape, jnp.int32)
    b, l = inputs.shape
    validate_layout(pmesh.parallel, config, seq_len=l, batch_size=b)
    layout = SequenceLayout(l, pmesh.parallel.sequence)
    positions = model_lib.positions_from_segments(seg)
    arrays = tuple(layout.to_layout(a) for a in (inputs, targets, seg, mask, positions))
    token_axes = pmesh.axes("data", "sequence")
    bspec = rules.batch_spec(pmesh)

    def local(params, inputs, targets, seg, mask, positions):
      logits, aux = _local_forward(params, inputs, seg, positions, config=config, pmesh=pmesh, layout=layout,
                                   global_batch=b)
      nll_sum, count = training.cross_entropy(logits, targets, mask)
      nll_sum, count = comm.psum(nll_sum, token_axes), comm.psum(count, token_axes)
      ce = nll_sum / jnp.maximum(count, 1.0)
      loss = ce + config.router_aux_loss_coef * aux["aux_loss"]
      metrics = {"loss": ce, "aux_loss": aux["aux_loss"], "tokens": count}
      if "routing_stats" in aux:
        metrics["expert_load"] = jnp.sum(aux["routing_stats"]["tokens_per_expert"], axis=0)
      return loss, metrics

    metric_specs = {"loss": PartitionSpec(), "aux_loss": PartitionSpec(), "tokens": PartitionSpec()}
    if config.is_moe:
      metric_specs["expert_load"] = PartitionSpec()
    return comm.shard_map(
        local, mesh=pmesh.mesh, in_specs=(rules.param_specs(params, pmesh),) + (bspec,) * 5,
        out_specs=(PartitionSpec(), metric_specs))(params, *arrays)

  return loss_fn


def make_sharded_train_step(config: Config, mesh: Optional[ParallelMesh], optimizer: optax.GradientTransformation,
                            *, jit: bool = True):
  """(params, opt_state, batch) -> (params, opt_state, metrics), like `mx01.training.make_train_step`.

  `mesh` defaults to `build_mesh(config.parallel)`.  Params and opt_state are
  expected sharded by `shard_params` (jit keeps them so); the batch
  {"tokens", "segment_ids"} [B, L + 1] may be anywhere.
  """
  pmesh = build_mesh(config.parallel) if mesh is None else mesh
  loss_fn = make_sharded_loss(config.model, pmesh)

  def train_step(params, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = jax.lax.with_sharding_constraint(params, rules.param_shardings(params, pmesh))
    metrics = dict(metrics, total_loss=loss, grad_norm=optax.global_norm(grads))
    return params, opt_state, metrics

  return jax.jit(train_step, donate_argnums=(0, 1)) if jit else train_step
