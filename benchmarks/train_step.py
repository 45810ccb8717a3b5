"""Images/s of the ResNet-20 train step (CE + KURE) against PyTorch eager, side by side in one run.

  python benchmarks/train_step.py [--batches 64,128,256] [--repeats 7] [--steps 5] [--lax-conv] [--profile]
  taskset -c 1 python benchmarks/train_step.py ...    # one core (PyTorch then runs 1 thread)

Per batch size: the JAX step with KURE in float32 and with bfloat16 compute
(``config.dtype``), the float32 step with KURE off (KURE's overhead), optionally the
float32 step with plain ``lax.conv_general_dilated`` convolutions (the models' conv
before `kure_jax.models.conv`: ``--lax-conv``) or data-parallel over XLA host devices
(``--host-devices 2``), and PyTorch eager (float32, one thread per usable CPU). Also
the eval forward pass (JAX jit vs PyTorch ``no_grad``) and the CPU's matmul peak,
measured by a large ``jnp.dot`` in the same rounds. Every measurement is interleaved
round by round, so machine noise hits all alike; the tables give medians over rounds,
ratios of wall time, and ratios of this process's CPU time (which other processes on
a shared machine disturb less). ``--profile`` adds where the time goes per op class.
PyTorch comes from the `bench` extra (pip install -e ".[bench]").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import time
from pathlib import Path


def _preset_host_devices(argv: list[str]) -> None:
  """--host-devices N has to reach XLA before jax is imported."""
  for i, a in enumerate(argv):
    if a.startswith("--host-devices"):
      n = a.split("=", 1)[1] if "=" in a else argv[i + 1]
      os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"


if __name__ == "__main__":
  _preset_host_devices(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/, benchmarks/ importable

IMAGE = (32, 32, 3)


@contextlib.contextmanager
def lax_convolutions():
  """Trace QConv with plain lax.conv_general_dilated (the pre-`conv2d` models), for comparison."""
  from kure_jax.models import conv, layers

  def plain(x, kernel, strides=1, padding="SAME", feature_group_count=1):
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=conv.DIMENSION_NUMBERS,
                                        feature_group_count=feature_group_count)

  saved, layers.conv2d = layers.conv2d, plain
  try:
    yield
  finally:
    layers.conv2d = saved


def usable_cpus() -> int:
  """The CPUs this process may run on (taskset), as torch's thread count and in the header."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def synthetic_batch(batch: int) -> dict:
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.normal(size=(batch, *IMAGE)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32), "mask": jnp.ones(batch, bool)}


def jax_step(batch: int, kure_weight: float, dtype: str = "float32", lax_conv: bool = False, devices: int = 1):
  """A runner doing n compiled train steps (the project's make_train_step, state donated).

  devices > 1: the batch sharded over that many (host) devices, as train.py runs it.
  """
  from configs import cifar10_resnet20
  from kure_jax import models, sharding
  from kure_jax.training.train import create_state, make_optimizer, make_schedule, make_train_step

  config = cifar10_resnet20.get_config()
  config.kure.weight = kure_weight
  config.dtype = dtype
  model = models.get_model("resnet20", 10, **({} if dtype == "float32" else {"dtype": jnp.dtype(dtype)}))
  schedule = make_schedule(config, 390, 390 * 60)
  tx = make_optimizer(config, schedule)
  state = create_state(model, tx, jax.random.PRNGKey(0), IMAGE)
  data = synthetic_batch(batch)
  mesh = sharding.make_mesh(jax.devices()[:devices])
  state, data = sharding.replicate(state, mesh), sharding.shard_batch(data, mesh)
  rep, bat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  with lax_convolutions() if lax_conv else contextlib.nullcontext():
    step = jax.jit(make_train_step(model, tx, config, schedule), in_shardings=(rep, bat), out_shardings=(rep, rep),
                   donate_argnums=0).lower(state, data).compile()
  holder = {"state": state}

  def run(n):
    s = holder["state"]
    for _ in range(n):
      s, m = step(s, data)
    jax.block_until_ready(m["loss"])
    holder["state"] = s

  run.hlo = step.as_text()
  return run


def jax_eval(batch: int, devices: int = 1):
  """n jitted eval forward passes (float32, running statistics), the batch split over `devices` devices."""
  from kure_jax import models, sharding

  model = models.get_model("resnet20", 10)
  mesh = sharding.make_mesh(jax.devices()[:devices])
  variables = sharding.replicate(models.init_variables(model, jax.random.PRNGKey(0), IMAGE), mesh)
  x = sharding.shard_batch({"image": synthetic_batch(batch)["image"]}, mesh)["image"]
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()

  def run(n):
    for _ in range(n):
      y = fwd(variables, x)
    jax.block_until_ready(y)

  run.hlo = fwd.as_text()
  return run


# ----------------------------------------------------------------------------------
# Where the time goes: XLA's per-op trace, joined with the optimized HLO, per op class.

OP_CLASSES = ("conv forward", "conv input-grad", "conv filter-grad", "dot (incl. materialize)",
              "transpose/copy", "reduce (BN statistics, sums)", "elementwise (BN, ReLU, residual, optimizer)")


def _hlo_ops(hlo: str) -> dict[str, str]:
  """Entry instruction name -> op class, from the optimized HLO text."""
  bodies, current, entry = {}, None, None
  for line in hlo.splitlines():
    m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if m and not line.startswith(" "):
      current, bodies[m.group(2)] = m.group(2), []
      entry = current if m.group(1) else entry
    elif current and line.startswith("  "):
      bodies[current].append(line)
  classes = {}
  for line in bodies.get(entry, []):
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\(", line)
    if not m:
      continue
    name, opcode = m.groups()
    called = re.search(r"calls=%([\w.\-]+)", line)
    body = "\n".join(bodies.get(called.group(1), [])) if called else line
    meta = re.search(r'op_name="([^"]*)"', line)
    if "convolution(" in body:
      window = re.search(r"window=\{size=(\d+)x", body)
      if window and int(window.group(1)) > 7:  # the window is the whole image: a filter gradient
        classes[name] = "conv filter-grad"
      elif "lhs_dilate" in body or not meta or "transpose(" in meta.group(1):
        classes[name] = "conv input-grad"
      else:
        classes[name] = "conv forward"
    elif " dot(" in body:
      classes[name] = "dot (incl. materialize)"
    elif name.startswith(("transpose", "copy")) or opcode == "copy":
      classes[name] = "transpose/copy"
    elif " reduce(" in body:
      classes[name] = "reduce (BN statistics, sums)"
    elif opcode not in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
      classes[name] = "elementwise (BN, ReLU, residual, optimizer)"
  return classes


def op_class_profile(run, n: int = 3) -> dict[str, float]:
  """Seconds per call and op class, from a jax.profiler trace of `run(n)`.

  XLA:CPU runs independent ops concurrently on its threads; each instant of wall time
  is split equally among the ops running then, so the classes add up to the wall time
  spent inside XLA ops.
  """
  import collections
  import glob
  import tempfile

  from jax.profiler import ProfileData

  classes = _hlo_ops(run.hlo)
  run(1)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      run(n)
    data = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
  edges = collections.defaultdict(list)
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in classes:
          edges[ev.start_ns].append((1, ev.name))
          edges[ev.start_ns + ev.duration_ns].append((-1, ev.name))
  out, active, prev = collections.Counter(), collections.Counter(), None
  for t in sorted(edges):
    if prev is not None and active:
      k = sum(active.values())
      for name, c in active.items():
        out[classes[name]] += (t - prev) * c / k / 1e9 / n
    for d, name in edges[t]:
      active[name] += d
      if not active[name]:
        del active[name]
    prev = t
  return dict(out)


def print_profile(title: str, prof: dict[str, float], step_s: float) -> None:
  total = sum(prof.values())
  print(f"\n{title}: {1e3 * step_s:.0f} ms per call, {1e3 * total:.0f} ms inside XLA ops")
  print("| op class | ms per call | share |")
  print("| --- | ---: | ---: |")
  for k in sorted(prof, key=prof.get, reverse=True):
    print(f"| {k} | {1e3 * prof[k]:.0f} | {100 * prof[k] / total:.0f}% |")


def model_flops(batch: int) -> float:
  """FLOPs of one train step by the usual convention: 3 × the forward pass's (XLA's count)."""
  from kure_jax import models

  model = models.get_model("resnet20", 10)
  variables = models.init_variables(model, jax.random.PRNGKey(0), IMAGE)
  x = synthetic_batch(batch)["image"]
  cost = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return 3.0 * float(cost["flops"])


def matmul_peak(dtype: str, n: int = 2048):
  """A runner doing n large square jnp.dot's; returns its FLOPs per call too."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
  f(a).block_until_ready()

  def run(k):
    for _ in range(k):
      y = f(a)
    y.block_until_ready()

  return run, 2.0 * n**3


def torch_runners(batch: int):
  import torch
  import torch.nn.functional as F

  from benchmarks.torch_resnet20 import ResNet20

  torch.set_num_threads(usable_cpus())  # as many threads as CPUs this process may use (taskset)
  torch.manual_seed(0)
  model = ResNet20()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
  x = torch.randn(batch, 3, 32, 32)
  y = torch.randint(0, 10, (batch,))

  def train(n):
    model.train()
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(model(x), y)
      loss.backward()
      opt.step()

  def evaluate(n):
    model.eval()
    with torch.no_grad():
      for _ in range(n):
        model(x)

  return train, evaluate


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default="64,128,256", help="comma-separated batch sizes")
  p.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
  p.add_argument("--steps", type=int, default=5, help="steps per measurement")
  p.add_argument("--eval-batch", type=int, default=128, help="eval forward batch (0: skip)")
  p.add_argument("--lax-conv", action="store_true", help="also the float32 step with plain lax convolutions")
  p.add_argument("--no-bf16", action="store_true")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--profile", action="store_true",
                 help="after the rounds, the per-op-class profile of the f32 KURE step (batch 128) and the eval pass")
  p.add_argument("--host-devices", type=int, default=1,
                 help="also run the f32 KURE step data-parallel over this many XLA host devices (>1)")
  args = p.parse_args()
  batches = [int(b) for b in args.batches.split(",")]

  runners: dict[tuple, callable] = {}
  torch_ok = not args.no_torch
  for b in batches:
    runners[(b, "jax f32 + KURE")] = jax_step(b, 1.0)
    runners[(b, "jax f32, KURE off")] = jax_step(b, 0.0)
    if not args.no_bf16:
      runners[(b, "jax bf16 + KURE")] = jax_step(b, 1.0, "bfloat16")
    if args.lax_conv:
      runners[(b, "jax f32 + KURE, lax conv")] = jax_step(b, 1.0, lax_conv=True)
    if args.host_devices > 1:
      runners[(b, f"jax f32 + KURE, {args.host_devices} host devices")] = jax_step(b, 1.0, devices=args.host_devices)
    if torch_ok:
      try:
        runners[(b, "torch eager f32")] = torch_runners(b)[0]
      except ImportError:
        print("(PyTorch not installed: pip install -e '.[bench]')")
        torch_ok = False
  if args.eval_batch:
    runners[(args.eval_batch, "eval: jax jit f32")] = jax_eval(args.eval_batch)
    if args.host_devices > 1:
      runners[(args.eval_batch, "eval: jax jit f32, host devices")] = jax_eval(args.eval_batch, args.host_devices)
    if torch_ok:
      runners[(args.eval_batch, "eval: torch no_grad f32")] = torch_runners(args.eval_batch)[1]
  peaks = {}
  for dt in ("float32",) + (() if args.no_bf16 else ("bfloat16",)):
    run, flops = matmul_peak(dt)
    runners[(0, f"peak {dt}")] = run
    peaks[dt] = flops

  for run in runners.values():  # warm up
    run(2)
  load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"
  secs = {k: [] for k in runners}
  cpu = {k: [] for k in runners}  # this process's CPU seconds (all threads): robust to other load on 1 core
  for _ in range(args.repeats):
    for key, run in runners.items():
      n = args.steps if key[0] else 2
      t, c = time.perf_counter(), time.process_time()
      run(n)
      secs[key].append((time.perf_counter() - t) / n)
      cpu[key].append((time.process_time() - c) / n)
  med = {k: statistics.median(v) for k, v in secs.items()}
  cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
  peak = {dt: peaks[dt] / med[(0, f"peak {dt}")] for dt in peaks}
  flops = {b: model_flops(b) for b in batches}

  print(f"ResNet-20 train step (CE + KURE λ=1, SGD), {jax.devices()[0].platform}, jax {jax.__version__}, "
        f"torch {__import__('torch').__version__ if torch_ok else '-'}; "
        f"median of {args.repeats} interleaved rounds × {args.steps} steps")
  print("matmul peak (2048² jnp.dot): " + ", ".join(f"{dt} {v / 1e9:,.0f} GFLOP/s" for dt, v in peak.items()))
  print(f"model FLOPs per image and step (3 × forward): {flops[batches[0]] / batches[0] / 1e6:.0f} M")
  print(f"CPUs: {usable_cpus()}; load average before the rounds: {load}")
  print("\n| batch | step | images/s (median) | min–max | vs torch eager | images per CPU-second | "
        "vs torch (CPU time) | % of matmul peak (own dtype) |")
  print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for b in batches:
    torch_rate = b / med[(b, "torch eager f32")] if (b, "torch eager f32") in med else None
    torch_cpu = b / cpu_med[(b, "torch eager f32")] if (b, "torch eager f32") in med else None
    for (bb, name), s in med.items():
      if bb != b or name.startswith("eval"):
        continue
      rate = b / s
      lo, hi = b / max(secs[(bb, name)]), b / min(secs[(bb, name)])
      vs = f"{rate / torch_rate:.2f}×" if torch_rate else "–"
      per_cpu = b / cpu_med[(bb, name)]
      vs_cpu = f"{per_cpu / torch_cpu:.2f}×" if torch_cpu else "–"
      ref = peak["bfloat16"] if "bf16" in name else peak["float32"]
      frac = f"{100 * flops[b] / s / ref:.0f}%"
      print(f"| {b} | {name} | {rate:,.0f} | {lo:,.0f}–{hi:,.0f} | {vs} | {per_cpu:,.0f} | {vs_cpu} | {frac} |")
  print()
  for b in batches:
    overhead = med[(b, "jax f32 + KURE")] / med[(b, "jax f32, KURE off")] - 1
    overhead_cpu = cpu_med[(b, "jax f32 + KURE")] / cpu_med[(b, "jax f32, KURE off")] - 1
    line = f"batch {b}: KURE overhead {100 * overhead:+.1f}% (CPU time {100 * overhead_cpu:+.1f}%)"
    if (b, "jax f32 + KURE, lax conv") in med:
      line += f"; conv2d vs lax conv: {med[(b, 'jax f32 + KURE, lax conv')] / med[(b, 'jax f32 + KURE')]:.2f}×"
    print(line)
  if args.eval_batch:
    e = args.eval_batch
    line = f"eval forward, batch {e}: jax {e / med[(e, 'eval: jax jit f32')]:,.0f} images/s"
    if (e, "eval: torch no_grad f32") in med:
      line += (f", torch {e / med[(e, 'eval: torch no_grad f32')]:,.0f} images/s, "
               f"jax / torch {med[(e, 'eval: torch no_grad f32')] / med[(e, 'eval: jax jit f32')]:.2f}× "
               f"(per CPU-second: {cpu_med[(e, 'eval: torch no_grad f32')] / cpu_med[(e, 'eval: jax jit f32')]:.2f}×)")
    print(line)
    if (e, "eval: jax jit f32, host devices") in med:
      line = (f"eval forward, batch {e}, {args.host_devices} host devices: jax "
              f"{e / med[(e, 'eval: jax jit f32, host devices')]:,.0f} images/s")
      if (e, "eval: torch no_grad f32") in med:
        line += f", jax / torch {med[(e, 'eval: torch no_grad f32')] / med[(e, 'eval: jax jit f32, host devices')]:.2f}×"
      print(line)
  if args.profile:
    b = 128 if 128 in batches else batches[0]
    print_profile(f"jax f32 + KURE train step, batch {b}", op_class_profile(runners[(b, "jax f32 + KURE")]),
                  med[(b, "jax f32 + KURE")])
    if args.lax_conv:
      print_profile(f"jax f32 + KURE train step with lax convolutions, batch {b}",
                    op_class_profile(runners[(b, "jax f32 + KURE, lax conv")]), med[(b, "jax f32 + KURE, lax conv")])
    if args.eval_batch:
      e = args.eval_batch
      print_profile(f"eval forward, batch {e}", op_class_profile(runners[(e, "eval: jax jit f32")], n=5),
                    med[(e, "eval: jax jit f32")])


if __name__ == "__main__":
  main()
