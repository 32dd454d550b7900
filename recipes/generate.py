"""Generate text with an mx01 model, in float or W8A16.

    python -m recipes.generate --checkpoint path/to/MiniMax-Text-01 --chat --prompt "Hello" "Sum 2+2?" \\
        --config.parallel.tensor=8 --config.parallel.expert=8 --w8a16
    python -m recipes.generate --run-dir runs/tiny --prompt "def main(" --max-new-tokens 64
    python -m recipes.generate --run-dir runs/tiny --prompt "hello" "a second prompt" --temperature 0.8 --top-p 0.95 --w8a16
    python -m recipes.generate --config=tiny --random-init --prompt "x" --config.model.compute_dtype=bfloat16

Parameters come from a Hugging Face folder with `--checkpoint` (config.json, safetensors in the
released or transformers' layout, tokenizer files; `mx01.convert.load_safetensors` streams each tensor
straight into its place on the mesh), from the newest verified checkpoint in `--run-dir` (written by
recipes/pretrain.py; its saved config is used; a corrupt checkpoint is reported
and the previous one used, as `pretrain --resume` does) or, with `--random-init`, from
`mx01.model.init` (for smoke tests and timing).  `--config.section.key=value`
overrides apply to any of them (with `--checkpoint` the model config is config.json's, the preset of
`--config` is not used).  With `--checkpoint` text goes in and out through the folder's tokenizer,
`--chat` wraps each prompt as a user message in its chat template, and every row stops at the
checkpoint's eos ids (generation_config.json, else tokenizer_config.json); the other sources use
byte tokens.  Several prompts run as one left-padded batch.

Sharding: `--config.parallel.tensor=N --config.parallel.expert=M` (and `data`, `expert_tensor`) lay
the params out on the first data*sequence*tensor local devices with the training mesh code
(mx01/parallel/mesh.py, rules.py); the prefill and decode steps are jitted with those shardings and
partitioned by jax (GSPMD), see mx01/inference/generate.py.  A run directory's saved parallel layout
is training's and is not used: generation defaults to one device.  Prints each completion and the prefill / decode
throughput (compilation excluded; reported separately).  Exit code 2 on a
usage error, with one line naming it and the fix (e.g. a prompt that does not
fit, a sampling flag out of range, a run directory without a usable checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from mx01 import checkpoint as ckpt_lib
from mx01 import config as config_lib
from mx01 import convert
from mx01 import model as model_lib
from mx01 import presets
from mx01 import training
from mx01.data import tokenizers
from mx01.inference import quantize
from mx01.inference.generate import PromptTooLongError, generate, plan_lengths
from mx01.parallel import mesh as mesh_lib
from mx01.parallel import rules
from mx01.inference.sampling import SamplingConfig
from recipes import flags as flags_lib


class UsageError(ValueError):
  """A bad command line or run directory: one line on stderr, exit code 2."""


def load_progress(label: str, every_s: float = 10.0, log=lambda message: print(message, file=sys.stderr)):
  """A `convert.load_safetensors` progress callback: a line at most every `every_s` seconds and one at the
  end (GB done of total, GB/s, ETA), so a load of hundreds of GB shows where it is."""
  t0 = time.monotonic()
  last = [t0]

  def progress(path, done, total):
    now = time.monotonic()
    if done < total and now - last[0] < every_s:
      return
    last[0] = now
    rate = done / max(now - t0, 1e-9)
    eta = f", ETA {(total - done) / rate:.0f} s" if done < total and rate > 0 else ""
    log(f"loading {label}: {done / 1e9:.2f}/{total / 1e9:.2f} GB ({100 * done / max(total, 1):.0f}%), "
        f"{rate / 1e9:.2f} GB/s{eta}")
  return progress


def load_checkpoint_params(run_dir: str, log=lambda message: print(message, file=sys.stderr)):
  """(config, params) from the newest verified checkpoint of a pretrain run directory.

  Verified and falling back exactly as `recipes.pretrain --resume` does (Checkpointer.restore):
  a checkpoint that cannot be read or whose arrays do not match their checksum is reported
  through `log` in one line and the previous one is tried.  The checksum covers the whole
  training state, so the optimizer state is read as well.  Creates nothing.
  """
  path = pathlib.Path(run_dir)
  if not path.exists():
    raise UsageError(f"--run-dir {run_dir} does not exist; pass the train.run_dir of a pretrain run or --random-init")
  if not path.is_dir():
    raise UsageError(f"--run-dir {run_dir} is a file, not a run directory (the train.run_dir of a pretrain run)")
  ckpt_dir = path.absolute() / "checkpoints"
  saved = ckpt_lib.latest_saved_config(ckpt_dir)
  if saved is None:
    raise UsageError(f"no checkpoint in {ckpt_dir}; train first (python -m recipes.pretrain) or pass --random-init")
  cfg = config_lib.from_dict(saved)
  optimizer, _ = training.make_optimizer(cfg.train)
  abstract = jax.eval_shape(lambda k: training.init_train_state(cfg.model, optimizer, k, k), jax.random.key(0))
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, cfg, async_save=False, log=lambda message: log(_one_line(message)))
  try:
    with ckpt_lib.dropped_reads_silenced():
      restored = ckpt.restore(abstract)
  finally:
    ckpt.close()
  log(f"restored params of step {restored.step} from {ckpt_dir}")
  return cfg, restored.state["params"]


def _one_line(message) -> str:
  return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _unescape(s: str):
  """A --stop string with its Python escapes ('\\n') applied, or None when they do not decode."""
  try:
    return s.encode("utf-8").decode("unicode_escape")
  except UnicodeDecodeError:
    return None


def stop_tokens(stops) -> list[int]:
  """--stop strings (Python escapes such as '\\n' allowed) -> byte tokens; each must be a single byte."""
  tokens = []
  for s in stops:
    text = _unescape(s)
    if text is None or len(text) != 1 or ord(text) > 255:
      raise UsageError(f"--stop {s!r}: a stop string is one byte token, but this is "
                       f"{len(s.encode('utf-8'))} bytes in UTF-8; give single bytes such as '.' or '\\n'")
    tokens.append(ord(text))
  return tokens


def check_args(args) -> SamplingConfig:
  """Validates the generation flags before anything is loaded; returns the sampling config."""
  if args.max_new_tokens < 1:
    raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  if args.prefill_chunk < 1:
    raise UsageError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
  for i, prompt in enumerate(args.prompt):
    if not prompt:
      raise UsageError(f"--prompt: prompt {i + 1} is empty; generation continues a prompt, so give at least one "
                       "character")
  try:
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  except ValueError as e:  # "top_p must be ..." -> "--top-p: top_p must be ..."
    raise UsageError(f"--{str(e).split()[0].replace('_', '-')}: {e}") from None


def load_hf_folder(folder: str, overrides) -> tuple:
  """(config, tokenizer) of a Hugging Face checkpoint folder: config.json's model with `overrides` applied."""
  path = pathlib.Path(folder)
  if not path.is_dir():
    raise UsageError(f"--checkpoint {folder} is not a directory; pass a Hugging Face folder (config.json, "
                     "*.safetensors, tokenizer.json or vocab.json + merges.txt)")
  model_cfg = convert.read_config(folder)
  # The data section only has to fit the model (Config checks data.seq_len <= model.max_seq_len).
  data = config_lib.DataConfig(seq_len=min(config_lib.DataConfig.seq_len, model_cfg.max_seq_len))
  cfg = config_lib.apply_overrides(config_lib.Config(model=model_cfg, data=data), overrides)
  tokenizer = tokenizers.HFTokenizer(folder)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise UsageError(f"--checkpoint {folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                     f"vocab_size is {cfg.model.vocab_size}; the tokenizer files do not belong to this model")
  return cfg, tokenizer


def build_generation_mesh(cfg):
  """The training mesh code's mesh for cfg.parallel over the first local devices; None for one device."""
  n = cfg.parallel.num_devices
  if n == 1:
    return None
  devices = jax.local_devices()
  if n > len(devices):
    raise UsageError(f"parallel: data*sequence*tensor = {n} devices but only {len(devices)} are attached; lower "
                     "--config.parallel.tensor / data")
  mesh_lib.validate_layout(cfg.parallel, cfg.model)
  return mesh_lib.build_mesh(cfg.parallel, devices[:n])


def encode_prompts(args, tokenizer) -> list:
  """The prompts as token ids: bytes without a tokenizer, else the tokenizer's (chat template with --chat)."""
  if tokenizer is None:
    return [list(p.encode("utf-8")) for p in args.prompt]
  if args.chat:
    return [tokenizer.encode_chat([{"role": "user", "content": p}]).tolist() for p in args.prompt]
  return [tokenizer.encode(p).tolist() for p in args.prompt]


def tokenizer_stop_ids(stops, tokenizer) -> list[int]:
  """--stop strings -> ids of the tokenizer; each must be one token."""
  ids = []
  for s in stops:
    text = _unescape(s)
    if text is None:
      text = s
    enc = tokenizer.encode(text).tolist()
    if len(enc) != 1:
      raise UsageError(f"--stop {s!r} is {len(enc)} tokens of this tokenizer; a stop string must be one token "
                       "(the checkpoint's eos ids stop generation already)")
    ids += enc
  return ids


def main(argv=None) -> int:
  ap = flags_lib.build_parser(__doc__)
  ap.add_argument("--checkpoint", default=None, help="a Hugging Face folder (config.json, safetensors, tokenizer)")
  ap.add_argument("--run-dir", default=None, help="load the latest checkpoint of this pretrain run")
  ap.add_argument("--random-init", action="store_true", help="random parameters (no checkpoint)")
  ap.add_argument("--prompt", nargs="+", default=["The "], help="one or more prompts (a left-padded batch)")
  ap.add_argument("--chat", action="store_true", help="--checkpoint: each prompt is a user message of the chat "
                  "template")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--top-k", type=int, default=None)
  ap.add_argument("--top-p", type=float, default=None)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--stop", nargs="*", default=[], help="stop strings: one byte each, e.g. '\\n' (one token each "
                  "with --checkpoint, beside its eos ids)")
  ap.add_argument("--prefill-chunk", type=int, default=2048)
  ap.add_argument("--max-cache-len", type=int, default=None)
  ap.add_argument("--w8a16", action="store_true", help="int8 attention/expert weights, bf16 activations")
  ap.add_argument("--json", action="store_true", help="print the result as JSON")
  try:
    args = flags_lib.parse_args(sys.argv[1:] if argv is None else argv, ap)
    sampling = check_args(args)
    if sum(map(bool, (args.checkpoint, args.run_dir, args.random_init))) != 1:
      raise UsageError("pass one of --checkpoint DIR (a Hugging Face folder), --run-dir DIR (a trained checkpoint) "
                       "or --random-init")
    if args.chat and not args.checkpoint:
      raise UsageError("--chat needs --checkpoint (a chat template comes with the checkpoint's tokenizer)")
    tokenizer, params = None, None
    if args.checkpoint:
      cfg, tokenizer = load_hf_folder(args.checkpoint, args.overrides)
      stop_ids = list(tokenizer.eos_ids) + tokenizer_stop_ids(args.stop, tokenizer)
    else:
      stop_ids = stop_tokens(args.stop)
      if args.run_dir:  # the saved config (its parallel layout is training's: generation starts from one device)
        cfg, params = load_checkpoint_params(args.run_dir)
        cfg = dataclasses.replace(cfg, parallel=config_lib.ParallelConfig())
      else:
        cfg = presets.get_preset(args.config)
      cfg = config_lib.apply_overrides(cfg, args.overrides)
    model_cfg = cfg.model
    prompts = encode_prompts(args, tokenizer)
    if tokenizer is None and max(max(p) for p in prompts) >= model_cfg.vocab_size:
      raise UsageError(f"byte prompts need model.vocab_size >= 256, got {model_cfg.vocab_size}")
    if not all(prompts):
      raise UsageError("--prompt: a prompt encodes to no tokens; give some text")
    # Sizes are checked before any weight is read.
    plan_lengths(max(map(len, prompts)), args.max_new_tokens, config=model_cfg, prefill_chunk=args.prefill_chunk,
                 max_cache_len=args.max_cache_len)
    pmesh = build_generation_mesh(cfg)
    shardings = None if pmesh is None else rules.param_shardings(
        model_lib.abstract_params(model_cfg), pmesh, model_lib.param_logical_axes(model_cfg))
    if args.checkpoint:  # streamed straight into the shardings
      params, _ = convert.load_safetensors(args.checkpoint, model_cfg, shardings=shardings,
                                           progress=load_progress(args.checkpoint))
    elif params is None:
      params = model_lib.init(model_cfg, jax.random.key(args.seed))
    if shardings is not None and not args.checkpoint:
      params = jax.device_put(params, shardings)
    if args.w8a16:  # converted in place on the mesh: each device quantises its own shards
      model_cfg = dataclasses.replace(model_cfg, compute_dtype="bfloat16")
      params = quantize.cast_floats(quantize.quantize_params(params), jnp.bfloat16)
    result = generate(params, prompts, config=model_cfg, max_new_tokens=args.max_new_tokens, sampling=sampling,
                      rng=jax.random.key(args.seed), stop_tokens=stop_ids, prefill_chunk=args.prefill_chunk,
                      max_cache_len=args.max_cache_len, mesh=pmesh)
  except (UsageError, PromptTooLongError, config_lib.ConfigError, ckpt_lib.CheckpointMismatchError,
          ckpt_lib.NoValidCheckpointError, convert.ConversionError, tokenizers.TokenizerError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  if tokenizer is None:
    texts = [bytes(t).decode("utf-8", errors="replace") for t in result.tokens]
  else:  # the stop token that ended a row is not part of its text
    texts = [tokenizer.decode(t[:-1] if reason == "stop" else t)
             for t, reason in zip(result.tokens, result.finish_reasons)]
  summary = {"prefill_tokens_per_s": result.prefill_tokens_per_s, "decode_tokens_per_s": result.decode_tokens_per_s,
             "compile_s": result.compile_s, "prefill_s": result.prefill_s, "decode_s": result.decode_s,
             "batch": len(prompts), "decode_steps": result.decode_steps, "finish_reasons": result.finish_reasons,
             "weights": "w8a16" if args.w8a16 else model_cfg.param_dtype,
             "param_bytes": quantize.param_bytes(params),
             "devices": 1 if pmesh is None else pmesh.mesh.size}
  if args.json:
    print(json.dumps(dict(summary, completions=texts, token_ids=result.tokens, prompt_token_ids=prompts), indent=2))
  else:
    for prompt, text in zip(args.prompt, texts):
      print(f"--- {prompt!r}\n{prompt}{text}")
    print(f"prefill {summary['prefill_tokens_per_s']:.0f} tokens/s, decode {summary['decode_tokens_per_s']:.1f} "
          f"tokens/s (batch {len(prompts)}, {result.decode_steps} steps; compile {result.compile_s:.1f}s; "
          f"{summary['devices']} device(s))")
  return 0


if __name__ == "__main__":
  sys.exit(main())
