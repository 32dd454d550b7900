"""Registers, spills and shared memory of the lightning kernels on Hopper, without a GPU.

    pip install triton==3.5.1        # the Triton compiler and the ptxas it ships (not needed by mx01 itself)
    python -m benchmarks.kernel_resources                     # bf16, head dim 128, the LightningConfig defaults
    python -m benchmarks.kernel_resources --variants plain,packed --warps 8,16 --stages 2,3 --out res.json
    python -m benchmarks.kernel_resources --settings default bwd_split_dkdv=true bwd_block_v=64

Each kernel of a forward+backward pass (plain rows, packed rows) is lowered for CUDA on the host
(`lowering_platforms=("cuda",)`), its Triton IR captured as text, put through Triton's TTIR passes (as XLA's
pipeline does first), compiled for sm_90a by the `triton` package at each warps/stages setting, and the PTX
assembled by ptxas -v: registers per thread, bytes spilled to local memory (stores/loads), shared memory per
program, and the matmul waits in the block loop (from the TritonGPU IR).  A kernel at the register cap (255
at 8 warps) that spills inside its block loop pays local-memory traffic on every block.

The device's XLA compiles the same IR with the Triton it bundles, whose register allocation may differ from
this package's: the figures rank variants of a kernel; the timings on the device (benchmarks/
lightning_attention.py) decide.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

from benchmarks.lightning_attention import parse_setting  # the benchmarks' one key=value spelling of a setting


def capture_triton_modules(variant: str, b: int = 2, t: int = 1024, h: int = 64, d: int = 128,
                           config=None) -> dict:
  """{kernel name: Triton IR text} of the lightning kernels in one forward+backward, lowered for CUDA, with
  `config` (a LightningConfig; None: the defaults) giving the tiles.

  b x h = 128 programs keeps the unsplit path (one row per sequence), as at the issue rows that fill the GPU.
  """
  import jax
  import jax.numpy as jnp
  from jax._src.pallas.triton import lowering as triton_lowering
  from jax._src.pallas.triton import pallas_call_registration as registration

  from pallas_kernels import _common
  from pallas_kernels.lightning import api

  modules = {}
  original = triton_lowering.lower_jaxpr_to_triton_module

  def capture(jaxpr, *args, **kwargs):
    result = original(jaxpr, *args, **kwargs)
    modules[jaxpr.debug_info.func_name] = result.module.operation.get_asm(enable_debug_info=False)
    return result

  check_backend = _common.check_backend
  registration.lowering.lower_jaxpr_to_triton_module = capture
  _common.check_backend = lambda interpret: None  # lowering for CUDA needs no GPU
  try:
    x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    log_decay = -jnp.arange(1, h + 1, dtype=jnp.float32) / h
    segment_ids = None
    if variant == "packed":
      segment_ids = jnp.broadcast_to((jnp.arange(t) // 300).astype(jnp.int32), (b, t))  # 4 documents a row

    def fwd_bwd(q, k, v, do):
      out, vjp = jax.vjp(lambda q, k, v: api.lightning_attention(q, k, v, log_decay, segment_ids=segment_ids,
                                                                config=config)[0],
                         q, k, v)
      return out, vjp(do)

    jax.jit(fwd_bwd).trace(x, x, x, x).lower(lowering_platforms=("cuda",))
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = original
    _common.check_backend = check_backend
  return modules


def _optimized_ttir(ir_path: str, target, options: dict) -> str:
  """The Triton IR at `ir_path` after Triton's own TTIR passes (canonicalize, combine, CSE, loop unrolling...).

  `triton.compile` skips the passes of the stage its input file is in, but XLA's pipeline for a Pallas kernel
  starts with them (`CreateTritonPipeline`, "based on make_ttir()"); among them the rewrite of
  `dot(a, b) + c` into `dot(a, b, acc=c)`, which lets a kernel's matmuls accumulate in place and keeps its
  state update's wait out of the block loop.
  """
  from triton._C.libtriton import ir
  from triton.backends.nvidia.compiler import CUDABackend

  backend = CUDABackend(target)
  context = ir.context()
  ir.load_dialects(context)
  backend.load_dialects(context)
  module = ir.parse_mlir_module(ir_path, context)
  module.context = context
  backend.make_ttir(module, {}, backend.parse_options(options), target.arch)
  return str(module)


def compile_stats(ir_text: str, num_warps: int, num_stages: int) -> dict:
  """Compiles Triton IR for sm_90a as XLA does (Triton's TTIR passes first): {"registers", "spill_stores",
  "spill_loads" (bytes), "shared" (bytes)}."""
  import triton
  from triton.backends.compiler import GPUTarget

  ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
  target = GPUTarget("cuda", 90, 32)
  options = dict(num_warps=num_warps, num_stages=num_stages)
  with tempfile.TemporaryDirectory() as tmp:
    ir_path = os.path.join(tmp, "kernel.ttir")
    with open(ir_path, "w") as f:
      f.write(ir_text)
    optimized_path = os.path.join(tmp, "kernel_optimized.ttir")
    with open(optimized_path, "w") as f:
      f.write(_optimized_ttir(ir_path, target, options))
    kernel = triton.compile(optimized_path, target=target, options=options)
    ptx_path = os.path.join(tmp, "kernel.ptx")
    with open(ptx_path, "w") as f:
      f.write(kernel.asm["ptx"])
    report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx_path, "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
  regs = re.search(r"Used (\d+) registers", report)
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
  return {"registers": int(regs.group(1)) if regs else None,
          "spill_stores": int(spills.group(1)) if spills else None,
          "spill_loads": int(spills.group(2)) if spills else None,
          "shared": int(kernel.metadata.shared),
          "loop_matmul_waits": loop_matmul_waits(kernel.asm["ttgir"])}


def loop_matmul_waits(ttgir: str) -> int:
  """Waits for warp-group matmuls inside the kernel's block loop (its first `scf.for`, up to its yield).

  Each wait ends the overlap of the matmuls in flight, so a sweep's chain of dependent steps per block is
  about this long; matmuls that accumulate in place or whose wait is deferred to the next block add none.
  """
  start = ttgir.index("scf.for")
  return ttgir[start:ttgir.index("scf.yield", start)].count("ttng.warp_group_dot_wait")


def _ints(s: str):
  return [int(x) for x in s.split(",") if x]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variants", default="plain,packed")
  ap.add_argument("--warps", default="8", help="num_warps settings, comma-separated")
  ap.add_argument("--stages", default="3", help="num_stages settings, comma-separated")
  ap.add_argument("--settings", type=parse_setting, nargs="+", default=[{}],
                  help="LightningConfig overrides to lower the kernels at, one set each (key=value,...; default)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  try:
    import triton  # noqa: F401
  except ImportError:
    print("error: this report needs the triton package (pip install triton==3.5.1)", file=sys.stderr)
    return 2
  from pallas_kernels.lightning.config import LightningConfig
  rows = []
  print(f"{'setting':24s} {'variant':8s} {'kernel':20s} {'warps':>5s} {'stages':>6s} {'regs':>5s} "
        f"{'spill st/ld (B)':>16s} {'shared (B)':>11s} {'waits/block':>11s}")
  for overrides, variant in itertools.product(args.settings, args.variants.split(",")):
    label = ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"
    for name, ir_text in capture_triton_modules(variant, config=LightningConfig(**overrides)).items():
      for warps, stages in itertools.product(_ints(args.warps), _ints(args.stages)):
        stats = compile_stats(ir_text, warps, stages)
        rows.append(dict(setting=overrides, variant=variant, kernel=name, num_warps=warps, num_stages=stages, **stats))
        print(f"{label:24s} {variant:8s} {name:20s} {warps:5d} {stages:6d} {stats['registers']:5d} "
              f"{stats['spill_stores']:>7d}/{stats['spill_loads']:<8d} {stats['shared']:11d} "
              f"{stats['loop_matmul_waits']:11d}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
