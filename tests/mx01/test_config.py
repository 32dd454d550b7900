"""Configs: validation errors name the field; overrides are checked against the dataclasses."""

import dataclasses

import pytest

from pallas_kernels.lightning.config import LightningConfig

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
    (dict(cudnn_max_segments=0), "cudnn_max_segments"),
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


def test_parse_value_and_keys():
  assert C.parse_value("1e6", int, "train.steps") == 1_000_000  # an integer written as a float
  with pytest.raises(C.ConfigError, match="expected an integer"):
    C.parse_value("1.5", int, "train.steps")
  assert C.parse_value("none", C.field_types(C.ModelConfig)["capacity_factor"], "k") is None
  keys = C.config_keys()
  assert "model.num_layers" in keys and "parallel.fsdp" in keys and "model" not in keys
  # A section alone takes keys relative to it; the suggestion searches the whole config.
  assert C.apply_overrides(C.ModelConfig(), ["num_layers=3"]).num_layers == 3
  with pytest.raises(C.ConfigError, match="did you mean 'train.steps'"):
    C.apply_overrides(get_preset("tiny"), ["trian.steps=3"])
  assert C.split_override_flags(["--config=tiny", "--config.a.b=1", "--x", "--config.c", "2"]) == (
      ["a.b=1", "c=2"], ["--config=tiny", "--x"])


def test_hybrid_pattern_is_seven_to_one():
  from mx01 import presets
  L, S = C.LIGHTNING, C.SOFTMAX
  assert presets.HYBRID_PATTERN == (L,) * 7 + (S,)
  assert presets.layer_types("hybrid", 16) == presets.HYBRID_PATTERN * 2
  assert presets.layer_types("hybrid", 10) == presets.HYBRID_PATTERN + (L, L)
  # Shallower than one period: the pattern's end, so the one softmax layer is last.
  assert presets.layer_types("hybrid", 2) == (L, S) and presets.layer_types("hybrid", 4) == (L, L, L, S)
  assert presets.layer_types("lightning", 3) == (L,) * 3
  for name in ("hybrid_1b", "hybrid_456b", "sweep_hybrid_s7", "retrieval_hybrid_s"):
    types = get_preset(name).model.resolved_layer_types
    assert types[-1] == S and types.count(S) == max(1, len(types) // 8), name


# The sweep's and the retrieval study's models before their sizes became presets, spelled out:
# (hidden, layers, heads, kv_heads, intermediate), head_dim 16; and (hidden, layers, heads, kv_heads, head_dim).
_OLD_SWEEP = {"s1": (32, 2, 2, 1, 96), "s2": (48, 2, 3, 1, 128), "s3": (64, 4, 4, 2, 176), "s4": (96, 4, 6, 2, 256),
              "s5": (128, 6, 8, 2, 352), "s6": (192, 8, 12, 4, 512), "s7": (256, 8, 16, 4, 704)}
_OLD_RETRIEVAL = {"xs": (64, 2, 2, 1, 32), "s": (128, 4, 4, 2, 32)}


def _old_types(kind, n):
  L, S = C.LIGHTNING, C.SOFTMAX
  return {"softmax": (S,) * n, "lightning": (L,) * n,
          "hybrid": tuple(S if (i % 8 == 7 or (n < 8 and i == n - 1)) else L for i in range(n))}[kind]


@pytest.mark.parametrize("kind", ["softmax", "lightning", "hybrid"])
def test_sweep_and_retrieval_presets_keep_their_models(kind):
  from mx01 import presets
  for size, (hidden, layers, heads, kv, inter) in _OLD_SWEEP.items():
    for moe in (False, True):
      alpha = (2.0 * layers) ** 0.25
      old = C.ModelConfig(
          vocab_size=256, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=16,
          layer_types=_old_types(kind, layers), ffn_type="moe" if moe else "dense",
          intermediate_size=inter // 2 if moe else inter, num_experts=4 if moe else 1,
          num_experts_per_tok=2 if moe else 1, block_size=32, rotary_dim=8, lightning_alpha=alpha,
          softmax_alpha=alpha, mlp_alpha=alpha,
          # The kernel tiles these models ran with on GPUs (the kernels took the block, backward at most 64).
          lightning_kernel=LightningConfig(block_size=32, bwd_block_size=32))
      assert get_preset(presets.sweep_name(kind, size, "moe" if moe else "dense")).model == old
  for size, (hidden, layers, heads, kv, hd) in _OLD_RETRIEVAL.items():
    old = C.ModelConfig(
        vocab_size=64, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hd,
        layer_types=_old_types(kind, layers), ffn_type="dense", intermediate_size=4 * hidden, num_experts=1,
        num_experts_per_tok=1, block_size=64, rotary_dim=hd, initializer_range=hidden ** -0.5,
        lightning_kernel=LightningConfig(block_size=64, bwd_block_size=64))
    assert get_preset(presets.retrieval_name(kind, size)).model == old
