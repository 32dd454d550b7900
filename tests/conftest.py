"""Shared pytest configuration."""


# ---- parallelism tests (tests/mx01/parallel) ---------------------------------
# Eight host CPU devices for the sharded tests.  Set before any test module
# makes jax start its CPU backend; it only affects the CPU platform.
import os as _os

_HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _HOST_DEVICES_FLAG not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_HOST_DEVICES_FLAG}=8").strip()
