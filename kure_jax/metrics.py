"""Metrics to JSONL and TensorBoard event files in the workdir (host 0 only)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def _scalar(v: Any) -> float:
  return float(np.asarray(v))


class MetricWriter:
  """Appends one JSON object per call to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

  TensorBoard files are written with tensorboardX (no TensorFlow needed); when it is
  not installed only the JSONL file is written.
  """

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # pragma: no cover - tensorboardX is a dependency
        self._tb = None

  def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    for k, v in values.items():
      record[k] = v if isinstance(v, (str, dict)) else _scalar(v)
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, float):
          self._tb.add_scalar(f"{split}/{k}", v, int(step))
        elif isinstance(v, dict):
          for kk, vv in v.items():
            self._tb.add_scalar(f"{split}/{k}/{kk}", float(vv), int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """The records of ``metrics.jsonl`` (optionally of one split), in order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if split is None or r["split"] == split]


def training_seconds(rows: list[dict], batch_size: int) -> float:
  """Training time of a run from its train records: Σ (images since the previous record) / (their images/s).

  It survives kills and resumptions (a resumed run's ``metrics.jsonl`` is cut back to its checkpoint, so every
  step counts once), where a wall clock around one ``train.py`` call sees only its last segment. Evaluations and
  compilation between the records are not included.
  """
  total, last = 0.0, 0
  for r in rows:
    if r.get("split") == "train" and r.get("images_per_s"):
      total += (r["step"] - last) * batch_size / r["images_per_s"]
      last = r["step"]
  return total
