"""Throughput of the full jitted train step (forward, backward, AdamW) on one device.

For each preset and context length: step time, tokens/s, the compiled step's memory
(arguments + outputs + temporaries - donated aliases, from XLA's memory analysis), MFU from
the `scaling/` FLOP counter (causal attention work) and the 6·N·D MFU, against
the device's dense bf16 peak.  The batch is sized to a token budget per step
and halved on out-of-memory.

  python -m benchmarks.train_step --config=hybrid_1b,softmax_1b,lightning_1b --seq 2048,8192,32768 \
      --tokens_per_step 65536 --out results.json
  python -m benchmarks.train_step --config=hybrid_moe_1b --seq 8192 --config.model.capacity_factor=1.25

`--config.section.key=value` overrides apply to every preset (data.seq_len and
model.max_seq_len follow --seq).
"""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np
import optax

from benchmarks.common import synthetic_batch, time_step
from mx01 import model as model_lib
from mx01.config import ConfigError
from mx01.training import make_train_step
from recipes import flags as flags_lib
from scaling import flops


def bench_one(cfg, seq: int, batch: int, steps: int, warmup: int, docs_per_row: int = 4, name: str = ""):
  mcfg = cfg.model
  params = model_lib.init(mcfg, jax.random.key(0))
  opt = optax.adamw(1e-4, weight_decay=0.1)
  opt_state = opt.init(params)
  step = jax.jit(make_train_step(mcfg, None, opt), donate_argnums=(0, 1))
  data = synthetic_batch(np.random.default_rng(0), batch, seq, mcfg.vocab_size, docs_per_row)
  if docs_per_row == 1:  # one document per row: no segment ids, so attention needs no document mask
    data = {"tokens": data["tokens"]}
  # This configuration's own footprint from the compiled step (the allocator's peak counter is
  # process-wide and never resets, so it cannot tell one row from the previous ones).
  print(f"  {name} @ {seq} x {batch}: compiling", flush=True)
  t0 = time.perf_counter()
  lowered = step.lower(params, opt_state, data)  # Pallas/Mosaic kernels build their code here
  print(f"  lowered in {time.perf_counter() - t0:.1f} s", flush=True)
  compiled = lowered.compile()  # timed below too: one compilation per row
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  step_bytes = 0
  if mem is not None:
    step_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                  - getattr(mem, "alias_size_in_bytes", 0))
  print(f"  compiled in {compile_s:.1f} s, step memory {step_bytes / 2**30:.1f} GiB; timing {warmup} + {steps} steps",
        flush=True)
  dt, _, loss = time_step(compiled, params, opt_state, data, steps, warmup)
  return dt, compile_s, step_bytes, loss


def main(argv=None):
  ap = flags_lib.build_parser(__doc__.split("\n")[0], default="softmax_100m,lightning_100m,hybrid_100m,hybrid_moe_100m",
                              several=True)
  ap.add_argument("--seq", default="2048,8192")
  ap.add_argument("--tokens_per_step", type=int, default=65536)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--docs_per_row", type=int, default=4,
                  help="documents packed in each row; 1 = rows without segment ids")
  ap.add_argument("--time_budget_s", type=float, default=1e9, help="skip remaining runs after this many seconds")
  ap.add_argument("--out", default=None)
  args = flags_lib.parse_args(sys.argv[1:] if argv is None else argv, ap)
  if args.docs_per_row < 1:
    ap.error(f"--docs_per_row must be at least 1, got {args.docs_per_row}")
  seqs = [int(s) for s in args.seq.split(",")]
  config_of = lambda name, seq: flags_lib.preset_config(  # noqa: E731
      name, args.overrides, base={"data.seq_len": seq, "model.max_seq_len": max(seq, 1)})
  try:  # every name and override checked before the first compilation
    names = flags_lib.preset_names(args)
    for name in names:
      config_of(name, seqs[0])
  except ConfigError as e:
    return flags_lib.config_error_exit(e)
  peak = flops.detect_peak_flops()
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind}, jax {jax.__version__}, peak bf16 {peak}")
  rows, start = [], time.time()
  for name in names:
    for seq in seqs:
      if time.time() - start > args.time_budget_s:
        print(f"time budget reached; skipping {name} @ {seq}")
        continue
      cfg = config_of(name, seq)
      batch = max(1, args.tokens_per_step // seq)
      while True:
        try:
          dt, compile_s, peak_mem, loss = bench_one(cfg, seq, batch, args.steps, args.warmup, args.docs_per_row, name)
          break
        except Exception as e:  # out of memory: halve the batch
          if "RESOURCE_EXHAUSTED" in str(e) and batch > 1:
            print(f"  batch {batch} ran out of memory; retrying with {batch // 2}", flush=True)
            batch //= 2
            continue
          print(f"{name} @ {seq}: failed: {str(e).splitlines()[0][:200]}")
          dt = None
          break
      if dt is None:
        continue
      tps = batch * seq / dt
      row = dict(preset=name, seq=seq, batch=batch, step_ms=dt * 1e3, tokens_per_s=tps, compile_s=compile_s,
                 step_mem_gb=peak_mem / 2**30, loss=loss,
                 mfu=flops.mfu(tps, cfg.model, seq, peak) if peak else None,
                 mfu_6nd=(tps * flops.six_nd_flops_per_token(cfg.model) / peak) if peak else None,
                 lightning_impl=cfg.model.lightning_impl, attention_impl=cfg.model.attention_impl,
                 remat=cfg.model.remat, docs_per_row=args.docs_per_row)
      rows.append(row)
      print(json.dumps(row), flush=True)
  print("\n| preset | seq | batch | step ms | tokens/s | MFU | MFU (6ND) | step GiB |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    fmt = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"| {r['preset']} | {r['seq']} | {r['batch']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
          f"{fmt(r['mfu'])} | {fmt(r['mfu_6nd'])} | {r['step_mem_gb']:.1f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(device=dev.device_kind, jax=jax.__version__, rows=rows), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
