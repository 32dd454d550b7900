"""The device mesh: one set of devices, two views (dense and expert).

MiniMax-Text-01 lays the attention part of the model out over
(data, sequence, tensor) and the MoE part over (expert_data, expert,
expert_tensor) -- the ETP/EDP groups of the paper -- with both views
factorising the *same* devices.  Devices are numbered row-major in each view:

    dense index  = (data_i * sequence + sequence_i) * tensor + tensor_i
    expert index = (expert_data_i * expert + expert_i) * expert_tensor + expert_tensor_i

and the two numberings coincide.  A `jax.sharding.Mesh` has a single set of
axes, so we build the coarsest common refinement of the two factorisations:
the "cut points" (tensor, sequence*tensor, ... and expert_tensor,
expert*expert_tensor, ...) of both views are merged, and each interval between
consecutive cuts becomes one physical mesh axis named "<dense>/<expert>" after
the logical axis of each view that contains it.  Every logical axis is then a
tuple of physical axes (outer to inner), which is what `shard_map`
collectives and `PartitionSpec`s accept.  This needs each view's cuts to
divide the next (always true for powers of two).

Example: data=2, sequence=2, tensor=2, expert=4, expert_tensor=1 gives the
physical axes ("data/expert_data", "sequence/expert", "tensor/expert"), so
"expert" is ("sequence/expert", "tensor/expert").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mx01.config import ConfigError, ModelConfig, ParallelConfig

DENSE_AXES = ("data", "sequence", "tensor")
EXPERT_AXES = ("expert_data", "expert", "expert_tensor")
LOGICAL_AXES = DENSE_AXES + EXPERT_AXES


class MeshError(ConfigError):
  """A parallel layout that does not fit the devices or the model."""


def _sizes(parallel: ParallelConfig) -> Dict[str, int]:
  return {"data": parallel.data, "sequence": parallel.sequence, "tensor": parallel.tensor,
          "expert_data": parallel.expert_data, "expert": parallel.expert, "expert_tensor": parallel.expert_tensor}


def _cuts(sizes: Sequence[int]) -> list[int]:
  """Strides of a row-major factorisation, inner to outer: [1, s_inner, s_inner*s_mid, total]."""
  out = [1]
  for s in reversed(sizes):
    out.append(out[-1] * s)
  return out


def physical_axes(parallel: ParallelConfig) -> Tuple[Tuple[str, int], ...]:
  """(name, size) of the physical mesh axes, outer to inner.  Raises MeshError if the views don't nest."""
  sizes = _sizes(parallel)
  dense_cuts = _cuts([sizes[a] for a in DENSE_AXES])
  expert_cuts = _cuts([sizes[a] for a in EXPERT_AXES])
  cuts = sorted(set(dense_cuts) | set(expert_cuts))
  for lo, hi in zip(cuts, cuts[1:]):
    if hi % lo:
      raise MeshError(
          f"parallel: the dense view (data={parallel.data}, sequence={parallel.sequence}, tensor={parallel.tensor}) "
          f"and the expert view (expert_data={parallel.expert_data}, expert={parallel.expert}, "
          f"expert_tensor={parallel.expert_tensor}) do not nest: group sizes {lo} and {hi} do not divide each "
          "other; use powers of two, or make expert_tensor divide tensor and expert*expert_tensor divide "
          "sequence*tensor")

  def owner(axis_cuts, names, lo, hi):
    # names are outer->inner; axis_cuts inner->outer, so the inner-most axis spans [cuts[0], cuts[1]].
    for i, name in enumerate(reversed(names)):
      if axis_cuts[i] <= lo and hi <= axis_cuts[i + 1]:
        return name
    raise AssertionError("unreachable: cuts are a common refinement")

  axes = []
  for lo, hi in zip(cuts, cuts[1:]):
    name = f"{owner(dense_cuts, DENSE_AXES, lo, hi)}/{owner(expert_cuts, EXPERT_AXES, lo, hi)}"
    axes.append((name, hi // lo))
  axes.reverse()  # outer to inner
  if not axes:
    axes = [("replica", 1)]
  return tuple(axes)


@dataclasses.dataclass(frozen=True)
class ParallelMesh:
  """A `Mesh` plus the map from logical axes to its physical axes.

  `axes("tensor")` -> tuple of physical axis names (outer to inner), empty when
  the logical axis has size 1.  `axes("data", "sequence")` concatenates.
  """
  mesh: Mesh
  parallel: ParallelConfig
  logical_to_physical: Dict[str, Tuple[str, ...]]

  def axes(self, *logical: str) -> Tuple[str, ...]:
    out = ()
    for name in logical:
      if name not in self.logical_to_physical:
        raise KeyError(f"unknown logical mesh axis {name!r}; choose from {LOGICAL_AXES}")
      out += self.logical_to_physical[name]
    return out

  def size(self, *logical: str) -> int:
    return math.prod(self.mesh.shape[a] for a in self.axes(*logical))

  @property
  def all_axes(self) -> Tuple[str, ...]:
    """Every physical axis of size > 1, outer to inner (the flattened device order of both views).

    Size-1 axes (the single 'replica' axis of a one-device mesh) are left out: collectives over them
    are no-ops, and an axis_index over them would mark values as varying along an axis that no
    output spec names.
    """
    return tuple(a for a in self.mesh.axis_names if self.mesh.shape[a] > 1)

  def spec(self, *dims: Optional[Sequence[str] | str]) -> PartitionSpec:
    """PartitionSpec from logical axes per array dimension (None, a name, or a tuple of names)."""
    entries = []
    for d in dims:
      if d is None:
        entries.append(None)
        continue
      names = (d,) if isinstance(d, str) else tuple(d)
      phys = self.axes(*names)
      entries.append(phys if phys else None)
    return PartitionSpec(*entries)

  def sharding(self, *dims) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(*dims))


def build_mesh(parallel: ParallelConfig, devices: Optional[Sequence[jax.Device]] = None) -> ParallelMesh:
  """The mesh of `parallel` over `devices` (default: all devices), with both views."""
  devices = list(jax.devices() if devices is None else devices)
  if parallel.num_devices != len(devices):
    n = len(devices)
    other = parallel.sequence * parallel.tensor
    hint = (f"set parallel.data={n // other}" if n % other == 0 else
            f"choose data, sequence and tensor whose product is {n}")
    raise MeshError(f"parallel: data*sequence*tensor = {parallel.data}*{parallel.sequence}*{parallel.tensor} = "
                    f"{parallel.num_devices} but there are {n} devices; {hint}")
  axes = physical_axes(parallel)
  names = tuple(a for a, _ in axes)
  mesh = Mesh(np.asarray(devices, dtype=object).reshape([s for _, s in axes]), names)
  logical = {name: () for name in LOGICAL_AXES}
  for phys, size in axes:
    if size == 1:
      continue
    dense, expert = phys.split("/")
    logical[dense] += (phys,)
    logical[expert] += (phys,)
  return ParallelMesh(mesh=mesh, parallel=parallel, logical_to_physical=logical)


def validate_layout(parallel: ParallelConfig, model: ModelConfig, *, seq_len: Optional[int] = None,
                    batch_size: Optional[int] = None) -> None:
  """Raises MeshError naming the value and the fix when the layout does not divide the model or batch."""

  def need(ok: bool, msg: str):
    if not ok:
      raise MeshError(msg)

  p, m = parallel, model
  need(m.num_heads % p.tensor == 0,
       f"parallel.tensor={p.tensor} must divide model.num_heads={m.num_heads}; pick a divisor of {m.num_heads}")
  need(m.num_kv_heads % p.tensor == 0,
       f"parallel.tensor={p.tensor} must divide model.num_kv_heads={m.num_kv_heads} (K/V heads are split, "
       f"not replicated); pick a divisor of {m.num_kv_heads}")
  if m.is_moe:
    need(m.num_experts % p.expert == 0,
         f"parallel.expert={p.expert} must divide model.num_experts={m.num_experts}; pick a divisor of "
         f"{m.num_experts}")
    need(m.intermediate_size % p.expert_tensor == 0,
         f"parallel.expert_tensor={p.expert_tensor} must divide model.intermediate_size={m.intermediate_size}")
  else:
    need(m.intermediate_size % p.tensor == 0,
         f"parallel.tensor={p.tensor} must divide model.intermediate_size={m.intermediate_size}")
  if p.fsdp:
    need(m.hidden_size % p.data == 0,
         f"parallel.data={p.data} must divide model.hidden_size={m.hidden_size} when fsdp=True (parameters are "
         "sharded along hidden); set fsdp=False or pick a divisor")
    if m.is_moe:
      need(m.hidden_size % p.expert_data == 0,
           f"expert_data={p.expert_data} (devices / (expert*expert_tensor)) must divide "
           f"model.hidden_size={m.hidden_size} when fsdp=True")
  if batch_size is not None:
    need(batch_size % p.data == 0,
         f"parallel.data={p.data} must divide the batch size {batch_size}; pick a batch that is a multiple")
  if seq_len is not None:
    chunks = 2 * p.sequence if p.sequence > 1 else 1
    need(seq_len % chunks == 0,
         f"the sequence length {seq_len} must be a multiple of {chunks} (2*parallel.sequence: each device holds "
         "two zig-zag chunks); change data.seq_len or parallel.sequence")
    chunk = seq_len // chunks
    if m.is_moe:
      need(chunk % p.tensor == 0,
           f"each sequence chunk ({chunk} tokens) must split evenly over parallel.tensor={p.tensor} (the MoE "
           "splits the tokens of a tensor-parallel group among its devices); change data.seq_len")
  physical_axes(parallel)
