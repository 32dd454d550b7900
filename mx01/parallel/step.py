"""The sharded forward: the whole model inside one `shard_map`.

    pmesh = mesh.build_mesh(config.parallel)
    params = shard_params(model.init(config.model, rng), pmesh, config.model)
    logits, aux = jax.jit(make_sharded_apply(config.model, pmesh))(params, tokens, segment_ids)

`_local_forward` is the per-device body shared with the train step (mx01/training.py): each device
gathers its FSDP shards and runs the decoder of the global config on its pieces with the sharded
ModelOps, whose `shards` give the layers their tensor / expert split and its collectives.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from mx01 import model as model_lib
from mx01.config import ModelConfig
from mx01.parallel import comm, rules
from mx01.parallel.layout import SequenceLayout
from mx01.parallel.mesh import ParallelMesh, validate_layout
from mx01.parallel.sharded_ops import sharded_model_ops


def shard_params(params, pmesh: ParallelMesh, config: ModelConfig):
  """Places a parameter (or optimizer-state-like) pytree of `config`'s model on the mesh by the rules."""
  return jax.device_put(params, rules.param_shardings(params, pmesh, model_lib.param_logical_axes(config)))


def _local_forward(params, inputs, segment_ids, positions, *, config: ModelConfig, pmesh: ParallelMesh,
                   layout: SequenceLayout, global_batch: int, return_hidden: bool = False):
  """Per-device decoder forward: shards in, (local logits, aux with global routing stats) out.

  return_hidden=True: the final-normed hidden states instead of logits (for the chunked loss)."""
  params = rules.gather_fsdp(params, pmesh, model_lib.param_logical_axes(config))
  ops = sharded_model_ops(config, pmesh, layout, global_batch)
  return model_lib.apply(params, inputs, segment_ids, positions, config=config, ops=ops, return_hidden=return_hidden)


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
    param_specs = rules.param_specs(params, pmesh, model_lib.param_logical_axes(config))
    logits, aux = comm.shard_map(
        local, mesh=pmesh.mesh, in_specs=(param_specs, bspec, bspec, bspec),
        out_specs=(pmesh.spec("data", "sequence", None), aux_specs))(params, tokens, seg, positions)
    return layout.from_layout(logits), aux

  return apply
