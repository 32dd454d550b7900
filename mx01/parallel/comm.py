"""Small wrappers over shard_map collectives that accept an empty axis tuple (a size-1 logical axis).

Logical axes map to tuples of physical mesh axes (mesh.py); a logical axis of
size 1 maps to (), where every collective is the identity and the index is 0.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

try:  # jax >= 0.4.36
  shard_map = jax.shard_map
except AttributeError:  # pragma: no cover
  from jax.experimental.shard_map import shard_map  # type: ignore


def axis_index(axes: Tuple[str, ...]):
  return jax.lax.axis_index(axes) if axes else jnp.int32(0)


def psum(x, axes: Tuple[str, ...]):
  return jax.lax.psum(x, axes) if axes else x


def all_gather(x, axes: Tuple[str, ...], *, axis: int = 0, tiled: bool = False):
  if not axes:
    return x if tiled else jnp.expand_dims(x, axis)
  return jax.lax.all_gather(x, axes, axis=axis, tiled=tiled)


def _find_all_gather_invariant():
  fn = getattr(jax.lax, "all_gather_invariant", None)
  if fn is None:
    try:
      from jax._src.lax.parallel import all_gather_invariant as fn  # jax 0.6 - 0.10
    except ImportError:  # pragma: no cover
      fn = None
  return fn


_ALL_GATHER_INVARIANT = _find_all_gather_invariant()


def all_gather_replicated(x, axes: Tuple[str, ...], *, axis: int = 0):
  """Tiled all-gather whose result is typed as replicated over `axes` (same value on every device).

  Autodiff: the gradient of each device's piece is its slice of the (summed)
  output gradient.  Falls back to a psum of zero-padded pieces on jax versions
  without an invariant all-gather (same values, twice the bytes).
  """
  if not axes:
    return x
  if _ALL_GATHER_INVARIANT is not None:
    return _ALL_GATHER_INVARIANT(x, axes, axis=axis, tiled=True)
  n = jax.lax.psum(1, axes)  # pragma: no cover
  padded = jnp.zeros(x.shape[:axis] + (n * x.shape[axis],) + x.shape[axis + 1:], x.dtype)  # pragma: no cover
  padded = jax.lax.dynamic_update_slice_in_dim(padded, x, jax.lax.axis_index(axes) * x.shape[axis], axis)  # pragma: no cover
  return jax.lax.psum(padded, axes)  # pragma: no cover


def vma_of(x) -> Tuple[str, ...]:
  """Mesh axes over which `x` varies inside shard_map (empty outside or without vma typing)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return tuple(sorted(manual.varying))
  return tuple(sorted(getattr(aval, "vma", ())))  # jax 0.7 - 0.9


def as_varying(x, axes: Sequence[str]):
  """Marks `x` as varying over `axes` (so scan carries and cond branches type-check)."""
  axes = tuple(a for a in axes if a not in vma_of(x))
  if not axes:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  return jax.lax.pvary(x, axes)  # pragma: no cover - older jax
