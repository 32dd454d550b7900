"""Pallas GPU kernels for lightning attention (forward, backward, decode).

Public entry points:
  lightning_attention(q, k, v, log_decay, *, segment_ids, initial_state, block_size, config, interpret)
  lightning_decode(q, k, v, log_decay, state, *, config, interpret)
  LightningConfig: tuning parameters (block sizes, warps, stages, value tile, splits)
  chunk_transitions / combine_chunk_states / apply_incoming_states: the
    chunk-state combination reused by sequence-parallel code.
"""

from pallas_kernels.config import DEFAULT_CONFIG, LightningConfig
from pallas_kernels.lightning import lightning_attention
from pallas_kernels.lightning_decode import lightning_decode
from pallas_kernels.lightning_states import apply_incoming_states, chunk_transitions, combine_chunk_states

__all__ = [
    "DEFAULT_CONFIG",
    "LightningConfig",
    "apply_incoming_states",
    "chunk_transitions",
    "combine_chunk_states",
    "lightning_attention",
    "lightning_decode",
]
