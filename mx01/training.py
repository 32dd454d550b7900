"""Loss and a pure train step over an explicit parameter pytree.

Batches are packed rows: {"tokens": [batch, L + 1] int32, "segment_ids":
[batch, L + 1] int32}.  The model reads tokens[:, :-1] and predicts
tokens[:, 1:]; a target counts only when it continues the same segment, and
segment id 0 marks padding (never a target).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from mx01 import model as model_lib
from mx01.config import ModelConfig
from mx01.ops import ModelOps


def split_batch(batch):
  """Packed rows -> (inputs, targets, segment_ids, loss_mask), each [batch, L]."""
  tokens, seg = batch["tokens"], batch["segment_ids"]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  in_seg = seg[:, :-1]
  loss_mask = (seg[:, 1:] == in_seg) & (in_seg != 0)
  return inputs, targets, in_seg, loss_mask


def cross_entropy(logits, targets, mask):
  """Summed token cross-entropy and the token count.  logits [b, t, V] f32, targets/mask [b, t]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  return jnp.sum(nll * m), jnp.sum(m)


def loss_fn(params, batch, *, config: ModelConfig, ops: Optional[ModelOps] = None):
  """Mean next-token loss + router_aux_loss_coef * aux loss.  Returns (loss, metrics)."""
  inputs, targets, seg, mask = split_batch(batch)
  logits, aux = model_lib.apply(params, inputs, seg, config=config, ops=ops)
  nll_sum, count = cross_entropy(logits, targets, mask)
  ce = nll_sum / jnp.maximum(count, 1.0)
  loss = ce + config.router_aux_loss_coef * aux["aux_loss"]
  metrics = {"loss": ce, "aux_loss": aux["aux_loss"], "tokens": count}
  if "routing_stats" in aux:
    metrics["expert_load"] = jnp.sum(aux["routing_stats"]["tokens_per_expert"], axis=0)
  return loss, metrics


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation, ops: Optional[ModelOps] = None):
  """(params, opt_state, batch) -> (params, opt_state, metrics); pure, ready for jax.jit."""

  def train_step(params, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, config=config, ops=ops)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, total_loss=loss, grad_norm=optax.global_norm(grads))
    return params, opt_state, metrics

  return train_step
