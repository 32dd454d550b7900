"""Memory and layout plan of a config, and a compile-only dry run of its train step.

`make_plan(config)` needs no devices and allocates nothing: it counts
parameters analytically and estimates, per device of the config's mesh,

  parameters   param_dtype bytes x params / shards
  gradients    same dtype and sharding as the parameters
  optimizer    AdamW mu and nu in float32 (8 bytes / param) / shards
  activations  what the backward pass keeps (see `_activation_bytes`)

Sharding model (`parallel`): the dense part (attention, norms, embedding,
LM head) is split over `tensor`; experts over `expert` x `expert_tensor`.
With `fsdp` the remaining replicas are sharded too (over data x sequence for
the dense part, over expert_data for experts), so every parameter lives
once across the mesh; FSDP then needs one layer's gathered weights (bf16,
double-buffered) as a transient.

It also finds how many GPUs of `device_memory_gib` the run needs (growing
the data axis; tensor / expert sizes as configured) and the step time at an
assumed MFU, from `scaling.flops.training_flops_per_token`.

`dry_run(config, num_layers=2)` lowers and compiles the (unsharded,
single-device) train step of the config cut to `num_layers` decoder layers,
with ShapeDtypeStruct inputs (nothing is allocated), and returns the
compiler's memory analysis next to this plan's estimate for the same reduced
config on one device.  The sharded step of `mx01/parallel` is not wired in
yet; per-device figures of the full run come from the plan.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from mx01.config import LIGHTNING, Config, ModelConfig, ParallelConfig
from mx01.params import count_params

GIB = 1024 ** 3
_BYTES = {"float32": 4, "bfloat16": 2}
# Fraction of device memory the plan lets the run use (the rest: XLA workspace, fragmentation, NCCL buffers).
USABLE_MEMORY_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device memory (bytes) and the parallel layout of one training run."""

  config: Config
  num_devices: int
  layout: str
  params_total: int
  params_activated: int
  params_non_embedding: int
  micro_batch_rows: int  # sequences per data-parallel replica per micro-batch
  tokens_per_device: int  # of one micro-batch, after sequence parallelism
  param_bytes: float
  grad_bytes: float
  optimizer_bytes: float
  activation_bytes: float
  transient_bytes: float  # FSDP gathered layer weights
  device_memory_bytes: float
  devices_needed: Optional[int]
  devices_needed_layout: str
  tokens_per_step: int
  flops_per_step: float
  assumed_mfu: float
  peak_flops_per_device: float
  step_time_s: float  # on `num_devices`
  step_time_needed_s: Optional[float]  # on `devices_needed`

  @property
  def total_bytes(self) -> float:
    return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes + self.transient_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= USABLE_MEMORY_FRACTION * self.device_memory_bytes


def _param_groups(model: ModelConfig) -> dict:
  """{"vocab", "dense", "experts", "total", "activated", "non_embedding", "layer_dense", "layer_experts"}.

  "activated" is per token and non-embedding, as the MiniMax-01 paper counts it (45.9B of 456B).
  """
  c = count_params(model)
  total, activated, non_emb, vocab = c["total"], c["non_embedding_activated"], c["non_embedding"], c["embedding"]
  experts = c["ffn"] if model.is_moe else 0
  dense = total - vocab - experts
  return {"vocab": vocab, "dense": dense, "experts": experts, "total": total, "activated": activated,
          "non_embedding": non_emb, "layer_dense": dense / model.num_layers,
          "layer_experts": experts / model.num_layers}


def _activation_bytes(config: Config, par: ParallelConfig, rows: int) -> tuple[float, int]:
  """Activation bytes per device for `rows` sequences per data replica, and tokens per device.

  With remat="full" the backward keeps each layer's input (bf16, split over
  tensor and sequence as in sequence-parallel layouts) plus the working set of
  one layer being recomputed and differentiated; without remat it keeps every
  layer's working set.  The working set per token, in compute-dtype bytes:
    attention  ~ 6 hidden (norm in/out, residual) + 5 q/k/v/gate/out head
                 projections / tensor; lightning adds its intra-block decay
                 scores (heads/tensor x block_size, float32)
    MoE        ~ top_k x (2 hidden + 3 intermediate / expert_tensor) (dispatch,
                 gate/up/act, combine); dense MLP: 3 intermediate / tensor
  doubled for the backward; plus float32 logits and their gradient,
  vocab / tensor per token.  Softmax attention is assumed fused (no T x T
  score matrix; the XLA reference path does materialise it).
  """
  m = config.model
  cb = _BYTES[m.compute_dtype]
  t = rows * config.data.seq_len // max(par.sequence, 1)
  tp = par.tensor
  heads_dims = m.num_heads * m.head_dim
  attn = 6 * m.hidden_size + 5 * heads_dims / tp
  lightning_scores = (m.num_heads / tp) * min(m.block_size, config.data.seq_len) * 4 / cb
  if m.is_moe:
    ffn = m.num_experts_per_tok * (2 * m.hidden_size + 3 * m.intermediate_size / par.expert_tensor)
  else:
    ffn = 3 * m.intermediate_size / tp
  n_lightning = sum(k == LIGHTNING for k in m.resolved_layer_types)
  per_layer = (attn + ffn) * cb * t
  scores = lightning_scores * cb * t
  working = 2 * (per_layer + (scores if n_lightning else 0))
  saved = m.num_layers * t * m.hidden_size * cb / tp
  if m.remat == "none":
    saved = m.num_layers * per_layer + n_lightning * scores
  logits = 2 * t * m.vocab_size * 4 / tp
  return saved + working + logits, t


def _plan_memory(config: Config, par: ParallelConfig, groups: dict) -> dict:
  pb = _BYTES[config.model.param_dtype]
  n = par.num_devices
  dense_shards = n if par.fsdp else par.tensor
  expert_shards = (par.expert * par.expert_tensor * (par.expert_data if par.fsdp else 1)) if config.model.is_moe else 1
  params = (groups["vocab"] + groups["dense"]) / dense_shards + groups["experts"] / expert_shards
  rows_per_replica = config.train.batch_size / max(config.train.grad_accum, 1) / par.data
  rows = max(1, math.ceil(rows_per_replica))
  act, tokens = _activation_bytes(config, par, rows)
  transient = 0.0
  if par.fsdp:
    cb = _BYTES[config.model.compute_dtype]
    transient = 2 * cb * (groups["layer_dense"] / par.tensor
                          + groups["layer_experts"] / (par.expert * par.expert_tensor))
  return {"param_bytes": params * pb, "grad_bytes": params * pb, "optimizer_bytes": params * 8.0,
          "activation_bytes": act, "transient_bytes": transient, "rows": rows, "tokens": tokens}


def _layout(par: ParallelConfig) -> str:
  return (f"{par.num_devices} devices = data {par.data} x tensor {par.tensor} x sequence {par.sequence}"
          f"{' (FSDP over data)' if par.fsdp else ''}; MoE view: expert {par.expert} x expert_tensor "
          f"{par.expert_tensor} x expert_data {par.expert_data}")


def make_plan(config: Config, *, device_memory_gib: float = 80.0, assumed_mfu: float = 0.4,
              peak_flops_per_device: Optional[float] = None, max_devices: int = 1 << 16) -> Plan:
  """The plan of `config` on its own mesh, and the smallest data axis that fits `device_memory_gib` GPUs."""
  from scaling import flops as flops_lib
  peak = peak_flops_per_device or flops_lib.PEAK_FLOPS_BF16["H100 SXM"]
  groups = _param_groups(config.model)
  par = config.parallel
  mem = _plan_memory(config, par, groups)
  device_bytes = device_memory_gib * GIB
  tokens_per_step = config.train.batch_size * config.data.seq_len
  flops_per_step = flops_lib.training_flops_per_token(config.model, config.data.seq_len) * tokens_per_step

  def step_time(n: int) -> float:
    return flops_per_step / (n * peak * assumed_mfu)

  needed, needed_layout = None, "does not fit at any data-parallel size tried"
  data = 1
  while par.tensor * par.sequence * data <= max_devices:
    try:
      candidate = dataclasses.replace(par, data=data)
    except ValueError:
      data *= 2
      continue
    m = _plan_memory(config, candidate, groups)
    total = sum(m[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "transient_bytes"))
    if total <= USABLE_MEMORY_FRACTION * device_bytes:
      needed, needed_layout = candidate.num_devices, _layout(candidate)
      break
    data *= 2
  return Plan(
      config=config, num_devices=par.num_devices, layout=_layout(par), params_total=int(groups["total"]),
      params_activated=int(groups["activated"]), params_non_embedding=int(groups["non_embedding"]),
      micro_batch_rows=mem["rows"], tokens_per_device=mem["tokens"], param_bytes=mem["param_bytes"],
      grad_bytes=mem["grad_bytes"], optimizer_bytes=mem["optimizer_bytes"],
      activation_bytes=mem["activation_bytes"], transient_bytes=mem["transient_bytes"],
      device_memory_bytes=device_bytes, devices_needed=needed, devices_needed_layout=needed_layout,
      tokens_per_step=tokens_per_step, flops_per_step=flops_per_step, assumed_mfu=assumed_mfu,
      peak_flops_per_device=peak, step_time_s=step_time(par.num_devices),
      step_time_needed_s=step_time(needed) if needed else None)


def _gib(x: float) -> str:
  return f"{x / GIB:9.2f} GiB"


def format_plan(plan: Plan) -> str:
  c = plan.config
  lines = [
      f"== plan: {c.model.num_layers} layers, hidden {c.model.hidden_size}, "
      f"{c.model.num_experts if c.model.is_moe else 0} experts (top-{c.model.num_experts_per_tok}), "
      f"context {c.data.seq_len}, batch {c.train.batch_size} x {c.data.seq_len} = {plan.tokens_per_step:,} tokens",
      f"parameters: {plan.params_total / 1e9:.2f}B total, {plan.params_activated / 1e9:.2f}B activated per token "
      f"(non-embedding, as the paper counts), {plan.params_non_embedding / 1e9:.2f}B non-embedding",
      f"layout (config): {plan.layout}",
      f"micro-batch: {plan.micro_batch_rows} sequence(s) per data replica (grad_accum={c.train.grad_accum}), "
      f"{plan.tokens_per_device:,} tokens per device; remat={c.model.remat}, "
      f"params {c.model.param_dtype}, compute {c.model.compute_dtype}",
      "per-device memory on this layout:",
      f"  parameters   {_gib(plan.param_bytes)}",
      f"  gradients    {_gib(plan.grad_bytes)}",
      f"  optimizer    {_gib(plan.optimizer_bytes)}  (AdamW mu, nu float32)",
      f"  activations  {_gib(plan.activation_bytes)}",
      f"  FSDP gather  {_gib(plan.transient_bytes)}",
      f"  total        {_gib(plan.total_bytes)}  of {plan.device_memory_bytes / GIB:.0f} GiB per GPU "
      f"({'fits' if plan.fits else 'DOES NOT FIT'}; {USABLE_MEMORY_FRACTION:.0%} usable)",
  ]
  if plan.devices_needed:
    lines.append(f"GPUs needed ({plan.device_memory_bytes / GIB:.0f} GiB each): {plan.devices_needed} "
                 f"[{plan.devices_needed_layout}]")
  else:
    lines.append(f"GPUs needed: {plan.devices_needed_layout}")
  lines.append(f"step: {plan.flops_per_step:.3e} training FLOPs (scaling.flops, causal); at MFU "
               f"{plan.assumed_mfu:.0%} of {plan.peak_flops_per_device / 1e12:.0f} TFLOP/s per GPU: "
               f"{plan.step_time_s:.2f} s on {plan.num_devices} GPUs"
               + (f", {plan.step_time_needed_s:.2f} s on {plan.devices_needed}" if plan.step_time_needed_s else ""))
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class DryRun:
  """Compiler memory analysis of the unsharded train step at reduced depth (bytes, one device)."""

  num_layers: int
  layer_types: tuple
  seq_len: int
  batch_rows: int
  compile_s: float
  argument_bytes: int  # params + optimizer state + batch
  output_bytes: int
  temp_bytes: int  # activations and workspace
  alias_bytes: int
  grad_only_temp_bytes: Optional[int]  # temporaries of forward + backward alone (no optimizer update)
  plan_param_bytes: float  # this module's estimates for the same reduced config, one device
  plan_grad_bytes: float
  plan_optimizer_bytes: float
  plan_activation_bytes: float
  notes: str


def reduced_config(config: Config, num_layers: int, *, batch_rows: int = 1, seq_len: Optional[int] = None) -> Config:
  """`config` cut to `num_layers` layers (keeping at least one softmax layer if the model has one), one device."""
  types = list(config.model.resolved_layer_types[:num_layers])
  if "softmax" in config.model.resolved_layer_types and "softmax" not in types and num_layers >= 2:
    types[-1] = "softmax"
  model = dataclasses.replace(config.model, num_layers=num_layers, layer_types=tuple(types))
  data = dataclasses.replace(config.data, seq_len=seq_len or config.data.seq_len)
  train = dataclasses.replace(config.train, batch_size=batch_rows, grad_accum=1)
  return dataclasses.replace(config, model=model, data=data, train=train, parallel=ParallelConfig())


def format_dry_run(d: DryRun) -> str:
  kinds = ", ".join(d.layer_types)
  return "\n".join([
      f"== dry run: train step compiled at {d.num_layers} layers ({kinds}), {d.batch_rows} x {d.seq_len} tokens, "
      f"in {d.compile_s:.1f} s",
      f"  {d.notes}",
      f"  compiler (memory_analysis): arguments {_gib(d.argument_bytes)} (params + optimizer state + batch), "
      f"temporaries {_gib(d.temp_bytes)}, outputs {_gib(d.output_bytes)} (aliased {_gib(d.alias_bytes)})",
      (f"  forward + backward alone (no optimizer update): temporaries {_gib(d.grad_only_temp_bytes)} "
       "(= gradients + activations; the rest of the step's temporaries are the optimizer update's "
       "unfused elementwise intermediates on this backend)" if d.grad_only_temp_bytes is not None else
       "  forward + backward alone: not compiled"),
      f"  plan for the same config:   params + optimizer {_gib(d.plan_param_bytes + d.plan_optimizer_bytes)}, "
      f"gradients {_gib(d.plan_grad_bytes)}, activations {_gib(d.plan_activation_bytes)}",
      "  scaling with depth: arguments and gradients grow linearly with the number of layers (all layers have "
      "the same parameter count here); with remat=full, temporaries grow by one saved layer input per layer "
      "and the one-layer working set stays constant (without remat they grow by a full working set per layer).",
  ])


def dry_run(config: Config, *, num_layers: Optional[int] = None, seq_len: Optional[int] = None) -> DryRun:
  """Compiles the real train step (`mx01.training.make_train_step`) on the config's mesh; nothing is allocated.

  num_layers None = full depth.  Needs config.parallel.num_devices devices: on a CPU host, start Python
  with XLA_FLAGS=--xla_force_host_platform_device_count=N (the CLI's --dry_run does).  Inputs are
  ShapeDtypeStructs carrying the rules' shardings; memory_analysis() is per device.
  """
  import time

  import jax
  import jax.numpy as jnp

  from mx01 import training
  from mx01.parallel import mesh as mesh_lib

  n = config.parallel.num_devices
  num_layers = config.model.num_layers if num_layers is None else num_layers
  rows = max(1, config.train.batch_size // max(config.train.grad_accum, 1))
  small = reduced_config(config, num_layers, batch_rows=rows, seq_len=seq_len)
  small = dataclasses.replace(small, parallel=config.parallel)
  mesh_lib.validate_layout(small.parallel, small.model, seq_len=small.data.seq_len, batch_size=rows)
  pmesh = mesh_lib.build_mesh(small.parallel, jax.devices()[:n])
  optimizer, _ = training.make_optimizer(small.train)
  abstract = jax.eval_shape(lambda k: training.init_train_state(small.model, optimizer, k, k), jax.random.key(0))
  shardings = training.state_shardings(abstract, optimizer, pmesh, small.model)
  params, opt_state = (jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract[k], shardings[k]) for k in ("params", "opt_state"))
  batch_sharding = pmesh.sharding("data", None)
  batch = {k: jax.ShapeDtypeStruct((rows, small.data.seq_len + 1), jnp.int32, sharding=batch_sharding)
           for k in ("tokens", "segment_ids")}
  step = jax.jit(training.make_train_step(small.model, pmesh, optimizer, skip_nonfinite=True), donate_argnums=(0, 1))
  t0 = time.time()
  ma = step.lower(params, opt_state, batch).compile().memory_analysis()
  compile_s = time.time() - t0
  plan = _plan_memory(small, small.parallel, _param_groups(small.model))
  return DryRun(
      num_layers=num_layers, layer_types=small.model.resolved_layer_types, seq_len=small.data.seq_len,
      batch_rows=rows, compile_s=compile_s, argument_bytes=int(ma.argument_size_in_bytes),
      output_bytes=int(ma.output_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes),
      alias_bytes=int(ma.alias_size_in_bytes), grad_only_temp_bytes=None,
      plan_param_bytes=plan["param_bytes"], plan_grad_bytes=plan["grad_bytes"],
      plan_optimizer_bytes=plan["optimizer_bytes"], plan_activation_bytes=plan["activation_bytes"],
      notes=(f"the train step (mx01/training.py) on {n} {jax.devices()[0].platform} devices, "
             f"per-device figures; {_layout(small.parallel)}"))
