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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

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


def compare(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
  """Arm b against arm a over seeds: the difference of means, the pooled std and the verdict.

  The pooled std is √(((n_a − 1)·s_a² + (n_b − 1)·s_b²) / (n_a + n_b − 2)). The difference is a win for b
  ('better') or for a ('worse') only when it exceeds twice the pooled std; otherwise it is 'within noise'.
  With one seed per arm there is no spread to judge by: the verdict is 'one seed'.
  """
  (ma, sa, na), (mb, sb, nb) = mean_std(a), mean_std(b)
  diff = mb - ma
  if na + nb <= 2:
    return {"diff": diff, "pooled_std": None, "verdict": "one seed"}
  pooled = ((na - 1) * sa**2 + (nb - 1) * sb**2) / (na + nb - 2)
  pooled = pooled**0.5
  verdict = "within noise" if abs(diff) <= 2 * pooled else ("better" if diff > 0 else "worse")
  return {"diff": diff, "pooled_std": pooled, "verdict": verdict}


def _groups(checkpoints: Sequence[str]) -> list[tuple[str, list[str]]]:
  """(legend label, checkpoints) per plotted line: seeds of one arm are drawn as one mean line with a ±1 std band
  (labelled `arm (n seeds)`) as soon as some arm has several; otherwise one line per checkpoint."""
  arms: dict[str, list[str]] = {}
  for ck in checkpoints:
    arms.setdefault(arm_of(ck), []).append(ck)
  if all(len(v) == 1 for v in arms.values()):
    return [(ck, [ck]) for ck in checkpoints]
  return [(f"{a} ({len(v)} seeds)" if len(v) > 1 else v[0], v) for a, v in arms.items()]


def select(rows: Sequence[dict[str, Any]], **match) -> list[dict[str, Any]]:
  """The rows holding every value of `match` (e.g. ``checkpoint="kure", bits=4, policy="exact"``)."""
  return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def at_base(rows: Sequence[dict[str, Any]], **match) -> dict[str, Any] | None:
  """Of the rows matching, the one at the base step: step ratio nearest 1 (Δ̃ itself, or a format's max scaling);
  None where none match."""
  pts = select(rows, **match)
  return min(pts, key=lambda r: abs(r["ratio"] - 1.0)) if pts else None


def relative_to_best(rows: Sequence[dict[str, Any]], metric=None) -> list[dict[str, Any]]:
  """The rows of a step-ratio sweep re-expressed against each curve's accuracy-best step: within every
  (checkpoint, format, bits, method, target, policy) curve, ratio / ratio* where ratio* maximizes the metric
  (the first of ties), so 1.0 is that model's best step and the curves of models whose base steps sit at
  different distances from their best compare on one axis. Adds 'best_ratio' (ratio*) to each row."""
  metric = metric_of(rows, metric)
  best: dict[tuple, float] = {}
  for r in rows:
    key = tuple(r[k] for k in _POINT if k != "ratio")
    if key not in best or r[metric.key] > best[key][1]:
      best[key] = (r["ratio"], r[metric.key])
  out = []
  for r in rows:
    star = best[tuple(r[k] for k in _POINT if k != "ratio")][0]
    out.append({**r, "ratio": r["ratio"] / star, "best_ratio": star})
  return out


def _unique(rows, key: str) -> list:
  return list(dict.fromkeys(r[key] for r in rows))


def _policy(rows) -> str:
  """The rounding policy the ratio, bit-width and format plots draw: 'exact' where the rows hold it, else their
  first (a grid of power-of-two steps only)."""
  policies = _unique(rows, "policy")
  return "exact" if "exact" in policies else policies[0]


def mean_curve(per_checkpoint: Mapping[str, Mapping[float, float]],
               interpolate: bool = False) -> tuple[list, list[float], list[float]]:
  """{checkpoint: {x: y}} -> (xs, mean, std): the seeds' curve. At each x over the checkpoints holding it; with
  `interpolate`, each checkpoint's curve is read piecewise-linearly at every x of any of them and only the xs every
  checkpoint covers are kept (curves re-expressed per seed, e.g. relative to each model's best step, share no xs)."""
  if not interpolate:
    xs = sorted({x for d in per_checkpoint.values() for x in d})
    stats = [mean_std([d[x] for d in per_checkpoint.values() if x in d]) for x in xs]
  else:
    curves = [np.array(sorted(d.items()), dtype=float) for d in per_checkpoint.values() if d]
    xs = sorted({round(float(x), 6) for c in curves for x in c[:, 0]})
    xs = [x for x in xs if all(c[0, 0] - 1e-6 <= x <= c[-1, 0] + 1e-6 for c in curves)]
    stats = [mean_std([float(np.interp(x, c[:, 0], c[:, 1])) for c in curves]) for x in xs]
  return xs, [m for m, _, _ in stats], [s for _, s, _ in stats]


def draw_band(ax, xs, ys, sd, style: str, color, label: str, marker: str = "o", ms: float = 3,
              alpha: float = 0.15, **line) -> None:
  """A mean curve with its ±1 std band (none where every std is 0: one seed)."""
  ax.plot(xs, ys, style, color=color, marker=marker, ms=ms, label=label, **line)
  if any(sd):
    ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], color=color, alpha=alpha,
                    lw=0)


def _legend(axes, beside: bool = False) -> None:
  """One legend for a grid of axes (every label once), on the top right one: inside it (where it covers the fewest
  points) while short, beside it (saved with bbox_inches='tight') once it would cover the curves (bar charts:
  always beside, their low bars fill the corners)."""
  entries: dict[str, Any] = {}
  for ax in axes.flat:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      entries.setdefault(label, handle)
  if not entries:
    return
  ax = axes[0][-1]
  if len(entries) <= 6 and not beside:
    ax.legend(entries.values(), entries.keys(), fontsize=7, loc="best")
  else:
    ax.legend(entries.values(), entries.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              ncol=1 + len(entries) // 24)


def _save(fig, path: str, title: str) -> str:
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  return path


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_tables(rows: Sequence[dict[str, Any]], out_dir: str, meta: dict[str, Any] | None = None,
                 metric=None) -> dict[str, str]:
  """robustness.json (rows + meta, full precision) and robustness.csv (one row per checkpoint × grid point, floats
  rounded to 4 decimals; the metric columns are the task's: top1, top5 or hr@10, ndcg@10)."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "robustness.json"), "csv": os.path.join(out_dir, "robustness.csv")}
  _atomic_write(paths["json"], json.dumps({"meta": meta or {}, "rows": list(rows)}, indent=1))
  write_csv(rows, paths["csv"], metric)
  return paths


def write_csv(rows: Sequence[dict[str, Any]], path: str, metric=None) -> str:
  """The rows as robustness.csv has them (one per checkpoint × grid point, floats rounded to 4 decimals)."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=columns(metric_of(rows, metric)), extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
  _atomic_write(path, buf.getvalue())
  return path


def read_csv(path: str) -> list[dict[str, Any]]:
  """The rows of a `write_csv` file, typed back: the point's names as strings, bits and counts as ints, the rest as
  floats (rounded to 4 decimals, as written)."""
  def typed(key: str, text: str) -> Any:
    if key in _POINT and key not in ("bits", "ratio"):
      return text
    return int(text) if key in ("bits", "count") else float(text)

  with open(path, newline="") as f:
    return [{k: typed(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


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
  fmts = _unique(rows, "format")
  lines = ["| checkpoint | target | " + " | ".join(f"{_named(metric)}{f} / worst" for f in fmts) + " |",
           "| --- | --- | " + " | ".join("---:" for _ in fmts) + " |"]
  for ck in _unique(rows, "checkpoint"):
    for target in _unique(rows, "target"):
      cells = []
      for f in fmts:
        exact = select(rows, checkpoint=ck, target=target, format=f, policy="exact")
        base = at_base(exact)
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
  cell = lambda r: f"{r[key]:{spec}}" if r else "–"
  for ck in _unique(rows, "checkpoint"):
    for target in _unique(rows, "target"):
      for method in _unique(rows, "method"):
        cells = []
        for b in bits:
          exact = select(rows, checkpoint=ck, target=target, method=method, bits=b, policy="exact")
          pow2 = at_base(rows, checkpoint=ck, target=target, method=method, bits=b, policy="pow2_nearest")
          worst = min((r[key] for r in exact), default=None)
          cells.append(f"{cell(at_base(exact))} / {worst:{spec}} / {cell(pow2)}" if worst is not None else "–")
        lines.append(f"| {ck} | {target} | {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_all(rows: Sequence[dict[str, Any]], out_dir: str, title: str = "", metric=None) -> dict[str, str]:
  """accuracy_vs_ratio.png, accuracy_vs_bits.png and (with several rounding policies) pow2.png of the integer
  grid, a panel per base-step method, and formats.png (number formats) in `out_dir`, of the headline metric
  (top-1, HR@10; the file names stay); returns {plot: path} for what was drawn."""
  metric = metric_of(rows, metric)
  ints = [r for r in rows if not r.get("format")]
  fmts = [r for r in rows if r.get("format")]
  out = {}
  if ints:
    out["ratio"] = plot_ratio(ints, os.path.join(out_dir, "accuracy_vs_ratio.png"), title, metric)
    out["bits"] = plot_bits(ints, os.path.join(out_dir, "accuracy_vs_bits.png"), "", metric)
    if len(_unique(ints, "policy")) > 1:
      out["pow2"] = plot_policies(ints, os.path.join(out_dir, "pow2.png"), "", metric)
  if fmts:
    out["formats"] = plot_formats(fmts, os.path.join(out_dir, "formats.png"), title, metric)
  return out


_STYLES = ("-", "--", ":", "-.")
_MARKERS = "osD^v<>ph*"


def _dims(rows):
  """(line groups, base-step methods, targets, bits) of integer-grid rows."""
  return (_groups(_unique(rows, "checkpoint")), _unique(rows, "method"), _unique(rows, "target"),
          sorted({r["bits"] for r in rows}))


def _step(method: str, policy: str = "exact") -> str:
  return f"base step {method}" + ("" if policy == "exact" else f", {policy}")


def plot_ratio(rows: Sequence[dict[str, Any]], path: str, title: str = "", metric=None) -> str:
  """The PNG `path`: the headline metric vs the step ratio Δ/Δ̃ of integer-grid rows, a panel per base-step
  method × target, a line per checkpoint (seeds of an arm: mean, ±1 std band) and bit-width; returns `path`."""
  from matplotlib import colormaps
  from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's inline one) stays as it is

  metric = metric_of(rows, metric)
  groups, methods, targets, bits = _dims(rows)
  policy = _policy(rows)
  colors = colormaps["viridis"]([i / max(len(bits) - 1, 1) for i in range(len(bits))])
  fig = Figure(figsize=(6.5 * len(targets), 4.6 * len(methods)))
  axes = fig.subplots(len(methods), len(targets), squeeze=False)
  for row, method in zip(axes, methods):
    for ax, target in zip(row, targets):
      for gi, (name, cks) in enumerate(groups):
        for bi, b in enumerate(bits):
          xs, ys, sd = mean_curve({ck: {r["ratio"]: r[metric.key] for r in select(
              rows, checkpoint=ck, target=target, bits=b, policy=policy, method=method)} for ck in cks})
          if xs:
            draw_band(ax, xs, ys, sd, _STYLES[gi % 4], colors[bi], f"{name}, {b} bits", _MARKERS[gi % len(_MARKERS)])
      ax.axvline(1.0, color="grey", lw=0.6)
      ax.set(xlabel="step ratio Δ / Δ̃", ylabel=metric.label, ylim=(0, metric.best),
             title=f"quantized: {_TARGET_NAMES.get(target, target)} ({_step(method, policy)})")
      ax.grid(alpha=0.3)
  _legend(axes)
  return _save(fig, path, title or f"{metric.title} vs step-size error")


def plot_bits(rows: Sequence[dict[str, Any]], path: str, title: str = "", metric=None) -> str:
  """The PNG `path`: the headline metric at the base step vs bit-width of integer-grid rows, a panel per
  base-step method, a line per checkpoint (seeds of an arm: mean, ±1 std band) and target; returns `path`."""
  from matplotlib.figure import Figure

  metric = metric_of(rows, metric)
  groups, methods, targets, bits = _dims(rows)
  policy = _policy(rows)
  fig = Figure(figsize=(6.5 * len(methods), 4.6))
  axes = fig.subplots(1, len(methods), squeeze=False)
  for ax, method in zip(axes[0], methods):
    for gi, (name, cks) in enumerate(groups):
      for ti, target in enumerate(targets):
        xs, ys, sd = mean_curve({ck: {b: r[metric.key] for b in bits if (r := at_base(
            rows, checkpoint=ck, target=target, bits=b, policy=policy, method=method))} for ck in cks})
        if xs:
          draw_band(ax, xs, ys, sd, _STYLES[ti % 4], f"C{gi % 10}", f"{name}, {target}", _MARKERS[ti % len(_MARKERS)])
    ax.set(xlabel="bits", ylabel=metric.label, ylim=(0, metric.best), xticks=bits,
           title=f"{metric.title} vs bit-width ({_step(method, policy)})")
    ax.grid(alpha=0.3)
  _legend(axes)
  return _save(fig, path, title)


def plot_policies(rows: Sequence[dict[str, Any]], path: str, title: str = "", metric=None) -> str:
  """The PNG `path`: bars of the headline metric at the base step per bit-width, one per checkpoint (seeds of an
  arm: mean, ±1 std whiskers) and rounding policy (exact, power-of-two), a panel per base-step method × target;
  returns `path`."""
  from matplotlib.figure import Figure

  metric = metric_of(rows, metric)
  groups, methods, targets, bits = _dims(rows)
  series = [(name, cks, pol) for name, cks in groups for pol in _unique(rows, "policy")]
  width = 0.8 / len(series)
  fig = Figure(figsize=(6.5 * len(targets), 4.6 * len(methods)))
  axes = fig.subplots(len(methods), len(targets), squeeze=False)
  for row, method in zip(axes, methods):
    for ax, target in zip(row, targets):
      for k, (name, cks, pol) in enumerate(series):
        xs, ys, sd = mean_curve({ck: {i: r[metric.key] for i, b in enumerate(bits) if (r := at_base(
            rows, checkpoint=ck, target=target, bits=b, policy=pol, method=method))} for ck in cks})
        ax.bar([x + (k - (len(series) - 1) / 2) * width for x in xs], ys, width, yerr=sd if any(sd) else None,
               capsize=2, color=f"C{k % 10}", label=f"{name}, {pol}")
      ax.set(xticks=range(len(bits)), xticklabels=[f"{b} bits" for b in bits], ylabel=metric.label,
             ylim=(0, metric.best), title=f"Exact vs power-of-two step ({_TARGET_NAMES.get(target, target)}, "
                                          f"{_step(method)})")
      ax.grid(alpha=0.3, axis="y")
  _legend(axes, beside=True)
  return _save(fig, path, title)


def plot_formats(rows: Sequence[dict[str, Any]], path: str, title: str = "", metric=None) -> str:
  """The PNG `path`: the headline metric of every number format at its max scaling (bars; seeds of an arm: mean,
  ±1 std whiskers), and vs the scale ratio where there are several, a column per target; returns `path`."""
  from matplotlib.figure import Figure

  metric = metric_of(rows, metric)
  key, label, ylim = metric.key, metric.label, (0, metric.best)
  groups = _groups(_unique(rows, "checkpoint"))
  targets, fmts, policy = _unique(rows, "target"), _unique(rows, "format"), _policy(rows)
  n_rows = 2 if len({r["ratio"] for r in rows}) > 1 else 1
  fig = Figure(figsize=(max(6.5, 0.9 * len(fmts) + 2) * len(targets), 4.4 * n_rows))
  axes = fig.subplots(n_rows, len(targets), squeeze=False)
  width = 0.8 / len(groups)
  note = "" if policy == "exact" else f", {policy}"
  for col, target in enumerate(targets):
    ax = axes[0][col]
    for gi, (name, cks) in enumerate(groups):
      xs, ys, sd = mean_curve({ck: {i: r[key] for i, f in enumerate(fmts)
                                if (r := at_base(rows, checkpoint=ck, target=target, format=f, policy=policy))}
                           for ck in cks})
      ax.bar([x + (gi - (len(groups) - 1) / 2) * width for x in xs], ys, width, yerr=sd if any(sd) else None,
             capsize=2, color=f"C{gi % 10}", label=name)
    ax.set(xticks=range(len(fmts)), ylabel=label, ylim=ylim,
           title=f"number formats at max scaling ({_TARGET_NAMES.get(target, target)}{note})")
    ax.set_xticklabels(fmts, rotation=30, ha="right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    if n_rows == 2:
      ax = axes[1][col]
      for gi, (name, cks) in enumerate(groups):
        for fi, f in enumerate(fmts):
          xs, ys, sd = mean_curve({ck: {r["ratio"]: r[key] for r in select(rows, checkpoint=ck, target=target, format=f,
                                                                          policy=policy)} for ck in cks})
          if xs:
            draw_band(ax, xs, ys, sd, _STYLES[gi % 4], f"C{fi % 10}", f"{name}, {f}", _MARKERS[gi % len(_MARKERS)])
      ax.axvline(1.0, color="grey", lw=0.6)
      ax.set(xlabel="scale ratio (× the format's max scaling)", ylabel=label, ylim=ylim)
      ax.grid(alpha=0.3)
  _legend(axes[:1], beside=True)
  if n_rows == 2:
    _legend(axes[1:])
  return _save(fig, path, title or f"{metric.title} in number formats")


def format_choice_table(rows: Sequence[dict[str, Any]], checkpoints: Sequence[str] | None = None,
                        metric=None, floats: dict[str, float] | None = None) -> str:
  """Which model serves which number format: per target and format (at its base step: max scaling, or the
  integer grid's Δ̃, written 'int{b} grid'), each checkpoint's metric with the best in bold, then per target
  each checkpoint's mean and worst regret (best − its own) over the formats.

  The model with the smallest regret over every format is the candidate for "one model for every format";
  `checkpoints` orders the columns (e.g. by kurtosis target). With `floats` ({checkpoint: its float metric})
  the cells are each model's change from its own float value instead, so a model that starts lower in float
  is judged by what quantization costs it.
  """
  metric = metric_of(rows, metric)
  key, spec = metric.key, metric.fmt
  cks = list(checkpoints) if checkpoints is not None else _unique(rows, "checkpoint")
  exact = [r for r in rows if r.get("policy", "exact") == "exact"]
  lines = ["| target | format | " + " | ".join(cks) + " |", "| --- | --- | " + " | ".join("---:" for _ in cks) + " |"]
  for target in _unique(exact, "target"):
    of_target = select(exact, target=target)
    names = [(f, None) for f in _unique(of_target, "format") if f] + \
            [("", b) for b in sorted({r["bits"] for r in of_target if not r.get("format")}, reverse=True)]
    regrets: dict[str, list[float]] = {ck: [] for ck in cks}
    for fmt, bits in names:
      match = dict(target=target, format=fmt) if fmt else dict(target=target, format="", bits=bits)
      vals = {ck: (at_base(of_target, checkpoint=ck, **match) or {}).get(key) for ck in cks}
      if floats is not None:
        vals = {ck: None if v is None else v - floats[ck] for ck, v in vals.items()}
      got = [v for v in vals.values() if v is not None]
      if not got:
        continue
      best = max(got)
      for ck, v in vals.items():
        if v is not None:
          regrets[ck].append(best - v)
      cells = ["–" if v is None else (f"**{_signed(v, spec, floats)}**" if v == best else _signed(v, spec, floats))
               for v in vals.values()]
      lines.append(f"| {_TARGET_NAMES.get(target, target)} | {fmt or f'int{bits} grid'} | " + " | ".join(cells) + " |")
    for label, fn in (("mean regret", statistics.fmean), ("worst regret", max)):
      cells = [f"{fn(regrets[ck]):{spec}}" if regrets[ck] else "–" for ck in cks]
      lines.append(f"| {_TARGET_NAMES.get(target, target)} | *{label}* | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_format_choice(rows: Sequence[dict[str, Any]], path: str, floats: dict[str, float],
                       checkpoints: Sequence[str] | None = None, title: str = "", floor: float = -15.0,
                       metric=None) -> str:
  """The PNG `path`: what each number format costs each model, as its change from the model's own float metric
  (the cells of `format_choice_table(..., floats=...)`), bars grouped by format, a panel per target; changes
  below `floor` are cut there and written on the bar. Returns `path`."""
  from matplotlib.figure import Figure

  metric = metric_of(rows, metric)
  cks = list(checkpoints) if checkpoints is not None else _unique(rows, "checkpoint")
  exact = [r for r in rows if r.get("policy", "exact") == "exact"]
  targets = _unique(exact, "target")
  names = [(f, None) for f in _unique(exact, "format") if f] + \
          [("", b) for b in sorted({r["bits"] for r in exact if not r.get("format")}, reverse=True)]
  fig = Figure(figsize=(max(7.0, 0.75 * len(names) + 2), 3.6 * len(targets)))
  grid = fig.subplots(len(targets), 1, squeeze=False)
  width = 0.8 / len(cks)
  for ax, target in zip(grid[:, 0], targets):
    for ci, ck in enumerate(cks):
      xs, ys = [], []
      for i, (fmt, bits) in enumerate(names):
        match = dict(format=fmt) if fmt else dict(format="", bits=bits)
        r = at_base(exact, checkpoint=ck, target=target, **match)
        if r is not None:
          xs.append(i + (ci - (len(cks) - 1) / 2) * width)
          ys.append(r[metric.key] - floats[ck])
      ax.bar(xs, [max(y, floor) for y in ys], width, color=f"C{ci % 10}", label=ck)
      for x, y in zip(xs, ys):
        if y < floor:
          ax.text(x, floor, f"{y:.0f}", rotation=90, ha="center", va="bottom", fontsize=7, color="white")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f or f"int{b} grid" for f, b in names], rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(floor, 1.0), ylabel=f"{metric.label} − own float",
           title=f"what each format costs ({_TARGET_NAMES.get(target, target)})")
    ax.grid(alpha=0.3, axis="y")
  _legend(grid[:1], beside=True)
  return _save(fig, path, title)


def _signed(v: float, spec: str, signed) -> str:
  """v in `spec`, with its sign when `signed` (a change), and no '-0.0'/'+0.0' for a change that rounds to 0."""
  if signed is None:
    return f"{v:{spec}}"
  text = f"{v:+{spec}}"
  return text[1:] if float(text) == 0 else text
