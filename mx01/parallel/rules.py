"""The sharding rules: one table from parameter paths to logical axes, one from logical to mesh axes.

Two steps, as MaxText does:

1. `PARAM_RULES` maps a parameter path (regex over "layers_3/attn/q_proj/kernel")
   to one *logical* name per array dimension ("embed", "heads", "experts", ...).
   A parameter of the scanned period ("period/layer_0/...", mx01/model.py) is
   stacked over the repeats: its leading dimension is "layers", never sharded.
2. `logical_to_mesh(parallel)` maps each logical name to *mesh* axes of the
   dense or expert view (see mesh.py); `fsdp=True` additionally shards the
   "embed" dimension over data (dense params) or expert_data (expert params).

Tensor parallelism is Megatron-style: projections into heads / the MLP are
column-split over `tensor` (each device owns whole heads, and the fused
lightning q|k|v layout keeps a head's q, k, v together), the projections back
to hidden are row-split and followed by a psum (tensor_parallel.py).  Experts
are split over `expert` (whole experts) and their intermediate dimension over
`expert_tensor` (ETP), replicated over `expert_data` (EDP).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Tuple

import jax
from jax.sharding import NamedSharding, PartitionSpec

from mx01.config import ParallelConfig
from mx01.parallel.mesh import MeshError, ParallelMesh

# path regex -> logical axis per dimension (first match wins).
PARAM_RULES: Tuple[Tuple[str, Tuple[Optional[str], ...]], ...] = (
    (r"embed/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"attn/(qkv_proj|output_gate|q_proj)/kernel$", ("embed", "heads")),
    (r"attn/(k_proj|v_proj)/kernel$", ("embed", "kv_heads")),
    (r"attn/(out_proj|o_proj)/kernel$", ("heads", "embed")),
    (r"attn/norm/scale$", ("heads",)),  # lightning: RMSNorm over all heads, split with them
    (r"moe/router$", ("embed", None)),
    (r"moe/(wi_gate|wi_up)$", ("experts", "expert_embed", "expert_mlp")),
    (r"moe/wo$", ("experts", "expert_mlp", "expert_embed")),
    (r"mlp/(wi_gate|wi_up)$", ("embed", "mlp")),
    (r"mlp/wo$", ("mlp", "embed")),
    (r"norm/scale$", (None,)),
)

STACKED_PREFIX = "period/"  # mx01.model.SCAN_NAME: parameters with a leading "layers" dimension

# Logical dims that FSDP shards (and must gather inside the step), by the mesh axis they use.
FSDP_LOGICAL = {"embed": "data", "expert_embed": "expert_data"}


def logical_to_mesh(parallel: ParallelConfig) -> Dict[str, Tuple[str, ...]]:
  """Logical dimension name -> logical mesh axes (of mesh.py) it is sharded over."""
  return {
      "layers": (),
      "vocab": (),
      "embed": ("data",) if parallel.fsdp else (),
      "expert_embed": ("expert_data",) if parallel.fsdp else (),
      "heads": ("tensor",),
      "kv_heads": ("tensor",),
      "mlp": ("tensor",),
      "experts": ("expert",),
      "expert_mlp": ("expert_tensor",),
  }


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def logical_axes_for(path: str, ndim: int) -> Tuple[Optional[str], ...]:
  if path.startswith(STACKED_PREFIX):
    return ("layers",) + logical_axes_for(path[len(STACKED_PREFIX):], ndim - 1)
  for pattern, axes in PARAM_RULES:
    if re.search(pattern, path):
      if len(axes) != ndim:
        raise MeshError(f"sharding rule {pattern!r} gives {len(axes)} axes but {path} has {ndim} dimensions")
      return axes
  raise MeshError(f"no sharding rule matches parameter {path!r}; add one to mx01/parallel/rules.py PARAM_RULES")


def param_logical_axes(params) -> Any:
  """Pytree like `params` of per-dimension logical names."""
  return jax.tree_util.tree_map_with_path(lambda p, x: logical_axes_for(path_str(p), len(x.shape)), params)


def param_specs(params, pmesh: ParallelMesh) -> Any:
  """Pytree of PartitionSpecs for `params` (arrays or ShapeDtypeStructs); checks divisibility."""
  table = logical_to_mesh(pmesh.parallel)

  def spec(path, x):
    name = path_str(path)
    dims = logical_axes_for(name, len(x.shape))
    mesh_dims = [table[d] if d is not None else None for d in dims]
    for size, d, md in zip(x.shape, dims, mesh_dims):
      if md and size % pmesh.size(*md):
        raise MeshError(f"parameter {name} dimension {d!r} of size {size} is not divisible by "
                        f"{'*'.join(md)}={pmesh.size(*md)}; change the model size or the parallel layout")
    return pmesh.spec(*mesh_dims)

  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params, pmesh: ParallelMesh) -> Any:
  return jax.tree.map(lambda s: NamedSharding(pmesh.mesh, s), param_specs(params, pmesh),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def gather_fsdp(params, pmesh: ParallelMesh) -> Any:
  """Inside shard_map: all-gather the FSDP-sharded dimension of each parameter (identity without fsdp).

  Autodiff turns each all-gather into a reduce-scatter of the gradient.
  """
  if not pmesh.parallel.fsdp:
    return params

  def gather(path, x):
    dims = logical_axes_for(path_str(path), x.ndim)
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
