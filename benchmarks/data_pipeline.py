"""Throughput of CIFAR-10 training input pipelines (images/s), and the cold decode time.

Measures, on the CIFAR-10 JPEG tarballs beside the project (../shared/data/cifar10):

* numpy:        kure_jax.data.make_dataset (decoded uint8 array in memory, a batch is one
                gather + pad-crop/flip + normalize in NumPy, built ahead in threads);
* grain:        the same decoded array through grain.MapDataset, per-example NumPy
                crop/flip/normalize (`random_map`), batched; in-process and with 2 worker
                processes (`mp_prefetch`) - needs `pip install grain`;
* grain+tfds:   tfds.data_source over an ArrayRecord build (PNG decoded per example) into
                the same grain pipeline - needs --tfds-array-record DIR (a prepared TFDS
                version directory; building one needs TensorFlow);
* tf.data:      tf.data over the same decoded array (from_tensor_slices → shuffle →
                map(pad/crop/flip/normalize, AUTOTUNE) → batch → prefetch), and tfds.load
                of a TFRecord build (PNG decode) with .cache() - run in a separate
                interpreter that has TensorFlow: --tf-python PATH (the project venv has none).

Each figure is the median over --runs runs of --steps batches of --batch-size images
(after 5 warm-up batches). Run from the project root:

    python benchmarks/data_pipeline.py [--tf-python /path/to/venv-with-tf/bin/python]
        [--tfds-array-record DIR] [--tfds-tfrecord DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "cifar10"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
WARMUP = 5


def timed(make_iter, steps: int, batch_size: int, runs: int) -> float:
  """Median images/s over `runs` fresh iterators, `steps` batches each after a warm-up."""
  rates = []
  for _ in range(runs):
    it = iter(make_iter())
    for _ in range(WARMUP):
      next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
      next(it)
    rates.append(steps * batch_size / (time.perf_counter() - t0))
    del it
  return statistics.median(rates)


def numpy_augment_one(image, rng):
  """Per-example pad-4 crop, flip, normalize (the grain variants)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  dy, dx = rng.integers(0, 9, size=2)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  out = padded[dy:dy + 32, dx:dx + 32]
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return (out.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)


def _grain_iter(source, batch_size: int, seed: int, workers: int, image_key: bool):
  import grain  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def aug(example, rng):
    image, label = (example["image"], example["label"]) if image_key else example
    return {"image": numpy_augment_one(np.asarray(image), rng), "label": np.int32(label)}

  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat().random_map(aug).batch(batch_size)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=256))
  if workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=4))
  return it


class _Pairs:
  """A picklable random-access view (image, label) over two arrays, for grain."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return self.images[i], self.labels[i]


def bench_kure(args, cache_dir: Path, results: dict) -> str:
  """kure_jax's own pipeline: cold decode, warm disk load, steady-state img/s. Returns the cache file."""
  from kure_jax import data  # pylint: disable=g-import-not-at-top

  config = {"name": "cifar10", "data_dir": str(args.data_dir), "image_size": 32, "num_classes": 10, "cache": True}
  data.clear_memo()
  t0 = time.perf_counter()
  data.make_dataset(config, "train", batch_size=args.batch_size, train=True, cache_dir=cache_dir)
  results["cold_decode_s"] = time.perf_counter() - t0
  loads = []
  for _ in range(3):
    data.clear_memo()
    t0 = time.perf_counter()
    ds = data.make_dataset(config, "train", batch_size=args.batch_size, train=True, cache_dir=cache_dir)
    loads.append(time.perf_counter() - t0)
  results["warm_disk_load_s"] = statistics.median(loads)
  for workers, label in ((None, "numpy (kure_jax), 2 threads"), (1, "numpy (kure_jax), 1 thread")):
    ds = data.make_dataset(config, "train", batch_size=args.batch_size, train=True, cache_dir=cache_dir,
                           num_workers=workers)
    results["rates"][label] = timed(ds.iterate, args.steps, args.batch_size, args.runs)
  (npz,) = cache_dir.glob("*.npz")
  return str(npz)


def bench_grain(args, npz: str, results: dict) -> None:
  try:
    import grain  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    results["skipped"].append("grain (not installed: pip install grain)")
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])  # grain's worker processes read absl flags

  with np.load(npz) as z:
    pairs = _Pairs(z["images"], z["labels"])
  for workers in (0, 2):
    label = f"grain, in-memory array, {workers or 'no'} worker processes"
    results["rates"][label] = timed(lambda w=workers: _grain_iter(pairs, args.batch_size, 0, w, False),
                                    args.steps, args.batch_size, args.runs)
  if args.tfds_array_record:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    source = tfds.builder_from_directory(args.tfds_array_record).as_data_source(split="train")
    for workers in (0, 2):
      label = f"grain + tfds.data_source (ArrayRecord, PNG decode), {workers or 'no'} worker processes"
      results["rates"][label] = timed(lambda w=workers: _grain_iter(source, args.batch_size, 0, w, True),
                                      args.steps, args.batch_size, args.runs)
  else:
    results["skipped"].append("grain + tfds.data_source (no --tfds-array-record)")


def tf_worker(args) -> None:
  """Runs under an interpreter with TensorFlow; prints one JSON line of rates."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  mean, std = tf.constant(MEAN), tf.constant(STD)

  def aug(image, label):
    image = tf.image.pad_to_bounding_box(image, 4, 4, 40, 40)
    image = tf.image.random_crop(image, (32, 32, 3))
    image = tf.image.random_flip_left_right(image)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std, tf.cast(label, tf.int32)

  def pipeline(ds, n):
    return ds.shuffle(n, seed=0).repeat().map(aug, num_parallel_calls=tf.data.AUTOTUNE).batch(
        args.batch_size).prefetch(tf.data.AUTOTUNE)

  rates, extra = {}, {}
  with np.load(args.npz) as z:
    images, labels = z["images"], z["labels"]
  ds = pipeline(tf.data.Dataset.from_tensor_slices((images, labels)), len(images))
  rates["tf.data, in-memory array, map AUTOTUNE"] = timed(lambda: ds.as_numpy_iterator(), args.steps,
                                                          args.batch_size, args.runs)
  if args.tfds_tfrecord:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = tfds.builder_from_directory(args.tfds_tfrecord)
    raw = builder.as_dataset(split="train", as_supervised=True)
    rates["tf.data + tfds.load (TFRecord, PNG decode every epoch)"] = timed(
        lambda: pipeline(raw, 50_000).as_numpy_iterator(), args.steps, args.batch_size, args.runs)
    cached = raw.cache()
    t0 = time.perf_counter()
    for _ in cached:  # first pass: decode into the cache
      pass
    extra["tf_cold_decode_s"] = time.perf_counter() - t0
    rates["tf.data + tfds.load (TFRecord) + .cache(), warm"] = timed(
        lambda: pipeline(cached, 50_000).as_numpy_iterator(), args.steps, args.batch_size, args.runs)
  print(json.dumps({"rates": rates, **extra}))


def bench_tf(args, npz: str, results: dict) -> None:
  if not args.tf_python:
    results["skipped"].append("tf.data (no --tf-python: an interpreter with tensorflow)")
    return
  cmd = [args.tf_python, __file__, "--worker", "tf", "--npz", npz, "--steps", str(args.steps), "--runs",
         str(args.runs), "--batch-size", str(args.batch_size)]
  if args.tfds_tfrecord:
    cmd += ["--tfds-tfrecord", args.tfds_tfrecord]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH="")
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
  if out.returncode or not lines:
    results["skipped"].append(f"tf.data (worker failed: {out.stderr.strip().splitlines()[-1:]})")
    return
  found = json.loads(lines[-1])
  results["rates"].update(found.pop("rates"))
  results.update(found)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data-dir", type=Path, default=SHARED)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--tf-python", default=None, help="python of a venv with tensorflow (for the tf.data rows)")
  p.add_argument("--tfds-array-record", default=None, help="TFDS version dir of an ArrayRecord CIFAR-10 build")
  p.add_argument("--tfds-tfrecord", default=None, help="TFDS version dir of a TFRecord CIFAR-10 build")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--npz", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker == "tf":
    tf_worker(args)
    return
  if not args.data_dir.is_dir():
    sys.exit(f"CIFAR-10 tarballs not found at {args.data_dir}; pass --data-dir.")
  sys.path.insert(0, str(ROOT))
  results: dict = {"rates": {}, "skipped": []}
  with tempfile.TemporaryDirectory(prefix="kure_jax_bench_") as cache_dir:  # a cold cache, removed afterwards
    npz = bench_kure(args, Path(cache_dir), results)
    bench_grain(args, npz, results)
    bench_tf(args, npz, results)
  print(f"CIFAR-10 train pipeline, batch {args.batch_size}, {os.cpu_count()} CPUs, median of {args.runs} runs "
        f"x {args.steps} batches")
  print(f"kure_jax cold decode (tar.gz -> uint8 array + disk cache): {results['cold_decode_s']:.1f} s; "
        f"warm start from the disk cache: {results['warm_disk_load_s']:.2f} s")
  if "tf_cold_decode_s" in results:
    print(f"tf.data first pass filling .cache() (TFRecord, PNG decode): {results['tf_cold_decode_s']:.1f} s")
  base = results["rates"]["numpy (kure_jax), 2 threads"]
  need = 5 * 500
  width = max(len(k) for k in results["rates"])
  print(f"\n| {'pipeline':<{width}} | images/s | vs numpy | vs 5x500 img/s |")
  print(f"| {'-' * width} | -------: | -------: | -------------: |")
  for name, rate in results["rates"].items():
    print(f"| {name:<{width}} | {rate:8.0f} | {rate / base:7.2f}x | {rate / need:13.1f}x |")
  for s in results["skipped"]:
    print(f"skipped: {s}")


if __name__ == "__main__":
  main()
