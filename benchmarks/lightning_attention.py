"""Benchmark of the lightning attention kernels on one GPU.

Times, in one run and on the same device:
  * pallas  - `pallas_kernels.lightning_attention` (forward; forward+backward),
  * fla     - flash-linear-attention's Triton `chunk_simple_gla` (torch), if importable,
  * xla     - `mx01.lightning.lightning_attention_chunked` (block 256),
  * cudnn   - softmax flash attention, `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`,
and the decode step (pallas kernel vs the XLA step) against batch size.
Reports ms, achieved TFLOP/s and GB/s, each kernel's roofline floor from its
flop count and minimum bytes, and ratios; prints markdown tables and writes JSON.

    python benchmarks/lightning_attention.py --out results.json [--quick]

`--rows issue` instead times a fixed table of shapes (ISSUE_ROWS, head dim 128,
bf16), each plain, packed (random document lengths: segment_ids for us,
cu_seqlens for fla) and at a length that is not a multiple of the block, forward
and forward+backward (grads of q, k, v), ours beside fla's chunk_simple_gla, with
the HBM floor (bytes moved / HBM_BYTES_PER_S) and the ratios fla/ours and
ours/floor.  `--dry_run` prints those rows and their floors without a GPU.

    python benchmarks/lightning_attention.py --rows issue --out issue.json [--variants plain,packed]
        [--num_splits 4,8,16]   # each case at each split count (tuning LightningConfig.num_splits)
        [--settings default bwd_split_dkdv=true]   # each case at each of these LightningConfig overrides
        [--tune]                # each case at every setting of TUNE_FWD (forward) or TUNE_BWD (fwd+bwd)

`--tune` fills the per-shape table: row by row, the forward at each tile/launch setting of TUNE_FWD (and,
where the sequence is split, at half and twice the split count the default chooses), then forward+backward
at each backward setting of TUNE_BWD; the JSON keeps every timing and the table the fastest per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

HEADS = 64
HEAD_DIM = 128
CHUNK = 64                    # block size the flop counts assume (pallas and fla both use 64)
TOKEN_HEADS = 1 << 23         # batch * heads * seq kept constant so every length fills the chip


def shapes(seqs):
  """(batch, seq, heads) with batch * heads * seq = TOKEN_HEADS."""
  out = []
  for t in seqs:
    bh = max(1, TOKEN_HEADS // t)
    heads = min(HEADS, bh)
    out.append((max(1, bh // heads), t, heads))
  return out


def linear_flops(b, t, h, d, backward):
  """Flops of the block algorithm (full C x C blocks): fwd 2C(dk+dv) + 4 dk dv per token and head,
  backward 6C(dk+dv) + 10 dk dv (dQ sweep recomputes the state, dK/dV sweep carries dS)."""
  per_token = 2 * CHUNK * 2 * d + 4 * d * d
  if backward:
    per_token += 6 * CHUNK * 2 * d + 10 * d * d
  return b * t * h * per_token


def io_bytes(b, t, h, d, backward, itemsize=2):
  """Minimum HBM bytes of the [b, t, h, d] tensors: fwd reads q, k, v and writes o (4 tensors); fwd+bwd
  moves 11 (adds dO read, q, k, v read again, dq, dk, dv written)."""
  return (11 if backward else 4) * b * t * h * d * itemsize


def linear_bytes(b, t, h, d, backward, itemsize=2):
  """`io_bytes` plus the float32 final state."""
  return io_bytes(b, t, h, d, backward, itemsize) + b * h * d * d * 4


def softmax_flops(b, t, h, d, backward):
  fwd = 2 * 2 * b * h * t * t * d / 2  # QK^T and PV, causal half
  return fwd * (3.5 if backward else 1.0)


# ---------------------------------------------------------------------------------------------- issue rows

# (batch, seq, heads): where batch * heads is 8-64 the sequence split decides the speed.
ISSUE_ROWS = [(16, 8192, 16), (4, 32768, 16), (1, 131072, 16), (1, 1 << 20, 16), (64, 2048, 64), (16, 8192, 64),
              (1, 131072, 64), (1, 1 << 20, 8)]
VARIANTS = ("plain", "packed", "ragged")
HBM_BYTES_PER_S = 4.29e12     # H200 HBM3e copy bandwidth the floors assume
RAGGED_CUT = 37               # tokens the "ragged" variant drops: its length is not a multiple of any block
# Settings `--tune` times per issue row, as overrides of pk.DEFAULT_CONFIG: the forward's tiles and launch
# (TUNE_FWD, forward cases) and the backward's (TUNE_BWD, forward+backward cases, forward at the default).
# Around the defaults the first sweep chose (3 stages both ways); block 128 holds a [128, 128] f32 score tile
# and, at head dim 128, fits only 2 stages in shared memory; value tile 64 doubles the reads of q and k.
TUNE_FWD = (dict(), dict(num_stages=2), dict(num_stages=4), dict(num_warps=4), dict(block_v=64, num_warps=4),
            dict(block_size=128, bwd_block_size=64, num_stages=2), dict(block_size=32, num_warps=4, num_stages=4))
TUNE_BWD = (dict(), dict(bwd_num_stages=2), dict(bwd_num_stages=4), dict(bwd_block_k=64),
            dict(bwd_block_k=64, bwd_num_stages=4), dict(bwd_block_size=32, bwd_num_warps=4, bwd_num_stages=4),
            dict(bwd_split_dkdv=True))
MEAN_DOC = 4096               # mean document length of the "packed" variant


def issue_cases(variants=VARIANTS, rows=ISSUE_ROWS):
  """[{b, t, h, variant}] for every row and variant (ragged: t - RAGGED_CUT tokens)."""
  cases = []
  for b, t, h in rows:
    for variant in variants:
      if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose among {', '.join(VARIANTS)}")
      cases.append(dict(b=b, t=t - RAGGED_CUT if variant == "ragged" else t, h=h, variant=variant))
  return cases


def doc_lengths(b, t, seed=0, mean=MEAN_DOC):
  """Random document lengths of each packed row (lists summing to t; uniform in [1, 2 * mean))."""
  import numpy as np
  rng = np.random.default_rng(seed + 7919 * t + b)
  rows = []
  for _ in range(b):
    lengths = rng.integers(1, 2 * min(mean, t), size=2 * t // min(mean, t) + 2)
    ends = np.cumsum(lengths)
    lengths = lengths[: int(np.searchsorted(ends, t)) + 1]
    lengths[-1] -= int(lengths.sum()) - t
    rows.append([int(x) for x in lengths if x > 0])
  return rows


def segment_ids_of(docs):
  """[b, t] int32 segment ids of the rows `doc_lengths` made (ids count up along each row)."""
  import numpy as np
  return np.stack([np.repeat(np.arange(len(row), dtype=np.int32), row) for row in docs])


def cu_seqlens_of(docs):
  """fla's varlen form of the same documents: all rows concatenated into one sequence, [num_docs + 1] int64."""
  import numpy as np
  return np.concatenate([[0], np.cumsum([n for row in docs for n in row])]).astype(np.int64)


def floor_ms(b, t, h, backward, d=HEAD_DIM, itemsize=2, bytes_per_s=HBM_BYTES_PER_S):
  """HBM floor: `io_bytes` at the device's copy rate."""
  return io_bytes(b, t, h, d, backward, itemsize) / bytes_per_s * 1e3


def case_key(e):
  return (e["b"], e["t"], e["h"], e["variant"], e["backward"])


def issue_table(ours, fla):
  """Markdown: one line per case and pass, ours beside fla, with the floor and ratios."""
  fla_by = {case_key(e): e for e in fla}
  fmt = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"
  lines = [f"floor: bytes moved / {HBM_BYTES_PER_S / 1e12:.2f} TB/s (fwd 4 tensors, fwd+bwd 11), head dim "
           f"{HEAD_DIM}, bf16", "",
           "| pass | b x t x h | variant | splits | ours ms | fla ms | floor ms | fla/ours | ours/floor |",
           "|---|---|---|---|---|---|---|---|---|"]
  order = lambda e: (e["backward"], _row_order(e), VARIANTS.index(e["variant"]), e.get("num_splits") or 0)
  for e in sorted(ours, key=order):
    ms, f = e.get("ms"), fla_by.get(case_key(e), {}).get("ms")
    fl = floor_ms(e["b"], e["t"], e["h"], e["backward"])
    fla_ratio = None if ms is None or f is None else f / ms
    lines.append(f"| {'fwd+bwd' if e['backward'] else 'fwd'} | {e['b']}x{e['t']}x{e['h']} | {e['variant']} | "
                 f"{e.get('num_splits') or 'auto'} | {fmt(ms)} | {fmt(f)} | {fmt(fl, 3)} | {fmt(fla_ratio)} | "
                 f"{fmt(None if ms is None else ms / fl)} |")
  return "\n".join(lines)


def _row_order(e):
  """Sort key: the place of the case's row in ISSUE_ROWS."""
  t = e["t"] + (RAGGED_CUT if e["variant"] == "ragged" else 0)
  row = (e["b"], t, e["h"])
  return ISSUE_ROWS.index(row) if row in ISSUE_ROWS else len(ISSUE_ROWS)


# ---------------------------------------------------------------------------------------------- torch / fla


def run_fla(cases, out_path):
  """Times fla's chunk_simple_gla on `cases` ({b, t, h, backward, variant?}; "packed" rows go through
  cu_seqlens as one concatenated sequence); runs in its own process so torch and JAX don't share the allocator."""
  import torch
  import triton
  from mx01.lightning import minimax_log_decay  # numpy only: JAX is imported but never started here
  results = []
  try:
    from fla.ops.simple_gla import chunk_simple_gla
  except Exception as e:  # noqa: BLE001
    json.dump({"error": f"fla not importable: {e!r}"}, open(out_path, "w"))
    return
  dev = "cuda"
  for case in cases:
    b, t, h, backward = case["b"], case["t"], case["h"], case["backward"]
    entry = dict(impl="fla", **case)
    try:
      torch.manual_seed(0)
      kw = {}
      shape = (b, t, h, HEAD_DIM)
      if case.get("variant") == "packed":
        cu = torch.from_numpy(cu_seqlens_of(doc_lengths(b, t)))
        kw = dict(cu_seqlens=cu.to(dev), cu_seqlens_cpu=cu)
        shape = (1, b * t, h, HEAD_DIM)
      q = (torch.randn(shape, device=dev) * HEAD_DIM ** -0.5).bfloat16().requires_grad_(backward)
      k = (torch.randn(shape, device=dev) * HEAD_DIM ** -0.5).bfloat16().requires_grad_(backward)
      v = torch.randn(shape, device=dev).bfloat16().requires_grad_(backward)
      g = torch.from_numpy(minimax_log_decay(h, 0, 80)).to(dev)
      do = torch.randn(shape, device=dev).bfloat16()

      def fwd():
        return chunk_simple_gla(q, k, v, g_gamma=g, scale=1.0, output_final_state=True, **kw)

      def fwd_bwd():
        o, _ = fwd()
        torch.autograd.grad(o, (q, k, v), do)

      if backward:
        ms = triton.testing.do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
      else:
        with torch.no_grad():
          ms = triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")
      entry.update(ms=ms)
      del q, k, v, do
    except Exception as e:  # noqa: BLE001
      entry.update(error=repr(e)[:300])
    torch.cuda.empty_cache()
    results.append(entry)
    print("fla", entry, flush=True)
    # after every case, so a run cut short by its time limit keeps what it measured
    json.dump({"results": results, "torch": torch.__version__, "triton": triton.__version__}, open(out_path, "w"))


def fla_in_subprocess(cases, out_path, budget_s=None):
  """Runs `run_fla` in a fresh process, stopped after `budget_s` seconds (the cases it finished are kept);
  returns its results ([] when fla is missing or failed)."""
  cases_path, fla_path = out_path + ".fla_cases.json", out_path + ".fla.json"
  json.dump(cases, open(cases_path, "w"))
  t0 = time.time()
  # fla's kernels autotune on their first call (minutes for the backward at these rows); with the results
  # kept in triton's cache (TRITON_CACHE_DIR, default ~/.triton/cache) a later run reuses the tuned configs.
  # The timings are the same either way: they are taken after the warm-up.
  env = dict(os.environ, TRITON_CACHE_AUTOTUNING=os.environ.get("TRITON_CACHE_AUTOTUNING", "1"))
  try:
    subprocess.run([sys.executable, os.path.abspath(__file__), "--fla-only", "--fla-cases", cases_path, "--out",
                    fla_path], check=False, timeout=budget_s, env=env)
  except subprocess.TimeoutExpired:
    print(f"fla stopped after its {budget_s:.0f}s budget", flush=True)
  print(f"fla done in {time.time() - t0:.0f}s", flush=True)
  try:
    data = json.load(open(fla_path))
  except Exception as e:  # noqa: BLE001
    print("fla results missing:", e)
    return []
  if "error" in data:
    print("fla:", data["error"])
  return data.get("results", [])


# ---------------------------------------------------------------------------------------------- jax


def time_jax(fn, *args, budget_s=0.5):
  import jax
  jax.block_until_ready(fn(*args))  # compile
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  reps = int(min(20, max(3, budget_s / max(first, 1e-6))))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def device_ceilings():
  """Measured copy bandwidth (bytes read + written) and bf16 matmul rate."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((1 << 30,), jnp.float32) * 1.5  # 4 GiB
  copy = jax.jit(lambda a: a * 1.0001)
  ms = time_jax(copy, x)
  bw = 2 * x.nbytes / (ms * 1e-3)
  del x
  n = 8192
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  ms = time_jax(jax.jit(lambda a, b: a @ b), a, b)
  return dict(copy_GBps=bw / 1e9, bf16_TFLOPs=2 * n ** 3 / (ms * 1e-3) / 1e12)


def make_inputs(b, t, h, d, dtype):
  import jax
  import jax.numpy as jnp
  ks = jax.random.split(jax.random.PRNGKey(t + b), 4)
  q = (jax.random.normal(ks[0], (b, t, h, d), jnp.float32) * d ** -0.5).astype(dtype)
  k = (jax.random.normal(ks[1], (b, t, h, d), jnp.float32) * d ** -0.5).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(dtype)
  return q, k, v, do


def linear_fns(impl, log_decay, config=None, segment_ids=None, interpret=False):
  """(fwd(q, k, v), fwd_bwd(q, k, v, do)) of one implementation, jitted; the segment ids are an argument of the
  compiled functions, not a constant folded into them (XLA takes seconds to constant-fold their index
  computations at a million tokens)."""
  import jax
  import pallas_kernels
  from mx01 import lightning as ref
  if impl == "pallas":
    attn = lambda q, k, v, seg: pallas_kernels.lightning_attention(q, k, v, log_decay, segment_ids=seg,
                                                                   config=config, interpret=interpret)
  else:
    attn = lambda q, k, v, seg: ref.lightning_attention_chunked(q, k, v, log_decay, block_size=256, segment_ids=seg)

  fwd_jit = jax.jit(attn)

  @jax.jit
  def fwd_bwd_jit(q, k, v, do, seg):
    # o is returned as well: the Pallas backward keeps q, k, v (not o) as residuals, so with only the gradients
    # as outputs XLA would drop the forward kernel and time the backward alone.
    (o, state), vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg), q, k, v)
    return o, vjp((do, jax.numpy.zeros_like(state)))

  return (lambda q, k, v: fwd_jit(q, k, v, segment_ids)), (lambda q, k, v, do: fwd_bwd_jit(q, k, v, do, segment_ids))


def softmax_fns():
  import jax
  attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  fwd = jax.jit(attn)

  @jax.jit
  def fwd_bwd(q, k, v, do):
    o, vjp = jax.vjp(attn, q, k, v)
    return o, vjp(do)

  return fwd, fwd_bwd


def record(results, impl, b, t, h, backward, fn, args, ceil, softmax=False, **extra):
  import jax
  entry = dict(impl=impl, b=b, t=t, h=h, backward=backward, **extra)
  try:
    ms = time_jax(fn, *args)
    entry.update(ms=ms)
  except Exception as e:  # noqa: BLE001
    entry.update(error=repr(e)[:300])
  add_roofline(entry, ceil, softmax)
  results.append(entry)
  print(impl, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry.items()}, flush=True)
  jax.clear_caches()
  return entry


def add_roofline(entry, ceil, softmax=False):
  b, t, h, backward = entry["b"], entry["t"], entry["h"], entry["backward"]
  flops = (softmax_flops if softmax else linear_flops)(b, t, h, HEAD_DIM, backward)
  nbytes = (io_bytes if softmax else linear_bytes)(b, t, h, HEAD_DIM, backward)
  floor_ms = max(flops / (ceil["bf16_TFLOPs"] * 1e12), nbytes / (ceil["copy_GBps"] * 1e9)) * 1e3
  entry.update(flops=flops, bytes=nbytes, floor_ms=floor_ms)
  if "ms" in entry:
    entry.update(TFLOPs=flops / (entry["ms"] * 1e-3) / 1e12, GBps=nbytes / (entry["ms"] * 1e-3) / 1e9,
                 vs_floor=entry["ms"] / floor_ms)


def bench_decode(ceil, results, batches):
  import jax
  import jax.numpy as jnp
  import pallas_kernels as pk
  from mx01 import lightning as ref
  h, d, steps = HEADS, HEAD_DIM, 20
  log_decay = jnp.asarray(ref.minimax_log_decay(h, 0, 80))
  decode = lambda cfg: jax.jit(lambda q, k, v, s: pk.lightning_decode(q, k, v, log_decay, s, config=cfg),
                               donate_argnums=3)
  impls = {
      "pallas": decode(pk.DEFAULT_CONFIG),
      "pallas-v128-w8": decode(pk.LightningConfig(decode_block_v=128, decode_num_warps=8)),
      "pallas-v32-w4": decode(pk.LightningConfig(decode_block_v=32, decode_num_warps=4)),
      "xla": jax.jit(lambda q, k, v, s: ref.lightning_decode_step(q, k, v, log_decay, s), donate_argnums=3),
  }
  for b in batches:
    ks = jax.random.split(jax.random.PRNGKey(b), 4)
    q, k, v = (jax.random.normal(ks[i], (b, h, d), jnp.bfloat16) for i in range(3))
    for name, step in impls.items():
      entry = dict(impl=f"decode-{name}", b=b, h=h)
      try:
        state = jax.random.normal(ks[3], (b, h, d, d), jnp.float32) * 0.1
        for _ in range(3):
          _, state = step(q, k, v, state)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(steps):
          _, state = step(q, k, v, state)
        jax.block_until_ready(state)
        ms = (time.perf_counter() - t0) / steps * 1e3
        nbytes = 2 * b * h * d * d * 4 + 4 * b * h * d * 2
        entry.update(ms_per_token=ms, GBps=nbytes / (ms * 1e-3) / 1e9,
                     frac_of_copy_bw=nbytes / (ms * 1e-3) / 1e9 / ceil["copy_GBps"])
        del state
      except Exception as e:  # noqa: BLE001
        entry.update(error=repr(e)[:300])
      results.append(entry)
      print(entry, flush=True)


def markdown(results, fla, ceil):
  lines = [f"ceilings measured: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_TFLOPs']:.0f} TFLOP/s", ""]
  fla_ms = {(r["t"], r["backward"]): r.get("ms") for r in fla}
  lines += ["| pass | b x t x h | pallas ms | TFLOP/s | GB/s | floor ms | pallas/floor | fla ms | fla/pallas "
            "| xla ms | xla/pallas | cudnn softmax ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  by = {(r["impl"], r["t"], r["backward"]): r for r in results if "t" in r}
  for (impl, t, backward), r in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][1])):
    if impl != "pallas":
      continue
    f = fla_ms.get((t, backward))
    x = by.get(("xla", t, backward), {}).get("ms")
    c = by.get(("cudnn", t, backward), {}).get("ms")
    ms = r.get("ms")
    fmt = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"
    ratio = lambda a: "-" if (a is None or ms is None) else f"{a / ms:.2f}"
    lines.append(f"| {'fwd+bwd' if backward else 'fwd'} | {r['b']}x{t}x{r['h']} | {fmt(ms)} | {fmt(r.get('TFLOPs'), 0)} | "
                 f"{fmt(r.get('GBps'), 0)} | {fmt(r['floor_ms'])} | {fmt(r.get('vs_floor'))} | {fmt(f)} | {ratio(f)} | "
                 f"{fmt(x)} | {ratio(x)} | {fmt(c)} |")
  lines += ["", "| decode batch | pallas ms/token | GB/s | of copy bw | best pallas tile GB/s | xla ms/token | GB/s |",
            "|---|---|---|---|---|---|---|"]
  dec = {(r["impl"], r["b"]): r for r in results if r["impl"].startswith("decode")}
  for b in sorted({k[1] for k in dec}):
    p, x = dec.get(("decode-pallas", b), {}), dec.get(("decode-xla", b), {})
    g = lambda r, key, p=3: f"{r[key]:.{p}f}" if key in r else "-"
    tiles = [r for (impl, bb), r in dec.items() if bb == b and impl.startswith("decode-pallas") and "GBps" in r]
    best = max(tiles, key=lambda r: r["GBps"]) if tiles else {}
    best_txt = f"{best['GBps']:.0f} ({best['impl'][7:]})" if best else "-"
    lines.append(f"| {b} | {g(p, 'ms_per_token')} | {g(p, 'GBps', 0)} | {g(p, 'frac_of_copy_bw', 2)} | {best_txt} | "
                 f"{g(x, 'ms_per_token')} | {g(x, 'GBps', 0)} |")
  return "\n".join(lines)


def run_issue(args, cases):
  """Times ours on the issue rows (forward, then forward+backward), fla beside it; writes JSON and the table."""
  fla = [] if args.skip_fla or args.tune else fla_in_subprocess(cases, args.out, args.fla_budget_s)
  import jax
  import jax.numpy as jnp
  import pallas_kernels as pk
  from mx01 import lightning as ref
  results = []
  meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, config=pk.DEFAULT_CONFIG.__dict__,
              date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), head_dim=HEAD_DIM, hbm_bytes_per_s=HBM_BYTES_PER_S,
              mean_doc=MEAN_DOC)

  def dump(**extra):
    json.dump(dict(meta=meta, results=results, fla=fla, **extra), open(args.out, "w"), indent=1)

  for case in cases:
    b, t, h = case["b"], case["t"], case["h"]
    q, k, v, do = make_inputs(b, t, h, HEAD_DIM, jnp.bfloat16)
    seg = jnp.asarray(segment_ids_of(doc_lengths(b, t))) if case["variant"] == "packed" else None
    for overrides in case_settings(args, case):
      config = dataclasses.replace(pk.DEFAULT_CONFIG, **overrides)
      fwd, fwd_bwd = linear_fns("pallas", jnp.asarray(ref.minimax_log_decay(h, 0, 80)), config, seg,
                                interpret=args.interpret)
      entry = dict(impl="pallas", **case, num_splits=config.num_splits, floor_ms=floor_ms(b, t, h, case["backward"]))
      if args.tune or args.settings:
        entry.update(overrides=overrides)
      t0 = time.perf_counter()
      try:
        entry.update(ms=time_jax(fwd_bwd, q, k, v, do, budget_s=0.3) if case["backward"] else
                     time_jax(fwd, q, k, v, budget_s=0.3))
      except Exception as e:  # noqa: BLE001
        entry.update(error=repr(e)[:300])
      entry.update(wall_s=round(time.perf_counter() - t0, 2))  # compile + timing: what a tuning sweep costs
      results.append(entry)
      print("pallas", entry, flush=True)
      del fwd, fwd_bwd
      jax.clear_caches()
      dump()
    del q, k, v, do, seg
  table = tune_table(results) if args.tune or args.settings else issue_table(results, fla)
  dump(table=table)
  print(table)


def default_splits(b, t, h):
  """The split count pk.DEFAULT_CONFIG chooses for a [b, t, h, HEAD_DIM] case (1: no split)."""
  from pallas_kernels.lightning import api
  cfg = api.DEFAULT_CONFIG
  block = min(cfg.block_size, max(16, api._pow2_ceil(t)))
  return api._num_splits(cfg, b, t, h, HEAD_DIM, min(cfg.block_v, HEAD_DIM), block, False)


def case_settings(args, case):
  """The config overrides one case is timed at: --settings, --num_splits values, the --tune grid, or the
  default alone."""
  if args.settings:
    return [dict(o) for o in args.settings]
  if args.num_splits:
    return [dict(num_splits=n) for n in args.num_splits]
  if not args.tune:
    return [dict()]
  if case["backward"]:
    return [dict(o) for o in TUNE_BWD]
  settings = [dict(o) for o in TUNE_FWD]
  auto = default_splits(case["b"], case["t"], case["h"])
  if auto > 1:  # the split count too: half and twice the default's choice
    settings += [dict(num_splits=auto // 2), dict(num_splits=auto * 2)]
  return settings


def tune_table(results):
  """Markdown: per case, the default setting's time, the fastest setting and its gain."""
  by_case = {}
  for e in results:
    by_case.setdefault(case_key(e), []).append(e)
  fmt = lambda v: "-" if v is None else f"{v:.2f}"
  lines = ["| pass | b x t x h | variant | default ms | best ms | best setting | gain | best/floor | settings failed |",
           "|---|---|---|---|---|---|---|---|---|"]
  for key in sorted(by_case, key=lambda k: (_row_order(dict(b=k[0], t=k[1], h=k[2], variant=k[3])), k[4])):
    entries = by_case[key]
    timed = [e for e in entries if "ms" in e]
    default = next((e["ms"] for e in timed if not e.get("overrides")), None)
    best = min(timed, key=lambda e: e["ms"]) if timed else None
    gain = None if best is None or default is None else default / best["ms"]
    b, t, h, variant, backward = key
    lines.append(f"| {'fwd+bwd' if backward else 'fwd'} | {b}x{t}x{h} | {variant} | {fmt(default)} | "
                 f"{fmt(best and best['ms'])} | {best and (best.get('overrides') or 'default')} | {fmt(gain)} | "
                 f"{fmt(best and best['ms'] / best['floor_ms'])} | {len(entries) - len(timed)} |")
  return "\n".join(lines)


def _splits_list(text):
  try:
    values = [int(x) for x in text.split(",") if x]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
  return values


def parse_setting(text):
  """"key=value,key=value" -> LightningConfig overrides ("" or "default": none); checked against the config."""
  import dataclasses

  from pallas_kernels.lightning.config import LightningConfig
  fields = {f.name for f in dataclasses.fields(LightningConfig)}
  out = {}
  for item in (x for x in text.split(",") if x and x != "default"):
    key, sep, raw = item.partition("=")
    if not sep or key not in fields:
      raise argparse.ArgumentTypeError(f"expected key=value with a LightningConfig field ({', '.join(sorted(fields))}), "
                                       f"got {item!r}")
    out[key] = {"true": True, "false": False, "none": None}.get(raw.lower(), int(raw) if raw.lstrip("-").isdigit() else raw)
  try:
    LightningConfig(**out)
  except Exception as e:  # ConfigError: the value's own message
    raise argparse.ArgumentTypeError(str(e)) from None
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=None, help="JSON results (required unless --dry_run)")
  parser.add_argument("--rows", default=None, choices=["issue"],
                      help="time the fixed ISSUE_ROWS table (plain/packed/ragged, fwd and fwd+bwd) against fla")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="with --rows issue: which variants")
  parser.add_argument("--passes", default="fwd,fwd_bwd", help="with --rows issue: fwd and/or fwd_bwd")
  parser.add_argument("--num_splits", type=_splits_list, default=None,
                      help="comma-separated LightningConfig.num_splits to time each case at (default: the config's "
                           "own choice)")
  parser.add_argument("--settings", type=parse_setting, nargs="+", default=None,
                      help="with --rows issue: time every case at each of these LightningConfig overrides, e.g. "
                           "--settings default bwd_split_dkdv=true")
  parser.add_argument("--tune", action="store_true",
                      help="with --rows issue: time every case at each setting of TUNE_FWD / TUNE_BWD, row by row")
  parser.add_argument("--dry_run", action="store_true", help="print the cases and floors; time nothing")
  parser.add_argument("--interpret", action="store_true", help="run the Pallas kernels in interpret mode (CPU checks)")
  parser.add_argument("--quick", action="store_true", help="fewer lengths")
  parser.add_argument("--fla-only", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--fla-cases", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--skip-fla", action="store_true")
  parser.add_argument("--fla_budget_s", type=float, default=None,
                      help="stop flash-linear-attention's process after this many seconds (its finished cases are kept)")
  parser.add_argument("--impls", default="pallas,xla,cudnn", help="JAX implementations to time")
  parser.add_argument("--seqs", default=None, help="comma-separated lengths for fwd and fwd+bwd")
  parser.add_argument("--fwd-seqs", default=None, help="comma-separated extra forward-only lengths")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # --settings checks the config
  args = parser.parse_args()
  if args.fla_only:
    run_fla(json.load(open(args.fla_cases)), args.out)
    return
  if args.out is None and not args.dry_run:
    parser.error("--out is required (or pass --dry_run)")

  if args.rows == "issue":
    passes = [p for p in args.passes.split(",") if p]
    if not passes or set(passes) - {"fwd", "fwd_bwd"}:
      parser.error(f"--passes takes fwd and/or fwd_bwd, got {args.passes!r}")
    try:
      base = issue_cases([x for x in args.variants.split(",") if x])
    except ValueError as e:
      parser.error(str(e))
    cases = [dict(c, backward=p == "fwd_bwd") for p in passes for c in base]
    if args.tune:  # row by row (forward, then forward+backward), so a sweep cut short has whole rows
      cases.sort(key=lambda c: (_row_order(c), VARIANTS.index(c["variant"]), c["backward"]))
      if args.num_splits:
        parser.error("--tune chooses its own split counts; leave out --num_splits")
    if args.settings and (args.tune or args.num_splits):
      parser.error("--settings names every setting to time; leave out --tune and --num_splits")
    if args.dry_run:
      fake = [dict(c, impl="pallas", num_splits=n) for c in cases for n in args.num_splits or [None]]
      print(f"{len(cases)} cases")
      print(issue_table(fake, []))
      return
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    run_issue(args, cases)
    return

  seqs = [2048, 8192, 32768] if args.quick else [2048, 8192, 32768, 131072]
  fwd_only = [] if args.quick else [262144, 1048576]
  if args.seqs:
    seqs = [int(x) for x in args.seqs.split(",")]
  if args.fwd_seqs is not None:
    fwd_only = [int(x) for x in args.fwd_seqs.split(",") if x]
  impls = set(args.impls.split(","))
  if args.dry_run:
    for backward in (False, True):
      print("fwd+bwd" if backward else "fwd", shapes(seqs + ([] if backward else fwd_only)))
    return
  fla_cases = [dict(b=b, t=t, h=h, backward=True) for b, t, h in shapes(seqs)]
  fla_cases += [dict(b=b, t=t, h=h, backward=False) for b, t, h in shapes(seqs + fwd_only)]
  fla = [] if args.skip_fla else fla_in_subprocess(fla_cases, args.out, args.fla_budget_s)

  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  import jax
  import jax.numpy as jnp
  import pallas_kernels as pk
  from mx01 import lightning as ref
  ceil = device_ceilings()
  print("ceilings", ceil, flush=True)
  for r in fla:
    add_roofline(r, ceil)
  results = []
  meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, ceilings=ceil,
              date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), token_heads=TOKEN_HEADS, head_dim=HEAD_DIM)

  def dump():
    json.dump(dict(meta=meta, results=results, fla=fla), open(args.out, "w"), indent=1)

  config = pk.DEFAULT_CONFIG
  meta["config"] = config.__dict__
  print("config", config, flush=True)
  dump()
  for backward in (False, True):
    for b, t, h in shapes(seqs + ([] if backward else fwd_only)):
      q, k, v, do = make_inputs(b, t, h, HEAD_DIM, jnp.bfloat16)
      log_decay = jnp.asarray(ref.minimax_log_decay(h, 0, 80))
      args_ = (q, k, v, do) if backward else (q, k, v)
      if "pallas" in impls:
        fwd, fwd_bwd = linear_fns("pallas", log_decay, config)
        record(results, "pallas", b, t, h, backward, fwd_bwd if backward else fwd, args_, ceil)
      if "xla" in impls and t <= 131072:
        fwd, fwd_bwd = linear_fns("xla", log_decay)
        record(results, "xla", b, t, h, backward, fwd_bwd if backward else fwd, args_, ceil)
      if "cudnn" in impls and t <= 32768:
        fwd, fwd_bwd = softmax_fns()
        record(results, "cudnn", b, t, h, backward, fwd_bwd if backward else fwd, args_, ceil, softmax=True)
      del q, k, v, do
      dump()
  if "pallas" in impls:
    bench_decode(ceil, results, [1, 16, 64, 256, 1024])
  dump()
  table = markdown(results, fla, ceil)
  meta["table"] = table
  dump()
  print(table)


if __name__ == "__main__":
  main()
