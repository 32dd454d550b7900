"""The checkpoint converter against transformers' MiniMax: both layouts, sharded files, bf16, memory, errors.

Models are random, small and irregular: odd / non-power-of-two head counts, both layer kinds in an
irregular order, a sequence with a partial final lightning block, non-trivial DeepNorm factors, the
presets' init std 0.02.  Tolerances: float32 logits within 1e-5 of transformers' (absolute, logits of
order 0.1-1); bf16 checkpoints load bit-exactly, so their logits are also within 1e-5 of transformers
run in float32 on the same bf16 weights, and within 3% (of the largest logit) of transformers' own
bf16 forward, whose activations are rounded to bf16 throughout.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mx01 import convert, model  # noqa: E402

SEQ = 37  # longer than, and not a multiple of, the block size 16
TOKENS = np.random.default_rng(0).integers(0, 131, (2, SEQ))


def _hf_config(**kw):
  base = dict(
      vocab_size=131, hidden_size=44, intermediate_size=36, num_hidden_layers=5, num_attention_heads=6,
      num_key_value_heads=3, head_dim=10, num_local_experts=5, num_experts_per_tok=2, block_size=16,
      layer_types=["linear_attention", "full_attention", "full_attention", "linear_attention", "linear_attention"],
      full_attn_alpha_factor=1.7, full_attn_beta_factor=1.1, linear_attn_alpha_factor=1.3,
      linear_attn_beta_factor=0.9, mlp_alpha_factor=1.5, mlp_beta_factor=0.8, initializer_range=0.02)
  base.update(kw)
  cfg = transformers.MiniMaxConfig(**base)
  cfg._attn_implementation = "eager"
  cfg._experts_implementation = "eager"  # torch's grouped GEMM wants 16-byte strides, which these shapes lack
  return cfg


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  return transformers.MiniMaxForCausalLM(_hf_config()).eval()


@pytest.fixture(scope="module")
def hf_model_b():
  """A second shape: 3 heads sharing 1 K/V head, softmax first, 3 experts."""
  torch.manual_seed(1)
  cfg = _hf_config(hidden_size=36, num_attention_heads=3, num_key_value_heads=1, head_dim=14, num_local_experts=3,
                   num_hidden_layers=4, intermediate_size=20,
                   layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"])
  return transformers.MiniMaxForCausalLM(cfg).eval()


def _hf_logits(m, tokens=TOKENS):
  with torch.no_grad():
    return m(torch.tensor(tokens)).logits.float().numpy()


_apply = jax.jit(model.apply, static_argnames="config")


def _logits(params, cfg, tokens=TOKENS):
  return np.asarray(_apply(params, jnp.asarray(tokens), config=cfg)[0])


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one_file", "sharded"])
@pytest.mark.parametrize("which", ["hf_model", "hf_model_b"])
def test_transformers_save_loads_to_same_logits_fp32(tmp_path, request, which, shard):
  hf = request.getfixturevalue(which)
  hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
  assert os.path.exists(tmp_path / "model.safetensors.index.json") == bool(shard)
  params, cfg = convert.load_safetensors(str(tmp_path))
  assert cfg.param_dtype == "float32" and cfg.resolved_layer_types == tuple(
      {"linear_attention": "lightning", "full_attention": "softmax"}[t] for t in hf.config.layer_types)
  want = _hf_logits(hf)
  np.testing.assert_allclose(_logits(params, cfg), want, atol=1e-5, rtol=0)
  assert np.abs(want).max() > 0.05  # logits large enough for the tolerance to mean something


@pytest.mark.parametrize("split_stack", [False, True])
def test_scanned_layers_load_stacked_into_target_shardings(tmp_path, split_stack):
  """A repeating layer pattern is stacked for the scan: each stacked leaf is built from the layers'
  tensors in its target sharding (here experts split over 4 devices; with split_stack the stacked axis
  itself split over 2) and gives transformers' logits."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices (tests/conftest.py sets them)")
  torch.manual_seed(3)
  hf = transformers.MiniMaxForCausalLM(_hf_config(
      num_local_experts=8, num_hidden_layers=5,
      layer_types=["linear_attention", "full_attention"] * 2 + ["linear_attention"])).eval()
  hf.save_pretrained(tmp_path, max_shard_size="20KB")
  cfg = convert.read_config(str(tmp_path))
  period, repeats = model.scan_plan(cfg)
  assert repeats >= 2, (period, repeats)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("expert", "tensor"))

  def spec(path, leaf):
    stacked = getattr(path[0], "key", None) == model.SCAN_NAME
    own = (P("expert", None, None if split_stack and stacked else "tensor") if leaf.ndim - stacked == 3 else P())
    return NamedSharding(mesh, P(*((("tensor" if split_stack else None),) if stacked else ()), *own))

  shardings = jax.tree_util.tree_map_with_path(spec, model.abstract_params(cfg))
  calls = []
  params, _ = convert.load_safetensors(str(tmp_path), shardings=shardings, progress=lambda *a: calls.append(a))
  # progress: stored bytes only grow, end at the checkpoint's weights, and name every parameter
  done = [c[1] for c in calls]
  assert done == sorted(done) and done[-1] == calls[-1][2] > 0
  assert {c[0] for c in calls} == {"/".join(k.key for k in path)
                                   for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  wo = params[model.SCAN_NAME]["layer_0"]["moe"]["wo"]
  assert wo.shape[0] == repeats and wo.sharding == shardings[model.SCAN_NAME]["layer_0"]["moe"]["wo"]
  local = (repeats // 2, 2, 36, 44) if split_stack else (repeats, 2, 36, 22)
  assert {s.data.shape for s in wo.addressable_shards} == {local}
  jax.tree.map(np.testing.assert_array_equal, params, convert.from_hf_state_dict(hf.state_dict(), cfg))
  np.testing.assert_allclose(_logits(params, cfg), _hf_logits(hf), atol=1e-5, rtol=0)


def test_bf16_checkpoint_loads_bit_exactly(tmp_path, hf_model):
  import copy
  hf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
  hf16.save_pretrained(tmp_path, max_shard_size="30KB")
  params, cfg = convert.load_safetensors(str(tmp_path))
  assert cfg.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  want_q = hf16.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(params["layers_1"]["attn"]["q_proj"]["kernel"], np.float32), want_q)
  ours = _logits(params, cfg)
  # transformers in float32 on the very same bf16-rounded weights (its decay buffers kept in float32, as ours).
  rounded = copy.deepcopy(hf_model)
  with torch.no_grad():
    for p in rounded.parameters():
      p.copy_(p.bfloat16().float())
  np.testing.assert_allclose(ours, _hf_logits(rounded), atol=1e-5, rtol=0)
  native = _hf_logits(hf16)
  assert np.abs(ours - native).max() < 0.03 * np.abs(native).max()


def test_in_memory_state_dict_matches_disk(tmp_path, hf_model):
  """transformers' in-memory names (mlp.experts.gate_up_proj, ...) give the same params as its saved files."""
  cfg = convert.config_from_hf(hf_model.config)
  from_memory = convert.from_hf_state_dict(hf_model.state_dict(), cfg)
  hf_model.save_pretrained(tmp_path)
  from_disk, _ = convert.load_safetensors(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, from_memory, from_disk)
  # And the tree is exactly the model's.
  want = model.abstract_params(cfg)
  got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), from_disk)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert jax.tree.leaves(got) == jax.tree.leaves(want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mx01_save_loads_in_transformers(tmp_path, hf_model, dtype):
  import dataclasses
  ref_dir, out_dir = tmp_path / "ref", tmp_path / "out"
  hf_model.save_pretrained(ref_dir)
  cfg = dataclasses.replace(convert.config_from_hf(hf_model.config), param_dtype=dtype)
  params, _ = convert.load_safetensors(str(ref_dir), cfg)
  files = convert.save_safetensors(params, cfg, str(out_dir), max_shard_size="25KB")
  assert len(files) > 3
  with open(out_dir / "model.safetensors.index.json") as f:
    names = set(json.load(f)["weight_map"])
  from safetensors import safe_open
  with safe_open(str(ref_dir / "model.safetensors"), "numpy") as f:
    assert names == set(f.keys())  # the released names, exactly what transformers writes
  assert str(transformers.MiniMaxForCausalLM.from_pretrained(out_dir).dtype) == f"torch.{dtype}"
  # In float32 (bf16 weights upcast exactly; the decay buffers we write are float32) it computes our logits.
  loaded = transformers.MiniMaxForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
  loaded.config._attn_implementation = "eager"
  np.testing.assert_allclose(_hf_logits(loaded), _logits(params, cfg), atol=1e-5, rtol=0)
  # mx01 reads its own output back bit-exactly.
  again, cfg2 = convert.load_safetensors(str(out_dir))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_loads_into_target_shardings_from_slices(tmp_path, hf_model):
  """Experts split over 4 devices and kernels over 2: each device reads only its slice, and the values are
  those of the single-device load (whose logits the tests above check)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices (tests/conftest.py sets them)")
  hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
  cfg = convert.read_config(str(tmp_path))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("expert", "tensor"))

  def shardings_for(config, expert_axis):
    def spec(leaf):
      if leaf.ndim == 3:
        return P(expert_axis, None, "tensor")
      return P(None, "tensor") if leaf.ndim == 2 and leaf.shape[1] % 2 == 0 else P()
    return jax.tree.map(lambda leaf: NamedSharding(mesh, spec(leaf)), model.abstract_params(config))

  shardings = shardings_for(cfg, None)  # 5 experts do not split over 4 devices: experts by columns only
  reads = []
  orig = convert._SafetensorsSource.read_into

  def spy(self, name, index, out):
    orig(self, name, index, out)
    reads.append((name, out.size))
  convert._SafetensorsSource.read_into = spy
  try:
    params, _ = convert.load_safetensors(str(tmp_path), shardings=shardings)
  finally:
    convert._SafetensorsSource.read_into = orig
  wi = params["layers_0"]["moe"]["wi_gate"]
  assert wi.sharding == shardings["layers_0"]["moe"]["wi_gate"]
  assert {s.data.shape for s in wi.addressable_shards} == {(5, 44, 18)}
  # An expert's w1 [36, 44] is read in halves (one per tensor-parallel column block), never whole.
  assert {n for name, n in reads if name.endswith("experts.0.w1.weight")} == {18 * 44}
  jax.tree.map(np.testing.assert_array_equal, params, convert.load_safetensors(str(tmp_path))[0])
  # The expert axis split over 4 devices (a config whose 8 experts divide it).
  torch.manual_seed(2)
  hf8 = transformers.MiniMaxForCausalLM(_hf_config(num_local_experts=8)).eval()
  hf8.save_pretrained(tmp_path / "e8")
  cfg8 = convert.read_config(str(tmp_path / "e8"))
  params8, _ = convert.load_safetensors(str(tmp_path / "e8"), shardings=shardings_for(cfg8, "expert"))
  assert {s.data.shape for s in params8["layers_3"]["moe"]["wo"].addressable_shards} == {(2, 36, 22)}
  jax.tree.map(np.testing.assert_array_equal, params8, convert.from_hf_state_dict(hf8.state_dict(), cfg8))


# ---- the release's config.json ----------------------------------------------------------------------

RELEASE_CONFIG = {  # MiniMax-Text-01's config.json, shrunk (same keys, same kinds of values)
    "architectures": ["MiniMaxText01ForCausalLM"], "model_type": "MiniMaxText01",
    "attn_type_list": [0, 0, 1, 0, 1], "head_dim": 16, "hidden_act": "silu", "hidden_size": 48,
    "intermediate_size": 40, "layernorm_full_attention_alpha": 3.5565588200778455, "layernorm_full_attention_beta": 1.0,
    "layernorm_linear_attention_alpha": 3.5565588200778455, "layernorm_linear_attention_beta": 1.0,
    "layernorm_mlp_alpha": 3.5565588200778455, "layernorm_mlp_beta": 1.0, "max_position_embeddings": 10240000,
    "num_attention_heads": 6, "num_experts_per_tok": 2, "num_hidden_layers": 5, "num_key_value_heads": 2,
    "num_local_experts": 4, "postnorm": True, "rms_norm_eps": 1e-05, "rope_theta": 10000000, "rotary_dim": 8,
    "router_aux_loss_coef": 0.001, "shared_intermediate_size": 0, "shared_moe_mode": "sigmoid",
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 200,
}


def test_release_config_reads_every_key():
  cfg = convert.config_from_hf(RELEASE_CONFIG)
  assert cfg.resolved_layer_types == ("lightning", "lightning", "softmax", "lightning", "softmax")
  assert (cfg.rotary_dim, cfg.rope_theta, cfg.max_seq_len, cfg.head_dim) == (8, 1e7, 10240000, 16)
  assert cfg.param_dtype == "bfloat16" and cfg.rms_norm_eps == 1e-5
  assert cfg.mlp_alpha == cfg.softmax_alpha == cfg.lightning_alpha == pytest.approx(3.5565588200778455)
  # transformers' newer spelling of the partial rotary: rope_parameters.partial_rotary_factor.
  newer = {k: v for k, v in RELEASE_CONFIG.items() if k not in ("rotary_dim", "rope_theta")}
  newer["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5}
  assert convert.config_from_hf(newer) == cfg
  # Written back (both spellings) and read again: the same config, partial rotary included.
  out = convert.config_to_hf(cfg)
  assert out["rotary_dim"] == 8 and out["rope_parameters"]["partial_rotary_factor"] == 0.5
  assert convert.config_from_hf(out) == cfg
  assert convert.config_from_hf({k: v for k, v in out.items() if k not in ("layer_types", "rotary_dim")}) == cfg


@pytest.mark.parametrize("key,value", [
    ("postnorm", False), ("shared_intermediate_size", 128), ("hidden_act", "gelu"),
    ("attn_type_list", [0, 2, 1, 0, 1]), ("sliding_window", 4096), ("torch_dtype", "float16"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}), ("model_type", "mixtral"),
])
def test_unsupported_config_values_are_named(key, value):
  with pytest.raises(convert.ConversionError, match=key.split("_list")[0]):
    convert.config_from_hf({**RELEASE_CONFIG, key: value})


def test_rotary_dim_and_factor_must_agree():
  bad = {**RELEASE_CONFIG, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}}
  with pytest.raises(convert.ConversionError, match="rotary_dim=8 disagrees"):
    convert.config_from_hf(bad)


def test_paper_preset_round_trips_through_config_json():
  from mx01.presets import get_preset
  cfg = get_preset("hybrid_456b").model
  out = convert.config_to_hf(cfg)
  assert out["rotary_dim"] == 64 and out["attn_type_list"][:8] == [0] * 7 + [1]
  back = convert.config_from_hf(json.loads(json.dumps(out)))
  assert back.resolved_layer_types == cfg.resolved_layer_types and back.resolved_rotary_dim == 64
  assert (back.num_experts, back.intermediate_size, back.vocab_size) == (cfg.num_experts, cfg.intermediate_size,
                                                                          cfg.vocab_size)


# ---- errors ----------------------------------------------------------------------------------------

def test_errors_name_missing_extra_and_misshaped(hf_model):
  cfg = convert.config_from_hf(hf_model.config)
  sd = convert.to_hf_state_dict(convert.from_hf_state_dict(hf_model.state_dict(), cfg), cfg)
  del sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
  sd["model.layers.9.block_sparse_moe.gate.weight"] = np.zeros((5, 44), np.float32)
  sd["model.layers.2.self_attn.q_proj.weight"] = np.zeros((59, 44), np.float32)
  with pytest.raises(convert.ConversionError) as e:
    convert.from_hf_state_dict(sd, cfg)
  msg = str(e.value)
  assert "released" in msg and "3 problems" in msg
  assert "missing tensor model.layers.1.block_sparse_moe.experts.3.w2.weight (expected shape (44, 36))" in msg
  assert "unexpected tensor model.layers.9.block_sparse_moe.gate.weight" in msg
  assert "model.layers.2.self_attn.q_proj.weight: shape (59, 44) but the config needs (60, 44)" in msg


def test_wrong_depth_is_caught_by_decay_rates(hf_model):
  import dataclasses
  cfg = convert.config_from_hf(hf_model.config)
  wrong = dataclasses.replace(cfg, num_layers=4, layer_types=cfg.layer_types[:4])
  sd = {k: v for k, v in hf_model.state_dict().items() if not k.startswith("model.layers.4.")}
  with pytest.raises(convert.ConversionError, match="decay rates differ"):
    convert.from_hf_state_dict(sd, wrong)


def test_garbage_files_are_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(convert.config_to_hf(convert.config_from_hf(RELEASE_CONFIG))))
  (tmp_path / "model.safetensors").write_bytes(b"\x07garbage" * 10)
  with pytest.raises(convert.ConversionError, match="model.safetensors: not a readable safetensors file"):
    convert.load_safetensors(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(convert.ConversionError, match="config.json: not valid JSON"):
    convert.load_safetensors(str(tmp_path))
  with pytest.raises(convert.ConversionError, match="max_shard_size"):
    convert.write_safetensors([], str(tmp_path), max_shard_size="lots")


# ---- streaming: host memory ------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    import jax
    from mx01 import convert

    def status(key):
      return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

    path = sys.argv[1]
    cfg = convert.read_config(path)
    jax.block_until_ready(jax.numpy.zeros(8) + 1)  # start the backend before measuring
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    params, _ = convert.load_safetensors(path, cfg)
    jax.block_until_ready(params)
    print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS")}))
""")


@pytest.mark.slow
def test_sharded_load_keeps_transient_host_memory_small(tmp_path):
  """Peak RSS minus RSS after the load stays under half of the checkpoint (67 MB here): a host copy of the
  checkpoint would be all of it.  What is transient is the staging arena plus the transfers in flight,
  which vary with scheduling: about 8 MB alone, 17 MB beside another test process on two cores."""
  cfg = convert.config_from_hf({**RELEASE_CONFIG, "torch_dtype": "float32", "hidden_size": 256, "head_dim": 32,
                                "num_attention_heads": 8, "intermediate_size": 384, "num_local_experts": 8,
                                "vocab_size": 4096, "rotary_dim": 16})
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, model.abstract_params(cfg))
  files = convert.save_safetensors(params, cfg, str(tmp_path), max_shard_size="4MB")
  size = sum(os.path.getsize(f) for f in files)
  assert len(files) > 8 and size > 40e6
  out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  m = json.loads(out.stdout.strip().splitlines()[-1])
  transient = m["peak"] - m["after"]
  assert m["after"] - m["before"] > 0.8 * size  # the parameters themselves are resident afterwards
  assert transient < size / 2, (transient / 1e6, size / 1e6)


def test_host_transpose_fallback_gives_the_same_params(tmp_path, hf_model, monkeypatch):
  """Shardings whose transpose mx01 cannot derive get each slice transposed on the host instead."""
  hf_model.save_pretrained(tmp_path, max_shard_size="30KB")
  on_device, _ = convert.load_safetensors(str(tmp_path))
  monkeypatch.setattr(convert, "_stored_sharding", lambda sharding, ndim: None)
  on_host, _ = convert.load_safetensors(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, on_host, on_device)


def test_tied_embeddings_round_trip_through_one_file(tmp_path):
  """A tied head is not written; a single .safetensors path loads, with config.json beside it."""
  cfg = convert.config_from_hf({**RELEASE_CONFIG, "tie_word_embeddings": True})
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.02).astype(s.dtype), model.abstract_params(cfg))
  assert "lm_head" not in params
  (path,) = convert.save_safetensors(params, cfg, str(tmp_path))
  from safetensors import safe_open
  with safe_open(path, "numpy") as f:
    assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
  loaded, cfg2 = convert.load_safetensors(path)
  assert cfg2 == cfg and cfg2.tie_word_embeddings
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


# ---- the safetensors reader ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_safetensors_reader_slices_equal_the_library(tmp_path, dtype):
  """Random slices (whole rows, cut columns, 1-d and 3-d tensors) equal safetensors' own reader."""
  import ml_dtypes
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
  tensors = {"a": rng.standard_normal((37, 23)), "b": rng.standard_normal((11,)), "c": rng.standard_normal((5, 9, 7))}
  tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
  if dtype == "bfloat16":  # safetensors.numpy cannot write bfloat16; its torch API can
    from safetensors.torch import save_file as save_torch
    save_torch({k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) for k, v in tensors.items()},
               str(tmp_path / "x.st"))
  else:
    save_file(tensors, str(tmp_path / "x.st"))
  source = convert._SafetensorsSource([str(tmp_path / "x.st")])
  try:
    for name, ref in tensors.items():
      assert source.dtype(name) == np_dtype and source.shape(name) == ref.shape
      for _ in range(6):
        index = []
        for n in ref.shape:
          lo = int(rng.integers(0, n))
          index.append(slice(lo, int(rng.integers(lo + 1, n + 1))))
        np.testing.assert_array_equal(source.read(name, tuple(index)), ref[tuple(index)])
  finally:
    source.close()


def test_truncated_and_inconsistent_files_are_named(tmp_path):
  from safetensors.numpy import save_file
  save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(tmp_path / "m.safetensors"))
  raw = (tmp_path / "m.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(raw[:-40])  # the data cut short: offsets point past the end
  with pytest.raises(convert.ConversionError, match="cut.safetensors: not a readable safetensors file .*inside the file"):
    convert._SafetensorsSource([str(tmp_path / "cut.safetensors")])
  (tmp_path / "big.safetensors").write_bytes((10**9).to_bytes(8, "little") + raw[8:])
  with pytest.raises(convert.ConversionError, match="big.safetensors: not a readable safetensors file .*header length"):
    convert._SafetensorsSource([str(tmp_path / "big.safetensors")])
  # A file truncated after it was opened (a disk filling up, a copy in progress): the read names it.
  source = convert._SafetensorsSource([str(tmp_path / "m.safetensors")])
  (tmp_path / "m.safetensors").write_bytes(raw[:-40])
  try:
    with pytest.raises(convert.ConversionError, match="m.safetensors: tensor w is cut short"):
      source.read("w", (slice(0, 8), slice(0, 8)))
  finally:
    source.close()


def test_staging_memory_reused_between_transfers_keeps_every_value(tmp_path, hf_model, monkeypatch):
  """With a staging arena far smaller than the checkpoint, the load waits and rewrites the arena many
  times; every parameter must still hold its own values (no device array may alias the arena)."""
  hf_model.save_pretrained(tmp_path, max_shard_size="30KB")
  reference, _ = convert.load_safetensors(str(tmp_path))
  drains = []
  orig = convert._Staging.drain
  monkeypatch.setattr(convert, "_STAGING_BYTES", 4096)
  monkeypatch.setattr(convert._Staging, "drain", lambda self: (drains.append(1), orig(self)))
  params, _ = convert.load_safetensors(str(tmp_path))
  assert len(drains) > 10
  jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_reads_that_return_part_of_the_bytes_are_continued(tmp_path, monkeypatch):
  """A read returns at most ~2 GiB on Linux (and less from pipes or network file systems): the reader
  keeps reading until the slice is complete."""
  import io
  from safetensors.numpy import save_file
  ref = np.random.default_rng(0).standard_normal((13, 7)).astype(np.float32)
  save_file({"w": ref}, str(tmp_path / "m.safetensors"))
  source = convert._SafetensorsSource([str(tmp_path / "m.safetensors")])

  class Trickle(io.FileIO):
    def readinto(self, b):
      return super().readinto(memoryview(b)[:5])  # 5 bytes per call

  monkeypatch.setattr(source, "_handle", lambda f: Trickle(f, "rb"))
  np.testing.assert_array_equal(source.read("w", (slice(2, 11), slice(0, 7))), ref[2:11])
  np.testing.assert_array_equal(source.read("w", (slice(0, 13), slice(3, 5))), ref[:, 3:5])
