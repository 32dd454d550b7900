"""Weights and configs to and from the transformers `MiniMaxForCausalLM` layout.

    params = from_hf_state_dict(state_dict, config)      # torch tensors or numpy arrays
    state_dict = to_hf_state_dict(params, config)         # numpy arrays, transformers names
    params = load_safetensors("path/to/checkpoint_dir", config)
    save_safetensors(params, config, "out_dir")

Layout differences: transformers stores Linear weights as [out, in], we store
kernels as [in, out]; its experts are `gate_up_proj` [E, 2I, H] (gate rows
first) and `down_proj` [E, H, I]; ours are wi_gate/wi_up [E, H, I] and wo
[E, I, H].  The lightning layers' decay buffers (`slope_rate`, ...) are not
weights: they follow from the config, are checked on import and regenerated
on export.

RoPE: transformers' MiniMax rotates the whole head (it has no rotary_dim),
while the original release rotates the first 64 of 128 dims.  `config_from_hf`
takes an explicit `rotary_dim` attribute when the config has one (the original
release's config.json does) and the whole head otherwise.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from mx01.config import LIGHTNING, SOFTMAX, ModelConfig
from mx01.lightning import minimax_log_decay

_HF_KIND = {"linear_attention": LIGHTNING, "full_attention": SOFTMAX}
_OUR_KIND = {v: k for k, v in _HF_KIND.items()}
_DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


class ConversionError(ValueError):
  """A checkpoint that does not match the config (missing, extra or mis-shaped tensors)."""


def config_from_hf(hf) -> ModelConfig:
  """A transformers MiniMaxConfig (object or dict) -> ModelConfig."""
  get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, Mapping) else (lambda k, d=None: getattr(hf, k, d))
  heads = get("num_attention_heads")
  head_dim = get("head_dim") or get("hidden_size") // heads
  rope = get("rope_parameters") or {}
  theta = rope.get("rope_theta", get("rope_theta", 10_000.0))
  layer_types = get("layer_types") or get("attn_type_list")
  kinds = tuple(_HF_KIND[t] if isinstance(t, str) else (SOFTMAX if t == 1 else LIGHTNING) for t in layer_types)
  return ModelConfig(
      vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_layers=get("num_hidden_layers"),
      num_heads=heads, num_kv_heads=get("num_key_value_heads") or heads, head_dim=head_dim,
      layer_types=kinds, ffn_type="moe", intermediate_size=get("intermediate_size"),
      num_experts=get("num_local_experts"), num_experts_per_tok=get("num_experts_per_tok"),
      router_aux_loss_coef=get("router_aux_loss_coef", 0.001), aux_loss_reduction="pooled",
      block_size=get("block_size", 256), rotary_dim=get("rotary_dim"), rope_theta=float(theta),
      lightning_alpha=float(get("linear_attn_alpha_factor", get("layernorm_linear_attention_alpha", 1.0))),
      lightning_beta=float(get("linear_attn_beta_factor", get("layernorm_linear_attention_beta", 1.0))),
      softmax_alpha=float(get("full_attn_alpha_factor", get("layernorm_full_attention_alpha", 1.0))),
      softmax_beta=float(get("full_attn_beta_factor", get("layernorm_full_attention_beta", 1.0))),
      mlp_alpha=float(get("mlp_alpha_factor", get("layernorm_mlp_alpha", 1.0))),
      mlp_beta=float(get("mlp_beta_factor", get("layernorm_mlp_beta", 1.0))),
      rms_norm_eps=get("rms_norm_eps", 1e-5), initializer_range=get("initializer_range", 0.02),
      tie_word_embeddings=bool(get("tie_word_embeddings", False)))


def config_to_hf(config: ModelConfig) -> dict:
  """ModelConfig -> keyword arguments of transformers.MiniMaxConfig."""
  c = config
  if not c.is_moe:
    raise ConversionError("transformers' MiniMax has only MoE feed-forward layers; ffn_type='dense' has no equivalent")
  if c.resolved_rotary_dim != c.head_dim:
    raise ConversionError(
        f"transformers' MiniMax rotates the whole head, but rotary_dim={c.resolved_rotary_dim} < head_dim={c.head_dim}; "
        "set model.rotary_dim=None for an exact transformers equivalent")
  return dict(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
      head_dim=c.head_dim, hidden_act="silu", rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
      num_experts_per_tok=c.num_experts_per_tok, num_local_experts=c.num_experts,
      router_aux_loss_coef=c.router_aux_loss_coef, layer_types=[_OUR_KIND[k] for k in c.resolved_layer_types],
      block_size=c.block_size, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
      full_attn_alpha_factor=c.softmax_alpha, full_attn_beta_factor=c.softmax_beta,
      linear_attn_alpha_factor=c.lightning_alpha, linear_attn_beta_factor=c.lightning_beta,
      mlp_alpha_factor=c.mlp_alpha, mlp_beta_factor=c.mlp_beta, initializer_range=c.initializer_range)


def _to_numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):  # torch.Tensor (bf16 has no numpy dtype: go through float32)
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def _layer_map(config: ModelConfig, i: int):
  """(hf_name, our_path, to_ours, expected_hf_shape) for every tensor of layer i."""
  c = config
  d, h, kv, hd, e, inter = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.num_experts,
                            c.intermediate_size)
  p = f"model.layers.{i}."
  T = lambda w: w.T  # noqa: E731  [out, in] -> [in, out]
  rows = [
      (p + "input_layernorm.weight", ("input_norm", "scale"), None, (d,)),
      (p + "post_attention_layernorm.weight", ("post_attn_norm", "scale"), None, (d,)),
      (p + "mlp.gate.weight", ("moe", "router"), T, (e, d)),
      (p + "mlp.experts.down_proj", ("moe", "wo"), lambda w: w.transpose(0, 2, 1), (e, d, inter)),
  ]
  if c.resolved_layer_types[i] == LIGHTNING:
    rows += [
        (p + "self_attn.qkv_proj.weight", ("attn", "qkv_proj", "kernel"), T, (3 * h * hd, d)),
        (p + "self_attn.output_gate.weight", ("attn", "output_gate", "kernel"), T, (h * hd, d)),
        (p + "self_attn.out_proj.weight", ("attn", "out_proj", "kernel"), T, (d, h * hd)),
        (p + "self_attn.norm.weight", ("attn", "norm", "scale"), None, (h * hd,)),
    ]
  else:
    rows += [
        (p + "self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), T, (h * hd, d)),
        (p + "self_attn.k_proj.weight", ("attn", "k_proj", "kernel"), T, (kv * hd, d)),
        (p + "self_attn.v_proj.weight", ("attn", "v_proj", "kernel"), T, (kv * hd, d)),
        (p + "self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), T, (d, h * hd)),
    ]
  return rows


def _set(tree: dict, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: dict, path):
  for k in path:
    tree = tree[k]
  return tree


def _global_map(config: ModelConfig):
  c = config
  rows = [("model.embed_tokens.weight", ("embed", "embedding"), None, (c.vocab_size, c.hidden_size)),
          ("model.norm.weight", ("final_norm", "scale"), None, (c.hidden_size,))]
  if not c.tie_word_embeddings:
    rows.append(("lm_head.weight", ("lm_head", "kernel"), lambda w: w.T, (c.vocab_size, c.hidden_size)))
  return rows


def from_hf_state_dict(state_dict: Mapping, config: ModelConfig) -> dict:
  """transformers state dict -> mx01 params.  Raises ConversionError listing every problem."""
  problems, params, used, layers = [], {}, set(), []

  def take(name, shape):
    """The tensor `name` as numpy if present with `shape`; otherwise records the problem and returns None."""
    if name not in state_dict:
      problems.append(f"missing tensor {name} (expected shape {shape})")
      return None
    used.add(name)
    w = _to_numpy(state_dict[name])
    if tuple(w.shape) != shape:
      problems.append(f"{name}: shape {tuple(w.shape)} but the config needs {shape}")
      return None
    return w

  def take_all(rows, tree):
    for name, path, fn, shape in rows:
      w = take(name, shape)
      if w is not None:
        _set(tree, path, fn(w) if fn else w)

  for i in range(config.num_layers):
    layer = {}
    take_all(_layer_map(config, i), layer)
    # Experts: gate_up_proj [E, 2I, H] -> wi_gate, wi_up [E, H, I].
    inter = config.intermediate_size
    w = take(f"model.layers.{i}.mlp.experts.gate_up_proj", (config.num_experts, 2 * inter, config.hidden_size))
    if w is not None:
      _set(layer, ("moe", "wi_gate"), w[:, :inter].transpose(0, 2, 1))
      _set(layer, ("moe", "wi_up"), w[:, inter:].transpose(0, 2, 1))
    if config.resolved_layer_types[i] == LIGHTNING:
      name = f"model.layers.{i}.self_attn.slope_rate"
      for buf in _DECAY_BUFFERS:
        used.add(f"model.layers.{i}.self_attn.{buf}")
      if name in state_dict:
        got = -_to_numpy(state_dict[name]).reshape(-1).astype(np.float32)
        want = minimax_log_decay(config.num_heads, i, config.num_layers)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-7):
          problems.append(f"{name}: decay rates differ from the config's (num_heads={config.num_heads}, "
                          f"layer {i} of {config.num_layers}); is num_hidden_layers right?")
    layers.append(layer)
  take_all(_global_map(config), params)
  extra = sorted(set(state_dict) - used)
  if config.tie_word_embeddings and "lm_head.weight" in extra:
    extra.remove("lm_head.weight")  # transformers may store the tied head too
  problems += [f"unexpected tensor {k} (not part of this config; wrong num_layers or layer_types?)" for k in extra]
  if problems:
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    raise ConversionError(f"checkpoint does not match the config ({len(problems)} problems):\n  {shown}")
  import jax.numpy as jnp
  from mx01.model import params_from_layers
  params = params_from_layers(params, layers, config)
  target = jnp.dtype(config.param_dtype)
  return _map_tree(params, lambda a: jnp.asarray(np.ascontiguousarray(a), dtype=target))


def _map_tree(tree, fn):
  return {k: _map_tree(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _decay_buffers(config: ModelConfig, i: int) -> dict:
  """The transformers lightning layer's non-weight buffers, from the config."""
  slope = -minimax_log_decay(config.num_heads, i, config.num_layers).astype(np.float32)[:, None, None]
  r = np.arange(config.block_size, dtype=np.float32) + 1
  q_decay = np.exp(-slope * r[:, None])
  k_decay = np.exp(-slope * (config.block_size - r[:, None]))
  diff = (r[:, None] - r[None, :])[None, None]
  diag = slope * diff
  diag = np.exp(np.where(diag >= 0, -diag, -np.inf))
  return {"slope_rate": slope, "query_decay": q_decay, "key_decay": k_decay, "diagonal_decay": diag}


def to_hf_state_dict(params: dict, config: ModelConfig, *, include_buffers: bool = True) -> dict:
  """mx01 params -> transformers state dict of float32 numpy arrays."""
  from mx01.model import layer_params
  out = {}
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  for i, layer in enumerate(layer_params(params, config)):
    for name, path, fn, _ in _layer_map(config, i):
      w = f32(_get(layer, path))
      if fn is not None:
        w = w.transpose(0, 2, 1) if w.ndim == 3 else w.T
      out[name] = np.ascontiguousarray(w)
    gate_up = np.concatenate([f32(layer["moe"]["wi_gate"]), f32(layer["moe"]["wi_up"])], axis=2)
    out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.ascontiguousarray(gate_up.transpose(0, 2, 1))
    if include_buffers and config.resolved_layer_types[i] == LIGHTNING:
      for k, v in _decay_buffers(config, i).items():
        out[f"model.layers.{i}.self_attn.{k}"] = v
  for name, path, fn, _ in _global_map(config):
    w = f32(_get(params, path))
    out[name] = np.ascontiguousarray(fn(w) if fn else w)
  return out


def save_safetensors(params: dict, config: ModelConfig, out_dir: str) -> str:
  """Writes model.safetensors + config.json (transformers MiniMax layout) into out_dir."""
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "model.safetensors")
  save_file(to_hf_state_dict(params, config, include_buffers=False), path)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(dict(config_to_hf(config), model_type="minimax", architectures=["MiniMaxForCausalLM"]), f, indent=2)
  return path


def load_safetensors(path: str, config: ModelConfig | None = None):
  """Reads a file, a directory, or a sharded checkpoint (model.safetensors.index.json).

  Returns (params, config); the config is read from config.json beside the weights when not given.
  """
  from safetensors.numpy import load_file
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  if config is None:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
      raise ConversionError(f"no config given and no config.json in {folder}")
    with open(cfg_path) as f:
      config = config_from_hf(json.load(f))
  if os.path.isdir(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
      raise ConversionError(f"no .safetensors files in {path}")
    paths = [os.path.join(path, f) for f in files]
  else:
    paths = [path]
  state = {}
  for p in paths:
    state.update(load_file(p))
  return from_hf_state_dict(state, config), config
