"""Images/s of a ResNet-20 train step: JAX plain, JAX + KURE, PyTorch eager, side by side.

  python benchmarks/train_step.py [--batch 128] [--repeats 7] [--steps 20]

All three run in one process on the same synthetic CIFAR-sized batch, interleaved
round by round, so machine noise hits them alike; the table gives medians over the
rounds and ratios. PyTorch comes from the `bench` extra (pip install -e ".[bench]").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/, benchmarks/ importable


def jax_step(kure_weight: float, batch: int):
  from configs import cifar10_resnet20
  from kure_jax import models
  from kure_jax.train import create_state, make_optimizer, make_schedule, make_train_step

  config = cifar10_resnet20.get_config()
  config.kure.weight = kure_weight
  model = models.get_model("resnet20", 10)
  schedule = make_schedule(config, 390, 390 * 60)
  tx = make_optimizer(config, schedule)
  state = create_state(model, tx, jax.random.PRNGKey(0), (32, 32, 3))
  step = jax.jit(make_train_step(model, tx, config, schedule), donate_argnums=0)
  rng = np.random.default_rng(0)
  data = {"image": jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32), "mask": jnp.ones(batch, bool)}
  holder = {"state": state}

  def run(n):
    s = holder["state"]
    for _ in range(n):
      s, m = step(s, data)
    jax.block_until_ready(m["loss"])
    holder["state"] = s

  return run


def torch_step(batch: int):
  import torch
  import torch.nn.functional as F

  from benchmarks.torch_resnet20 import ResNet20

  torch.manual_seed(0)
  model = ResNet20()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
  x = torch.randn(batch, 3, 32, 32)
  y = torch.randint(0, 10, (batch,))

  def run(n):
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(model(x), y)
      loss.backward()
      opt.step()

  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args()

  runners = {"jax plain": jax_step(0.0, args.batch), "jax + KURE": jax_step(1.0, args.batch)}
  if not args.no_torch:
    try:
      runners["torch eager"] = torch_step(args.batch)
    except ImportError:
      print("(PyTorch not installed: pip install -e '.[bench]')")
  for run in runners.values():  # compile / warm up
    run(3)
  rates = {k: [] for k in runners}
  for _ in range(args.repeats):
    for name, run in runners.items():
      t = time.perf_counter()
      run(args.steps)
      rates[name].append(args.steps * args.batch / (time.perf_counter() - t))
  med = {k: statistics.median(v) for k, v in rates.items()}
  base = med["jax plain"]
  print(f"ResNet-20 train step, batch {args.batch}, {jax.devices()[0].platform}, median of {args.repeats}×{args.steps} steps")
  print("| step | images/s (median) | min–max | ratio to jax plain |")
  print("| --- | ---: | ---: | ---: |")
  for k, v in med.items():
    print(f"| {k} | {v:,.0f} | {min(rates[k]):,.0f}–{max(rates[k]):,.0f} | {v / base:.3f} |")
  if "torch eager" in med:
    print(f"\nKURE overhead: {100 * (1 - med['jax + KURE'] / base):+.1f}%   "
          f"jax + KURE / torch eager: {med['jax + KURE'] / med['torch eager']:.2f}×")


if __name__ == "__main__":
  main()
