"""scripts/ncf_report.py: the NCF study's mean ± std table and plot from synthetic eval rows and run logs."""

import json
import os

from tests.helpers import load_script


def _run(runs, label, hr):
  os.makedirs(os.path.join(runs, label))
  with open(os.path.join(runs, label, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 5, "split": "eval", "hr@10": hr - 0.1}) + "\n")
    f.write(json.dumps({"step": 10, "split": "eval", "hr@10": hr}) + "\n")  # the last evaluation counts


def test_table_groups_seeds_and_the_plot_is_written(tmp_path):
  report = load_script("ncf_report")
  runs, rob, out = tmp_path / "runs", tmp_path / "eval", tmp_path / "out"
  values = {"baseline_s0": 0.4, "baseline_s1": 0.6, "act_s0": 0.62}  # at 4 bits, activations
  rows = []
  for label, hr in values.items():
    _run(str(runs), label, 0.7 if label.startswith("baseline") else 0.68)
    for target in ("activations", "both"):
      rows.append({"checkpoint": label, "format": "", "bits": 4, "ratio": 1.0, "policy": "exact", "method": "mse",
                   "target": target, "hr@10": hr})
      rows.append({**rows[-1], "policy": "pow2_nearest", "hr@10": 0.0})  # another policy: not in the table
  os.makedirs(rob)
  (rob / "robustness.json").write_text(json.dumps({"meta": {}, "rows": rows}))
  by, floats, labels = report.collect(str(rob), str(runs))
  assert labels == ["act_s0", "baseline_s0", "baseline_s1"]
  assert by[("baseline", "activations", 4)] == [0.4, 0.6]
  text = report.table(by, floats, "activations", [4])
  # mean 50.00, sample std of (40, 60) = 14.14; float 70.00 ± 0.00 over the two seeds; n = 1: no ± part
  assert "| baseline | 2 | 70.00 ± 0.00 | 50.00 ± 14.14 |" in text
  assert "| KURE on activations | 1 | 68.00 | 62.00 |" in text
  assert "*63.07*" in text  # the rebuttal's 4-bit KURE number beside ours
  assert "rebuttal" not in report.table(by, floats, "both", [4])
  report.plot(by, floats, ["activations", "both"], [4], str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 10_000


def test_float_table_has_the_last_and_the_best_epoch(tmp_path):
  report = load_script("ncf_report")
  runs = tmp_path / "runs"
  _run(str(runs), "baseline_s0", 0.70)                 # evaluations 0.60 then 0.70: best = last
  os.makedirs(runs / "baseline_s1")
  with open(runs / "baseline_s1" / "metrics.jsonl", "w") as f:
    for step, hr in ((5, 0.72), (10, 0.66)):           # it peaked before the end: best 0.72, last 0.66
      f.write(json.dumps({"step": step, "split": "eval", "hr@10": hr}) + "\n")
  best = report.best_epochs(str(runs), ["baseline_s0", "baseline_s1"])
  assert best == {"baseline": [0.70, 0.72]}
  text = report.float_table({"baseline": [0.70, 0.66]}, best)
  assert "| baseline | 2 | 68.00 ± 2.83 | 71.00 ± 1.41 |" in text
