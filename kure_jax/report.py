"""Robustness reports: JSON and CSV (written atomically), PNG plots, a terminal table.

Every table and plot shows the task's headline metric (`kure_jax.tasks.Metric`: top-1 in % for
classification, HR@10 as a fraction for ranking). Each function takes it as ``metric=`` (a `Metric`,
e.g. ``task.metric``); left unset, it is the metric of the task whose headline key the rows hold.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any

_TARGET_NAMES = {"weights": "weights", "activations": "activations", "both": "weights + activations"}
_POINT = ("checkpoint", "format", "bits", "ratio", "policy", "method", "target")
COLUMNS = _POINT + ("top1", "top5", "loss", "count")  # robustness.csv of classification


def metric_of(rows: Sequence[dict[str, Any]], metric=None):
  """`metric`, or the headline `Metric` of the task whose key the rows hold (classification's top-1 if none)."""
  from kure_jax import tasks  # the task registry (jax); imported here so this module loads without it

  if metric is not None:
    return metric
  for task in tasks.TASKS.values():
    if rows and task.metric.key in rows[0]:
      return task.metric
  return tasks.TOP1


def columns(metric) -> tuple[str, ...]:
  """robustness.csv's columns for `metric` (`COLUMNS` for top-1)."""
  return _POINT + tuple(metric.columns) + ("loss", "count")


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_tables(rows: Sequence[dict[str, Any]], out_dir: str, meta: dict[str, Any] | None = None,
                 metric=None) -> dict[str, str]:
  """robustness.json (rows + meta) and robustness.csv (one row per checkpoint × grid point; the metric columns
  are the task's: top1, top5 or hr@10, ndcg@10)."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "robustness.json"), "csv": os.path.join(out_dir, "robustness.csv")}
  _atomic_write(paths["json"], json.dumps({"meta": meta or {}, "rows": list(rows)}, indent=1))
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=columns(metric_of(rows, metric)), extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
  _atomic_write(paths["csv"], buf.getvalue())
  return paths


def _at(rows, **match):
  return [r for r in rows if all(r[k] == v for k, v in match.items())]


def summary_table(rows: Sequence[dict[str, Any]], metric=None) -> str:
  """The headline metric (top-1, HR@10) at the base step (ratio 1, exact), its worst case over the ratios, and
  with a pow2 step; a second table for the number-format points."""
  metric = metric_of(rows, metric)
  ints = [r for r in rows if not r.get("format")]
  fmts = [r for r in rows if r.get("format")]
  tables = ([_integer_table(ints, metric)] if ints else []) + ([formats_table(fmts, metric)] if fmts else [])
  return "\n\n".join(tables)


def _named(metric) -> str:
  return f"{metric.table_name} " if metric.table_name else ""


def formats_table(rows: Sequence[dict[str, Any]], metric=None) -> str:
  """Per checkpoint and target: the headline metric of each number format at its max scaling (ratio 1, exact),
  and its worst case over the ratios."""
  metric = metric_of(rows, metric)
  key, fmt = metric.key, metric.fmt
  fmts = list(dict.fromkeys(r["format"] for r in rows))
  lines = ["| checkpoint | target | " + " | ".join(f"{_named(metric)}{f} / worst" for f in fmts) + " |",
           "| --- | --- | " + " | ".join("---:" for _ in fmts) + " |"]
  for ck in dict.fromkeys(r["checkpoint"] for r in rows):
    for target in dict.fromkeys(r["target"] for r in rows):
      cells = []
      for f in fmts:
        exact = _at(rows, checkpoint=ck, target=target, format=f, policy="exact")
        base = min(exact, key=lambda r: abs(r["ratio"] - 1.0)) if exact else None
        cells.append(f"{base[key]:{fmt}} / {min(r[key] for r in exact):{fmt}}" if base else "–")
      lines.append(f"| {ck} | {target} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _integer_table(rows: Sequence[dict[str, Any]], metric) -> str:
  key, spec = metric.key, metric.fmt
  bits = sorted({r["bits"] for r in rows})
  lines = ["| checkpoint | target | method | " + " | ".join(f"{_named(metric)}W{b} Δ̃ / worst / pow2" for b in bits)
           + " |",
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
          fmt = lambda r: f"{r[key]:{spec}}" if r else "–"
          worst = min((r[key] for r in exact), default=None)
          cells.append(f"{fmt(base)} / {worst:{spec}} / {fmt(pow2)}" if worst is not None else "–")
        lines.append(f"| {ck} | {target} | {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_all(rows: Sequence[dict[str, Any]], out_dir: str, title: str = "", metric=None) -> dict[str, str]:
  """accuracy_vs_ratio.png, accuracy_vs_bits.png and pow2.png (integer grids, every base-step method), and
  formats.png (number formats) in `out_dir`, of the headline metric (top-1, HR@10; the file names stay);
  returns {plot: path} for what was drawn."""
  metric = metric_of(rows, metric)
  ints = [r for r in rows if not r.get("format")]
  fmts = [r for r in rows if r.get("format")]
  out = {}
  for method in dict.fromkeys(r["method"] for r in ints):  # one set of plots per base-step method
    suffix = "" if method == ints[0]["method"] else f"_{method}"
    drawn = _plot_integer([r for r in ints if r["method"] == method], out_dir, title, method, metric)
    out.update({k + suffix: v.replace(".png", f"{suffix}.png") for k, v in drawn.items()})
    for v in drawn.values():
      if suffix:
        os.replace(v, v.replace(".png", f"{suffix}.png"))
  if fmts:
    out["formats"] = _plot_formats(fmts, out_dir, title, metric)
  return out


def _plot_formats(rows: Sequence[dict[str, Any]], out_dir: str, title: str, metric) -> str:
  """formats.png: the headline metric of every format at ratio 1 (bars), and vs the step ratio where there are
  several."""
  from matplotlib.figure import Figure

  key, label, ylim = metric.key, metric.label, (0, metric.best)
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
        vals.append(min(pts, key=lambda r: abs(r["ratio"] - 1.0))[key] if pts else 0.0)
      ax.bar([i + (ci - (len(checkpoints) - 1) / 2) * width for i in range(len(fmts))], vals, width, label=ck)
    ax.set(xticks=range(len(fmts)), ylabel=label, ylim=ylim,
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
          ax.plot([r["ratio"] for r in pts], [r[key] for r in pts], styles[ci % 4], color=f"C{fi % 10}",
                  marker="o", ms=3, label=f"{ck}, {f}")
      ax.axvline(1.0, color="grey", lw=0.6)
      ax.set(xlabel="scale ratio (× the format's max scaling)", ylabel=label, ylim=ylim)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=6, ncol=max(1, len(checkpoints)))
  fig.suptitle(title or f"{metric.title} in number formats")
  fig.tight_layout()
  path = os.path.join(out_dir, "formats.png")
  fig.savefig(path, dpi=110)
  return path


def _plot_integer(rows: Sequence[dict[str, Any]], out_dir: str, title: str, method: str, metric) -> dict[str, str]:
  from matplotlib import colormaps
  from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's inline one) stays as it is

  key, label, ylim = metric.key, metric.label, (0, metric.best)
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
          ax.plot([r["ratio"] for r in pts], [r[key] for r in pts], styles[ci % 4], color=colors[bi],
                  marker="o", ms=3, label=f"{ck}, {b} bits")
    ax.axvline(1.0, color="grey", lw=0.6)
    ax.set(xlabel="step ratio Δ / Δ̃", ylabel=label, title=f"quantized: {_TARGET_NAMES[target]}",
           ylim=ylim)
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, ncol=len(checkpoints), loc="lower center")
  fig.suptitle(f"{title} (base step: {method})" if title
               else f"{metric.title} vs step-size error (base step: {method})")
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
          pts.append((b, min(exact, key=lambda r: abs(r["ratio"] - 1.0))[key]))
      ax.plot(*zip(*pts), styles[ci % 4], marker="os^v"[ti % 4], label=f"{ck}, {target}")
  ax.set(xlabel="bits", ylabel=label, title=f"{metric.title} vs bit-width at the base step", ylim=ylim,
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
            vals.append(min(pts, key=lambda r: abs(r["ratio"] - 1.0))[key] if pts else 0.0)
          ax.bar([i + (k - (len(checkpoints) * len(policies) - 1) / 2) * width for i in range(len(bits))], vals,
                 width, label=f"{ck}, {pol}")
          k += 1
      ax.set(xticks=range(len(bits)), xticklabels=[f"{b} bits" for b in bits], ylabel=label, ylim=ylim,
             title=f"Exact vs power-of-two step ({_TARGET_NAMES[target]})")
      ax.grid(alpha=0.3, axis="y")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    out["pow2"] = os.path.join(out_dir, "pow2.png")
    fig.savefig(out["pow2"], dpi=110)
  return out
