"""Data parallelism over every device with `jax.sharding`: one mesh axis, 'data'.

The global batch is sharded along its first axis, parameters and optimizer state are
replicated. Under `jit`, XLA's SPMD partitioner inserts the cross-device reductions,
so the loss, the gradients and the BatchNorm statistics are those of the global
batch: N devices compute what one device would (up to float summation order).
Multi-host: call ``jax.distributed.initialize()`` first; each host feeds its own
slice of the global batch and `shard_batch` assembles the global array.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"

# XLA:CPU aborts the whole process when one device waits longer than 40 s for another at a cross-device reduction
# (its guard against deadlocks). A CPU split into devices can wait that long when other work shares the cores or
# the run is paused (a niced evaluation beside a training run was aborted by it), so `use_cpu_devices` lets it
# wait 10 minutes, warning after 5: long enough for a starved or briefly paused run, short enough that a true
# deadlock still ends the process (one evaluation on two CPU devices hung at a reduction with both cores idle;
# the niced abort may have been the same). XLA_FLAGS given by the user win.
COLLECTIVE_TIMEOUT_S = 600
COLLECTIVE_WARN_S = 300


def use_cpu_devices(n: int) -> None:
  """Split the CPU into `n` XLA devices, so that training runs data parallel over them as over accelerators.

  XLA:CPU runs one device's ops on about 1.5 of 2 cores; two devices keep both busy (ResNet-20 train steps 1.3×
  faster on a 2-core CPU, benchmarks/RESULTS.md), with the global batch's numerics up to float summation order.
  1 leaves JAX's CPU devices as they start (one, unless XLA_FLAGS says otherwise). It has to be set before JAX's
  first computation (train_and_evaluate and run_eval do it first); later, a different count is refused in one
  line. Where an accelerator is present it trains on that, and this changes nothing. It also raises XLA:CPU's
  stuck-collective abort from 40 s to `COLLECTIVE_TIMEOUT_S`, so a run that shares its cores survives.
  """
  if n == 1:
    return
  if n < 1:
    raise ValueError(f"config.cpu_devices is {n}; it must be ≥ 1.")
  flags = os.environ.get("XLA_FLAGS", "")
  warn = min(COLLECTIVE_WARN_S, COLLECTIVE_TIMEOUT_S)
  for name, value in (("xla_cpu_collective_call_terminate_timeout_seconds", COLLECTIVE_TIMEOUT_S),
                      ("xla_cpu_collective_call_warn_stuck_timeout_seconds", warn)):
    if f"--{name}=" not in flags:
      flags += f" --{name}={int(value)}"
  os.environ["XLA_FLAGS"] = flags.strip()
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # JAX has started: fine if it already has them
    have = len(jax.devices("cpu"))
    if have != n:
      raise ValueError(f"config.cpu_devices is {n}, but JAX has already started with {have} CPU device(s): set it "
                       "before the first JAX computation (train.py does), or leave it at 1.") from None


def make_mesh(devices: Any = None) -> Mesh:
  """A 1-d mesh over all (or the given) devices."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Place a pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turn this host's slice of the global batch into globally sharded arrays."""
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  """A global batch must split evenly over the devices (and the hosts)."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{what}={batch_size} is not divisible by the {n} devices; "
                     f"use a multiple of {n} (e.g. --config.{what}={max(n, batch_size // n * n)}).")
