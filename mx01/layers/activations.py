"""The gated activations of the decoder, rematerialised in the backward pass.

Differentiating `silu(gate) * up` as written keeps the sigmoid, the product
and `silu(gate)` itself alive until the backward pass, each an
[tokens, intermediate] tensor; recomputing them from `gate` and `up` (which
the matmuls produce anyway) costs a few elementwise operations inside the
backward fusion and saves writing and reading those tensors once per layer.
`jax.checkpoint` keeps only the function's inputs, so the gradients are the
same expressions evaluated again, not an approximation.
"""

import jax


@jax.checkpoint
def silu(x):
  """x * sigmoid(x), keeping only x for the backward pass."""
  return jax.nn.silu(x)


@jax.checkpoint
def silu_gate(gate, up):
  """silu(gate) * up (SwiGLU's gate), keeping only gate and up for the backward pass."""
  return jax.nn.silu(gate) * up
