"""LAPQ (loss-aware PTQ) and bias correction of quantized weights."""

import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kure_jax.core import quant
from kure_jax.errors import UserError
from kure_jax.evaluation import lapq as lapq_lib
from kure_jax.evaluation.lapq import Lapq, fit_p, lapq
from kure_jax.evaluation.robustness import Grid, Sweep
from kure_jax.models.layers import quant_hook
from tests.helpers import REPO, SHARED_CIFAR10
from tests.test_robustness import Net


# -- the quadratic fit of loss(p) ---------------------------------------------------------------


def test_fit_p_picks_the_parabolas_minimum():
  ps = (2.0, 2.5, 3.0)
  assert fit_p(ps, [(p - 2.7) ** 2 + 1.0 for p in ps]) == pytest.approx(2.7, abs=1e-9)
  assert fit_p((2.0, 2.5, 3.0, 3.5), [0.3 * (p - 2.2) ** 2 - 4 for p in (2.0, 2.5, 3.0, 3.5)]) == pytest.approx(2.2)
  assert fit_p(ps, [(p - 5.0) ** 2 for p in ps]) == 3.0   # vertex beyond the samples: clipped (interpolation)
  assert fit_p(ps, [-(p - 2.6) ** 2 for p in ps]) == 2.0  # concave fit: the best sampled p
  assert fit_p(ps, [1.0, float("nan"), 0.5]) == 3.0       # a failed evaluation: the best finite sample


# -- LAPQ on a small model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
  model = Net()
  rng = np.random.default_rng(1)
  images = rng.normal(size=(128, 8, 8, 3)).astype(np.float32)
  variables = model.init(jax.random.key(3), images[:1])
  labels = np.argmax(model.apply(variables, images), -1).astype(np.int32)  # the float model's own predictions
  batches = [{"image": images[i:i + 64], "label": labels[i:i + 64], "mask": np.ones(64, bool)} for i in (0, 64)]
  paths = ["body1/kernel", "body2/kernel", "fc1/kernel"]
  return model, variables, batches, paths


def counting(runner):
  """Wrap runner.loss to record every value it returns (the Powell phase included)."""
  seen, inner = [], runner.loss

  def loss(x, profiles, bits):
    v = inner(x, profiles, bits)
    seen.append(v)
    return v

  runner.loss = loss
  return seen


@pytest.mark.slow
@pytest.mark.parametrize("acts", [False, True])
def test_lapq_improves_on_its_lp_init_and_compiles_once(small, acts):
  model, variables, batches, paths = small
  runner = Lapq(model, variables, batches, paths, quantize_acts=acts, chunk_size=32)
  seen = counting(runner)
  results = {b: runner.run(b, iterations=2) for b in (2, 3)}
  # the p sweep, the init and every Powell evaluation at both bit-widths: one compilation
  assert runner.objective._cache_size() == 1
  for b, r in results.items():
    assert r.loss <= r.init_loss
    assert r.evaluations > 10
    assert 2.0 <= r.p_star <= 3.0 and set(r.p_losses) == {2.0, 2.5, 3.0}
    # the reported loss is the objective at the returned steps
    x = np.log([float(r.steps[p]["w"]) for p in paths] + ([float(r.steps[p]["a"]) for p in paths] if acts else []))
    assert runner.objective(runner.variables, runner.data, jnp.asarray(x, jnp.float32), {p: np.float32(1) for p in paths},
                            jnp.asarray(b)) == pytest.approx(r.loss, rel=1e-5)
    assert all((r.steps[p]["a"] is None) != acts for p in paths)
  # Powell moves somewhere useful: at 2 bits the loss falls by more than 5% of the Lp init
  assert results[2].loss < 0.95 * results[2].init_loss, results[2]
  assert min(seen) == pytest.approx(min(r.loss for r in results.values()))


def test_lapq_never_returns_a_worse_point(small):
  model, variables, batches, paths = small
  runner = Lapq(model, variables, batches, paths, chunk_size=64)
  seen = counting(runner)
  r = runner.run(3, iterations=1, max_evals=6)  # cut short: Powell's last point is whatever its line search tried
  powell = seen[4:]  # after 3 Lp samples and the p* init
  assert len(powell) >= 6 and max(powell) > r.init_loss  # it did try worse points...
  assert r.loss == min([r.init_loss] + powell) <= r.init_loss  # ...and kept the best seen


@pytest.mark.slow
def test_channel_steps_keep_lps_profile(small):
  model, variables, batches, paths = small
  r = lapq(model, variables, batches, paths, 3, granularity="channel", iterations=1, max_evals=20)
  k = variables["params"]["body2"]["kernel"]
  lp = np.asarray(quant.lp_step(k, 3, r.p_star, axis=-1))
  got = np.asarray(r.steps["body2/kernel"]["w"])
  assert got.shape == (16,) and r.loss <= r.init_loss
  ratio = got / lp
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)  # one multiplier per layer over the Lp channel steps


@pytest.mark.slow
def test_lapq_steps_are_the_sweeps_base_step(small):
  model, variables, batches, paths = small
  grid = Grid(bits=(2, 3), ratios=(0.9, 1.0), policies=("exact", "pow2_nearest"), methods=("mse", "lapq"),
              targets=("weights", "both"))
  results = lapq_lib.grid_steps(model, variables, grid, paths, batches, options={"iterations": 1, "chunk_size": 32})
  assert set(results) == {2, 3}
  assert all(r.steps[p]["w"] is not None and r.steps[p]["a"] is not None  # the widest target: both searched
             for r in results.values() for p in paths)
  sweep = Sweep(model, variables, grid, calibration=[batches[0]["image"]],
                lapq_steps={b: r.steps for b, r in results.items()})
  base = jax.device_get(sweep.base_steps())
  m = grid.methods.index("lapq")
  for i, b in enumerate(grid.bits):
    for p in paths:
      assert base["w"][p][m, i] == pytest.approx(float(results[b].steps[p]["w"]))
      assert base["a"][p][m, i] == pytest.approx(float(results[b].steps[p]["a"]))
  rows = sweep.score(batches)
  assert sweep._score_batch._cache_size() == 1 and len(rows) == len(grid.points())
  # at ratio 1, exact steps, both quantized, the sweep's loss is LAPQ's calibration loss (same data)
  for b in grid.bits:
    row = next(r for r in rows if (r["method"], r["bits"], r["ratio"], r["policy"], r["target"]) ==
               ("lapq", b, 1.0, "exact", "both"))
    assert row["loss"] == pytest.approx(results[b].loss, rel=1e-4)
  # weights only: LAPQ searches no activation step
  w_only = lapq_lib.grid_steps(model, variables, Grid(bits=(3,), methods=("lapq",)), paths, batches,
                               options={"iterations": 1, "max_evals": 5})
  assert all(w_only[3].steps[p]["a"] is None for p in paths)


@pytest.mark.parametrize("kw, message", [
    (dict(), r"needs lapq_steps for every bit-width \(missing: 2, 3\): run kure_jax.evaluation.lapq.grid_steps"),
    (dict(lapq_steps={2: {}}), r"\(missing: 3\)"),
])
def test_lapq_user_errors(small, kw, message):
  model, variables, _, _ = small
  with pytest.raises(UserError, match=message):
    Sweep(model, variables, Grid(bits=(2, 3), methods=("lapq",)), **kw)


@pytest.mark.parametrize("calibration, options, message", [
    ([{"image": np.zeros((2, 8, 8, 3))}], {}, "needs labelled calibration data"),
    ([], {"maxiter": 2}, "unknown maxiter"),
])
def test_grid_steps_user_errors(small, calibration, options, message):
  model, variables, _, paths = small
  with pytest.raises(UserError, match=message):
    lapq_lib.grid_steps(model, variables, Grid(bits=(2,), methods=("lapq",)), paths, calibration, options=options)


def test_lapq_steps_of_another_granularity(small):
  model, variables, _, _ = small
  paths = Sweep(model, variables, Grid(bits=(2,), methods=("mse",))).paths
  leaf = lambda p: functools.reduce(lambda d, k: d[k], p.split("/"), variables["params"])
  per_channel = {2: {p: {"w": np.ones(leaf(p).shape[-1], np.float32)} for p in paths}}
  with pytest.raises(UserError, match="granularity 'tensor' needs a scalar"):
    Sweep(model, variables, Grid(bits=(2,), methods=("lapq",)), lapq_steps=per_channel)


def test_lapq_bad_arguments(small):
  model, variables, batches, paths = small
  with pytest.raises(UserError, match="iterations must be ≥ 1"):
    Lapq(model, variables, batches, paths).run(3, iterations=0)
  with pytest.raises(UserError, match="nothing to quantize"):
    Lapq(model, variables, batches, paths, quantize_weights=False)


# -- bias correction --------------------------------------------------------------------------------


class Probe(nn.Module):
  """Returns the kernel the hook hands to the layer."""
  shape: tuple

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(1.0), self.shape)
    return quant_hook(self, x, kernel, weight_grid="signed", act_grid="unsigned")[1]


@pytest.mark.parametrize("shape", [(3, 3, 8, 16), (32, 10)], ids=["conv_hwio", "dense"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_bias_correction_restores_channel_mean_and_std(shape, per_channel):
  probe = Probe(shape)
  params = probe.init(jax.random.key(0), jnp.zeros(1))["params"]
  w = params["kernel"] + 0.3 * jax.random.normal(jax.random.key(1), shape[-1:])  # channels with distinct means
  params = {"kernel": w}
  red = tuple(range(len(shape) - 1))
  over = tuple(a + 1 for a in red)  # the same axes with the vmapped ratio axis in front
  axis = -1 if per_channel else None

  def hooked(ratio, mode):  # traced step and mode, as in the sweep
    step = quant.mse_step(w, 3, axis=axis) * ratio
    q = {"w_bits": jnp.asarray(3), "w_step": step, "w_bias_corr": mode}
    return probe.apply({"params": params, "quant": q}, jnp.zeros(1))

  out = jax.jit(jax.vmap(hooked, in_axes=(0, None)))
  ratios = jnp.asarray([0.7, 1.0, 1.3])
  plain, mean, mean_std = (out(ratios, jnp.asarray(m)) for m in (0, 1, 2))
  mu, sd = w.mean(red), w.std(red)
  assert float(jnp.max(jnp.abs(plain.mean(over) - mu))) > 1e-3  # uncorrected, the means differ: informative
  for q in (mean, mean_std):
    np.testing.assert_allclose(q.mean(over), np.broadcast_to(mu, (3,) + mu.shape), atol=2e-6)
  np.testing.assert_allclose(mean_std.std(over), np.broadcast_to(sd, (3,) + sd.shape), rtol=2e-5)
  assert float(jnp.max(jnp.abs(mean.std(over) - sd))) > 1e-3  # 'mean' leaves the std alone
  # with bits 0 (float) the kernel passes untouched whatever the mode
  q0 = {"w_bits": jnp.asarray(0), "w_step": jnp.asarray(0.1), "w_bias_corr": jnp.asarray(2)}
  np.testing.assert_array_equal(probe.apply({"params": params, "quant": q0}, jnp.zeros(1)), w)


@pytest.mark.slow
def test_bias_correction_in_the_sweep(small):
  model, variables, batches, _ = small
  rows = {}
  for mode in ("none", "mean", "mean_std"):
    sweep = Sweep(model, variables, Grid(bits=(2, 3), ratios=(0.8, 1.0), bias_correction=mode))
    rows[mode] = [r["loss"] for r in sweep.score(batches)]
    assert sweep._score_batch._cache_size() == 1
  assert rows["mean"] != rows["none"] and rows["mean_std"] != rows["mean"]
  with pytest.raises(UserError, match="unknown 'median'"):
    Grid(bias_correction="median").validate()


# -- real data ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR10.exists(), reason="the real CIFAR-10 (../shared/data/cifar10) is not on this machine")
def test_real_cifar10_lapq_beats_mse_steps():
  from configs import cifar10_resnet20
  from kure_jax import data, models
  from kure_jax.calibration import calibration_sample
  from kure_jax.checkpoint import load_variables

  c = cifar10_resnet20.get_config()
  c.dataset.data_dir = str(SHARED_CIFAR10)
  variables, _ = load_variables(str(REPO / "weights" / "study_base"))  # the shipped converged base
  model = models.get_model("resnet20", 10)
  calib = calibration_sample(data.make_dataset(c.dataset, "train", batch_size=256, train=False), 256, seed=0)
  grid = Grid(bits=(3,), methods=("mse",))
  paths = Sweep(model, variables, grid).paths
  t0 = time.perf_counter()
  runner = Lapq(model, variables, calib, paths, chunk_size=128)
  r = runner.run(3, iterations=1, max_evals=60)  # part of one Powell iteration: the test's time budget
  seconds = time.perf_counter() - t0
  # the MSE-step (p = 2) initialization, through the same compiled loss
  x_mse, prof = runner.lp_point(3, 2.0)
  mse_loss = runner.loss(x_mse, prof, 3)
  print(json.dumps({"mse_w3_loss": mse_loss, "lp_pstar_loss": r.init_loss, "p_star": r.p_star, "lapq_w3_loss": r.loss,
                    "evaluations": r.evaluations, "seconds": seconds, "compilations": runner.objective._cache_size()}))
  assert runner.objective._cache_size() == 1
  assert r.loss < r.init_loss  # Powell improves on its Lp (p*) initialization
  assert r.loss < 0.95 * mse_loss, (r, mse_loss)  # and LAPQ on the MSE steps by more than 5%


# -- eval.py ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_eval_with_lapq(tmp_path):
  from tests.test_eval import eval_config
  from tests.test_train import tiny_config, write_class_folders
  from kure_jax.evaluation.evaluate import run_eval
  from kure_jax.training.train import train_and_evaluate

  folder = write_class_folders(tmp_path / "data")
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_config(folder, max_steps=4), workdir)
  c = eval_config(folder, **{"eval.methods": ("mse", "lapq"), "eval.lapq_images": 40, "eval.lapq_iterations": 1,
                             "eval.lapq_max_evals": 12, "eval.bias_correction": "mean"})
  rows = run_eval(c, [workdir], ["r"], str(tmp_path / "out"), progress=False)
  assert len(rows) == 2 * (2 * 3 * 2 * 2)  # methods × bits × ratios × policies × targets
  assert all(r["count"] == 24 for r in rows)
  lapq_rows = [r for r in rows if r["method"] == "lapq"]
  assert len(lapq_rows) == 24 and all(np.isfinite(r["loss"]) for r in lapq_rows)
  # LAPQ's steps differ from the MSE steps: the two methods' losses differ somewhere
  key = lambda r: (r["bits"], r["ratio"], r["policy"], r["target"])
  mse = {key(r): r["loss"] for r in rows if r["method"] == "mse"}
  assert any(abs(r["loss"] - mse[key(r)]) > 1e-6 for r in lapq_rows)
  meta = json.loads((tmp_path / "out" / "robustness.json").read_text())["meta"]
  assert meta["grid"]["methods"] == ["mse", "lapq"] and meta["grid"]["bias_correction"] == "mean"
  log = meta["lapq"]["r"]  # per bit-width: the Lp start and Powell's result, never worse
  assert sorted(int(b) for b in log) == [2, 8]  # the grid's bits
  for v in log.values():
    assert v["loss"] <= v["init_loss"] and 2.0 <= v["p_star"] <= 3.0
    assert v["evaluations"] <= 12 + 20  # capped (SciPy checks maxfev between line searches)
  for field, value in (("eval.lapq_images", 0), ("eval.lapq_iterations", 0), ("eval.lapq_max_evals", 0)):
    with pytest.raises(UserError, match=f"config.{field} must be a whole number ≥ 1"):
      run_eval(eval_config(folder, **{"eval.methods": ("lapq",), field: value}), [workdir], None, str(tmp_path))


@pytest.mark.slow
def test_lapq_cache_reuses_searches(tmp_path, monkeypatch):
  """eval.lapq_cache: a second evaluation of the same weights and settings reads LAPQ's steps (the same rows, no
  search); another bit-width searches only that one; another setting searches again."""
  from tests.test_eval import eval_config
  from tests.test_train import tiny_config, write_class_folders
  from kure_jax.evaluation import lapq as lapq_module
  from kure_jax.evaluation.evaluate import run_eval
  from kure_jax.training.train import train_and_evaluate

  folder = write_class_folders(tmp_path / "data")
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_config(folder, max_steps=2), workdir)
  searched = []
  real_run = lapq_module.Lapq.run
  monkeypatch.setattr(lapq_module.Lapq, "run", lambda self, bits, **kw: searched.append(bits) or real_run(self, bits,
                                                                                                            **kw))
  cache = str(tmp_path / "cache")
  kw = {"eval.methods": ("lapq",), "eval.lapq_images": 20, "eval.lapq_iterations": 1, "eval.lapq_max_evals": 6,
        "eval.lapq_cache": cache, "eval.bits": (2, 4)}
  first = run_eval(eval_config(folder, **kw), [workdir], ["r"], str(tmp_path / "a"), progress=False)
  assert sorted(searched) == [2, 4] and len(os.listdir(cache)) == 1
  again = run_eval(eval_config(folder, **kw), [workdir], ["r"], str(tmp_path / "b"), progress=False)
  assert sorted(searched) == [2, 4]  # nothing searched
  assert [(r["top1"], r["loss"]) for r in again] == [(r["top1"], r["loss"]) for r in first]
  run_eval(eval_config(folder, **{**kw, "eval.bits": (2, 3)}), [workdir], ["r"], str(tmp_path / "c"), progress=False)
  assert sorted(searched) == [2, 3, 4]  # only the new bit-width
  run_eval(eval_config(folder, **{**kw, "eval.lapq_iterations": 2}), [workdir], ["r"], str(tmp_path / "d"),
           progress=False)
  assert sorted(searched) == [2, 2, 3, 4, 4] and len(os.listdir(cache)) == 2  # another setting: another key


def test_lapq_cache_keeps_each_search_as_it_finishes(tmp_path):
  """cached_grid_steps writes every bit-width's result when its search ends: an evaluation killed during the second
  search leaves the first in the cache, and the next call searches only the rest and returns the stored steps."""
  def result(b):
    return lapq_lib.LapqResult(bits=b, steps={"conv/kernel": {"w": np.float32(0.01 * b), "a": None},
                                              "dense/kernel": {"w": np.arange(3, dtype=np.float32) / b, "a": 0.5}},
                               p_star=2.0 + b / 10, p_losses={2.0: 1.0, 2.5: 0.9}, init_loss=1.0, loss=0.5,
                               evaluations=7 * b, seconds=1.5)

  asked = []

  def killed_after_first(grid):
    asked.append(grid.bits)
    yield grid.bits[0], result(grid.bits[0])
    raise KeyboardInterrupt  # the second search never ends

  grid = Grid(bits=(2, 4), methods=("lapq",))
  cache = str(tmp_path / "cache")
  with pytest.raises(KeyboardInterrupt):
    lapq_lib.cached_grid_steps(cache, "k", grid, killed_after_first)
  with open(os.path.join(cache, "k.json")) as f:
    assert sorted(json.load(f)) == ["2"]  # the finished search, kept
  assert os.listdir(cache) == ["k.json"]  # no temporary file left behind

  def finishes(grid):
    asked.append(grid.bits)
    return ((b, result(b)) for b in grid.bits)

  out = lapq_lib.cached_grid_steps(cache, "k", grid, finishes)
  assert asked == [(2, 4), (4,)]  # the second call searched only W4
  assert sorted(out) == [2, 4]
  for b in (2, 4):
    want = result(b)
    assert out[b].evaluations == want.evaluations and out[b].p_star == pytest.approx(want.p_star)
    np.testing.assert_array_equal(out[b].steps["dense/kernel"]["w"], want.steps["dense/kernel"]["w"])
    assert float(out[b].steps["conv/kernel"]["w"]) == pytest.approx(0.01 * b)
  assert lapq_lib.cached_grid_steps(None, "k", grid, finishes).keys() == {2, 4}  # no cache: every bit-width
  assert asked[-1] == (2, 4)
