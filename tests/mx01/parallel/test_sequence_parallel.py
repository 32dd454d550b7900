"""LASP+ == unsharded lightning attention; ring attention == full masked attention (packed sequences)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mx01 import lightning
from mx01.config import ParallelConfig
from mx01.ops import causal_attention
from mx01.parallel import comm
from mx01.parallel import mesh as mesh_lib
from mx01.parallel.lasp import lasp_lightning
from mx01.parallel.layout import SequenceLayout
from mx01.parallel.ring_attention import ring_attention

from tests.mx01.parallel.util import max_abs_diff, packed_segments

B, H, DK = 2, 2, 4
CASES = [(ParallelConfig(data=2, sequence=4), 32),
         pytest.param(ParallelConfig(data=1, sequence=8), 48, marks=pytest.mark.slow),
         (ParallelConfig(data=2, sequence=2, tensor=2), 8)]
IDS = ["s4_chunk4", "s8_chunk3", "s2_chunk2"]


def test_zigzag_layout_round_trip():
  layout = SequenceLayout(16, 4)
  assert layout.chunk_ids().tolist() == [[0, 7], [1, 6], [2, 5], [3, 4]]
  x = jnp.arange(32).reshape(2, 16)
  assert layout.to_layout(x)[0, :4].tolist() == [0, 1, 14, 15]
  assert bool(jnp.all(layout.from_layout(layout.to_layout(x)) == x))


@pytest.mark.parametrize("parallel, length, use_initial_state", [
    (ParallelConfig(data=2, sequence=4), 32, False),
    (ParallelConfig(data=2, sequence=4), 32, True),
    pytest.param(ParallelConfig(data=1, sequence=8), 48, False, marks=pytest.mark.slow),
    (ParallelConfig(data=2, sequence=2, tensor=2), 8, False),
], ids=["s4_chunk4", "s4_chunk4_initial_state", "s8_chunk3", "s2_chunk2"])
def test_lasp_equals_unsharded(parallel, length, use_initial_state):
  pm = mesh_lib.build_mesh(parallel)
  layout = SequenceLayout(length, parallel.sequence)
  ks = jax.random.split(jax.random.key(1), 5)
  q, k, v = (jax.random.normal(ks[i], (B, length, H, DK)) for i in range(3))
  seg = packed_segments(ks[3], B, length, start_prob=0.08)
  log_decay = -jnp.array([0.1, 0.5])
  init = jax.random.normal(ks[4], (B, H, DK, DK)) if use_initial_state else None
  inner = lightning.lightning_attention_chunked

  def local(q, k, v, seg, init):
    return lasp_lightning(q, k, v, log_decay, block_size=2, segment_ids=seg, initial_state=init, inner=inner,
                          layout=layout, sequence_axes=pm.axes("sequence"))

  act = pm.spec("data", "sequence", None, None)
  mapped = comm.shard_map(local, mesh=pm.mesh, in_specs=(act, act, act, pm.spec("data", "sequence"), pm.spec("data")),
                          out_specs=(act, pm.spec("data")))

  def sharded(q, k, v):
    o, s = mapped(*(layout.to_layout(a) for a in (q, k, v, seg)), init)
    return layout.from_layout(o), s

  o, s = jax.jit(sharded)(q, k, v)
  o_ref, s_ref = lightning.lightning_attention_recurrent(q, k, v, log_decay, segment_ids=seg, initial_state=init)
  assert max_abs_diff(o, o_ref) < 2e-5
  assert max_abs_diff(s, s_ref) < 2e-5

  def loss(fn, q, k, v):
    o, s = fn(q, k, v)
    return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(s))

  reference = lambda q, k, v: lightning.lightning_attention_chunked(q, k, v, log_decay, block_size=2,
                                                                    segment_ids=seg, initial_state=init)
  g = jax.jit(jax.grad(functools.partial(loss, sharded), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2))(q, k, v)
  assert max_abs_diff(g, g_ref) < 5e-5


def test_lasp_at_preset_init_scale_matches_float64():
  """Inputs at the presets' initialisation scale (q, k, v ~ 0.02), chunks of 6 tokens on blocks of 4, the model's
  decays: the sharded pass equals the float64 loop."""
  parallel = ParallelConfig(data=2, sequence=4)
  pm = mesh_lib.build_mesh(parallel)
  length = 48
  layout = SequenceLayout(length, parallel.sequence)
  ks = jax.random.split(jax.random.key(7), 5)
  q, k, v = (0.02 * jax.random.normal(ks[i], (B, length, H, DK)) for i in range(3))
  seg = packed_segments(ks[3], B, length, start_prob=0.08)
  log_decay = jnp.asarray(lightning.minimax_log_decay(H, 1, 4))
  init = 1e-3 * jax.random.normal(ks[4], (B, H, DK, DK))

  def local(q, k, v, seg, init):
    return lasp_lightning(q, k, v, log_decay, block_size=4, segment_ids=seg, initial_state=init,
                          inner=lightning.lightning_attention_chunked, layout=layout, sequence_axes=pm.axes("sequence"))

  act = pm.spec("data", "sequence", None, None)
  mapped = comm.shard_map(local, mesh=pm.mesh, in_specs=(act, act, act, pm.spec("data", "sequence"), pm.spec("data")),
                          out_specs=(act, pm.spec("data")))
  o, s = jax.jit(lambda *a: mapped(*(layout.to_layout(x) for x in a[:4]), a[4]))(q, k, v, seg, init)
  o = layout.from_layout(o)
  want_o, want_s = lightning.lightning_attention_numpy(q, k, v, log_decay, segment_ids=seg, initial_state=init)
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
  assert rel(o, want_o) < 1e-5 and rel(s, want_s) < 1e-5  # float32


@pytest.mark.parametrize("parallel, length", CASES, ids=IDS)
def test_ring_attention_equals_full_attention(parallel, length):
  pm = mesh_lib.build_mesh(parallel)
  layout = SequenceLayout(length, parallel.sequence)
  ks = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(ks[0], (B, length, 4, DK))  # 4 query heads, 2 K/V heads (GQA)
  k, v = (jax.random.normal(ks[i], (B, length, 2, DK)) for i in (1, 2))
  seg = packed_segments(ks[3], B, length, start_prob=0.08)

  def local(q, k, v, seg):
    return ring_attention(q, k, v, segment_ids=seg, layout=layout, sequence_axes=pm.axes("sequence"))

  act = pm.spec("data", "sequence", None, None)
  mapped = comm.shard_map(local, mesh=pm.mesh, in_specs=(act, act, act, pm.spec("data", "sequence")), out_specs=act)
  sharded = lambda q, k, v: layout.from_layout(mapped(*(layout.to_layout(a) for a in (q, k, v, seg))))
  reference = lambda q, k, v: causal_attention(q, k, v, segment_ids=seg)
  assert max_abs_diff(jax.jit(sharded)(q, k, v), reference(q, k, v)) < 2e-6

  loss = lambda fn, q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  g = jax.jit(jax.grad(functools.partial(loss, sharded), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2))(q, k, v)
  assert max_abs_diff(g, g_ref) < 1e-5
