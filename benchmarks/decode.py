"""Prefill and decode throughput, bf16 weights vs W8A16.

    python benchmarks/decode.py --out decode.json                  # GPU: 8 layers of the paper's shape
    python benchmarks/decode.py --small                            # tiny shapes, runs on CPU
    python benchmarks/decode.py --config.model.num_layers=16 --config.model.num_experts=4

Builds the preset `--config` (default hybrid_456b: MiniMax-Text-01's layer shape,
hidden 6144, 64 heads of 128, 8 K/V heads, MoE experts of 9216, top-2) cut to
8 layers (7 lightning + 1 softmax) and 8 experts (the released 80 layers and 32
experts do not fit one GPU), bf16 parameters; `--config.model.KEY=VALUE`
overrides change that.  Random weights,
then runs `mx01.inference.generate` (greedy, batch `--batch`, prompt
`--prompt-len`, `--new-tokens` tokens) once with bf16 weights and once with
W8A16 weights (int8 attention and expert weights converted to bf16 inside the
matmuls).  Reports weight bytes, prefill tokens/s and decode tokens/s of each
(compilation excluded), and whether the optimized HLO of the W8A16 decode step
materialises any dequantised weight outside a fusion (`--dump-hlo DIR` writes
the HLO for inspection).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import SMALL_MODEL  # noqa: E402
from mx01 import model as model_lib  # noqa: E402
from mx01.config import ConfigError, ModelConfig  # noqa: E402
from mx01.inference import cache as cache_lib, quantize  # noqa: E402
from mx01.inference.generate import generate, make_decode_step  # noqa: E402
from mx01.inference.sampling import SamplingConfig  # noqa: E402
from recipes import flags as flags_lib  # noqa: E402


# What one GPU holds of the preset: 8 layers (7 lightning + 1 softmax), 8 experts, bf16 weights.
ONE_GPU = {"model.num_layers": 8, "model.num_experts": 8, "model.param_dtype": "bfloat16",
           "model.compute_dtype": "bfloat16"}


def build_config(args) -> ModelConfig:
  """The model of `--config`, cut to one GPU (or to --small), then the command line's overrides."""
  base = dict(ONE_GPU, **(SMALL_MODEL if args.small else {}))
  return flags_lib.preset_config(args.config, args.overrides, base=base).model


def hlo_dequant_report(params, config, batch: int, cache_len: int, dump_dir=None) -> dict:
  """Looks for int8->bf16 converts in the optimized decode-step HLO that are not inside a dot fusion."""
  step = jax.jit(make_decode_step(config, SamplingConfig()))
  cache = cache_lib.init_cache(config, batch, cache_len)
  tokens = jnp.zeros((batch,), jnp.int32)
  text = step.lower(params, cache, tokens, jnp.zeros((batch,), bool), jax.random.key(0)).compile().as_text()
  if dump_dir:
    os.makedirs(dump_dir, exist_ok=True)
    with open(os.path.join(dump_dir, "w8a16_decode_step.hlo.txt"), "w") as f:
      f.write(text)
  # An ENTRY-level instruction (a loop fusion or a bare convert) that reads an s8 array and writes a bf16 array
  # of the same number of elements writes a dequantised copy of a weight to memory instead of feeding the dot.
  entry = text[text.find("\nENTRY"):]
  inst = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\((.*?)\)", re.M)
  shapes, materialised = {}, []
  for name, dtype, dims, opcode, operands in inst.findall(entry):
    size = 1
    for d in filter(None, dims.split(",")):
      size *= int(d)
    shapes[name] = (dtype, size)
    if dtype != "bf16" or opcode in ("dot", "custom-call"):
      continue
    for op in re.findall(r"%([\w.\-]+)", operands):
      if shapes.get(op, ("", 0))[0] == "s8" and shapes[op][1] == size and size >= 4096:
        materialised.append(f"{opcode} {name}: s8 {op} -> bf16[{dims}]")
  return {"dequantised_weight_copies": len(materialised), "examples": materialised[:5],
          "s8_arrays_in_entry": sum(1 for t in shapes.values() if t[0] == "s8")}


def main(argv=None):
  ap = flags_lib.build_parser(__doc__, default="hybrid_456b")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt-len", type=int, default=2048)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--prefill-chunk", type=int, default=2048)
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--dump-hlo", default=None)
  ap.add_argument("--out", default=None)
  args = flags_lib.parse_args(sys.argv[1:] if argv is None else argv, ap)
  if args.small:
    args.batch, args.prompt_len, args.new_tokens, args.prefill_chunk = 2, 64, 16, 32
  try:
    cfg = build_config(args)
  except ConfigError as e:
    sys.exit(flags_lib.config_error_exit(e))
  params = model_lib.init(cfg, jax.random.key(0))
  prompts = [[(7 * i + j) % cfg.vocab_size for j in range(args.prompt_len)] for i in range(args.batch)]
  results = {"device": str(jax.devices()[0].device_kind), "config": dataclasses.asdict(cfg),
             "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
  variants = {"bf16": lambda: params, "w8a16": lambda: quantize.cast_floats(quantize.quantize_params(params),
                                                                            jnp.bfloat16)}
  for name, make in variants.items():
    p = make()
    res = generate(p, prompts, config=cfg, max_new_tokens=args.new_tokens, prefill_chunk=args.prefill_chunk)
    results[name] = {"weight_bytes": quantize.param_bytes(p),
                     "quantizable_weight_bytes": quantize.param_bytes(p, only_quantizable=True),
                     "prefill_tokens_per_s": res.prefill_tokens_per_s, "decode_tokens_per_s": res.decode_tokens_per_s,
                     "decode_ms_per_step": 1e3 * res.decode_s / max(res.decode_steps, 1), "compile_s": res.compile_s}
    if name == "w8a16":
      results[name]["hlo"] = hlo_dequant_report(p, cfg, args.batch, res.cache_len or 1, args.dump_hlo)
    print(name, json.dumps(results[name]), flush=True)
    del p
  results["decode_speedup_w8a16"] = results["w8a16"]["decode_tokens_per_s"] / results["bf16"]["decode_tokens_per_s"]
  print(f"W8A16 decode speed-up over bf16: {results['decode_speedup_w8a16']:.2f}x; weight bytes "
        f"{results['w8a16']['weight_bytes'] / results['bf16']['weight_bytes']:.2f}x")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
