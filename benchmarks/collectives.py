"""Collective bytes per step, counted from compiled HLO, next to an analytic prediction.

For each sharded piece (expert-parallel MoE, LASP+, ring attention) and for
the whole train step, under several layouts of 8 devices, this compiles the
forward + backward (jax.grad through the shard_map) and scans the optimised
HLO text for all-to-all, all-gather, reduce-scatter, all-reduce and
collective-permute ops (and their async -start forms), summing the bytes of
their operands.  Numbers are per device and per layer (ops) or per step (the
whole model), one static occurrence each (no collectives sit inside loops).

The prediction is the design's own accounting (see the module docstrings of
mx01/parallel/*):
  MoE:   2+2 all-to-all of the [E, slots, hidden] dispatch buffer (fwd+bwd);
         ETP all-gather / reduce-scatter of the group's tokens and their
         transposes; the tensor split's all-gather (fwd) and all-reduce of the
         input gradient (bwd); the capacity counts and routing statistics.
  LASP+: fwd all-gather of the chunk states [b, chunks, heads, dk, dv] (+ the
         chunk flags), bwd all-reduce of the gathered states' gradient; both
         independent of the sequence length.
  Ring:  S-1 hops of the K/V block (+ segment ids) forward and S-1 hops of
         their gradients backward.
Parameter-gradient reductions are predicted separately ("params").

Run:  python benchmarks/collectives.py [--markdown]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from mx01 import lightning  # noqa: E402
from mx01 import model as model_lib  # noqa: E402
from mx01 import training  # noqa: E402
from mx01.config import LIGHTNING, SOFTMAX, Config, DataConfig, ModelConfig, ParallelConfig  # noqa: E402
from mx01.layers import moe as moe_lib  # noqa: E402
from mx01.parallel import comm, rules  # noqa: E402
from mx01.parallel import mesh as mesh_lib  # noqa: E402
from mx01.parallel.lasp import lasp_lightning  # noqa: E402
from mx01.parallel.layout import SequenceLayout  # noqa: E402
from mx01.parallel.moe_ep import moe_expert_parallel  # noqa: E402
from mx01.parallel.ring_attention import ring_attention  # noqa: E402

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "pred": 1, "s8": 1, "u8": 1,
                "f64": 8}
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+(?P<op>[\w\-]+)\((?P<operands>[^)]*)\)")
_SHAPE = re.compile(r"\b(?P<dtype>f32|bf16|f16|s32|u32|s64|u64|pred|s8|u8|f64)\[(?P<dims>[0-9,]*)\]")


def _type_bytes(type_str: str) -> int:
  total = 0
  for s in _SHAPE.finditer(type_str):
    total += _DTYPE_BYTES[s.group("dtype")] * math.prod(int(d) for d in s.group("dims").split(",") if d)
  return total


# The benchmark model: small enough to compile quickly on CPU, big enough that every axis divides.
B, L = 8, 256
MODEL = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16,
                    layer_types=(LIGHTNING, SOFTMAX), intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                    capacity_factor=1.0, block_size=32, rotary_dim=8)


def collective_bytes(hlo_text: str) -> dict:
  """{kind: operand bytes} summed over the collectives of an HLO module's text."""
  defs = [m for m in map(_DEF.match, hlo_text.splitlines()) if m]
  result_bytes = {m.group("name"): _type_bytes(m.group("type")) for m in defs}
  out = collections.Counter()
  for m in defs:
    kind = m.group("op").removesuffix("-start")
    if kind not in KINDS:
      continue
    for operand in re.findall(r"%([\w.\-]+)", m.group("operands")):
      out[kind] += result_bytes.get(operand, 0)
  return dict(out)


def compiled_bytes(fn, *args) -> dict:
  return collective_bytes(jax.jit(fn).lower(*args).compile().as_text())



# ---- the pieces ---------------------------------------------------------------

def moe_case(parallel: ParallelConfig):
  pm = mesh_lib.build_mesh(parallel)
  layout = SequenceLayout(L, parallel.sequence)
  d, e, i = MODEL.hidden_size, MODEL.num_experts, MODEL.intermediate_size
  params = {"router": jnp.zeros((d, e)), "wi_gate": jnp.zeros((e, d, i)), "wi_up": jnp.zeros((e, d, i)),
            "wo": jnp.zeros((e, i, d))}
  moe_axes = model_lib.param_logical_axes(MODEL)["layers_0"]["moe"]  # two kinds of layer: nothing scanned
  specs = rules.param_specs({"moe": params}, pm, {"moe": moe_axes})["moe"]
  act = pm.spec("data", "sequence", None)
  fn = functools.partial(moe_expert_parallel, config=MODEL, pmesh=pm, layout=layout, global_batch=B)
  mapped = comm.shard_map(fn, mesh=pm.mesh, in_specs=(act, specs), out_specs=(act, P()))
  loss = lambda x, p: jnp.sum(jnp.sin(mapped(x, p)[0]))
  measured = compiled_bytes(jax.grad(loss, argnums=(0, 1)), jnp.zeros((B, L, d)), params)
  return measured, predict_moe(parallel)


def predict_moe(p: ParallelConfig) -> dict:
  n_dev = p.num_devices
  d, e, k, i = MODEL.hidden_size, MODEL.num_experts, MODEL.num_experts_per_tok, MODEL.intermediate_size
  n_tok = B * L // n_dev
  cap = moe_lib.expert_capacity(B * L, e, k, MODEL.capacity_factor)
  slots = min(cap, n_tok)
  e_local = e // p.expert
  buf = e * slots * d * 4
  group_tokens = e_local * p.expert * slots * d * 4
  out = collections.Counter()
  if p.expert > 1:
    out["all-to-all"] += 4 * buf
  if p.expert_tensor > 1:
    out["all-gather"] += 2 * group_tokens  # fwd tokens, bwd of the psum_scatter
    out["reduce-scatter"] += 2 * group_tokens * p.expert_tensor  # fwd partial outputs, bwd of the all-gather
  if p.tensor > 1:
    out["all-gather"] += n_tok * d * 4
    out["all-reduce"] += n_tok * p.tensor * d * 4
  chunks = 2 if p.sequence > 1 else 1
  out["all-gather"] += (B // p.data) * chunks * k * e * 4  # capacity counts
  out["all-reduce"] += (2 * e + 1) * 4  # routing statistics
  params = collections.Counter()
  params["all-reduce"] += d * e * 4  # router gradient (replicated)
  if p.expert_data > 1:
    params["all-reduce"] += 3 * e_local * d * (i // p.expert_tensor) * 4
  return {"ops": dict(out), "params": dict(params)}


def lasp_case(parallel: ParallelConfig):
  pm = mesh_lib.build_mesh(parallel)
  layout = SequenceLayout(L, parallel.sequence)
  h, dk = MODEL.num_heads, MODEL.head_dim
  inner = lightning.lightning_attention_chunked
  log_decay = jnp.asarray(lightning.minimax_log_decay(h, 0, 2))
  act = pm.spec("data", "sequence", "tensor", None)

  def local(q, k, v, seg):
    return lasp_lightning(q, k, v, log_decay[:q.shape[2]], block_size=MODEL.block_size, segment_ids=seg,
                          inner=inner, layout=layout, sequence_axes=pm.axes("sequence"))[0]

  mapped = comm.shard_map(local, mesh=pm.mesh, in_specs=(act, act, act, pm.spec("data", "sequence")), out_specs=act)
  x = jnp.zeros((B, L, h, dk))
  loss = lambda q, k, v, s: jnp.sum(jnp.sin(mapped(q, k, v, s)))
  measured = compiled_bytes(jax.grad(loss, argnums=(0, 1, 2)), x, x, x, jnp.ones((B, L), jnp.int32))
  return measured, predict_lasp(parallel)


def predict_lasp(p: ParallelConfig) -> dict:
  out = collections.Counter()
  if p.sequence > 1:
    b, chunks, h = B // p.data, 2, MODEL.num_heads // p.tensor
    states = b * chunks * h * MODEL.head_dim * MODEL.head_dim * 4
    out["all-gather"] += states + b * chunks * (4 + 4 + 1)  # states + first/last segment ids + boundary flags
    out["all-reduce"] += p.sequence * states  # gradient of the gathered states
  return {"ops": dict(out), "params": {}}


def ring_case(parallel: ParallelConfig):
  pm = mesh_lib.build_mesh(parallel)
  layout = SequenceLayout(L, parallel.sequence)
  h, kvh, d = MODEL.num_heads, MODEL.num_kv_heads, MODEL.head_dim
  act = pm.spec("data", "sequence", "tensor", None)

  def local(q, k, v, seg):
    return ring_attention(q, k, v, segment_ids=seg, layout=layout, sequence_axes=pm.axes("sequence"))

  mapped = comm.shard_map(local, mesh=pm.mesh, in_specs=(act, act, act, pm.spec("data", "sequence")), out_specs=act)
  loss = lambda q, k, v, s: jnp.sum(jnp.sin(mapped(q, k, v, s)))
  measured = compiled_bytes(jax.grad(loss, argnums=(0, 1, 2)), jnp.zeros((B, L, h, d)), jnp.zeros((B, L, kvh, d)),
                            jnp.zeros((B, L, kvh, d)), jnp.ones((B, L), jnp.int32))
  return measured, predict_ring(parallel)


def predict_ring(p: ParallelConfig) -> dict:
  out = collections.Counter()
  if p.sequence > 1:
    b, t = B // p.data, L // p.sequence
    kv = b * t * (MODEL.num_kv_heads // p.tensor) * MODEL.head_dim * 4
    out["collective-permute"] += (p.sequence - 1) * (2 * kv + b * t * 4) + (p.sequence - 1) * 2 * kv
  return {"ops": dict(out), "params": {}}


def step_case(parallel: ParallelConfig):
  pm = mesh_lib.build_mesh(parallel)
  config = Config(model=MODEL, parallel=parallel, data=DataConfig(seq_len=L))
  optimizer = optax.sgd(0.1)
  params = jax.eval_shape(lambda: model_lib.init(MODEL, jax.random.key(0)))
  shardings = rules.param_shardings(params, pm, model_lib.param_logical_axes(MODEL))
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), params, shardings)
  opt_state = jax.eval_shape(optimizer.init, params)
  batch = {"tokens": jax.ShapeDtypeStruct((B, L + 1), jnp.int32),
           "segment_ids": jax.ShapeDtypeStruct((B, L + 1), jnp.int32)}
  step = training.make_train_step(config.model, pm, optimizer)
  text = jax.jit(step).lower(params, opt_state, batch).compile().as_text()
  return collective_bytes(text), None


OP_CASES = {
    "moe": (moe_case, [ParallelConfig(data=8, expert=8), ParallelConfig(data=8, expert=4, expert_tensor=2),
                       ParallelConfig(data=2, sequence=2, tensor=2, expert=4, expert_tensor=2)]),
    "lightning (LASP+)": (lasp_case, [ParallelConfig(data=1, sequence=8), ParallelConfig(data=2, sequence=4),
                                      ParallelConfig(data=2, sequence=2, tensor=2)]),
    "softmax (ring)": (ring_case, [ParallelConfig(data=1, sequence=8), ParallelConfig(data=2, sequence=4),
                                   ParallelConfig(data=2, sequence=2, tensor=2)]),
}
STEP_LAYOUTS = [ParallelConfig(data=8), ParallelConfig(data=8, fsdp=True), ParallelConfig(data=2, tensor=4, expert=4),
                ParallelConfig(data=2, sequence=2, tensor=2, expert=4, expert_tensor=2)]


def layout_name(p: ParallelConfig) -> str:
  parts = [f"{k}={getattr(p, k)}" for k in ("data", "sequence", "tensor", "expert", "expert_tensor")
           if getattr(p, k) > 1]
  return " ".join(parts) + (" fsdp" if p.fsdp else "")


def fmt(n) -> str:
  if not n:
    return "0"
  return f"{n / 1024:.1f}K" if n < 1 << 20 else f"{n / (1 << 20):.2f}M"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--markdown", action="store_true", help="print markdown tables")
  ap.add_argument("--skip-step", action="store_true")
  args = ap.parse_args()
  print(f"# {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
  print(f"# model: B={B} L={L} hidden={MODEL.hidden_size} heads={MODEL.num_heads}/{MODEL.num_kv_heads} "
        f"head_dim={MODEL.head_dim} experts={MODEL.num_experts} top{MODEL.num_experts_per_tok} "
        f"I={MODEL.intermediate_size} capacity_factor={MODEL.capacity_factor}, float32")
  header = "| layer | layout | " + " | ".join(KINDS) + " | predicted (ops + params) |"
  print("\nPer device, per layer, forward + backward: measured bytes (predicted)\n")
  print(header)
  print("|" + "---|" * (len(KINDS) + 3))
  for name, (case, layouts) in OP_CASES.items():
    for p in layouts:
      measured, predicted = case(p)
      pred_total = collections.Counter(predicted["ops"]) + collections.Counter(predicted["params"])
      cells = [f"{fmt(measured.get(k, 0))} ({fmt(pred_total.get(k, 0))})" for k in KINDS]
      total_pred = sum(pred_total.values())
      print(f"| {name} | {layout_name(p)} | " + " | ".join(cells) + f" | {fmt(total_pred)} |", flush=True)
  if args.skip_step:
    return
  print("\nWhole train step (2 layers: lightning + softmax, MoE), per device: measured bytes\n")
  print("| layout | " + " | ".join(KINDS) + " | total |")
  print("|" + "---|" * (len(KINDS) + 2))
  for p in STEP_LAYOUTS:
    measured, _ = step_case(p)
    print(f"| {layout_name(p)} | " + " | ".join(fmt(measured.get(k, 0)) for k in KINDS) +
          f" | {fmt(sum(measured.values()))} |", flush=True)


if __name__ == "__main__":
  main()
