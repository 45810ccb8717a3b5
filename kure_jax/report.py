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
import re
import statistics
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


def arm_of(checkpoint: str) -> str:
  """The arm a checkpoint belongs to: its name less a trailing seed (`kure_s1`, `kure-seed2` -> `kure`)."""
  m = re.fullmatch(r"(.+?)[_-](?:s|seed)\d+", checkpoint)
  return m.group(1) if m else checkpoint


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
  """Mean, sample standard deviation (0 for one value) and count."""
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def _groups(checkpoints: Sequence[str]) -> list[tuple[str, list[str]]]:
  """(legend label, checkpoints) per plotted line: seeds of one arm are drawn as one mean line with a ±1 std band
  (labelled `arm (n seeds)`) as soon as some arm has several; otherwise one line per checkpoint."""
  arms: dict[str, list[str]] = {}
  for ck in checkpoints:
    arms.setdefault(arm_of(ck), []).append(ck)
  if all(len(v) == 1 for v in arms.values()):
    return [(ck, [ck]) for ck in checkpoints]
  return [(f"{a} ({len(v)} seeds)" if len(v) > 1 else v[0], v) for a, v in arms.items()]


def _base(rows, **match):
  """The row nearest ratio 1 among those matching, or None."""
  pts = _at(rows, **match)
  return min(pts, key=lambda r: abs(r["ratio"] - 1.0)) if pts else None


def _curve(per_checkpoint: dict[str, dict[float, float]]) -> tuple[list, list[float], list[float]]:
  """{checkpoint: {x: y}} -> (xs, mean, std) over the checkpoints holding each x."""
  xs = sorted({x for d in per_checkpoint.values() for x in d})
  stats = [mean_std([d[x] for d in per_checkpoint.values() if x in d]) for x in xs]
  return xs, [m for m, _, _ in stats], [s for _, s, _ in stats]


def _line(ax, xs, ys, sd, style: str, color, marker: str, label: str) -> None:
  ax.plot(xs, ys, style, color=color, marker=marker, ms=3, label=label)
  if any(sd):
    ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], color=color, alpha=0.15,
                    lw=0)


def _legend(ax, n_entries: int, beside: bool = False) -> None:
  """Inside the axes while short, beside them (saved with bbox_inches='tight') once it would cover the curves
  (bar charts: always beside, their low bars fill the corners)."""
  if n_entries <= 6 and not beside:
    ax.legend(fontsize=7, loc="lower left")
  else:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + n_entries // 24)


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
  lines = ["| checkpoint | target | method | "
           + " | ".join(f"{_named(metric)}{b} bits Δ̃ / worst / pow2" for b in bits)
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
  """formats.png: the headline metric of every format at ratio 1 (bars; seeds of one arm: mean, ±1 std whiskers),
  and vs the step ratio where there are several."""
  from matplotlib.figure import Figure

  key, label, ylim = metric.key, metric.label, (0, metric.best)
  os.makedirs(out_dir, exist_ok=True)
  groups = _groups(list(dict.fromkeys(r["checkpoint"] for r in rows)))
  targets = list(dict.fromkeys(r["target"] for r in rows))
  fmts = list(dict.fromkeys(r["format"] for r in rows))
  ratios = sorted({r["ratio"] for r in rows})
  n_rows = 2 if len(ratios) > 1 else 1
  fig = Figure(figsize=(max(6.5, 0.9 * len(fmts) + 2) * len(targets), 4.4 * n_rows))
  axes = fig.subplots(n_rows, len(targets), squeeze=False)
  width = 0.8 / len(groups)
  for col, target in enumerate(targets):
    ax = axes[0][col]
    for gi, (name, cks) in enumerate(groups):
      xs, ys, sd = _curve({ck: {i: r[key] for i, f in enumerate(fmts)
                                if (r := _base(rows, checkpoint=ck, target=target, format=f, policy="exact"))}
                           for ck in cks})
      ax.bar([x + (gi - (len(groups) - 1) / 2) * width for x in xs], ys, width, yerr=sd if any(sd) else None,
             capsize=2, label=name)
    ax.set(xticks=range(len(fmts)), ylabel=label, ylim=ylim,
           title=f"number formats at max scaling ({_TARGET_NAMES[target]})")
    ax.set_xticklabels(fmts, rotation=30, ha="right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _legend(ax, len(groups), beside=True)
    if n_rows == 2:
      ax = axes[1][col]
      for gi, (name, cks) in enumerate(groups):
        for fi, f in enumerate(fmts):
          xs, ys, sd = _curve({ck: {r["ratio"]: r[key] for r in _at(rows, checkpoint=ck, target=target, format=f,
                                                                       policy="exact")} for ck in cks})
          if xs:
            _line(ax, xs, ys, sd, _STYLES[gi % 4], f"C{fi % 10}", _MARKERS[gi % len(_MARKERS)], f"{name}, {f}")
      ax.axvline(1.0, color="grey", lw=0.6)
      ax.set(xlabel="scale ratio (× the format's max scaling)", ylabel=label, ylim=ylim)
      ax.grid(alpha=0.3)
      _legend(ax, len(groups) * len(fmts))
  fig.suptitle(title or f"{metric.title} in number formats")
  fig.tight_layout()
  path = os.path.join(out_dir, "formats.png")
  fig.savefig(path, dpi=110, bbox_inches="tight")
  return path


_STYLES = ("-", "--", ":", "-.")
_MARKERS = "osD^v<>ph*"


def _plot_integer(rows: Sequence[dict[str, Any]], out_dir: str, title: str, method: str, metric) -> dict[str, str]:
  """accuracy_vs_ratio.png, accuracy_vs_bits.png and (with several rounding policies) pow2.png for one base-step
  method; seeds of one arm are drawn as their mean with a ±1 std band or whiskers (`_groups`)."""
  from matplotlib import colormaps
  from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's inline one) stays as it is

  key, label, ylim = metric.key, metric.label, (0, metric.best)
  os.makedirs(out_dir, exist_ok=True)
  groups = _groups(list(dict.fromkeys(r["checkpoint"] for r in rows)))
  targets = list(dict.fromkeys(r["target"] for r in rows))
  bits = sorted({r["bits"] for r in rows})
  colors = colormaps["viridis"]([i / max(len(bits) - 1, 1) for i in range(len(bits))])
  out = {}

  fig = Figure(figsize=(6.5 * len(targets), 4.6))
  axes = fig.subplots(1, len(targets), squeeze=False)
  for ax, target in zip(axes[0], targets):
    for gi, (name, cks) in enumerate(groups):
      for bi, b in enumerate(bits):
        xs, ys, sd = _curve({ck: {r["ratio"]: r[key] for r in _at(rows, checkpoint=ck, target=target, bits=b,
                                                                     policy="exact", method=method)} for ck in cks})
        if xs:
          _line(ax, xs, ys, sd, _STYLES[gi % 4], colors[bi], _MARKERS[gi % len(_MARKERS)], f"{name}, {b} bits")
    ax.axvline(1.0, color="grey", lw=0.6)
    ax.set(xlabel="step ratio Δ / Δ̃", ylabel=label, title=f"quantized: {_TARGET_NAMES[target]}",
           ylim=ylim)
    ax.grid(alpha=0.3)
  _legend(axes[0][-1], len(groups) * len(bits))
  fig.suptitle(f"{title} (base step: {method})" if title
               else f"{metric.title} vs step-size error (base step: {method})")
  fig.tight_layout()
  out["ratio"] = os.path.join(out_dir, "accuracy_vs_ratio.png")
  fig.savefig(out["ratio"], dpi=110, bbox_inches="tight")

  fig = Figure(figsize=(6.5, 4.6))
  ax = fig.subplots()
  for gi, (name, cks) in enumerate(groups):
    for ti, target in enumerate(targets):
      xs, ys, sd = _curve({ck: {b: r[key] for b in bits if (r := _base(rows, checkpoint=ck, target=target, bits=b,
                                                                       policy="exact", method=method))}
                           for ck in cks})
      if xs:
        _line(ax, xs, ys, sd, _STYLES[ti % 4], f"C{gi % 10}", _MARKERS[ti % len(_MARKERS)], f"{name}, {target}")
  ax.set(xlabel="bits", ylabel=label, title=f"{metric.title} vs bit-width at the base step", ylim=ylim,
         xticks=bits)
  ax.grid(alpha=0.3)
  _legend(ax, len(groups) * len(targets))
  fig.tight_layout()
  out["bits"] = os.path.join(out_dir, "accuracy_vs_bits.png")
  fig.savefig(out["bits"], dpi=110, bbox_inches="tight")

  policies = list(dict.fromkeys(r["policy"] for r in rows))
  if len(policies) > 1:
    fig = Figure(figsize=(6.5 * len(targets), 4.6))
    axes = fig.subplots(1, len(targets), squeeze=False)
    n = len(groups) * len(policies)
    width = 0.8 / n
    for ax, target in zip(axes[0], targets):
      k = 0
      for name, cks in groups:
        for pol in policies:
          xs, ys, sd = _curve({ck: {i: r[key] for i, b in enumerate(bits)
                                    if (r := _base(rows, checkpoint=ck, target=target, bits=b, policy=pol,
                                                   method=method))} for ck in cks})
          ax.bar([x + (k - (n - 1) / 2) * width for x in xs], ys, width, yerr=sd if any(sd) else None, capsize=2,
                 label=f"{name}, {pol}")
          k += 1
      ax.set(xticks=range(len(bits)), xticklabels=[f"{b} bits" for b in bits], ylabel=label, ylim=ylim,
             title=f"Exact vs power-of-two step ({_TARGET_NAMES[target]})")
      ax.grid(alpha=0.3, axis="y")
    _legend(axes[0][-1], n, beside=True)
    fig.tight_layout()
    out["pow2"] = os.path.join(out_dir, "pow2.png")
    fig.savefig(out["pow2"], dpi=110, bbox_inches="tight")
  return out
