"""Small helpers shared by the lightning kernels (version shims, dots, decay tables, row layout)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

# Width of the per-head decay row handed to kernels: a power of two so the
# Triton backend can load it; every entry holds the same log decay.
DECAY_LANES = 16

# Block dimension that is indexed by the grid and squeezed out of the kernel view.
SQUEEZED = getattr(pl, "squeezed", None)


def compiler_params(num_warps: int, num_stages: int):
  """Triton compiler params under whichever name this jax version uses."""
  cls = getattr(pl_triton, "CompilerParams", None) or getattr(pl_triton, "TritonCompilerParams", None)
  if cls is None:
    return dict(triton=dict(num_warps=num_warps, num_stages=num_stages))
  return cls(num_warps=num_warps, num_stages=num_stages)


class Rows(NamedTuple):
  """How the sweep kernels walk a [b, t, h, d] array: each sequence as `splits` rows of `length` tokens.

  One program per row walks it block by block (grid axis 0 = b * splits rows; row r is sequence r // splits,
  tokens (r % splits) * length onwards).  `length` is a multiple of the block; rows past the sequence's
  `seq_len` real tokens overhang the array's end, and there (`masked`) the kernels mask their loads and
  stores instead of the caller padding q, k, v and slicing o (XLA copies of every tensor).
  """
  seq_len: int
  length: int
  splits: int = 1

  @property
  def masked(self) -> bool:
    return self.splits * self.length != self.seq_len

  def spec(self, width: int, tiled: bool = False) -> pl.BlockSpec:
    """The BlockSpec of a [b, t, h, d] array on a (row, head, tile) grid: a row's tokens, one head, `width`
    channels (the grid's third index picks the channel tile when `tiled`)."""
    s = self.splits
    return pl.BlockSpec((SQUEEZED, self.length, SQUEEZED, width),
                        lambda r, h, x: (r // s, r % s, h, x if tiled else 0))


def row_tokens(rows: Rows):
  """Inside a kernel: the real tokens of this program's row (0 .. rows.length; static when not masked)."""
  if not rows.masked:
    return rows.length
  return jnp.clip(rows.seq_len - (pl.program_id(0) % rows.splits) * rows.length, 0, rows.length)


def row_blocks(rows: Rows, tokens, block: int):
  """Blocks of a row holding real tokens (a loop bound; static when not masked)."""
  return rows.length // block if not rows.masked else (tokens + block - 1) // block


def _row_mask(start, block: int, tokens):
  return ((start + jax.lax.iota(jnp.int32, block)) < tokens)[:, None]


def load_block(ref, start, block: int, rows: Rows, tokens):
  """ref[start:start + block, :] of a row view; rows past its real tokens read as 0 when the row may overhang."""
  view = ref.at[pl.ds(pl.multiple_of(start, block), block), :]
  if not rows.masked:
    return view[...]
  return pl_triton.load(view, mask=_row_mask(start, block, tokens), other=0)


def store_block(ref, start, block: int, value, rows: Rows, tokens):
  """ref[start:start + block, :] = value, the rows past the real tokens left alone when the row may overhang."""
  view = ref.at[pl.ds(pl.multiple_of(start, block), block), :]
  if not rows.masked:
    view[...] = value
  else:
    pl_triton.store(view, value, mask=_row_mask(start, block, tokens))


def check_backend(interpret: bool):
  if not interpret and jax.default_backend() != "gpu":
    raise ValueError(f"the lightning Pallas kernels compile for GPU only (backend is {jax.default_backend()!r}); "
                     "pass interpret=True to run them elsewhere")


def decay_rows(log_decay: jax.Array) -> jax.Array:
  """[heads] -> [heads, DECAY_LANES] float32 (the row a kernel reads its head's decay from)."""
  return jnp.broadcast_to(log_decay.astype(jnp.float32)[:, None], (log_decay.shape[0], DECAY_LANES))


def read_log_decay(ref) -> jax.Array:
  """Scalar log decay from a [DECAY_LANES] row ref (all lanes equal)."""
  return jnp.max(ref[...])


def dot(a, b, *, trans_a=False, trans_b=False):
  """2-D matmul with float32 accumulation: op(a) @ op(b)."""
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  # float32 operands: ask for full precision (IEEE), not the TF32 default some versions pick.
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def positions(n: int) -> jax.Array:
  return jax.lax.iota(jnp.int32, n).astype(jnp.float32)


def intra_decay(log_decay, block: int) -> jax.Array:
  """[block, block] float32: lambda^(i-j) for j <= i, else 0."""
  pos = positions(block)
  diff = pos[:, None] - pos[None, :]
  causal = diff >= 0
  return jnp.where(causal, jnp.exp(log_decay * jnp.where(causal, diff, 0.0)), 0.0)


def segment_starts(segment_index: jax.Array, block: int) -> jax.Array:
  """[rows, length] segment ids (a new segment wherever the id changes) -> [rows, length] int32: where each
  token's segment starts, as an offset in the token's block of `block` tokens, or -1 when the segment comes
  in from before the block.  `length` is a multiple of `block`.

  A row's first segment always counts as coming in (it owns the row's incoming state).  Segments are
  contiguous, so for tokens i >= j of one block "same segment" is just  j >= starts[i]: the kernels mask with
  this one column of offsets instead of comparing segment ids in two layouts, and read the block's last
  segment start as one scalar (its last real token's entry) instead of reducing over the block.
  """
  rows, length = segment_index.shape
  assert length % block == 0, (length, block)
  change = jnp.concatenate(
      [jnp.zeros((rows, 1), bool), segment_index[:, 1:] != segment_index[:, :-1]], axis=1)
  # The latest start at or before each token within its own block: a running max over `block` tokens only
  # (a scan over the whole row would be as long as the row).
  offsets = jax.lax.broadcasted_iota(jnp.int32, (rows, length // block, block), 2)
  starts = jnp.where(change.reshape(rows, length // block, block), offsets, -1)
  return jax.lax.cummax(starts, axis=2).reshape(rows, length).astype(jnp.int32)


def block_masks(log_decay, decay_ij, starts_ref, block: int, tokens, start):
  """Decay factors and the intra-block mask of the block at `start` of a row with `tokens` real tokens.

  starts_ref: the row's `segment_starts` (None without segments); decay_ij: `intra_decay` (or None where the
  caller needs no intra-block product).
  Returns (q_decay [C], k_decay [C], state_decay scalar, decay [C, C] or None): q_decay_p = lambda^(p+1) on
  tokens that continue the incoming state, k_decay_s = lambda^(valid-1-s) on real tokens of the block's last
  segment, state_decay = lambda^valid (0 if a segment starts in the block), decay = decay_ij zeroed between
  tokens of different segments.
  """
  pos = positions(block)
  valid = jnp.minimum(block, tokens - start)
  valid_f = jnp.asarray(valid, jnp.float32)
  k_exp = valid_f - 1.0 - pos
  k_decay = jnp.where(k_exp >= 0, jnp.exp(log_decay * jnp.maximum(k_exp, 0.0)), 0.0)
  q_decay = jnp.exp(log_decay * (pos + 1.0))
  state_decay = jnp.exp(log_decay * valid_f)
  if starts_ref is None:
    return q_decay, k_decay, state_decay, decay_ij
  starts = starts_ref[pl.ds(pl.multiple_of(start, block), block)]  # [C]
  last_start = starts_ref[start + valid - 1]  # start of the block's last segment (-1: it came in)
  q_decay = jnp.where(starts < 0, q_decay, 0.0)
  k_decay = jnp.where(pos >= last_start.astype(jnp.float32), k_decay, 0.0)
  state_decay = jnp.where(last_start < 0, state_decay, 0.0)
  if decay_ij is not None:
    decay_ij = jnp.where(jax.lax.iota(jnp.int32, block)[None, :] >= starts[:, None], decay_ij, 0.0)
  return q_decay, k_decay, state_decay, decay_ij


def _varying_axes(x) -> frozenset:
  manual = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(manual.varying) if manual is not None else frozenset()


def match_varying(args):
  """Inside `shard_map(check_vma=True)`: marks every input as varying over the union of the
  inputs' mesh axes and returns (args, manual_axis_type for the outputs); with no varying
  input (outside shard_map too) the outputs get the inputs' unvarying type.

  A pallas_call's output shapes must state how they vary across the mesh; our kernels'
  outputs vary exactly as their inputs together do.
  """
  axes = frozenset().union(*(_varying_axes(a) for a in args))
  if not axes:
    # Unvarying inputs (outside shard_map, or replicated inside it): outputs take the same, unvarying,
    # type; shard_map(check_vma=True) needs it stated even then (e.g. on a mesh of one device).
    return list(args), getattr(jax.typeof(args[0]), "manual_axis_type", None)
  cast = getattr(jax.lax, "pcast", None)
  out = []
  for a in args:
    missing = tuple(sorted(axes - _varying_axes(a)))
    if missing:
      a = cast(a, missing, to="varying") if cast is not None else jax.lax.pvary(a, missing)
    out.append(a)
  return out, jax.typeof(out[0]).manual_axis_type


def out_struct(shape, dtype, manual_axis_type=None):
  """jax.ShapeDtypeStruct carrying the mesh-varying type from `match_varying` when there is one."""
  if manual_axis_type is None:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual_axis_type)
