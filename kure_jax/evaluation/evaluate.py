"""`eval.py`'s program: score checkpoints on the config's robustness grid, write reports.

The task (``config.task``, `kure_jax.tasks`) decides the data, the model's inputs and the metric: image
classification is scored by top-1 (%), NCF ranking (``configs/movielens_neumf.py``: NeuMF on MovieLens, its
table sizes read from the data) by HR@10 and NDCG@10, with the same grid, CSV, tables and plots.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from kure_jax import data as data_lib
from kure_jax import models as models_lib
from kure_jax import qat, sharding
from kure_jax import tasks as tasks_lib
from kure_jax.calibration import calibration_sample
from kure_jax.checkpoint import check_meta, load_variables, param_shapes
from kure_jax.core.kurtosis import kernel_selection
from kure_jax.errors import UserError
from kure_jax.evaluation import lapq, report
from kure_jax.evaluation.folding import fold_batchnorm
from kure_jax.evaluation.robustness import Grid, Sweep, quantized_paths


# The quantizer conventions of each `config.eval.preset`: a field left unset in config.eval takes its preset's value.
PRESETS: dict[str, dict[str, Any]] = {
    "ours": {"weight_grid": models_lib.DEFAULT_WEIGHT_GRID, "bias_correction": "none", "layers": "kure",
             "methods": ("mse",)},
    "authors": {"weight_grid": "midrise", "bias_correction": "mean", "layers": "inner_convs", "methods": ("lapq",)},
}
LAYER_RULES = ("kure", "inner_convs")


def eval_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """weight_grid, bias_correction, layers and methods of ``config.eval``, unset fields filled from its preset.

  A DoReFa checkpoint keeps its own grid: midrise, or 'sliding' under ``eval.dorefa_mode='sliding'``.
  """
  e = config.eval
  preset = e.get("preset", "ours")
  if preset not in PRESETS:
    raise UserError(f"config.eval.preset is {preset!r}; choose one of {', '.join(PRESETS)}.")
  out = dict(PRESETS[preset])
  for key in out:
    value = e.get(key)
    if value is not None:
      out[key] = (tuple(value) if isinstance(value, (tuple, list)) else (value,)) if key == "methods" else value
  if out["layers"] not in LAYER_RULES:
    raise UserError(f"config.eval.layers is {out['layers']!r}; choose one of {', '.join(LAYER_RULES)}.")
  if qat.method(config) == "dorefa":
    if e.get("weight_grid") not in (None, "midrise"):
      raise UserError(f"config.eval.weight_grid={e.weight_grid!r} does not fit a DoReFa checkpoint, whose weights sit "
                      "on its own midrise grid; leave it unset (eval.dorefa_mode chooses how its step is perturbed).")
    out["weight_grid"] = "sliding" if e.get("dorefa_mode", "symmetric") == "sliding" else "midrise"
  elif e.get("dorefa_mode", "symmetric") != "symmetric":
    raise UserError("config.eval.dorefa_mode='sliding' is the authors' DoReFa perturbation: it needs a DoReFa "
                    "checkpoint (--config.quant.method=dorefa).")
  return out


def grid_from_config(config: ml_collections.ConfigDict) -> Grid:
  """The Grid of ``config.eval`` (validated: one readable error for a bad value)."""
  e = config.eval
  settings = eval_settings(config)
  if e.ratio_steps < 1 or not e.ratio_min > 0 or e.ratio_max < e.ratio_min:
    raise UserError(f"config.eval: ratios need 0 < ratio_min ≤ ratio_max and ratio_steps ≥ 1, got "
                    f"{e.ratio_min}, {e.ratio_max}, {e.ratio_steps}.")
  ratios = tuple(sorted({round(float(r), 6) for r in np.linspace(e.ratio_min, e.ratio_max, e.ratio_steps)} | (
      {1.0} if e.ratio_min <= 1.0 <= e.ratio_max else set())))
  bits = tuple(e.bits) if isinstance(e.bits, (tuple, list)) else (e.bits,)
  grid = Grid(bits=bits, ratios=ratios, policies=tuple(e.policies), methods=settings["methods"],
              targets=tuple(e.targets), granularity=e.granularity, weight_grid=settings["weight_grid"],
              bias_correction=settings["bias_correction"], dorefa_mode=e.get("dorefa_mode", "symmetric"),
              formats=tuple(e.get("formats") or ())).validate()
  if "lapq" in grid.methods:
    for field in ("lapq_images", "lapq_iterations", "lapq_max_evals"):
      v = e.get(field, 1)
      if v is not None and (not float(v).is_integer() or v < 1):
        raise UserError(f"config.eval.{field} must be a whole number ≥ 1, got {v}.")
  return grid


def task_of(config: ml_collections.ConfigDict) -> tasks_lib.Task:
  """``config.task``'s Task, checked against config.model (one readable line)."""
  name = config.get("task", "classification")
  if name not in tasks_lib.TASKS:
    raise UserError(f"config.task is {name!r}; choose one of {', '.join(tasks_lib.TASKS)}.")
  task = tasks_lib.TASKS[name]
  if config.model not in task.models:
    raise UserError(f"config.model is {config.model!r}, which the {task.name!r} task (config.task) cannot score; "
                    f"choose one of {', '.join(task.models)}.")
  return task


def run_eval(config: ml_collections.ConfigDict, checkpoints: Sequence[str], labels: Sequence[str] | None,
             out_dir: str, *, progress: bool = True) -> list[dict[str, Any]]:
  """Score every checkpoint on the grid; write JSON, CSV and plots to `out_dir`; return the rows.

  The rows' metrics are the task's (`Sweep`): top1/top5 (%) for classification, hr@10/ndcg@10 for ranking.
  """
  grid = grid_from_config(config)
  if not checkpoints:
    raise UserError("give at least one --checkpoint (a workdir written by train.py).")
  labels = list(labels or [os.path.basename(os.path.normpath(c)) for c in checkpoints])
  if len(labels) != len(checkpoints):
    raise UserError(f"{len(labels)} --label for {len(checkpoints)} --checkpoint; give one label per checkpoint.")
  try:
    sharding.use_cpu_devices(config.get("cpu_devices", 1))  # data parallel over the CPU's cores, as in training
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  except ValueError as e:
    raise UserError(str(e)) from e
  qat.validate(config)
  task = task_of(config)
  if "lapq" in grid.methods and not task.supports_lapq:
    raise UserError(f"eval.methods 'lapq' is not available for the {task.name!r} task (LAPQ's calibration loss is "
                    "the classification cross-entropy); use --config.eval.methods=\"('mse',)\" or another method.")
  needs_acts = any(t != "weights" for t in grid.targets)
  try:  # the data first: it fixes some of the model's sizes (NeuMF's tables)
    eval_ds = data_lib.make_dataset(config.dataset, "eval", batch_size=config.eval_batch_size, train=False,
                                    seed=config.seed)
    calib_ds = None
    if needs_acts or "lapq" in grid.methods:
      calib_ds = data_lib.make_dataset(config.dataset, "train", batch_size=config.eval_batch_size,
                                       train=task.calibrate_on_train_batches, seed=config.seed)
  except (ValueError, FileNotFoundError) as e:
    raise UserError(str(e)) from e
  model = models_lib.get_model(config.model, config.dataset.num_classes,
                               **{**models_lib.model_kwargs(config), **task.model_kwargs(eval_ds),
                                  "weight_grid": grid.weight_grid})
  size = config.dataset.image_size
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *task.example_inputs((size, size, 3))))
  if config.eval.get("fold_bn", False) and not abstract.get("batch_stats"):
    raise UserError(f"config.eval.fold_bn folds BatchNorm into the kernels, but {config.model} has no BatchNorm; "
                    "drop --config.eval.fold_bn.")
  # which kernels are quantized: config.kure's selection, or every conv but the first and last (the authors')
  inner = eval_settings(config)["layers"] == "inner_convs"
  if inner and config.model not in models_lib.MODELS:  # an image model's convs; NeuMF has dense layers only
    raise UserError(f"config.eval.layers 'inner_convs' quantizes every conv but the first and last, but "
                    f"{config.model} has no such convs; use --config.eval.layers=kure.")
  layers = ({"paths": models_lib.inner_convs(model, abstract, (size, size, 3))} if inner
            else kernel_selection(config.kure))
  expected = {"model": config.model, "num_classes": int(config.dataset.num_classes),
              "param_shapes": param_shapes(abstract["params"])}
  loaded = []
  for path in checkpoints:  # everything is checked before anything compiles
    variables, meta = load_variables(path)
    check_meta(meta, expected, f"--checkpoint {path}")
    trained = (meta.get("quant") or {}).get("method", "none")
    if trained != qat.method(config):
      raise UserError(f"--checkpoint {path} was trained with quant.method={trained!r} but the config says "
                      f"{qat.method(config)!r}; score it with its own config (--config.quant.method={trained}).")
    trained_form = "relus" if (meta.get("quant") or {}).get("sites") else "inputs"
    form = config.quant.get("dorefa_form", "inputs")
    if trained == "dorefa" and trained_form != form:
      raise UserError(f"--checkpoint {path} is DoReFa of the {trained_form!r} form but the config says {form!r}; "
                      f"score it with --config.quant.dorefa_form={trained_form}.")
    if trained_form == "relus" and "lapq" in grid.methods and needs_acts:
      raise UserError(f"--checkpoint {path}: LAPQ searches the quantized layers' input steps, but this DoReFa model "
                      "quantizes its ReLUs with fixed steps; score its activations with eval.methods ('learned',).")
    if "learned" in grid.methods and trained == "none":
      raise UserError(f"--checkpoint {path}: eval.methods 'learned' needs a QAT checkpoint; drop it for float ones.")
    if config.eval.get("fold_bn", False) and trained != "none":
      raise UserError(f"--checkpoint {path}: eval.fold_bn applies to float checkpoints; a QAT model was trained "
                      "on unfolded kernels (drop --config.eval.fold_bn).")
    loaded.append((variables, meta.get("quant")))

  rows: list[dict[str, Any]] = []
  lapq_log: dict[str, dict[int, dict[str, Any]]] = {}
  for label, (variables, qat_meta) in zip(labels, loaded):
    calibration = None
    if needs_acts and task.calibrate_on_train_batches:  # ranking: train batches (positives and sampled negatives)
      calibration = [calib_ds.get_batch(i) for i in range(int(config.eval.calibration_batches))]
    elif needs_acts:  # a random sample of the train split, not its first (one-class) batches
      bs = int(config.eval_batch_size)
      sample = calibration_sample(calib_ds, int(config.eval.calibration_batches) * bs, config.seed + 1)["image"]
      calibration = [sample[i:i + bs] for i in range(0, len(sample), bs)]
    if config.eval.get("fold_bn", False):  # quantize what an accelerator would: W·γ/√(σ²+ε)
      variables = fold_batchnorm(model, variables, (size, size, 3))
    lapq_results = {}
    if "lapq" in grid.methods:  # LAPQ's search, once per bit-width, on what the sweep scores
      paths = quantized_paths(variables["params"], qat=qat_meta, **layers)
      options = {"iterations": int(config.eval.lapq_iterations), "max_evals": config.eval.get("lapq_max_evals")}
      dorefa = bool(qat_meta) and qat_meta["method"] == "dorefa"
      settings = {"model": config.model, "data": [config.dataset.name, config.dataset.data_dir], "paths": paths,
                  "images": int(config.eval.lapq_images), "seed": config.seed, "dorefa": dorefa, **options,
                  "granularity": grid.granularity, "weight_grid": grid.weight_grid,
                  "bias_correction": grid.bias_correction, "targets": sorted(grid.targets)}
      lapq_results = lapq.cached_grid_steps(
          config.eval.get("lapq_cache"), lapq.cache_key(variables, settings), grid,
          lambda g: lapq.iter_grid_steps(model, variables, g, paths,
                                         calibration_sample(calib_ds, int(config.eval.lapq_images), config.seed),
                                         options={**options, "progress": progress and jax.process_index() == 0},
                                         dorefa=dorefa))
    sweep = Sweep(model, variables, grid, calibration=calibration, chunk=config.eval.chunk, qat=qat_meta,
                  task=task, lapq_steps={b: r.steps for b, r in lapq_results.items()} or None, **layers)
    batches = (sharding.shard_batch(b, mesh) for b in eval_ds.iterate())
    bar = None
    if progress and jax.process_index() == 0:
      from tqdm.auto import tqdm
      bar = lambda it: tqdm(it, total=eval_ds.steps_per_epoch, desc=f"{label}: {len(sweep.points)} settings", leave=False)
    for r in sweep.score(batches, progress=bar):
      rows.append({"checkpoint": label, **r})
    if lapq_results:
      lapq_log[label] = {b: {"p_star": r.p_star, "p_losses": r.p_losses, "init_loss": r.init_loss, "loss": r.loss,
                             "evaluations": r.evaluations, "seconds": round(r.seconds, 1)}
                         for b, r in lapq_results.items()}

  if jax.process_index() == 0:
    meta = {"model": config.model, "dataset": config.dataset.name, "task": task.name, "metric": task.metric.key,
            "checkpoints": dict(zip(labels, checkpoints)),
            "preset": config.eval.get("preset", "ours"), "layers": eval_settings(config)["layers"],
            "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(grid).items()}}
    if lapq_log:  # LAPQ's calibration loss: Lp start → Powell, per checkpoint and bit-width
      meta["lapq"] = lapq_log
    report.write_tables(rows, out_dir, meta, metric=task.metric)
    report.plot_all(rows, out_dir, title=f"{config.model} on {config.dataset.name}: robustness to the quantizer",
                    metric=task.metric)
  return rows
