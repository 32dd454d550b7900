"""Shared pytest configuration."""


# ---- parallelism tests (tests/mx01/parallel) ---------------------------------
# Eight host CPU devices for the sharded tests.  Set before any test module
# makes jax start its CPU backend; it only affects the CPU platform.
import os as _os

_HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _HOST_DEVICES_FLAG not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_HOST_DEVICES_FLAG}=8").strip()


# ---- CPU compilation without LLVM's optimisation ----------------------------
# The tests' models are tiny: XLA's CPU compile (LLVM's optimisation of every fusion) is most of their time,
# running the programs a small part.  Unoptimised LLVM code and the older loop emitters (no MLIR fusion
# pipeline) compile about 4x faster (CPU backend only).  The HLO passes are the same; float results may differ
# from an optimised build in the last bits, far inside the tolerances against numpy, torch or stored values.
# Bit-for-bit comparisons stay between programs compiled with the same flags: the recipe subprocesses inherit
# them through the environment (tests that set XLA_FLAGS keep them).  Flags set by the caller win.
# Not on a machine with an NVIDIA driver: there the GPU tests' kernels are compiled as they run in training.
# The loop-emitter flag exists up to jaxlib 0.10 (a later XLA aborts on an unknown flag).
from importlib import metadata as _metadata


def _cpu_compile_flags():
  if _os.path.exists("/dev/nvidiactl"):
    return ()
  jaxlib = tuple(int(x) for x in _metadata.version("jaxlib").split(".")[:2])
  loop_emitters = ("--xla_cpu_use_fusion_emitters=false",) if jaxlib < (0, 11) else ()
  return ("--xla_backend_optimization_level=0",) + loop_emitters


for _flag in _cpu_compile_flags():
  if _flag.split("=")[0] not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_flag}").strip()


# ---- one compilation cache for the whole run ---------------------------------
# Many tests compile the same programs: the recipe tests start `python -m recipes.pretrain` processes
# (kill and resume, two processes, a failed save and its resume) on the configs their in-process
# fixtures already trained, and the two xdist workers build the same small models.  A persistent
# cache, fresh for each run (so it cannot carry a program over from other code) and shared by the
# workers and every subprocess through the environment, compiles each program once.  Compilation is
# most of these tests' time on CPU; the programs and what the tests check are unchanged.
# A cache directory set by the caller is used as it is.
import atexit as _atexit
import shutil as _shutil
import tempfile as _tempfile

if "JAX_COMPILATION_CACHE_DIR" not in _os.environ:
  _CACHE_DIR = _tempfile.mkdtemp(prefix="mx01-tests-jax-cache-")
  _os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  # jax's default (1 s) would skip programs that compile faster on an idle machine than on a busy one.
  _os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  _atexit.register(_shutil.rmtree, _CACHE_DIR, ignore_errors=True)  # in the process that made it
