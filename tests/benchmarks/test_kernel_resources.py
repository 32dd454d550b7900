"""benchmarks/kernel_resources.py: the lightning kernels' Triton IR is captured on the host (no GPU), and,
where the triton package is installed, compiled for sm_90a with register and spill counts."""

import re

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
  # The dQ sweep's block loop: dO V^T, then dQ's two matmuls (the second accumulating onto the first) are each
  # waited for; the state's update is waited for at the next block's first wait.
  assert stats["loop_matmul_waits"] == 3


def _dot_results_added(ir: str) -> int:
  """How many `arith.addf` of the IR take a `tt.dot` result as an operand."""
  dots = set(re.findall(r"(%[\w#]+) = tt\.dot ", ir))
  adds = re.findall(r"= arith\.addf (%[\w#]+), (%[\w#]+)", ir)
  return sum(1 for a, b in adds if a in dots or b in dots)


def test_triton_ir_passes_run_before_compiling_as_in_xla(tmp_path):
  # XLA runs Triton's TTIR passes on a Pallas kernel first; among them `dot(a, b) + c` -> `dot(a, b, acc=c)`,
  # which the forward's output (two matmuls summed) and its state update (decayed state plus K^T V) take.
  pytest.importorskip("triton")
  from triton.backends.compiler import GPUTarget
  text = kr.capture_triton_modules("plain", b=1, t=256, h=128)["lightning_fwd"]
  path = tmp_path / "fwd.ttir"
  path.write_text(text)
  optimized = kr._optimized_ttir(str(path), GPUTarget("cuda", 90, 32), dict(num_warps=8, num_stages=3))
  assert _dot_results_added(text) == 2 and _dot_results_added(optimized) == 0
