"""The report of the CIFAR-10 study (issue 16): every claim of the paper, ours beside the authors' numbers.

  python scripts/study_report.py OUT [DEST] [--paper DIR]

e.g. ``python scripts/study_report.py runs/study``. OUT is the folder scripts/study_train.sh and
scripts/study_eval.sh write. DEST (default docs/results/cifar10_study) receives:
- models.md / models.json: float top-1 and mean kurtosis of every model (its last evaluation), the seeds of the
  baseline and of KURE (K_T 1.8) pooled as mean ± std, and the wall times;
- claims.md: a section per claim of the paper with the paper's number (ImageNet), ours as mean ± std over seeds
  under both presets, and a verdict by `report.compare` (a win only beyond twice the pooled std);
- formats.md, the plots (PNG) and the evaluations' rows (rows/NAME.csv).
DEST is replaced as a whole: written beside it, then swapped in. The authors' numbers are read at report time from
--paper (default ../shared/data/paper beside the repository); without them the report shows ours only and says so.
Any part of the study will do: what has not run yet says so in one line. A model whose training is not in OUT is
read from its shipped weights (--shipped, default weights/study_NAME: the manifest's top-1 and kurtosis, and the
run's evaluations where the export kept them). An evaluation's rows of a model OUT has not scored are kept from the
report already in DEST (its rows/NAME.csv, committed; --fresh drops them): OUT may be lost, hours of scoring are not.
Prints claims.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kure_jax.errors import UserError  # noqa: E402
from kure_jax.evaluation import report  # noqa: E402
from kure_jax import weights  # noqa: E402
from kure_jax.metrics import read_metrics, training_seconds  # noqa: E402

FINETUNES = ("baseline_s0", "baseline_s1", "baseline_s2", "kure_s0", "kure_s1", "kure_s2", "kure_t2.4", "kure_t3",
             "kure_t4", "kure_t6", "grad_l1", "qat_dorefa", "qat_dorefa_kure", "qat_lsq", "qat_lsq_kure")
MODELS = ("base",) + FINETUNES  # scripts/study_train.sh's runs
NAMES = {"base": "base (converged)", "baseline": "baseline (λ = 0)", "kure": "KURE K_T 1.8",
         "kure_t2.4": "KURE K_T 2.4", "kure_t3": "KURE K_T 3.0", "kure_t4": "KURE K_T 4.0", "kure_t6": "KURE K_T 6.0",
         "grad_l1": "gradient-ℓ1", "qat_dorefa": "DoReFa W4A4", "qat_dorefa_kure": "DoReFa W4A4 + KURE",
         "qat_lsq": "LSQ W4A4", "qat_lsq_kure": "LSQ W4A4 + KURE"}
TARGETS = {"kure": 1.8, "kure_t2.4": 2.4, "kure_t3": 3.0, "kure_t4": 4.0, "kure_t6": 6.0}  # the arms' K_T
PRESETS = {"ours": "signed grid, MSE steps, no bias correction, KURE's layers",
           "authors": "midrise grid, LAPQ steps, per-channel mean bias correction, every conv but the first and last"}
EVALS = tuple(f"{e}_{p}" for e in ("ptq_w", "ptq_wa", "ratio", "pow2", "ablation") for p in PRESETS) + (
    "formats", "qat_bits_dorefa", "qat_bits_lsq", "qat_ratio_dorefa_symmetric", "qat_ratio_dorefa_sliding",
    "qat_ratio_lsq")  # scripts/study_eval.sh's evaluations
PAPER_FILES = ("ptq_bitwidth", "ptq_step_ratio_resnet50", "ptq_pow2_step_supp_table5", "qat_bitwidth",
               "dorefa_step_ratio_resnet18", "dorefa_step_ratio_mobilenet_v2")
ARCHS = {"resnet50": "ResNet-50", "resnet18": "ResNet-18", "mobilenet_v2": "MobileNet-V2"}
WINDOW = (0.7, 1.3)  # the step ratios the robustness claims summarize
BAND = (1.7, 1.9)  # the kurtosis KURE (K_T 1.8) should reach
EPS = 1e-6
POLICIES = {"pow2_nearest": "2^N nearest", "pow2_floor": "2^N down", "pow2_ceil": "2^N up"}


# ---------------------------------------------------------------------------------------------------------- input


class Study:
  """What OUT holds: the models' last evaluations, the evaluations' rows, the wall times, the paper's numbers."""

  def __init__(self, out: str, paper_dir: str | None, shipped: str | None = None, previous: str | None = None):
    if not os.path.isdir(out):
      raise UserError(f"{out} is not a folder; give the OUT of scripts/study_train.sh (e.g. runs/study).")
    self.out = out
    self.models = {m: info for m in MODELS
                   if (info := _model(os.path.join(out, m)) or (_shipped(shipped, m) if shipped else None))}
    self.wall = _wall_times(os.path.join(out, "wall_times.tsv"))
    self.evals: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
    # {evaluation: {"checkpoints": those whose rows the previous report gave, "wall_s": the time they took}}
    self.kept: dict[str, dict[str, Any]] = {}
    earlier = _previous(previous)
    for e in EVALS:
      rows, meta = _evaluation(out, e) or ([], {})
      old, wall = earlier.get(e, ([], None))
      scored = {r["checkpoint"] for r in rows}
      old = [r for r in old if r["checkpoint"] not in scored]
      if old:
        cks = list(dict.fromkeys(r["checkpoint"] for r in old))
        # the same rows kept as last time: last time's kept time (its total counted OUT's parts, still in OUT);
        # more rows kept (OUT lost since): last time's whole time
        seconds = wall["kept"] if wall and set(cks) == set(wall["kept_checkpoints"]) else (wall or {}).get("total")
        self.kept[e] = {"checkpoints": cks, "wall_s": seconds}
        if seconds:
          self.wall[f"eval {e}"] = self.wall.get(f"eval {e}", 0.0) + seconds
      if rows or old:
        self.evals[e] = (old + rows, meta)
    if not self.models and not self.evals:
      raise UserError(f"{out} holds no study: no evaluated model ({', '.join(MODELS[:3])}, …) and no "
                      "eval_*/robustness.json; run scripts/study_train.sh into it first.")
    self.paper_dir = _shown(paper_dir) if paper_dir else "(none given)"
    self.paper = load_paper(paper_dir) if paper_dir else None

  def rows(self, name: str) -> list[dict[str, Any]]:
    """The integer-grid rows of evaluation `name` ([] where it did not run)."""
    return [r for r in self.evals.get(name, ([], {}))[0] if not r.get("format")]

  def done(self, arm: str) -> list[str]:
    """The finished models of `arm` (its seeds), in order."""
    return [m for m, info in self.models.items() if report.arm_of(m) == arm and info["done"]]

  def floats(self, arm: str, key: str = "top1") -> list[float]:
    return [self.models[m][key] for m in self.done(arm) if self.models[m].get(key) is not None]


def _shown(path: str) -> str:
  """`path` relative to the working directory where it lies below it or beside it (no machine's layout in docs)."""
  rel = os.path.relpath(path)
  return rel if not rel.startswith(("../../", "..\\..\\")) else os.path.abspath(path)


def _model(workdir: str) -> dict[str, Any] | None:
  """The last evaluation of a train.py workdir, its trajectory and state; None where it has none."""
  records = read_metrics(workdir)
  evals = [r for r in records if r["split"] == "eval"]
  if not evals:
    return None
  last, config = evals[-1], {}
  if os.path.exists(path := os.path.join(workdir, "config.json")):
    with open(path) as f:
      config = json.load(f)
  seconds = training_seconds(records, config.get("batch_size", 0))  # 0 (no batch size known): no training time
  return {"top1": last["top1"], "kurtosis_mean": last.get("kurtosis_mean"), "kurtosis": last.get("kurtosis", {}),
          "epoch": last.get("epoch", len(evals)), "epochs": config.get("num_epochs"), "wall_s": seconds or None,
          "done": os.path.exists(os.path.join(workdir, "done")),
          "trajectory": [[e.get("epoch", i + 1), e.get("kurtosis_mean"), e["top1"]] for i, e in enumerate(evals)]}


def _shipped(prefix: str, name: str) -> dict[str, Any] | None:
  """Model `name` as shipped in `prefix`NAME (scripts/export_weights.py): the run's evaluations where the export kept
  them (its metrics.jsonl), else the manifest's float top-1 and mean kurtosis as the one point; None if not shipped."""
  folder = f"{prefix}{name}"
  if not os.path.isfile(os.path.join(folder, "variables.msgpack")):
    return None
  entry = weights.read_manifest(os.path.dirname(folder) or ".")["models"].get(os.path.basename(folder)) or {}
  info = _model(folder)
  if info is None:
    top1 = entry.get("top1_float")
    top1 = entry.get("top1_quantized") if top1 is None else top1  # a QAT model: at the setting it trained for
    if top1 is None:
      return None
    info = {"top1": top1, "kurtosis_mean": entry.get("kurtosis_mean"), "kurtosis": {},
            "epoch": None, "epochs": (entry.get("overrides") or {}).get("num_epochs"), "trajectory": []}
  return {**info, "done": True, "shipped": _shown(folder), "wall_s": entry.get("wall_time_s")}


def _evaluation(out: str, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
  """The rows and meta of OUT/eval_NAME: its parts (scripts/study_eval.sh scores the models as they come, each call
  into a part N/) merged, or one robustness.json of the whole; None where it did not run."""
  folder = os.path.join(out, f"eval_{name}")
  parts = sorted((p for p in os.listdir(folder) if p.isdigit()), key=int) if os.path.isdir(folder) else []
  paths = [p for p in [os.path.join(folder, "robustness.json")] + [os.path.join(folder, p, "robustness.json")
                                                                     for p in parts] if os.path.exists(p)]
  if not paths:
    return None
  rows: list[dict[str, Any]] = []
  meta: dict[str, Any] = {}
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    rows += [{"format": "", **r} for r in data["rows"]]  # rows from before number formats: ''
    part = data.get("meta", {})
    meta = {**part, **meta, "checkpoints": {**part.get("checkpoints", {}), **meta.get("checkpoints", {})}}
  return rows, meta


def _previous(dest: str | None) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any] | None]]:
  """{evaluation: (rows, its wall times)} of an earlier report in `dest` (its rows/NAME.csv and models.json): the
  committed copy of the evaluations, which outlives OUT (hours of scoring that a lost OUT need not repeat;
  scripts/study_eval.sh skips the models they hold). The wall times: "total" (s), and "kept" (s) and
  "kept_checkpoints", the part of it that report itself had kept; None where unknown. {} without a report."""
  folder = os.path.join(dest, "rows") if dest else ""
  if not os.path.isdir(folder):
    return {}
  data: dict[str, Any] = {}
  if os.path.exists(path := os.path.join(dest, "models.json")):
    with open(path) as f:
      data = json.load(f)
  out = {}
  for e in EVALS:
    if os.path.exists(path := os.path.join(folder, f"{e}.csv")):
      total, kept = data.get("wall_times_s", {}).get(f"eval {e}"), data.get("kept", {}).get(e, {})
      wall = {"total": total, "kept": kept.get("wall_s"), "kept_checkpoints": kept.get("checkpoints", [])}
      out[e] = (report.read_csv(path), wall if total is not None else None)
  return out


def _wall_times(path: str) -> dict[str, float]:
  """{step: seconds} of wall_times.tsv: an evaluation's parts summed, else the last time of a step run twice."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    pairs = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  out: dict[str, float] = {}
  for step, seconds in (p for p in pairs if len(p) == 2):
    out[step] = out.get(step, 0.0) * step.startswith("eval ") + float(seconds)
  return out


def load_paper(paper_dir: str) -> dict[str, list[dict[str, str]]] | None:
  """{file stem: rows} of the authors' CSVs in `paper_dir` (README.md there describes them); None without any."""
  if not os.path.isdir(paper_dir):
    return None
  out = {}
  for name in PAPER_FILES:
    path = os.path.join(paper_dir, f"{name}.csv")
    if os.path.exists(path):
      with open(path, newline="") as f:
        out[name] = list(csv.DictReader(f))
  return out or None


def paper_curve(records: Sequence[dict[str, str]], label: str, bits: int,
                match: dict[str, str]) -> list[dict[str, Any]]:
  """The authors' accuracy-vs-ratio records holding `match`, as rows of eval.py's schema (checkpoint `label`)."""
  return [{"checkpoint": label, "format": "", "bits": bits, "ratio": float(r["ratio"]), "policy": "exact",
           "method": "paper", "target": "weights", "top1": float(r["top1"])}
          for r in records if all(r.get(k) == v for k, v in match.items())]


# ------------------------------------------------------------------------------------------------------- numbers


def interp(curve: Sequence[tuple[float, float]], x: float) -> float | None:
  """The piecewise-linear curve [(ratio, accuracy)] (sorted) at x; None outside it."""
  if not curve:
    return None
  for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
    if x0 - EPS <= x <= x1 + EPS:
      return y0 if x1 - x0 < EPS else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
  return curve[0][1] if len(curve) == 1 and abs(curve[0][0] - x) < EPS else None


def window(curve: Sequence[tuple[float, float]], lo: float = WINDOW[0], hi: float = WINDOW[1]) -> dict[str, Any]:
  """Accuracy at lo, 1 and hi (None off the curve), and the worst (with its ratio) of the piecewise-linear curve over
  [lo, hi], or over the part of it the curve covers ('partial': a best step far from the base one moves the window
  off the grid)."""
  out = {"lo": interp(curve, lo), "one": interp(curve, 1.0), "hi": interp(curve, hi), "worst": None, "worst_at": None,
         "partial": False, "min": min((y for _, y in curve), default=None)}
  if not curve:
    return out
  a, b = max(lo, curve[0][0]), min(hi, curve[-1][0])
  if a <= b + EPS:
    pts = [(a, interp(curve, a)), (b, interp(curve, b))] + [(x, y) for x, y in curve if a - EPS <= x <= b + EPS]
    out["worst_at"], out["worst"] = min(pts, key=lambda p: (p[1], p[0]))
    out["partial"] = a > lo + EPS or b < hi - EPS
  return out


def curves(rows: Sequence[dict[str, Any]], **match) -> dict[str, list[tuple[float, float]]]:
  """{checkpoint: [(ratio, top-1)] sorted} of the exact-step rows matching."""
  out: dict[str, list[tuple[float, float]]] = {}
  for r in report.select(rows, policy="exact", **match):
    out.setdefault(r["checkpoint"], []).append((r["ratio"], r["top1"]))
  return {ck: sorted(v) for ck, v in out.items()}


def checkpoints(rows: Sequence[dict[str, Any]], arm: str) -> list[str]:
  """The checkpoints of `arm` (its seeds) among the rows, in order."""
  return sorted({r["checkpoint"] for r in rows if report.arm_of(r["checkpoint"]) == arm})


def arms(rows: Sequence[dict[str, Any]]) -> list[str]:
  """The arms of the rows, in the study's order."""
  present = {report.arm_of(r["checkpoint"]) for r in rows}
  order = [report.arm_of(m) for m in MODELS]
  return sorted(present, key=lambda a: (order.index(a) if a in order else len(order), a))


def values(rows: Sequence[dict[str, Any]], arm: str, **match) -> list[float]:
  """Top-1 at the base step (ratio 1, exact) of each seed of `arm` holding the point `match`."""
  out = []
  for ck in checkpoints(rows, arm):
    r = report.at_base(rows, checkpoint=ck, policy="exact", **match)
    if r is not None:
      out.append(r["top1"])
  return out


def value(rows: Sequence[dict[str, Any]], checkpoint: str, **match) -> float | None:
  """Top-1 of one checkpoint at the base step (ratio 1, exact) of the point `match`; None where it has none."""
  r = report.at_base(rows, checkpoint=checkpoint, policy="exact", **match)
  return None if r is None else r["top1"]


def ms(vals: Sequence[float | None], spec: str = ".2f", of: int | None = None) -> str:
  """'mean ± std' over the values (sample std; one value alone), '(n=k)' where fewer than `of` seeds hold one."""
  vals = [v for v in vals if v is not None]
  if not vals:
    return "–"
  m, s, n = report.mean_std(vals)
  text = f"{m:{spec}} ± {s:{spec}}" if n > 1 else f"{m:{spec}}"
  return text + (f" (n={n})" if of is not None and n < of else "")


def compare(a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, Any] | None:
  """`report.compare` of arm b against arm a over the values they hold; None where one holds none."""
  a, b = [v for v in a if v is not None], [v for v in b if v is not None]
  return report.compare(a, b) if a and b else None


def verdict_cell(c: dict[str, Any] | None) -> str:
  """'+1.23 (2σ 0.40): better'; '+1.23: one seed'; '–' without a comparison."""
  if c is None:
    return "–"
  if c["pooled_std"] is None:
    return f"{c['diff']:+.2f}: one seed"
  return f"{c['diff']:+.2f} (2σ {2 * c['pooled_std']:.2f}): {c['verdict']}"


def overall(cmps: dict[str, dict[str, Any] | None]) -> str:
  """One line from the comparisons of a claim's columns (KURE the second arm): supported (better somewhere, worse
  nowhere), not supported (the reverse), mixed, within noise, or one seed (with the sign of each difference)."""
  by: dict[str, list[str]] = {}
  for col, c in cmps.items():
    if c is not None:
      by.setdefault(c["verdict"], []).append(col)
  if not by:
    return "no data"
  if set(by) == {"one seed"}:
    ahead = [col for col in by["one seed"] if cmps[col]["diff"] > 0]
    behind = [col for col in by["one seed"] if cmps[col]["diff"] < 0]
    return ("one seed (no spread to judge by): KURE ahead at " + (", ".join(ahead) or "none")
            + "; behind at " + (", ".join(behind) or "none"))
  word = ("mixed" if "better" in by and "worse" in by else "supported" if "better" in by
          else "not supported" if "worse" in by else "within noise")
  parts = [f"{v} at {', '.join(by[v])}" for v in ("better", "worse", "within noise", "one seed") if v in by]
  return f"{word} — " + "; ".join(parts)


def why(cmps: dict[str, dict[str, Any] | None], cells: dict[str, tuple[str, str]], a: str, b: str) -> str:
  """The column of the largest difference, with both arms' numbers: the one line that explains a verdict."""
  known = {col: c for col, c in cmps.items() if c is not None}
  if not known:
    return "no comparison yet"
  col = max(known, key=lambda k: abs(known[k]["diff"]))
  c = known[col]
  noise = "one seed each" if c["pooled_std"] is None else f"2× pooled std {2 * c['pooled_std']:.2f}, {c['verdict']}"
  return f"the largest gap is at {col}: {b} {cells[col][1]} vs {a} {cells[col][0]} ({c['diff']:+.2f}; {noise})"


def table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def _method(rows: Sequence[dict[str, Any]]) -> str:
  return "/".join(m.upper() for m in dict.fromkeys(r["method"] for r in rows))


def _not_run(names: Sequence[str]) -> str:
  return "not run yet (" + ", ".join(f"eval_{n}" for n in names) + ")"


def _paper_note(study: Study, what: str) -> str:
  if study.paper is None:
    return f"Paper ({what}): not available (no authors' data at {study.paper_dir}; pass --paper DIR)."
  return f"Paper ({what}; ImageNet top-1 %, while ours is CIFAR-10 ResNet-20):"


# -------------------------------------------------------------------------------------------------------- claims


def _section(title: str, claim: str, verdicts: list[str], whys: list[str], blocks: list[str],
             missing: list[str]) -> str:
  """A claim's section: the claim, a verdict and a why per preset (or QAT method), the tables; one line where
  nothing it needs has run."""
  if not blocks:
    return f"## {title}\n\nNot run yet ({', '.join(f'eval_{n}' for n in missing)})."
  lines = [f"## {title}", "", f"*Claim:* {claim}", ""]
  lines += [f"**Verdict** ({v}  " for v in verdicts] + [""]
  lines += [f"*Why* ({w}  " for w in whys] + [""]
  return "\n".join(lines) + "\n" + "\n\n".join(blocks)


def claim_ptq(st: Study) -> str:
  """a. PTQ in Table 1's shape: FP, W8…W2 weights only, 8/8…3/3; KURE ≥ baseline."""
  verdicts, whys, blocks, missing = [], [], [], []
  for p in PRESETS:
    rows = st.rows(f"ptq_w_{p}") + st.rows(f"ptq_wa_{p}")
    if not rows:
      missing += [f"ptq_w_{p}", f"ptq_wa_{p}"]
      verdicts.append(f"{p}): {_not_run(missing[-2:])}")
      continue
    cols = [(f"W{b}", "weights", b) for b in sorted({r["bits"] for r in rows if r["target"] == "weights"},
                                                     reverse=True)]
    cols += [(f"{b}/{b}", "both", b) for b in sorted({r["bits"] for r in rows if r["target"] == "both"},
                                                      reverse=True)]
    body, cmps, cells = [], {}, {}
    fp = lambda arm: [st.models[c]["top1"] for c in checkpoints(rows, arm) if c in st.models]  # noqa: E731
    for arm in arms(rows):
      n = len(checkpoints(rows, arm))
      body.append([f"{NAMES.get(arm, arm)} ({_seeds(n)})", ms(fp(arm), of=n)]
                  + [ms(values(rows, arm, target=t, bits=b), of=n) for _, t, b in cols])
    for col, t, b in cols:
      a, k = values(rows, "baseline", target=t, bits=b), values(rows, "kure", target=t, bits=b)
      cmps[col], cells[col] = compare(a, k), (ms(a), ms(k))
    body.append(["KURE − baseline", verdict_cell(compare(fp("baseline"), fp("kure")))]
                + [verdict_cell(cmps[c]) for c, _, _ in cols])
    blocks.append(f"**{p}** preset ({PRESETS[p]}; base step {_method(rows)}): top-1 %, mean ± std over seeds\n\n"
                  + table(["model", "FP"] + [c for c, _, _ in cols], body))
    verdicts.append(f"{p}): {overall(cmps)}")
    whys.append(f"{p}): {why(cmps, cells, 'baseline', 'KURE')}")
  if not blocks:
    return _section("a. PTQ at low bit-widths (Table 1)", "", [], [], [], missing)
  blocks.append(_paper_ptq(st))
  return _section("a. PTQ at low bit-widths (Table 1)", "KURE ≥ baseline at every bit-width (W/A bits).", verdicts,
                  whys, blocks, missing)


def _paper_ptq(st: Study) -> str:
  note = _paper_note(st, "Table 1, ImageNet ResNet-50 and ResNet-18")
  recs = [r for r in (st.paper or {}).get("ptq_bitwidth", []) if r["series"] == "table_ptq_bitwidth"]
  if not recs:
    return note if st.paper is None else note + " not in the paper dir (ptq_bitwidth.csv)."
  labels = ("FP", "4/FP", "3/FP", "2/FP", "6/6", "5/5", "4/4", "3/3")
  body = []
  for arch in ("resnet50", "resnet18"):
    for model in ("baseline", "kure"):
      got = {r["config_label"]: r["top1"] for r in recs if r["arch"] == arch and r["model"] == model}
      body.append([f"{ARCHS[arch]} {'KURE K_T 1.8' if model == 'kure' else model}"]
                  + [got.get(c) or "–" for c in labels])
  return note + "\n\n" + table(["model"] + ["FP", "W4", "W3", "W2", "6/6", "5/5", "4/4", "3/3"], body)


def claim_ratio(st: Study) -> str:
  """b. Step-size robustness: accuracy over step ratios, relative to the preset's base step and to the best one."""
  lo, hi = WINDOW
  verdicts, whys, blocks, missing = [], [], [], []
  head = ["bits", "ratio relative to", f"worst {lo}–{hi}: baseline", "KURE", "KURE − baseline",
          f"at {lo}: baseline", "KURE", f"at {hi}: baseline", "KURE"]
  for p in PRESETS:
    rows = st.rows(f"ratio_{p}")
    if not rows:
      missing.append(f"ratio_{p}")
      verdicts.append(f"{p}): {_not_run(missing[-1:])}")
      continue
    body, cmps, cells, side, partial = [], {}, {}, {"lo": {}, "hi": {}}, False
    for b in sorted({r["bits"] for r in rows}, reverse=True):
      for ref, rr in (("base step Δ̃", rows), ("best step", report.relative_to_best(rows))):
        cv = curves(rr, bits=b, target="weights")
        stats = {arm: [window(cv[ck]) for ck in checkpoints(rr, arm) if ck in cv] for arm in ("baseline", "kure")}
        n = {arm: len(checkpoints(rr, arm)) for arm in stats}
        get = lambda arm, k: [s[k] for s in stats[arm]]  # noqa: E731
        mark = {arm: "†" if any(s["partial"] for s in stats[arm]) else "" for arm in stats}
        partial = partial or any(mark.values())
        col = f"W{b} ({'base' if ref.startswith('base') else 'best'})"
        cmps[col] = compare(get("baseline", "worst"), get("kure", "worst"))
        cells[col] = (ms(get("baseline", "worst")), ms(get("kure", "worst")))
        row = [f"W{b}", ref, ms(get("baseline", "worst"), of=n["baseline"]) + mark["baseline"],
               ms(get("kure", "worst"), of=n["kure"]) + mark["kure"], verdict_cell(cmps[col])]
        for k in ("lo", "hi"):
          c = side[k][col] = compare(get("baseline", k), get("kure", k))
          row += [ms(get("baseline", k), of=n["baseline"]),
                  ms(get("kure", k), of=n["kure"]) + (f" · {c['verdict']}" if c else "")]
        body.append(row)
    blocks.append(f"**{p}** preset ({PRESETS[p]}; base step Δ̃ {_method(rows)}): top-1 %, mean ± std over seeds; "
                  f"the worst of the piecewise-linear curve over {lo}–{hi}\n\n" + table(head, body)
                  + ("\n\n† over the part of the window the curve covers: a seed's best step lies far enough from "
                     "its base step that the ratios scored (0.5–1.5 of Δ̃) do not reach across the window; – where "
                     "a ratio lies off the curve." if partial else ""))
    verdicts.append(f"{p}, worst over {lo}–{hi}): {overall(cmps)}")
    whys.append(f"{p}): {why(cmps, cells, 'baseline', 'KURE')}; below the step (at {lo}): {overall(side['lo'])}; "
                f"above it (at {hi}): {overall(side['hi'])}")
  if not blocks:
    return _section("b. Robustness to the step size (Fig. 4a/b)", "", [], [], [], missing)
  blocks.append(_paper_ratio(st))
  return _section("b. Robustness to the step size (Fig. 4a/b)",
                  f"KURE's accuracy holds when the step Δ moves off its base Δ̃ (ratios {lo}–{hi}), the baseline's "
                  "does not.", verdicts, whys, blocks, missing)


def _paper_ratio(st: Study) -> str:
  lo, hi = WINDOW
  note = _paper_note(st, "ResNet-50 PTQ, weights only, Δ/Δ* with Δ* their best-accuracy base step; one run each")
  recs = (st.paper or {}).get("ptq_step_ratio_resnet50")
  if not recs:
    return note if st.paper is None else note + " not in the paper dir (ptq_step_ratio_resnet50.csv)."
  f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
  body = []
  for b in (4, 3, 2):
    for model in ("baseline", "kure"):
      rows = paper_curve(recs, model, b, {"model": model, "bits": str(b)})
      if not rows:
        continue
      best = report.relative_to_best(rows)
      cells = []
      for w in (window(curves(rows)[model]), window(curves(best)[model])):
        cells += [f(w["worst"]) + (f" at {w['worst_at']:.2f}" if w["worst"] is not None else ""), f(w["lo"]),
                  f(w["hi"])]
      body.append([f"W{b}", NAMES[model], f"{best[0]['best_ratio']:.2f}"] + cells)
  head = ["bits", "model", "best step / Δ*", f"Δ*: worst {lo}–{hi}", f"at {lo}", f"at {hi}",
          f"best step: worst {lo}–{hi}", f"at {lo}", f"at {hi}"]
  return note + "\n\n" + table(head, body)


def claim_pow2(st: Study) -> str:
  """c. Power-of-two steps on LAPQ steps: KURE loses less than the baseline."""
  verdicts, whys, blocks, missing = [], [], [], []
  for p in PRESETS:
    rows = st.rows(f"pow2_{p}")
    if not rows:
      missing.append(f"pow2_{p}")
      verdicts.append(f"{p}): {_not_run(missing[-1:])}")
      continue
    body, cmps, cells = [], {}, {}
    for b in sorted({r["bits"] for r in rows}, reverse=True):
      exact = {arm: values(rows, arm, bits=b, target="weights") for arm in ("baseline", "kure")}
      for pol, name in POLICIES.items():
        loss = {}
        for arm in ("baseline", "kure"):
          loss[arm] = []
          for ck in checkpoints(rows, arm):
            e = report.at_base(rows, checkpoint=ck, bits=b, target="weights", policy="exact")
            q = report.at_base(rows, checkpoint=ck, bits=b, target="weights", policy=pol)
            if e and q:
              loss[arm].append(q["top1"] - e["top1"])
        col = f"W{b} {name}"
        cmps[col], cells[col] = compare(loss["baseline"], loss["kure"]), (ms(loss["baseline"]), ms(loss["kure"]))
        body.append([f"W{b}", name, ms(exact["baseline"]), ms(loss["baseline"]), ms(exact["kure"]), ms(loss["kure"]),
                     verdict_cell(cmps[col])])
    blocks.append(f"**{p}** preset ({PRESETS[p]}; steps {_method(rows)}, weights only): top-1 % at the exact step "
                  "and its change when every layer's step is rounded to a power of two (mean ± std over seeds)\n\n"
                  + table(["bits", "rounding", "baseline exact", "baseline change", "KURE exact", "KURE change",
                           "KURE − baseline (change)"], body))
    verdicts.append(f"{p}; better = KURE loses less): {overall(cmps)}")
    whys.append(f"{p}): {why(cmps, cells, 'baseline', 'KURE')}")
  if not blocks:
    return _section("c. Power-of-two steps (supplementary Table 5)", "", [], [], [], missing)
  note = _paper_note(st, "supplementary Table 5, ImageNet ResNet-50 and ResNet-18, step Δ̃ rounded to the nearest "
                         "power of two, weights only")
  recs = (st.paper or {}).get("ptq_pow2_step_supp_table5")
  if recs:
    body = []
    for arch in ("resnet50", "resnet18"):
      for b in ("4", "3"):
        got = {(r["model"], r["step"]): float(r["top1"]) for r in recs if r["arch"] == arch and r["w_bits"] == b}
        cells = [f"{got[(m, 'optimal')]:.1f} → {got[(m, 'power_of_2')]:.1f} "
                 f"({got[(m, 'power_of_2')] - got[(m, 'optimal')]:+.1f})"
                 if {(m, "optimal"), (m, "power_of_2")} <= set(got) else "–" for m in ("baseline", "kure")]
        if got:
          body.append([ARCHS[arch], f"W{b}"] + cells)
    note += "\n\n" + table(["model", "bits", "baseline: optimal → 2^N (change)", "KURE: optimal → 2^N (change)"], body)
  blocks.append(note)
  return _section("c. Power-of-two steps (supplementary Table 5)",
                  "with its steps rounded to powers of two, KURE loses less accuracy than the baseline.", verdicts,
                  whys, blocks, missing)


def claim_qat_bits(st: Study) -> str:
  """d. QAT models (trained at W4A4) evaluated at other bit-widths, weights only and WkAk."""
  verdicts, whys, blocks, missing = [], [], [], []
  for q, name in (("dorefa", "DoReFa"), ("lsq", "LSQ")):
    rows = st.rows(f"qat_bits_{q}")
    if not rows:
      missing.append(f"qat_bits_{q}")
      verdicts.append(f"{name}): {_not_run(missing[-1:])}")
      continue
    cols = [(f"W{b}", "weights", b) for b in sorted({r["bits"] for r in rows if r["target"] == "weights"})]
    cols += [(f"W{b}A{b}", "both", b) for b in sorted({r["bits"] for r in rows if r["target"] == "both"})]
    plain, kure = f"qat_{q}", f"qat_{q}_kure"
    body = [[NAMES[m]] + [ms(values(rows, m, target=t, bits=b)) for _, t, b in cols] for m in (plain, kure)
            if checkpoints(rows, m)]
    pairs = {c: (values(rows, plain, target=t, bits=b), values(rows, kure, target=t, bits=b)) for c, t, b in cols}
    cmps = {c: compare(*v) for c, v in pairs.items()}
    cells = {c: (ms(v[0]), ms(v[1])) for c, v in pairs.items()}
    body.append(["KURE − plain"] + [verdict_cell(cmps[c]) for c, _, _ in cols])
    blocks.append(f"**{name}** (trained at W4A4; scored with its learned steps rescaled to each bit-width; "
                  "Wk: weights only): top-1 %\n\n" + table(["model"] + [c for c, _, _ in cols], body))
    verdicts.append(f"{name}): {overall(cmps)}")
    whys.append(f"{name}): {why(cmps, cells, name, name + ' + KURE')}")
  if not blocks:
    return _section("d. QAT at other bit-widths (Fig. 5, supplementary Fig. 1)", "", [], [], [], missing)
  note = _paper_note(st, "ImageNet; ResNet-18 DoReFa trained W4A4, activations kept at 4 bits; LSQ ResNet-18 and "
                         "ResNet-50 trained W4, weights only")
  recs = [r for r in (st.paper or {}).get("qat_bitwidth", []) if r["published"] == "True"]
  if recs:
    labels = ("w3", "w4", "w5", "w6", "w8", "w32")
    body = []
    for arch, q, trained in (("resnet18", "dorefa", "w4a4"), ("resnet18", "lsq", "w4"), ("resnet50", "lsq", "w4")):
      for model in ("baseline", "kure"):
        got = {r["w_bits"]: r["top1"] for r in recs if (r["arch"], r["qat_method"], r["trained_bit_label"],
                                                         r["model"]) == (arch, q, trained, model)}
        body.append([f"{ARCHS[arch]} {'DoReFa' if q == 'dorefa' else 'LSQ'}{' + KURE' * (model == 'kure')}"]
                    + [got.get(lb[1:]) or "–" for lb in labels])
    note += "\n\n" + table(["model", "W3", "W4 (trained)", "W5", "W6", "W8", "FP"], body)
  elif st.paper is not None:
    note += " not in the paper dir (qat_bitwidth.csv)."
  blocks.append(note)
  return _section("d. QAT at other bit-widths (Fig. 5, supplementary Fig. 1)",
                  "a QAT model trained with KURE keeps its accuracy at bit-widths it was not trained for; without "
                  "KURE it does not.", verdicts, whys, blocks, missing)


def claim_dorefa_ratio(st: Study) -> str:
  """e. The QAT models' step-ratio sensitivity: DoReFa in the authors' sliding mode and the symmetric one, LSQ."""
  lo, hi = WINDOW
  verdicts, whys, blocks, missing = [], [], [], []
  modes = (("qat_ratio_dorefa_sliding", "DoReFa, sliding (the authors': Δ = Δ̃ / X on DoReFa's grid)", "dorefa"),
           ("qat_ratio_dorefa_symmetric", "DoReFa, symmetric (Δ = X · Δ̃)", "dorefa"),
           ("qat_ratio_lsq", "LSQ (Δ = X · Δ̃)", "lsq"))
  for name, title, q in modes:
    rows = st.rows(name)
    if not rows:
      missing.append(name)
      verdicts.append(f"{title.split(' (')[0]}): {_not_run([name])}")
      continue
    plain, kure = f"qat_{q}", f"qat_{q}_kure"
    cv = curves(rows, target="weights")
    stats = {m: window(cv[m]) for m in (plain, kure) if m in cv}
    f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    body = [[NAMES[m], f(s["lo"]), f(s["one"]), f(s["hi"]),
             f(s["worst"]) + (f" at {s['worst_at']:.2f}" if s["worst"] is not None else ""), f(s["min"])]
            for m, s in stats.items()]
    cmps, cells = {}, {}
    if len(stats) == 2:
      for k, col in (("worst", f"worst {lo}–{hi}"), ("lo", f"at {lo}"), ("hi", f"at {hi}")):
        cmps[col] = compare([stats[plain][k]], [stats[kure][k]])
        cells[col] = (f(stats[plain][k]), f(stats[kure][k]))
      body.append(["KURE − plain", verdict_cell(cmps[f"at {lo}"]), "", verdict_cell(cmps[f"at {hi}"]),
                   verdict_cell(cmps[f"worst {lo}–{hi}"]), ""])
    blocks.append(f"**{title}**, W4 weights (trained W4A4, learned step Δ̃): top-1 %, X = 0.5…1.5\n\n"
                  + table(["model", f"at {lo}", "at 1.0", f"at {hi}", f"worst {lo}–{hi}", "worst 0.5–1.5"], body))
    verdicts.append(f"{title.split(' (')[0]}): {overall(cmps)}")
    whys.append(f"{title.split(' (')[0]}): {why(cmps, cells, 'plain', 'KURE')}")
  if not blocks:
    return _section("e. The QAT models' step-size sensitivity (Fig. 4c/d)", "", [], [], [], missing)
  blocks.append(_paper_dorefa(st))
  return _section("e. The QAT models' step-size sensitivity (Fig. 4c/d)",
                  f"DoReFa trained with KURE keeps its accuracy when its step is perturbed (X = {lo}–{hi}); plain "
                  "DoReFa collapses.", verdicts, whys, blocks, missing)


def _paper_dorefa(st: Study) -> str:
  lo, hi = WINDOW
  note = _paper_note(st, "DoReFa W4 on ImageNet, the authors' sliding perturbation (their X, plotted as 'Δ/Δ̃'); "
                         "ResNet-18 W4A4 on 4000 random images per point (main figure) and on the full set "
                         "(supplementary Fig. 2, three KURE runs); MobileNet-V2 W4A8 with bias correction, labels as "
                         "published (the README doubts them)")
  paper = st.paper or {}
  if not paper.get("dorefa_step_ratio_resnet18"):
    return note if st.paper is None else note + " not in the paper dir (dorefa_step_ratio_*.csv)."
  body = []
  f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
  series = (("dorefa_step_ratio_resnet18", "ResNet-18, main figure", "gr21_0.7-1.3"),
            ("dorefa_step_ratio_resnet18", "ResNet-18, supp. Fig. 2", "supp_fig2_gr21_0.7-1.3"),
            ("dorefa_step_ratio_mobilenet_v2", "MobileNet-V2", "gr61_0.7-1.3_bcwTT"))
  for file, label, sweep in series:
    recs = [r for r in paper.get(file, []) if r["sweep"] == sweep]
    for model in ("baseline", "kure"):
      runs = sorted({r.get("run", "") for r in recs if r["model"] == model})
      stats = [window(curves(paper_curve(recs, model, 4, {"model": model, **({"run": run} if run else {})}))[model])
               for run in runs]
      if not stats:
        continue
      where = ", ".join(f"{s['worst']:.2f} at {s['worst_at']:.2f}" for s in stats)
      body.append([label, "DoReFa" + " + KURE" * (model == "kure") + (f" ({len(stats)} runs)" if len(stats) > 1
                                                                      else ""),
                   ms([s["lo"] for s in stats]), ms([s["one"] for s in stats]), ms([s["hi"] for s in stats]), where])
  return note + "\n\n" + table(["series", "model", f"at {lo}", "at 1.0", f"at {hi}", f"worst {lo}–{hi} (at X)"],
                               body)


def claim_ablation(st: Study) -> str:
  """f. The kurtosis-target ablation at W2…W8: is K_T 1.8 best?"""
  verdicts, whys, blocks, missing = [], [], [], []
  for p in PRESETS:
    rows = st.rows(f"ablation_{p}")
    if not rows:
      missing.append(f"ablation_{p}")
      verdicts.append(f"{p}): {_not_run(missing[-1:])}")
      continue
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    cks = sorted({r["checkpoint"] for r in rows}, key=lambda c: (TARGETS.get(report.arm_of(c), 99), c))
    kt = [c for c in cks if report.arm_of(c) in TARGETS]
    ref = next((c for c in kt if report.arm_of(c) == "kure"), None)
    body, cmps, cells, best = [], {}, {}, {}
    for b in bits:
      pts = {c: v for c in kt if (v := value(rows, c, bits=b, target="weights")) is not None}
      if pts:
        best[b] = max(pts, key=pts.get)
      if ref in pts and best.get(b) and best[b] != ref:
        cmps[f"W{b}"] = compare([pts[best[b]]], [pts[ref]])
        cells[f"W{b}"] = (f"{pts[best[b]]:.2f} ({_label(best[b], st)})", f"{pts[ref]:.2f}")
      elif ref in pts:
        cmps[f"W{b}"] = None
    for c in cks:
      info = st.models.get(c, {})
      cells_c = []
      for b in bits:
        v = value(rows, c, bits=b, target="weights")
        cells_c.append("–" if v is None else (f"**{v:.2f}**" if best.get(b) == c else f"{v:.2f}"))
      kurt = info.get("kurtosis_mean")
      body.append([_label(c, st), "–" if kurt is None else f"{kurt:.3f}",
                   "–" if not info else f"{info['top1']:.2f}"] + cells_c)
    blocks.append(f"**{p}** preset ({PRESETS[p]}; steps {_method(rows)}, weights only): top-1 %, one seed each; bold: "
                  "the best kurtosis target at that bit-width\n\n"
                  + table(["model", "mean kurtosis", "FP"] + [f"W{b}" for b in bits], body))
    first = [f"W{b}" for b in bits if best.get(b) == ref]
    other = [f"W{b} ({_label(best[b], st)}, {verdict_cell(cmps.get(f'W{b}'))})" for b in bits
             if best.get(b) and best[b] != ref]
    verdicts.append(f"{p}): K_T 1.8 best at {', '.join(first) or 'none'}; another target best at "
                    f"{', '.join(other) or 'none'}" + ("; one seed each" if other else ""))
    whys.append(f"{p}): " + (why({k: v for k, v in cmps.items() if v}, cells, "the best other target", "K_T 1.8")
                             if other else "K_T 1.8 is the best target at every bit-width scored"))
  if not blocks:
    return _section("f. The kurtosis target (ResNet-18 sweep)", "", [], [], [], missing)
  note = _paper_note(st, "ResNet-18 PTQ sweep of the kurtosis target, weights only")
  recs = [r for r in (st.paper or {}).get("ptq_bitwidth", []) if r["series"] == "resnet18_kurtosis_target_sweep"]
  if recs:
    labels = ("w2", "w3", "w4", "w5", "w8", "w32")
    body = []
    for k in dict.fromkeys(r["kurtosis_target"] for r in recs):
      got = {r["config_label"]: r for r in recs if r["kurtosis_target"] == k}
      name = f"K_T {k}" if k else "pretrained (no KURE)"
      unpublished = any(r["published"] != "True" for r in got.values())
      body.append([name + (" (not published)" if unpublished else "")]
                  + [got[lb]["top1"] if lb in got else "–" for lb in labels])
    note += "\n\n" + table(["model", "W2", "W3", "W4", "W5", "W8", "FP"], body)
  elif st.paper is not None:
    note += " not in the paper dir (ptq_bitwidth.csv)."
  blocks.append(note)
  return _section("f. The kurtosis target (ResNet-18 sweep)",
                  "K_T 1.8 (a uniform distribution's kurtosis) gives the most robust model at W2…W8.", verdicts,
                  whys, blocks, missing)


def _label(checkpoint: str, st: Study) -> str:
  arm = report.arm_of(checkpoint)
  name = f"K_T {TARGETS[arm]:.1f}" if arm in TARGETS else NAMES.get(arm, arm)
  return name + (f" {checkpoint[len(arm) + 1:]}" if checkpoint != arm else "")


def entered(trajectory: Sequence[Sequence[float]], band: tuple[float, float] = BAND) -> float | None:
  """The epoch from which the mean kurtosis stays in `band` to the end; None if the last one is outside it."""
  epoch = None
  for e, k, _ in trajectory:
    inside = k is not None and band[0] <= k <= band[1]
    epoch = (e if epoch is None else epoch) if inside else None
  return epoch


def claim_float(st: Study) -> str:
  """g. KURE's cost at float precision, and whether its kurtosis reaches 1.8 ± 0.1."""
  lo, hi = BAND
  if not st.done("baseline") and not st.done("kure"):
    return ("## g. KURE's cost at float precision; the kurtosis it reaches\n\n"
            "Not run yet (no finished baseline_s* or kure_s*).")
  body = []
  for m, info in st.models.items():
    if not info["done"]:
      continue
    k = info["kurtosis_mean"]
    e = entered(info["trajectory"])
    body.append([m, f"{info['top1']:.2f}", "–" if k is None else f"{k:.3f}",
                 "–" if report.arm_of(m) != "kure" else ("yes" if k is not None and lo <= k <= hi else "no"),
                 "–" if e is None or report.arm_of(m) != "kure" else f"{e:g}"])
  a, k = st.floats("baseline"), st.floats("kure")
  c = compare(a, k)
  kurt = st.floats("kure", "kurtosis_mean")
  inside = [x for x in kurt if lo <= x <= hi]
  missing: list[str] = []
  verdicts = [f"float top-1, KURE − baseline): {verdict_cell(c)}" + (
      " — KURE costs accuracy beyond noise" if c and c["verdict"] == "worse" else ""),
              f"kurtosis): {len(inside)} of {len(kurt)} KURE (K_T 1.8) seeds end in {lo}–{hi} "
              f"(mean kurtosis {ms(kurt, '.3f')})"]
  whys = [f"float): KURE {ms(k)} vs baseline {ms(a)} over {len(k)} and {len(a)} seeds"]
  blocks = ["Every finished model's last evaluation: float top-1 % (QAT models: at their trained W4A4), mean kurtosis "
            f"of the regularized kernels, whether KURE K_T 1.8 ends in {lo}–{hi}, and the epoch from which it "
            "stays there\n\n" + table(["model", "top-1", "mean kurtosis", f"in {lo}–{hi}", "in the band from epoch"],
                                       body)]
  note = _paper_note(st, "Table 1's FP column, ImageNet")
  recs = [r for r in (st.paper or {}).get("ptq_bitwidth", []) if r["series"] == "table_ptq_bitwidth"
          and r["config_label"] == "FP"]
  if recs:
    got = {(r["arch"], r["model"]): float(r["top1"]) for r in recs}
    note += " " + "; ".join(f"{ARCHS[arch]} {got[(arch, 'baseline')]:.1f} → KURE {got[(arch, 'kure')]:.1f} "
                            f"({got[(arch, 'kure')] - got[(arch, 'baseline')]:+.1f})"
                            for arch in ARCHS if (arch, "baseline") in got and (arch, "kure") in got) + "."
  elif st.paper is not None:
    note += " not in the paper dir (ptq_bitwidth.csv)."
  blocks.append(note)
  return _section("g. KURE's cost at float precision; the kurtosis it reaches",
                  f"KURE costs (almost) no float accuracy, and drives the kurtosis to its target ({lo}–{hi} for "
                  "K_T 1.8).", verdicts, whys, blocks, missing)


CLAIMS = (claim_ptq, claim_ratio, claim_pow2, claim_qat_bits, claim_dorefa_ratio, claim_ablation, claim_float)


def claims_md(st: Study) -> str:
  """claims.md: the setting, then a section per claim."""
  intro = ["# The CIFAR-10 study against the paper's claims",
           f"Ours: ResNet-20 on CIFAR-10 (top-1 % on the 10,000 test images; study folder `{st.out}`), fine-tuned "
           "from one converged base; seeds pooled as mean ± sample std. The paper's numbers are ImageNet top-1 of "
           "ResNet-50, ResNet-18 or MobileNet-V2: compare shapes and gaps, not levels.",
           "Verdicts are `kure_jax.evaluation.report.compare`'s: KURE is 'better' or 'worse' only where the "
           "difference exceeds twice the pooled std of the seeds, else 'within noise'; 'one seed' where both arms "
           "have one. Presets: " + "; ".join(f"**{p}**: {d}" for p, d in PRESETS.items()) + ".",
           "Authors' numbers: " + (f"read from `{st.paper_dir}`." if st.paper else
                                   f"not available (no paper dir at `{st.paper_dir}`): ours only.")]
  parts = ["\n\n".join(intro)] + [claim(st) for claim in CLAIMS]
  parts.append("Number formats (issue 17, not a claim of the paper): "
               + ("[formats.md](formats.md)." if st.evals.get("formats") else _not_run(["formats"]) + "."))
  return "\n\n".join(p.rstrip() for p in parts) + "\n"


# -------------------------------------------------------------------------------------------------------- models


def models_json(st: Study) -> dict[str, Any]:
  pooled = {}
  for arm in ("baseline", "kure"):
    if st.done(arm):
      pooled[arm] = {"seeds": st.done(arm)}
      for key in ("top1", "kurtosis_mean"):
        m, s, n = report.mean_std(st.floats(arm, key))
        pooled[arm][key] = {"mean": m, "std": s, "n": n}
  return {"models": st.models, "arms": pooled, "wall_times_s": st.wall, "kept": st.kept}


def models_md(st: Study, data: dict[str, Any]) -> str:
  body = []
  for m in MODELS:
    info = st.models.get(m)
    if info is None:
      body.append([m, "not run yet", "–", "–", "–"])
      continue
    state = ("shipped" if info.get("shipped") else "done") if info["done"] else \
        f"running (epoch {info['epoch']:g} of {info['epochs'] or '?'})"
    k, wall = info["kurtosis_mean"], info.get("wall_s")
    body.append([m, state, f"{info['top1']:.2f}", "–" if k is None else f"{k:.3f}",
                 "–" if wall is None else f"{wall / 60:.1f}"])
  out = ["# Models of the CIFAR-10 study", "",
         "Each model's last evaluation (float top-1 % on the CIFAR-10 test set; QAT models at their trained W4A4) "
         "and the mean kurtosis of its regularized kernels; its training time, summed from the logged throughput "
         "(as the manifest's wall_time_s: every segment of a resumed run counts, per-epoch evaluations and compilation "
         "do not). 'shipped': read from its weights under weights/ (the manifest's numbers, re-evaluated at export), "
         "its run not being in this folder.",
         "",
         table(["model", "state", "top-1", "mean kurtosis", "training (min)"], body), ""]
  if data["arms"]:
    rows = [[NAMES[a], str(len(v["seeds"])), ms(st.floats(a)), ms(st.floats(a, "kurtosis_mean"), ".3f")]
            for a, v in data["arms"].items()]
    out += ["Seeds pooled (finished runs; mean ± sample std):", "",
            table(["arm", "seeds", "top-1", "mean kurtosis"], rows), ""]
  kept = {e: ", ".join(k["checkpoints"]) for e, k in st.kept.items()}
  evals = [[k[5:], f"{v / 60:.1f}", kept.get(k[5:], "–")] for k, v in st.wall.items() if k.startswith("eval ")]
  evals += [[e, "–", c] for e, c in kept.items() if f"eval {e}" not in st.wall]
  if evals:
    out += ["Evaluations ('kept': models whose rows come from the previous report's rows/NAME.csv, their run's "
            "evaluation folder being gone; the wall time counts them):", "",
            table(["evaluation", "wall (min)", "kept"], evals), ""]
  train = sum(info.get("wall_s") or 0.0 for info in st.models.values())
  evals_s = sum(v for k, v in st.wall.items() if k.startswith("eval "))
  if train or evals_s:
    out += [f"Total: {(train + evals_s) / 3600:.2f} h ({train / 3600:.2f} h training, {evals_s / 3600:.2f} h "
            "evaluations).", ""]
  return "\n".join(out)


# --------------------------------------------------------------------------------------------------------- plots

ARM_COLORS = {"baseline": "C0", "kure": "C1", "kure_t2.4": "C2", "kure_t3": "C3", "kure_t4": "C4", "kure_t6": "C5",
              "grad_l1": "C6", "qat_dorefa": "C7", "qat_dorefa_kure": "C8", "qat_lsq": "C9", "qat_lsq_kure": "k"}
BIT_COLORS = {4: "C0", 3: "C2", 2: "C3"}
SEED_STYLES = ("-", "--", ":")


def plot_kurtosis(st: Study, path: str) -> bool:
  """Mean kurtosis and top-1 vs epoch of every fine-tune, K_T 1.8 ± 0.1 shaded; False where none has run."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator, NullFormatter

  runs = [m for m in FINETUNES if m in st.models]
  if not runs:
    return False
  fig = Figure(figsize=(13, 4.6))
  ax_k, ax_a = fig.subplots(1, 2)
  for m in runs:
    arm = report.arm_of(m)
    seed = m[len(arm) + 2:] if m != arm else ""
    style = SEED_STYLES[int(seed) % 3] if seed.isdigit() else "-"
    traj = [t for t in st.models[m]["trajectory"] if t[1] is not None]
    label = NAMES.get(arm, arm) + (f" s{seed}" if seed else "")
    info, ms = st.models[m], 2
    if not traj and info["epochs"] and info["kurtosis_mean"] is not None:  # shipped without its evaluations
      traj, label, ms = [[info["epochs"], info["kurtosis_mean"], info["top1"]]], label + " (final only)", 6
    for ax, i in ((ax_k, 1), (ax_a, 2)):
      ax.plot([t[0] for t in traj], [t[i] for t in traj], style, color=ARM_COLORS.get(arm), marker="o", ms=ms,
              label=label)
  ax_k.axhspan(*BAND, color="C1", alpha=0.15, lw=0, label="K_T 1.8 ± 0.1")
  if "base" in st.models and st.models["base"]["kurtosis_mean"]:
    ax_k.axhline(st.models["base"]["kurtosis_mean"], color="0.4", lw=0.8, ls="-.", label="base (start)")
    ax_a.axhline(st.models["base"]["top1"], color="0.4", lw=0.8, ls="-.", label="base (start)")
  ax_k.set(xlabel="fine-tuning epoch", ylabel="mean kurtosis of the regularized kernels (log scale)", yscale="log",
           title="kurtosis during the fine-tunes")
  ticks = [t for t in (1.5, 1.8, 2, 2.4, 3, 4, 6, 8, 12) if ax_k.get_ylim()[0] <= t <= ax_k.get_ylim()[1]]
  ax_k.set_yticks(ticks, [f"{t:g}" for t in ticks])
  ax_k.yaxis.set_minor_formatter(NullFormatter())
  ax_a.set(xlabel="fine-tuning epoch", ylabel="CIFAR-10 top-1 (%)",
           title="float top-1 during the fine-tunes (QAT: at W4A4)")
  for ax in (ax_k, ax_a):
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  handles, labels = ax_k.get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.suptitle("ResNet-20 on CIFAR-10: the fine-tunes from the base")
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  return True


def _band(ax, rows: Sequence[dict[str, Any]], cks: Sequence[str], style: str, color: str, label: str,
          **match) -> None:
  """The seeds' mean curve (on the points every seed covers, interpolated) with a ±1 std band."""
  cv = curves(rows, **match)
  xs, m, s = report.mean_curve({ck: dict(cv[ck]) for ck in cks if ck in cv}, interpolate=True)
  if xs:
    report.draw_band(ax, xs, m, s, style, color, label, ms=2, lw=1.2, alpha=0.18)


def _seeds(n: int) -> str:
  return f"{n} seed" + "s" * (n != 1)


def _frame(ax, xlabel: str, ylabel: str, title: str) -> None:
  ax.axvline(1.0, color="grey", lw=0.6)
  ax.axvspan(*WINDOW, color="0.5", alpha=0.06, lw=0)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0.5, 1.5), ylim=(0, None))
  ax.grid(alpha=0.3)


def plot_step_ratio(st: Study, preset: str, path: str) -> bool:
  """Accuracy vs step ratio (ours, mean ± std over seeds) relative to the preset's base step and to each model's
  best step, beside the authors' ResNet-50 curves (ImageNet); False where the evaluation did not run."""
  from matplotlib.figure import Figure

  rows = st.rows(f"ratio_{preset}")
  if not rows:
    return False
  recs = (st.paper or {}).get("ptq_step_ratio_resnet50")
  fig = Figure(figsize=(5.2 * (3 if recs else 2), 4.4))
  axes = fig.subplots(1, 3 if recs else 2)
  bits = sorted({r["bits"] for r in rows}, reverse=True)
  method = _method(rows)
  for ax, rr, xlabel, title in (
      (axes[0], rows, f"step ratio Δ / Δ̃ ({method} base step)", f"ours: relative to the {method} step"),
      (axes[1], report.relative_to_best(rows), "step ratio Δ / Δ* (each model's best step)",
       "ours: relative to each model's best step")):
    for b in bits:
      for arm, style in (("baseline", "--"), ("kure", "-")):
        cks = checkpoints(rr, arm)
        _band(ax, rr, cks, style, BIT_COLORS.get(b, "k"), f"{NAMES[arm]} ({_seeds(len(cks))}), W{b}", bits=b,
              target="weights")
    _frame(ax, xlabel, "CIFAR-10 top-1 (%)", title)
  if recs:
    for b in (4, 3, 2):
      for model, style in (("baseline", "--"), ("kure", "-")):
        pr = paper_curve(recs, model, b, {"model": model, "bits": str(b)})
        _band(axes[2], pr, [model], style, BIT_COLORS[b], f"{NAMES[model]}, W{b}", bits=b)
    _frame(axes[2], "step ratio Δ / Δ* (their best-accuracy base step)", "ImageNet top-1 (%)",
           "the authors: ResNet-50 on ImageNet")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.suptitle(f"PTQ of the weights under step-size error, preset {preset!r} (ResNet-20 on CIFAR-10: seeds' mean, "
               "±1 std band)" + ("" if recs else " — the authors' curves not available"))
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  return True


def plot_dorefa(st: Study, path: str) -> bool:
  """The QAT models' accuracy vs step ratio (DoReFa sliding, symmetric; LSQ) beside the authors' ResNet-18 DoReFa
  curve; False where none of those evaluations ran."""
  from matplotlib.figure import Figure

  panels = [(n, t, q) for n, t, q in (
      ("qat_ratio_dorefa_sliding", "DoReFa, sliding (the authors' mode)", "dorefa"),
      ("qat_ratio_dorefa_symmetric", "DoReFa, symmetric", "dorefa"), ("qat_ratio_lsq", "LSQ", "lsq"))
      if st.rows(n)]
  if not panels:
    return False
  recs = [r for r in (st.paper or {}).get("dorefa_step_ratio_resnet18", []) if r["sweep"] == "gr21_0.7-1.3"]
  n = len(panels) + bool(recs)
  fig = Figure(figsize=(4.8 * n, 4.2))
  axes = fig.subplots(1, n, squeeze=False)[0]
  for ax, (name, title, q) in zip(axes, panels):
    rows = st.rows(name)
    for m, style, color in ((f"qat_{q}", "--", "C0"), (f"qat_{q}_kure", "-", "C1")):
      _band(ax, rows, [m], style, color, "plain" if m == f"qat_{q}" else "+ KURE", target="weights")
    xlabel = "scale ratio X (Δ = Δ̃ / X)" if "sliding" in name else "step ratio X (Δ = X · Δ̃)"
    _frame(ax, xlabel, "CIFAR-10 top-1 (%)", f"ours: {title}, W4")
  if recs:
    for model, style, color in (("baseline", "--", "C0"), ("kure", "-", "C1")):
      _band(axes[-1], paper_curve(recs, model, 4, {"model": model}), [model], style, color,
            "plain" if model == "baseline" else "+ KURE")
    _frame(axes[-1], "scale ratio X (their axis: 'Δ/Δ̃')", "ImageNet top-1 (%)",
           "the authors: ResNet-18 DoReFa W4A4, ImageNet")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.suptitle("QAT models (trained W4A4) under step-size error: plain (dashed) vs + KURE (solid)"
               + ("" if recs else " — the authors' curve not available"))
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  return True


def _pretty(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The rows with their arms' names for the legends ('kure_s1' -> 'KURE K_T 1.8_s1': still grouped by seed)."""
  out = []
  for r in rows:
    arm = report.arm_of(r["checkpoint"])
    out.append({**r, "checkpoint": NAMES.get(arm, arm) + r["checkpoint"][len(arm):]})
  return out


def _with_kurtosis(rows: Sequence[dict[str, Any]], st: Study) -> list[dict[str, Any]]:
  """The rows labelled by kurtosis target and reached kurtosis ('K_T 2.4 (kurtosis 2.41)'): one line per model."""
  names = {}
  for c in {r["checkpoint"] for r in rows}:
    k = st.models.get(c, {}).get("kurtosis_mean")
    names[c] = _label(c, st) + ("" if k is None else f" (kurtosis {k:.2f})")
  return [{**r, "checkpoint": names[r["checkpoint"]]} for r in rows]


def plots(st: Study, dest: str) -> list[str]:
  """Every plot the study's data allow, into `dest`; their file names."""
  out = []
  if plot_kurtosis(st, os.path.join(dest, "kurtosis.png")):
    out.append("kurtosis.png")
  title = "ResNet-20 on CIFAR-10"
  for p in PRESETS:
    if plot_step_ratio(st, p, os.path.join(dest, f"step_ratio_{p}.png")):
      out.append(f"step_ratio_{p}.png")
    ptq = _pretty(st.rows(f"ptq_w_{p}") + st.rows(f"ptq_wa_{p}"))
    if ptq:
      report.plot_bits(ptq, os.path.join(dest, f"ptq_bits_{p}.png"), f"{title}: PTQ, preset {p!r} (mean ± std)")
      out.append(f"ptq_bits_{p}.png")
    if st.rows(f"pow2_{p}"):
      report.plot_policies(_pretty(st.rows(f"pow2_{p}")), os.path.join(dest, f"pow2_{p}.png"),
                           f"{title}: power-of-two steps, preset {p!r}")
      out.append(f"pow2_{p}.png")
    ab = st.rows(f"ablation_{p}")
    if ab:
      report.plot_bits(_with_kurtosis(ab, st),
                       os.path.join(dest, f"ablation_{p}.png"), f"{title}: kurtosis targets, preset {p!r}")
      out.append(f"ablation_{p}.png")
  if plot_dorefa(st, os.path.join(dest, "qat_ratio.png")):
    out.append("qat_ratio.png")
  qat = st.rows("qat_bits_dorefa") + st.rows("qat_bits_lsq")
  if qat:
    report.plot_bits([{**r, "checkpoint": NAMES.get(r["checkpoint"], r["checkpoint"])} for r in qat],
                     os.path.join(dest, "qat_bits.png"), f"{title}: QAT models (trained W4A4) at other bit-widths")
    out.append("qat_bits.png")
  fmts = [r for r in st.evals.get("formats", ([], {}))[0] if r.get("format")]
  if fmts:
    report.plot_formats(_with_kurtosis(fmts, st), os.path.join(dest, "formats.png"), f"{title}: number formats")
    out.append("formats.png")
    all_rows, order, floats = _format_choice(st)
    if floats:
      report.plot_format_choice(all_rows, os.path.join(dest, "format_choice.png"), floats, order,
                                f"{title}: top-1 change from each model's own float, per format")
      out.append("format_choice.png")
  return out


# ---------------------------------------------------------------------------------------------------------- main


FORMAT_MODELS = ("base", "baseline_s0", "kure_t6", "kure_t4", "kure_t3", "kure_t2.4", "kure_s0")  # kurtosis falls


def _format_choice(st: Study) -> tuple[list[dict[str, Any]], list[str], dict[str, float]]:
  """The formats evaluation's rows, its models from the highest kurtosis to the lowest, and their float top-1
  ({} unless every scored model has its own)."""
  all_rows = st.evals.get("formats", ([], {}))[0]
  scored = {r["checkpoint"] for r in all_rows}
  order = [m for m in FORMAT_MODELS if m in scored] + sorted(scored - set(FORMAT_MODELS))
  floats = {m: st.models[m]["top1"] for m in order if m in st.models}
  return all_rows, order, floats if len(floats) == len(order) else {}


def formats_md(st: Study) -> str:
  all_rows, order, floats = _format_choice(st)
  rows = [r for r in all_rows if r.get("format")]
  if not rows:
    return "# Number formats\n\n" + _not_run(["formats"]) + ".\n"
  drops = ("\n\nWhat each format costs each model, as the change from its own float top-1 (a KURE model starts "
           "lower in float):\n\n" + report.format_choice_table(all_rows, order, floats=floats)
           + "\n\n![format choice](format_choice.png)") if floats else ""
  return ("# Number formats (issue 17)\n\nWhich kurtosis target serves which format: top-1 % of each format at its "
          "max scaling (per output channel; the integer grid's rows at its MSE step), the best in bold, and each "
          "model's mean and worst regret (the best model's top-1 minus its own) over the formats. Columns from "
          "the highest kurtosis to the lowest.\n\n" + report.format_choice_table(all_rows, order) + drops
          + "\n\nEach format at its max scaling / its worst over the scale ratios scored:\n\n"
          + report.formats_table(rows) + "\n\n![formats](formats.png)\n")


def write_report(out: str, dest: str, paper_dir: str | None, shipped: str | None = None, fresh: bool = False) -> str:
  """Write the study's report into `dest` (replacing it whole); return claims.md. Models not in `out` are read from
  `shipped`NAME where given; evaluation rows of models `out` has not scored, from the report already in `dest`
  (unless `fresh`)."""
  if os.path.exists(dest) and (not os.path.isdir(dest) or (os.listdir(dest) and
                                                           not os.path.exists(os.path.join(dest, "claims.md")))):
    raise UserError(f"{dest} exists and is not a report of this script (no claims.md); it would be replaced whole, "
                    "so choose another DEST.")
  st = Study(out, paper_dir, shipped, None if fresh else dest)
  tmp = f"{os.path.normpath(dest)}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    data = models_json(st)
    with open(os.path.join(tmp, "models.json"), "w") as f:
      json.dump(data, f, indent=1)
    with open(os.path.join(tmp, "models.md"), "w") as f:
      f.write(models_md(st, data))
    text = claims_md(st)
    pngs = plots(st, tmp)
    text += "\n## Plots\n\n" + ("\n".join(f"![{p[:-4]}]({p})" for p in pngs) if pngs else "none yet") + "\n"
    with open(os.path.join(tmp, "claims.md"), "w") as f:
      f.write(text)
    with open(os.path.join(tmp, "formats.md"), "w") as f:
      f.write(formats_md(st))
    for name, (rows, _) in st.evals.items():  # every part's rows in one table
      os.makedirs(os.path.join(tmp, "rows"), exist_ok=True)
      report.write_csv(rows, os.path.join(tmp, "rows", f"{name}.csv"))
    old = f"{os.path.normpath(dest)}.old{os.getpid()}"
    if os.path.exists(dest):
      os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return text


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("out", metavar="OUT", help="the study's folder (scripts/study_train.sh's and study_eval.sh's OUT)")
  p.add_argument("dest", metavar="DEST", nargs="?", default=os.path.join(ROOT, "docs", "results", "cifar10_study"))
  p.add_argument("--paper", metavar="DIR", default=os.path.join(ROOT, "..", "shared", "data", "paper"),
                 help="the authors' CSVs (default: ../shared/data/paper beside the repository)")
  p.add_argument("--shipped", metavar="PREFIX", default=os.path.join(ROOT, "weights", "study_"),
                 help="models not in OUT are read from PREFIX<name> (default: weights/study_; '' for none)")
  p.add_argument("--fresh", action="store_true",
                 help="report OUT's evaluations only, dropping the rows DEST's report kept of models OUT has not scored")
  args = p.parse_args(argv)
  try:
    text = write_report(args.out, args.dest, os.path.normpath(args.paper), args.shipped or None, args.fresh)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
