"""Number formats in the one-call sweep: integer and FP/MX points in the same compiled function, each equal to
the model with its kernels quantized by `formats.fake_quantize` by hand."""

import csv

import jax
import numpy as np
import pytest

from kure_jax import data, models

from kure_jax.checkpoint import load_variables
from kure_jax.core import formats
from kure_jax.core.kurtosis import select_kernels
from kure_jax.errors import UserError
from kure_jax.evaluation.evaluate import run_eval
from kure_jax.evaluation.robustness import Grid, Sweep
from kure_jax.training.train import train_and_evaluate
from tests.test_train import tiny_config, write_class_folders

FMTS = ("int4", "fp8_e4m3", "fp4_e2m1", "mxfp4", "nvfp4")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  folder = write_class_folders(tmp_path_factory.mktemp("data"))
  workdir = str(tmp_path_factory.mktemp("run") / "r20")
  train_and_evaluate(tiny_config(folder, max_steps=4), workdir)
  return folder, workdir


def _correct_by_hand(model, variables, batches, fmt, ratio, channel):
  params = jax.tree.map(np.asarray, variables["params"])
  for path, k in select_kernels(params).items():
    node = params
    for part in path.split("/")[:-1]:
      node = node[part]
    scale = formats.max_scale(k, fmt, channel_axis=-1 if channel else None)
    node["kernel"] = np.asarray(formats.fake_quantize(k, fmt, scale, ratio, axis=-2))
  correct = 0
  for b in batches:
    logits = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, b["image"])
    correct += int(np.sum((np.argmax(logits, -1) == b["label"]) & b["mask"]))
  return correct


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_format_points_equal_hand_quantized_models(trained, granularity):
  folder, workdir = trained
  c = tiny_config(folder)
  variables, _ = load_variables(workdir)
  model = models.get_model("resnet20", 2)
  batches = list(data.make_dataset(c.dataset, "eval", batch_size=10, train=False, seed=0).iterate())
  calib = [data.make_dataset(c.dataset, "train", batch_size=10, train=False, seed=0).get_batch(0)["image"]]
  grid = Grid(bits=(4,), ratios=(0.8, 1.0), formats=FMTS, targets=("weights", "both"), granularity=granularity)
  sweep = Sweep(model, variables, grid, calibration=calib)
  rows = sweep.score(batches)
  assert sweep._score_batch._cache_size() == 1          # integer and format points: one compiled function
  assert len(rows) == 2 * 2 + 2 * 2 * len(FMTS)          # (bits × ratios + formats × ratios) × targets
  by = {(r["format"], r["ratio"], r["target"]): r for r in rows}
  for f in FMTS:
    for ratio in (0.8, 1.0):
      want = _correct_by_hand(model, variables, batches, f, ratio, granularity == "channel")
      assert by[(f, ratio, "weights")]["correct"] == want, (f, ratio)
  # weights + activations: the same as a sweep of that one format (the format is data, not a code path)
  for f in ("fp8_e4m3", "mxfp4"):
    alone = Sweep(model, variables, Grid(bits=(4,), formats=(f,), targets=("both",), granularity=granularity),
                  calibration=calib).score(batches)
    assert [r["correct"] for r in alone if r["format"] == f] == [by[(f, 1.0, "both")]["correct"]]


def test_unknown_format_is_one_line():
  with pytest.raises(UserError, match="grid.formats: unknown 'fp5'; choose from int2"):
    Grid(formats=("fp5",)).validate()


def test_eval_reports_formats(trained, tmp_path):
  folder, workdir = trained
  c = tiny_config(folder, **{"eval.bits": (4,), "eval.formats": ("fp8_e4m3", "mxfp4"), "eval.ratio_min": 0.9,
                             "eval.ratio_max": 1.1, "eval.ratio_steps": 3, "eval.policies": ("exact",),
                             "eval.targets": ("weights",)})
  rows = run_eval(c, [workdir], ["m"], str(tmp_path), progress=False)
  assert {r["format"] for r in rows} == {"", "fp8_e4m3", "mxfp4"}
  with open(tmp_path / "robustness.csv") as f:
    table = list(csv.DictReader(f))
  assert {t["format"] for t in table} == {"", "fp8_e4m3", "mxfp4"}
  assert (tmp_path / "formats.png").stat().st_size > 10_000
  assert (tmp_path / "accuracy_vs_ratio.png").stat().st_size > 10_000
