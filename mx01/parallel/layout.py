"""Where each token lives: the zig-zag sequence layout shared by every sharded op.

With `sequence = S > 1` the sequence of every row is cut into 2S equal chunks
and device s (along the sequence axis) holds chunks s and 2S-1-s, in that
order.  Causal attention work per chunk grows with its position, so pairing
an early chunk with its mirror gives every device the same amount of work in
ring attention (the "zig-zag" scheme of Megatron context parallelism).  The
whole model uses this layout: the batch is permuted once before the sharded
step (token-wise layers don't care), LASP+ treats the two local chunks as two
links of the state chain, and the MoE orders tokens by their global position.
With S = 1 there is one chunk per row and no permutation.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
  seq_len: int  # global L
  sequence: int  # S, devices along the sequence axis

  @property
  def chunks_per_device(self) -> int:
    return 2 if self.sequence > 1 else 1

  @property
  def num_chunks(self) -> int:
    return self.sequence * self.chunks_per_device

  @property
  def chunk_len(self) -> int:
    return self.seq_len // self.num_chunks

  def chunk_ids(self) -> np.ndarray:
    """[S, chunks_per_device] global chunk index of each local chunk of each sequence rank."""
    s = np.arange(self.sequence)
    if self.sequence == 1:
      return np.zeros((1, 1), np.int32)
    return np.stack([s, 2 * self.sequence - 1 - s], axis=1).astype(np.int32)

  def permutation(self) -> np.ndarray:
    """[L] global position of each token in layout order (layout[i] = global[perm[i]])."""
    c = self.chunk_len
    return (self.chunk_ids().reshape(-1)[:, None] * c + np.arange(c)[None]).reshape(-1)

  def to_layout(self, x, axis: int = 1):
    """Global sequence order -> layout order along `axis` (a static gather)."""
    if self.sequence == 1:
      return x
    return jnp.take(x, jnp.asarray(self.permutation()), axis=axis)

  def from_layout(self, x, axis: int = 1):
    if self.sequence == 1:
      return x
    return jnp.take(x, jnp.asarray(np.argsort(self.permutation())), axis=axis)
