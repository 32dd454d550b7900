"""Where prefill time goes at long context: lightning attention vs softmax attention vs the rest.

    python benchmarks/long_context_latency.py --out results_latency.json          # full: 8k ... 1,024,000 tokens
    python benchmarks/long_context_latency.py --quick --out quick.json             # 8k and 32k only
    python benchmarks/long_context_latency.py --small --out smoke.json             # tiny shapes, runs on CPU

The layer shape of the preset `--config` (default hybrid_456b, MiniMax-Text-01:
hidden 6144, 64 query heads of dim 128, 8 K/V heads in the softmax layers, RoPE
on 64 dims, MoE experts of width 9216 with top-2 routing), with 8 experts: the
released model has 32, but with top-2 routing the expert compute per token does
not depend on the count, so 8 only saves memory (`--config.model.num_experts=32`
restores it).  Batch 1, bf16.

Each component is a separately jitted function, timed after a warm-up call
(median of `--repeats`):

* lightning core: `lightning_attention` (the kernel selected by
  `--config.model.lightning_impl`) on one chunk of
  `--lightning-chunk` tokens with an incoming state, as in chunked prefill;
  the sequence costs T / chunk times that (the work per chunk is the same).
* softmax core: causal GQA flash attention over the whole sequence
  (`jax.nn.dot_product_attention`; `--config.model.attention_impl` cudnn or
  xla, auto = cuDNN on GPU).  If a length fails (e.g.
  out of memory) its time is extrapolated quadratically from the longest
  length that ran, and the row is marked "extrapolated".
* rest: everything else in a layer (RMSNorms, projections, gate, RoPE, the
  MoE, residuals) on one chunk of `--chunk` tokens, times T / chunk.  The MoE
  is timed two ways, the model's grouped `ragged_dot` and a batched matmul
  with the FLOPs of balanced routing; the faster goes into the shares (both
  are in the JSON).

A model's prefill time is composed from the per-layer times with the
MiniMax-Text-01 pattern (7 lightning layers then 1 softmax layer; 80 layers
= 10 such groups) or all softmax layers; shares do not depend on the depth.
The embedding and LM head (once per model, not per layer) are left out.
Prints a markdown table; writes JSON (`--out`) and a PNG (`--plot`, default
next to the JSON).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import SMALL_MODEL, experts_balanced  # noqa: E402
from mx01 import lightning as lightning_lib  # noqa: E402
from mx01.config import ConfigError, ModelConfig  # noqa: E402
from mx01.layers.moe import experts_grouped  # noqa: E402
from mx01.inference.quantize import linear  # noqa: E402
from mx01.layers import moe as moe_lib  # noqa: E402
from mx01.layers.norms import rms_norm  # noqa: E402
from mx01.layers.rope import apply_rope  # noqa: E402
from mx01 import ops  # noqa: E402
from recipes import flags as flags_lib  # noqa: E402

PAPER_LENGTHS = (8192, 32768, 131072, 524288, 1_024_000)


@dataclasses.dataclass(frozen=True)
class LayerShape:
  hidden: int = 6144
  heads: int = 64
  kv_heads: int = 8
  head_dim: int = 128
  rotary_dim: int = 64
  intermediate: int = 9216
  experts: int = 8
  top_k: int = 2

  @classmethod
  def from_model(cls, m: ModelConfig) -> "LayerShape":
    return cls(hidden=m.hidden_size, heads=m.num_heads, kv_heads=m.num_kv_heads, head_dim=m.head_dim,
               rotary_dim=m.resolved_rotary_dim, intermediate=m.intermediate_size, experts=m.num_experts,
               top_k=m.num_experts_per_tok)


def time_fn(fn, *args, repeats: int) -> float:
  """Median seconds of fn(*args) after one warm-up call (which compiles)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    if times[-1] > 5.0:  # long calls: one measurement is enough
      break
  return statistics.median(times)


def make_params(shape: LayerShape, key, dtype):
  ks = iter(jax.random.split(key, 16))
  d, h, kvh, hd, i, e = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate, shape.experts
  w = lambda *s: (jax.random.normal(next(ks), s, jnp.float32) * 0.02).astype(dtype)
  moe = {"router": w(d, e).astype(jnp.float32), "wi_gate": w(e, d, i), "wi_up": w(e, d, i), "wo": w(e, i, d)}
  ones = lambda n: jnp.ones((n,), dtype)
  lightning = {"qkv": w(d, 3 * h * hd), "gate": w(d, h * hd), "out": w(h * hd, d), "norm": ones(h * hd)}
  softmax = {"q": w(d, h * hd), "k": w(d, kvh * hd), "v": w(d, kvh * hd), "o": w(h * hd, d)}
  return {"lightning": lightning, "softmax": softmax, "moe": moe, "norm1": ones(d), "norm2": ones(d)}


def moe_config(shape: LayerShape) -> ModelConfig:
  return ModelConfig(hidden_size=shape.hidden, num_heads=shape.heads, num_kv_heads=shape.kv_heads,
                     head_dim=shape.head_dim, intermediate_size=shape.intermediate, num_experts=shape.experts,
                     num_experts_per_tok=shape.top_k, rotary_dim=shape.rotary_dim)


def lightning_rest(p, x, *, shape: LayerShape, moe_impl: str):
  """A lightning layer without the attention core: x [1, t, hidden] -> [1, t, hidden]."""
  b, t, _ = x.shape
  h, hd = shape.heads, shape.head_dim
  hn = rms_norm(x, p["norm1"], 1e-5)
  qkv = jax.nn.silu(linear(hn, p["lightning"]["qkv"])).reshape(b, t, h, 3 * hd)
  o = qkv[..., :hd] * qkv[..., 2 * hd:]  # stands in for the core's output (same shape, negligible cost)
  o = rms_norm(o.reshape(b, t, h * hd), p["lightning"]["norm"], 1e-5)
  o = jax.nn.sigmoid(linear(hn, p["lightning"]["gate"])) * o
  x = hn * 3.5 + linear(o, p["lightning"]["out"])
  return _ffn(p, x, shape, moe_impl)


def softmax_rest(p, x, *, shape: LayerShape, moe_impl: str):
  """A softmax layer without the attention core."""
  b, t, _ = x.shape
  h, kvh, hd = shape.heads, shape.kv_heads, shape.head_dim
  hn = rms_norm(x, p["norm1"], 1e-5)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  q = apply_rope(linear(hn, p["softmax"]["q"]).reshape(b, t, h, hd), pos, rotary_dim=shape.rotary_dim, theta=1e7)
  k = apply_rope(linear(hn, p["softmax"]["k"]).reshape(b, t, kvh, hd), pos, rotary_dim=shape.rotary_dim, theta=1e7)
  v = linear(hn, p["softmax"]["v"]).reshape(b, t, kvh, hd)
  o = q + jnp.repeat(k + v, h // kvh, axis=2)  # stands in for the core's output
  x = hn * 3.5 + linear(o.reshape(b, t, h * hd), p["softmax"]["o"])
  return _ffn(p, x, shape, moe_impl)


_EXPERTS = {"grouped": experts_grouped, "batched": experts_balanced}


def _ffn(p, x, shape, moe_impl):
  hn = rms_norm(x, p["norm2"], 1e-5)
  y, _ = moe_lib.moe_forward(hn, p["moe"], config=moe_config(shape), experts_fn=_EXPERTS[moe_impl])
  return hn * 3.5 + y


def lightning_core_fn(impl: str, block_size: int = 256):
  """impl: a model.lightning_impl name (the Pallas kernels tile by ModelConfig().lightning_kernel)."""
  fn = ops.lightning_op(ModelConfig(lightning_impl=impl, block_size=block_size))

  def core(q, k, v, log_decay, state):
    return fn(q, k, v, log_decay, block_size=block_size, initial_state=state)
  return jax.jit(core)


def softmax_core_fn(implementation):
  def core(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  return jax.jit(core)


def _rand(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def run(args) -> dict:
  shape = LayerShape.from_model(args.model)
  dtype = jnp.bfloat16
  key = jax.random.key(0)
  params = make_params(shape, key, dtype)
  h, kvh, hd = shape.heads, shape.kv_heads, shape.head_dim
  backend = jax.default_backend()
  lightning_impl = ops.lightning_impl(args.model)
  attn_impl = {"auto": "cudnn" if backend == "gpu" else "xla"}.get(args.model.attention_impl,
                                                                   args.model.attention_impl)
  notes = []

  # ---- linear parts: time one chunk each ------------------------------------------
  # The MoE runs two ways: the model's grouped ragged_dot and a balanced batched matmul (same FLOPs);
  # the faster one goes into the composition, both are recorded.
  per_chunk, rest_by_moe = {}, {}
  c = min(args.chunk, max(args.lengths))
  x = _rand(key, (1, c, shape.hidden), dtype)
  for name, fn in (("lightning_rest", lightning_rest), ("softmax_rest", softmax_rest)):
    for moe_impl in args.moe_impls:
      f = jax.jit(lambda p, x, fn=fn, m=moe_impl: fn(p, x, shape=shape, moe_impl=m))
      rest_by_moe[f"{name}/{moe_impl}"] = time_fn(f, params, x, repeats=args.repeats)
      print(f"{name} (moe {moe_impl}): {rest_by_moe[f'{name}/{moe_impl}'] * 1e3:.2f} ms per {c} tokens", flush=True)
  moe_used = min(args.moe_impls, key=lambda m: rest_by_moe[f"lightning_rest/{m}"] + rest_by_moe[f"softmax_rest/{m}"])
  for name in ("lightning_rest", "softmax_rest"):
    per_chunk[name] = (c, rest_by_moe[f"{name}/{moe_used}"])

  log_decay = jnp.asarray(lightning_lib.minimax_log_decay(h, 0, 80))
  lc = min(args.lightning_chunk, max(args.lengths))

  def lightning_chunk_time(c, impl):
    q, k, v = (_rand(kk, (1, c, h, hd), dtype) for kk in jax.random.split(key, 3))
    state = jnp.zeros((1, h, hd, hd), jnp.float32)
    return time_fn(lightning_core_fn(impl), q, k, v, log_decay, state, repeats=args.repeats)

  try:
    lightning_chunk_s = lightning_chunk_time(lc, lightning_impl)
  except Exception as e:  # noqa: BLE001 - e.g. the Pallas kernels are not available
    notes.append(f"lightning impl {lightning_impl!r} failed ({type(e).__name__}: {str(e)[:200]}); used 'xla'")
    lightning_impl = "xla"
    lightning_chunk_s = lightning_chunk_time(lc, lightning_impl)
  print(f"lightning core ({lightning_impl}): {lightning_chunk_s * 1e3:.2f} ms per {lc} tokens", flush=True)

  rows = []
  last_ok = None  # (T, seconds) of the longest softmax core that ran
  for T in args.lengths:
    # Linear components: exact at T <= chunk (measured on min(chunk, max length) and scaled).
    lr = per_chunk["lightning_rest"][1] * T / per_chunk["lightning_rest"][0]
    sr = per_chunk["softmax_rest"][1] * T / per_chunk["softmax_rest"][0]
    if T < lc:
      lcore = lightning_chunk_time(T, lightning_impl)
    else:
      lcore = lightning_chunk_s * T / lc
    status = "measured"
    try:
      if args.max_softmax_len and T > args.max_softmax_len:
        raise RuntimeError(f"skipped: T > --max-softmax-len={args.max_softmax_len}")
      kq, kk, kv = jax.random.split(jax.random.fold_in(key, T), 3)
      q = _rand(kq, (1, T, h, hd), dtype)
      k = _rand(kk, (1, T, kvh, hd), dtype)
      v = _rand(kv, (1, T, kvh, hd), dtype)
      try:
        score = time_fn(softmax_core_fn(attn_impl), q, k, v, repeats=args.repeats)
      except Exception as e:  # noqa: BLE001
        if last_ok is not None or attn_impl == "xla":
          raise
        notes.append(f"softmax impl {attn_impl!r} failed at T={T} ({type(e).__name__}); used 'xla'")
        attn_impl = "xla"
        score = time_fn(softmax_core_fn(attn_impl), q, k, v, repeats=args.repeats)
      del q, k, v
      last_ok = (T, score)
    except Exception as e:  # noqa: BLE001 - out of memory or unsupported: extrapolate
      if last_ok is None:
        raise
      score = last_ok[1] * (T / last_ok[0]) ** 2
      status = f"extrapolated from {last_ok[0]} ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    print(f"T={T}: lightning core {lcore * 1e3:.1f} ms, softmax core {score * 1e3:.1f} ms ({status.split(' (')[0]}), "
          f"rest {lr * 1e3:.1f} / {sr * 1e3:.1f} ms", flush=True)
    hybrid = {"lightning": 7 * lcore, "softmax": score, "rest": 7 * lr + sr}
    softmax_only = {"lightning": 0.0, "softmax": 8 * score, "rest": 8 * sr}
    rows.append({
        "tokens": T, "softmax_core_status": status,
        "per_layer_s": {"lightning_core": lcore, "softmax_core": score, "lightning_rest": lr, "softmax_rest": sr},
        "hybrid_per_8_layers_s": hybrid, "softmax_per_8_layers_s": softmax_only,
    })
  return {
      "device": str(jax.devices()[0].device_kind), "backend": backend, "jax": jax.__version__,
      "layer_shape": dataclasses.asdict(shape), "dtype": "bfloat16", "batch": 1,
      "lightning_impl": lightning_impl, "softmax_impl": attn_impl, "chunk": args.chunk,
      "lightning_chunk": args.lightning_chunk, "moe_impl_used": moe_used,
      "rest_seconds_per_chunk_by_moe_impl": rest_by_moe, "notes": notes, "rows": rows,
  }


def shares(times: dict) -> dict:
  total = sum(times.values())
  return {k: v / total for k, v in times.items()}


def markdown(result: dict) -> str:
  lines = ["| model | tokens | lightning attn | softmax attn | rest | time per 8 layers (s) | softmax core |",
           "|---|---:|---:|---:|---:|---:|---|"]
  for model, key in (("hybrid 7:1", "hybrid_per_8_layers_s"), ("all softmax", "softmax_per_8_layers_s")):
    for row in result["rows"]:
      t = row[key]
      s = shares(t)
      status = row["softmax_core_status"].split(" (")[0]
      lines.append(f"| {model} | {row['tokens']:,} | {s['lightning']:.1%} | {s['softmax']:.1%} | {s['rest']:.1%} | "
                   f"{sum(t.values()):.3f} | {status} |")
  return "\n".join(lines)


def plot(result: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = result["rows"]
  labels = [f"{r['tokens'] / 1024:g}k" if r["tokens"] >= 1024 else str(r["tokens"]) for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  colors = {"lightning": "tab:blue", "softmax": "tab:red", "rest": "tab:gray"}
  for ax, (title, key) in zip(axes[:2], (("hybrid (7 lightning : 1 softmax)", "hybrid_per_8_layers_s"),
                                         ("all softmax", "softmax_per_8_layers_s"))):
    bottom = np.zeros(len(rows))
    for part in ("lightning", "softmax", "rest"):
      vals = np.array([shares(r[key])[part] for r in rows])
      ax.bar(labels, vals, bottom=bottom, color=colors[part], label=part)
      bottom += vals
    ax.set_title(f"share of prefill time: {title}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("context length (tokens)")
  axes[0].legend(loc="upper left")
  tokens = [r["tokens"] for r in rows]
  axes[2].loglog(tokens, [sum(r["hybrid_per_8_layers_s"].values()) * 10 for r in rows], "o-", label="hybrid")
  axes[2].loglog(tokens, [sum(r["softmax_per_8_layers_s"].values()) * 10 for r in rows], "s-", label="all softmax")
  axes[2].set_xlabel("context length (tokens)")
  axes[2].set_ylabel("prefill seconds (80 layers, composed)")
  axes[2].legend()
  axes[2].set_title(result["device"])
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  ap = flags_lib.build_parser(__doc__, default="hybrid_456b")
  ap.add_argument("--lengths", type=lambda s: tuple(int(x) for x in s.split(",")), default=PAPER_LENGTHS)
  ap.add_argument("--quick", action="store_true", help="8k and 32k tokens, 2 repeats")
  ap.add_argument("--small", action="store_true", help="tiny layer shape and lengths (a CPU smoke test)")
  ap.add_argument("--chunk", type=int, default=32768, help="tokens per chunk for the linear parts")
  ap.add_argument("--lightning-chunk", type=int, default=65536, help="prefill chunk of the lightning core")
  ap.add_argument("--moe-impls", type=lambda s: tuple(s.split(",")), default=("grouped", "batched"),
                  help="MoE implementations to time for the 'rest' (the faster is used)")
  ap.add_argument("--max-softmax-len", type=int, default=None, help="extrapolate the softmax core beyond this")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=None)
  ap.add_argument("--plot", default=None)
  args = flags_lib.parse_args(sys.argv[1:] if argv is None else argv, ap)
  try:
    args.model = flags_lib.preset_config(args.config, args.overrides,
                                         base=dict({"model.num_experts": 8}, **(SMALL_MODEL if args.small else {}))).model
    if args.model.attention_impl == "pallas":
      raise ConfigError("model.attention_impl: the softmax core here is jax.nn.dot_product_attention; "
                        "choose cudnn, xla or auto")
  except ConfigError as e:
    sys.exit(flags_lib.config_error_exit(e))
  if args.quick:
    args.lengths, args.repeats = (8192, 32768), 2
  if args.small:
    args.lengths, args.chunk, args.lightning_chunk, args.repeats = (512, 1024, 2048), 512, 1024, 2
  result = run(args)
  result["table"] = markdown(result)
  print(result["table"])
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    plot(result, args.plot or os.path.splitext(args.out)[0] + ".png")
  elif args.plot:
    plot(result, args.plot)
  return result


if __name__ == "__main__":
  main()
