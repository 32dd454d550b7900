"""One-device overhead of the sharded code path: `make_sharded_train_step` on a 1x1 mesh vs `make_train_step`.

Both steps run the same preset on one device (forward, backward, AdamW).  The
sharded path goes through shard_map, the tensor-parallel hooks, the sharded
ModelOps (with all axes of size 1: no collectives, plain attention and
lightning kernels, the expert-parallel MoE with padded dispatch buffers) and
the rules' sharding constraints.  Reports step time of each and the ratio, and
checks that both give the same loss.

Both paths use the config's kernels (`model.lightning_impl=auto`: the Pallas
lightning kernels and jax's Pallas flash attention on GPU, inside shard_map
too).  When the attention is not XLA's, the plain step is also timed with the
XLA attention, to separate a kernel choice from the cost of shard_map itself.

  python -m benchmarks.shard_map_overhead --config=hybrid_moe_20m --seq 2048 --batch 8 --out overhead.json
  python -m benchmarks.shard_map_overhead --config.model.lightning_impl=xla   # both paths on the XLA lightning form
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import numpy as np
import optax

from benchmarks.common import synthetic_batch, time_step
from mx01 import model as model_lib
from mx01.config import Config, ConfigError, ParallelConfig
from mx01.parallel import mesh as mesh_lib
from mx01.parallel import step as step_lib
from mx01.ops import attention_impl
from mx01.training import make_train_step
from recipes import flags as flags_lib


def main():
  ap = flags_lib.build_parser(__doc__.splitlines()[0], default="hybrid_moe_20m")
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--out", default=None)
  try:
    cfg, args = flags_lib.parse_flags(sys.argv[1:], ap, base={"model.lightning_impl": "auto"})
  except ConfigError as e:
    sys.exit(flags_lib.config_error_exit(e))
  cfg = Config(model=cfg.model, parallel=ParallelConfig(), train=cfg.train, data=cfg.data)
  mcfg = cfg.model
  device = jax.devices()[0]
  optimizer = optax.adamw(1e-4, weight_decay=0.1)
  batch = jax.device_put(synthetic_batch(np.random.default_rng(0), args.batch, args.seq, mcfg.vocab_size), device)
  results = {"device": device.device_kind, "jax": jax.__version__, "preset": args.config, "seq": args.seq,
             "batch": args.batch}

  params = model_lib.init(mcfg, jax.random.key(0))
  plain = jax.jit(make_train_step(mcfg, None, optimizer), donate_argnums=(0, 1))
  dt, compile_s, loss = time_step(plain, params, optimizer.init(params), batch, args.steps, args.warmup)
  results["plain"] = {"step_ms": dt * 1e3, "compile_s": compile_s, "loss": loss}

  # The plain step with the XLA attention as well: separates the cost of the attention kernel from the
  # cost of the shard_map machinery (earlier versions ran the XLA attention inside shard_map).
  if attention_impl(mcfg) != "xla":
    xcfg = dataclasses.replace(mcfg, attention_impl="xla")
    params = model_lib.init(xcfg, jax.random.key(0))
    plain_x = jax.jit(make_train_step(xcfg, None, optimizer), donate_argnums=(0, 1))
    dt_x, compile_x, loss_x = time_step(plain_x, params, optimizer.init(params), batch, args.steps, args.warmup)
    results["plain_xla_attention"] = {"step_ms": dt_x * 1e3, "compile_s": compile_x, "loss": loss_x}

  pmesh = mesh_lib.build_mesh(cfg.parallel, devices=[device])
  params = step_lib.shard_params(model_lib.init(mcfg, jax.random.key(0)), pmesh)
  sharded = jax.jit(make_train_step(mcfg, pmesh, optimizer), donate_argnums=(0, 1))
  dt_s, compile_s, loss_s = time_step(sharded, params, jax.jit(optimizer.init)(params), batch, args.steps,
                                      args.warmup)
  results["shard_map"] = {"step_ms": dt_s * 1e3, "compile_s": compile_s, "loss": loss_s}
  results["overhead"] = dt_s / dt - 1.0
  if "plain_xla_attention" in results:
    results["overhead_same_attention"] = dt_s / (results["plain_xla_attention"]["step_ms"] / 1e3) - 1.0
  print(json.dumps(results, indent=2))
  print(f"{args.config} seq={args.seq} batch={args.batch} on {device.device_kind}: plain {dt * 1e3:.2f} ms, "
        f"shard_map {dt_s * 1e3:.2f} ms ({100 * results['overhead']:+.1f}%), "
        f"losses {loss:.5f} / {loss_s:.5f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
