"""Collect the CIFAR-10 study (scripts/cifar10_study.sh) into docs/results/cifar10: CSVs, plots, tables.

  python scripts/study_report.py RUNS_DIR FLOAT_WORKDIR [DEST]

e.g. ``python scripts/study_report.py runs/study runs/r20_e12 docs/results/cifar10``. Writes
models.json (float top-1 and per-layer kurtosis of every model), one CSV per evaluation, the
plots (kurtosis per layer, accuracy vs bits, accuracy vs step ratio, power-of-two steps) and
tables.md (markdown tables in the shape of the paper's), and prints tables.md.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kure_jax.metrics import read_metrics  # noqa: E402

MODELS = {"baseline": "baseline", "kure": "KURE (K_T 1.8)", "grad_l1": "gradient-ℓ1",
          "kure_t3": "KURE (K_T 3.0)", "kure_t6": "KURE (K_T 6.0)"}
COLORS = {"float": "0.5", "baseline": "C0", "kure": "C1", "grad_l1": "C2", "kure_t3": "C3", "kure_t6": "C4"}


def _last_eval(workdir: str) -> dict:
  evals = read_metrics(workdir, "eval")
  if not evals:
    raise SystemExit(f"error: {workdir} has no evaluation in metrics.jsonl; finish its training first.")
  return evals[-1]


def _rows(runs: str, name: str) -> list[dict]:
  path = os.path.join(runs, f"eval_{name}", "robustness.csv")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    r["bits"], r["ratio"], r["top1"] = int(r["bits"]), float(r["ratio"]), float(r["top1"])
  return rows


def _pick(rows, **match) -> float | None:
  hits = [r["top1"] for r in rows if all(r[k] == v for k, v in match.items())]
  return hits[0] if hits else None


def _fmt(v: float | None) -> str:
  return "–" if v is None else f"{v:.1f}"


def _table(header: list[str], body: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


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

  evals = {n: _rows(runs, n) for n in ("ptq_weights", "ptq_both", "lapq_weights", "lapq_both", "lapq_weights_hi",
                                        "lapq_both_hi", "ratio", "pow2")}
  lapq = {}
  for n in evals:  # the raw rows next to the tables (the plots below draw them together)
    src = os.path.join(runs, f"eval_{n}", "robustness.csv")
    if os.path.exists(src):
      shutil.copy(src, os.path.join(dest, f"{n}.csv"))
      meta = {}
      if os.path.exists(src.replace(".csv", ".json")):
        with open(src.replace(".csv", ".json")) as f:
          meta = json.load(f).get("meta", {})
      if meta.get("lapq"):  # LAPQ's calibration record: p*, loss before/after Powell, evaluations, seconds
        lapq[n] = meta["lapq"]
  if lapq:
    with open(os.path.join(dest, "lapq.json"), "w") as f:
      json.dump(lapq, f, indent=1)

  out = []
  # 1. kurtosis and float accuracy
  body = []
  for m, s in summary.items():
    k = list(s["kurtosis"].values())
    body.append([MODELS.get(m, "float (start)"), f"{s['top1']:.2f}", f"{s['kurtosis_mean']:.2f}",
                 f"{min(k):.2f}–{max(k):.2f}" if k else "–"])
  out.append("### Float accuracy and kurtosis of the regularized layers\n\n"
             + _table(["model", "float top-1", "mean kurtosis", "min–max over layers"], body))
  fig, ax = plt.subplots(figsize=(10, 4))
  for m, s in summary.items():
    names = list(s["kurtosis"])
    ax.plot(range(len(names)), list(s["kurtosis"].values()), "o-", color=COLORS[m],
            label=f"{MODELS.get(m, 'float (start)')}: mean {s['kurtosis_mean']:.2f}")
  ax.axhline(1.8, color="k", ls="--", lw=0.8, label="uniform (1.8)")
  ax.axhline(3.0, color="k", ls=":", lw=0.8, label="Gaussian (3.0)")
  ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("kurtosis of the kernel")
  ax.set_title("ResNet-20 on CIFAR-10: kurtosis per regularized layer")
  ax.legend(fontsize=7, ncol=3, loc="center", bbox_to_anchor=(0.5, 0.72))
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(dest, "kurtosis.png"), dpi=120)
  plt.close(fig)

  # 2. PTQ in the paper's shape
  wbits, abits = (8, 6, 5, 4, 3, 2), (6, 5, 4, 3)
  header = ["model (steps)", "FP"] + [f"{b}/FP" for b in wbits] + [f"{b}/{b}" for b in abits]
  body = []
  for method, rows in (("MSE", evals["ptq_weights"] + evals["ptq_both"]),
                       ("LAPQ", evals["lapq_weights"] + evals["lapq_weights_hi"] + evals["lapq_both"]
                        + evals["lapq_both_hi"])):
    for m in ("baseline", "kure", "grad_l1"):
      if m not in summary or not any(r["checkpoint"] == m for r in rows):
        continue
      body.append([f"{MODELS[m]} ({method})", f"{summary[m]['top1']:.1f}"]
                  + [_fmt(_pick(rows, checkpoint=m, bits=b, ratio=1.0, target="weights")) for b in wbits]
                  + [_fmt(_pick(rows, checkpoint=m, bits=b, ratio=1.0, target="both")) for b in abits])
  out.append("### Post-training quantization (top-1 %, weights/activations bits)\n\n" + _table(header, body))

  # 3. power-of-two steps
  if evals["pow2"]:
    header = ["model"] + [f"W{b} {p}" for b in (4, 3, 2) for p in ("exact", "2^N nearest", "2^N down", "2^N up")]
    body = []
    for m in ("baseline", "kure"):
      row = [MODELS[m]]
      for b in (4, 3, 2):
        row.append(_fmt(_pick(evals["ptq_weights"], checkpoint=m, bits=b)))
        row += [_fmt(_pick(evals["pow2"], checkpoint=m, bits=b, policy=p))
                for p in ("pow2_nearest", "pow2_floor", "pow2_ceil")]
      body.append(row)
    out.append("### Power-of-two steps (MSE step Δ̃ rounded to 2^N; weights only)\n\n" + _table(header, body))
    policies = {"exact": "exact Δ̃", "pow2_nearest": "2^N nearest", "pow2_floor": "2^N down", "pow2_ceil": "2^N up"}
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.1
    for i, (m, p) in enumerate((m, p) for m in ("baseline", "kure") for p in policies):
      rows = evals["ptq_weights"] if p == "exact" else evals["pow2"]
      vals = [_pick(rows, checkpoint=m, bits=b, policy=p) or 0.0 for b in (2, 3, 4)]
      ax.bar([j + (i - 3.5) * width for j in range(3)], vals, width, color=COLORS[m],
             alpha=(1.0, 0.75, 0.5, 0.3)[i % 4], edgecolor="k", lw=0.4, hatch=("", "", "//", "..")[i % 4],
             label=f"{MODELS[m]}, {policies[p]}")
    ax.set_xticks(range(3), ["W2", "W3", "W4"])
    ax.set_ylabel("top-1 %")
    ax.set_title("Power-of-two steps: Δ̃(MSE) rounded to 2^N in every layer (weights only)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(dest, "pow2.png"), dpi=120)
    plt.close(fig)

  # 4. step-size error
  if evals["ratio"]:
    header = ["model", "bits", "at 1.0", "best (ratio)", "worst 0.7–1.3", "worst 0.5–1.5", "mean 0.5–1.5"]
    body = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, b in zip(axes, (4, 3, 2)):
      for m in ("baseline", "kure"):
        pts = sorted((r["ratio"], r["top1"]) for r in evals["ratio"] if r["checkpoint"] == m and r["bits"] == b)
        if not pts:
          continue
        near = [t for r, t in pts if 0.7 - 1e-6 <= r <= 1.3 + 1e-6]
        best = max(pts, key=lambda p: p[1])
        body.append([MODELS[m], f"W{b}", _fmt(_pick(evals["ratio"], checkpoint=m, bits=b, ratio=1.0)),
                     f"{best[1]:.1f} ({best[0]:.2f})", _fmt(min(near)), _fmt(min(t for _, t in pts)),
                     _fmt(sum(t for _, t in pts) / len(pts))])
        ax.plot(*zip(*pts), "o-", ms=3, color=COLORS[m], label=MODELS[m])
      ax.set_title(f"W{b}, weights only")
      ax.set_xlabel("step ratio Δ / Δ̃(MSE)")
      ax.set_ylabel("top-1 %")
      ax.grid(alpha=0.3)
      if ax.lines:
        ax.legend(fontsize=8)
    fig.suptitle("ResNet-20 on CIFAR-10: accuracy under step-size error")
    fig.tight_layout()
    fig.savefig(os.path.join(dest, "step_ratio.png"), dpi=120)
    plt.close(fig)
    out.append("### Step-size error (Δ = ratio · Δ̃, 21 ratios 0.5…1.5, weights only)\n\n" + _table(header, body))

  # 5. kurtosis-target ablation
  ab = [m for m in ("baseline", "kure", "kure_t3", "kure_t6") if m in summary]
  if evals["ptq_weights"] and ab:
    bits = (8, 6, 5, 4, 3, 2)
    header = ["model", "mean kurtosis", "FP"] + [f"W{b}" for b in bits]
    body = [[MODELS[m], f"{summary[m]['kurtosis_mean']:.2f}", f"{summary[m]['top1']:.1f}"]
            + [_fmt(_pick(evals["ptq_weights"], checkpoint=m, bits=b)) for b in bits] for m in ab]
    out.append("### Kurtosis-target ablation (weights only, MSE steps)\n\n" + _table(header, body))
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in ab:
      ax.plot(bits, [_pick(evals["ptq_weights"], checkpoint=m, bits=b) for b in bits], "o-", color=COLORS[m],
              label=f"{MODELS[m]} (kurtosis {summary[m]['kurtosis_mean']:.2f})")
    ax.set_xticks(bits)
    ax.set_xlabel("weight bits")
    ax.set_ylabel("top-1 %")
    ax.set_title("Kurtosis target vs PTQ accuracy (MSE steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(dest, "ablation.png"), dpi=120)
    plt.close(fig)

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
