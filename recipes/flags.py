"""Command-line flags of the recipes and benchmarks: `--config=PRESET` plus `--config.section.key=value` overrides.

    parser = build_parser("Pretrain an mx01 model.")
    parser.add_argument("--resume", action="store_true")
    cfg, args = parse_flags(["--config=tiny", "--config.model.num_layers=2", "--resume"], parser)

This module only wires argparse around the one override parser of
mx01/config.py: overrides are checked against the config dataclasses (an
unknown key names the nearest valid one; a value of the wrong type names the
key) and applied all at once, so `--config.model.head_dim=8
--config.model.rotary_dim=4` works in either order.  A tool that runs several
presets (a benchmark table) takes a comma list, `--config=a,b`, and builds one
config per name with `preset_config`, every one with the same overrides.
"""

from __future__ import annotations

import argparse
import sys
from typing import Mapping, Optional, Sequence

from mx01 import presets
from mx01.config import Config, ConfigError, apply_overrides, split_override_flags

__all__ = ["apply_overrides", "build_parser", "parse_args", "parse_flags", "preset_names", "preset_config",
           "config_error_exit"]


def build_parser(description: str, *, default: Optional[str] = "tiny", several: bool = False,
                 **kwargs) -> argparse.ArgumentParser:
  """An ArgumentParser with `--config` (a preset name, or with several=True a comma list of them)."""
  preset_list = presets.describe_presets()
  kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
  parser = argparse.ArgumentParser(
      description=description,
      epilog=(f"presets: {preset_list}\n\n"
              "Override any config field with --config.SECTION.KEY=VALUE, e.g.\n"
              "  --config.model.num_layers=4 --config.train.steps=200 --config.data.source=path/to/texts\n"
              "Sections: model, parallel, train, data (see mx01/config.py)."), **kwargs)
  what = "comma list of preset names" if several else "preset name"
  parser.add_argument("--config", default=default, metavar="PRESET" + (",..." if several else ""),
                      help=f"{what} (default: {default})")
  return parser


def parse_args(argv: Sequence[str], parser: argparse.ArgumentParser) -> argparse.Namespace:
  """Parses argv; the `--config.*` overrides land in `args.overrides` as ["section.key=value", ...]."""
  overrides, rest = split_override_flags(argv)
  args = parser.parse_args(rest)
  args.overrides = overrides
  return args


def parse_flags(argv: Sequence[str], parser: argparse.ArgumentParser,
                base: Optional[Mapping] = None) -> tuple[Config, argparse.Namespace]:
  """The resolved config of `--config` and its overrides, and the other flags.

  `base`: overrides the tool applies before the command line's (which win), e.g. a benchmark's step count.
  """
  args = parse_args(argv, parser)
  return preset_config(args.config, args.overrides, base), args


def preset_names(args: argparse.Namespace) -> list[str]:
  """The names of a comma list `--config=a,b` (a parser built with several=True)."""
  names = [n.strip() for n in (args.config or "").split(",") if n.strip()]
  if not names:
    raise ConfigError("--config needs at least one preset name, e.g. --config=hybrid_100m")
  return names


def preset_config(name: str, overrides: Sequence[str] = (), base: Optional[Mapping] = None) -> Config:
  """The preset `name` with the tool's `base` overrides ({"data.seq_len": 8192}) and then the command line's."""
  # One call, so the tool's and the command line's values are validated together (the command line's win).
  merged = dict(base or {})
  merged.update(item.split("=", 1) for item in overrides)
  return apply_overrides(presets.get_preset(name), merged)


def config_error_exit(error: ConfigError, code: int = 2) -> int:
  """Prints a config error as one line on stderr and returns the exit code (for `sys.exit(main())`)."""
  print(f"config error: {error}", file=sys.stderr)
  return code
