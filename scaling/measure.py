"""Measured FLOPs of JAX functions, to check the analytic model in `scaling.flops`.

Two measurements:

* `xla_flops(fn, *args)` - XLA's own `cost_analysis()` of the compiled
  function.  It counts every op (elementwise included), but counts the body
  of a while loop (`lax.scan`, `fori_loop`) once, not once per iteration.
* `matmul_flops(fn, *args)` - walks the jaxpr and adds 2 * (output size) *
  (contracted size) for every `dot_general` (and the grouped
  `ragged_dot_general` of the MoE, each row meeting one group), multiplying bodies of `scan` by
  their length and recursing into `pjit`, `remat`, `custom_jvp/vjp` and
  `cond` (the most expensive branch).  This is the matmul-only count that the
  analytic model describes, and it handles scans correctly.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jex_core


def xla_flops(fn: Callable, *args: Any) -> float:
  """FLOPs that XLA's cost analysis reports for `jax.jit(fn)(*args)` (while bodies counted once)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  contracted = math.prod(lhs_shape[d] for d in lhs_contract)
  out_size = math.prod(eqn.outvars[0].aval.shape)
  return 2.0 * out_size * contracted


def _ragged_dot_flops(eqn) -> float:
  """Grouped matmul: each row (or each contracted element) meets exactly one group's weights."""
  dims = eqn.params["ragged_dot_dimension_numbers"]
  (lhs_contract, _), _ = dims.dot_dimension_numbers
  lhs_shape = eqn.invars[0].aval.shape
  contracted = math.prod(lhs_shape[d] for d in lhs_contract)
  out_size = math.prod(eqn.outvars[0].aval.shape)
  if any(d in lhs_contract for d in dims.lhs_ragged_dimensions):  # e.g. the weight gradient [groups, k, n]
    out_size //= eqn.invars[2].aval.shape[-1]
  return 2.0 * out_size * contracted


def _sub_jaxprs(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (list, tuple)):
    for v in value:
      yield from _sub_jaxprs(v)


def _jaxpr_matmul_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "ragged_dot_general":
      total += _ragged_dot_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * _jaxpr_matmul_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "cond":
      total += max(_jaxpr_matmul_flops(b.jaxpr) for b in eqn.params["branches"])
    elif name == "while":
      body = _jaxpr_matmul_flops(eqn.params["body_jaxpr"].jaxpr)
      if body:
        raise NotImplementedError("matmuls inside a while loop with an unknown trip count")
    else:
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += _jaxpr_matmul_flops(sub)
  return total


def matmul_flops(fn: Callable, *args: Any) -> float:
  """Matmul FLOPs (2 per multiply-accumulate) of `fn(*args)`, scans counted per iteration."""
  return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)
