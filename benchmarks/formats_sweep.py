"""Throughput of number-format points in the one-call sweep against integer-grid points (ResNet-20, CPU).

  python benchmarks/formats_sweep.py [--batches 4] [--rounds 5] [--points 8]

Each configuration is one `Sweep` scoring `points` grid points (step ratios) of one kind — the integer grid
at 4 bits (MSE steps, no formats in the grid: the hook has no format branch at all), or one number format at
its max scaling (`eval.formats`, no integer points) — weights and activations quantized, per-tensor scales;
and one `Sweep` whose grid holds the integer points and every format's points together (what `eval.formats`
is for: integer and floating-point points in the same compiled call), timed per point.
Rounds are interleaved and the table gives the median seconds per point (each point reads every batch) and
the ratio to the integer grid's, measured side by side in this run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kure_jax import models  # noqa: E402
from kure_jax.evaluation.robustness import Grid, Sweep  # noqa: E402

KINDS = ("int4 (grid)", "int4", "fp8_e4m3", "fp6_e3m2", "fp4_e2m1", "mxfp8_e4m3", "mxfp4", "nvfp4")
MIXED = "int4 grid + the 7 formats, one call"


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", type=int, default=4)
  ap.add_argument("--batch_size", type=int, default=250)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--points", type=int, default=8)
  args = ap.parse_args()
  model = models.get_model("resnet20", 10)
  variables = models.init_variables(model, 0, (32, 32, 3))
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(args.batch_size, 32, 32, 3)).astype(np.float32),
              "label": rng.integers(0, 10, args.batch_size).astype(np.int32),
              "mask": np.ones(args.batch_size, bool)} for _ in range(args.batches)]
  calib = [batches[0]["image"]]
  ratios = tuple(np.round(np.linspace(0.8, 1.2, args.points), 4))
  sweeps = {}
  for kind in KINDS:
    if kind == "int4 (grid)":
      grid = Grid(bits=(4,), ratios=ratios, targets=("both",))
    else:
      grid = Grid(bits=(), formats=(kind,), ratios=ratios, targets=("both",))
    sweeps[kind] = Sweep(model, variables, grid, calibration=calib)
  sweeps[MIXED] = Sweep(model, variables, Grid(bits=(4,), formats=KINDS[1:], ratios=ratios, targets=("both",)),
                        calibration=calib)
  for sweep in sweeps.values():
    sweep.score(batches[:1])                      # compile
  times = {k: [] for k in sweeps}
  for _ in range(args.rounds):
    for kind, sweep in sweeps.items():
      t0 = time.perf_counter()
      sweep.score(batches)
      times[kind].append((time.perf_counter() - t0) / len(sweep.points))
  base = float(np.median(times["int4 (grid)"]))
  images = args.batches * args.batch_size
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {images} images × {len(ratios)} points per call, "
        f"weights + activations, median of {args.rounds} interleaved rounds\n")
  print("| points | s / point | images/s per point | time vs int4 grid |")
  print("| --- | ---: | ---: | ---: |")
  for kind in sweeps:
    m = float(np.median(times[kind]))
    print(f"| {kind} | {m:.3f} | {images / m:,.0f} | {m / base:.2f}× |")


if __name__ == "__main__":
  main()
