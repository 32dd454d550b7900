"""The sharded train step on several GPUs: equivalence, weak scaling, and a long-context step.

    python benchmarks/multi_gpu.py --out multi_gpu.json
    python benchmarks/multi_gpu.py --config=hybrid_moe_100m --long_config=hybrid_100m --config.model.remat=full

1. Equivalence: for each layout that the visible GPUs allow (data, expert,
   expert_tensor, tensor, sequence: LASP+ and ring attention), the sharded loss,
   aux loss and gradients of a small hybrid MoE model on a random packed batch
   against the same model on one GPU (float32, highest matmul precision).
2. Weak scaling: the train step of a hybrid MoE preset with a fixed batch per
   GPU on 1 GPU (plain step) and on all GPUs (data x expert), tokens/s and MFU
   per GPU, and the collective bytes of the compiled step.
3. Long context: a lightning-heavy hybrid with the sequence axis across all GPUs
   at growing context (batch 1, rematerialised) until it no longer fits.
"""

from __future__ import annotations

import json
import re
import sys
import time
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import synthetic_batch, time_step  # noqa: E402
from mx01 import model as model_lib  # noqa: E402
from mx01 import training  # noqa: E402
from mx01.config import LIGHTNING, SOFTMAX, Config, ConfigError, ModelConfig, ParallelConfig  # noqa: E402
from mx01.parallel import mesh as mesh_lib  # noqa: E402
from mx01.parallel import step as step_lib  # noqa: E402
from recipes import flags as flags_lib  # noqa: E402
from scaling import flops  # noqa: E402


def _max_rel(a, b) -> float:
  errs = [float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12)) for x, y in
          zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return max(errs)


def _layout_name(par: ParallelConfig) -> str:
  name = ", ".join(f"{k}={v}" for k, v in par.__dict__.items() if not isinstance(v, bool) and v != 1)
  return name + (", fsdp" if par.fsdp else "")


def _loss_and_grads(cfg, params, batch):
  """Loss, metrics and gradients of the single-device model on the first GPU."""
  with jax.default_device(jax.devices()[0]):
    return jax.jit(jax.value_and_grad(lambda p, b: training.loss_fn(p, b, config=cfg), has_aux=True))(params, batch)


def _compare(cfg, par: ParallelConfig, name: str, params, batch, ref) -> dict:
  """One row: the sharded loss, aux loss, gradients and expert loads of `par` against `ref`."""
  (loss_ref, m_ref), g_ref = ref
  try:
    pm = mesh_lib.build_mesh(par)
    loss_fn = training.make_loss(cfg, pm)
    (loss, m), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(step_lib.shard_params(params, pm, cfg), batch)
    row = dict(layout=name, loss_abs_err=abs(float(loss) - float(loss_ref)),
               aux_abs_err=abs(float(m["aux_loss"]) - float(m_ref["aux_loss"])),
               grad_max_rel_err=_max_rel(g, g_ref),
               expert_load_equal=bool(np.array_equal(np.asarray(m["expert_load"]), np.asarray(m_ref["expert_load"]))))
  except Exception as e:  # report, keep going
    row = dict(layout=name, error=str(e).splitlines()[0][:300])
  print(json.dumps(row), flush=True)
  return row


def equivalence(n: int) -> list:
  cfg = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    layer_types=(LIGHTNING, SOFTMAX), intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                    block_size=16, rotary_dim=8, router_aux_loss_coef=0.1)
  params = model_lib.init(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = synthetic_batch(rng, 4, 128, cfg.vocab_size, docs_per_row=5)
  ref = _loss_and_grads(cfg, params, batch)
  layouts = [ParallelConfig(data=n), ParallelConfig(data=n, expert=n), ParallelConfig(data=n, expert_tensor=n),
             ParallelConfig(tensor=n), ParallelConfig(sequence=n), ParallelConfig(sequence=n, expert=n),
             ParallelConfig(data=n, fsdp=True)]
  rows = []
  # The Pallas lightning kernels inside shard_map (LASP+ on the kernels' initial/final states), named
  # explicitly so that the rows say which kernels ran ("auto" picks them on GPU as well).
  pallas_cfg = ModelConfig(**{**cfg.__dict__, "lightning_impl": "pallas"})
  for par in (ParallelConfig(data=n), ParallelConfig(sequence=n), ParallelConfig(sequence=n, expert=n)):
    rows.append(_compare(pallas_cfg, par, _layout_name(par) + ", lightning=pallas", params, batch, ref))
  for capacity in (None, 0.75):
    c = cfg if capacity is None else ModelConfig(**{**cfg.__dict__, "capacity_factor": capacity})
    c_ref = ref if capacity is None else _loss_and_grads(c, params, batch)
    for par in layouts:
      name = _layout_name(par) + (f", capacity={capacity}" if capacity else "")
      rows.append(_compare(c, par, name, params, batch, c_ref))
  return rows


def _collective_bytes(compiled_text: str) -> dict:
  ops = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
  counts = {op: 0 for op in ops}
  for line in compiled_text.splitlines():
    for op in ops:
      if re.search(rf"\b{op}(-start)?\(", line):
        counts[op] += 1
  return counts


def weak_scaling(n: int, preset: str, seq: int, per_gpu_batch: int, steps: int, overrides=()) -> list:
  base = flags_lib.preset_config(preset, overrides, base={"data.seq_len": seq})
  peak = flops.detect_peak_flops()
  rows = []
  for devices in sorted({1, n}):
    par = ParallelConfig(data=devices, expert=devices) if devices > 1 else ParallelConfig()
    cfg = Config(model=base.model, parallel=par, train=base.train, data=base.data)
    params = model_lib.init(cfg.model, jax.random.key(0))
    opt = optax.adamw(1e-4)
    batch = synthetic_batch(np.random.default_rng(0), per_gpu_batch * devices, seq, cfg.model.vocab_size)
    if devices == 1:
      step = jax.jit(training.make_train_step(cfg.model, None, opt), donate_argnums=(0, 1))
      opt_state = opt.init(params)
      text = ""
    else:
      pm = mesh_lib.build_mesh(par, jax.devices()[:devices])
      params = step_lib.shard_params(params, pm, cfg.model)
      opt_state = jax.jit(opt.init)(params)
      step = jax.jit(training.make_train_step(cfg.model, pm, opt), donate_argnums=(0, 1))
      text = step.lower(params, opt_state, batch).compile().as_text()
    dt, compile_s, loss = time_step(step, params, opt_state, batch, steps, 2)
    tps_gpu = per_gpu_batch * seq / dt
    row = dict(preset=preset, gpus=devices, seq=seq, batch_per_gpu=per_gpu_batch, step_ms=dt * 1e3,
               tokens_per_s_per_gpu=tps_gpu, mfu_per_gpu=flops.mfu(tps_gpu, cfg.model, seq, peak) if peak else None,
               collectives=_collective_bytes(text) if text else None, loss=loss)
    print(json.dumps(row), flush=True)
    rows.append(row)
  if len(rows) == 2:
    rows[1]["weak_scaling_efficiency"] = rows[1]["tokens_per_s_per_gpu"] / rows[0]["tokens_per_s_per_gpu"]
  return rows


def long_context(n: int, preset: str, seqs: list, budget_s: float, overrides=()) -> list:
  rows, start = [], time.time()
  for seq in seqs:
    if time.time() - start > budget_s:
      break
    base = flags_lib.preset_config(preset, overrides, base={"data.seq_len": seq, "model.remat": "full"})
    cfg = Config(model=base.model, parallel=ParallelConfig(sequence=n), train=base.train, data=base.data)
    try:
      pm = mesh_lib.build_mesh(cfg.parallel, jax.devices()[:n])
      params = step_lib.shard_params(model_lib.init(cfg.model, jax.random.key(0)), pm, cfg.model)
      opt = optax.adamw(1e-4)
      opt_state = jax.jit(opt.init)(params)
      step = jax.jit(training.make_train_step(cfg.model, pm, opt), donate_argnums=(0, 1))
      batch = synthetic_batch(np.random.default_rng(0), 1, seq, cfg.model.vocab_size)
      dt, compile_s, loss = time_step(step, params, opt_state, batch, 2, 1)
      mem = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.devices()[:n]) / 2**30
      row = dict(preset=preset, sequence=n, seq=seq, step_s=dt, tokens_per_s=seq / dt, peak_gib_per_gpu=mem,
                 loss=loss)
    except Exception as e:
      row = dict(preset=preset, sequence=n, seq=seq, error=str(e).splitlines()[0][:300])
      rows.append(row)
      print(json.dumps(row), flush=True)
      break
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def main():
  ap = flags_lib.build_parser(__doc__.splitlines()[0], default="hybrid_moe_100m")
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--batch_per_gpu", type=int, default=8)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--long_config", default="hybrid_100m", metavar="PRESET",
                  help="preset of the long-context part (the --config.* overrides apply to it too)")
  ap.add_argument("--long_seqs", default="32768,65536,131072,262144")
  ap.add_argument("--long_budget_s", type=float, default=40)
  ap.add_argument("--out", default=None)
  args = flags_lib.parse_args(sys.argv[1:], ap)
  try:  # both presets and every override checked before the first compilation
    flags_lib.preset_config(args.config, args.overrides)
    flags_lib.preset_config(args.long_config, args.overrides)
  except ConfigError as e:
    sys.exit(flags_lib.config_error_exit(e))
  n = jax.device_count()
  print(f"{n} x {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  result = dict(devices=n, device_kind=jax.devices()[0].device_kind, jax=jax.__version__)
  with jax.default_matmul_precision("highest"):
    result["equivalence"] = equivalence(n)
  result["weak_scaling"] = weak_scaling(n, args.config, args.seq, args.batch_per_gpu, args.steps, args.overrides)
  result["long_context"] = long_context(n, args.long_config, [int(s) for s in args.long_seqs.split(",")],
                                        args.long_budget_s, args.overrides)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
