"""scripts/export_weights.py: a float run and a QAT run exported as shipped weights, their manifest entries
re-computed from what the runs themselves logged."""

import os
import sys

import jax
import numpy as np
import pytest

from kure_jax import weights
from kure_jax.metrics import read_metrics
from kure_jax.training.train import train_and_evaluate
from tests.helpers import load_script
from tests.test_train import tiny_config, write_class_folders


export = load_script("export_weights")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  folder = write_class_folders(tmp_path_factory.mktemp("data"))
  root = tmp_path_factory.mktemp("runs")
  train_and_evaluate(tiny_config(folder, max_steps=3), str(root / "float"))
  train_and_evaluate(tiny_config(folder, max_steps=2, init_from=str(root / "float"), **{
      "quant.method": "lsq", "quant.w_bits": 4, "quant.a_bits": 4}), str(root / "lsq"))
  return folder, root


def _export(monkeypatch, workdir, name, out, folder):
  monkeypatch.setattr(sys, "argv", ["export_weights.py", "--workdir", str(workdir), "--name", name, "--out", str(out),
                                    "--data_dir", str(folder)])
  assert export.main() == 0
  return weights.read_manifest(str(out))["models"][name]


@pytest.mark.slow
def test_float_run(runs, tmp_path, monkeypatch):
  folder, root = runs
  entry = _export(monkeypatch, root / "float", "f", tmp_path, folder)
  logged = read_metrics(str(root / "float"), "eval")
  assert entry["top1_float"] == pytest.approx(logged[-1]["top1"], abs=0.005) and "top1_quantized" not in entry
  assert entry["kurtosis_mean"] == pytest.approx(logged[-1]["kurtosis_mean"], abs=1e-4)
  assert entry["sha256"] == weights.sha256_file(str(tmp_path / "f" / weights.VARIABLES))
  assert read_metrics(str(tmp_path / "f"), "eval") == logged  # the run's evaluations travel with the weights
  variables, meta = weights.load(str(tmp_path / "f"))
  assert meta["model"] == "resnet20" and "qsteps" not in variables


@pytest.mark.slow
def test_qat_run_is_scored_at_its_trained_setting(runs, tmp_path, monkeypatch):
  """A QAT model's manifest holds its top-1 quantized as it trained (W4A4, LSQ's learned steps, which the weights
  keep), equal to the run's own last evaluation; its float top-1 is left out as meaningless."""
  folder, root = runs
  entry = _export(monkeypatch, root / "lsq", "q", tmp_path, folder)
  logged = read_metrics(str(root / "lsq"), "eval")[-1]
  assert entry["quantized_at"] == "W4A4" and entry["top1_float"] is None
  assert entry["top1_quantized"] == pytest.approx(logged["top1"], abs=0.005)
  assert entry["quant"]["method"] == "lsq"
  variables, meta = weights.load(str(tmp_path / "q"))
  assert meta["quant"]["method"] == "lsq"
  leaves = jax.tree.leaves(variables["qsteps"])
  assert leaves and all(np.all(np.asarray(x) > 0) for x in leaves)
