"""One process of the two-process test: 4 CPU devices here, 8 in the mesh.

Usage: python -m tests.mx01.parallel.multiprocess_worker <coordinator host:port> <process_id>
Prints "RESULT <sharded loss> <single-device loss>" on success.
"""

import os
import re
import sys

# 4 devices, whatever count the caller's XLA_FLAGS ask for; its other flags (the tests' compile flags) stay.
os.environ["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
                           + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
import optax  # noqa: E402

from mx01 import model as model_lib  # noqa: E402
from mx01 import training  # noqa: E402
from mx01.config import ParallelConfig  # noqa: E402
from mx01.parallel import mesh as mesh_lib  # noqa: E402
from mx01.parallel import rules  # noqa: E402
from tests.mx01.parallel.util import packed_batch, tiny_config  # noqa: E402


def global_array(x, sharding):
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def main():
  coordinator, process_id = sys.argv[1], int(sys.argv[2])
  jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4, (jax.device_count(), jax.local_device_count())
  cfg = tiny_config()
  parallel = ParallelConfig(data=2, sequence=2, tensor=2, expert=2, expert_tensor=2)
  optimizer = optax.sgd(0.1)
  params = jax.device_get(model_lib.init(cfg, jax.random.key(0)))
  batch = jax.device_get(packed_batch(jax.random.key(1), cfg, 4, 16))
  local = jax.local_devices()[0]
  ref_loss, _ = jax.jit(training.loss_fn, static_argnames="config")(
      jax.device_put(params, local), jax.device_put(batch, local), config=cfg)

  pm = mesh_lib.build_mesh(parallel)
  shardings = rules.param_shardings(params, pm, model_lib.param_logical_axes(cfg))
  sharded = jax.tree.map(global_array, params, shardings)
  replicated = jax.sharding.NamedSharding(pm.mesh, jax.sharding.PartitionSpec())
  global_batch = jax.tree.map(lambda x: global_array(x, replicated), batch)
  opt_state = jax.jit(optimizer.init)(sharded)
  step = jax.jit(training.make_train_step(cfg, pm, optimizer))
  _, _, metrics = step(sharded, opt_state, global_batch)
  loss = float(np.asarray(metrics["total_loss"].addressable_data(0)))
  print(f"RESULT {loss:.7f} {float(ref_loss):.7f}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
