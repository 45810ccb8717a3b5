"""Plot the mean kurtosis and test top-1 of training runs, epoch by epoch, from their metrics.jsonl.

  python scripts/plot_trajectories.py OUT.png RUN_DIR[=LABEL] [RUN_DIR[=LABEL] ...]

A dashed line marks K_T = 1.8 ± 0.1 (the band the study asks the KURE models to reach).
"""

from __future__ import annotations

import json
import os
import sys

from matplotlib.figure import Figure


def load(run: str) -> list[dict]:
  with open(os.path.join(run, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r.get("split") == "eval"]


def main(argv: list[str]) -> int:
  if len(argv) < 3:
    print(__doc__, file=sys.stderr)
    return 2
  out, runs = argv[1], argv[2:]
  fig = Figure(figsize=(11, 4.2))
  ax_k, ax_a = fig.subplots(1, 2)
  for spec in runs:
    run, _, label = spec.partition("=")
    rows = load(run)
    epochs = [r["epoch"] for r in rows]
    ax_k.plot(epochs, [r["kurtosis_mean"] for r in rows], marker="o", ms=2, label=label or os.path.basename(run))
    ax_a.plot(epochs, [r["top1"] for r in rows], marker="o", ms=2, label=label or os.path.basename(run))
  for y in (1.7, 1.8, 1.9):
    ax_k.axhline(y, color="grey", lw=0.6, ls="-" if y == 1.8 else "--")
  ax_k.set(xlabel="fine-tuning epoch", ylabel="mean kurtosis of the regularized kernels", yscale="log",
           title="kurtosis (K_T = 1.8 ± 0.1 marked)")
  ax_a.set(xlabel="fine-tuning epoch", ylabel="top-1 on the test set (%)", title="float accuracy")
  for ax in (ax_k, ax_a):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  print(out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main(sys.argv))
