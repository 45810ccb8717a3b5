"""Training: task loss + λ·KURE, one jitted step, data parallel over all devices.

The task (``config.task``, `kure_jax.tasks`) supplies what depends on the problem: the model's inputs,
the loss (cross-entropy for image classification, binary cross-entropy for NCF ranking), the train
metrics and the evaluation; the loop, checkpointing and resuming are shared.

``train_and_evaluate(config, workdir)`` is the whole program behind ``train.py``; it
resumes automatically from the newest checkpoint in `workdir`, so a killed run that
is restarted ends bit-identical to an uninterrupted one (on CPU): the state (`TrainState`) holds
params, batch statistics, optimizer state, step and LSQ's learned steps, the data order and augmentation
are functions of (seed, step), and the dropout key is ``fold_in(seed, step)``.

``config.train_sweep`` (off by default) also scores a small robustness grid (`kure_jax.evaluation.robustness.Sweep`) at
every epoch evaluation, logged in the same 'eval' record as ``sweep/<w|a|wa><bits>_r<ratio>/<metric>``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from kure_jax import data as data_lib
from kure_jax import models as models_lib
from kure_jax import qat, sharding
from kure_jax import tasks as tasks_lib
from kure_jax import tree_paths
from kure_jax._checks import whole_bits
from kure_jax.calibration import calibration_sample
from kure_jax.checkpoint import Checkpointer, check_meta, load_variables, param_shapes
from kure_jax.core.kurtosis import (REDUCTIONS, kernel_selection, kure_penalty, kurtosis, kurtosis_by_layer,
                                    select_kernels)
from kure_jax.errors import UserError
from kure_jax.evaluation.robustness import TARGETS, Grid, Sweep
from kure_jax.metrics import MetricWriter
from kure_jax.models import torchvision_weights
from kure_jax.tasks import CLASSIFICATION, Task, classification_sums, cross_entropy  # noqa: F401 (re-exported)
from kure_jax.training.gradient_l1 import with_gradient_l1

OPTIMIZERS = ("sgd", "adam", "adamw")
COMPUTE_DTYPES = ("float32", "bfloat16")
REGULARIZERS = ("kure", "grad_l1")
SCHEDULES = ("cosine", "step", "constant")
SWEEP_METHODS = ("mse", "max", "aciq_gauss", "aciq_laplace", "learned")  # train_sweep.method (LAPQ is eval.py's)
SWEEP_TAGS = {"weights": "w", "activations": "a", "both": "wa"}  # what a sweep metric's name says is quantized


@struct.dataclass
class TrainState:
  """What a run trains and resumes from, as a pytree (`jit`, `sharding.replicate` and `jax.tree` see its arrays).

  `qsteps` holds LSQ's learned steps ({} when the run learns none). `learns_steps` is static, part of the tree's
  structure and fixed when the state is made (`create_state`), so a traced step reads it, not the values: it
  decides the one structure of the optimizer's trainables for the whole run. Checkpoints hold `to_checkpoint`'s
  dict, the layout they have always had; `from_checkpoint` turns a restored one back into a state.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  qsteps: Any = struct.field(default_factory=dict)
  learns_steps: bool = struct.field(pytree_node=False, default=False)

  @property
  def variables(self) -> dict[str, Any]:
    """{'params', 'batch_stats'}: what the model is applied with."""
    return {"params": self.params, "batch_stats": self.batch_stats}

  def trainables(self) -> Any:
    """What the optimizer updates: the params, or {'params', 'qsteps'} when LSQ's steps train with them."""
    return {"params": self.params, "qsteps": self.qsteps} if self.learns_steps else self.params

  def with_trainables(self, new: Any) -> TrainState:
    """The state holding updated trainables (of `trainables`' structure)."""
    return self.replace(params=new["params"], qsteps=new["qsteps"]) if self.learns_steps else self.replace(params=new)

  def to_checkpoint(self) -> dict[str, Any]:
    """The dict checkpoints hold: {'step', 'params', 'batch_stats', 'opt_state'}, + 'qsteps' when steps are learned."""
    tree = {"step": self.step, "params": self.params, "batch_stats": self.batch_stats, "opt_state": self.opt_state}
    if self.learns_steps:
      tree["qsteps"] = self.qsteps
    return tree

  def from_checkpoint(self, tree: dict[str, Any]) -> TrainState:
    """This state with the values of a checkpoint restored into `to_checkpoint`'s structure (`Checkpointer.restore`)."""
    return self.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                        opt_state=tree["opt_state"], qsteps=tree["qsteps"] if self.learns_steps else {})


# ----------------------------------------------------------------------------------
# Config checks: one readable line before anything compiles.


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raise UserError for a config value that cannot work."""

  def bad(field, msg):
    raise UserError(f"config.{field} {msg}")

  if config.model not in models_lib.ALL_MODELS:
    bad("model", f"is {config.model!r}; choose one of {', '.join(sorted(models_lib.ALL_MODELS))}.")
  task_name = config.get("task", "classification")
  if task_name not in tasks_lib.TASKS:
    bad("task", f"is {task_name!r}; choose one of {', '.join(tasks_lib.TASKS)}.")
  task = tasks_lib.TASKS[task_name]
  if config.model not in task.models:
    bad("model", f"is {config.model!r}, which the {task.name!r} task (config.task) cannot train; "
        f"choose one of {', '.join(task.models)}.")
  # The model's own arguments only once the model fits the task: a model from another task fails on the task, the
  # root cause, not on the other task's model_kwargs.
  takes = {f.name for f in dataclasses.fields(models_lib.ALL_MODELS[config.model])} - {"parent", "name"}
  for key in config.get("model_kwargs", {}):
    if key not in takes:
      bad(f"model_kwargs.{key}", f"is no argument of {config.model}; it takes {', '.join(sorted(takes))}.")
  grid = config.get("model_kwargs", {}).get("weight_grid")
  if grid is not None and grid not in models_lib.WEIGHT_GRIDS:
    bad("model_kwargs.weight_grid", f"is {grid!r}; choose one of {', '.join(models_lib.WEIGHT_GRIDS)} (or leave "
        "it unset: signed).")
  if config.dataset.name in data_lib.DATASET_NAMES and config.dataset.name not in task.datasets:
    bad("dataset.name", f"is {config.dataset.name!r}, which is no data of the {task.name!r} task (config.task); "
        f"choose one of {', '.join(task.datasets)}.")
  if not task.supports_qat and qat.method(config) != "none":
    bad("quant.method", f"is {qat.method(config)!r}; QAT is not supported for the {task.name!r} task yet.")
  if config.batch_size <= 0:
    bad("batch_size", f"must be > 0, got {config.batch_size}.")
  if config.get("eval_batch_size", 1) <= 0:
    bad("eval_batch_size", f"must be > 0, got {config.eval_batch_size}.")
  if config.num_epochs <= 0:
    bad("num_epochs", f"must be > 0, got {config.num_epochs}.")
  if config.get("max_steps") is not None and config.max_steps <= 0:
    bad("max_steps", f"must be > 0 (or unset for no cap), got {config.max_steps}.")
  cpu_devices = config.get("cpu_devices", 1)
  if not isinstance(cpu_devices, int) or isinstance(cpu_devices, bool) or cpu_devices < 1:
    bad("cpu_devices", f"must be a whole number ≥ 1, got {cpu_devices!r}.")
  if config.get("dtype", "float32") not in COMPUTE_DTYPES:
    bad("dtype", f"is {config.dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}.")
  if config.optimizer.name not in OPTIMIZERS:
    bad("optimizer.name", f"is {config.optimizer.name!r}; choose one of {', '.join(OPTIMIZERS)}.")
  if config.optimizer.weight_decay < 0:
    bad("optimizer.weight_decay", f"must be ≥ 0, got {config.optimizer.weight_decay}.")
  if not config.schedule.learning_rate > 0:
    bad("schedule.learning_rate", f"must be > 0, got {config.schedule.learning_rate}.")
  if config.schedule.name not in SCHEDULES:
    bad("schedule.name", f"is {config.schedule.name!r}; choose one of {', '.join(SCHEDULES)}.")
  k = config.kure
  if k.weight < 0:
    bad("kure.weight", f"must be ≥ 0 (λ = 0 turns KURE off), got {k.weight}.")
  if not k.target >= 1.0:
    bad("kure.target", f"must be ≥ 1 (no distribution has kurtosis below 1; uniform is 1.8), got {k.target}.")
  if k.get("activations", 0.0) < 0:
    bad("kure.activations", f"must be ≥ 0 (0 turns the activation penalty off), got {k.activations}.")
  if k.reduction not in REDUCTIONS:
    bad("kure.reduction", f"is {k.reduction!r}; choose one of {', '.join(REDUCTIONS)}.")
  for field in ("include", "exclude"):
    try:
      re.compile(k[field])
    except re.error as e:
      bad(f"kure.{field}", f"is not a valid regex ({e}).")
  reg = config.get("reg")
  if reg is not None:
    if reg.kind not in REGULARIZERS:
      bad("reg.kind", f"is {reg.kind!r}; choose one of {', '.join(REGULARIZERS)}.")
    if reg.grad_l1_weight < 0:
      bad("reg.grad_l1_weight", f"must be ≥ 0, got {reg.grad_l1_weight}.")
    if reg.kind == "grad_l1" and k.weight > 0:
      bad("reg.kind", "is 'grad_l1', which replaces KURE: set --config.kure.weight=0 (its λ is reg.grad_l1_weight).")
  qat.validate(config)
  for field in ("checkpoint_every_steps", "log_every_steps", "keep_checkpoints"):
    if config[field] <= 0:
      bad(field, f"must be > 0, got {config[field]}.")
  if config.get("resume_step") is not None and config.resume_step < 0:
    bad("resume_step", f"must be ≥ 0 (a step in <workdir>/checkpoints; unset: the newest), got {config.resume_step}.")
  s = config.get("train_sweep")
  if s is not None:
    if not all(whole_bits(b) for b in s.bits):
      bad("train_sweep.bits", f"is {tuple(s.bits)}; give whole bit-widths in 2…16 (() turns the sweep off).")
    if not s.ratios or any(not float(r) > 0 for r in s.ratios):
      bad("train_sweep.ratios", f"is {tuple(s.ratios)}; give step ratios Δ/Δ̃ > 0, e.g. (0.9, 1.0, 1.1).")
    if not s.targets or any(t not in TARGETS for t in s.targets):
      bad("train_sweep.targets", f"is {tuple(s.targets)}; choose from {', '.join(TARGETS)}.")
    if s.method not in SWEEP_METHODS or (s.method == "learned" and qat.method(config) == "none"):
      bad("train_sweep.method", f"is {s.method!r}; choose one of {', '.join(SWEEP_METHODS[:-1])} (and learned in a "
          "QAT run).")
    lsq_float_acts = qat.method(config) == "lsq" and not config.quant.a_bits
    if s.method == "learned" and set(s.targets) - {"weights"} and lsq_float_acts:
      bad("train_sweep.targets", "quantizes activations with method 'learned', but quant.a_bits=0 learns no "
          "activation steps; use targets=('weights',) or another method.")
    if not float(s.batches).is_integer() or s.batches < 0:
      bad("train_sweep.batches", f"must be a whole number ≥ 0 (0: the whole eval split), got {s.batches}.")


def kure_selection(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The kernel-selection keywords of `select_kernels` from ``config.kure`` (`kurtosis.kernel_selection`)."""
  return kernel_selection(config.kure)


# ----------------------------------------------------------------------------------
# Optimizer, state, steps.


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  s = config.schedule
  warmup = int(s.get("warmup_epochs", 0) * steps_per_epoch)
  if s.name == "cosine":
    main = optax.cosine_decay_schedule(s.learning_rate, max(total_steps - warmup, 1))
  elif s.name == "step":  # ×decay_factor every decay_epochs, as the paper's ImageNet recipe
    every = int(s.decay_epochs * steps_per_epoch)
    main = optax.piecewise_constant_schedule(
        s.learning_rate, {every * i: s.decay_factor for i in range(1, total_steps // max(every, 1) + 1)})
  else:
    main = optax.constant_schedule(s.learning_rate)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, s.learning_rate, warmup), main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   decay_mask: Any = None) -> optax.GradientTransformation:
  """SGD with PyTorch-style coupled weight decay (grad += wd·w before momentum), or Adam(W).

  `decay_mask` (optax's mask: a pytree or function of bools) limits weight decay, e.g. to
  the params when the trainables also hold LSQ's learned steps.
  """
  o = config.optimizer
  if o.name == "sgd":
    return optax.chain(optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
                       optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
  if o.name == "adam":
    return optax.chain(optax.add_decayed_weights(o.weight_decay, mask=decay_mask), optax.adam(schedule))
  return optax.adamw(schedule, weight_decay=o.weight_decay, mask=decay_mask)


def params_only(trainables: dict[str, Any]) -> dict[str, Any]:
  """Weight-decay mask of LSQ's {'params', 'qsteps'} trainables: decay the params, not the learned steps."""
  return {"params": jax.tree.map(lambda _: True, trainables["params"]),
          "qsteps": jax.tree.map(lambda _: False, trainables["qsteps"])}


def create_state(model, tx: optax.GradientTransformation, rng: jax.Array, image_shape: tuple[int, ...] | None = None,
                 task: Task = CLASSIFICATION, learns_steps: bool = False) -> TrainState:
  """The initial state; the model is initialized on ``task.example_inputs(image_shape)`` (NeuMF: ids).

  `learns_steps` (LSQ) fixes the trainables to {'params', 'qsteps'} from the start; `_with_lsq_steps` fills the
  steps once the QAT spec is known.
  """
  variables = models_lib.init_from_inputs(model, rng, *task.example_inputs(image_shape))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     batch_stats=variables.get("batch_stats", {}), opt_state=None, learns_steps=learns_steps)
  return state.replace(opt_state=tx.init(state.trainables()))


def activation_penalty(inter: dict, paths: list[str], target: float) -> jax.Array:
  """mean_l (Kurt[a_l] − K_T)² over the inputs the selected layers sowed (before quantization)."""
  return jnp.mean(jnp.stack([(kurtosis(tree_paths.sown_input(inter, p)) - target) ** 2 for p in paths]))


def make_train_step(model, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    schedule: optax.Schedule, spec: qat.QatSpec | None = None, task: Task = CLASSIFICATION,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """(state, batch) → (state, metrics): task loss + λ·KURE (+ λ_a·activation KURE), one optimizer update.

  The metric 'ce' is the task's loss (`task.loss`: softmax cross-entropy, or binary cross-entropy for
  ranking), 'accuracy' and any other `task.train_metrics` follow it. A model without batch statistics
  (NeuMF) keeps ``state.batch_stats`` = {}.

  With a QAT `spec` the forward pass is quantized by its method (DoReFa or LSQ) and, for
  LSQ, the learned steps in ``state.qsteps`` are trained with the params (a state of
  ``learns_steps``); KURE always regularizes the latent float weights.
  """
  lam = float(config.kure.weight)
  lam_a = float(config.kure.get("activations", 0.0))
  target = float(config.kure.target)
  selection = kure_selection(config)
  reduction = config.kure.reduction
  base_key = jax.random.PRNGKey(config.seed)
  mutable = ["batch_stats"] + (["intermediates"] if lam_a > 0 else [])
  reg = config.get("reg")
  lam_g = float(reg.grad_l1_weight) if reg is not None and reg.kind == "grad_l1" else 0.0

  def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    learns = state.learns_steps  # static: LSQ's steps train with the params
    if learns != (spec is not None and spec.method == "lsq"):
      raise ValueError(f"an LSQ spec needs a state with learned steps (_with_lsq_steps) and only it; got "
                       f"spec {spec and spec.method!r}, learns_steps={learns}.")
    dropout_key = jax.random.fold_in(base_key, state.step)

    def loss_fn(train_vars):
      params = train_vars["params"] if learns else train_vars
      quant = {}
      if spec is not None and spec.method != "none":
        quant = {"quant": qat.quant_for_training(spec, train_vars["qsteps"] if learns else {})}

      def task_loss(p):
        logits, updates = model.apply({"params": p, "batch_stats": state.batch_stats, **quant},
                                      *task.inputs(batch), train=True, mutable=mutable, rngs={"dropout": dropout_key})
        return task.loss(logits, batch), (logits, updates)

      grad_l1 = jnp.zeros(())
      if lam_g > 0:  # Alizadeh et al.: λ·‖∇_W CE‖₁ over the selected kernels, by double backprop
        ce, grad_l1, (logits, updates) = with_gradient_l1(task_loss, params, list(select_kernels(params, **selection)))
      else:
        ce, (logits, updates) = task_loss(params)
      penalty = kure_penalty(params, target, reduction=reduction, **selection) if lam > 0 else jnp.zeros(())
      act = jnp.zeros(())
      if lam_a > 0:
        act = activation_penalty(updates["intermediates"], list(select_kernels(params, **selection)), target)
      loss = ce + lam * penalty + lam_a * act + lam_g * grad_l1
      return loss, (ce, penalty, act, grad_l1, logits, updates.get("batch_stats", state.batch_stats))

    current = state.trainables()
    (loss, (ce, penalty, act, grad_l1, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        current)
    updates, opt_state = tx.update(grads, state.opt_state, current)
    new = optax.apply_updates(current, updates)
    metrics = {"loss": loss, "ce": ce, "kure": penalty, **task.train_metrics(logits, batch),
               "learning_rate": schedule(state.step)}
    if lam_a > 0:
      metrics["kure_act"] = act
    if lam_g > 0:
      metrics["grad_l1"] = grad_l1
    # fault check, on device: the host reads it with the metrics (no sync of its own)
    metrics["finite"] = jnp.isfinite(loss) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((new, batch_stats))]))
    new_state = state.with_trainables(new).replace(step=state.step + 1, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return step_fn


def make_eval_step(model, task: Task = CLASSIFICATION) -> Callable[[dict, dict], dict]:
  """(variables, batch) → the task's sums over unmasked examples (classification: correct top-1/top-5, loss
  and count; ranking: HR@10 hits, NDCG@10 gains, loss and count of users)."""

  def eval_fn(variables: dict, batch: dict) -> dict:
    logits = model.apply(variables, *task.inputs(batch), train=False).astype(jnp.float32)
    return task.eval_sums(logits, batch)

  return eval_fn


def evaluate(eval_fn: Callable, variables: dict, dataset, mesh, progress: bool = False,
             task: Task = CLASSIFICATION) -> dict[str, float]:
  """`task.summarize` of the sums over a padded+masked pass (classification: top-1/top-5 in % and mean loss;
  ranking: hr@10 and ndcg@10 as fractions and mean loss); sums stay on device."""
  totals = None
  for batch in _progress(dataset.iterate(), total=dataset.steps_per_epoch, desc="eval", enabled=progress):
    sums = eval_fn(variables, sharding.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    del sums
  return task.summarize(jax.device_get(totals))


def sweep_grid(config: ml_collections.ConfigDict, weight_grid: str = models_lib.DEFAULT_WEIGHT_GRID) -> Grid | None:
  """The Grid of ``config.train_sweep`` on the model's weight grid; None when its bits are () (off)."""
  s = config.get("train_sweep")
  if s is None or not s.bits:
    return None
  return Grid(bits=tuple(int(b) for b in s.bits), ratios=tuple(float(r) for r in s.ratios), methods=(s.method,),
              targets=tuple(s.targets), weight_grid=weight_grid).validate()


def sweep_metrics(sweep: Sweep, batches: Iterator[dict]) -> dict[str, float]:
  """The sweep's scores as flat eval metrics: 'sweep/w4_r1.0/top1' (w, a or wa: what is quantized; then the bits,
  the step ratio and the task's metric: classification top1/top5/loss, ranking hr@10/ndcg@10/loss)."""
  out = {}
  for row in sweep.score(batches):
    name = f"sweep/{SWEEP_TAGS[row['target']]}{row['bits']}_r{row['ratio']}"
    out.update({f"{name}/{k}": float(row[k]) for k in (*sweep.task.metric.columns, "loss")})
  return out


def _progress(it, total, desc, enabled):
  if not enabled:
    return it
  from tqdm.auto import tqdm
  return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------
# The program.


def _meta(config, params) -> dict[str, Any]:
  return {"model": config.model, "num_classes": int(config.dataset.num_classes),
          "image_size": int(config.dataset.image_size), "param_shapes": param_shapes(params)}


def _truncate_metrics(workdir: str, step: int) -> None:
  """After a resume, drop records logged past the restored step (they will be redone)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


class _Stop:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and returns."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train `config.model` on `config.dataset`, evaluating every epoch; returns final metrics."""
  validate_config(config)
  task = tasks_lib.get(config.get("task", "classification"))
  try:
    sharding.use_cpu_devices(config.get("cpu_devices", 1))
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  except ValueError as e:
    raise UserError(str(e)) from e
  weights_missing = _init_weights_missing(config, workdir)  # said with a missing dataset, in one line
  try:
    train_ds = data_lib.make_dataset(config.dataset, "train", batch_size=config.batch_size, train=True,
                                     seed=config.seed)
    eval_ds = data_lib.make_dataset(config.dataset, "eval", batch_size=config.eval_batch_size, train=False,
                                    seed=config.seed)
  except (ValueError, FileNotFoundError) as e:  # missing or malformed data: the user's to fix
    raise UserError(str(e) + (f" Also: {weights_missing}" if weights_missing else "")) from e
  if weights_missing:
    raise UserError(weights_missing)
  steps_per_epoch = train_ds.steps_per_epoch
  total_steps = int(config.num_epochs * steps_per_epoch)
  if config.get("max_steps"):
    total_steps = min(total_steps, int(config.max_steps))

  model_kwargs = {**models_lib.model_kwargs(config), **task.model_kwargs(train_ds)}  # + what the data fixes (NeuMF's tables)
  if config.get("dtype", "float32") != "float32":  # mixed precision: compute in bfloat16, params stay float32
    model_kwargs["dtype"] = jnp.dtype(config.dtype)
  model = models_lib.get_model(config.model, config.dataset.num_classes, **model_kwargs)
  eval_model = models_lib.get_model(  # the epoch-end evaluation is float32, whatever the training compute
      config.model, config.dataset.num_classes, **{k: v for k, v in model_kwargs.items() if k != "dtype"})
  weight_grid = models_lib.weight_grid(model_kwargs)
  schedule = make_schedule(config, steps_per_epoch, total_steps)
  lsq = qat.method(config) == "lsq"
  tx = make_optimizer(config, schedule, decay_mask=params_only if lsq else None)
  image_shape = (config.dataset.image_size, config.dataset.image_size, 3)
  state = create_state(model, tx, jax.random.PRNGKey(config.seed), image_shape, task=task, learns_steps=lsq)
  spec, probe = None, None
  if qat.method(config) != "none":  # which layers, their input grids and sizes: one train batch shows them
    probe = np.asarray(train_ds.get_batch(0)["image"])
    spec = qat.make_spec(config, model, state.variables, probe)
    if lsq:
      state = _with_lsq_steps(state, spec, model, probe, tx)
  meta = _meta(config, state.params)
  if spec is not None:
    meta["quant"] = spec.meta()

  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
  state = sharding.replicate(state, mesh)
  resume_step = config.get("resume_step")  # None: the newest checkpoint
  try:
    if ckpt.latest_step() is not None or resume_step is not None:
      restored, _ = ckpt.restore(state.to_checkpoint(), meta, step=resume_step)  # metadata, checksum, finiteness
      state = state.from_checkpoint(restored)
      if resume_step is not None:
        ckpt.discard_after(resume_step)
      _truncate_metrics(workdir, int(state.step))
    elif config.get("init_from"):
      state = _init_from(config, state, meta)
      if lsq:  # LSQ's steps start from the weights they will quantize
        state = _with_lsq_steps(state, spec, model, probe, tx)
      state = sharding.replicate(state, mesh)
  except BaseException:
    ckpt.abort()  # release orbax's threads; the error on its way out is the one to report
    raise
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  rep, bat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  train_step = jax.jit(make_train_step(model, tx, config, schedule, spec, task=task), in_shardings=(rep, bat),
                       out_shardings=(rep, rep), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(eval_model, task=task), in_shardings=(rep, bat), out_shardings=rep)
  kurt_fn = jax.jit(lambda p: kurtosis_by_layer(p, **kure_selection(config)))
  grid = sweep_grid(config, weight_grid)
  calibration = None  # activation targets: one random train batch (eval.py's rule; ranking: the first train batch)
  if grid is not None and any(t != "weights" for t in grid.targets):
    calibration = ([train_ds.get_batch(0)] if task.calibrate_on_train_batches
                   else [calibration_sample(train_ds, int(config.eval_batch_size), config.seed + 1)["image"]])
  writer = MetricWriter(workdir)
  progress = config.get("progress", True) and jax.process_index() == 0

  start = int(state.step)
  step = start
  pending: list[dict] = []
  unchecked: list[tuple[int, jax.Array, jax.Array]] = []  # (step, finite flag, loss) still on device
  last = {"time": time.perf_counter(), "step": start}
  eval_metrics: dict[str, Any] = {}
  bar = _progress(range(start, total_steps), total=total_steps, desc="train", enabled=progress)
  if progress:
    bar.update(start)
  batches: Iterator = train_ds.iterate(start_step=start)
  with _Stop() as stop, ckpt:
    for step in range(start, total_steps):
      if stop.requested:
        break
      batch = sharding.shard_batch(next(batches), mesh)
      state, m = train_step(state, batch)
      done = step + 1
      unchecked.append((done, m.pop("finite"), m["loss"]))
      pending.append(m)
      if done % config.log_every_steps == 0 or done == total_steps:
        _check_finite(unchecked, ckpt)
        host = jax.device_get(pending)
        pending = []
        now = time.perf_counter()
        rate = (done - last["step"]) * config.batch_size / max(now - last["time"], 1e-9)
        last = {"time": now, "step": done}
        row = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
        row["images_per_s"] = rate
        writer.write(done, "train", row)
        if progress:
          bar.set_postfix(loss=f"{row['loss']:.3f}", kure=f"{row['kure']:.3f}", img_s=f"{rate:.0f}")
      if progress:
        bar.update(1)
      if done % config.checkpoint_every_steps == 0 and done != total_steps:
        _check_finite(unchecked, ckpt)
        ckpt.save(done, state.to_checkpoint(), meta)
      if done % steps_per_epoch == 0 or done == total_steps:
        _check_finite(unchecked, ckpt)
        variables = state.variables
        if spec is not None:  # a QAT model is scored as it trains: quantized
          variables["quant"] = qat.quant_for_training(spec, state.qsteps)
        eval_metrics = evaluate(eval_step, variables, eval_ds, mesh, task=task)
        if grid is not None:  # compiled once per run (Sweep's plan cache); the weights are data
          sweep = Sweep(eval_model, {**state.variables, "qsteps": state.qsteps}, grid, calibration=calibration,
                        qat=meta.get("quant"), task=task, **kure_selection(config))
          eval_batches = eval_ds.iterate(num_steps=int(config.train_sweep.batches) or None)
          eval_metrics.update(sweep_metrics(sweep, (sharding.shard_batch(b, mesh) for b in eval_batches)))
        kurt = {k.removesuffix("/kernel"): float(v) for k, v in jax.device_get(kurt_fn(state.params)).items()}
        eval_metrics["kurtosis_mean"] = float(np.mean(list(kurt.values())))
        writer.write(done, "eval", {**eval_metrics, "epoch": done / steps_per_epoch, "kurtosis": kurt})
        writer.flush()
    final_step = int(jax.device_get(state.step))
    _check_finite(unchecked, ckpt)
    if final_step > start:
      ckpt.save(final_step, state.to_checkpoint(), meta)
    ckpt.close()
  if progress:
    bar.close()
  writer.close()
  return {"step": final_step, "interrupted": final_step < total_steps, **eval_metrics}


def _check_finite(unchecked: list[tuple[int, jax.Array, jax.Array]], ckpt: Checkpointer) -> None:
  """Read the steps' on-device finite flags (one fetch; at points that sync anyway) and stop at the first bad one.

  Called before every log row, checkpoint, evaluation and the final save, at the same steps on
  every host, so no checkpoint holds a non-finite state and all hosts stop together.
  """
  if not unchecked:
    return
  flags = jax.device_get([flag for _, flag, _ in unchecked])
  for (step, _, loss), ok in zip(unchecked, flags):
    if not ok:
      loss = float(jax.device_get(loss))
      what = "weights" if np.isfinite(loss) else "loss"
      newest = ckpt.latest_step()
      then = (f"every checkpoint is finite; the newest is step {newest}. Lower --config.schedule.learning_rate "
              f"(or raise --config.schedule.warmup_epochs) and rerun the command to resume from step {newest}."
              if newest is not None else "no checkpoint was written. Lower --config.schedule.learning_rate "
              "(or raise --config.schedule.warmup_epochs) and rerun.")
      raise UserError(f"training diverged: the {what} became non-finite at step {step} (loss {loss:g}); "
                      f"the run stopped there and {then}")
  unchecked.clear()


def _with_lsq_steps(state: TrainState, spec: qat.QatSpec, model, images: np.ndarray,
                    tx: optax.GradientTransformation) -> TrainState:
  """LSQ's initial steps (2·mean|x|/√Q_P from the current weights and one batch) and their optimizer state, in a
  state of ``learns_steps`` (`create_state`)."""
  state = state.replace(qsteps=qat.init_steps(spec, model, state.variables, images))
  return state.replace(opt_state=tx.init(state.trainables()))


def _init_weights_missing(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Why `init_from`'s torchvision weights cannot be read (None if they can, or a resume ignores them)."""
  ckpts = os.path.join(workdir, "checkpoints")
  if not config.get("init_from") or (os.path.isdir(ckpts) and any(p.isdigit() for p in os.listdir(ckpts))):
    return None
  return torchvision_weights.missing(config.init_from, config.model)


def _init_from(config: ml_collections.ConfigDict, state: TrainState, meta: dict[str, Any]) -> TrainState:
  """Replace params/batch statistics with those of another checkpoint (fine-tuning)."""
  path = config.init_from
  if path.startswith(torchvision_weights.PREFIX):  # a torchvision .pth, converted here
    variables, src_meta = torchvision_weights.load_torchvision(path.removeprefix(torchvision_weights.PREFIX),
                                                               meta["model"], meta["num_classes"])
  else:
    variables, src_meta = load_variables(path)
  check_meta(src_meta, {"model": meta["model"], "num_classes": meta["num_classes"],
                        "param_shapes": meta["param_shapes"]}, f"init_from={path}")
  params = jax.tree.map(lambda ref, x: jnp.asarray(x, ref.dtype), state.params, variables["params"])
  stats = jax.tree.map(lambda ref, x: jnp.asarray(x, ref.dtype), state.batch_stats, variables["batch_stats"])
  return state.replace(params=params, batch_stats=stats)
