"""The kernels package is the bottom layer: it imports jax, never mx01, and the project has no import circles."""

import subprocess
import sys

from tests import import_graph

# Importing every kernel module (and loading the private copy of jax's attention module) leaves mx01 out.
_PROBE = """
import sys
assert not any(m == "mx01" or m.startswith("mx01.") for m in sys.modules)
import pallas_kernels
import pallas_kernels.flash_attention as fa
import pallas_kernels.grouped_matmul
import pallas_kernels.lightning.chunk_states
fa._attention_module()
loaded = sorted(m for m in sys.modules if m == "mx01" or m.startswith("mx01."))
assert not loaded, loaded
"""


def test_kernels_import_without_mx01():
  run = subprocess.run([sys.executable, "-c", _PROBE], cwd=import_graph.ROOT, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]


def test_kernels_source_never_imports_mx01():
  """Lazy imports inside functions count too (the subprocess check only sees what runs on import)."""
  g = import_graph.graph("mx01", "pallas_kernels")
  bad = {m: sorted(d for d in deps if d.split(".")[0] == "mx01") for m, deps in g.items()
         if m.split(".")[0] == "pallas_kernels"}
  assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_no_import_cycles():
  g = import_graph.graph("mx01", "pallas_kernels")
  assert "mx01.ops" in g and "pallas_kernels.lightning.chunk_states" in g  # the graph sees the modules
  assert import_graph.cycles(g) == []


def test_cycle_finder_finds_a_cycle():
  assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
