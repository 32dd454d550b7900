"""Parameters declared where they are created: global shape, logical axis names, this device's piece.

Every layer creates its parameters through `param`:

    kernel = param(self, "kernel", init, (hidden, heads * head_dim), ("embed", "heads"), dtype, shards)

`shape` is the *global* shape and `names` gives one logical axis per dimension
("embed", "heads", "experts", ...; None for an unnamed dimension, never split).
mx01/parallel/rules.py's one table maps these names to mesh axes.  The array a
layer gets is this device's piece: each dimension divided by the ways `shards`
(`mx01.ops.LocalShards`) splits its axis inside the per-device computation --
1 everywhere on one device, so `mx01.model.init` creates the global arrays.
(FSDP's split of "embed" is gathered before the model runs, so it does not
divide here.)

The names travel with the parameter as flax's `nn.LogicallyPartitioned` box, so
the logical axes of the parameters are read from the model itself
(`mx01.model.param_logical_axes`); `mx01.model.init` removes the boxes and
returns plain arrays.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn

from mx01.ops import ONE_DEVICE, LocalShards


def param(module: nn.Module, name: str, init: Callable, shape: Sequence[int], names: Sequence[Optional[str]],
          dtype, shards: LocalShards = ONE_DEVICE):
  """`module.param(name, ...)` of global `shape` with logical axes `names`, at this device's local shape."""
  names = tuple(names)
  return module.param(name, nn.with_logical_partitioning(init, names), shards.local_shape(tuple(shape), names),
                      dtype)
