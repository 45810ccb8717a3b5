"""An NCF (NeuMF) training epoch on MovieLens-1M: kure-jax's jitted step against PyTorch eager, side by side.

  python benchmarks/ncf_epoch.py [--steps 400] [--repeats 5] [--batch 256]

Both sides train the same NeuMF (factors 8, MLP 64-32-16-8, NCF's initializers, the sizes of ML-1M: 6,040
users, 3,706 items) with Adam (lr 0.001) on sigmoid binary cross-entropy, one batch of 256 (user, item,
label) a step, as `configs/movielens_neumf.py` trains. kure-jax's step is the project's own
(`kure_jax.training.train.make_train_step` with the 'ranking' task, state donated), with and without KURE on the
weights and activations (λ 1.0 / 0.1); PyTorch's is the usual eager loop (zero_grad, forward, backward,
step) with one thread per usable CPU. Rounds are interleaved, so machine noise hits all alike; the table
gives medians, the epoch time scaled to ML-1M's 19,417 steps (994,169 positives × 5 / 256), and ratios.
The example sampling (`kure_jax.data.movielens.epoch_examples`, ~0.7 s an epoch, drawn in a background
thread while the previous epoch trains) is timed once, separately. PyTorch comes from the `bench` extra.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ importable

USERS, ITEMS = 6040, 3706
STEPS_PER_EPOCH = 994_169 * 5 // 256


def batches(n: int, batch: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  return [{"user": rng.integers(0, USERS, batch).astype(np.int32), "item": rng.integers(0, ITEMS, batch).astype(np.int32),
           "label": (rng.random(batch) < 0.2).astype(np.float32), "mask": np.ones(batch, bool)} for _ in range(n)]


def jax_runner(data: list[dict], lam_w: float, lam_a: float):
  from configs import movielens_neumf
  from kure_jax import models, tasks
  from kure_jax.training.train import create_state, make_optimizer, make_schedule, make_train_step

  config = movielens_neumf.get_config()
  config.kure.weight, config.kure.activations = lam_w, lam_a
  model = models.get_model("neumf", 1, num_users=USERS, num_items=ITEMS, factors=8, mlp_layers=(64, 32, 16, 8))
  schedule = make_schedule(config, STEPS_PER_EPOCH, STEPS_PER_EPOCH * 20)
  tx = make_optimizer(config, schedule)
  state = create_state(model, tx, jax.random.PRNGKey(0), task=tasks.RANKING)
  device_data = [jax.device_put(b) for b in data]
  step = jax.jit(make_train_step(model, tx, config, schedule, task=tasks.RANKING), donate_argnums=0)
  holder = {"state": state}

  def run(n):
    s = holder["state"]
    for i in range(n):
      s, m = step(s, device_data[i % len(device_data)])
    jax.block_until_ready(m["loss"])
    holder["state"] = s

  return run


def torch_runner(data: list[dict]):
  import torch
  import torch.nn as tnn

  torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
  torch.manual_seed(0)

  class NeuMF(tnn.Module):
    def __init__(self):
      super().__init__()
      self.mf_u, self.mf_i = tnn.Embedding(USERS, 8), tnn.Embedding(ITEMS, 8)
      self.mlp_u, self.mlp_i = tnn.Embedding(USERS, 32), tnn.Embedding(ITEMS, 32)
      self.mlp = tnn.Sequential(tnn.Linear(64, 32), tnn.ReLU(), tnn.Linear(32, 16), tnn.ReLU(), tnn.Linear(16, 8),
                                tnn.ReLU())
      self.prediction = tnn.Linear(16, 1)
      for e in (self.mf_u, self.mf_i, self.mlp_u, self.mlp_i):
        tnn.init.normal_(e.weight, std=0.01)

    def forward(self, u, i):
      mf = self.mf_u(u) * self.mf_i(i)
      h = self.mlp(torch.cat([self.mlp_u(u), self.mlp_i(i)], -1))
      return self.prediction(torch.cat([mf, h], -1))[:, 0]

  model = NeuMF()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  loss_fn = tnn.BCEWithLogitsLoss()
  tdata = [(torch.from_numpy(b["user"]).long(), torch.from_numpy(b["item"]).long(), torch.from_numpy(b["label"]))
           for b in data]

  def run(n):
    for i in range(n):
      u, it, y = tdata[i % len(tdata)]
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(model(u, it), y)
      loss.backward()
      opt.step()

  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=400, help="steps per measurement")
  p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args()
  data = batches(64, args.batch)
  runners = {"jax (kure-jax step)": jax_runner(data, 0.0, 0.0),
             "jax + KURE (weights 1.0, activations 0.1)": jax_runner(data, 1.0, 0.1)}
  if not args.no_torch:
    try:
      runners["torch eager"] = torch_runner(data)
    except ImportError:
      print("(PyTorch not installed: pip install -e '.[bench]')")
  for run in runners.values():
    run(20)
  secs = {k: [] for k in runners}
  for _ in range(args.repeats):
    for k, run in runners.items():
      t = time.perf_counter()
      run(args.steps)
      secs[k].append((time.perf_counter() - t) / args.steps)
  med = {k: statistics.median(v) for k, v in secs.items()}
  sample_s = None
  shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens"
  if shared.is_dir():
    from kure_jax.data import movielens
    ml = movielens.load(shared)
    movielens.epoch_examples(ml, 0, 0)
    t = time.perf_counter()
    movielens.epoch_examples(ml, 0, 1)
    sample_s = time.perf_counter() - t

  ref = med.get("torch eager")
  print(f"NeuMF train step, batch {args.batch}, {jax.devices()[0].platform}, jax {jax.__version__}; median of "
        f"{args.repeats} interleaved rounds × {args.steps} steps; epoch = {STEPS_PER_EPOCH:,} steps")
  print("\n| step | ms/step (median) | steps/s | epoch (s) | vs torch eager |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for k, s in med.items():
    vs = f"{ref / s:.2f}×" if ref else "–"
    print(f"| {k} | {1e3 * s:.3f} | {1 / s:,.0f} | {s * STEPS_PER_EPOCH:.1f} | {vs} |")
  if sample_s is not None:
    print(f"\nsampling one epoch's negatives (epoch_examples, ML-1M): {sample_s:.2f} s (overlapped with training)")


if __name__ == "__main__":
  main()
