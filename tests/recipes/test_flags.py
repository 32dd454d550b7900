"""The one command-line spelling, --config=NAME --config.section.key=value, in every recipe and benchmark."""

import pathlib
import re

import pytest

from mx01 import config as config_lib
from mx01.config import ConfigError
from recipes import flags

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_flags_wire_the_config_parser_only():
  assert flags.apply_overrides is config_lib.apply_overrides  # one engine, re-exported
  source = (ROOT / "recipes" / "flags.py").read_text()
  assert not re.search(r"config(_lib)?\._", source), "recipes/flags.py must use config's public functions only"


def test_parse_flags_forms_and_errors():
  parser = flags.build_parser("test")
  parser.add_argument("--resume", action="store_true")
  cfg, args = flags.parse_flags(["--config=tiny", "--config.model.num_layers", "2", "--resume",
                                 "--config.train.steps=50"], parser)
  assert cfg.model.num_layers == 2 and cfg.train.steps == 50 and args.resume
  assert args.overrides == ["model.num_layers=2", "train.steps=50"]
  with pytest.raises(ConfigError, match="needs a value"):
    flags.parse_flags(["--config.model.num_layers"], parser)
  with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
    flags.parse_flags(["--config.trian.steps=3"], parser)
  with pytest.raises(ConfigError, match="did you mean 'bfloat16'"):
    flags.parse_flags(["--config.model.compute_dtype=bf16"], parser)


def test_comma_list_of_presets_and_base():
  parser = flags.build_parser("test", default="tiny", several=True)
  args = flags.parse_args(["--config=tiny, hybrid_20m", "--config.train.steps=7"], parser)
  assert flags.preset_names(args) == ["tiny", "hybrid_20m"]
  cfgs = [flags.preset_config(name, args.overrides, base={"train.steps": 3, "train.warmup_steps": 2,
                                                          "data.seq_len": 64}) for name in flags.preset_names(args)]
  # The command line wins over the tool's base; the rest of the base stays.
  assert all(c.train.steps == 7 and c.train.warmup_steps == 2 and c.data.seq_len == 64 for c in cfgs)
  with pytest.raises(ConfigError, match="at least one preset"):
    flags.preset_names(flags.parse_args(["--config=,"], parser))
  with pytest.raises(ConfigError, match="unknown preset 'hybrid_2b'"):
    flags.preset_config("hybrid_2b")
  # Base and command line are validated together: warmup 10 > steps 5 only after both are in.
  with pytest.raises(ConfigError, match="warmup_steps"):
    flags.preset_config("tiny", ["train.steps=5"], base={"train.warmup_steps": 10})


def test_no_other_override_spelling_left():
  files = list((ROOT / "recipes").glob("*.py")) + list((ROOT / "benchmarks").glob("*.py"))
  for path in files + [ROOT / "benchmarks" / "gpu_suite.sh", ROOT / "README.md"]:
    text = path.read_text()
    for old in ('"--set"', '"--override"', '"--preset"', '"--presets"', "--override model.", "--set model."):
      assert old not in text, f"{path.relative_to(ROOT)} still spells {old}"


def test_generate_takes_config_overrides(capsys):
  from recipes import generate
  assert generate.main(["--config=tiny", "--random-init", "--config.model.num_layer=2"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "did you mean 'model.num_layers'" in err
  with pytest.raises(SystemExit):  # the old spelling is gone
    generate.main(["--config=tiny", "--random-init", "--set", "model.num_layers=2"])


def test_sweep_overrides(capsys):
  from recipes import sweep
  assert sweep.main(["--dry_run", "--archs", "hybrid", "--sizes", "s1", "--tokens", "1e4",
                     "--config.train.batch_size=4", "--config.data.seq_len=32", "--config.model.block_size=16"]) == 0
  out = capsys.readouterr().out
  assert "(79 steps)" in out  # ceil(1e4 / (4 * 32))
  assert sweep.main(["--dry_run", "--config.train.steps=5"]) == 2
  assert "sets it per grid point" in capsys.readouterr().err
  cfg = sweep.run_config(sweep.GridPoint("hybrid", "s1", "dense", 1e4), batch_size=4, seq_len=32, learning_rate=1e-3,
                         seed=0, run_root=pathlib.Path("/tmp"), model_overrides=["block_size=16", "intermediate_size=64"])
  assert cfg.model.block_size == 16 and cfg.model.intermediate_size == 64 and cfg.model.hidden_size == 32


def test_retrieval_overrides(capsys):
  from recipes import retrieval
  cfg = retrieval.model_config("hybrid", "xs", vocab_size=64, seq_len=32, overrides=["compute_dtype=bfloat16"])
  assert cfg.compute_dtype == "bfloat16" and cfg.block_size == 32
  for bad in (["--config.train.steps=3"], ["--kinds", "mamba"], ["--sizes", "xl"]):
    assert retrieval.main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
