"""Robustness reports: JSON and CSV (written atomically), PNG plots, a terminal table."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any

_TARGET_NAMES = {"weights": "weights", "activations": "activations", "both": "weights + activations"}
COLUMNS = ("checkpoint", "format", "bits", "ratio", "policy", "method", "target", "top1", "top5", "loss", "count")


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_tables(rows: Sequence[dict[str, Any]], out_dir: str, meta: dict[str, Any] | None = None) -> dict[str, str]:
  """robustness.json (rows + meta) and robustness.csv (one row per checkpoint × grid point)."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "robustness.json"), "csv": os.path.join(out_dir, "robustness.csv")}
  _atomic_write(paths["json"], json.dumps({"meta": meta or {}, "rows": list(rows)}, indent=1))
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
  _atomic_write(paths["csv"], buf.getvalue())
  return paths


def _at(rows, **match):
  return [r for r in rows if all(r[k] == v for k, v in match.items())]


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
  """Top-1 at the base step (ratio 1, exact), its worst case over the ratios, and with a pow2 step; a second
  table for the number-format points."""
  ints = [r for r in rows if not r.get("format")]
  fmts = [r for r in rows if r.get("format")]
  tables = ([_integer_table(ints)] if ints else []) + ([formats_table(fmts)] if fmts else [])
  return "\n\n".join(tables)


def formats_table(rows: Sequence[dict[str, Any]]) -> str:
  """Per checkpoint and target: top-1 of each number format at its max scaling (ratio 1, exact), and its worst
  case over the ratios."""
  fmts = list(dict.fromkeys(r["format"] for r in rows))
  lines = ["| checkpoint | target | " + " | ".join(f"{f} / worst" for f in fmts) + " |",
           "| --- | --- | " + " | ".join("---:" for _ in fmts) + " |"]
  for ck in dict.fromkeys(r["checkpoint"] for r in rows):
    for target in dict.fromkeys(r["target"] for r in rows):
      cells = []
      for f in fmts:
        exact = _at(rows, checkpoint=ck, target=target, format=f, policy="exact")
        base = min(exact, key=lambda r: abs(r["ratio"] - 1.0)) if exact else None
        cells.append(f"{base['top1']:.1f} / {min(r['top1'] for r in exact):.1f}" if base else "–")
      lines.append(f"| {ck} | {target} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _integer_table(rows: Sequence[dict[str, Any]]) -> str:
  bits = sorted({r["bits"] for r in rows})
  lines = ["| checkpoint | target | method | " + " | ".join(f"W{b} Δ̃ / worst / pow2" for b in bits) + " |",
           "| --- | --- | --- | " + " | ".join("---:" for _ in bits) + " |"]
  for ck in dict.fromkeys(r["checkpoint"] for r in rows):
    for target in dict.fromkeys(r["target"] for r in rows):
      for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for b in bits:
          exact = _at(rows, checkpoint=ck, target=target, method=method, bits=b, policy="exact")
          base = min(exact, key=lambda r: abs(r["ratio"] - 1.0)) if exact else None
          pow2 = _at(rows, checkpoint=ck, target=target, method=method, bits=b, policy="pow2_nearest")
          pow2 = min(pow2, key=lambda r: abs(r["ratio"] - 1.0)) if pow2 else None
          fmt = lambda r: f"{r['top1']:.1f}" if r else "–"
          worst = min((r["top1"] for r in exact), default=None)
          cells.append(f"{fmt(base)} / {worst:.1f} / {fmt(pow2)}" if worst is not None else "–")
        lines.append(f"| {ck} | {target} | {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_all(rows: Sequence[dict[str, Any]], out_dir: str, title: str = "") -> dict[str, str]:
  """accuracy_vs_ratio.png, accuracy_vs_bits.png and pow2.png (integer grids, every base-step method), and
  formats.png (number formats) in `out_dir`; returns {plot: path} for what was drawn."""
  ints = [r for r in rows if not r.get("format")]
  fmts = [r for r in rows if r.get("format")]
  out = {}
  for method in dict.fromkeys(r["method"] for r in ints):  # one set of plots per base-step method
    suffix = "" if method == ints[0]["method"] else f"_{method}"
    drawn = _plot_integer([r for r in ints if r["method"] == method], out_dir, title, method)
    out.update({k + suffix: v.replace(".png", f"{suffix}.png") for k, v in drawn.items()})
    for v in drawn.values():
      if suffix:
        os.replace(v, v.replace(".png", f"{suffix}.png"))
  if fmts:
    out["formats"] = _plot_formats(fmts, out_dir, title)
  return out


def _plot_formats(rows: Sequence[dict[str, Any]], out_dir: str, title: str) -> str:
  """formats.png: top-1 of every format at ratio 1 (bars), and vs the step ratio where there are several."""
  from matplotlib.figure import Figure

  os.makedirs(out_dir, exist_ok=True)
  checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
  targets = list(dict.fromkeys(r["target"] for r in rows))
  fmts = list(dict.fromkeys(r["format"] for r in rows))
  ratios = sorted({r["ratio"] for r in rows})
  n_rows = 2 if len(ratios) > 1 else 1
  fig = Figure(figsize=(max(6.5, 0.9 * len(fmts) + 2) * len(targets), 4.4 * n_rows))
  axes = fig.subplots(n_rows, len(targets), squeeze=False)
  width = 0.8 / len(checkpoints)
  for col, target in enumerate(targets):
    ax = axes[0][col]
    for ci, ck in enumerate(checkpoints):
      vals = []
      for f in fmts:
        pts = _at(rows, checkpoint=ck, target=target, format=f, policy="exact")
        vals.append(min(pts, key=lambda r: abs(r["ratio"] - 1.0))["top1"] if pts else 0.0)
      ax.bar([i + (ci - (len(checkpoints) - 1) / 2) * width for i in range(len(fmts))], vals, width, label=ck)
    ax.set(xticks=range(len(fmts)), ylabel="top-1 (%)", ylim=(0, 100),
           title=f"number formats at max scaling ({_TARGET_NAMES[target]})")
    ax.set_xticklabels(fmts, rotation=30, ha="right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="lower left")
    if n_rows == 2:
      ax = axes[1][col]
      styles = ["-", "--", ":", "-."]
      for ci, ck in enumerate(checkpoints):
        for fi, f in enumerate(fmts):
          pts = sorted(_at(rows, checkpoint=ck, target=target, format=f, policy="exact"), key=lambda r: r["ratio"])
          ax.plot([r["ratio"] for r in pts], [r["top1"] for r in pts], styles[ci % 4], color=f"C{fi % 10}",
                  marker="o", ms=3, label=f"{ck}, {f}")
      ax.axvline(1.0, color="grey", lw=0.6)
      ax.set(xlabel="scale ratio (× the format's max scaling)", ylabel="top-1 (%)", ylim=(0, 100))
      ax.grid(alpha=0.3)
      ax.legend(fontsize=6, ncol=max(1, len(checkpoints)))
  fig.suptitle(title or "Accuracy in number formats")
  fig.tight_layout()
  path = os.path.join(out_dir, "formats.png")
  fig.savefig(path, dpi=110)
  return path


def _plot_integer(rows: Sequence[dict[str, Any]], out_dir: str, title: str, method: str) -> dict[str, str]:
  from matplotlib import colormaps
  from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's inline one) stays as it is

  os.makedirs(out_dir, exist_ok=True)
  checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
  targets = list(dict.fromkeys(r["target"] for r in rows))
  bits = sorted({r["bits"] for r in rows})
  styles = ["-", "--", ":", "-."]
  colors = colormaps["viridis"]([i / max(len(bits) - 1, 1) for i in range(len(bits))])
  out = {}

  fig = Figure(figsize=(6.5 * len(targets), 4.6))
  axes = fig.subplots(1, len(targets), squeeze=False)
  for ax, target in zip(axes[0], targets):
    for ci, ck in enumerate(checkpoints):
      for bi, b in enumerate(bits):
        pts = sorted(_at(rows, checkpoint=ck, target=target, bits=b, policy="exact", method=method),
                     key=lambda r: r["ratio"])
        if pts:
          ax.plot([r["ratio"] for r in pts], [r["top1"] for r in pts], styles[ci % 4], color=colors[bi],
                  marker="o", ms=3, label=f"{ck}, {b} bits")
    ax.axvline(1.0, color="grey", lw=0.6)
    ax.set(xlabel="step ratio Δ / Δ̃", ylabel="top-1 (%)", title=f"quantized: {_TARGET_NAMES[target]}",
           ylim=(0, 100))
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, ncol=len(checkpoints), loc="lower center")
  fig.suptitle(f"{title} (base step: {method})" if title else f"Accuracy vs step-size error (base step: {method})")
  fig.tight_layout()
  out["ratio"] = os.path.join(out_dir, "accuracy_vs_ratio.png")
  fig.savefig(out["ratio"], dpi=110)

  fig = Figure(figsize=(6.5, 4.6))
  ax = fig.subplots()
  for ci, ck in enumerate(checkpoints):
    for ti, target in enumerate(targets):
      pts = []
      for b in bits:
        exact = _at(rows, checkpoint=ck, target=target, bits=b, policy="exact", method=method)
        if exact:
          pts.append((b, min(exact, key=lambda r: abs(r["ratio"] - 1.0))["top1"]))
      ax.plot(*zip(*pts), styles[ci % 4], marker="os^v"[ti % 4], label=f"{ck}, {target}")
  ax.set(xlabel="bits", ylabel="top-1 (%)", title="Accuracy vs bit-width at the base step", ylim=(0, 100),
         xticks=bits)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  out["bits"] = os.path.join(out_dir, "accuracy_vs_bits.png")
  fig.savefig(out["bits"], dpi=110)

  policies = list(dict.fromkeys(r["policy"] for r in rows))
  if len(policies) > 1:
    fig = Figure(figsize=(6.5 * len(targets), 4.6))
    axes = fig.subplots(1, len(targets), squeeze=False)
    width = 0.8 / (len(checkpoints) * len(policies))
    for ax, target in zip(axes[0], targets):
      k = 0
      for ck in checkpoints:
        for pol in policies:
          vals = []
          for b in bits:
            pts = _at(rows, checkpoint=ck, target=target, bits=b, policy=pol, method=method)
            vals.append(min(pts, key=lambda r: abs(r["ratio"] - 1.0))["top1"] if pts else 0.0)
          ax.bar([i + (k - (len(checkpoints) * len(policies) - 1) / 2) * width for i in range(len(bits))], vals,
                 width, label=f"{ck}, {pol}")
          k += 1
      ax.set(xticks=range(len(bits)), xticklabels=[f"{b} bits" for b in bits], ylabel="top-1 (%)", ylim=(0, 100),
             title=f"Exact vs power-of-two step ({_TARGET_NAMES[target]})")
      ax.grid(alpha=0.3, axis="y")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    out["pow2"] = os.path.join(out_dir, "pow2.png")
    fig.savefig(out["pow2"], dpi=110)
  return out
