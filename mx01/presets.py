"""Named configurations, as data: every size and layer pattern of the project.

`get_preset(name)` returns a validated `Config`; `list_presets()` lists them.

* `tiny`: trains on two CPU cores in minutes.
* `{kind}_{size}`, `{kind}_moe_{size}`: research presets at sizes that fit one GPU
  (`RESEARCH_SIZES`: 20m, 100m, 400m, 1b).
* `sweep_{kind}_{size}`, `sweep_{kind}_moe_{size}`: the scaling sweep's small
  models (`SWEEP_SIZES`: s1 ... s7; recipes/sweep.py).
* `isoflop_{kind}_{size}`: the IsoFLOP study's models (`ISOFLOP_SIZES`: i32 ... i768, every one 8
  layers deep, context 2048; scaling/isoflop.py).
* `retrieval_{kind}_{size}`: the associative-recall study's models
  (`RETRIEVAL_SIZES`: xs, s; recipes/retrieval.py).
* `hybrid_456b`: MiniMax-Text-01 as released.

`kind` is one of `KINDS`: softmax or lightning on every layer, or hybrid, the
paper's 7 lightning : 1 softmax pattern (`HYBRID_PATTERN`, `layer_types`).
"""

from __future__ import annotations


from mx01.config import LIGHTNING, SOFTMAX, Config, ConfigError, DataConfig, ModelConfig, ParallelConfig, TrainConfig
from pallas_kernels.lightning.config import LightningConfig

# MiniMax-Text-01's layer pattern: 7 lightning layers, then 1 softmax layer, repeated.
HYBRID_PATTERN = (LIGHTNING,) * 7 + (SOFTMAX,)
PATTERNS = {"softmax": (SOFTMAX,), "lightning": (LIGHTNING,), "hybrid": HYBRID_PATTERN}
KINDS = tuple(PATTERNS)

# name -> (hidden, layers, heads, kv_heads, head_dim, intermediate) of the research sizes.
RESEARCH_SIZES = {
    "20m": (256, 8, 4, 2, 64, 768),
    "100m": (768, 8, 12, 4, 64, 2048),
    "400m": (1024, 16, 16, 4, 64, 2816),
    "1b": (2048, 16, 16, 4, 128, 5632),
}

# name -> (hidden, layers, heads, kv_heads, head_dim, intermediate) of the scaling sweep (recipes/sweep.py).
SWEEP_SIZES = {
    "s1": (32, 2, 2, 1, 16, 96),
    "s2": (48, 2, 3, 1, 16, 128),
    "s3": (64, 4, 4, 2, 16, 176),
    "s4": (96, 4, 6, 2, 16, 256),
    "s5": (128, 6, 8, 2, 16, 352),
    "s6": (192, 8, 12, 4, 16, 512),
    "s7": (256, 8, 16, 4, 16, 704),
}

# name -> (hidden, layers, heads, head_dim) of the IsoFLOP study (scaling/isoflop.py): 8 layers each, so the
# hybrid has exactly one 7:1 period; width alone sets the size.  Multi-head attention (kv heads = heads) and a
# SwiGLU of 8/3 * hidden (rounded to 32) keep N close to the paper's 12 l d^2 (Table 1).
ISOFLOP_SIZES = {
    "i32": (32, 8, 2, 16),  # below the budgets' grids: only where a profile's minimum sits at its small end
    "i48": (48, 8, 3, 16),
    "i64": (64, 8, 2, 32),
    "i96": (96, 8, 3, 32),
    "i128": (128, 8, 2, 64),
    "i192": (192, 8, 3, 64),
    "i256": (256, 8, 4, 64),
    "i320": (320, 8, 5, 64),
    "i384": (384, 8, 6, 64),
    "i512": (512, 8, 8, 64),
    "i640": (640, 8, 10, 64),
    "i768": (768, 8, 12, 64),
}

# name -> (hidden, layers, heads, kv_heads, head_dim) of the associative-recall study (recipes/retrieval.py);
# a dense SwiGLU of 4 * hidden.
RETRIEVAL_SIZES = {
    "xs": (64, 2, 2, 1, 32),
    "s": (128, 4, 4, 2, 32),
}


def layer_types(kind: str, num_layers: int) -> tuple:
  """One layer kind per layer for an attention kind of `KINDS`.

  hybrid: `HYBRID_PATTERN` repeated (softmax at every 8th layer); a model
  shallower than one period keeps the pattern's end, so its last layer is the
  softmax one (2 layers: lightning, softmax; 4: 3 lightning, softmax).
  """
  if kind not in PATTERNS:
    raise ConfigError(f"unknown arch {kind!r}; choose from {', '.join(KINDS)}")
  pattern = PATTERNS[kind]
  if num_layers < len(pattern):
    return pattern[len(pattern) - num_layers:]
  return tuple(pattern[i % len(pattern)] for i in range(num_layers))


def _deepnorm_alpha(num_layers: int) -> float:
  # MiniMax-Text-01 uses alpha = (2 N)^(1/4) on every branch, beta = 1.
  return (2.0 * num_layers) ** 0.25


def _research(kind: str, size: str, moe: bool) -> Config:
  hidden, layers, heads, kv, hd, inter = RESEARCH_SIZES[size]
  model = ModelConfig(
      vocab_size=32768, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hd,
      layer_pattern=PATTERNS[kind], ffn_type="moe" if moe else "dense",
      # MoE: 8 experts of a quarter of the dense width, top-2 (activated FFN ~ half the dense one).
      intermediate_size=inter // 4 if moe else inter, num_experts=8 if moe else 1, num_experts_per_tok=2 if moe else 1,
      # Token drop at capacity 1.25, as MiniMax trains: the capacity path is the fast one (hybrid_moe_1b at 8k on
      # an H200: 35.5% MFU against 14.7% dropless on ragged_dot); generation routes every token whatever the factor.
      capacity_factor=1.25 if moe else None,
      block_size=256, rotary_dim=hd // 2, rope_theta=10_000.0,
      compute_dtype="bfloat16", param_dtype="float32",
      # Unrolled: at 16 layers the compile is short, and on an H200 the scanned hybrid_1b step at 8k
      # ran 20% slower with more memory than the unrolled one (BENCHMARKS.md, "One training path").
      scan_layers=False)
  return Config(model=model, data=DataConfig(seq_len=2048),
                train=TrainConfig(steps=2000, batch_size=16, learning_rate=1e-3, warmup_steps=100,
                                  run_dir=f"runs/{kind}{'_moe' if moe else ''}_{size}"))


def _small_block_tiles(block: int) -> LightningConfig:
  """Kernel tiles of a preset whose lightning block is small: the block itself forward, at most 64 backward."""
  return LightningConfig(block_size=min(block, 128), bwd_block_size=min(block, 64))


def _sweep(kind: str, size: str, moe: bool) -> Config:
  # Byte vocabulary, DeepNorm residual scaling; MoE: 4 experts of half the dense width, top-2 (the same
  # activated FFN size as dense).  The sweep sets the training budget of each grid point (recipes/sweep.py).
  hidden, layers, heads, kv, hd, inter = SWEEP_SIZES[size]
  alpha = _deepnorm_alpha(layers)
  model = ModelConfig(
      vocab_size=256, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hd,
      layer_types=layer_types(kind, layers), ffn_type="moe" if moe else "dense",
      intermediate_size=inter // 2 if moe else inter, num_experts=4 if moe else 1,
      num_experts_per_tok=2 if moe else 1, block_size=32, lightning_kernel=_small_block_tiles(32),
      rotary_dim=hd // 2, lightning_alpha=alpha, softmax_alpha=alpha, mlp_alpha=alpha)
  return Config(model=model, data=DataConfig(seq_len=128),
                train=TrainConfig(batch_size=8, learning_rate=3e-3,
                                  run_dir=f"runs/sweep/{kind}_{size}_{'moe' if moe else 'dense'}"))


def _isoflop(kind: str, size: str) -> Config:
  # Byte vocabulary, context 2048, lightning blocks of 256 (the paper's), DeepNorm residual scaling.  The
  # IsoFLOP plan sets steps, batch, learning rate, seed and data per point (scaling/isoflop.py).
  hidden, layers, heads, hd = ISOFLOP_SIZES[size]
  alpha = _deepnorm_alpha(layers)
  model = ModelConfig(
      vocab_size=256, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=hd,
      layer_types=layer_types(kind, layers), ffn_type="dense", intermediate_size=32 * round(hidden * 8 / 3 / 32),
      num_experts=1, num_experts_per_tok=1, block_size=256, rotary_dim=hd // 2,
      lightning_alpha=alpha, softmax_alpha=alpha, mlp_alpha=alpha, compute_dtype="bfloat16", param_dtype="float32")
  return Config(model=model, data=DataConfig(seq_len=2048),
                train=TrainConfig(batch_size=16, learning_rate=3e-3, run_dir=f"runs/isoflop/{kind}_{size}"))


def _retrieval(kind: str, size: str) -> Config:
  # Initial std 1/sqrt(hidden): the presets' usual 0.02 leaves models this small stuck without recall
  # for thousands of steps (measurements in recipes/retrieval.py, `default_init_std`).
  hidden, layers, heads, kv, hd = RETRIEVAL_SIZES[size]
  model = ModelConfig(
      vocab_size=64, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hd,
      layer_types=layer_types(kind, layers), ffn_type="dense", intermediate_size=4 * hidden, num_experts=1,
      num_experts_per_tok=1, block_size=64, lightning_kernel=_small_block_tiles(64), rotary_dim=hd,
      initializer_range=float(hidden) ** -0.5)
  return Config(model=model, data=DataConfig(seq_len=1024),
                train=TrainConfig(steps=15000, batch_size=64, learning_rate=1e-3, warmup_steps=750,
                                  run_dir=f"runs/retrieval/{kind}_{size}"))


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
      layer_pattern=HYBRID_PATTERN, ffn_type="moe", intermediate_size=9216, num_experts=32, num_experts_per_tok=2,
      capacity_factor=None, router_aux_loss_coef=0.001, block_size=256, rotary_dim=64, rope_theta=10_000_000.0,
      lightning_alpha=a, softmax_alpha=a, mlp_alpha=a, rms_norm_eps=1e-5, max_seq_len=10_240_000,
      compute_dtype="bfloat16", param_dtype="float32", remat="full",
      # The LM head and loss in chunks of 2048 tokens: full float32 logits over the 200k vocabulary would be
      # 49 GiB per device at this layout (8 rows x 8192 tokens), twice with their gradient.
      loss_chunk_size=2048)
  return Config(model=model, data=DataConfig(seq_len=8192),
                parallel=ParallelConfig(data=8, fsdp=True, tensor=8, expert=8, expert_tensor=1),
                train=TrainConfig(steps=100_000, batch_size=64, learning_rate=2e-4, warmup_steps=500,
                                  run_dir="runs/hybrid_456b"))


def _build() -> dict:
  presets = {"tiny": _tiny, "hybrid_456b": _hybrid_456b}
  for kind in KINDS:
    for size in RESEARCH_SIZES:
      presets[f"{kind}_{size}"] = (lambda k=kind, s=size: _research(k, s, moe=False))
      presets[f"{kind}_moe_{size}"] = (lambda k=kind, s=size: _research(k, s, moe=True))
    for size in SWEEP_SIZES:
      presets[sweep_name(kind, size, "dense")] = (lambda k=kind, s=size: _sweep(k, s, moe=False))
      presets[sweep_name(kind, size, "moe")] = (lambda k=kind, s=size: _sweep(k, s, moe=True))
    for size in ISOFLOP_SIZES:
      presets[isoflop_name(kind, size)] = (lambda k=kind, s=size: _isoflop(k, s))
    for size in RETRIEVAL_SIZES:
      presets[retrieval_name(kind, size)] = (lambda k=kind, s=size: _retrieval(k, s))
  return presets


def sweep_name(kind: str, size: str, ffn: str = "dense") -> str:
  """The preset of one sweep model, e.g. sweep_hybrid_s3 or sweep_hybrid_moe_s3."""
  return f"sweep_{kind}_{'moe_' if ffn == 'moe' else ''}{size}"


def isoflop_name(kind: str, size: str) -> str:
  """The preset of one IsoFLOP model, e.g. isoflop_hybrid_i256."""
  return f"isoflop_{kind}_{size}"


def retrieval_name(kind: str, size: str) -> str:
  """The preset of one associative-recall model, e.g. retrieval_hybrid_xs."""
  return f"retrieval_{kind}_{size}"


PRESETS = _build()


def get_preset(name: str) -> Config:
  if name not in PRESETS:
    import difflib
    close = difflib.get_close_matches(name, PRESETS, n=3)
    raise ConfigError(f"unknown preset {name!r}" + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
                      + f" (available: {describe_presets()})")
  return PRESETS[name]()


def list_presets() -> list[str]:
  return sorted(PRESETS)


def describe_presets() -> str:
  """Every preset, by family, in one line (for help texts and errors)."""
  kinds, sizes = "{" + ",".join(KINDS) + "}", lambda table: "{" + ",".join(table) + "}"
  return (f"tiny, hybrid_456b, {kinds}[_moe]_{sizes(RESEARCH_SIZES)}, sweep_{kinds}[_moe]_{sizes(SWEEP_SIZES)}, "
          f"isoflop_{kinds}_{sizes(ISOFLOP_SIZES)}, retrieval_{kinds}_{sizes(RETRIEVAL_SIZES)}")
