"""The robustness sweep and eval.py with a ranking metric: NeuMF checkpoints scored by HR@10 / NDCG@10.

A tiny NeuMF trains two epochs on the synthetic MovieLens folder of tests/test_ncf_train.py; the one-call
sweep then scores it over bits × step ratios × pow2 policies × targets with the task's metric, each point
checked against the same model applied with a hand-built 'quant' collection, and eval.py's program writes
the same CSV, tables and plots with HR@10 in place of top-1.
"""

import csv
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from kure_jax import data as data_lib
from kure_jax import models as models_lib
from kure_jax import sharding, tasks
from kure_jax.checkpoint import load_variables
from kure_jax.core import quant
from kure_jax.errors import UserError
from kure_jax.evaluation import report
from kure_jax.evaluation.evaluate import run_eval
from kure_jax.evaluation.robustness import Grid, Sweep
from kure_jax.models.layers import quant_collection
from kure_jax.training.train import evaluate, kure_selection, make_eval_step, train_and_evaluate
from tests.helpers import REPO
from tests.test_ncf_train import USERS, tiny_config, write_movielens

GRID = dict(bits=(2, 8), ratios=(0.8, 1.0), policies=("exact", "pow2_nearest"), targets=("weights", "activations"))
EVAL = {"eval.bits": (2, 8), "eval.ratio_min": 0.8, "eval.ratio_max": 1.0, "eval.ratio_steps": 2,
        "eval.policies": ("exact", "pow2_nearest"), "eval.targets": ("weights", "activations")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  folder = write_movielens(tmp_path_factory.mktemp("ml"))
  workdir = str(tmp_path_factory.mktemp("run") / "ncf")
  result = train_and_evaluate(tiny_config(folder, num_epochs=2), workdir)
  c = tiny_config(folder)
  eval_ds = data_lib.make_dataset(c.dataset, "eval", batch_size=c.eval_batch_size, train=False, seed=0)
  model = models_lib.get_model("neumf", 1, **models_lib.model_kwargs(c), **tasks.RANKING.model_kwargs(eval_ds))
  variables, _ = load_variables(workdir)
  return {"folder": folder, "workdir": workdir, "result": result, "config": c, "eval_ds": eval_ds,
          "model": model, "variables": variables}


@pytest.fixture(scope="module")
def swept(trained):
  c = trained["config"]
  train_ds = data_lib.make_dataset(c.dataset, "train", batch_size=c.eval_batch_size, train=True, seed=0)
  sweep = Sweep(trained["model"], trained["variables"], Grid(**GRID), calibration=[train_ds.get_batch(0)],
                task=tasks.RANKING, **kure_selection(c))
  return sweep, sweep.score(trained["eval_ds"].iterate())


@pytest.mark.slow
def test_sweep_rows_carry_the_ranking_metric(trained, swept):
  sweep, rows = swept
  assert sweep.paths == ["layer1/kernel", "layer2/kernel", "layer3/kernel", "prediction/kernel"]
  assert len(rows) == 2 * 2 * 2 * 2 and sweep._score_batch._cache_size() == 1  # one compilation, every point
  for r in rows:
    assert {"hr@10", "ndcg@10", "loss", "hits", "count"} <= r.keys() and "top1" not in r
    assert r["count"] == USERS and 0.0 <= r["ndcg@10"] <= r["hr@10"] <= 1.0 and np.isfinite(r["loss"])
    assert r["hits"] == round(r["hr@10"] * USERS)

  # the float model, scored independently by the training loop's evaluation
  mesh = sharding.make_mesh()
  eval_fn = jax.jit(make_eval_step(trained["model"], tasks.RANKING))
  float_metrics = evaluate(eval_fn, trained["variables"], trained["eval_ds"], mesh, task=tasks.RANKING)
  assert float_metrics["hr@10"] == pytest.approx(trained["result"]["hr@10"])
  assert float_metrics["hr@10"] > 0.2  # trained: informative (random ~0.1)
  at = {(r["bits"], r["ratio"], r["policy"], r["target"]): r for r in rows}
  assert abs(at[(8, 1.0, "exact", "weights")]["hr@10"] - float_metrics["hr@10"]) <= 0.05
  assert abs(at[(8, 1.0, "exact", "weights")]["loss"] - float_metrics["loss"]) < 0.05
  # informative: 2-bit activations collapse the logits onto a few levels, and ties count against the positive
  assert at[(2, 1.0, "exact", "activations")]["hr@10"] < float_metrics["hr@10"]


def hand_built(model, variables, pt, acts, act_grids, paths, eval_ds):
  """One grid point the plain way: its 'quant' collection built eagerly, the model applied, HR@10 summed."""
  def policy(s):
    return s if pt["policy"] == "exact" else quant.pow2_step(s, pt["policy"].split("_")[1])

  layers = {}
  for p in paths:
    k = variables["params"]
    for part in p.split("/"):
      k = k[part]
    entry = {"w_bits": np.asarray(pt["bits"] if pt["target"] in ("weights", "both") else 0),
             "w_step": policy(quant.STEP_METHODS["mse"](k, pt["bits"], "signed") * pt["ratio"])}
    if p in acts:
      entry.update(a_bits=np.asarray(pt["bits"] if pt["target"] in ("activations", "both") else 0),
                   a_step=policy(quant.STEP_METHODS["mse"](acts[p], pt["bits"], act_grids[p]) * pt["ratio"]))
    layers[p] = entry
  q = quant_collection(variables["params"], layers)
  totals = None
  for b in eval_ds.iterate():
    logits = model.apply({**variables, "quant": q}, b["user"], b["item"])
    sums = tasks.RANKING.eval_sums(logits.astype(np.float32), b)
    totals = sums if totals is None else jax.tree.map(lambda x, y: x + y, totals, sums)
  return tasks.RANKING.summarize(jax.device_get(totals)), int(totals["hits"])


@pytest.mark.slow
@pytest.mark.parametrize("point", [(2, 0.8, "pow2_nearest", "activations"), (2, 1.0, "exact", "weights"),
                                   (8, 0.8, "exact", "activations")])
def test_sweep_point_equals_hand_built_quantizer(trained, swept, point):
  sweep, rows = swept
  row = next(r for r in rows if (r["bits"], r["ratio"], r["policy"], r["target"]) == point)
  acts = {p: np.asarray(v) for p, v in sweep._acts.items()}
  want, hits = hand_built(trained["model"], trained["variables"], row, acts, sweep.act_grids, sweep.paths,
                          trained["eval_ds"])
  assert row["hits"] == hits
  assert row["hr@10"] == pytest.approx(want["hr@10"], abs=1e-6)
  assert row["ndcg@10"] == pytest.approx(want["ndcg@10"], abs=1e-5)
  assert row["loss"] == pytest.approx(want["loss"], rel=1e-4)


def eval_config(folder, **overrides):
  return tiny_config(folder, **{**EVAL, **overrides})


def test_run_eval_writes_ranking_reports(trained, tmp_path):
  out = tmp_path / "out"
  rows = run_eval(eval_config(trained["folder"]), [trained["workdir"]], ["ncf"], str(out), progress=False)
  assert len(rows) == 16 and all(r["count"] == USERS and r["checkpoint"] == "ncf" for r in rows)
  with open(out / "robustness.csv") as f:
    reader = csv.DictReader(f)
    table = list(reader)
  assert reader.fieldnames == ["checkpoint", "format", "bits", "ratio", "policy", "method", "target", "hr@10",
                               "ndcg@10", "loss", "count"]
  assert len(table) == 16 and all(0.0 <= float(t["hr@10"]) <= 1.0 for t in table)
  meta = json.loads((out / "robustness.json").read_text())["meta"]
  assert (meta["task"], meta["metric"], meta["model"]) == ("ranking", "hr@10", "neumf")
  for png in ("accuracy_vs_ratio.png", "accuracy_vs_bits.png", "pow2.png"):
    assert (out / png).stat().st_size > 10_000
  summary = report.summary_table(rows)  # what eval.py prints: the metric read off the rows
  header = summary.splitlines()[0]
  assert "HR@10 2 bits" in header and "HR@10 8 bits" in header
  base = next(r for r in rows if (r["bits"], r["ratio"], r["policy"], r["target"]) == (8, 1.0, "exact", "weights"))
  assert "| ncf | weights | mse | " in summary and f"{base['hr@10']:.3f}" in summary


@pytest.mark.slow
def test_cli(trained, tmp_path):
  from tests.test_train import env

  args = [sys.executable, "eval.py", "--config", "configs/movielens_neumf.py", "--checkpoint", trained["workdir"],
          "--out", str(tmp_path / "o"), f"--config.dataset.data_dir={trained['folder']}",
          "--config.model_kwargs.factors=4", "--config.model_kwargs.mlp_layers=(16,8,8,4)",
          "--config.eval_batch_size=16", "--config.progress=False", "--config.eval.bits=(4,8)",
          "--config.eval.ratio_steps=1", "--config.eval.ratio_min=1.0", "--config.eval.ratio_max=1.0",
          "--config.eval.policies=('exact',)"]
  r = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "HR@10 4 bits Δ̃ / worst / pow2" in r.stdout and "| ncf | weights | mse |" in r.stdout
  assert (tmp_path / "o" / "accuracy_vs_bits.png").stat().st_size > 10_000
  bad = subprocess.run(args + ["--config.eval.preset=authors"], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error: eval.methods 'lapq' is not available for the "
                                                        "'ranking' task")


@pytest.mark.parametrize("overrides, message", [
    ({"eval.methods": ("lapq",)}, "eval.methods 'lapq' is not available for the 'ranking' task"),
    ({"eval.preset": "authors"}, "eval.methods 'lapq' is not available for the 'ranking' task"),
    ({"eval.fold_bn": True}, "neumf has no BatchNorm; drop --config.eval.fold_bn"),
    ({"eval.layers": "inner_convs"}, "neumf has no such convs; use --config.eval.layers=kure"),
    ({"model": "resnet20"}, "config.model is 'resnet20', which the 'ranking' task"),
])
def test_bad_combination_is_one_error(trained, tmp_path, overrides, message):
  with pytest.raises(UserError, match=message) as e:
    run_eval(eval_config(trained["folder"], **overrides), [trained["workdir"]], None, str(tmp_path), progress=False)
  assert "\n" not in str(e.value)


def test_sweep_refuses_lapq_for_ranking(trained):
  with pytest.raises(UserError, match="grid.methods 'lapq' is not available for the 'ranking' task"):
    Sweep(trained["model"], trained["variables"], Grid(bits=(4,), methods=("lapq",)), task=tasks.RANKING,
          lapq_steps={4: {}})
