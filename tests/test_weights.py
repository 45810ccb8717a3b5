"""Shipped weights: the file format, its checks, and the manifest re-computed on the real CIFAR-10 test set."""

import os

import jax
import numpy as np
import pytest

from kure_jax import data, models, sharding, weights
from kure_jax.checkpoint import load_variables
from kure_jax.core.kurtosis import kurtosis_by_layer
from kure_jax.errors import UserError
from kure_jax.training.train import evaluate, make_eval_step
from tests.helpers import REPO

CIFAR = os.path.join(REPO, "..", "shared", "data", "cifar10")
WEIGHTS = os.path.join(REPO, "weights")


def _variables(seed=0):
  model = models.get_model("resnet20", 10)
  return models.init_variables(model, seed, (32, 32, 3))


def test_round_trip_and_load_variables(tmp_path):
  v = _variables()
  meta = {"model": "resnet20", "num_classes": 10, "image_size": 32}
  digest = weights.save(str(tmp_path / "w"), v, meta)
  assert digest == weights.sha256_file(str(tmp_path / "w" / weights.VARIABLES))
  for loader in (weights.load, load_variables):      # eval.py and init_from read weights folders directly
    got, got_meta = loader(str(tmp_path / "w"))
    assert got_meta["model"] == "resnet20" and got_meta["sha256"] == digest
    jax.tree.map(np.testing.assert_array_equal, got["params"], jax.device_get(v["params"]))
    jax.tree.map(np.testing.assert_array_equal, got["batch_stats"], jax.device_get(v["batch_stats"]))


def test_damaged_file_is_refused_in_one_line(tmp_path):
  weights.save(str(tmp_path / "w"), _variables(), {"model": "resnet20"})
  path = tmp_path / "w" / weights.VARIABLES
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  path.write_bytes(bytes(raw))
  with pytest.raises(UserError, match="is damaged: its SHA-256 is .* restore it"):
    weights.load(str(tmp_path / "w"))


def test_non_finite_values_are_refused(tmp_path):
  v = _variables()
  v["params"]["fc"]["bias"] = v["params"]["fc"]["bias"].at[0].set(np.nan)
  weights.save(str(tmp_path / "w"), v, {"model": "resnet20"})
  with pytest.raises(UserError, match="non-finite"):
    weights.load(str(tmp_path / "w"))


def test_manifest_lists_every_folder_with_its_checksum():
  manifest = weights.read_manifest(WEIGHTS)["models"]
  folders = sorted(d for d in os.listdir(WEIGHTS) if os.path.isdir(os.path.join(WEIGHTS, d)))
  assert sorted(manifest) == folders and folders
  for name, entry in manifest.items():
    assert weights.sha256_file(os.path.join(WEIGHTS, name, weights.VARIABLES)) == entry["sha256"], name
    assert entry["command"].startswith("python train.py --config configs/")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(CIFAR), reason="the real CIFAR-10 (../shared/data/cifar10) is not beside the "
                    "repository")
@pytest.mark.parametrize("name", ["study_base", "study_kure_s0", "pilot_baseline_s2", "pilot_kure_s1"])
def test_shipped_weights_reproduce_their_manifest(name):
  entry = weights.read_manifest(WEIGHTS)["models"][name]
  variables, meta = load_variables(os.path.join(WEIGHTS, name))
  model = models.get_model(meta["model"], meta["num_classes"])
  ds = data.make_dataset({"name": "folder", "data_dir": CIFAR, "image_size": 32, "num_classes": 10, "cache": False},
                         "eval", batch_size=500, train=False, seed=0)
  top1 = evaluate(jax.jit(make_eval_step(model)), variables, ds, sharding.make_mesh())["top1"]
  assert top1 == pytest.approx(entry["top1_float"], abs=0.015)
  kurt = np.mean(list(jax.device_get(kurtosis_by_layer(variables["params"])).values()))
  assert kurt == pytest.approx(entry["kurtosis_mean"], abs=1e-3)


def test_package_exports_the_entry_points():
  import kure_jax
  from kure_jax.evaluation.evaluate import run_eval
  from kure_jax.evaluation.robustness import Grid, Sweep
  from kure_jax.training.train import train_and_evaluate

  assert (kure_jax.Sweep, kure_jax.Grid, kure_jax.run_eval, kure_jax.train_and_evaluate) == (
      Sweep, Grid, run_eval, train_and_evaluate)
  assert set(kure_jax.__all__) >= {"Sweep", "Grid", "run_eval", "train_and_evaluate", "fake_quantize"}
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    kure_jax.nope  # noqa: B018
