"""The MiniMax-Text-01 decoder stack and its functional interface.

    params = init(config, rng)
    logits, aux = apply(params, tokens, segment_ids=None, positions=None, config=config)

Each layer (post-norm with DeepNorm-style scaling, as the released model):

    h = RMSNorm(x);  x = h * alpha_attn + Attn(h) * beta_attn
    h = RMSNorm(x);  x = h * alpha_mlp  + MoE(h)  * beta_mlp

where Attn is lightning or softmax attention by `config.resolved_layer_types`.
The stack ends with a final RMSNorm and an untied LM head.  `aux` holds the
MoE load-balancing loss ("aux_loss"), the per-layer routing statistics
("routing_stats", stacked over MoE layers) and, with `return_state=True`, each
layer's recurrent state (lightning) or post-RoPE keys/values (softmax).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mx01.config import LIGHTNING, ModelConfig
from mx01.layers.feedforward import DenseMLP, MoEBlock
from mx01.layers.lightning_layer import LightningAttentionLayer
from mx01.layers.moe import load_balancing_loss
from mx01.layers.norms import RMSNorm
from mx01.layers.softmax_attention import SoftmaxAttentionLayer
from mx01.ops import ModelOps, default_ops


def positions_from_segments(segment_ids):
  """Per-token position within its segment: [batch, seq] -> [batch, seq] int32."""
  t = segment_ids.shape[1]
  idx = jnp.arange(t, dtype=jnp.int32)[None]
  start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  seg_start = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return idx - seg_start


class DecoderLayer(nn.Module):
  config: ModelConfig
  layer_idx: int
  ops: Any

  @nn.compact
  def __call__(self, x, segment_ids, positions, token_mask, initial_state):
    cfg = self.config
    kind = cfg.resolved_layer_types[self.layer_idx]
    pd = jnp.dtype(cfg.param_dtype)
    h = RMSNorm(cfg.rms_norm_eps, pd, name="input_norm")(x)
    if kind == LIGHTNING:
      attn_out, state = LightningAttentionLayer(cfg, self.layer_idx, self.ops, name="attn")(
          h, segment_ids=segment_ids, initial_state=initial_state)
      alpha, beta = cfg.lightning_alpha, cfg.lightning_beta
    else:
      attn_out, state = SoftmaxAttentionLayer(cfg, self.layer_idx, self.ops, name="attn")(
          h, positions=positions, segment_ids=segment_ids)
      alpha, beta = cfg.softmax_alpha, cfg.softmax_beta
    x = h * alpha + attn_out.astype(h.dtype) * beta
    h = RMSNorm(cfg.rms_norm_eps, pd, name="post_attn_norm")(x)
    if cfg.is_moe:
      ffn_out, stats = MoEBlock(cfg, self.ops, name="moe")(h, token_mask=token_mask)
    else:
      ffn_out, stats = DenseMLP(cfg, name="mlp")(h)
    x = h * cfg.mlp_alpha + ffn_out.astype(h.dtype) * cfg.mlp_beta
    return x, stats, state


_REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nn.Module):
  config: ModelConfig
  ops: Any = None

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, initial_states=None, return_state=False,
               return_hidden=False):
    """tokens [batch, seq] int -> logits [batch, seq, vocab] float32, aux dict.

    return_hidden=True returns the final-normed hidden states [batch, seq, hidden]
    instead of logits (the LM head is then `lm_head_matrix`, for a chunked loss).
    """
    cfg = self.config
    ops = self.ops or default_ops(cfg)
    cd, pd = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    if positions is None:
      positions = (positions_from_segments(segment_ids) if segment_ids is not None
                   else jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape))
    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(cfg.initializer_range),
                 param_dtype=pd, name="embed")(tokens).astype(cd)
    layer_cls = DecoderLayer
    if cfg.remat != "none":
      layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat])
    all_stats, states = [], []
    for i in range(cfg.num_layers):
      init_state = None if initial_states is None else initial_states[i]
      x, stats, state = layer_cls(cfg, i, ops, name=f"layers_{i}")(x, segment_ids, positions, None, init_state)
      if stats is not None:
        all_stats.append(stats)
      states.append(state)
    x = RMSNorm(cfg.rms_norm_eps, pd, name="final_norm")(x)
    if return_hidden:
      logits = x
    elif cfg.tie_word_embeddings:
      emb = self.variables["params"]["embed"]["embedding"]
      logits = jnp.dot(x, emb.astype(cd).T, preferred_element_type=jnp.float32)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cd, param_dtype=pd, name="lm_head",
                        kernel_init=nn.initializers.normal(cfg.initializer_range))(x)
    aux = {"aux_loss": jnp.zeros((), jnp.float32)}
    if all_stats:
      stacked = jax.tree.map(lambda *s: jnp.stack(s), *all_stats)
      aux["routing_stats"] = stacked
      aux["aux_loss"] = load_balancing_loss(stacked, cfg.aux_loss_reduction)
    if return_state:
      aux["states"] = states
    return (logits if return_hidden else logits.astype(jnp.float32)), aux


def init(config: ModelConfig, rng: jax.Array, *, seq_len: int = 8) -> dict:
  """Initial parameters (a plain pytree: {"embed": ..., "layers_0": ..., ...})."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return Decoder(config).init(rng, tokens)["params"]


def abstract_params(config: ModelConfig) -> dict:
  """Shapes and dtypes of the parameters, without allocating them."""
  return jax.eval_shape(lambda r: init(config, r), jax.random.key(0))


def apply(params: dict, tokens, segment_ids=None, positions=None, *, config: ModelConfig,
          ops: Optional[ModelOps] = None, initial_states=None, return_state: bool = False,
          return_hidden: bool = False):
  """Forward pass: tokens [batch, seq] -> (logits [batch, seq, vocab] float32, aux).

  return_hidden=True: (final-normed hidden [batch, seq, hidden] in compute dtype, aux).
  """
  return Decoder(config, ops).apply({"params": params}, tokens, segment_ids, positions, initial_states,
                                    return_state, return_hidden)


def lm_head_matrix(params: dict, config: ModelConfig):
  """The output projection [hidden, vocab] (the embedding, transposed, when tied)."""
  if config.tie_word_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]
