"""Named configurations, as data.

`get_preset(name)` returns a validated `Config`; `PRESETS` lists them.  Research
presets come in three attention kinds (softmax, lightning, hybrid: 7 lightning
then 1 softmax) with dense or MoE feed-forward, at sizes that fit one GPU.
`hybrid_456b` is MiniMax-Text-01 as released.
"""

from __future__ import annotations

import dataclasses

from mx01.config import LIGHTNING, SOFTMAX, Config, ConfigError, DataConfig, ModelConfig, ParallelConfig, TrainConfig

_HYBRID = (LIGHTNING,) * 7 + (SOFTMAX,)
_PATTERNS = {"softmax": (SOFTMAX,), "lightning": (LIGHTNING,), "hybrid": _HYBRID}

# (hidden, layers, heads, kv_heads, head_dim, intermediate) of the research sizes.
_SIZES = {
    "20m": (256, 8, 4, 2, 64, 768),
    "100m": (768, 8, 12, 4, 64, 2048),
    "400m": (1024, 16, 16, 4, 64, 2816),
    "1b": (2048, 16, 16, 4, 128, 5632),
}


def _deepnorm_alpha(num_layers: int) -> float:
  # MiniMax-Text-01 uses alpha = (2 N)^(1/4) on every branch, beta = 1.
  return (2.0 * num_layers) ** 0.25


def _research(kind: str, size: str, moe: bool) -> Config:
  hidden, layers, heads, kv, hd, inter = _SIZES[size]
  model = ModelConfig(
      vocab_size=32768, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hd,
      layer_pattern=_PATTERNS[kind], ffn_type="moe" if moe else "dense",
      # MoE: 8 experts of a quarter of the dense width, top-2 (activated FFN ~ half the dense one).
      intermediate_size=inter // 4 if moe else inter, num_experts=8 if moe else 1, num_experts_per_tok=2 if moe else 1,
      block_size=256, rotary_dim=hd // 2, rope_theta=10_000.0,
      compute_dtype="bfloat16", param_dtype="float32")
  return Config(model=model, data=DataConfig(seq_len=2048),
                train=TrainConfig(steps=2000, batch_size=16, learning_rate=1e-3, warmup_steps=100,
                                  run_dir=f"runs/{kind}{'_moe' if moe else ''}_{size}"))


def _tiny() -> Config:
  # Trains on two CPU cores in minutes: byte tokens, 4 layers (3 lightning + 1 softmax), 4 experts.
  model = ModelConfig(
      vocab_size=256, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
      layer_pattern=(LIGHTNING, LIGHTNING, LIGHTNING, SOFTMAX), ffn_type="moe", intermediate_size=256,
      num_experts=4, num_experts_per_tok=2, block_size=64, rotary_dim=16,
      lightning_alpha=_deepnorm_alpha(4), softmax_alpha=_deepnorm_alpha(4), mlp_alpha=_deepnorm_alpha(4))
  return Config(model=model, data=DataConfig(seq_len=256),
                train=TrainConfig(steps=200, batch_size=16, learning_rate=3e-3, warmup_steps=20, run_dir="runs/tiny"))


def _hybrid_456b() -> Config:
  a = _deepnorm_alpha(80)  # 3.5565588200778455, as in the released config
  model = ModelConfig(
      vocab_size=200064, hidden_size=6144, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
      layer_pattern=_HYBRID, ffn_type="moe", intermediate_size=9216, num_experts=32, num_experts_per_tok=2,
      capacity_factor=None, router_aux_loss_coef=0.001, block_size=256, rotary_dim=64, rope_theta=10_000_000.0,
      lightning_alpha=a, softmax_alpha=a, mlp_alpha=a, rms_norm_eps=1e-5, max_seq_len=10_240_000,
      compute_dtype="bfloat16", param_dtype="float32", remat="full")
  return Config(model=model, data=DataConfig(seq_len=8192),
                parallel=ParallelConfig(data=8, fsdp=True, tensor=8, expert=8, expert_tensor=1),
                train=TrainConfig(steps=100_000, batch_size=64, learning_rate=2e-4, warmup_steps=500,
                                  run_dir="runs/hybrid_456b"))


def _build() -> dict:
  presets = {"tiny": _tiny, "hybrid_456b": _hybrid_456b}
  for kind in _PATTERNS:
    for size in _SIZES:
      presets[f"{kind}_{size}"] = (lambda k=kind, s=size: _research(k, s, moe=False))
      presets[f"{kind}_moe_{size}"] = (lambda k=kind, s=size: _research(k, s, moe=True))
  return presets


PRESETS = _build()


def get_preset(name: str) -> Config:
  if name not in PRESETS:
    import difflib
    close = difflib.get_close_matches(name, PRESETS, n=3)
    raise ConfigError(f"unknown preset {name!r}" + (f"; did you mean {close}?" if close else "")
                      + f" (available: {', '.join(sorted(PRESETS))})")
  return PRESETS[name]()


def list_presets() -> list[str]:
  return sorted(PRESETS)
