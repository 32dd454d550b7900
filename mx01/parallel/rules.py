"""The sharding rules: one table from logical axis names to mesh axes.

Two steps, as MaxText does:

1. Each layer names the logical axes of its parameters where it creates them
   ("embed", "heads", "experts", ...; mx01/layers/param.py), and
   `mx01.model.param_logical_axes(config)` reads them back as a tree like the
   params.  The scanned period's parameters are stacked over the repeats: their
   leading dimension is "layers", never sharded.
2. `logical_to_mesh(parallel)` maps each logical name to *mesh* axes of the
   dense or expert view (see mesh.py); `fsdp=True` additionally shards the
   "embed" dimension over data (dense params) or expert_data (expert params).

`param_specs` / `param_shardings` / `gather_fsdp` take any tree that mirrors
the params, given their logical axes (`axes`): the params themselves, an
optimizer state (each leaf under a path that ends with a parameter's path, as
optax's mu / nu), or W8A16 params (a `QuantizedWeight`'s qvalue has its
kernel's axes, its per-output-channel scale the kernel's axes without the
contracted, second-to-last, one).

Tensor parallelism is Megatron-style: projections into heads / the MLP are
column-split over `tensor` (each device owns whole heads, and the fused
lightning q|k|v layout keeps a head's q, k, v together), the projections back
to hidden are row-split and followed by a psum.  Experts are split over
`expert` (whole experts) and their intermediate dimension over `expert_tensor`
(ETP), replicated over `expert_data` (EDP).  Inside `shard_map` the layers run
on these pieces with `local_shards(pmesh)` (`mx01.ops.LocalShards`): the same
table tells them how many ways each of their axes is split and over which mesh
axes to sum.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
from jax.sharding import NamedSharding, PartitionSpec

from mx01.config import ParallelConfig
from mx01.ops import LocalShards
from mx01.parallel.mesh import MeshError, ParallelMesh

# Logical dims that FSDP shards (and must gather inside the step), by the mesh axis they use.
FSDP_LOGICAL = {"embed": "data", "expert_embed": "expert_data"}


def logical_to_mesh(parallel: ParallelConfig) -> Dict[str, Tuple[str, ...]]:
  """Logical dimension name -> logical mesh axes (of mesh.py) it is sharded over."""
  return {
      "layers": (),
      "vocab": (),
      "norm": (),
      "embed": ("data",) if parallel.fsdp else (),
      "expert_embed": ("expert_data",) if parallel.fsdp else (),
      "heads": ("tensor",),
      "kv_heads": ("tensor",),
      "mlp": ("tensor",),
      "experts": ("expert",),
      "expert_mlp": ("expert_tensor",),
  }


def local_shards(pmesh: ParallelMesh) -> LocalShards:
  """The split of each device's computation: every logical axis the table shards, but FSDP's (gathered first)."""
  split = []
  for name, mesh_axes in logical_to_mesh(pmesh.parallel).items():
    if name not in FSDP_LOGICAL and pmesh.size(*mesh_axes) > 1:
      split.append((name, pmesh.axes(*mesh_axes), pmesh.size(*mesh_axes)))
  return LocalShards(tuple(split))


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def _table(axes) -> Dict[str, Tuple[Optional[str], ...]]:
  """{"layers_0/attn/q_proj/kernel": ("embed", "heads"), ...} from a logical-axes tree."""
  return {path_str(p): tuple(s) for p, s in jax.tree_util.tree_leaves_with_path(axes, is_leaf=_is_spec)}


def _leaf_axes(path: str, ndim: int, table) -> Tuple[Optional[str], ...]:
  """The logical axes of the leaf at `path`: the parameter whose path its path ends with."""
  parts = path.split("/")
  for start in range(len(parts)):
    key = "/".join(parts[start:])
    if key in table:
      names = table[key]
    elif parts[-1] == "qvalue" and "/".join(parts[start:-1]) in table:  # QuantizedWeight: as its kernel
      names = table["/".join(parts[start:-1])]
    elif parts[-1] == "scale" and "/".join(parts[start:-1]) in table:  # per output channel: no contracted axis
      kernel = table["/".join(parts[start:-1])]
      names = kernel[:-2] + kernel[-1:]
    else:
      continue
    if len(names) != ndim:
      raise MeshError(f"{path} has {ndim} dimensions but its parameter's logical axes are {names}")
    return names
  if ndim == 0:  # a scalar beside the params (an optimizer's step count)
    return ()
  raise MeshError(f"no parameter's path ends {path!r}: its logical axes are unknown; pass the logical axes of "
                  "the model it belongs to (mx01.model.param_logical_axes)")


def param_logical_axes(tree, axes) -> Any:
  """Pytree like `tree` (params, optimizer state, W8A16 params) of per-dimension logical names.

  axes: the parameters' logical axes, `mx01.model.param_logical_axes(config)`.
  """
  table = _table(axes)
  return jax.tree_util.tree_map_with_path(lambda p, x: _leaf_axes(path_str(p), len(x.shape), table), tree)


def param_specs(tree, pmesh: ParallelMesh, axes) -> Any:
  """Pytree of PartitionSpecs for `tree` (arrays or ShapeDtypeStructs); checks divisibility.

  axes: the parameters' logical axes, `mx01.model.param_logical_axes(config)`.
  """
  table, rules = _table(axes), logical_to_mesh(pmesh.parallel)

  def spec(path, x):
    name = path_str(path)
    dims = _leaf_axes(name, len(x.shape), table)
    mesh_dims = [rules[d] if d is not None else None for d in dims]
    for size, d, md in zip(x.shape, dims, mesh_dims):
      if md and size % pmesh.size(*md):
        raise MeshError(f"parameter {name} dimension {d!r} of size {size} is not divisible by "
                        f"{'*'.join(md)}={pmesh.size(*md)}; change the model size or the parallel layout")
    return pmesh.spec(*mesh_dims)

  return jax.tree_util.tree_map_with_path(spec, tree)


def param_shardings(tree, pmesh: ParallelMesh, axes) -> Any:
  return jax.tree.map(lambda s: NamedSharding(pmesh.mesh, s), param_specs(tree, pmesh, axes), is_leaf=_is_spec)


def gather_fsdp(params, pmesh: ParallelMesh, axes) -> Any:
  """Inside shard_map: all-gather the FSDP-sharded dimension of each parameter (identity without fsdp).

  Autodiff turns each all-gather into a reduce-scatter of the gradient.
  """
  if not pmesh.parallel.fsdp:
    return params
  table = _table(axes)

  def gather(path, x):
    dims = _leaf_axes(path_str(path), x.ndim, table)
    for axis, d in enumerate(dims):
      if d in FSDP_LOGICAL:
        mesh_axes = pmesh.axes(FSDP_LOGICAL[d])
        if mesh_axes:
          x = jax.lax.all_gather(x, mesh_axes, axis=axis, tiled=True)
    return x

  return jax.tree_util.tree_map_with_path(gather, params)


def batch_spec(pmesh: ParallelMesh) -> PartitionSpec:
  """[batch, seq] arrays: batch over data, sequence (in zig-zag layout order) over sequence."""
  return pmesh.spec("data", "sequence")
