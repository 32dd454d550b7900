"""The error raised for an invalid configuration value, kernels' and model's alike.

Defined here, at the bottom layer, so that the kernels' tuning configs (which
import only jax) raise the same type that `mx01.config` re-exports and the
recipes catch.
"""


class ConfigError(ValueError):
  """An invalid or inconsistent configuration value."""
