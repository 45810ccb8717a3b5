"""What a model is trained and scored on, as data: a `Task` is a frozen record of pure functions.

`kure_jax.training.train` has one training loop; the task decides everything that depends on the kind of
problem, so the loop holds no ``if ranking`` branches:

* which batch entries feed the model (`inputs`) and what example inputs initialize it (`example_inputs`);
* the masked task loss (`loss`) and the train-time metrics logged with it (`train_metrics`);
* the per-batch evaluation sums (`eval_sums`, summed over a padded+masked pass on device) and how the
  host turns the totals into the reported numbers (`summarize`);
* the model's keyword arguments that come from the data (`model_kwargs`, e.g. NeuMF's table sizes);
* the dataset and model names it can run with (`datasets`, `models`), checked by `validate_config`;
* for the robustness sweep and its reports (`kure_jax.evaluation.robustness`, `kure_jax.evaluation.report`): the headline metric
  (`metric`, a `Metric`: the key, label and range the tables and plots show), the exact integer sums a sweep
  row carries beside the metrics (`exact`), and where the activation steps' calibration inputs come from
  (`calibrate_on_train_batches`).

Tasks (``config.task``):

* ``classification``: image batches ``{"image", "label", "mask"}``; softmax cross-entropy; train
  accuracy; eval top-1/top-5 in % and the mean cross-entropy. Exactly the loop's behaviour before tasks.
* ``ranking``: NCF implicit feedback. Train batches ``{"user" [B], "item" [B], "label" float 0/1, "mask"}``,
  sigmoid binary cross-entropy; the train "accuracy" is that of the sign of the logit. Eval batches hold
  users with their 100 candidates, ``{"user" [B, 1], "item" [B, 100] (column 0 the held-out positive),
  "mask" [B]}``; reported: ``hr@10`` and ``ndcg@10`` as FRACTIONS in [0, 1] (as in the NCF paper, e.g.
  HR@10 0.69), ``loss`` (the binary cross-entropy per candidate, positive = column 0) and ``count`` (users).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kure_jax import models as models_lib
from kure_jax import ranking
from kure_jax.data import pipeline

RANK_K = 10  # HR@k and NDCG@k


@dataclasses.dataclass(frozen=True)
class Metric:
  """A task's headline metric in the robustness reports (`kure_jax.evaluation.report`): what the tables and plots show.

  key: the row key (a key of `Task.summarize`'s output). label: the axis label. title: the noun of the plot
  titles ("Accuracy vs bit-width ..."). best: its best value (the plots' y range is 0..best). fmt: the format
  of a table cell. table_name: named in the table's column headers ('' for top-1, the tables' original form).
  columns: the metric columns of robustness.csv (before 'loss' and 'count').
  """

  key: str
  label: str
  title: str
  best: float
  fmt: str
  table_name: str
  columns: tuple[str, ...]


TOP1 = Metric(key="top1", label="top-1 (%)", title="Accuracy", best=100.0, fmt=".1f", table_name="",
              columns=("top1", "top5"))
HR_AT_K = Metric(key=f"hr@{RANK_K}", label=f"HR@{RANK_K}", title=f"HR@{RANK_K}", best=1.0, fmt=".3f",
                 table_name=f"HR@{RANK_K}", columns=(f"hr@{RANK_K}", f"ndcg@{RANK_K}"))


@dataclasses.dataclass(frozen=True)
class Task:
  """The task-dependent pieces of training and evaluation (all pure functions)."""

  name: str
  inputs: Callable[[Mapping[str, Any]], tuple]                  # batch -> the model's positional inputs
  example_inputs: Callable[[Any], tuple]                        # image_shape (or None) -> inputs for init
  loss: Callable[[jax.Array, Mapping[str, Any]], jax.Array]     # (logits, batch) -> masked mean loss
  train_metrics: Callable[[jax.Array, Mapping[str, Any]], dict]  # (logits, batch) -> {"accuracy": ...}
  eval_sums: Callable[[jax.Array, Mapping[str, Any]], dict]     # (float32 logits, batch) -> sums incl. "count"
  summarize: Callable[[Mapping[str, Any]], dict]                # host totals -> reported metrics
  model_kwargs: Callable[[Any], dict]                           # train dataset -> model kwargs from the data
  datasets: tuple[str, ...]                                     # dataset.name values it trains on
  models: tuple[str, ...]                                       # config.model values it trains
  supports_qat: bool = True                                     # quant.method other than 'none' allowed
  metric: Metric = TOP1                                         # the reports' headline metric
  exact: Callable[[Mapping[str, Any]], dict] = lambda t: {}     # host totals -> exact integer counts of a sweep row
  supports_lapq: bool = True                                    # eval method 'lapq' (its loss is cross-entropy)
  calibrate_on_train_batches: bool = False                      # activation steps: calibrated on the training
                                                                # pipeline's batches (else: a random sample of the
                                                                # train split, eval preprocessing)


# ----------------------------------------------------------------------------------
# Classification (images).


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean cross-entropy over the examples where mask is True."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  w = mask.astype(jnp.float32)
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def classification_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  w = mask.astype(jnp.float32)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {"top1": jnp.sum((top5[:, 0] == labels) * w), "top5": jnp.sum(jnp.any(top5 == labels[:, None], -1) * w),
          "loss": jnp.sum(ce * w), "count": jnp.sum(w)}


def _classification_accuracy(logits, batch):
  correct = (jnp.argmax(logits, -1) == batch["label"]) & batch["mask"]
  return {"accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(batch["mask"]), 1)}


def _classification_summary(t):
  n = max(float(t["count"]), 1.0)
  return {"top1": 100 * float(t["top1"]) / n, "top5": 100 * float(t["top5"]) / n,
          "loss": float(t["loss"]) / n, "count": int(t["count"])}


# ----------------------------------------------------------------------------------
# Ranking (NCF implicit feedback).


def binary_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean sigmoid binary cross-entropy over the examples where mask is True (labels 0/1)."""
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32))
  w = mask.astype(jnp.float32)
  return jnp.sum(bce * w) / jnp.maximum(jnp.sum(w), 1.0)


def _ranking_accuracy(logits, batch):
  w = batch["mask"].astype(jnp.float32)
  correct = ((logits > 0) == (batch["label"] > 0.5)).astype(jnp.float32) * w
  return {"accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(w), 1.0)}


def ranking_eval_sums(scores: jax.Array, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Sums of HR@10 hits, NDCG@10 gains, per-user mean candidate BCE and users over the unmasked rows.

  scores: [B, C] logits of each user's candidates, the held-out positive in column 0.
  """
  items, mask = batch["item"], batch["mask"]
  rank = ranking.ranks(scores, items)
  hits, gains, count = ranking.ranking_sums(rank, mask, k=RANK_K)
  labels = jnp.zeros_like(scores).at[:, 0].set(1.0)
  bce = jnp.mean(optax.sigmoid_binary_cross_entropy(scores, labels), axis=-1)
  return {"hits": hits, "ndcg": gains, "loss": jnp.sum(bce * mask.astype(jnp.float32)), "count": count}


def _ranking_summary(t):
  n = max(float(t["count"]), 1.0)
  return {f"hr@{RANK_K}": float(t["hits"]) / n, f"ndcg@{RANK_K}": float(t["ndcg"]) / n,
          "loss": float(t["loss"]) / n, "count": int(t["count"])}


def _ids_example(_):
  return jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)


def _table_sizes(dataset) -> dict[str, int]:
  return {"num_users": int(dataset.num_users), "num_items": int(dataset.num_items)}


# ----------------------------------------------------------------------------------
# The registry.

CLASSIFICATION = Task(
    name="classification",
    inputs=lambda batch: (batch["image"],),
    example_inputs=lambda image_shape: (jnp.zeros((1, *image_shape), jnp.float32),),
    loss=lambda logits, batch: cross_entropy(logits, batch["label"], batch["mask"]),
    train_metrics=_classification_accuracy,
    eval_sums=lambda logits, batch: classification_sums(logits, batch["label"], batch["mask"]),
    summarize=_classification_summary,
    model_kwargs=lambda dataset: {},
    datasets=pipeline.IMAGE_DATASETS, models=tuple(models_lib.MODELS),
    metric=TOP1, exact=lambda t: {"correct": int(t["top1"])})

RANKING = Task(
    name="ranking",
    inputs=lambda batch: (batch["user"], batch["item"]),
    example_inputs=_ids_example,
    loss=lambda logits, batch: binary_cross_entropy(logits, batch["label"], batch["mask"]),
    train_metrics=_ranking_accuracy,
    eval_sums=ranking_eval_sums,
    summarize=_ranking_summary,
    model_kwargs=_table_sizes,
    datasets=("movielens",), models=tuple(models_lib.RECOMMENDERS),
    supports_qat=False,  # QAT's layer probe reads image batches
    metric=HR_AT_K, exact=lambda t: {"hits": int(t["hits"])},
    supports_lapq=False,  # LAPQ's calibration loss is the classification cross-entropy on labelled images
    calibrate_on_train_batches=True)  # (user, item) pairs of the training batches: positives and sampled negatives

TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION, RANKING)}


def get(name: str) -> Task:
  """The task called `name` (``config.task``)."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}.")
  return TASKS[name]
