"""Generate text with an mx01 model (byte tokens), in float or W8A16.

    python -m recipes.generate --run-dir runs/tiny --prompt "def main(" --max-new-tokens 64
    python -m recipes.generate --run-dir runs/tiny --prompt "hello" "a second prompt" --temperature 0.8 --top-p 0.95 --w8a16
    python -m recipes.generate --config=tiny --random-init --prompt "x" --config.model.compute_dtype=bfloat16

Parameters come from the latest checkpoint in `--run-dir` (written by
recipes/pretrain.py; its saved config is used) or, with `--random-init`, from
`mx01.model.init` (for smoke tests and timing).  `--config.section.key=value`
overrides apply to either config.  Several prompts run as one
left-padded batch.  Prints each completion and the prefill / decode
throughput (compilation excluded; reported separately).  Exit code 2 on a
usage error (e.g. a prompt that does not fit, with the sizes and the fix).
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp

from mx01 import config as config_lib
from mx01 import model as model_lib
from mx01 import presets
from mx01.inference import quantize
from mx01.inference.generate import PromptTooLongError, generate
from mx01.inference.sampling import SamplingConfig
from recipes import flags as flags_lib


def load_checkpoint_params(run_dir: str):
  """(config, params) from the latest checkpoint of a pretrain run directory."""
  import orbax.checkpoint as ocp
  ckpt_dir = pathlib.Path(run_dir).absolute() / "checkpoints"
  manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "meta"))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train first (python -m recipes.pretrain) or pass "
                            "--random-init")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  cfg = config_lib.from_dict(meta["config"])
  abstract = model_lib.abstract_params(cfg.model)
  target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)}
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))["state"]
  manager.close()
  print(f"restored params of step {step} from {ckpt_dir}", file=sys.stderr)
  return cfg, state["params"]


def main(argv=None) -> int:
  ap = flags_lib.build_parser(__doc__)
  ap.add_argument("--run-dir", default=None, help="load the latest checkpoint of this pretrain run")
  ap.add_argument("--random-init", action="store_true", help="random parameters (no checkpoint)")
  ap.add_argument("--prompt", nargs="+", default=["The "], help="one or more prompts (a left-padded batch)")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--top-k", type=int, default=None)
  ap.add_argument("--top-p", type=float, default=None)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--stop", nargs="*", default=[], help="stop strings of one byte each, e.g. '\\n'")
  ap.add_argument("--prefill-chunk", type=int, default=2048)
  ap.add_argument("--max-cache-len", type=int, default=None)
  ap.add_argument("--w8a16", action="store_true", help="int8 attention/expert weights, bf16 activations")
  ap.add_argument("--json", action="store_true", help="print the result as JSON")
  try:
    args = flags_lib.parse_args(sys.argv[1:] if argv is None else argv, ap)
    if args.run_dir:  # the saved config; --config is not used
      cfg, params = load_checkpoint_params(args.run_dir)
    elif args.random_init:
      cfg = presets.get_preset(args.config)
      params = None
    else:
      ap.error("pass --run-dir DIR (a trained checkpoint) or --random-init")
    cfg = config_lib.apply_overrides(cfg, args.overrides)
    model_cfg = cfg.model
    if params is None:
      params = model_lib.init(model_cfg, jax.random.key(args.seed))
    if args.w8a16:
      import dataclasses
      model_cfg = dataclasses.replace(model_cfg, compute_dtype="bfloat16")
      params = quantize.cast_floats(quantize.quantize_params(params), jnp.bfloat16)
    prompts = [list(p.encode("utf-8")) for p in args.prompt]
    if max(max(p) for p in prompts) >= model_cfg.vocab_size:
      ap.error(f"byte prompts need model.vocab_size >= 256, got {model_cfg.vocab_size}")
    stop_ids = [ord(s.encode().decode("unicode_escape")) for s in args.stop]
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    result = generate(params, prompts, config=model_cfg, max_new_tokens=args.max_new_tokens, sampling=sampling,
                      rng=jax.random.key(args.seed), stop_tokens=stop_ids, prefill_chunk=args.prefill_chunk,
                      max_cache_len=args.max_cache_len)
  except (PromptTooLongError, config_lib.ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  texts = [bytes(t).decode("utf-8", errors="replace") for t in result.tokens]
  summary = {"prefill_tokens_per_s": result.prefill_tokens_per_s, "decode_tokens_per_s": result.decode_tokens_per_s,
             "compile_s": result.compile_s, "prefill_s": result.prefill_s, "decode_s": result.decode_s,
             "batch": len(prompts), "decode_steps": result.decode_steps, "finish_reasons": result.finish_reasons,
             "weights": "w8a16" if args.w8a16 else model_cfg.param_dtype,
             "param_bytes": quantize.param_bytes(params)}
  if args.json:
    print(json.dumps(dict(summary, completions=texts), indent=2))
  else:
    for prompt, text in zip(args.prompt, texts):
      print(f"--- {prompt!r}\n{prompt}{text}")
    print(f"prefill {summary['prefill_tokens_per_s']:.0f} tokens/s, decode {summary['decode_tokens_per_s']:.1f} "
          f"tokens/s (batch {len(prompts)}, {result.decode_steps} steps; compile {result.compile_s:.1f}s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
