"""Lightning attention on Pallas GPU kernels.

  api.py           lightning_attention: row layout, custom_vjp wiring, sequence splits
  fwd.py, bwd.py   the forward sweep and the two backward sweeps
  states.py        states-only sweeps of the sequence split (local end states; incoming-state gradient)
  decode.py        lightning_decode: one token against the running state
  chunk_states.py  the inter-chunk state pass (shared with mx01/lightning.py and LASP+)
  config.py        LightningConfig: tiles and launch parameters, validated on construction

The reference they are tested against is mx01/lightning.py (recurrent oracle
and float64 loop); this package imports only jax.
"""

from pallas_kernels.lightning import chunk_states
from pallas_kernels.lightning.api import lightning_attention
from pallas_kernels.lightning.config import DEFAULT_CONFIG, MAX_BLOCK_SIZE, LightningConfig
from pallas_kernels.lightning.decode import lightning_decode

__all__ = ["DEFAULT_CONFIG", "MAX_BLOCK_SIZE", "LightningConfig", "chunk_states", "lightning_attention",
           "lightning_decode"]
