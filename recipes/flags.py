"""Command-line flags of the recipes: `--config=PRESET` plus `--config.section.key=value` overrides.

    cfg, args = parse_flags(["--config=tiny", "--config.model.num_layers=2", "--resume"])

Overrides are checked against the config dataclasses (an unknown key names the
nearest valid one; a value of the wrong type names the key) and applied all at
once, so that `--config.model.head_dim=8 --config.model.rotary_dim=4` works in
either order: the combined config is validated only after every override is in.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from typing import Any, Mapping, Sequence

from mx01 import config as config_lib
from mx01 import presets
from mx01.config import Config, ConfigError


def _set_path(tree: dict, cls, path: str, raw: Any, *, from_string: bool) -> None:
  """Sets the dotted `path` of a `to_dict` tree, checking the key and parsing `raw` as the field's type."""
  parts = path.split(".")
  node, node_cls = tree, cls
  for i, part in enumerate(parts):
    fields = {f.name: f for f in dataclasses.fields(node_cls)}
    if part not in fields:
      valid = [".".join(parts[:i] + [n]) for n in fields]
      close = difflib.get_close_matches(path, _all_keys(cls), n=1) or difflib.get_close_matches(
          ".".join(parts[:i + 1]), valid, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"unknown config key {path!r}{hint} (valid keys under "
                        f"{'.'.join(parts[:i]) or 'config'}: {', '.join(sorted(fields))})")
    typ = config_lib._field_types(node_cls)[part]
    if i < len(parts) - 1:
      if not dataclasses.is_dataclass(typ):
        raise ConfigError(f"{path!r}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
      node, node_cls = node[part], typ
    else:
      if dataclasses.is_dataclass(typ):
        first = dataclasses.fields(typ)[0].name
        raise ConfigError(f"{path!r} is a section; set one of its fields, e.g. {path}.{first}")
      node[part] = (config_lib._parse_value(raw, typ, path) if from_string
                    else config_lib._check_value_type(raw, typ, path))


def _all_keys(cls, prefix: str = "") -> list[str]:
  out = []
  for f in dataclasses.fields(cls):
    typ = config_lib._field_types(cls)[f.name]
    if dataclasses.is_dataclass(typ):
      out += _all_keys(typ, f"{prefix}{f.name}.")
    else:
      out.append(f"{prefix}{f.name}")
  return out


def apply_overrides(cfg: Config, overrides: Mapping[str, Any] | Sequence[str]) -> Config:
  """Applies {"model.num_layers": 4} or ["model.num_layers=4", ...] together, then validates once."""
  tree = config_lib.to_dict(cfg)
  items = overrides.items() if isinstance(overrides, Mapping) else None
  if items is None:
    items = []
    for item in overrides:
      if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
      k, v = item.split("=", 1)
      items.append((k.strip(), v.strip()))
  for key, value in items:
    _set_path(tree, Config, key, value, from_string=isinstance(value, str))
  return config_lib.from_dict(tree)


def build_parser(description: str) -> argparse.ArgumentParser:
  preset_list = ", ".join(presets.list_presets())
  parser = argparse.ArgumentParser(
      description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=(f"presets: {preset_list}\n\n"
              "Override any config field with --config.SECTION.KEY=VALUE, e.g.\n"
              "  --config.model.num_layers=4 --config.train.steps=200 --config.data.source=path/to/texts\n"
              "Sections: model, parallel, train, data (see mx01/config.py)."))
  parser.add_argument("--config", default="tiny", metavar="PRESET",
                      help=f"preset name (default: tiny). One of: {preset_list}")
  return parser


def parse_flags(argv: Sequence[str], parser: argparse.ArgumentParser) -> tuple[Config, argparse.Namespace]:
  """Splits argv into parser flags and --config.* overrides; returns the resolved config and the flags."""
  overrides, rest = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" not in body:  # "--config.key value"
        if i + 1 >= len(argv):
          raise ConfigError(f"override {arg!r} needs a value: {arg}=VALUE")
        body = f"{body}={argv[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  args = parser.parse_args(rest)
  cfg = presets.get_preset(args.config)
  if overrides:
    cfg = apply_overrides(cfg, overrides)
  return cfg, args
