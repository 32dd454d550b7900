"""Parity with the transformers MiniMax model, and the weight converter's round trip and errors."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mx01 import convert, model  # noqa: E402

SEQ = 37  # longer than, and not a multiple of, the block size 16


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  cfg = transformers.MiniMaxConfig(
      vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, block_size=16,
      layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
      full_attn_alpha_factor=1.7, linear_attn_alpha_factor=1.3, mlp_alpha_factor=1.5, linear_attn_beta_factor=0.9,
      initializer_range=0.1, output_router_logits=True)
  cfg._attn_implementation = "eager"
  return transformers.MiniMaxForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def converted(hf_model):
  cfg = convert.config_from_hf(hf_model.config)
  return cfg, convert.from_hf_state_dict(hf_model.state_dict(), cfg)


def test_logits_match_transformers(hf_model, converted):
  cfg, params = converted
  tokens = np.random.default_rng(0).integers(0, 97, (2, SEQ))
  with torch.no_grad():
    out = hf_model(torch.tensor(tokens), output_router_logits=True)
  want = out.logits.numpy()
  got, aux = model.apply(params, jnp.asarray(tokens), config=cfg)
  rel = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
  assert rel < 1e-4, rel
  # Same load-balancing loss (the transformers formula is our "pooled" reduction).
  np.testing.assert_allclose(float(aux["aux_loss"]), float(out.aux_loss), rtol=1e-5)


def test_round_trip_back_to_transformers(hf_model, converted):
  cfg, params = converted
  sd = convert.to_hf_state_dict(params, cfg)
  ref = hf_model.state_dict()
  assert set(sd) == set(ref)
  for k in sd:
    np.testing.assert_allclose(sd[k], ref[k].numpy(), atol=1e-6, err_msg=k)
  # And the exported dict loads strictly into a fresh transformers model.
  fresh = transformers.MiniMaxForCausalLM(hf_model.config)
  fresh.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)


def test_safetensors_round_trip(tmp_path, converted):
  cfg, params = converted
  convert.save_safetensors(params, cfg, str(tmp_path))
  loaded, cfg2 = convert.load_safetensors(str(tmp_path))
  assert cfg2.resolved_layer_types == cfg.resolved_layer_types and cfg2.num_layers == cfg.num_layers
  for a, b in zip(*(np.asarray(model.layer_params(x, cfg)[2]["attn"]["q_proj"]["kernel"]) for x in (loaded, params))):
    np.testing.assert_array_equal(a, b)


def test_errors_name_missing_extra_and_misshaped(hf_model, converted):
  cfg, _ = converted
  sd = dict(hf_model.state_dict())
  del sd["model.layers.1.self_attn.qkv_proj.weight"]
  sd["model.layers.9.mlp.gate.weight"] = torch.zeros(4, 64)
  sd["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(63, 64)
  with pytest.raises(convert.ConversionError) as e:
    convert.from_hf_state_dict(sd, cfg)
  msg = str(e.value)
  assert "missing tensor model.layers.1.self_attn.qkv_proj.weight" in msg
  assert "unexpected tensor model.layers.9.mlp.gate.weight" in msg
  assert "model.layers.2.self_attn.q_proj.weight: shape (63, 64)" in msg


def test_wrong_depth_is_caught_by_decay_rates(hf_model, converted):
  import dataclasses
  cfg, _ = converted
  sd = dict(hf_model.state_dict())
  wrong = dataclasses.replace(cfg, num_layers=5, layer_types=cfg.layer_types + ("lightning",))
  with pytest.raises(convert.ConversionError, match="decay rates differ"):
    convert.from_hf_state_dict(sd, wrong)


def test_partial_rotary_has_no_transformers_equivalent():
  from mx01.presets import get_preset
  with pytest.raises(convert.ConversionError, match="rotary_dim"):
    convert.config_to_hf(get_preset("hybrid_456b").model)
