"""Collect the CIFAR-10 study (scripts/cifar10_study.sh) into docs/results/cifar10: CSVs, plots, tables.

  python scripts/study_report.py RUNS_DIR FLOAT_WORKDIR [DEST]

e.g. ``python scripts/study_report.py runs/study runs/r20_e12 docs/results/cifar10``. Writes
models.json (float top-1 and per-layer kurtosis of every model), one CSV per evaluation, the
plots (kurtosis per layer, accuracy vs bits, accuracy vs step ratio, power-of-two steps) and
tables.md (markdown tables in the shape of the paper's), and prints tables.md. The numbers come
from each evaluation's robustness.json (full precision; the CSVs are rounded to 4 decimals).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from kure_jax.evaluation import report
from kure_jax.metrics import read_metrics

MODELS = {"baseline": "baseline", "kure": "KURE (K_T 1.8)", "grad_l1": "gradient-ℓ1",
          "kure_t3": "KURE (K_T 3.0)", "kure_t6": "KURE (K_T 6.0)"}
# kurtosis.png in the colours the ablation plot gives its models (baseline, KURE 1.8, 3.0, 6.0: C0…C3)
COLORS = {"float": "0.5", "baseline": "C0", "kure": "C1", "kure_t3": "C2", "kure_t6": "C3", "grad_l1": "C4"}
EVALS = ("ptq_weights", "ptq_both", "lapq_weights", "lapq_both", "lapq_weights_hi", "lapq_both_hi", "ratio", "pow2")
POLICIES = {"exact": "exact", "pow2_nearest": "2^N nearest", "pow2_floor": "2^N down", "pow2_ceil": "2^N up"}


def _last_eval(workdir: str) -> dict:
  evals = read_metrics(workdir, "eval")
  if not evals:
    raise SystemExit(f"error: {workdir} has no evaluation in metrics.jsonl; finish its training first.")
  return evals[-1]


def _evaluation(runs: str, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """(rows, meta) of eval.py's robustness.json in RUNS/eval_NAME; ([], {}) where that evaluation did not run."""
  path = os.path.join(runs, f"eval_{name}", "robustness.json")
  if not os.path.exists(path):
    return [], {}
  with open(path) as f:
    data = json.load(f)
  return data["rows"], data.get("meta", {})


def _named(rows: list[dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
  """The rows of the checkpoints in `names`, labelled by them (the plots' legends)."""
  return [{**r, "checkpoint": names[r["checkpoint"]]} for r in rows if r["checkpoint"] in names]


def _table(header: list[str], body: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def _plot_kurtosis(summary: dict[str, dict[str, Any]], path: str) -> None:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(10, 4))
  ax = fig.subplots()
  names: list[str] = []
  for m, s in summary.items():
    names = list(s["kurtosis"])
    ax.plot(range(len(names)), list(s["kurtosis"].values()), "o-", color=COLORS.get(m),
            label=f"{MODELS.get(m, 'float (start)')}: mean {s['kurtosis_mean']:.2f}")
  ax.axhline(1.8, color="k", ls="--", lw=0.8, label="uniform (1.8)")
  ax.axhline(3.0, color="k", ls=":", lw=0.8, label="Gaussian (3.0)")
  ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("kurtosis of the kernel")
  ax.set_title("ResNet-20 on CIFAR-10: kurtosis per regularized layer")
  ax.legend(fontsize=7, ncol=3, loc="center", bbox_to_anchor=(0.5, 0.72))
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(runs: str, float_dir: str, dest: str) -> str:
  os.makedirs(dest, exist_ok=True)
  models = {"float": _last_eval(float_dir)}
  for m in MODELS:
    if os.path.exists(os.path.join(runs, m, "metrics.jsonl")):
      models[m] = _last_eval(os.path.join(runs, m))
  summary = {m: {"top1": e["top1"], "kurtosis_mean": e.get("kurtosis_mean"), "kurtosis": e.get("kurtosis", {})}
             for m, e in models.items()}
  with open(os.path.join(dest, "models.json"), "w") as f:
    json.dump(summary, f, indent=1)

  evals, lapq = {}, {}
  for n in EVALS:
    evals[n], meta = _evaluation(runs, n)
    src = os.path.join(runs, f"eval_{n}", "robustness.csv")
    if os.path.exists(src):  # the raw rows next to the tables
      shutil.copy(src, os.path.join(dest, f"{n}.csv"))
    if meta.get("lapq"):  # LAPQ's calibration record: p*, loss before/after Powell, evaluations, seconds
      lapq[n] = meta["lapq"]
  if lapq:
    with open(os.path.join(dest, "lapq.json"), "w") as f:
      json.dump(lapq, f, indent=1)
  metric = report.metric_of([r for rows in evals.values() for r in rows])
  ptq = [r for n in EVALS if n.startswith(("ptq", "lapq")) for r in evals[n]]

  def cell(rows: list[dict[str, Any]], **match) -> str:
    """The metric at the base step of the rows matching (exact steps unless `policy` says), "–" where none do."""
    r = report.at_base(rows, **{"policy": "exact", **match})
    return "–" if r is None else f"{r[metric.key]:{metric.fmt}}"

  out = []
  # 1. kurtosis and float accuracy
  body = []
  for m, s in summary.items():
    k = list(s["kurtosis"].values())
    body.append([MODELS.get(m, "float (start)"), f"{s['top1']:.2f}", f"{s['kurtosis_mean']:.2f}",
                 f"{min(k):.2f}–{max(k):.2f}" if k else "–"])
  out.append("### Float accuracy and kurtosis of the regularized layers\n\n"
             + _table(["model", "float top-1", "mean kurtosis", "min–max over layers"], body))
  _plot_kurtosis(summary, os.path.join(dest, "kurtosis.png"))

  # 2. PTQ in the paper's shape
  wbits, abits = (8, 6, 5, 4, 3, 2), (6, 5, 4, 3)
  header = ["model (steps)", "FP"] + [f"{b}/FP" for b in wbits] + [f"{b}/{b}" for b in abits]
  body = []
  for method in ("mse", "lapq"):
    for m in ("baseline", "kure", "grad_l1"):
      if m in summary and report.select(ptq, checkpoint=m, method=method):
        body.append([f"{MODELS[m]} ({method.upper()})", f"{summary[m]['top1']:.1f}"]
                    + [cell(ptq, checkpoint=m, method=method, bits=b, target="weights") for b in wbits]
                    + [cell(ptq, checkpoint=m, method=method, bits=b, target="both") for b in abits])
  out.append("### Post-training quantization (top-1 %, weights/activations bits)\n\n" + _table(header, body))

  # 3. power-of-two steps: the exact MSE step of ptq_weights beside its roundings to 2^N
  if evals["pow2"]:
    pow2_bits = (4, 3, 2)
    exact = [r for r in report.select(ptq, method="mse", target="weights", policy="exact") if r["bits"] in pow2_bits]
    rows = exact + evals["pow2"]
    header = ["model"] + [f"W{b} {POLICIES[p]}" for b in pow2_bits for p in POLICIES]
    body = [[MODELS[m]] + [cell(rows, checkpoint=m, bits=b, policy=p) for b in pow2_bits for p in POLICIES]
            for m in ("baseline", "kure")]
    out.append("### Power-of-two steps (MSE step Δ̃ rounded to 2^N; weights only)\n\n" + _table(header, body))
    report.plot_policies(_named(rows, {m: MODELS[m] for m in ("baseline", "kure")}), os.path.join(dest, "pow2.png"),
                         "Power-of-two steps: Δ̃(MSE) rounded to 2^N in every layer (weights only)", metric)

  # 4. step-size error
  if evals["ratio"]:
    header = ["model", "bits", "at 1.0", "best (ratio)", "worst 0.7–1.3", "worst 0.5–1.5", "mean 0.5–1.5"]
    body = []
    for b in (4, 3, 2):
      for m in ("baseline", "kure"):
        pts = sorted((r["ratio"], r[metric.key]) for r in report.select(
            evals["ratio"], checkpoint=m, bits=b, method="mse", target="weights", policy="exact"))
        if not pts:
          continue
        near = [v for r, v in pts if 0.7 - 1e-6 <= r <= 1.3 + 1e-6]
        best = max(pts, key=lambda p: p[1])
        f = metric.fmt
        body.append([MODELS[m], f"W{b}", cell(evals["ratio"], checkpoint=m, bits=b, method="mse", target="weights"),
                     f"{best[1]:{f}} ({best[0]:.2f})", f"{min(near):{f}}", f"{min(v for _, v in pts):{f}}",
                     f"{report.mean_std([v for _, v in pts])[0]:{f}}"])
    out.append("### Step-size error (Δ = ratio · Δ̃, 21 ratios 0.5…1.5, weights only)\n\n" + _table(header, body))
    report.plot_ratio(_named(evals["ratio"], {m: MODELS[m] for m in ("baseline", "kure")}),
                      os.path.join(dest, "step_ratio.png"), "ResNet-20 on CIFAR-10: accuracy under step-size error",
                      metric)

  # 5. kurtosis-target ablation
  ab = [m for m in ("baseline", "kure", "kure_t3", "kure_t6") if m in summary]
  if evals["ptq_weights"] and ab:
    bits = (8, 6, 5, 4, 3, 2)
    header = ["model", "mean kurtosis", "FP"] + [f"W{b}" for b in bits]
    body = [[MODELS[m], f"{summary[m]['kurtosis_mean']:.2f}", f"{summary[m]['top1']:.1f}"]
            + [cell(evals["ptq_weights"], checkpoint=m, bits=b) for b in bits] for m in ab]
    out.append("### Kurtosis-target ablation (weights only, MSE steps)\n\n" + _table(header, body))
    names = {m: f"{MODELS[m]} (kurtosis {summary[m]['kurtosis_mean']:.2f})" for m in ab}
    report.plot_bits(_named(report.select(evals["ptq_weights"], method="mse"), names),
                     os.path.join(dest, "ablation.png"), "Kurtosis target vs PTQ accuracy (MSE steps)", metric)

  wall = os.path.join(runs, "wall_times.tsv")
  if os.path.exists(wall):
    with open(wall) as f:
      body = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    out.append("### Wall time on the 2-core CPU\n\n"
               + _table(["step", "wall (min)"], [[n, f"{int(s) / 60:.1f}"] for n, s in body]))
  text = "\n\n".join(out) + "\n"
  with open(os.path.join(dest, "tables.md"), "w") as f:
    f.write(text)
  return text


if __name__ == "__main__":
  if len(sys.argv) not in (3, 4):
    raise SystemExit(__doc__)
  print(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else "docs/results/cifar10"))
