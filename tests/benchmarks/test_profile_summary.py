"""The profile summariser of benchmarks/profile_step.py on a hand-made trace (no profiler run)."""

from benchmarks import profile_step as ps


def test_categories_busy_time_and_hlo_lookup():
  trace = {"traceEvents": [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      # Two overlapping kernels on the device (busy = union = 0..15 us) and one later GEMM.
      {"ph": "X", "pid": 1, "name": "lightning_fwd", "ts": 0, "dur": 10, "args": {"hlo_op": "custom-call.3"}},
      {"ph": "X", "pid": 1, "name": "loop_multiply_fusion_4", "ts": 5, "dur": 10, "args": {}},
      {"ph": "X", "pid": 1, "name": "nvjet_sm90_tst_128x160", "ts": 20, "dur": 30, "args": {"hlo_op": "custom-call.7"}},
      {"ph": "X", "pid": 2, "name": "host_thing", "ts": 0, "dur": 1000, "args": {}},  # not on the device
  ]}
  hlo = ps.hlo_index('  %custom-call.7 = bf16[8,8]{1,0} custom-call(%a, %b), custom_call_target="__cublas$gemm", '
                     'metadata={op_name="jit(step)/layers_0/mlp/dot_general" source_file="/x/model.py" source_line=12}\n'
                     '  ROOT %loop_multiply_fusion.4 = f32[4]{0} fusion(%c), kind=kLoop, calls=%f, '
                     'metadata={op_name="jit(step)/mul"}')
  events = ps.device_events(trace)
  assert len(events) == 3
  s = ps.summarise(events, steps=1, wall_s=60e-6, hlo=hlo)
  assert s["by_category_ms_per_step"] == {"matmul": 0.03, "lightning_pallas": 0.01, "fusion": 0.01}
  assert abs(s["busy_ms_per_step"] - 0.045) < 1e-12  # 0..15 and 20..50 us
  gemm = s["top_kernels_detail"]["nvjet_sm90_tst_128x160"]["hlo"]
  assert gemm[1].endswith("layers_0/mlp/dot_general") and gemm[2] == "model.py:12"
  assert s["top_kernels_detail"]["loop_multiply_fusion_4"]["hlo"][1] == "jit(step)/mul"


def test_launch_counts_per_kernel():
  # One fusion launched three times a step over two steps (as one kernel serves the same op in every layer).
  events = [("loop_multiply_fusion_4", 10.0 * i, 4.0, {}) for i in range(6)] + [("lightning_fwd", 100.0, 9.0, {})]
  s = ps.summarise(events, steps=2, wall_s=1e-4)
  assert s["top_kernels_calls_per_step"] == {"loop_multiply_fusion_4": 3.0, "lightning_fwd": 0.5}
  assert abs(s["top_kernels_ms_per_call"]["loop_multiply_fusion_4"] - 0.004) < 1e-12
  assert abs(s["top_kernels_ms_per_step"][0][1] - 0.012) < 1e-12
