"""Where the lightning kernels' time goes, kernel by kernel: plain rows against packed ones.

    python -m benchmarks.lightning_profile --rows 16x8192x16,16x8192x64 --out results/gpu/lightning_profile.json

For each row (batch x seq x heads, head dim 128, bf16) and variant (plain: one document a row; packed: random
document lengths, as `benchmarks/lightning_attention.py --rows issue`), the jitted forward+backward runs
`--reps` times under `jax.profiler.trace`; the device events are summed per kernel name (lightning_fwd,
lightning_bwd_dq, lightning_bwd_dkdv, the split path's states kernels, XLA fusions), in ms per call.
GPU only (the trace's device is /device:GPU:0).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time

from benchmarks import lightning_attention as la
from benchmarks import profile_step


def profile_case(b, t, h, variant, reps):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mx01 import lightning as ref
  log_decay = jnp.asarray(ref.minimax_log_decay(h, 0, 80), jnp.float32)
  seg = None if variant == "plain" else jnp.asarray(la.segment_ids_of(la.doc_lengths(b, t)))
  _, fwd_bwd = la.linear_fns("pallas", log_decay, segment_ids=seg)
  q, k, v, do = la.make_inputs(b, t, h, la.HEAD_DIM, jnp.bfloat16)
  jax.block_until_ready(fwd_bwd(q, k, v, do))  # compile
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      t0 = time.perf_counter()
      for _ in range(reps):
        jax.block_until_ready(fwd_bwd(q, k, v, do))
      wall = time.perf_counter() - t0
    events = profile_step.device_events(profile_step.load_trace(log_dir))
  by_name = collections.Counter()
  for name, _, dur, _ in events:
    by_name[name] += dur / reps / 1e3
  return dict(b=b, t=t, h=h, variant=variant, reps=reps, wall_ms=wall / reps * 1e3,
              kernel_ms=float(np.sum(list(by_name.values()))),
              kernels_ms={n: round(v, 4) for n, v in by_name.most_common(12)})


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rows", default="16x8192x16,16x8192x64", help="comma-separated BxTxH")
  ap.add_argument("--variants", default="plain,packed")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  try:
    rows = [tuple(int(x) for x in r.split("x")) for r in args.rows.split(",")]
    if any(len(r) != 3 for r in rows):
      raise ValueError
  except ValueError:
    ap.error(f"--rows: expected comma-separated BxTxH such as 16x8192x16, got {args.rows!r}")
  import jax
  if jax.default_backend() != "gpu":
    print(f"lightning_profile: needs a GPU (the backend here is {jax.default_backend()!r})", file=sys.stderr)
    return 2
  results = []
  for b, t, h in rows:
    for variant in args.variants.split(","):
      entry = profile_case(b, t, h, variant, args.reps)
      results.append(entry)
      print(f"{b}x{t}x{h} {variant}: {entry['kernel_ms']:.3f} ms of kernels per call "
            f"({entry['wall_ms']:.3f} ms wall)", flush=True)
      for name, ms in entry["kernels_ms"].items():
        print(f"    {ms:8.3f}  {name}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
