"""Tuning configuration of the lightning attention kernels.

`mx01.config.ModelConfig.lightning_kernel` holds one of these, so every value
here is reachable from the model config (`--config.model.lightning_kernel.block_size=64`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from pallas_kernels.errors import ConfigError

# Largest token block: the kernels keep a [block, block] float32 score tile on
# chip next to the Q/K/V tiles; at 256 that tile alone is 256 KiB, above the
# 227 KiB of shared memory (and the 256 KiB register file) one H100/H200 SM has.
MAX_BLOCK_SIZE = 128


def _is_pow2(x: int) -> bool:
  return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class LightningConfig:
  """Block sizes and launch parameters; validated on construction.

  Sizes are tokens (block_size*) or channels (block_k*, block_v*) and must be
  powers of two >= 16 (the Triton backend's rule for loaded tiles and dots).

  block_size:       tokens per sequence block of the forward sweep.
  block_v:          value-dim tile of the forward kernel (one program per tile).
  num_warps/stages: forward launch parameters.
  bwd_block_size:   tokens per block of the backward sweeps (None: block_size).
  bwd_block_k:      key-dim tile of the dQ kernel.
  bwd_block_v:      value-dim tile of the dK/dV kernel (dK is summed over tiles).
  bwd_num_warps/bwd_num_stages: backward launch parameters.
  bwd_split_dkdv:   the reverse sweep as a dV kernel and a dK kernel, each carrying half of the state
                    cotangent, instead of one dK/dV kernel (bwd.py); fewer registers a program, about 20%
                    more matmul work.
  decode_block_v:   value-dim tile of the decode kernel.
  decode_num_warps: decode launch parameter.
  num_splits:       super-chunks the sequence is cut into when batch*heads is
                    too small to fill the GPU (None: choose from the shape).

  Every value is used as given (block_size and bwd_block_size at most
  MAX_BLOCK_SIZE, bwd_block_size at most block_size); a sequence shorter than
  a block runs on a smaller block, which changes no result.  Each pipeline
  stage holds one block of every tile a kernel reads in shared memory (227 KiB
  per SM on Hopper): at head dim 128, block 128 takes at most 2 stages, and
  float32 inputs run on at most 2 stages whatever is asked (their tiles are
  twice as large).
  """
  # Defaults: the fastest at the issue rows of `benchmarks/lightning_attention.py --rows issue --tune` on an
  # H200, head dim 128, bf16 (BENCHMARKS.md, "per-shape sweep"): three pipeline stages beat two by 7-16% in
  # both passes at 15 of 16 rows; block 128, value tile 64, 4 warps and block 32 were slower at every row but one.
  block_size: int = 64
  block_v: int = 128
  num_warps: int = 8
  num_stages: int = 3
  bwd_block_size: Optional[int] = None
  bwd_block_k: int = 128
  bwd_block_v: int = 128
  bwd_num_warps: int = 8
  bwd_num_stages: int = 3
  bwd_split_dkdv: bool = False
  decode_block_v: int = 64
  decode_num_warps: int = 4
  num_splits: Optional[int] = None

  def __post_init__(self):
    for name in ("block_size", "block_v", "bwd_block_k", "bwd_block_v", "decode_block_v"):
      value = getattr(self, name)
      if not _is_pow2(value) or value < 16:
        raise ConfigError(f"LightningConfig.{name} must be a power of two >= 16, got {value!r}")
    if self.bwd_block_size is not None and (not _is_pow2(self.bwd_block_size) or self.bwd_block_size < 16):
      raise ConfigError(f"LightningConfig.bwd_block_size must be None or a power of two >= 16, "
                       f"got {self.bwd_block_size!r}")
    for name in ("block_size", "bwd_block_size"):
      value = getattr(self, name)
      if value is not None and value > MAX_BLOCK_SIZE:
        raise ConfigError(f"LightningConfig.{name}={value} exceeds {MAX_BLOCK_SIZE}: the kernels hold a "
                          f"[block, block] float32 tile on chip ({value * value * 4 // 1024} KiB, above one SM's "
                          f"shared memory); use {MAX_BLOCK_SIZE} or less, or the XLA form (lightning_impl='xla') "
                          "for larger blocks")
    if self.bwd_block_size is not None and self.bwd_block_size > self.block_size:
      raise ConfigError(f"LightningConfig.bwd_block_size={self.bwd_block_size} exceeds block_size={self.block_size} "
                        "(the backward sweeps walk the forward's rows, a multiple of its block); use at most "
                        "block_size, or None")
    for name in ("num_warps", "bwd_num_warps", "decode_num_warps"):
      value = getattr(self, name)
      if value not in (1, 2, 4, 8, 16):
        raise ConfigError(f"LightningConfig.{name} must be one of 1, 2, 4, 8, 16, got {value!r}")
    for name in ("num_stages", "bwd_num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or not 1 <= value <= 8:
        raise ConfigError(f"LightningConfig.{name} must be an int in [1, 8], got {value!r}")
    if not isinstance(self.bwd_split_dkdv, bool):
      raise ConfigError(f"LightningConfig.bwd_split_dkdv must be True or False, got {self.bwd_split_dkdv!r}")
    if self.num_splits is not None and (not isinstance(self.num_splits, int) or self.num_splits < 1):
      raise ConfigError(f"LightningConfig.num_splits must be None or an int >= 1, got {self.num_splits!r}")

  @property
  def backward_block_size(self) -> int:
    return self.block_size if self.bwd_block_size is None else self.bwd_block_size


DEFAULT_CONFIG = LightningConfig()
