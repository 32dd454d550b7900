"""Training throughput of the small presets through the full pretraining recipe.

Runs `recipes.pretrain.train` (grain pipeline on the embedded corpus, AdamW,
metrics, final checkpoint) for a few dozen steps per preset and reports the
recipe's own tokens/s (measured after the first, compiling step) and MFU
(scaling.flops, causal attention FLOPs, against the device's bf16 peak).

    python benchmarks/train_presets.py --out results/train_presets.json
    python benchmarks/train_presets.py --config=hybrid_moe_100m --steps 50 --config.data.seq_len=4096

Extra `--config.section.key=value` flags are applied to every preset.  Prints a
markdown table; `--out` also writes the rows as JSON.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

DEFAULT_PRESETS = ("softmax_100m", "lightning_100m", "hybrid_100m",
                   "softmax_moe_100m", "lightning_moe_100m", "hybrid_moe_100m")


def preset_config(name: str, steps: int, overrides: list[str], run_root: pathlib.Path):
  """The preset, shortened to `steps` steps without evaluation, then the command line's overrides."""
  from mx01 import presets
  from recipes import flags as flags_lib

  warmup = presets.get_preset(name).train.warmup_steps
  base = {"train.steps": steps, "train.warmup_steps": min(warmup, steps // 2),
          "train.log_every": max(1, steps // 3), "train.checkpoint_every": steps, "train.eval_every": 0,
          "train.eval_batches": 1, "train.tensorboard": False, "train.async_checkpointing": True,
          "train.run_dir": str(run_root / name)}
  return flags_lib.preset_config(name, overrides, base=base)


def run_one(name: str, steps: int, overrides: list[str], run_root: pathlib.Path) -> dict:
  from recipes import pretrain

  cfg = preset_config(name, steps, overrides, run_root)
  t0 = time.time()
  summary = pretrain.train(cfg, overwrite=True, log=lambda s: print(f"  [{name}] {s}", flush=True))
  return {
      "preset": name, "steps": steps, "batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
      "n_params_non_embedding": summary["n_params"], "tokens_per_sec": summary["tokens_per_sec"],
      "mfu": summary["mfu"], "final_train_loss": summary["final_train_loss"],
      "wall_time_s": time.time() - t0, "error": None,
  }


def markdown(rows: list[dict], device: str) -> str:
  out = [f"Device: {device}", "",
         "| preset | non-emb params | batch x seq | tokens/s | MFU | loss after N steps |",
         "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    if r.get("error"):
      out.append(f"| {r['preset']} | | | error: {r['error'][:80]} | | |")
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    out.append(f"| {r['preset']} | {r['n_params_non_embedding'] / 1e6:.1f}M | {r['batch']} x {r['seq_len']} | "
               f"{r['tokens_per_sec']:,.0f} | {mfu} | {r['final_train_loss']:.3f} (N={r['steps']}) |")
  return "\n".join(out)


def main(argv=None) -> int:
  from mx01.config import ConfigError
  from recipes import flags as flags_lib

  parser = flags_lib.build_parser(__doc__, default=",".join(DEFAULT_PRESETS), several=True)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--out", default=None, help="write the rows as JSON here")
  args = flags_lib.parse_args(sys.argv[1:] if argv is None else argv, parser)
  try:  # every name and override checked before the first run
    names = flags_lib.preset_names(args)
    for name in names:
      preset_config(name, args.steps, args.overrides, pathlib.Path("runs"))
  except ConfigError as e:
    return flags_lib.config_error_exit(e)

  import jax
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  rows = []
  with tempfile.TemporaryDirectory(prefix="train_presets_") as tmp:
    for name in names:
      print(f"== {name}", flush=True)
      try:
        rows.append(run_one(name, args.steps, args.overrides, pathlib.Path(tmp)))
      except Exception as e:  # keep going: report the failure in the table
        traceback.print_exc()
        rows.append({"preset": name, "error": f"{type(e).__name__}: {e}"})
      jax.clear_caches()
  table = markdown(rows, device)
  print(table)
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({"device": device, "rows": rows, "markdown": table}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
