"""Loading a released-layout safetensors checkpoint onto devices: seconds and GB/s.

    python -m benchmarks.load_checkpoint --layers 8 --dir /tmp/mx01_ckpt --out results/gpu/load_checkpoint.json
    python -m benchmarks.load_checkpoint --tiny --dir /tmp/ckpt_tiny          # a CPU smoke run

Writes an `--layers`-layer slice of MiniMax-Text-01's shape (hidden 6144, 64 heads of 128, 32 experts
of width 9216, vocab 200064; the release's lightning/softmax order) in bf16 with
`mx01.convert.write_safetensors` (5 GB shards and an index, as the Hub's), then times
`mx01.convert.load_safetensors` onto the first local device (or, with `--expert-parallel`, the
experts split over all local devices) until every array is ready.  8 layers are about 88 GB: mind
the disk.  Tensors are written under the released names and shapes
(`convert.released_tensors`), each one random row repeated (the loader cannot tell; the writer holds
one shard and does no host transposes).  `--cold` evicts the files from the page cache
(posix_fadvise DONTNEED, no root needed) before loading, so the read comes from the disk; without it
the files are as warm as writing left them.  A few loaded slices are compared with what was written.

Reports: checkpoint GB, write seconds, load seconds, load GB/s (file bytes / load seconds) and the
host's transient memory during the load (peak RSS minus RSS after, Linux).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import zlib

# The load's device peak is the parameters plus one layer's weight in stored order: 92.2 GiB for the full
# 8-layer slice of the paper's shape (BENCHMARKS.md), close to the 104 GiB jax's default 75% leaves on an H200.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402  (after the memory fraction)
import ml_dtypes
import numpy as np

from mx01 import convert, model
from mx01.presets import get_preset


def slice_config(layers: int, experts: int | None, tiny: bool):
  """The release's config cut to `layers` layers (tiny: small widths, for a CPU smoke run)."""
  cfg = get_preset("hybrid_456b").model
  cfg = dataclasses.replace(cfg, num_layers=layers, layer_types=cfg.resolved_layer_types[:layers],
                            param_dtype="bfloat16")
  if tiny:
    cfg = dataclasses.replace(cfg, hidden_size=96, num_heads=6, num_kv_heads=2, head_dim=16, rotary_dim=8,
                              intermediate_size=40, num_experts=4, vocab_size=300)
  if experts is not None:
    cfg = dataclasses.replace(cfg, num_experts=experts, num_experts_per_tok=min(cfg.num_experts_per_tok, experts))
  return cfg


def stored_tensor(name: str, shape, dtype=ml_dtypes.bfloat16) -> np.ndarray:
  """A tensor as written: one random row (seeded by the name) repeated, as a read-only broadcast view."""
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  return np.broadcast_to((rng.standard_normal(shape[-1]) * 0.02).astype(dtype), tuple(shape))


def write_checkpoint(cfg, folder: str, max_shard_size) -> list[str]:
  """The released layout's names and shapes (`convert.released_tensors`), filled without host transposes."""
  def fill(name, shape, dtype, make):
    if not name.endswith(".weight"):  # the lightning decay buffers: real values, from the config
      return name, shape, dtype, make
    return name, shape, dtype, lambda: np.ascontiguousarray(stored_tensor(name, shape, dtype))
  specs = [fill(*spec) for spec in convert.released_tensors(model.abstract_params(cfg), cfg)]
  files = convert.write_safetensors(specs, folder, max_shard_size)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(convert.config_to_hf(cfg), f, indent=2)
  return files


def _status_bytes(key: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
  except (OSError, StopIteration):
    return None


def _reset_peak_rss() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _evict(files: list[str]) -> None:
  for path in files:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _shardings(cfg, expert_parallel: bool):
  """Experts split over the local devices by the mesh rules (the training layout), or None: one device."""
  if not expert_parallel:
    return None
  from mx01.config import ParallelConfig
  from mx01.parallel import mesh as mesh_lib, rules
  devices = jax.local_devices()
  if cfg.num_experts % len(devices):
    raise SystemExit(f"--expert-parallel: {cfg.num_experts} experts do not split over {len(devices)} devices")
  pmesh = mesh_lib.build_mesh(ParallelConfig(data=len(devices), expert=len(devices)), devices)
  return rules.param_shardings(model.abstract_params(cfg), pmesh, model.param_logical_axes(cfg))


def _check(loaded: dict, cfg) -> None:
  """A few slices of the loaded params equal the written tensors (transposed where ours are [in, out])."""
  last = cfg.num_layers - 1
  period, repeats = model.scan_plan(cfg)
  for path, name, transposed in (
      (("embed", "embedding"), "model.embed_tokens.weight", False),
      (("layers_0", "moe", "wi_gate"), "model.layers.0.block_sparse_moe.experts.0.w1.weight", True),
      ((f"layers_{last}", "moe", "wo"), f"model.layers.{last}.block_sparse_moe.experts.0.w2.weight", True),
      ((f"layers_{last}", "input_norm", "scale"), f"model.layers.{last}.input_layernorm.weight", False)):
    layer = int(path[0].split("_")[1]) if path[0].startswith("layers_") else None
    index = ()
    if layer is None:
      got = loaded
    elif layer < period * repeats:  # one slice of the scanned stack (model.layer_params would copy every layer)
      got, index = loaded[model.SCAN_NAME][f"layer_{layer % period}"], (layer // period,)
    else:
      got = loaded[path[0]]
    for k in path[1:] if layer is not None else path:
      got = got[k]
    if got.ndim - len(index) == 3:
      index += (0,)  # expert 0
    got = np.asarray(got[index] if index else got)
    shape = got.shape[::-1] if transposed else got.shape
    want = stored_tensor(name, shape)
    np.testing.assert_array_equal(got, want.T if transposed else want, err_msg="/".join(path))


def _device_memory(key: str) -> int | None:
  """A statistic of the first local device's allocator (None where the backend keeps none, e.g. CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get(key)


def _progress_printer(t0: float):
  """A load progress callback: one line per parameter with the device's memory in use and its peak, so a
  load that runs out of device memory shows where."""
  def progress(path, done, total):
    in_use, peak = _device_memory("bytes_in_use"), _device_memory("peak_bytes_in_use")
    mem = f"  device {in_use / 2**30:.1f} GiB in use, peak {peak / 2**30:.1f}" if in_use is not None else ""
    print(f"[load {time.perf_counter() - t0:6.1f}s] {done / 1e9:6.1f}/{total / 1e9:.1f} GB  {path}{mem}", flush=True)
  return progress


def run(args) -> dict:
  cfg = slice_config(args.layers, args.experts, args.tiny)
  t0 = time.perf_counter()
  index = os.path.join(args.dir, "model.safetensors.index.json")
  single = os.path.join(args.dir, "model.safetensors")
  if args.reuse and (os.path.exists(index) or os.path.exists(single)):  # what a previous --keep run wrote
    if os.path.exists(index):
      with open(index) as f:
        files = sorted({os.path.join(args.dir, n) for n in json.load(f)["weight_map"].values()})
    else:
      files = [single]
    write_s = None
  else:
    files = write_checkpoint(cfg, args.dir, args.max_shard_size)
    write_s = time.perf_counter() - t0
    print(f"wrote {len(files)} files in {write_s:.1f}s", flush=True)
  size = sum(os.path.getsize(f) for f in files)
  if args.cold:
    _evict(files)
  shardings = _shardings(cfg, args.expert_parallel)
  jax.block_until_ready(jax.device_put(np.zeros(8, np.float32)))  # start the backend outside the timing
  peak_ok = _reset_peak_rss()
  rss0 = _status_bytes("VmRSS")
  t0 = time.perf_counter()
  loaded, _ = convert.load_safetensors(args.dir, shardings=shardings, progress=_progress_printer(t0))
  jax.block_until_ready(loaded)
  load_s = time.perf_counter() - t0
  device_peak = _device_memory("peak_bytes_in_use")
  peak, rss1 = _status_bytes("VmHWM"), _status_bytes("VmRSS")
  _check(loaded, cfg)
  result = {
      "layers": cfg.num_layers, "experts": cfg.num_experts, "hidden": cfg.hidden_size, "files": len(files),
      "checkpoint_gb": size / 1e9, "write_s": write_s, "load_s": load_s, "load_gb_per_s": size / 1e9 / load_s,
      "cold": bool(args.cold), "devices": len(jax.local_devices()) if args.expert_parallel else 1,
      "device": str(jax.local_devices()[0].device_kind),
      "host_transient_gb": (peak - rss1) / 1e9 if peak_ok and peak and rss1 else None,
      "host_rss_growth_gb": (rss1 - rss0) / 1e9 if rss0 and rss1 else None,
      "device_peak_gb": device_peak / 1e9 if device_peak else None,
  }
  if not args.keep:
    for f in files + [os.path.join(args.dir, n) for n in ("model.safetensors.index.json", "config.json")]:
      if os.path.exists(f):
        os.remove(f)
  return result


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--experts", type=int, default=None, help="override the 32 experts (to fit a smaller disk)")
  p.add_argument("--dir", default="/tmp/mx01_load_checkpoint")
  p.add_argument("--max-shard-size", default="5GB")
  p.add_argument("--cold", action="store_true", help="evict the files from the page cache before loading")
  p.add_argument("--expert-parallel", action="store_true", help="split the experts over all local devices")
  p.add_argument("--keep", action="store_true", help="keep the checkpoint files afterwards")
  p.add_argument("--reuse", action="store_true",
                 help="load the checkpoint a previous --keep run left in --dir instead of writing it again")
  p.add_argument("--tiny", action="store_true", help="small widths: a CPU smoke run")
  p.add_argument("--out", default=None, help="append the result as a JSON line to this file")
  args = p.parse_args(argv)
  result = run(args)
  print(json.dumps(result))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
      f.write(json.dumps(result) + "\n")
  return result


if __name__ == "__main__":
  main()
