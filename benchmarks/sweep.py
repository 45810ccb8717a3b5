"""One-call robustness sweep vs per-point loops: ResNet-20 on the real CIFAR-10 test set.

  python benchmarks/sweep.py [--data-dir ../shared/data/cifar10] [--checkpoint runs/r20]
                             [--images 10000] [--loop-points 12]

Grid: 4 bit-widths (2, 3, 4, 8) × 21 step ratios (0.7…1.3), MSE-optimal base steps,
weights quantized (stem and classifier in float), 84 points. Measured in one process:

  float     one float forward pass over the test set (kure-jax, jitted), the unit;
  one-call  `kure_jax.evaluation.robustness.Sweep`: every point on every batch, one compiled
            function, the data read once;
  jax loop  the plain sequential way: per point, quantize the kernels (jitted, compiled
            once) and run the jitted float evaluation over the test set;
  torch     the reference-style PyTorch loop, as the paper's code runs it: per point,
            copy the model, find each layer's MSE-optimal step with SciPy on the host,
            quantize in place, one DataLoader pass over the JPEG files.

The loops cost the same for every point, so they run on `--loop-points` points (spread
over bits and ratios) and their per-point median is scaled to the whole grid; the
one-call sweep runs the whole grid. The loops' accuracies are checked against the
one-call rows (the JAX loop must count the same correct predictions exactly).
Weights: a kure-jax checkpoint (`--checkpoint`), or a random initialization
(the timings do not depend on the weights).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/, benchmarks/ importable

from configs import cifar10_resnet20  # noqa: E402
from kure_jax import data as data_lib  # noqa: E402
from kure_jax import models  # noqa: E402
from kure_jax.checkpoint import load_variables  # noqa: E402
from kure_jax.core import quant as Q  # noqa: E402
from kure_jax.evaluation.robustness import Grid, Sweep  # noqa: E402
from kure_jax.training.train import make_eval_step  # noqa: E402

BITS = (2, 3, 4, 8)
RATIOS = tuple(float(r) for r in np.round(np.linspace(0.7, 1.3, 21), 6))


def timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def jax_batches(ds, n_batches):
  return itertools.islice(ds.iterate(), n_batches)


def sums_to_correct(t) -> int:
  return int(jax.device_get(t["top1"]))


def jax_loop(model, variables, paths, ds, n_batches):
  """The sequential JAX way: a jitted quantize-the-kernels function and the jitted float eval."""
  eval_step = jax.jit(make_eval_step(model))

  @jax.jit
  def quantize_params(params, bits, ratio):
    params = jax.tree.map(lambda x: x, params)  # a fresh nested dict
    for p in paths:
      *parents, leaf = p.split("/")
      node = params
      for part in parents:
        node = node[part]
      k = node[leaf]
      node[leaf] = Q.quantize(k, ratio * Q.mse_step(k, bits), bits)
    return params

  def run(pt):
    q = quantize_params(variables["params"], jnp.int32(pt["bits"]), jnp.float32(pt["ratio"]))
    v = {**variables, "params": q}
    total = None
    for b in jax_batches(ds, n_batches):
      s = eval_step(v, b)
      total = s if total is None else jax.tree.map(jnp.add, total, s)
    return sums_to_correct(total)

  return run


def torch_loop(variables, paths, jpeg_root: Path, n_images: int, batch: int):
  """The reference-style PyTorch loop: copy, SciPy step search per layer, quantize, DataLoader pass."""
  import torch
  from PIL import Image
  from scipy.optimize import minimize_scalar

  from benchmarks.torch_resnet20 import ResNet20, load_flax

  torch.set_grad_enabled(False)
  classes = sorted(p.name for p in jpeg_root.iterdir())
  files = [(f, i) for i, c in enumerate(classes) for f in sorted((jpeg_root / c).iterdir())]
  files = sorted(files, key=lambda fi: (fi[0].parent.name, fi[0].name))[:n_images] if n_images < len(files) else files
  mean = torch.tensor(data_lib.CIFAR10_MEAN).view(3, 1, 1)
  std = torch.tensor(data_lib.CIFAR10_STD).view(3, 1, 1)

  class Folder(torch.utils.data.Dataset):  # torchvision's ImageFolder + ToTensor + Normalize
    def __len__(self):
      return len(files)

    def __getitem__(self, i):
      path, label = files[i]
      with Image.open(path) as im:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)
      return (x - mean) / std, label

  loader = torch.utils.data.DataLoader(Folder(), batch_size=batch, shuffle=False, num_workers=2)
  model = load_flax(ResNet20().eval(), variables)
  modules = dict(model.named_modules())
  names = [p.rsplit("/", 1)[0].replace("/", ".").replace("_", ".") for p in paths]

  def quantize_(w: torch.Tensor, bits: int, ratio: float) -> None:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def q(step):
      return torch.clamp(torch.round(w / step), qmin, qmax) * step

    hi = float(w.abs().max()) / 2 ** (bits - 1) * 2
    best = minimize_scalar(lambda s: float(((q(s) - w) ** 2).mean()), bounds=(hi * 1e-3, hi), method="bounded",
                           options={"xatol": hi * 1e-5})
    w.copy_(q(best.x * ratio))

  def run(pt):
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    for n in names:
      if pt["bits"] < 32:  # 32: the float model
        quantize_(mods[n].weight, pt["bits"], pt["ratio"])
    correct = 0
    for x, y in loader:
      correct += int((m(x).argmax(-1) == y).sum())
    return correct

  assert all(n in modules for n in names), names
  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
  p.add_argument("--checkpoint", default=None, help="a kure-jax workdir or checkpoint (default: random init)")
  p.add_argument("--images", type=int, default=10000)
  p.add_argument("--batch", type=int, default=500)
  p.add_argument("--loop-points", type=int, default=12, help="points the per-point loops run (scaled to the grid)")
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args()
  data_dir = Path(args.data_dir)
  if not (data_dir / "cifar10-jpeg-test.tar.gz").is_file():
    sys.exit(f"CIFAR-10 tarballs not found in {data_dir}; pass --data-dir.")
  if args.images % args.batch:
    sys.exit("--images must be a multiple of --batch.")
  n_batches = args.images // args.batch

  config = cifar10_resnet20.get_config()
  config.dataset.data_dir = str(data_dir)
  ds = data_lib.make_dataset(config.dataset, "eval", batch_size=args.batch, train=False, seed=0)
  model = models.get_model("resnet20", 10)
  if args.checkpoint:
    variables, _ = load_variables(args.checkpoint)
  else:
    variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  grid = Grid(bits=BITS, ratios=RATIOS)
  n_points = len(grid.points())

  # float forward: the unit of cost
  eval_step = jax.jit(make_eval_step(model))
  first = next(ds.iterate())
  jax.block_until_ready(eval_step(variables, first))

  def float_pass():
    total = None
    for b in jax_batches(ds, n_batches):
      s = eval_step(variables, b)
      total = s if total is None else jax.tree.map(jnp.add, total, s)
    return sums_to_correct(total)

  float_times = []
  for _ in range(3):
    float_correct, t = timed(float_pass)
    float_times.append(t)
  t_float = statistics.median(float_times)

  # one call: the whole grid, the data read once
  sweep = Sweep(model, variables, grid, chunk=1)
  _, t_compile = timed(lambda: sweep.score([first]))
  rows, t_one = timed(lambda: sweep.score(jax_batches(ds, n_batches)))
  by_point = {(r["bits"], r["ratio"]): r["correct"] for r in rows}

  # strategy check on 2 batches × 12 points: lax.map one point at a time vs vmap over points
  small = Grid(bits=BITS, ratios=(0.7, 1.0, 1.3))
  strategy = {}
  for chunk in (1, 4):
    s = Sweep(model, variables, small, chunk=chunk)
    s.score([first])
    _, t = timed(lambda: s.score(jax_batches(ds, 2)))
    strategy[chunk] = 12 * 2 * args.batch / t

  # the loops, on points spread over the grid
  pts = grid.points()
  loop_pts = [pts[i] for i in np.linspace(0, n_points - 1, min(args.loop_points, n_points)).round().astype(int)]
  loop = jax_loop(model, variables, sweep.paths, ds, n_batches)
  loop(loop_pts[0])  # compile
  jax_times, jax_mismatch = [], 0
  for pt in loop_pts:
    correct, t = timed(lambda: loop(pt))
    jax_times.append(t)
    jax_mismatch += correct != by_point[(pt["bits"], pt["ratio"])]

  torch_times, torch_diffs, torch_float = [], [], None
  if not args.no_torch:
    with tempfile.TemporaryDirectory(prefix="kure_jax_sweep_") as tmp:
      with tarfile.open(data_dir / "cifar10-jpeg-test.tar.gz") as tar:
        tar.extractall(tmp, filter="data")
      run = torch_loop(variables, sweep.paths, Path(tmp) / "test", args.images, args.batch)
      torch_float = run({"bits": 32, "ratio": 1.0})
      for pt in loop_pts:
        correct, t = timed(lambda: run(pt))
        torch_times.append(t)
        torch_diffs.append(100 * abs(correct - by_point[(pt["bits"], pt["ratio"])]) / args.images)

  # report
  n = args.images
  unit = n / t_float  # images/s of one float pass
  print(f"ResNet-20, CIFAR-10 test ({n} images, batch {args.batch}), grid {len(BITS)} bits × {len(RATIOS)} ratios "
        f"= {n_points} points, {jax.devices()[0].platform}, {jax.device_count()} device(s)")
  print(f"weights: {args.checkpoint or 'random init'}; float top-1 {100 * float_correct / n:.2f}%"
        + (f" (torch pass: {100 * torch_float / n:.2f}%)" if torch_float is not None else ""))
  print()
  print("| way | wall for the grid (s) | per-point images/s | vs one float forward | one-call speedup |")
  print("| --- | ---: | ---: | ---: | ---: |")
  print(f"| float forward (1 pass, median of 3) | {t_float:.1f} | {unit:,.0f} | 1.00 | |")
  print(f"| one-call sweep (`Sweep.score`) | {t_one:.1f} | {n_points * n / t_one:,.0f} | "
        f"{n_points * n / t_one / unit:.2f} | 1.0× |")
  t_jax = statistics.median(jax_times) * n_points
  print(f"| sequential JAX loop ({len(loop_pts)} pts, scaled) | {t_jax:.1f} | {n_points * n / t_jax:,.0f} | "
        f"{n_points * n / t_jax / unit:.2f} | {t_jax / t_one:.1f}× |")
  if torch_times:
    t_torch = statistics.median(torch_times) * n_points
    print(f"| reference-style PyTorch loop ({len(loop_pts)} pts, scaled) | {t_torch:.1f} | "
          f"{n_points * n / t_torch:,.0f} | {n_points * n / t_torch / unit:.2f} | {t_torch / t_one:.1f}× |")
  print()
  print(f"one-call compile + first batch: {t_compile:.1f} s (not in the wall times; the loops' compiles are not either)")
  print(f"JAX loop correct counts differing from the one-call rows: {jax_mismatch} of {len(loop_pts)} points")
  if torch_diffs:
    print(f"PyTorch loop top-1 vs one-call: max |Δ| {max(torch_diffs):.2f} pt over {len(loop_pts)} points "
          f"(SciPy bounded Brent per layer, as the reference code, can stop in another local minimum of the rough MSE curve)")
  print(f"strategy (2 batches × 12 points): lax.map one point at a time {strategy[1]:,.0f} images/s per point, "
        f"vmap over 4 points {strategy[4]:,.0f} ({strategy[4] / strategy[1]:.2f}×)")


if __name__ == "__main__":
  main()
