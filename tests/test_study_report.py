"""scripts/study_report.py: the CIFAR-10 study's tables and plots from a (synthetic) runs directory."""

import importlib.util
import json
import os

import numpy as np
import pytest

from matplotlib.figure import Figure

from kure_jax.evaluation import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_report():
  spec = importlib.util.spec_from_file_location("study_report", os.path.join(ROOT, "scripts", "study_report.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _workdir(path, top1, kurt):
  os.makedirs(path, exist_ok=True)
  rec = {"step": 10, "split": "eval", "top1": top1, "kurtosis_mean": sum(kurt) / len(kurt),
         "kurtosis": {f"layer{i}/conv": k for i, k in enumerate(kurt)}}
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 10, "split": "train", "loss": 1.0}) + "\n" + json.dumps(rec) + "\n")


def _eval(runs, name, rows, meta=None):
  """RUNS/eval_NAME as eval.py leaves it: robustness.json (full precision) and robustness.csv (4 decimals)."""
  rows = [{"checkpoint": c, "format": "", "bits": b, "ratio": r, "policy": p, "method": m, "target": t, "top1": top1,
           "top5": 90.0, "loss": 1.0, "count": 10000} for c, b, r, p, m, t, top1 in rows]
  report.write_tables(rows, os.path.join(runs, f"eval_{name}"), meta)
  return rows


@pytest.fixture()
def study(tmp_path):
  runs, flt = str(tmp_path / "runs"), str(tmp_path / "float")
  _workdir(flt, 80.0, [3.2, 3.4])
  _workdir(os.path.join(runs, "baseline"), 81.0, [3.1, 3.3])
  _workdir(os.path.join(runs, "kure"), 80.5, [1.9, 2.1])
  # + 0.05004: 79.05004 reads 79.1, its CSV copy (79.05) 79.0: the tables must use the rows at full precision
  ptq = _eval(runs, "ptq_weights", [(m, b, 1.0, "exact", "mse", "weights", 70.05004 + b + (m == "kure"))
                                    for m in ("baseline", "kure") for b in (2, 3, 4, 5, 6, 8)])
  _eval(runs, "lapq_weights", [("kure", 3, 1.0, "exact", "lapq", "weights", 77.7)],
        meta={"lapq": {"kure": {"3": {"p_star": 2.5, "init_loss": 1.0, "loss": 0.4}}}})
  _eval(runs, "lapq_weights_hi", [("kure", 5, 1.0, "exact", "lapq", "weights", 80.1)])
  _eval(runs, "lapq_both_hi", [("kure", 5, 1.0, "exact", "lapq", "both", 79.2)])
  ratio = _eval(runs, "ratio", [(m, 4, r, "exact", "mse", "weights", 60.0 + 10 * r * (m == "kure") - abs(r - 1) * 20)
                                for m in ("baseline", "kure") for r in (0.5, 0.75, 1.0, 1.25, 1.5)])
  pow2 = _eval(runs, "pow2", [(m, b, 1.0, p, "mse", "weights", 50.0 + b) for m in ("baseline", "kure")
                              for b in (2, 3, 4) for p in ("pow2_nearest", "pow2_floor", "pow2_ceil")])
  with open(os.path.join(runs, "wall_times.tsv"), "w") as f:
    f.write("train baseline\t600\neval ratio\t90\n")
  return runs, flt, str(tmp_path / "dest"), {"ptq_weights": ptq, "ratio": ratio, "pow2": pow2}


def value(rows, **match):
  (v,) = [r["top1"] for r in rows if all(r[k] == v for k, v in match.items())]
  return v


def test_tables_hold_the_runs_numbers(study, monkeypatch):
  runs, flt, dest, evals = study
  figures, real = [], Figure.savefig

  def savefig(self, *args, **kwargs):  # the figures the script saves, in order (still drawn to the file)
    figures.append(self)
    return real(self, *args, **kwargs)

  monkeypatch.setattr(Figure, "savefig", savefig)
  text = _load_report().main(runs, flt, dest)
  lines = text.splitlines()
  # float accuracy and the kurtosis range of every model
  assert "| KURE (K_T 1.8) | 80.50 | 2.00 | 1.90–2.10 |" in lines
  assert "| float (start) | 80.00 | 3.30 | 3.20–3.40 |" in lines
  # the paper's shape: FP, then W8…W2, then 6/6…3/3 ("–" where not run); a model without rows has no row
  assert not any(line.startswith("| baseline (LAPQ)") for line in lines)
  assert "| KURE (K_T 1.8) (MSE) | 80.5 | 79.1 | 77.1 | 76.1 | 75.1 | 74.1 | 73.1 | – | – | – | – |" in lines
  assert "| KURE (K_T 1.8) (LAPQ) | 80.5 | – | – | 80.1 | – | 77.7 | – | – | 79.2 | – | – |" in lines
  # step ratio: value at 1.0, best with its ratio, worst within 0.7–1.3 (0.75 → 55.0), worst overall, mean
  assert "| baseline | W4 | 60.0 | 60.0 (1.00) | 55.0 | 50.0 | 54.0 |" in lines
  assert "| KURE (K_T 1.8) | W4 | 70.0 | 70.0 (1.00) | 62.5 | 55.0 | 64.0 |" in lines
  ratio = evals["ratio"]
  for m, name in (("baseline", "baseline"), ("kure", "KURE (K_T 1.8)")):  # the same cells recomputed with NumPy
    xs = np.array([r["ratio"] for r in ratio if r["checkpoint"] == m])
    ys = np.array([r["top1"] for r in ratio if r["checkpoint"] == m])
    near = ys[(xs >= 0.7) & (xs <= 1.3)]
    cells = [ys[xs == 1.0][0], ys.max(), near.min(), ys.min(), ys.mean()]
    want = [f"{c:.1f}" for c in cells]
    want[1] += f" ({xs[ys.argmax()]:.2f})"
    assert f"| {name} | W4 | " + " | ".join(want) + " |" in lines
  # power-of-two steps: the exact step of ptq_weights beside its three roundings to 2^N, per bit-width
  ptq, pow2 = evals["ptq_weights"], evals["pow2"]
  policies = ("exact", "pow2_nearest", "pow2_floor", "pow2_ceil")

  def top1(m, b, p):
    return value(ptq, checkpoint=m, bits=b) if p == "exact" else value(pow2, checkpoint=m, bits=b, policy=p)

  assert "| KURE (K_T 1.8) | " + " | ".join(f"{top1('kure', b, p):.1f}" for b in (4, 3, 2) for p in policies) + " |" \
      in lines
  _, pow2_fig, ratio_fig, ablation = figures  # kurtosis.png first
  heights = [bar.get_height() for c in pow2_fig.axes[0].containers for bar in c]  # baseline's policies, then KURE's
  np.testing.assert_allclose(heights, [top1(m, b, p) for m in ("baseline", "kure") for p in policies
                                       for b in (2, 3, 4)])
  (kure_w4,) = [ln for ln in ratio_fig.axes[0].get_lines() if ln.get_label() == "KURE (K_T 1.8), 4 bits"]
  np.testing.assert_allclose(kure_w4.get_ydata(), [value(ratio, checkpoint="kure", ratio=x) for x in sorted(set(xs))])
  (lone,) = [ln for ln in ablation.axes[0].get_lines() if ln.get_label() == "KURE (K_T 1.8) (kurtosis 2.00), weights"]
  np.testing.assert_allclose(lone.get_ydata(), [value(ptq, checkpoint="kure", bits=b) for b in (2, 3, 4, 5, 6, 8)])
  assert "| train baseline | 10.0 |" in lines
  with open(os.path.join(dest, "tables.md")) as f:
    assert f.read() == text
  for png in ("kurtosis.png", "pow2.png", "step_ratio.png", "ablation.png"):
    with open(os.path.join(dest, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  for copied in ("ptq_weights.csv", "ratio.csv", "pow2.csv"):
    assert os.path.exists(os.path.join(dest, copied))
  with open(os.path.join(dest, "models.json")) as f:
    assert json.load(f)["kure"]["top1"] == 80.5
  with open(os.path.join(dest, "lapq.json")) as f:  # LAPQ's calibration record, only where LAPQ ran
    assert json.load(f) == {"lapq_weights": {"kure": {"3": {"p_star": 2.5, "init_loss": 1.0, "loss": 0.4}}}}


def test_missing_float_evaluation_is_one_line(study, tmp_path):
  runs, _, dest, _ = study
  os.makedirs(tmp_path / "empty")
  with pytest.raises(SystemExit, match="has no evaluation in metrics.jsonl; finish its training first"):
    _load_report().main(runs, str(tmp_path / "empty"), dest)
