"""`ModelOps` for inside `shard_map`: LASP+, ring attention, the expert-parallel MoE and the layers' split.

The decoder calls `ops.lightning`, `ops.attention` and `ops.moe` (mx01/ops.py);
these versions take the local shards of a device and communicate over the
mesh.  The lightning implementation inside LASP+ is the one the config picks
(mx01/ops.py's registries: `lightning_impl`, `attention_impl`), called through
the initial/final-state interface of `ModelOps.lightning`.  `ops.shards`
(`rules.local_shards`) tells the layers how the mesh splits their parameters'
axes (tensor / expert parallelism) and sums their partial results; the
layers receive their own heads' decays and pieces of the weights, so the ops
here see only local heads and local experts.
"""

from __future__ import annotations

import jax.numpy as jnp

from mx01 import ops as ops_lib
from mx01.config import ModelConfig
from mx01.parallel import comm, rules
from mx01.parallel.lasp import lasp_lightning
from mx01.parallel.layout import SequenceLayout
from mx01.parallel.mesh import ParallelMesh
from mx01.parallel.moe_ep import moe_expert_parallel
from mx01.parallel.ring_attention import ring_attention


def _explain_vma_errors(inner, config: ModelConfig):
  """Re-raises the error of a kernel whose outputs lack shard_map's varying-axes type, with the fix."""

  def call(*args, **kwargs):
    try:
      return inner(*args, **kwargs)
    except ValueError as e:
      if "manual_axis_type" not in str(e) and "vma" not in str(e):
        raise
      raise ValueError(
          f"the lightning implementation {config.lightning_impl!r} (resolved: "
          f"{ops_lib.lightning_impl(config)!r}) cannot run inside shard_map(check_vma=True): "
          "its pallas_call output shapes must carry the inputs' varying mesh axes "
          "(jax.ShapeDtypeStruct(..., manual_axis_type=...), see pallas_kernels/_common.match_varying); "
          "set model.lightning_impl='xla' to use the XLA block-wise form instead") from e

  return call


def sharded_model_ops(config: ModelConfig, pmesh: ParallelMesh, layout: SequenceLayout,
                      global_batch: int) -> ops_lib.ModelOps:
  """Ops for one device of `pmesh`; `config` is the global model config."""
  # The config's lightning implementation ("auto": the Pallas kernels on GPU, which declare their
  # outputs' varying mesh axes; checked against the single-device model on GPUs by benchmarks/multi_gpu.py).
  inner = _explain_vma_errors(ops_lib.lightning_op(config), config)
  sequence_axes = pmesh.axes("sequence")

  def lightning(q, k, v, log_decay, *, block_size, segment_ids=None, initial_state=None):
    # q, k [b, t_local, heads_local, dk]; v [b, t_local, heads_local, dv]; log_decay [heads_local]
    if pmesh.parallel.sequence == 1:
      if initial_state is None:
        b, _, h, dk = q.shape
        # Varying like every operand (inside nn.scan the activations' own types may not show it).
        axes = sorted({a for x in (q, k, v, log_decay, segment_ids) if x is not None for a in comm.vma_of(x)})
        initial_state = comm.as_varying(jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32), axes)
      return inner(q, k, v, log_decay, block_size=block_size, segment_ids=segment_ids, initial_state=initial_state)
    return lasp_lightning(q, k, v, log_decay, block_size=block_size, segment_ids=segment_ids,
                          initial_state=initial_state, inner=inner, layout=layout, sequence_axes=sequence_axes)

  local_attention = ops_lib.attention_op(config)

  def attention(q, k, v, *, segment_ids=None):
    if pmesh.parallel.sequence == 1:
      # The config's kernel (Pallas flash attention on GPU: it declares varying mesh axes,
      # pallas_kernels/flash_attention.py).
      return local_attention(q, k, v, segment_ids=segment_ids)
    return ring_attention(q, k, v, segment_ids=segment_ids, layout=layout, sequence_axes=sequence_axes)

  def moe(x, params, *, config=None, token_mask=None):
    # params: this device's experts (and slice of their intermediate dimension); routing is global.
    return moe_expert_parallel(x, params, config=config, pmesh=pmesh, layout=layout, global_batch=global_batch,
                               token_mask=token_mask)

  return ops_lib.ModelOps(lightning=lightning, attention=attention, moe=moe, shards=rules.local_shards(pmesh))
