"""8 host CPU devices for the parallelism tests.

The flag must be set before jax creates its CPU backend; tests/conftest.py sets
it for the whole run, and this file sets it when the folder runs on its own.
If the backend already exists with fewer devices, the tests skip with a message.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _need_eight_devices():
  if jax.device_count() < 8:
    pytest.skip(f"needs 8 devices, found {jax.device_count()}: run with XLA_FLAGS={_FLAG} "
                "(set before jax starts its backend)")
