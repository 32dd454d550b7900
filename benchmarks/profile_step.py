"""Where a train step's device time goes: a jax.profiler trace, summarised by kernel category.

    python -m benchmarks.profile_step --config=hybrid_1b --seq 8192 --batch 4 --out results/gpu/profile.json
    python -m benchmarks.profile_step --config=hybrid_moe_1b --seq 2048 --config.model.moe_impl=ragged

Runs the jitted train step (as benchmarks/train_step.py) a few times under
`jax.profiler.trace`, reads the trace the profiler writes
(plugins/profile/*/*.trace.json.gz, Chrome trace format), keeps the device
events (processes named /device:GPU:*), and sums kernel time per step by
category: matmuls (cuBLAS/CUTLASS GEMMs), the Pallas lightning kernels, flash
attention, grouped (ragged) matmuls, XLA fusions (elementwise, reductions,
norms), copies/transposes, collectives, other.  Also the device-busy fraction
of the wall time (gaps are launch or host overhead) and the top kernels.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

CATEGORIES = (
    ("lightning_pallas", re.compile(r"lightning", re.I)),
    ("flash_attention", re.compile(r"mha|flash|attention|fmha|cudnn", re.I)),
    ("grouped_matmul", re.compile(r"ragged|grouped", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_|wgmma|triton_dot|__dot|dot_", re.I)),
    ("collective", re.compile(r"nccl|all_reduce|all-reduce|all_gather|all-gather|reduce_scatter|all_to_all", re.I)),
    ("copy_transpose", re.compile(r"copy|transpose|memcpy|memset|dynamic_update_slice|concatenate", re.I)),
    ("fusion", re.compile(r"fusion|reduce|loop_|input_|wrapped_|convert|add|multiply|select|scatter|gather", re.I)),
)


def categorise(name: str) -> str:
  for cat, pattern in CATEGORIES:
    if pattern.search(name):
      return cat
  return "other"


def load_trace(log_dir: str) -> dict:
  paths = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz")), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {log_dir}/plugins/profile")
  with gzip.open(paths[-1], "rb") as f:
    return json.load(f)


def device_events(trace: dict, device_pattern: str = r"/device:GPU:0") -> list:
  """Complete ('X') events of the matching device processes: [(name, start_us, dur_us, args)]."""
  pids = {e["pid"] for e in trace.get("traceEvents", [])
          if e.get("ph") == "M" and e.get("name") == "process_name"
          and re.search(device_pattern, str(e.get("args", {}).get("name", "")))}
  return [(e.get("name", ""), float(e["ts"]), float(e.get("dur", 0.0)), e.get("args", {}))
          for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("pid") in pids]


_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")


def hlo_index(hlo_text: str) -> dict:
  """Instruction name (dots as underscores, as kernels are named) -> (shape and op, jax op_name, source)."""
  index = {}
  for line in hlo_text.splitlines():
    m = _HLO_LINE.match(line)
    if not m:
      continue
    name, rest = m.group(1).replace(".", "_"), m.group(2)
    op = re.search(r'op_name="([^"]*)"', rest)
    src = re.search(r'source_file="([^"]*)" source_line=(\d+)', rest)
    index.setdefault(name, (rest.split(", metadata=")[0][:240], op.group(1)[-200:] if op else "",
                            f"{os.path.basename(src.group(1))}:{src.group(2)}" if src else ""))
  return index


def summarise(events: list, steps: int, wall_s: float, top: int = 25, hlo: dict | None = None) -> dict:
  by_cat, by_name, calls, args_of = collections.Counter(), collections.Counter(), collections.Counter(), {}
  for name, _, dur, args in events:
    by_cat[categorise(name)] += dur
    by_name[name] += dur
    calls[name] += 1
    args_of.setdefault(name, args)
  total = sum(by_cat.values())
  # Busy time: union of the kernel intervals (streams may overlap).
  busy, end = 0.0, -1.0
  for _, ts, dur, _ in sorted(events, key=lambda e: e[1]):
    if ts + dur <= end:
      continue
    busy += ts + dur - max(ts, end)
    end = ts + dur
  per_step = lambda us: us / steps / 1e3  # noqa: E731  -> ms per step
  return {
      "steps": steps, "wall_ms_per_step": wall_s / steps * 1e3, "kernel_ms_per_step": per_step(total),
      "busy_ms_per_step": per_step(busy), "num_kernels_per_step": len(events) / steps,
      "by_category_ms_per_step": {c: per_step(v) for c, v in by_cat.most_common()},
      "by_category_share": {c: v / total for c, v in by_cat.most_common()} if total else {},
      "top_kernels_ms_per_step": [(n, per_step(v)) for n, v in by_name.most_common(top)],
      # Launches of each top kernel per step and the time of one launch: XLA reuses one kernel for identical
      # fusions (e.g. the same op in every layer), so a name's total may be many launches.
      "top_kernels_calls_per_step": {n: calls[n] / steps for n, _ in by_name.most_common(top)},
      "top_kernels_ms_per_call": {n: v / calls[n] / 1e3 for n, v in by_name.most_common(top)},
      # What each top kernel is: the trace's own args and, where the name matches an HLO
      # instruction of the compiled step, its shape/op, the jax op_name and the source line.
      "top_kernels_detail": {n: {"trace_args": {k: str(v)[:300] for k, v in args_of[n].items()},
                                 "hlo": (hlo or {}).get(str(args_of[n].get("hlo_op", n)).replace(".", "_"))}
                             for n, _ in by_name.most_common(top)},
  }


def main(argv=None):
  import jax
  import numpy as np
  import optax

  from benchmarks.common import synthetic_batch
  from mx01 import model as model_lib
  from mx01.config import ConfigError
  from mx01.training import make_train_step
  from recipes import flags as flags_lib

  ap = flags_lib.build_parser(__doc__.split("\n")[0], default="hybrid_1b")
  ap.add_argument("--seq", type=int, default=8192)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--top", type=int, default=25, help="how many kernels to list by time")
  ap.add_argument("--log_dir", default=None, help="keep the raw trace here (default: a temporary folder)")
  ap.add_argument("--out", default=None)
  args = flags_lib.parse_args(sys.argv[1:] if argv is None else argv, ap)
  try:
    cfg = flags_lib.preset_config(args.config, args.overrides,
                                  base={"data.seq_len": args.seq, "model.max_seq_len": args.seq})
  except ConfigError as e:
    sys.exit(flags_lib.config_error_exit(e))
  mcfg = cfg.model
  params = model_lib.init(mcfg, jax.random.key(0))
  opt = optax.adamw(1e-4, weight_decay=0.1)
  opt_state = opt.init(params)
  step = jax.jit(make_train_step(mcfg, None, opt), donate_argnums=(0, 1))
  batch = synthetic_batch(np.random.default_rng(0), args.batch, args.seq, mcfg.vocab_size)
  step = step.lower(params, opt_state, batch).compile()  # compiled once: its HLO names the kernels
  hlo_text = step.as_text()
  for _ in range(2):  # warm up outside the trace
    params, opt_state, metrics = step(params, opt_state, batch)
  jax.block_until_ready(metrics)
  log_dir = args.log_dir or tempfile.mkdtemp(prefix="mx01_profile_")
  with jax.profiler.trace(log_dir):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      params, opt_state, metrics = step(params, opt_state, batch)
    jax.block_until_ready(metrics)
    wall = time.perf_counter() - t0
  pattern = r"/device:GPU:0" if jax.default_backend() == "gpu" else r"/host:CPU|/device:CPU"
  trace = load_trace(log_dir)
  events = device_events(trace, pattern)
  if not events:
    names = sorted({str(e.get("args", {}).get("name")) for e in trace.get("traceEvents", [])
                    if e.get("ph") == "M" and e.get("name") == "process_name"})
    raise RuntimeError(f"no events of a process matching {pattern!r}; processes in the trace: {names}")
  summary = summarise(events, args.steps, wall, top=args.top, hlo=hlo_index(hlo_text))
  summary.update(preset=args.config, seq=args.seq, batch=args.batch, overrides=args.overrides,
                 device=jax.devices()[0].device_kind, jax=jax.__version__)
  print(f"{args.config} seq {args.seq} batch {args.batch}: wall {summary['wall_ms_per_step']:.1f} ms/step, "
        f"kernels {summary['kernel_ms_per_step']:.1f}, busy {summary['busy_ms_per_step']:.1f}")
  for c, v in summary["by_category_ms_per_step"].items():
    print(f"  {c:18s} {v:8.2f} ms  {100 * summary['by_category_share'][c]:5.1f}%")
  for n, v in summary["top_kernels_ms_per_step"][:args.top]:
    detail = summary["top_kernels_detail"][n]
    hlo = detail["hlo"] or ("", detail["trace_args"].get("hlo_op", ""), "")
    print(f"  {v:8.2f} ms  {n[:60]:60s} {hlo[2]:28s} {hlo[1][-90:]}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=1)
  return summary


if __name__ == "__main__":
  main()
