"""benchmarks/gpu_suite.sh: the stage table parses, and every stage's command names real code and valid configs."""

import pathlib
import re
import shlex
import subprocess

import pytest

from mx01 import config as config_lib
from mx01 import presets

ROOT = pathlib.Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def _run(*args):
  return subprocess.run(["bash", str(SUITE), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def _stages() -> dict:
  out = _run("list")
  assert out.returncode == 0, out.stderr
  names = [line.split()[0] for line in out.stdout.splitlines()]
  assert len(names) == len(set(names)) >= 10, names
  return {name: _run("show", name).stdout.strip() for name in names}


def test_syntax_and_list():
  assert subprocess.run(["bash", "-n", str(SUITE)], capture_output=True).returncode == 0
  for line in _run("list").stdout.splitlines():
    m = re.match(r"(\w+)\s+gpus ([\d,]+)\s+(\d+)s  (.{10,})$", line)
    assert m, f"malformed stage line: {line!r}"
    assert int(m.group(3)) > 0


def test_unknown_stage_is_one_line_error():
  for args in (("no_such_stage",), ("show", "no_such_stage")):
    out = _run(*args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "bash benchmarks/gpu_suite.sh list" in out.stderr


def _python_calls(command: str):
  """[(target, args)] for every `python3 -m MODULE ...` / `python3 SCRIPT ...` in a stage's shell command."""
  calls = []
  for part in re.split(r";|&&|&|\bdo\b|\bdone\b", command):
    words = shlex.split(part)
    if "python3" not in words:
      continue
    words = words[words.index("python3") + 1:]
    words = [w for w in words if w != ">" and not w.startswith("2>")]
    if words[0] == "-m":
      calls.append((words[1], words[2:]))
    else:
      calls.append((words[0], words[1:]))
  return calls


def test_every_stage_uses_real_code_and_the_one_flag_spelling():
  stages = _stages()
  checked = 0
  for name, command in stages.items():
    assert command, name
    for target, args in _python_calls(command):
      if target == "pytest":
        continue
      path = ROOT / (target if target.endswith(".py") else target.replace(".", "/") + ".py")
      assert path.exists(), f"stage {name}: {target} does not exist"
      for old in ("--override", "--set", "--preset", "--presets", "--long_preset"):
        assert old not in args, f"stage {name}: {old} is gone; use --config=NAME --config.section.key=value"
      names = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
      overrides = [a[len("--config."):] for a in args if a.startswith("--config.") and "$" not in a]
      for preset in (n for joined in names for n in joined.split(",")):
        cfg = presets.get_preset(preset)  # raises on an unknown name
        config_lib.apply_overrides(cfg, overrides)  # raises on an unknown key or a bad value
        checked += 1
  assert checked >= 10


@pytest.mark.parametrize("stage", ["train_step", "sweep", "mqar_xs"])
def test_show_prints_the_command(stage):
  out = _run("show", stage)
  assert out.returncode == 0 and "python3" in out.stdout
