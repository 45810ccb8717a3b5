"""Images/s of the ImageNet train step (CE + λ·KURE, SGD) of configs/<model>.py on synthetic images.

  python benchmarks/imagenet_step.py [--model resnet18] [--image-size 224] [--batch 32] [--steps 5] [--memory]

The step is `kure_jax.training.train.make_train_step` with the config's optimizer, schedule and KURE
(λ = 1), compiled once; each timed step is blocked on, and the table gives the median over
`--steps` steps after two warm-up steps, XLA's FLOP count per image (so achieved FLOP/s),
the compile time and what that rate means for an epoch of ImageNet's 1,281,167 training
images. Random inputs: the data pipeline is not
measured (see benchmarks/data_pipeline.py for it).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ importable

IMAGENET_TRAIN = 1_281_167


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="resnet18", choices=("resnet18", "resnet50", "mobilenet_v2"))
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--batch", type=int, default=32, help="per-step batch (the config's is 256/128)")
  p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
  p.add_argument("--memory", action="store_true",
                 help="also compile (not run) one step at the config's batch size and print XLA's buffer plan")
  args = p.parse_args()

  from kure_jax import models
  from kure_jax.training.train import (
    create_state,
    make_optimizer,
    make_schedule,
    make_train_step,
  )

  config = importlib.import_module(f"configs.{args.model}").get_config()
  steps_per_epoch = IMAGENET_TRAIN // config.batch_size
  model = models.get_model(args.model, config.dataset.num_classes)
  schedule = make_schedule(config, steps_per_epoch, steps_per_epoch * config.num_epochs)
  tx = make_optimizer(config, schedule)
  size = args.image_size
  state = create_state(model, tx, jax.random.PRNGKey(0), (size, size, 3))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(args.batch, size, size, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, config.dataset.num_classes, args.batch), jnp.int32),
           "mask": jnp.ones(args.batch, bool)}
  step = jax.jit(make_train_step(model, tx, config, schedule), donate_argnums=0)

  t = time.perf_counter()
  lowered = step.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  gflop = lowered.cost_analysis()["flops"] / args.batch / 1e9  # XLA's count, per image
  times = []
  for i in range(args.steps + 2):
    t = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
    if i >= 2:
      times.append(time.perf_counter() - t)
  rate = args.batch / statistics.median(times)
  dev = jax.devices()[0]
  print(f"{args.model} train step (CE + KURE λ={config.kure.weight}, SGD), {size}×{size}, batch {args.batch}, "
        f"{jax.device_count()}× {dev.platform} ({dev.device_kind}), median of {args.steps} steps")
  print("| images/s (median) | s/step min–max | GFLOP/image | achieved GFLOP/s | compile s | h per ImageNet epoch |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: |")
  print(f"| {rate:,.1f} | {min(times):.2f}–{max(times):.2f} | {gflop:.2f} | {rate * gflop:,.0f} | {compile_s:.0f} "
        f"| {IMAGENET_TRAIN / rate / 3600:,.1f} |")
  print(f"\nloss {float(m['loss']):.3f}; configs/{args.model}.py: batch {config.batch_size}, "
        f"{steps_per_epoch:,} steps/epoch, {config.num_epochs} epochs = {steps_per_epoch * config.num_epochs:,} steps")
  if args.memory:
    b = config.batch_size
    full = {k: jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype) for k, x in batch.items()}
    ma = step.lower(jax.eval_shape(lambda: state), full).compile().memory_analysis()
    gib = {k: getattr(ma, f"{k}_size_in_bytes") / 2**30 for k in ("argument", "output", "temp")}
    print(f"XLA:{dev.platform} buffer plan for one step at batch {b} ({size}²): arguments {gib['argument']:.2f} GiB, "
          f"outputs {gib['output']:.2f} GiB, temporaries {gib['temp']:.2f} GiB")


if __name__ == "__main__":
  main()
