"""Loss, optimizer and the one train step: the model inside the shard_map of a mesh.

Batches are packed rows: {"tokens": [batch, L + 1] int32, "segment_ids":
[batch, L + 1] int32}.  The model reads tokens[:, :-1] and predicts
tokens[:, 1:]; a target counts only when it continues the same segment, and
segment id 0 marks padding (never a target).  A batch without "segment_ids"
holds one document per row: every target counts (or those of an explicit
"loss_mask" [batch, L]).  A task whose targets are not the next input token
gives them: {"tokens": [batch, L] (the inputs), "targets": [batch, L],
"loss_mask": [batch, L] (optional)}, one document per row.

    pmesh = mesh.build_mesh(config.parallel)              # or trivial_mesh(): one device
    optimizer, schedule = make_optimizer(config.train)
    step = jax.jit(make_train_step(config.model, pmesh, optimizer, grad_accum=2, skip_nonfinite=True))
    params, opt_state, metrics = step(params, opt_state, batch)

The same step serves one device (the trivial mesh) and a cluster.  Data flow:
  1. `split_batch` and per-segment positions on the global batch; with
     sequence > 1 the sequence is permuted to the zig-zag layout (layout.py).
  2. shard_map: batch over (data, sequence); parameters by parallel/rules.py.
     Each device runs `parallel.step._local_forward` (FSDP gather, the decoder on
     its parameter pieces with the sharded ops) and psums its summed token loss and count over
     (data, sequence); MoE statistics are already global.
  3. `jax.value_and_grad` around the shard_map: JAX transposes every
     collective, so gradients come out with the parameters' shardings.
  4. The optax update runs on the sharded arrays (GSPMD partitions it).

`loss_fn` below is the plain single-device reference the sharded loss is tested against.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mx01 import model as model_lib
from mx01.config import ModelConfig, ParallelConfig, TrainConfig
from mx01.ops import ModelOps
from mx01.parallel import comm, rules
from mx01.parallel import step as step_lib
from mx01.parallel.layout import SequenceLayout
from mx01.parallel.mesh import ParallelMesh, build_mesh, validate_layout


def split_batch(batch):
  """Packed rows -> (inputs, targets, segment_ids, loss_mask), each [batch, L].

  Without "segment_ids" in the batch: segment_ids is None and every target counts, or those of
  batch["loss_mask"] [batch, L] when given.  With "targets" [batch, L]: "tokens" [batch, L] are the
  inputs and these their targets (one document per row; no "segment_ids").
  """
  tokens = batch["tokens"]
  if "targets" in batch:
    if "segment_ids" in batch:
      raise ValueError("a batch with explicit 'targets' holds one document per row; drop its 'segment_ids'")
    inputs, targets = tokens, batch["targets"]
  else:
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
  if "segment_ids" not in batch:
    mask = batch["loss_mask"].astype(bool) if "loss_mask" in batch else jnp.ones(targets.shape, bool)
    return inputs, targets, None, mask
  seg = batch["segment_ids"]
  in_seg = seg[:, :-1]
  loss_mask = (seg[:, 1:] == in_seg) & (in_seg != 0)
  return inputs, targets, in_seg, loss_mask


def cross_entropy(logits, targets, mask):
  """Summed token cross-entropy and the token count.  logits [b, t, V] f32, targets/mask [b, t]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  return jnp.sum(nll * m), jnp.sum(m)


def chunked_cross_entropy(hidden, head, targets, mask, *, chunk_size: int):
  """`cross_entropy` of logits = hidden @ head, computed chunk_size tokens at a time.

  hidden [b, t, d] (compute dtype), head [d, V], targets/mask [b, t].  Each
  chunk's logits are rematerialised in the backward pass, so the live logits
  are [b, chunk_size, V] instead of [b, t, V].  Returns (summed nll, count).
  """
  b, t, d = hidden.shape
  n = -(-t // chunk_size)
  pad = n * chunk_size - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk_size, *x.shape[2:]), 1, 0)  # noqa: E731
  w = head.astype(hidden.dtype)

  @jax.checkpoint
  def chunk_loss(h, tgt, m):
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32)  # [b, chunk, V]
    return cross_entropy(logits, tgt, m)

  def body(carry, xs):
    nll, cnt = chunk_loss(*xs)
    return (carry[0] + nll, carry[1] + cnt), None

  # 0.0 typed like the loop's outputs: inside shard_map it varies over the mesh axes its inputs vary over.
  zero = sum(jnp.sum(x[:0].astype(jnp.float32)) for x in (hidden, w, targets, mask))
  (nll_sum, count), _ = jax.lax.scan(body, (zero, zero), (split(hidden), split(targets), split(mask)))
  return nll_sum, count


def expert_load_imbalance(tokens_per_expert):
  """Mean over MoE layers of max_e(load) / mean_e(load).  tokens_per_expert [layers, E] -> [] (1.0 = balanced)."""
  load = tokens_per_expert.astype(jnp.float32)
  return jnp.mean(jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9))


def loss_fn(params, batch, *, config: ModelConfig, ops: Optional[ModelOps] = None):
  """Mean next-token loss + router_aux_loss_coef * aux loss.  Returns (loss, metrics).

  The plain single-device reference (no mesh) that `make_loss` is tested against.

  metrics: "loss" (cross-entropy), "aux_loss", "tokens" (targets counted) and,
  for MoE, "expert_load" [E] (assignments summed over layers) and
  "expert_load_max_over_mean" (see `expert_load_imbalance`).
  """
  inputs, targets, seg, mask = split_batch(batch)
  if config.loss_chunk_size is not None:
    hidden, aux = model_lib.apply(params, inputs, seg, config=config, ops=ops, return_hidden=True)
    nll_sum, count = chunked_cross_entropy(hidden, model_lib.lm_head_matrix(params, config), targets, mask,
                                           chunk_size=config.loss_chunk_size)
  else:
    logits, aux = model_lib.apply(params, inputs, seg, config=config, ops=ops)
    nll_sum, count = cross_entropy(logits, targets, mask)
  ce = nll_sum / jnp.maximum(count, 1.0)
  loss = ce + config.router_aux_loss_coef * aux["aux_loss"]
  metrics = {"loss": ce, "aux_loss": aux["aux_loss"], "tokens": count}
  if "routing_stats" in aux:
    per_layer = aux["routing_stats"]["tokens_per_expert"]
    metrics["expert_load"] = jnp.sum(per_layer, axis=0)
    metrics["expert_load_max_over_mean"] = expert_load_imbalance(per_layer)
  return loss, metrics


def init_train_state(config: ModelConfig, optimizer: optax.GradientTransformation, init_key, run_key) -> dict:
  """The state a run checkpoints: {"params", "opt_state", "step" [] int32, "rng" (key data of run_key)}."""
  params = model_lib.init(config, init_key)
  return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(run_key)}


# ---- optimizer -------------------------------------------------------------------

def weight_decay_mask(params):
  """True for parameters that get weight decay: matrices (ndim >= 2), not norm scales, biases or 1-D params."""

  def decays(path, leaf):
    name = str(getattr(path[-1], "key", path[-1])) if path else ""
    return leaf.ndim >= 2 and name not in ("scale", "bias")

  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
  """Linear warmup over warmup_steps to learning_rate, then cosine / linear decay to
  min_lr_ratio * learning_rate at `steps` (or constant)."""
  peak, floor = train.learning_rate, train.learning_rate * train.min_lr_ratio
  warmup = max(train.warmup_steps, 0)
  decay_steps = max(train.steps - warmup, 1)
  if train.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=train.min_lr_ratio)
  elif train.lr_schedule == "linear":
    decay = optax.linear_schedule(peak, floor, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  # Step 0 trains with a small non-zero rate: warmup reaches `peak` at step `warmup`.
  ramp = optax.linear_schedule(peak / warmup, peak, warmup - 1) if warmup > 1 else optax.constant_schedule(peak)
  return optax.join_schedules([ramp, decay], [warmup])


def make_optimizer(train: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with gradient clipping by global norm, the schedule above and `weight_decay_mask`."""
  schedule = learning_rate_schedule(train)
  parts = []
  if train.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train.grad_clip))
  parts.append(optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay,
                           mask=weight_decay_mask))
  return optax.chain(*parts), schedule


# ---- the train / eval step, on a mesh ------------------------------------------------

def trivial_mesh(device=None) -> ParallelMesh:
  """The one-device mesh (every parallel size 1) on `device` (default: the first device)."""
  return build_mesh(ParallelConfig(), [device if device is not None else jax.devices()[0]])


def state_shardings(abstract_state, optimizer: optax.GradientTransformation, pmesh: ParallelMesh,
                    config: ModelConfig):
  """Shardings of a train state {"params", "opt_state", ...} of `config`'s model: parameters by the rules
  table, every copy of the parameter tree inside the optimizer state (Adam's mu, nu) like the parameters,
  the rest replicated."""
  replicated = NamedSharding(pmesh.mesh, PartitionSpec())
  params = rules.param_shardings(abstract_state["params"], pmesh, model_lib.param_logical_axes(config))
  out = {k: jax.tree.map(lambda _: replicated, v) for k, v in abstract_state.items()}
  out["params"] = params
  if "opt_state" in abstract_state:
    out["opt_state"] = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state["opt_state"], params,
                                             transform_non_params=lambda _: replicated)
  return out


# A loss function for `make_train_step(..., loss_fn=)`: per device, on its shard of the rows (and of the
# sequence, in the layout's order), (final-normed hidden [b, t, d] in compute dtype, LM head [d, V], targets
# [b, t], mask [b, t] bool) -> (summed nll [], token count [], extra sums {name: []}).  It gets the hidden
# states, not logits, so that it chooses where the head runs (e.g. only at the masked positions).  The step
# sums every value over the mesh; the loss is nll / count and each extra metric is sum / count.
TokenLoss = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple]


def _global_sums(config: ModelConfig, pmesh: ParallelMesh, token_loss: Optional[TokenLoss]):
  """(params, batch) -> sums over the whole batch, computed inside the mesh's shard_map.

  Returns {"nll_sum", "tokens", "aux_loss", extra sums of `token_loss`, and for MoE "expert_load" [E]
  (assignments summed over layers) and "expert_load_max_over_mean"}, all replicated.
  """

  def sums_fn(params, batch):
    inputs, targets, seg, mask = split_batch(batch)
    if seg is None:  # one document per row: the sharded layers take it as one segment
      seg = jnp.ones(inputs.shape, jnp.int32)
    b, l = inputs.shape
    validate_layout(pmesh.parallel, config, seq_len=l, batch_size=b)
    layout = SequenceLayout(l, pmesh.parallel.sequence)
    positions = model_lib.positions_from_segments(seg)
    arrays = tuple(layout.to_layout(a) for a in (inputs, targets, seg, mask, positions))
    token_axes = pmesh.axes("data", "sequence")
    bspec = rules.batch_spec(pmesh)
    chunked = token_loss is None and config.loss_chunk_size is not None
    return_hidden = chunked or token_loss is not None  # both losses apply the head themselves

    def local(params, inputs, targets, seg, mask, positions):
      out, aux = step_lib._local_forward(params, inputs, seg, positions, config=config, pmesh=pmesh, layout=layout,
                                         global_batch=b, return_hidden=return_hidden)
      extra = {}
      if return_hidden:
        head = model_lib.lm_head_matrix(rules.gather_fsdp(params, pmesh, model_lib.param_logical_axes(config)),
                                        config)
      if chunked:
        nll_sum, count = chunked_cross_entropy(out, head, targets, mask, chunk_size=config.loss_chunk_size)
      elif token_loss is None:
        nll_sum, count = cross_entropy(out, targets, mask)
      else:
        nll_sum, count, extra = token_loss(out, head, targets, mask)
      sums = {"nll_sum": nll_sum, "tokens": count, **extra}
      sums = {k: comm.psum(v, token_axes) for k, v in sums.items()}
      sums["aux_loss"] = aux["aux_loss"]  # the routing statistics are already global
      if "routing_stats" in aux:
        per_layer = aux["routing_stats"]["tokens_per_expert"]
        sums["expert_load"] = jnp.sum(per_layer, axis=0)
        sums["expert_load_max_over_mean"] = expert_load_imbalance(per_layer)
      return sums

    param_specs = rules.param_specs(params, pmesh, model_lib.param_logical_axes(config))
    return comm.shard_map(local, mesh=pmesh.mesh, in_specs=(param_specs,) + (bspec,) * 5,
                          out_specs=PartitionSpec())(params, *arrays)

  return sums_fn


def make_loss(config: ModelConfig, pmesh: ParallelMesh, *, loss_fn: Optional[TokenLoss] = None) -> Callable:
  """(params, batch) -> (loss, metrics) on the mesh; the same values as the reference `loss_fn` above.

  loss = nll / tokens + router_aux_loss_coef * aux_loss.  metrics: "loss" (the cross-entropy), "aux_loss",
  "tokens", each extra sum of `loss_fn` divided by tokens, and for MoE "expert_load", "expert_load_max_over_mean".
  """
  sums_fn = _global_sums(config, pmesh, loss_fn)

  def loss(params, batch):
    sums = sums_fn(params, batch)
    count = jnp.maximum(sums["tokens"], 1.0)
    ce = sums["nll_sum"] / count
    metrics = {k: (v if k in ("tokens", "aux_loss", "expert_load", "expert_load_max_over_mean") else v / count)
               for k, v in sums.items() if k != "nll_sum"}
    metrics["loss"] = ce
    return ce + config.router_aux_loss_coef * sums["aux_loss"], metrics

  return loss


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _micro_batches(batch, grad_accum: int, pmesh: ParallelMesh):
  """[B, ...] -> [grad_accum, B / grad_accum, ...]: micro-batch i holds rows i, i + k, i + 2k, ... so that
  each stays spread over the data axis like the full batch (a device's rows split among the micro-batches)."""
  b = batch["tokens"].shape[0]
  if b % grad_accum:
    raise ValueError(f"batch of {b} rows is not divisible by grad_accum={grad_accum}")
  spec = pmesh.sharding(None, "data")
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      jnp.swapaxes(x.reshape(b // grad_accum, grad_accum, *x.shape[1:]), 0, 1), spec), batch)


def make_train_step(config: ModelConfig, pmesh: Optional[ParallelMesh], optimizer: optax.GradientTransformation,
                    *, grad_accum: int = 1, skip_nonfinite: bool = False,
                    loss_fn: Optional[TokenLoss] = None) -> Callable:
  """(params, opt_state, batch) -> (params, opt_state, metrics); pure, ready for jax.jit.

  The one train step, for every layout: the model runs inside the shard_map of `pmesh` (None = the
  one-device `trivial_mesh`).  params / opt_state are expected placed by `state_shardings` (the step
  keeps them so); the batch {"tokens", "segment_ids" (optional), "loss_mask" (optional)} [B, L + 1 or L]
  may be anywhere (best: rows split over data); or {"tokens", "targets", "loss_mask" (optional)} [B, L]
  for targets other than the next token (`split_batch`).

  grad_accum > 1 splits the batch into grad_accum micro-batches of B / grad_accum rows (scanned, so one
  micro-batch of activations is live) and averages their gradients and metrics.  skip_nonfinite=True
  leaves params and optimizer state unchanged when the loss or any gradient is NaN/inf, and reports
  metrics["nonfinite"] = 1.  loss_fn replaces the cross-entropy (see `TokenLoss`: it receives the final
  hidden states and the LM head); with loss_fn None and config.loss_chunk_size set, the loss is
  `chunked_cross_entropy`.  Remat follows config.remat.  Under jax.vmap the step trains a stack of models
  (params, opt_state and batch with a leading model axis; recipes/retrieval.py's grid).
  """
  pmesh = trivial_mesh() if pmesh is None else pmesh
  loss = make_loss(config, pmesh, loss_fn=loss_fn)
  grads_of = jax.value_and_grad(loss, has_aux=True)

  def accumulated(params, batch):
    micro = _micro_batches(batch, grad_accum, pmesh)
    zeros = jax.tree.map(jnp.zeros_like, params)

    def body(carry, mb):
      (loss, metrics), grads = grads_of(params, mb)
      acc_grads, acc_loss, acc_metrics = carry
      return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss, jax.tree.map(jnp.add, acc_metrics, metrics)), None

    (_, metrics_shape), _ = jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], micro))
    metrics0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)
    (grads, loss, metrics), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), metrics0), micro)
    scale = 1.0 / grad_accum
    grads = jax.tree.map(lambda g: g * scale, grads)
    summed = ("tokens", "expert_load")
    metrics = {k: (v if k in summed else v * scale) for k, v in metrics.items()}
    return (loss * scale, metrics), grads

  def train_step(params, opt_state, batch):
    if grad_accum > 1:
      (loss, metrics), grads = accumulated(params, batch)
    else:
      (loss, metrics), grads = grads_of(params, batch)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_params = jax.lax.with_sharding_constraint(
        new_params, rules.param_shardings(new_params, pmesh, model_lib.param_logical_axes(config)))
    metrics = dict(metrics, total_loss=loss, grad_norm=optax.global_norm(grads))
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & _all_finite(grads)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
      new_params, new_opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
      metrics["nonfinite"] = (~finite).astype(jnp.int32)
    return new_params, new_opt_state, metrics

  return train_step


def make_eval_step(config: ModelConfig, pmesh: Optional[ParallelMesh] = None, *,
                   loss_fn: Optional[TokenLoss] = None) -> Callable:
  """(params, batch) -> {"nll_sum": [], "tokens": [], extra sums of loss_fn}: summed cross-entropy (or
  `loss_fn`'s sums) over a batch's targets, on the mesh; not divided by tokens."""
  sums_fn = _global_sums(config, trivial_mesh() if pmesh is None else pmesh, loss_fn)

  def eval_step(params, batch):
    sums = sums_fn(params, batch)
    return {k: v for k, v in sums.items() if k not in ("aux_loss", "expert_load", "expert_load_max_over_mean")}

  return eval_step
