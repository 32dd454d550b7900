"""benchmarks/kernel_resources.py: the lightning kernels' Triton IR is captured on the host (no GPU), and,
where the triton package is installed, compiled for sm_90a with register and spill counts."""

import pytest

from benchmarks import kernel_resources as kr


@pytest.mark.parametrize("variant", ["plain", "packed"])
def test_captures_every_kernel_of_a_forward_backward(variant):
  modules = kr.capture_triton_modules(variant, b=1, t=256, h=128)
  assert set(modules) == {"lightning_fwd", "lightning_bwd_dq", "lightning_bwd_dkdv"}
  for name, text in modules.items():
    assert f"tt.func public @{name}" in text and "tt.dot" in text


def test_tiles_come_from_the_config():
  from pallas_kernels.lightning.config import LightningConfig
  default = kr.capture_triton_modules("plain", b=1, t=256, h=128)["lightning_bwd_dkdv"]
  tiled = kr.capture_triton_modules("plain", b=1, t=256, h=128, config=LightningConfig(bwd_block_v=64))
  # The state cotangent the dK/dV sweep carries is [head dim, value tile]: [128, 128] by default, [128, 64] here.
  assert "tensor<128x128x" in default and "tensor<128x128x" not in tiled["lightning_bwd_dkdv"]


def test_compiles_for_hopper_where_triton_is_installed():
  pytest.importorskip("triton")
  text = kr.capture_triton_modules("plain", b=1, t=256, h=128)["lightning_bwd_dq"]
  stats = kr.compile_stats(text, num_warps=8, num_stages=3)
  assert 0 < stats["registers"] <= 255 and stats["spill_stores"] >= 0 and stats["shared"] > 0
