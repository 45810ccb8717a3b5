"""Export a train.py workdir as shipped weights (params + batch statistics) and record it in the manifest.

  python scripts/export_weights.py --workdir runs/study/kure_s1 --name kure_s1 [--out weights] \
      [--data_dir ../shared/data/cifar10] [--note "..."]
  python scripts/export_weights.py --workdir runs/ncf/act_s0 --name ncf_act_s0 \
      --config_file configs/movielens_neumf.py --data_dir ../shared/data/movielens

For an NCF (task 'ranking') run the manifest holds HR@10 and NDCG@10 (fractions) in place of top-1; for a QAT run
(DoReFa, LSQ) its top-1 quantized at the setting it trained for (`top1_quantized`, `quantized_at`, e.g. W4A4, with
its own steps; LSQ's learned steps are kept in the weights) in place of the float one.

Writes <out>/<name>/{variables.msgpack, meta.json, metrics.jsonl (the run's evaluations: its kurtosis trajectory,
kept for the study report once the run's folder is gone)} and updates <out>/MANIFEST.json with the model's config
overrides (against the config file it was trained from), seed, top-1 on the real test set (re-evaluated here, in
float32 on the CPU, so the manifest is what `tests/test_weights.py` re-computes), mean kurtosis of the regularized
layers, file checksum, the command that made it and its wall time (summed from the logged throughput).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from kure_jax import data as data_lib  # noqa: E402
from kure_jax import models as models_lib  # noqa: E402
from kure_jax import qat, sharding, tasks, weights  # noqa: E402
from kure_jax.checkpoint import load_variables  # noqa: E402
from kure_jax.core.kurtosis import kurtosis_by_layer  # noqa: E402
from kure_jax.metrics import read_metrics, training_seconds  # noqa: E402
from kure_jax.training.train import evaluate, kure_selection, make_eval_step  # noqa: E402

CONFIG_FILE = "configs/cifar10_resnet20.py"
# run-local settings that do not change the model (left out of the recorded overrides)
IGNORED = ("dataset.data_dir", "dataset.name", "progress", "checkpoint_every_steps", "keep_checkpoints",
           "log_every_steps", "init_from")


def flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = tuple(v) if isinstance(v, list) else v
  return out


def overrides(trained: dict, config_file: str) -> dict:
  module = importlib.import_module(config_file.removesuffix(".py").replace("/", "."))
  base = flatten(json.loads(module.get_config().to_json_best_effort()))
  return {k: v for k, v in sorted(flatten(trained).items()) if base.get(k) != v and k not in IGNORED}


def last_eval(metrics_path: str) -> dict:
  rows = [json.loads(x) for x in open(metrics_path) if '"eval"' in x]
  return rows[-1] if rows else {}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--name", required=True)
  ap.add_argument("--out", default="weights")
  ap.add_argument("--config_file", default=CONFIG_FILE)
  ap.add_argument("--data_dir", default=None, help="default: ../shared/data/cifar10 (movielens for NCF runs)")
  ap.add_argument("--command", default=None, help="the command that made it (default: train.py with the overrides)")
  ap.add_argument("--note", default="")
  args = ap.parse_args()

  if not os.path.isfile(os.path.join(args.workdir, "config.json")):
    print(f"error: {args.workdir} is not a train.py workdir (no config.json).", file=sys.stderr)
    return 2
  with open(os.path.join(args.workdir, "config.json")) as f:
    trained = json.load(f)
  config = ConfigDict(trained)
  qat_run = qat.method(config) != "none"
  variables, meta = load_variables(args.workdir)
  task = tasks.get(trained.get("task", "classification"))
  ranking = task.name == "ranking"
  data_dir = args.data_dir or ("../shared/data/movielens" if ranking else "../shared/data/cifar10")

  # the task's metric in float32 on the test set, here
  if not ranking:
    config.dataset.name = "folder"
  config.dataset.data_dir = data_dir
  ds = data_lib.make_dataset(config.dataset, "eval", batch_size=config.eval_batch_size, train=False, seed=0)
  kwargs = {**models_lib.model_kwargs(config), **(task.model_kwargs(ds) if ranking else {})}
  model = models_lib.get_model(config.model, config.dataset.num_classes, **kwargs)
  mesh = sharding.make_mesh()
  float_vars = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  if qat_run:  # scored as it trained: quantized with its own (DoReFa's fixed or LSQ's learned) steps
    spec = qat.make_spec(config, model, float_vars, np.asarray(ds.get_batch(0)["image"]))
    float_vars["quant"] = qat.quant_for_training(spec, variables.get("qsteps", {}))
  scores = evaluate(jax.jit(make_eval_step(model, task=task)), float_vars, ds, mesh, task=task)
  kurt = jax.device_get(kurtosis_by_layer(variables["params"], **kure_selection(config)))
  metrics = os.path.join(args.workdir, "metrics.jsonl")
  ov = overrides(trained, args.config_file)
  command = args.command or " ".join(
      ["python train.py --config", args.config_file] +
      ([] if ranking else ["--config.dataset.name=folder"]) + [f"--config.dataset.data_dir={data_dir}"] +
      ([f"--config.init_from={trained['init_from']}"] if trained.get("init_from") else []) +
      [f"--config.{k}={v}" for k, v in ov.items()])

  digest = weights.save(os.path.join(args.out, args.name), variables,
                        {k: meta[k] for k in ("model", "num_classes", "image_size", "param_shapes", "quant")
                         if k in meta})
  with open(os.path.join(args.out, args.name, "metrics.jsonl"), "w") as f:  # the run's evaluations (kurtosis trajectory)
    f.writelines(json.dumps(r) + "\n" for r in read_metrics(args.workdir, "eval"))
  manifest = weights.read_manifest(args.out)
  if ranking:
    scored = {"task": task.name, "hr@10_float": round(scores["hr@10"], 4), "ndcg@10_float": round(scores["ndcg@10"], 4),
              "hr@10_at_training": last_eval(metrics).get("hr@10")}
  elif qat_run:  # a QAT model's float top-1 means nothing: its top-1 at the setting it was trained for
    scored = {"top1_float": None, "top1_quantized": round(scores["top1"], 2),
              "quantized_at": f"W{config.quant.w_bits}A{config.quant.a_bits or 'FP'}",
              "top1_at_training": last_eval(metrics).get("top1")}
  else:
    scored = {"top1_float": round(scores["top1"], 2), "top1_at_training": last_eval(metrics).get("top1")}
  manifest["models"][args.name] = {
      "config": args.config_file, "overrides": ov, "seed": trained.get("seed", 0), **scored,
      "kurtosis_mean": round(float(np.mean(list(kurt.values()))), 4),
      "sha256": digest, "command": command,
      "wall_time_s": round(training_seconds(read_metrics(args.workdir, "train"), config.batch_size)),
      "steps": int(last_eval(metrics).get("step", 0)), "init_from": trained.get("init_from") or None,
      "quant": meta.get("quant"), "note": args.note,
  }
  weights.write_manifest(args.out, manifest)
  headline = f"HR@10 {scores['hr@10']:.4f}" if ranking else f"top-1 {scores['top1']:.2f}%" + (
      f" at {scored['quantized_at']}" if qat_run else "")
  print(f"{args.name}: {headline}, kurtosis {manifest['models'][args.name]['kurtosis_mean']}, "
        f"sha256 {digest[:12]}… → {args.out}/{args.name}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
