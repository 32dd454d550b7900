"""The FLOP model of mx01: parameters, FLOPs per token, 6ND, MFU.

This is the one place in the repository that turns a `ModelConfig` into FLOPs.
Everything else (MFU logging, the scaling sweep, the notebooks) calls it.

Conventions (all counts are per token, in FLOP/token, unless a name says otherwise)
----------------------------------------------------------------------------------
* A matmul of [m, k] x [k, n] costs 2*m*k*n FLOPs (one multiply and one add per
  multiply-accumulate).  Only matmuls are counted: RMSNorm, RoPE, softmax
  exponentials, the SwiGLU product, sigmoid gates, decay masks and residual adds
  are elementwise, O(hidden) per token, and left out (they are a few percent of
  the total at small width and vanish at scale; XLA's `cost_analysis` does count
  them, see tests/scaling/test_flops.py).
* The input embedding is a gather: 0 FLOPs.  The LM head is a matmul,
  2 * hidden * vocab per token (whether or not it is tied to the embedding).
* MoE: the router (hidden -> num_experts) plus the `num_experts_per_tok`
  activated SwiGLU experts, 3 matmuls of hidden x intermediate each.  Dropped
  tokens (finite `capacity_factor`) are still counted as computed.
* Attention over a context of `seq_len` tokens, two modes:
    - "causal": the useful work of causal attention.  Query i attends to keys
      0..i, so a sequence has T(T+1)/2 (query, key) pairs per head: on average
      (T+1)/2 keys per token.  This is what a causal kernel that skips masked
      tiles does (up to tile granularity) and what MFU is reported with.
    - "masked": what a dense masked implementation executes: the full T x T
      score matrix per head (T keys per token), and for lightning attention
      the full block_size x block_size intra-block product of every block,
      padded tail block included.  This is what the XLA code paths run and
      what `cost_analysis` reports.
* Softmax (GQA) attention: QK^T and PV each cost 2 * head_dim FLOPs per
  (query, key) pair per query head; GQA shares K/V but not this work.
* Lightning attention (block-wise, Lightning Attention-2), per head, with
  c = min(block_size, T) and n = ceil(T / c) blocks:
    - intra-block (QK^T * decay) V: 2 * 2 * head_dim per (query, key) pair
      inside a block (pairs as in the attention mode above);
    - inter-block Q S: 2 * head_dim^2 per token (state is head_dim x head_dim);
    - state update K~^T V: 2 * head_dim^2 per token (each block folds its c
      keys/values into the state once).
  So lightning costs 4*c*head_dim + 4*head_dim^2 per token per head ("masked"),
  linear in context length, versus 4*T*head_dim for softmax.
* Training = 3 x forward: the backward pass of every matmul computes two
  matmuls of the same size (gradient w.r.t. each operand).  Recomputation
  (remat) is not counted: these are model FLOPs, not hardware FLOPs.
* 6ND: 6 FLOPs per parameter per token, with N the parameters a token
  touches through matmuls (active non-embedding parameters + LM head).  The
  exact count differs from 6N by the attention terms only.
* The MiniMax-01 paper's convention (section 2.2, Table 1),
  `paper_training_flops`: N = 12 l d^2 and, for b sequences of n tokens,
  softmax 72 b n l d^2 (1 + n/(6d) + 5/(18d)), lightning
  72 b n l d^2 (1 + 1/(2n) + 5/(18d)), hybrid 7:1
  72 b n l d^2 (1 + n/(48d) + 7/(16n) + 5/(18d)).  The hybrid row is the 1:7
  mix of the other two, which `paper_training_flops_per_token` generalises to
  any share of softmax layers.  It counts full (non-causal) softmax attention
  and no LM head, so at our small sizes and 2048-token context it puts softmax
  runs at more compute than our causal count does (tests/scaling/test_flops.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

from mx01.config import LIGHTNING, SOFTMAX, ModelConfig
from mx01.params import ParamCount, attention_params, param_count  # noqa: F401

AttentionMode = Literal["causal", "masked"]
_MODES = ("causal", "masked")

# Dense bf16 peak FLOP/s per device (no structured sparsity), from the vendor datasheets.
PEAK_FLOPS_BF16 = {
    "H100 SXM": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H200": 989.4e12,  # same compute die as H100 SXM, more/faster memory
    "A100": 312.0e12,
    "cpu": None,  # no meaningful peak; MFU is not reported on CPU
}


# ---- parameters ----------------------------------------------------------------

# `ParamCount` / `param_count` live in mx01/params.py, the one parameter counter; re-exported here.


# ---- FLOPs -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FlopBreakdown:
  """Forward FLOPs per token, averaged over a sequence, by component (units: FLOP/token)."""

  attention_projections: float  # q/k/v/o, lightning qkv/gate/out
  softmax_attention: float  # QK^T and PV of the softmax layers
  lightning_intra: float  # (QK^T * decay) V inside blocks
  lightning_inter: float  # Q S (inter-block) + K~^T V (state update)
  router: float
  ffn: float  # activated experts or the dense MLP
  lm_head: float
  embedding: float = 0.0  # a gather

  @property
  def attention_mixing(self) -> float:
    """The context-length-dependent part: token mixing in all attention layers."""
    return self.softmax_attention + self.lightning_intra + self.lightning_inter

  @property
  def total(self) -> float:
    return (self.attention_projections + self.attention_mixing + self.router + self.ffn + self.lm_head +
            self.embedding)

  def scaled(self, factor: float) -> "FlopBreakdown":
    return FlopBreakdown(**{f.name: getattr(self, f.name) * factor for f in dataclasses.fields(self)})


def _check_args(seq_len: int, mode: str) -> None:
  if not (isinstance(seq_len, int) and seq_len > 0):
    raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
  if mode not in _MODES:
    raise ValueError(f"attention mode must be one of {_MODES}, got {mode!r}")


def softmax_pairs_per_token(seq_len: int, mode: AttentionMode = "causal") -> float:
  """Average number of keys a query is scored against in one sequence of `seq_len` tokens."""
  _check_args(seq_len, mode)
  return (seq_len + 1) / 2 if mode == "causal" else float(seq_len)


def lightning_pairs_per_token(seq_len: int, block_size: int, mode: AttentionMode = "causal") -> float:
  """Average (query, key) pairs per token of the intra-block product.

  "causal": sum over blocks of v(v+1)/2 for v real tokens in the block, over T.
  "masked": n * c^2 / T (full blocks, padded tail block included).
  """
  _check_args(seq_len, mode)
  c = min(block_size, seq_len)
  n = -(-seq_len // c)
  if mode == "masked":
    return n * c * c / seq_len
  full, tail = divmod(seq_len, c)
  return (full * c * (c + 1) / 2 + tail * (tail + 1) / 2) / seq_len


def lightning_state_tokens_per_token(seq_len: int, block_size: int, mode: AttentionMode = "causal") -> float:
  """Token slots the inter-block and state-update matmuls touch, per real token (1, or more with padding)."""
  _check_args(seq_len, mode)
  if mode == "causal":
    return 1.0
  c = min(block_size, seq_len)
  return (-(-seq_len // c)) * c / seq_len


def forward_flops_breakdown(config: ModelConfig, seq_len: int,
                            mode: AttentionMode = "causal") -> FlopBreakdown:
  """Forward FLOPs per token for training/prefill on sequences of `seq_len` tokens."""
  _check_args(seq_len, mode)
  h, heads, d = config.hidden_size, config.num_heads, config.head_dim
  types = config.resolved_layer_types
  n_lightning = sum(kind == LIGHTNING for kind in types)
  n_softmax = sum(kind == SOFTMAX for kind in types)
  projections = 2.0 * sum(attention_params(config, kind) for kind in types)
  softmax = n_softmax * heads * 4.0 * d * softmax_pairs_per_token(seq_len, mode)
  intra = n_lightning * heads * 4.0 * d * lightning_pairs_per_token(seq_len, config.block_size, mode)
  inter = n_lightning * heads * 4.0 * d * d * lightning_state_tokens_per_token(seq_len, config.block_size, mode)
  expert = 2.0 * 3 * h * config.intermediate_size
  if config.is_moe:
    router = config.num_layers * 2.0 * h * config.num_experts
    ffn = config.num_layers * config.num_experts_per_tok * expert
  else:
    router, ffn = 0.0, config.num_layers * expert
  return FlopBreakdown(attention_projections=projections, softmax_attention=softmax, lightning_intra=intra,
                       lightning_inter=inter, router=router, ffn=ffn, lm_head=2.0 * h * config.vocab_size)


def forward_flops_per_token(config: ModelConfig, seq_len: int, mode: AttentionMode = "causal") -> float:
  """Forward FLOPs per token (FLOP/token), averaged over a sequence of `seq_len` tokens."""
  return forward_flops_breakdown(config, seq_len, mode).total


def training_flops_per_token(config: ModelConfig, seq_len: int, mode: AttentionMode = "causal") -> float:
  """Training FLOPs per token = 3 x forward (forward + backward w.r.t. both operands of every matmul)."""
  return 3.0 * forward_flops_per_token(config, seq_len, mode)


def training_flops(config: ModelConfig, seq_len: int, tokens: float, mode: AttentionMode = "causal") -> float:
  """Total training compute C (FLOPs) for `tokens` tokens in sequences of `seq_len`."""
  if not tokens > 0:
    raise ValueError(f"tokens must be positive, got {tokens!r}")
  return training_flops_per_token(config, seq_len, mode) * float(tokens)


def decode_flops_breakdown(config: ModelConfig, context_len: int) -> FlopBreakdown:
  """Forward FLOPs of generating one token with `context_len` tokens in context (the new one included).

  Softmax layers score the new query against `context_len` cached keys
  (4 * head_dim * context_len per head); lightning layers do one state update
  and one Q S product (4 * head_dim^2 per head), independent of context length.
  """
  _check_args(context_len, "causal")
  base = forward_flops_breakdown(config, 1, "causal")
  heads, d = config.num_heads, config.head_dim
  types = config.resolved_layer_types
  n_softmax = sum(kind == SOFTMAX for kind in types)
  n_lightning = len(types) - n_softmax
  return dataclasses.replace(base, softmax_attention=n_softmax * heads * 4.0 * d * context_len,
                             lightning_intra=0.0, lightning_inter=n_lightning * heads * 4.0 * d * d)


def inference_flops_per_token(config: ModelConfig, context_len: int) -> float:
  """Forward FLOPs (FLOP/token) of decoding one token at context length `context_len`."""
  return decode_flops_breakdown(config, context_len).total


def prefill_flops(config: ModelConfig, prompt_len: int, mode: AttentionMode = "causal") -> float:
  """Forward FLOPs (total) of a prompt of `prompt_len` tokens processed in one pass."""
  return forward_flops_per_token(config, prompt_len, mode) * prompt_len


def six_nd_flops_per_token(config: ModelConfig) -> float:
  """The 6N approximation per token, N = `param_count(config).matmul_active` (LM head included)."""
  return 6.0 * param_count(config).matmul_active


def paper_training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token in the MiniMax-01 paper's convention (Table 1), for any layer mix.

  72 l d^2 (1 + s n/(6d) + (1 - s)/(2n) + 5/(18d)) with l layers, d = hidden size, n = seq_len and s the
  share of softmax layers (1: softmax, 0: lightning, 1/8: the 7:1 hybrid).  Head layout, FFN width, vocabulary
  and MoE are not in the formula: it assumes N = 12 l d^2.
  """
  _check_args(seq_len, "causal")
  types = config.resolved_layer_types
  share = sum(kind == SOFTMAX for kind in types) / len(types)
  l, d, n = config.num_layers, config.hidden_size, seq_len
  return 72.0 * l * d * d * (1.0 + share * n / (6.0 * d) + (1.0 - share) / (2.0 * n) + 5.0 / (18.0 * d))


def paper_training_flops(config: ModelConfig, seq_len: int, tokens: float) -> float:
  """Total training compute (FLOPs) of `tokens` tokens in the paper's Table-1 convention."""
  if not tokens > 0:
    raise ValueError(f"tokens must be positive, got {tokens!r}")
  return paper_training_flops_per_token(config, seq_len) * float(tokens)


def paper_param_count(config: ModelConfig) -> int:
  """The paper's N = 12 l d^2 (Table 1)."""
  return 12 * config.num_layers * config.hidden_size ** 2


# ---- MFU -------------------------------------------------------------------------

def peak_flops_for_device_kind(device_kind: str) -> Optional[float]:
  """Dense bf16 peak FLOP/s of one device from a `jax.Device.device_kind` string, or None if unknown/CPU."""
  kind = device_kind.lower()
  if "h200" in kind:
    return PEAK_FLOPS_BF16["H200"]
  if "h100" in kind:
    return PEAK_FLOPS_BF16["H100 PCIe" if "pcie" in kind else "H100 SXM"]
  if "a100" in kind:
    return PEAK_FLOPS_BF16["A100"]
  return None


def detect_peak_flops() -> Optional[float]:
  """Peak FLOP/s of `jax.devices()[0]` (one device), or None on CPU / unknown accelerators."""
  import jax
  return peak_flops_for_device_kind(jax.devices()[0].device_kind)


def mfu(tokens_per_sec: float, config: ModelConfig, seq_len: int, peak_flops: Optional[float],
        mode: AttentionMode = "causal") -> Optional[float]:
  """Model FLOPs utilisation: achieved training FLOP/s over `peak_flops`.

  tokens_per_sec and peak_flops must describe the same devices: either one
  device's throughput and peak, or the whole job's throughput and
  peak * num_devices.  Returns None when peak_flops is None (CPU).
  """
  if peak_flops is None:
    return None
  if not (peak_flops > 0 and math.isfinite(peak_flops)):
    raise ValueError(f"peak_flops must be positive and finite, got {peak_flops!r}")
  if not (tokens_per_sec >= 0 and math.isfinite(tokens_per_sec)):
    raise ValueError(f"tokens_per_sec must be non-negative and finite, got {tokens_per_sec!r}")
  return tokens_per_sec * training_flops_per_token(config, seq_len, mode) / peak_flops
