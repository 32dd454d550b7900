"""Configs: validation errors name the field; overrides are checked against the dataclasses."""

import dataclasses

import pytest

from mx01 import config as C
from mx01.presets import get_preset, list_presets


def test_every_preset_builds_and_round_trips():
  for name in list_presets():
    cfg = get_preset(name)
    assert C.from_dict(C.to_dict(cfg)) == cfg


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(num_layers=3, layer_types=("lightning", "softmax")), "layer_types"),
    (dict(layer_pattern=("lightning", "linear")), "layer_types"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(rotary_dim=7), "rotary_dim"),
    (dict(head_dim=32, rotary_dim=64), "rotary_dim"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(lightning_impl="cuda"), "lightning_impl"),
])
def test_model_config_errors_name_the_field(kwargs, field):
  with pytest.raises(C.ConfigError, match=field):
    C.ModelConfig(**kwargs)


def test_configs_are_frozen():
  cfg = C.ModelConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.num_layers = 3


def test_layer_types_follow_pattern():
  cfg = C.ModelConfig(num_layers=10)
  assert cfg.resolved_layer_types == ("lightning",) * 7 + ("softmax",) + ("lightning",) * 2
  assert get_preset("hybrid_456b").model.resolved_layer_types.count("softmax") == 10


def test_overrides_parse_and_validate():
  cfg = get_preset("tiny")
  cfg = C.apply_overrides(cfg, ["model.num_layers=2", "train.learning_rate=1e-4", "model.capacity_factor=1.25",
                                "model.layer_types=(lightning,softmax)", "parallel.fsdp=true"])
  assert cfg.model.num_layers == 2 and cfg.train.learning_rate == 1e-4 and cfg.model.capacity_factor == 1.25
  assert cfg.model.layer_types == ("lightning", "softmax") and cfg.parallel.fsdp is True
  with pytest.raises(C.ConfigError, match="did you mean 'model.num_layers'"):
    C.apply_overrides(cfg, ["model.num_layer=2"])
  with pytest.raises(C.ConfigError, match="expected an integer"):
    C.apply_overrides(cfg, ["model.num_layers=two"])
  with pytest.raises(C.ConfigError, match="is a section"):
    C.apply_overrides(cfg, ["model=3"])
  with pytest.raises(C.ConfigError, match="not one of"):
    C.apply_overrides(cfg, ["model.ffn_type=sparse"])
  with pytest.raises(C.ConfigError, match="num_kv_heads"):
    C.apply_overrides(cfg, ["model.num_kv_heads=3"])


def test_diff_lists_changed_fields():
  a = get_preset("tiny")
  b = C.apply_overrides(a, ["model.num_layers=2", "train.steps=50"])
  assert sorted(d.split(":")[0] for d in C.diff(a, b)) == ["model.num_layers", "train.steps"]


def test_unknown_preset():
  with pytest.raises(C.ConfigError, match="did you mean"):
    get_preset("hybrid_465b")


def test_parallel_config_checks():
  with pytest.raises(C.ConfigError, match="expert"):
    C.ParallelConfig(data=2, expert=4)
  p = C.ParallelConfig(data=4, tensor=2, expert=4)
  assert p.num_devices == 8 and p.expert_data == 2


def test_overrides_apply_together_in_any_order():
  # Each one alone would be invalid (capacity impl without a capacity); together they are valid.
  cfg = C.apply_overrides(get_preset("tiny"), ["model.moe_impl=capacity", "model.capacity_factor=1.25"])
  assert cfg.model.moe_impl == "capacity" and cfg.model.capacity_factor == 1.25
  cfg = C.apply_overrides(get_preset("tiny"), ["model.num_layers=2", "model.num_layers=3"])
  assert cfg.model.num_layers == 3  # the last value wins
  with pytest.raises(C.ConfigError, match="capacity_factor"):
    C.apply_overrides(get_preset("tiny"), ["model.moe_impl=capacity"])
