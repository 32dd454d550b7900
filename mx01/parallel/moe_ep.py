"""Expert-parallel MoE with global routing, for use inside `shard_map`.

Per device (dense view: tokens [b_local, t_local, hidden], replicated over
`tensor`):

1. Split the local tokens over `tensor` so every token is routed exactly once
   (each rank keeps 1/T of every sequence chunk).
2. Route (softmax, top-k, renormalise: mx01.layers.moe.route).
3. Global statistics: `routing_stats` psum'd over all devices, so the aux loss
   is that of the whole batch.
4. Global capacity (capacity_factor set): capacity = ceil(cf * tokens * k / E)
   over the *global* token count, and each assignment's position in its
   expert's queue is its position in the single-device order (choice-major,
   then token order over the flattened [batch, seq]).  Each device all-gathers
   per-(row, chunk) assignment counts [b, chunks, k, E] and adds the counts of
   everything before it in that order -- an exclusive prefix over devices that
   also works when rows are split over `sequence`.  Assignments past the
   capacity are dropped: their token gets only the other experts' outputs (the
   residual carries it through, as on one device).
5. Dispatch: kept assignments are packed into a [E, slots, hidden] buffer
   (slots = min(capacity, local tokens); dropless uses the local token count,
   the worst case), `all_to_all` over `expert` sends each expert its tokens,
   `all_gather` over `expert_tensor` gives every ETP rank the tokens of its
   group, each rank computes the SwiGLU with its slice of the intermediate
   dimension, and `psum_scatter` over `expert_tensor` sums the partial outputs
   back to the owning rank; a second `all_to_all` returns them.
6. Combine with the routing weights, then all-gather over `tensor` to restore
   the dense view.
Without expert parallelism (expert = expert_tensor = 1) and without a capacity,
steps 5-6 are the config's dropless experts (model.moe_impl) on the device's own
tokens; with a capacity they are the capacity buffers and one batched matmul.

Expert weights: wi_gate/wi_up [E/expert, hidden, I/expert_tensor],
wo [E/expert, I/expert_tensor, hidden] (replicated over expert_data).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mx01 import ops as ops_lib
from mx01.config import ModelConfig
from mx01.layers import moe as moe_lib
from mx01.parallel import comm
from mx01.parallel.layout import SequenceLayout
from mx01.parallel.mesh import ParallelMesh


@dataclasses.dataclass(frozen=True)
class TokenPlacement:
  """Static description of which global tokens each device routes (after the tensor split).

  Every device routes [rows, blocks, block_len] tokens; `row_ids` [N, rows] and
  `block_ids` [N, blocks] give their global row and column-block (in units of
  block_len) for each flat device index N in mesh order.
  """
  row_ids: np.ndarray
  block_ids: np.ndarray
  block_len: int
  num_global_tokens: int


def token_placement(pmesh: ParallelMesh, layout: SequenceLayout, global_batch: int) -> TokenPlacement:
  p = pmesh.parallel
  rows = global_batch // p.data
  block_len = layout.chunk_len // p.tensor
  chunk_ids = layout.chunk_ids()  # [S, chunks]
  # Flat device index in mesh order = (data_i * S + seq_i) * T + tensor_i (mesh.py).
  n = np.arange(p.num_devices)
  data_i, seq_i, tensor_i = n // (p.sequence * p.tensor), (n // p.tensor) % p.sequence, n % p.tensor
  row_ids = data_i[:, None] * rows + np.arange(rows)[None]
  block_ids = chunk_ids[seq_i] * p.tensor + tensor_i[:, None]
  return TokenPlacement(row_ids.astype(np.int32), block_ids.astype(np.int32), block_len,
                        global_batch * layout.seq_len)


def global_keep_mask(expert_idx, num_experts: int, capacity: int, placement: TokenPlacement,
                     all_axes, token_mask=None):
  """Capacity mask with the single-device priority order, computed across all devices.

  expert_idx [rows, blocks, block_len, k] -> keep [rows, blocks, block_len, k] bool.
  """
  one_hot = jax.nn.one_hot(expert_idx, num_experts, dtype=jnp.int32)  # [r, nb, c, k, E]
  if token_mask is not None:
    one_hot = one_hot * token_mask.astype(jnp.int32)[..., None, None]
  counts = jnp.sum(one_hot, axis=2)  # [r, nb, k, E]
  every = comm.all_gather(counts, all_axes)  # [N, r, nb, k, E]
  me = comm.axis_index(all_axes)
  my_rows = jnp.asarray(placement.row_ids)[me]  # [r]
  my_blocks = jnp.asarray(placement.block_ids)[me]  # [nb]
  rows_all = jnp.asarray(placement.row_ids)[:, :, None]  # [N, r, 1]
  blocks_all = jnp.asarray(placement.block_ids)[:, None, :]  # [N, 1, nb]
  # before[i, j, n, r, b]: does gathered entry (n, r, b) precede my (row i, block j) in global order?
  r_me, b_me = my_rows[:, None, None, None, None], my_blocks[None, :, None, None, None]
  before = (rows_all[None, None] < r_me) | ((rows_all[None, None] == r_me) & (blocks_all[None, None] < b_me))
  prefix = jnp.einsum("ijnrb,nrbke->ijke", before.astype(jnp.int32), every)  # [r, nb, k, E]
  per_rank = jnp.sum(every, axis=(0, 1, 2))  # [k, E]
  earlier_ranks = jnp.cumsum(per_rank, axis=0) - per_rank
  within = jnp.cumsum(one_hot, axis=2) - one_hot  # [r, nb, c, k, E]
  pos = within + prefix[:, :, None] + earlier_ranks[None, None, None]
  pos_in_expert = jnp.sum(pos * one_hot, axis=-1)  # [r, nb, c, k]
  keep = pos_in_expert < capacity
  if token_mask is not None:
    keep = keep & token_mask.astype(bool)[..., None]  # masked tokens take no place and get no expert output
  return keep


def _dispatch_slots(expert_idx, keep, num_experts: int):
  """Slot of each kept assignment in its expert's local send buffer.  [n, k] -> [n, k] int32."""
  n, k = expert_idx.shape
  one_hot = jax.nn.one_hot(expert_idx.reshape(-1), num_experts, dtype=jnp.int32) * keep.reshape(-1, 1)
  slot = jnp.sum((jnp.cumsum(one_hot, axis=0) - one_hot) * one_hot, axis=-1)
  return slot.reshape(n, k)


def moe_expert_parallel(x, params, *, config: ModelConfig, pmesh: ParallelMesh, layout: SequenceLayout,
                        global_batch: int, token_mask=None):
  """The MoE block on one device of the mesh.

  x [b_local, t_local, hidden] (dense view); params: router [hidden, E],
  wi_gate/wi_up [E_local, hidden, I_local], wo [E_local, I_local, hidden].
  token_mask [b_local, t_local] or None.  Returns (y like x, global routing_stats).
  """
  p = pmesh.parallel
  b, t, d = x.shape
  e_total, top_k = config.num_experts, config.num_experts_per_tok
  e_local = e_total // p.expert
  chex.assert_shape(params["router"], (d, e_total))
  chex.assert_shape([params["wi_gate"], params["wi_up"]], (e_local, d, config.intermediate_size // p.expert_tensor))
  chex.assert_shape(params["wo"], (e_local, config.intermediate_size // p.expert_tensor, d))
  n_chunks, chunk = layout.chunks_per_device, layout.chunk_len
  chex.assert_equal(t, n_chunks * chunk)
  tensor_axes, expert_axes = pmesh.axes("tensor"), pmesh.axes("expert")
  etp_axes, all_axes = pmesh.axes("expert_tensor"), pmesh.all_axes
  placement = token_placement(pmesh, layout, global_batch)
  block = placement.block_len

  # 1. This tensor rank's share of every chunk: [b, n_chunks, block, d].
  tp = comm.axis_index(tensor_axes)
  xs = jax.lax.dynamic_slice_in_dim(x.reshape(b, n_chunks, chunk, d), tp * block, block, axis=2)
  tm = None
  if token_mask is not None:
    tm = jax.lax.dynamic_slice_in_dim(token_mask.reshape(b, n_chunks, chunk), tp * block, block, axis=2)
  n_tok = b * n_chunks * block
  xf = xs.reshape(n_tok, d)

  # 2-3. Route; global statistics.
  probs, expert_idx, weights = moe_lib.route(xf, params["router"], top_k)
  stats = moe_lib.routing_stats(probs, expert_idx, None if tm is None else tm.reshape(n_tok))
  stats = jax.tree.map(lambda s: comm.psum(s, all_axes), stats)

  # 4. Global capacity.
  capacity = moe_lib.expert_capacity(placement.num_global_tokens, e_total, top_k, config.capacity_factor)
  if capacity is None:
    keep = jnp.ones((n_tok, top_k), bool)
    slots = n_tok
  else:
    keep = global_keep_mask(expert_idx.reshape(b, n_chunks, block, top_k), e_total, capacity, placement,
                            all_axes, tm).reshape(n_tok, top_k)
    slots = min(capacity, n_tok)
  weights = weights * keep

  if p.expert == 1 and p.expert_tensor == 1 and capacity is None:
    # Dropless without expert parallelism: every device holds every expert; the config's dropless
    # experts (model.moe_impl) over its own tokens.
    y = ops_lib.dropless_experts(config)(xf, expert_idx, weights, params["wi_gate"], params["wi_up"], params["wo"])
  else:
    # Per-expert capacity buffers and one batched matmul (all-to-all over `expert` when it is > 1): with a
    # capacity this is the single-device "capacity" path, which the GPU runs 2.5x faster than ragged_dot.
    y = _dispatch_compute_combine(xf, expert_idx, weights, keep, params, slots=slots, e_total=e_total,
                                  e_local=e_local, ep=p.expert, expert_axes=expert_axes, etp_axes=etp_axes)
  y = y.reshape(b, n_chunks, block, d)
  if tensor_axes:
    y = comm.all_gather_replicated(y, tensor_axes, axis=2)
  return y.reshape(b, t, d), stats


def _dispatch_compute_combine(xf, expert_idx, weights, keep, params, *, slots, e_total, e_local, ep, expert_axes,
                              etp_axes):
  """Steps 5-6 with expert parallelism: xf [n, d], expert_idx/weights/keep [n, k] -> y [n, d]."""
  d = xf.shape[-1]
  # 5. Dispatch into [E, slots, d]; dropped assignments go out of range and are discarded.
  slot = _dispatch_slots(expert_idx, keep, e_total)
  flat_slot, assignment_of_slot = moe_lib.slot_maps(
      jnp.where(keep, expert_idx * slots + slot, e_total * slots), e_total * slots)
  send = moe_lib.to_slots(xf, flat_slot, assignment_of_slot).reshape(e_total, slots, d)
  if expert_axes:
    # [E, slots, d] -> [E (= source rank x local expert), slots, d]: block r now comes from EP rank r.
    recv = jax.lax.all_to_all(send, expert_axes, 0, 0, tiled=True)
  else:
    recv = send
  tokens_in = recv.reshape(ep, e_local, slots, d).transpose(1, 0, 2, 3).reshape(e_local, ep * slots, d)
  if etp_axes:
    tokens_in = jax.lax.all_gather(tokens_in, etp_axes, axis=1, tiled=True)  # [E_l, ET*ep*slots, d]
  dt = xf.dtype
  wi_gate, wi_up, wo = (params[k].astype(dt) for k in ("wi_gate", "wi_up", "wo"))
  out = moe_lib.swiglu(tokens_in, wi_gate, wi_up, wo)  # [E_l, m, d]; partial over the I slice when ETP > 1
  if etp_axes:
    out = jax.lax.psum_scatter(out, etp_axes, scatter_dimension=1, tiled=True)  # [E_l, ep*slots, d]
  out = out.reshape(e_local, ep, slots, d).transpose(1, 0, 2, 3).reshape(e_total, slots, d)
  if expert_axes:
    out = jax.lax.all_to_all(out, expert_axes, 0, 0, tiled=True)  # back in our send layout

  # 6. Combine with the routing weights.
  return moe_lib.from_slots(out.reshape(e_total * slots, d), flat_slot, assignment_of_slot, weights).astype(dt)
