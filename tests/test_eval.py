"""eval.py end to end on tiny data: files, rows, plots, and one-line errors before compiling."""

import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.helpers import REPO
from tests.test_train import cli_args, env, tiny_config, write_class_folders
from kure_jax.errors import UserError
from kure_jax.evaluation.evaluate import run_eval
from kure_jax.training.train import train_and_evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  folder = write_class_folders(tmp_path_factory.mktemp("data"))
  workdir = str(tmp_path_factory.mktemp("run") / "r20")
  train_and_evaluate(tiny_config(folder, max_steps=4), workdir)
  return folder, workdir


def eval_config(folder, **overrides):
  defaults = {"eval.bits": (2, 8), "eval.ratio_min": 0.8, "eval.ratio_max": 1.2, "eval.ratio_steps": 3,
              "eval.policies": ("exact", "pow2_nearest"), "eval.targets": ("weights", "both")}
  return tiny_config(folder, **{**defaults, **overrides})


@pytest.mark.slow
def test_reports(trained, tmp_path):
  folder, workdir = trained
  out = tmp_path / "out"
  rows = run_eval(eval_config(folder), [workdir, workdir], ["base", "again"], str(out), progress=False)
  assert len(rows) == 2 * (2 * 3 * 2 * 2)  # checkpoints × bits × ratios × policies × targets
  assert all(r["count"] == 24 for r in rows)  # the whole eval split, every example once
  same = {(r["bits"], r["ratio"], r["policy"], r["target"]): r["top1"] for r in rows if r["checkpoint"] == "base"}
  again = {(r["bits"], r["ratio"], r["policy"], r["target"]): r["top1"] for r in rows if r["checkpoint"] == "again"}
  assert same == again  # the same weights score the same
  with open(out / "robustness.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(rows) and table[0].keys() >= {"checkpoint", "bits", "ratio", "policy", "top1", "top5"}
  meta = json.loads((out / "robustness.json").read_text())["meta"]
  assert meta["grid"]["ratios"] == [0.8, 1.0, 1.2]
  for png in ("accuracy_vs_ratio.png", "accuracy_vs_bits.png", "pow2.png"):
    assert (out / png).stat().st_size > 10_000


@pytest.mark.parametrize("overrides, message", [
    ({"eval.bits": (1, 4)}, "outside 2…16"),
    ({"eval.ratio_min": 0.0}, "0 < ratio_min"),
    ({"eval.policies": ("pow3",)}, "unknown 'pow3'"),
    ({"eval.methods": ("best",)}, "unknown 'best'"),
])
def test_bad_grid_is_one_error(trained, tmp_path, overrides, message):
  folder, workdir = trained
  with pytest.raises(UserError, match=message):
    run_eval(eval_config(folder, **overrides), [workdir], None, str(tmp_path), progress=False)


def test_checkpoint_that_does_not_fit(trained, tmp_path):
  folder, workdir = trained
  c = eval_config(folder)
  c.model = "mobilenet_v2"
  with pytest.raises(UserError, match="--checkpoint .* holds a checkpoint of model='resnet20'"):
    run_eval(c, [workdir], None, str(tmp_path), progress=False)
  with pytest.raises(UserError, match="no checkpoint found"):
    run_eval(eval_config(folder), [str(tmp_path / "nothing")], None, str(tmp_path), progress=False)


@pytest.mark.slow
def test_cli(trained, tmp_path):
  folder, workdir = trained
  args = [sys.executable, "eval.py", "--config", "configs/cifar10_resnet20.py", "--checkpoint", workdir,
          "--out", str(tmp_path / "o")] + [a for a in cli_args(folder, "x")[6:] if a.startswith("--config.")]
  args += ["--config.eval.bits=(4,8)", "--config.eval.ratio_steps=3", "--config.eval.policies=('exact',)"]
  r = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "| r20 | weights | mse |" in r.stdout
  bad = subprocess.run(args + ["--config.eval.bits=(17,)"], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1] == "error: grid.bits: 17 is outside 2…16 (whole numbers)."
  # config.cpu_devices splits the CPU before JAX starts, as in train.py: 2 devices do not divide 3 images
  split = subprocess.run(args + ["--config.cpu_devices=2", "--config.eval_batch_size=3"], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=300)
  assert split.returncode == 2 and "Traceback" not in split.stderr
  assert split.stderr.strip().splitlines()[-1].startswith("error: eval_batch_size=3 is not divisible by the 2 devices")


MULTI_DEVICE_EVAL = textwrap.dedent("""
    import json, sys
    import jax
    from kure_jax import data, models, sharding
    from kure_jax.checkpoint import load_variables
    from kure_jax.evaluation.evaluate import run_eval
    from kure_jax.evaluation.robustness import Grid, Sweep
    from tests.test_eval import eval_config
    c = eval_config(sys.argv[1], eval_batch_size=12)
    variables, _ = load_variables(sys.argv[2])
    model = models.get_model("resnet20", 2)
    ds = data.make_dataset(c.dataset, "eval", batch_size=12, train=False, seed=0)
    calib = [data.make_dataset(c.dataset, "train", batch_size=12, train=False, seed=0).get_batch(0)["image"]]
    grid = Grid(bits=(2, 4, 8), ratios=(0.8, 1.0, 1.2), policies=("exact", "pow2_floor"), targets=("weights", "both"))
    out = {}
    for n in (1, 4):
      mesh = sharding.make_mesh(jax.devices()[:n])
      batches = [sharding.shard_batch(b, mesh) for b in ds.iterate()]
      assert all(len(b["image"].sharding.device_set) == n for b in batches)
      sweep = Sweep(model, variables, grid, calibration=calib)
      out[n] = sweep.score(batches)
    out["cli"] = run_eval(c, [sys.argv[2]], ["r"], sys.argv[3], progress=False)  # all 4 devices
    print(json.dumps({str(k): v for k, v in out.items()}))
""")


@pytest.mark.slow
def test_four_devices_score_like_one(trained, tmp_path):
  folder, workdir = trained
  e = env()
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  r = subprocess.run([sys.executable, "-c", MULTI_DEVICE_EVAL, str(folder), workdir, str(tmp_path)], cwd=REPO, env=e,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  one, four, cli = out["1"], out["4"], out["cli"]
  assert len(one) == len(four) == 3 * 3 * 2 * 2 and all(row["count"] == 24 for row in four)
  assert [row["correct"] for row in four] == [row["correct"] for row in one]
  np.testing.assert_allclose([row["loss"] for row in four], [row["loss"] for row in one], rtol=1e-5)
  assert len({row["top1"] for row in one}) > 1  # the grid points differ: the comparison is informative
  assert all(row["count"] == 24 for row in cli) and len(cli) == 2 * 3 * 2 * 2


@pytest.mark.slow
def test_fold_bn_option(trained, tmp_path):
  folder, workdir = trained
  kw = {"eval.bits": (16, 2), "eval.ratio_min": 1.0, "eval.ratio_max": 1.0, "eval.ratio_steps": 1,
        "eval.policies": ("exact",), "eval.targets": ("both",)}
  plain = run_eval(eval_config(folder, **kw), [workdir], None, str(tmp_path / "a"), progress=False)
  folded = run_eval(eval_config(folder, **kw, **{"eval.fold_bn": True}), [workdir], None, str(tmp_path / "b"),
                    progress=False)
  assert plain[0]["bits"] == folded[0]["bits"] == 16
  assert folded[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-3)   # 16 bits: the same (folded) float model
  assert folded[1]["loss"] != plain[1]["loss"]                             # 2 bits: the folded kernels quantize otherwise
