"""GPU kernels: the bottom layer of the code, importing only jax (never mx01).

  lightning/          lightning attention: forward, backward, decode, chunk states, config
  grouped_matmul.py   the MoE grouped matmul (jax's Hopper Mosaic GPU ragged-dot kernels)
  flash_attention.py  jax's Pallas flash attention, usable inside shard_map(check_vma=True)
  errors.py           ConfigError, the one error type for an invalid config value

Public entry points:
  lightning_attention(q, k, v, log_decay, *, segment_ids, initial_state, config, interpret)
  lightning_decode(q, k, v, log_decay, state, *, config, interpret)
  LightningConfig: tuning parameters (block sizes, warps, stages, value tile, splits)
"""

from pallas_kernels.errors import ConfigError
from pallas_kernels.lightning import DEFAULT_CONFIG, MAX_BLOCK_SIZE, LightningConfig, chunk_states
from pallas_kernels.lightning import lightning_attention, lightning_decode

__all__ = [
    "DEFAULT_CONFIG",
    "MAX_BLOCK_SIZE",
    "ConfigError",
    "LightningConfig",
    "chunk_states",
    "lightning_attention",
    "lightning_decode",
]
