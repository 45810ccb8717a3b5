"""`training_seconds`: a run's training time from its logged throughput, against a hand computation."""
import json

import pytest

from kure_jax.metrics import read_metrics, training_seconds


def test_training_seconds_sums_each_interval_at_its_own_throughput(tmp_path):
  rows = [{"step": 50, "split": "train", "images_per_s": 64.0},    # 50 steps × 128 images at 64/s: 100 s
          {"step": 60, "split": "eval", "top1": 50.0},             # not a train record
          {"step": 100, "split": "train", "images_per_s": 128.0},  # 50 × 128 at 128/s: 50 s
          {"step": 150, "split": "train", "loss": 1.0},            # no throughput logged: skipped, and the next
          {"step": 200, "split": "train", "images_per_s": 256.0}]  # interval runs from 100: 100 × 128 at 256/s: 50 s
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert training_seconds(read_metrics(str(tmp_path)), 128) == pytest.approx(200.0)
  assert training_seconds(read_metrics(str(tmp_path), "train"), 64) == pytest.approx(100.0)
  assert training_seconds([], 128) == 0.0
