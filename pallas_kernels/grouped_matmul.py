"""Dropless MoE experts on Hopper GPUs with jax's Mosaic GPU ragged-dot kernels.

`jax.lax.ragged_dot` is the portable grouped matmul, but XLA's GPU lowering
of it runs far below dense-GEMM speed (BENCHMARKS.md, "MoE experts").  jax
ships Hopper kernels for the two grouped products a MoE needs
(jax.experimental.pallas.ops.gpu.ragged_dot_mgpu / transposed_ragged_dot_mgpu):

  ragged_dot(x [m, k], w [g, k, n])            y[rows of group i] = x[rows] @ w[i]
  transposed_ragged_dot(x [m, k], dy [m, n])   dw[i] = x[rows of i]^T @ dy[rows of i]

`grouped_matmul` wires them into a differentiable op (dx is a ragged_dot
against the transposed weights, read in place) with the signature of
`jax.lax.ragged_dot`; mx01/layers/moe.py's `experts_grouped_mosaic` runs the
MoE experts on it.  Hopper only (wgmma/TMA): there is no CPU or interpret
path, so the tests compare it with `jax.lax.ragged_dot` on the GPU
(tests/mx01/test_grouped_matmul_gpu.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GroupedMatmulTiling:
  """Tile sizes of the Mosaic GPU kernels (block_k must divide the contracted dims)."""
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 4
  grid_block_n: int = 1


DEFAULT_TILING = GroupedMatmulTiling()


def fits(*dims: int, tiling: GroupedMatmulTiling = DEFAULT_TILING) -> bool:
  """Whether the kernels take a MoE whose hidden and intermediate sizes are `dims`: each is contracted in one
  product (block_k must divide it) and produced by another (block_n must divide it)."""
  return all(d % tiling.block_k == 0 and d % tiling.block_n == 0 for d in dims)


_TILE_ARGS = ("block_m", "block_n", "block_k", "max_concurrent_steps", "grid_block_n")


@functools.lru_cache(maxsize=None)
def _kernels():
  if jax.default_backend() != "gpu":
    raise ValueError(f"moe_impl='ragged_mosaic' runs jax's Mosaic GPU kernels, which need a Hopper GPU "
                     f"(backend here: {jax.default_backend()!r}); use moe_impl='ragged', 'capacity' or 'dense'")
  # Imported on demand: the Mosaic GPU modules need a CUDA jaxlib.
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
  # Under jit, equal calls (every MoE layer has the same shapes) reuse one traced kernel, so a train step
  # lowers each kernel once rather than once per layer and pass.
  return (jax.jit(ragged_dot_mgpu.ragged_dot, static_argnames=_TILE_ARGS + ("transpose_rhs",)),
          jax.jit(transposed_ragged_dot_mgpu.transposed_ragged_dot, static_argnames=_TILE_ARGS))


def _tile_kwargs(t: GroupedMatmulTiling) -> dict:
  return dict(block_m=t.block_m, block_n=t.block_n, block_k=t.block_k, max_concurrent_steps=t.max_concurrent_steps,
              grid_block_n=t.grid_block_n)


_ROW_MULTIPLE = 8  # the kernels' TMA tiling needs the row count to be a multiple of 8


def _pad_rows(a):
  pad = -a.shape[0] % _ROW_MULTIPLE
  return jnp.pad(a, ((0, pad), (0, 0))) if pad else a  # padded rows belong to no group


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_matmul(x, w, group_sizes, tiling: GroupedMatmulTiling = DEFAULT_TILING):
  """x [m, k] (rows sorted by group), w [g, k, n], group_sizes [g] int32 summing to m -> [m, n] in x.dtype."""
  ragged_dot, _ = _kernels()
  if not fits(x.shape[1], w.shape[2], tiling=tiling):
    raise ValueError(f"moe_impl='ragged_mosaic' needs hidden and intermediate sizes (per device) that are "
                     f"multiples of {tiling.block_k} and {tiling.block_n} (its tiles), got {x.shape[1]} and "
                     f"{w.shape[2]}; use moe_impl='ragged' or 'capacity'")
  m = x.shape[0]
  return ragged_dot(_pad_rows(x), w.astype(x.dtype), group_sizes=group_sizes, **_tile_kwargs(tiling))[:m]


def _fwd(x, w, group_sizes, tiling):
  return grouped_matmul(x, w, group_sizes, tiling), (x, w, group_sizes)


def _bwd(tiling, res, dy):
  x, w, group_sizes = res
  ragged_dot, transposed_ragged_dot = _kernels()
  m = x.shape[0]
  xp, dyp = _pad_rows(x), _pad_rows(dy.astype(x.dtype))
  # dx = dy @ w[i]^T: w [g, k, n] read as [g, n_out=k, contract=n].
  dx = ragged_dot(dyp, w.astype(x.dtype), group_sizes=group_sizes, transpose_rhs=True, **_tile_kwargs(tiling))[:m]
  dw = transposed_ragged_dot(xp, dyp, group_sizes=group_sizes, **_tile_kwargs(tiling))  # [g, k, n]
  return dx, dw.astype(w.dtype), None


grouped_matmul.defvjp(_fwd, _bwd)
