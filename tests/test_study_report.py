"""scripts/study_report.py: the CIFAR-10 study's report from a synthetic OUT whose verdicts are known."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from matplotlib.figure import Figure

from kure_jax.errors import UserError
from kure_jax.evaluation import report
from tests.helpers import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "..", "shared", "data", "paper")
RATIOS = [round(0.5 + 0.05 * i, 6) for i in range(21)]  # study_eval.sh's 21 ratios, as eval.py rounds them
SEEDS = ("s0", "s1", "s2")


sr = load_script("study_report")


def _workdir(out, name, top1s, kurts, done=True, train_s=()):
  """OUT/NAME as train.py leaves it: metrics.jsonl (train records, then one eval per epoch), config.json, done.
  `train_s`: seconds of each 100-step train record (batch 128), as its images/s say; none: a record without."""
  path = os.path.join(out, name)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 5, "split": "train", "loss": 1.0}) + "\n" if not train_s else "")
    for i, seconds in enumerate(train_s):
      f.write(json.dumps({"step": 100 * (i + 1), "split": "train", "loss": 1.0,
                          "images_per_s": 100 * 128 / seconds}) + "\n")
    for i, (t, k) in enumerate(zip(top1s, kurts)):
      f.write(json.dumps({"step": 10 * (i + 1), "split": "eval", "top1": t, "top5": 99.0, "loss": 0.4,
                          "count": 10000.0, "kurtosis_mean": k, "epoch": float(i + 1),
                          "kurtosis": {"layer1_0/conv1": k - 0.01, "layer1_0/conv2": k + 0.01}}) + "\n")
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"num_epochs": 3, "batch_size": 128}, f)
  if done:
    open(os.path.join(path, "done"), "w").close()


def _eval(out, name, points, preset="ours"):
  """OUT/eval_NAME as eval.py writes it: report.write_tables (its writer) of rows in Sweep.score's schema."""
  rows = [{"checkpoint": c, "format": fmt, "bits": b, "ratio": r, "policy": p, "method": m, "target": t, "top1": top1,
           "top5": 99.0, "loss": 1.0, "correct": int(round(top1 * 100)), "count": 10000}
          for c, fmt, b, r, p, m, t, top1 in points]
  meta = {"model": "resnet20", "dataset": "folder", "task": "classification", "metric": "top1",
          "checkpoints": {c: os.path.join(out, c) for c in dict.fromkeys(r["checkpoint"] for r in rows)},
          "preset": preset, "layers": "kure" if preset == "ours" else "inner_convs", "grid": {}}
  report.write_tables(rows, os.path.join(out, f"eval_{name}"), meta)
  return rows


def _pt(c, b, top1, *, r=1.0, p="exact", m="mse", t="weights"):
  return (c, "", b, r, p, m, t, top1)


# Known numbers. W2: KURE wins beyond 2× pooled std; W8 and W3: within noise; W4: better.
PTQ_W = {2: ([10.0, 10.2, 10.4], [60.0, 61.0, 62.0]), 3: ([50.0, 52.0, 54.0], [53.0, 55.0, 57.0]),
         4: ([80.0, 81.0, 82.0], [85.0, 85.5, 86.0]), 8: ([89.0, 89.2, 89.4], [89.1, 89.3, 89.5])}
PTQ_WA = {4: ([70.0, 71.0, 72.0], [75.0, 75.0, 75.0])}


def baseline_curve(r, seed):  # peaked at the base step
  return 80.0 - 100.0 * (r - 1.0) ** 2 + 0.5 * seed


def kure_curve(r, seed):  # flat, its best step at 1.1
  return 85.0 - 20.0 * (r - 1.1) ** 2 + 0.5 * seed


@pytest.fixture()
def study(tmp_path):
  out = str(tmp_path / "out")
  _workdir(out, "base", [89.5, 90.0, 90.0], [4.4, 4.5, 4.5], train_s=[3600])
  for i, s in enumerate(SEEDS):
    _workdir(out, f"baseline_{s}", [89.0, 89.1, 89.0 + 0.2 * i], [4.5, 4.5, 4.4 + 0.1 * i])
    _workdir(out, f"kure_{s}", [88.0, 88.3, 88.5 + 0.1 * i], [2.5, 1.95, 1.80 + 0.02 * i],
             train_s=[1200, 1200] if s == "s0" else ())
  _workdir(out, "kure_t2.4", [88.9] * 3, [2.5, 2.42, 2.41])
  _workdir(out, "kure_t3", [88.95] * 3, [3.1, 3.0, 3.0])
  _workdir(out, "grad_l1", [89.1] * 3, [4.3, 4.2, 4.2])
  _workdir(out, "qat_dorefa", [87.0, 87.5, 88.0], [4.3, 4.2, 4.2])
  _workdir(out, "qat_dorefa_kure", [87.0, 87.2, 87.5], [2.2, 1.9, 1.85])
  _workdir(out, "kure_t4", [88.0], [4.5], done=False)  # still training
  arms = {"baseline": 0, "kure": 1}
  pts = [_pt(f"{a}_{s}", b, PTQ_W[b][k][i]) for a, k in arms.items() for i, s in enumerate(SEEDS) for b in PTQ_W]
  pts += [_pt("base", b, 70.0 + b) for b in PTQ_W] + [_pt("grad_l1", b, 71.0 + b) for b in PTQ_W]
  _eval(out, "ptq_w_ours", pts)
  _eval(out, "ptq_wa_ours", [_pt(f"{a}_{s}", 4, PTQ_WA[4][k][i], t="both") for a, k in arms.items()
                             for i, s in enumerate(SEEDS)])
  # the authors' preset: one seed of each so far
  _eval(out, "ptq_w_authors", [_pt("baseline_s0", 4, 70.0, m="lapq"), _pt("kure_s0", 4, 78.0, m="lapq")], "authors")
  _eval(out, "ratio_ours", [_pt(f"{a}_{s}", b, f(r, i) - 20 * (b == 2), r=r) for a, f in
                            (("baseline", baseline_curve), ("kure", kure_curve)) for i, s in enumerate(SEEDS)
                            for b in (4, 2) for r in RATIOS])
  pow2 = {"exact": ([80, 81, 82], [85, 85.5, 86]), "pow2_nearest": ([70, 71, 72], [84, 84.5, 85]),
          "pow2_floor": ([60, 60, 60], [64.5, 64.5, 65.5]), "pow2_ceil": ([75, 76, 77], [77, 77.5, 78])}
  _eval(out, "pow2_ours", [_pt(f"{a}_{s}", 4, v[k][i], p=p, m="lapq") for p, v in pow2.items()
                           for a, k in arms.items() for i, s in enumerate(SEEDS)])
  ab = {"baseline_s0": (10, 70, 89.0), "kure_s0": (60, 85, 89.0), "kure_t2.4": (50, 85.5, 88.9),
        "kure_t3": (30, 84, 89.2)}
  _eval(out, "ablation_ours", [_pt(c, b, v[j], m="lapq") for c, v in ab.items() for j, b in enumerate((2, 4, 8))])
  _eval(out, "qat_bits_dorefa", [_pt(c, b, v - 30 * (b == 2) * (1 + (c == "qat_dorefa")), m="learned", t=t)
                                 for c, v in (("qat_dorefa", 88.0), ("qat_dorefa_kure", 87.5))
                                 for t in ("weights", "both") for b in (2, 4, 8)])
  _eval(out, "qat_ratio_dorefa_sliding", [_pt(c, 4, y, r=r, m="learned") for r in RATIOS for c, y in (
      ("qat_dorefa", 88.0 if r == 1.0 else 10.0 + abs(r - 1) * 20), ("qat_dorefa_kure", 87.5 - 10 * abs(r - 1)))])
  _eval(out, "formats", [(c, f, 0, 1.0, "exact", "max", t, v + (c == "kure_s0")) for c in ("baseline_s0", "kure_s0")
                         for f, v in (("int4", 80.0), ("fp4_e2m1", 82.0)) for t in ("weights",)])
  with open(os.path.join(out, "wall_times.tsv"), "w") as f:
    f.write("base\t3600\nkure_s0\t600\neval ptq_w_ours\t120\n")
  return out, str(tmp_path / "dest")


def _paper(tmp_path):
  """A tiny paper dir: the real files' columns, a few rows each (no DoReFa, no QAT files: 'not in the paper dir')."""
  d = tmp_path / "paper"
  d.mkdir()

  def write(name, header, rows):
    with open(d / f"{name}.csv", "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(header.split(","))
      w.writerows(rows)

  write("ptq_bitwidth", "series,arch,model,kurtosis_target,config_label,w_bits,a_bits,top1,published,figure_file,"
        "source_file,source_cell",
        [["table_ptq_bitwidth", "resnet50", m, k, lb, w, a, v, "True", "", "nb", "8"]
         for m, k, vals in (("baseline", "", (76.1, 71.8)), ("kure", "1.8", (76.3, 75.6)))
         for (lb, w, a), v in zip((("FP", "fp", "fp"), ("4/FP", "4", "fp")), vals)]
        + [["resnet18_kurtosis_target_sweep", "resnet18", "kure", "1.8", "w2", "2", "", "40.2", "True", "", "nb", "4"]])
  write("ptq_step_ratio_resnet50", "model,bits,act_bits,ratio,top1,calib_loss,n_eval_images_inferred,"
        "in_notebook_figure,source_file",
        [[m, "4", "fp", f"{r:.2f}", f"{v:.3f}", "1.0", "50000", "True", "pkl"]
         for m, f in (("baseline", lambda r: 71.6 - 50 * (r - 1) ** 2), ("kure", lambda r: 75.6 - 10 * (r - 1) ** 2))
         for r in (0.5, 0.7, 0.9, 1.0, 1.1, 1.3, 1.5) for v in (f(r),)])
  write("ptq_pow2_step_supp_table5", "arch,model,w_bits,a_bits,step,top1,source_file",
        [["resnet50", m, b, "fp", s, v, "pdf"] for m, b, s, v in (
            ("baseline", "4", "optimal", 71.8), ("baseline", "4", "power_of_2", 63.6), ("kure", "4", "optimal", 75.6),
            ("kure", "4", "power_of_2", 74.2))])
  return str(d)


def run(out, dest, paper, monkeypatch=None):
  figures = []
  if monkeypatch is not None:  # the figures the script saves, in order (still drawn to the file)
    real = Figure.savefig

    def savefig(self, *args, **kwargs):
      figures.append(self)
      return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
  return sr.write_report(out, dest, paper), figures


def section(text, letter):
  start = text.index(f"\n## {letter}. ")
  end = text.find("\n## ", start + 1)
  return text[start:end if end > 0 else None]


def test_claims_hold_the_known_numbers_and_verdicts(study, tmp_path, monkeypatch):
  out, dest = study
  text, figures = run(out, dest, _paper(tmp_path), monkeypatch)
  with open(os.path.join(dest, "claims.md")) as f:
    assert f.read() == text
  a = section(text, "a")
  # PTQ, ours: mean ± std over seeds; W2 wins beyond 2× pooled std (√((2·0.2² + 2·1²)/4) = 0.721), W8 does not
  assert "| baseline (λ = 0) (3 seeds) | 89.20 ± 0.20 | 89.20 ± 0.20 | 81.00 ± 1.00 | 52.00 ± 2.00 | 10.20 ± 0.20 | " \
         "71.00 ± 1.00 |" in a
  assert "| KURE K_T 1.8 (3 seeds) | 88.60 ± 0.10 | 89.30 ± 0.20 | 85.50 ± 0.50 | 55.00 ± 2.00 | 61.00 ± 1.00 | " \
         "75.00 ± 0.00 |" in a
  assert "+50.80 (2σ 1.44): better" in a and "+0.10 (2σ 0.40): within noise" in a
  assert "+3.00 (2σ 4.00): within noise" in a  # W3: a gap of 3 inside 2 × 2.0
  assert "**Verdict** (ours): supported — better at W4, W2, 4/4; within noise at W8, W3" in a
  # the authors' preset holds one seed per arm so far: no spread, no win
  assert "**Verdict** (authors): one seed (no spread to judge by): KURE ahead at W4; behind at none" in a
  assert "| baseline (λ = 0) (1 seed) | 89.00 | 70.00 |" in a  # FP: the float top-1 of the checkpoints scored
  assert "+8.00: one seed" in a and "(+8.00; one seed each)" in a
  assert "| ResNet-50 baseline | 76.1 | 71.8 | – |" in a  # the fake paper's Table 1 rows
  # step ratios: the worst over 0.7–1.3 relative to the base step is at the window's edge (0.7) for both arms
  b = section(text, "b")
  worst = {a: [f(0.7, i) for i in range(3)] for a, f in (("baseline", baseline_curve), ("kure", kure_curve))}
  assert worst["baseline"] == pytest.approx([71.0, 71.5, 72.0]) and worst["kure"] == pytest.approx([81.8, 82.3, 82.8])
  assert "| W4 | base step Δ̃ | 71.50 ± 0.50 | 82.30 ± 0.50 | +10.80 (2σ 1.00): better | 71.50 ± 0.50 | " \
         "82.30 ± 0.50 · better | 71.50 ± 0.50 | 84.70 ± 0.50 · better |" in b
  # relative to each model's best step (KURE's at 1.1): the piecewise-linear curve over ratio / 1.1, by NumPy
  xs = np.array(RATIOS) / 1.1
  kw = [min(np.interp([0.7, 1.3], xs, [kure_curve(r, i) for r in RATIOS])) for i in range(3)]
  assert f"| W4 | best step | 71.50 ± 0.50 | {np.mean(kw):.2f} ± {np.std(kw, ddof=1):.2f} |" in b
  assert "Paper (ResNet-50 PTQ" in b and "| W4 | KURE K_T 1.8 | 1.00 |" in b
  # power-of-two steps: the change from the exact step, KURE against the baseline (higher = loses less)
  c = section(text, "c")
  assert "| W4 | 2^N nearest | 81.00 ± 1.00 | -10.00 ± 0.00 | 85.50 ± 0.50 | -1.00 ± 0.00 | +9.00 (2σ 0.00): better |" \
      in c
  assert "**Verdict** (ours; better = KURE loses less): mixed — better at W4 2^N nearest; worse at W4 2^N up; " \
         "within noise at W4 2^N down" in c
  assert "| ResNet-50 | W4 | 71.8 → 63.6 (-8.2) | 75.6 → 74.2 (-1.4) |" in c
  # QAT: one model per arm, so every verdict is 'one seed'; the missing LSQ evaluation says so in one line
  d = section(text, "d")
  assert "| DoReFa W4A4 | 28.00 | 88.00 | 88.00 | 28.00 | 88.00 | 88.00 |" in d
  assert "+29.50: one seed" in d and "**Verdict** (LSQ): not run yet (eval_qat_bits_lsq)" in d
  assert "not in the paper dir (qat_bitwidth.csv)" in d
  e = section(text, "e")
  assert "| DoReFa W4A4 | 16.00 | 88.00 | 16.00 | 11.00 at 0.95 | 11.00 |" in e  # its worst next to the base step
  assert "not run yet (eval_qat_ratio_dorefa_symmetric)" in e
  # the kurtosis targets: 1.8 best at W2, 2.4 at W4, 3.0 at W8 (bold), one seed each
  f = section(text, "f")
  assert "| K_T 1.8 s0 | 1.800 | 88.50 | 89.00 | 85.00 | **60.00** |" in f
  assert "| K_T 2.4 | 2.410 | 88.90 | 88.90 | **85.50** | 50.00 |" in f
  assert "K_T 1.8 best at W2; another target best at W8 (K_T 3.0, -0.20: one seed), W4 (K_T 2.4, -0.50: one seed)" in f
  assert "**Verdict** (authors): not run yet (eval_ablation_authors)" in f
  # float cost beyond noise (89.20 ± 0.20 vs 88.60 ± 0.10), all three KURE seeds in 1.7–1.9 from epoch 3
  g = section(text, "g")
  assert "**Verdict** (float top-1, KURE − baseline): -0.60 (2σ 0.32): worse — KURE costs accuracy beyond noise" in g
  assert "3 of 3 KURE (K_T 1.8) seeds end in 1.7–1.9 (mean kurtosis 1.820 ± 0.020)" in g
  assert "| kure_s2 | 88.70 | 1.840 | yes | 3 |" in g and "kure_t4" not in g  # unfinished: left out
  assert "ResNet-50 76.1 → KURE 76.3 (+0.2)" in g
  assert "[formats.md](formats.md)" in text
  # the ratio plot draws the seeds' mean (±1 std band): KURE's W4 curve against the base step
  (fig,) = [fg for fg in figures if "step-size error, preset 'ours'" in fg.get_suptitle()]
  (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "KURE K_T 1.8 (3 seeds), W4"]
  np.testing.assert_allclose(line.get_ydata(), [np.mean([kure_curve(r, i) for i in range(3)]) for r in RATIOS])
  assert len(fig.axes) == 3 and fig.axes[2].get_ylabel() == "ImageNet top-1 (%)"  # the authors' panel beside
  for png in ("kurtosis.png", "step_ratio_ours.png", "ptq_bits_ours.png", "ptq_bits_authors.png", "pow2_ours.png",
              "ablation_ours.png", "qat_ratio.png", "qat_bits.png", "formats.png"):
    with open(os.path.join(dest, png), "rb") as fh:
      assert fh.read(8) == b"\x89PNG\r\n\x1a\n", png
    assert f"![{png[:-4]}]({png})" in text
  assert not os.path.exists(os.path.join(dest, "step_ratio_authors.png"))  # not run: not drawn
  assert os.path.exists(os.path.join(dest, "rows", "ratio_ours.csv"))
  with open(os.path.join(dest, "formats.md")) as fh:
    assert "| kure_s0 | weights | 81.0 / 81.0 | 83.0 / 83.0 |" in fh.read()


def test_models_table_and_json(study, tmp_path):
  out, dest = study
  run(out, dest, str(tmp_path / "no_paper"))
  with open(os.path.join(dest, "models.json")) as f:
    data = json.load(f)
  assert data["arms"]["kure"]["seeds"] == ["kure_s0", "kure_s1", "kure_s2"]
  assert data["arms"]["kure"]["top1"] == pytest.approx({"mean": 88.6, "std": 0.1, "n": 3})
  assert data["arms"]["baseline"]["kurtosis_mean"] == pytest.approx({"mean": 4.5, "std": 0.1, "n": 3})
  assert data["models"]["kure_t4"]["done"] is False and data["wall_times_s"]["eval ptq_w_ours"] == 120
  with open(os.path.join(dest, "models.md")) as f:
    md = f.read()
  assert "| kure_t4 | running (epoch 1 of 3) | 88.00 | 4.500 | – |" in md
  assert "| base | done | 90.00 | 4.500 | 60.0 |" in md and "| kure_t6 | not run yet | – | – | – |" in md
  # resumed: wall_times.tsv timed only its last segment (600 s); its logged throughput counts both (2 × 1200 s)
  assert "| kure_s0 | done | 88.50 | 1.800 | 40.0 |" in md and "| kure_s1 | done | 88.60 | 1.820 | – |" in md
  assert "| KURE K_T 1.8 | 3 | 88.60 ± 0.10 | 1.820 ± 0.020 |" in md
  assert "| ptq_w_ours | 2.0 |" in md and "Total: 1.70 h (1.67 h training, 0.03 h evaluations)." in md


def test_models_not_in_out_are_read_from_their_shipped_weights(tmp_path):
  """A clone without the runs: base and baseline_s0 come from weights/study_* (one with the evaluations the export
  keeps, one with the manifest's numbers only); a run in OUT wins over its shipped copy; an unshipped name stays out."""
  out, shipped = str(tmp_path / "out"), tmp_path / "weights"
  _workdir(out, "kure_s0", [88.0, 88.5], [2.0, 1.85])
  _workdir(str(shipped), "study_baseline_s0", [88.3, 88.4], [4.4, 4.33], done=False)  # as export_weights leaves it
  for name in ("study_base", "study_baseline_s0", "study_kure_s0"):
    os.makedirs(shipped / name, exist_ok=True)
    (shipped / name / "variables.msgpack").write_bytes(b"x")
  os.makedirs(shipped / "study_kure_s1")  # no variables: not shipped
  manifest = {"models": {"study_base": {"top1_float": 88.51, "kurtosis_mean": 4.34, "wall_time_s": 7200},
                         "study_baseline_s0": {"top1_float": 88.4, "kurtosis_mean": 4.33, "wall_time_s": 4029},
                         "study_kure_s0": {"top1_float": 80.0, "kurtosis_mean": 9.0},
                         "study_kure_s1": {"top1_float": 80.0, "kurtosis_mean": 9.0}}}
  (shipped / "MANIFEST.json").write_text(json.dumps(manifest))
  dest = str(tmp_path / "dest")
  sr.write_report(out, dest, None, str(shipped / "study_"))
  with open(os.path.join(dest, "models.md")) as f:
    md = f.read()
  assert "| base | shipped | 88.51 | 4.340 | 120.0 |" in md
  assert "| baseline_s0 | shipped | 88.40 | 4.330 | 67.2 |" in md  # its last evaluation, its manifest's wall time
  assert "| kure_s0 | done | 88.50 | 1.850 | – |" in md and "| kure_s1 | not run yet |" in md
  with open(os.path.join(dest, "models.json")) as f:
    data = json.load(f)
  assert data["arms"]["baseline"]["seeds"] == ["baseline_s0"]
  assert data["models"]["baseline_s0"]["trajectory"] == [[1.0, 4.4, 88.3], [2.0, 4.33, 88.4]]
  assert data["models"]["base"]["trajectory"] == []
  sr.write_report(out, dest, None)  # without shipped weights: OUT's models only
  with open(os.path.join(dest, "models.md")) as f:
    assert "| base | not run yet |" in f.read()


def test_a_fine_tune_shipped_without_its_evaluations_is_one_final_point(tmp_path, monkeypatch):
  """A fine-tune exported before the export kept its metrics: the kurtosis plot draws its manifest's final numbers
  at the end of its schedule (the manifest's num_epochs), labelled "final only", beside the full trajectories."""
  from matplotlib.figure import Figure
  out, shipped = str(tmp_path / "out"), tmp_path / "weights"
  _workdir(out, "kure_s0", [88.0, 88.5], [2.0, 1.85])
  os.makedirs(shipped / "study_baseline_s0")
  (shipped / "study_baseline_s0" / "variables.msgpack").write_bytes(b"x")
  (shipped / "MANIFEST.json").write_text(json.dumps({"models": {"study_baseline_s0": {
      "top1_float": 88.4, "kurtosis_mean": 4.33, "overrides": {"num_epochs": 15}}}}))
  drawn = {}
  monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.setdefault(os.path.basename(path), fig))
  monkeypatch.chdir(tmp_path)  # the report names the shipped folder as the user would (no machine's layout in docs)
  sr.write_report(out, str(tmp_path / "dest"), None, str(shipped / "study_"))
  with open(tmp_path / "dest" / "models.json") as f:
    assert json.load(f)["models"]["baseline_s0"]["shipped"] == os.path.join("weights", "study_baseline_s0")
  ax_k, ax_a = drawn["kurtosis.png"].axes
  lines = {ln.get_label(): ln for ln in ax_k.get_lines()}
  final = lines["baseline (λ = 0) s0 (final only)"]
  assert list(final.get_xdata()) == [15] and list(final.get_ydata()) == [4.33]
  assert [ln.get_ydata()[0] for ln in ax_a.get_lines() if ln.get_label().endswith("(final only)")] == [88.4]
  assert list(lines["KURE K_T 1.8 s0"].get_ydata()) == [2.0, 1.85]


def test_without_the_paper_dir(study, tmp_path):
  out, dest = study
  text, _ = run(out, dest, str(tmp_path / "no_paper"))
  # shown relative where it lies beside the working directory, absolute where it is further away (as here or not,
  # depending on where the clone and the temporary folders are)
  assert f"not available (no paper dir at `{sr._shown(str(tmp_path / 'no_paper'))}`): ours only" in text
  assert text.count("not available (no authors' data at") == 7  # every claim says so
  assert "| ResNet-50" not in text
  assert os.path.exists(os.path.join(dest, "step_ratio_ours.png"))


def test_a_partial_study_reports_what_ran(tmp_path):
  out = str(tmp_path / "out")
  _workdir(out, "base", [90.0], [4.5])
  _workdir(out, "kure_s0", [88.5], [1.85])
  text, _ = run(out, str(tmp_path / "dest"), str(tmp_path / "no_paper"))
  for letter, names in (("a", "eval_ptq_w_ours, eval_ptq_wa_ours, eval_ptq_w_authors, eval_ptq_wa_authors"),
                        ("b", "eval_ratio_ours, eval_ratio_authors"),
                        ("f", "eval_ablation_ours, eval_ablation_authors")):
    assert f"## {letter}. " in text and f"\n\nNot run yet ({names}).\n" in text
  assert "| kure_s0 | 88.50 | 1.850 | yes | 1 |" in section(text, "g")
  assert "1 of 1 KURE (K_T 1.8) seeds" in text
  assert os.path.exists(tmp_path / "dest" / "kurtosis.png")


def test_replaces_its_report_whole_and_refuses_other_folders(study, tmp_path, capsys):
  out, dest = study
  os.makedirs(dest)
  with open(os.path.join(dest, "claims.md"), "w") as f:
    f.write("old")
  with open(os.path.join(dest, "stale.png"), "w") as f:
    f.write("old")
  assert sr.main([out, dest, "--paper", str(tmp_path / "no_paper"), "--shipped", ""]) == 0
  assert "# The CIFAR-10 study against the paper's claims" in capsys.readouterr().out  # claims.md, printed
  assert not os.path.exists(os.path.join(dest, "stale.png"))
  assert sorted(os.listdir(tmp_path)) == ["dest", "out"]  # no temporary folder left
  other = tmp_path / "workdir"
  other.mkdir()
  (other / "metrics.jsonl").write_text("")
  with pytest.raises(UserError, match="is not a report of this script"):
    sr.write_report(out, str(other), None)
  assert (other / "metrics.jsonl").exists()


def test_bad_input_is_one_line(tmp_path, capsys):
  assert sr.main([str(tmp_path / "missing"), str(tmp_path / "dest")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "is not a folder" in err and err.count("\n") == 1
  os.makedirs(tmp_path / "empty")
  with pytest.raises(UserError, match="holds no study"):
    sr.write_report(str(tmp_path / "empty"), str(tmp_path / "dest"), None)


def test_window_and_entered():
  curve = [(0.5, 10.0), (0.75, 50.0), (1.0, 80.0), (1.25, 70.0)]
  w = sr.window(curve)
  assert w["lo"] == pytest.approx(42.0) and w["hi"] is None and w["partial"]
  assert (w["worst_at"], w["worst"]) == (0.7, pytest.approx(42.0))
  assert sr.entered([(1, 2.5, 0), (2, 1.85, 0), (3, 2.0, 0), (4, 1.88, 0), (5, 1.82, 0)]) == 4
  assert sr.entered([(1, 1.85, 0), (2, 2.0, 0)]) is None


@pytest.mark.skipif(not os.path.isdir(PAPER), reason="the authors' data (../shared/data/paper) is not on this machine")
def test_the_real_paper_numbers(study):
  out, dest = study
  text, _ = run(out, dest, PAPER)
  # README.md there: DoReFa ResNet-18 W4A4 (sweep gr21_0.7-1.3): baseline minimum 1.000 % at 0.76, KURE 58.775 % at
  # 1.03, 69.850 / 68.625 at 1.0; ResNet-50 PTQ W4 at ratio 0.7: KURE 48.462, baseline 66.436
  rows = {ln.split(" | ")[1]: ln for ln in section(text, "e").splitlines() if ln.startswith("| ResNet-18, main figure")}
  assert "| 69.85 |" in rows["DoReFa"] and rows["DoReFa"].endswith("| 1.00 at 0.76 |")
  assert "| 68.62 |" in rows["DoReFa + KURE"] and rows["DoReFa + KURE"].endswith(" at 1.03 |")
  b = section(text, "b")
  assert "| W4 | KURE K_T 1.8 | 1.20 | 48.46 at 0.70 | 48.46 |" in b
  assert "| W4 | baseline (λ = 0) | 1.00 |" in b and "| 66.44 |" in b
  assert "| ResNet-50 KURE K_T 1.8 | 76.3 | 75.6 | 73.6 | 64.2 | 76.2 | 75.8 | 74.3 | 66.5 |" in section(text, "a")


def test_an_evaluation_in_parts_reads_as_one(study, tmp_path):
  """study_eval.sh scores models as they come, each call into a part eval_NAME/N/: the report merges the parts into
  the same claims and rows as one evaluation of them all, and sums the parts' wall times."""
  out, dest = study
  whole, _ = run(out, dest, str(tmp_path / "no_paper"))
  with open(os.path.join(dest, "rows", "ptq_w_ours.csv")) as f:
    whole_rows = sorted(f.read().splitlines())
  folder = os.path.join(out, "eval_ptq_w_ours")
  with open(os.path.join(folder, "robustness.json")) as f:
    data = json.load(f)
  for name in ("robustness.json", "robustness.csv"):
    os.remove(os.path.join(folder, name))
  for part, first in ((1, True), (2, False)):
    rows = [r for r in data["rows"] if r["checkpoint"].startswith("baseline") == first]
    cks = {c: p for c, p in data["meta"]["checkpoints"].items() if c.startswith("baseline") == first}
    report.write_tables(rows, os.path.join(folder, str(part)), {**data["meta"], "checkpoints": cks})
  with open(os.path.join(out, "wall_times.tsv"), "a") as f:
    f.write("eval ptq_w_ours\t60\n")  # the second part's
  dest2 = str(tmp_path / "dest2")
  parts, _ = run(out, dest2, str(tmp_path / "no_paper"))
  assert parts == whole
  with open(os.path.join(dest2, "rows", "ptq_w_ours.csv")) as f:
    assert sorted(f.read().splitlines()) == whole_rows
  with open(os.path.join(dest2, "models.md")) as f:
    assert "| ptq_w_ours | 3.0 |" in f.read()  # 120 s + 60 s


def test_a_lost_out_keeps_the_previous_reports_evaluations(study, tmp_path):
  """OUT is not committed, the report is: a report over an OUT that lost its evaluations (a new machine) keeps the
  previous report's rows (and their wall time) for every model OUT has not scored, and OUT's newer rows replace a
  model's old ones; --fresh drops the kept rows."""
  out, dest = study
  whole, _ = run(out, dest, str(tmp_path / "no_paper"))
  with open(os.path.join(dest, "rows", "ptq_w_ours.csv")) as f:
    whole_rows = sorted(f.read().splitlines())
  lost = str(tmp_path / "lost")  # the models' runs survive (as shipped weights would); the evaluations are gone
  os.makedirs(lost)
  for name in os.listdir(out):
    if not name.startswith("eval_") and name != "wall_times.tsv":
      os.rename(os.path.join(out, name), os.path.join(lost, name))
  assert run(lost, dest, str(tmp_path / "no_paper"))[0] == whole.replace(out, lost)  # the claims, whole
  with open(os.path.join(dest, "rows", "ptq_w_ours.csv")) as f:
    assert sorted(f.read().splitlines()) == whole_rows
  with open(os.path.join(dest, "models.md")) as f:
    md = f.read()
  assert "| ptq_w_ours | 2.0 | baseline_s0, baseline_s1, baseline_s2, kure_s0, kure_s1, kure_s2, base, grad_l1 |" in md
  assert "| formats | – | baseline_s0, kure_s0 |" in md  # no wall time on record
  # a model scored in the new OUT (60 s), then the report written again and again: the kept rows' time counts once
  _eval(lost, "ptq_w_ours", [_pt("kure_t4", 4, 80.0)])
  with open(os.path.join(lost, "wall_times.tsv"), "w") as f:
    f.write("eval ptq_w_ours\t60\n")
  for _ in range(3):
    run(lost, dest, str(tmp_path / "no_paper"))
    with open(os.path.join(dest, "models.md")) as f:
      assert "| ptq_w_ours | 3.0 | baseline_s0," in f.read()  # 120 s kept + 60 s
  # and OUT lost once more: everything the last report counted is kept now (kure_t4 too), still once
  shutil.rmtree(os.path.join(lost, "eval_ptq_w_ours"))
  os.remove(os.path.join(lost, "wall_times.tsv"))
  run(lost, dest, str(tmp_path / "no_paper"))
  with open(os.path.join(dest, "models.md")) as f:
    assert "| ptq_w_ours | 3.0 | baseline_s0, baseline_s1, baseline_s2, kure_s0, kure_s1, kure_s2, base, grad_l1, " \
           "kure_t4 |" in f.read()
  # kure_s0 scored again in the new OUT (another number): its new rows replace the old, the others stay
  _eval(lost, "formats", [("kure_s0", "int4", 0, 1.0, "exact", "max", "weights", 50.0)])
  run(lost, dest, str(tmp_path / "no_paper"))
  got = {(r["checkpoint"], r["format"]): r["top1"] for r in report.read_csv(os.path.join(dest, "rows", "formats.csv"))}
  assert got == {("baseline_s0", "int4"): 80.0, ("baseline_s0", "fp4_e2m1"): 82.0, ("kure_s0", "int4"): 50.0}
  assert sr.main([lost, dest, "--paper", str(tmp_path / "no_paper"), "--shipped", "", "--fresh"]) == 0
  assert sorted(os.listdir(os.path.join(dest, "rows"))) == ["formats.csv"]  # OUT's one evaluation only
  assert [r["checkpoint"] for r in report.read_csv(os.path.join(dest, "rows", "formats.csv"))] == ["kure_s0"]


def test_study_eval_skips_the_models_the_report_holds(tmp_path):
  """scripts/study_eval.sh (DRY=1 prints its eval.py calls) does not score again a model whose rows the committed
  report holds (PUBLISHED/NAME.csv), so a lost OUT costs only the evaluations never reported; PUBLISHED= scores all."""
  import subprocess
  rows = tmp_path / "rows"
  rows.mkdir()
  report.write_csv([{"checkpoint": c, "format": "int4", "bits": 0, "ratio": 1.0, "policy": "exact", "method": "max",
                     "target": "weights", "top1": 80.0, "top5": 99.0, "loss": 1.0, "count": 10000}
                    for c in ("base", "kure_s0")], str(rows / "formats.csv"))

  def labels(published):
    env = {**os.environ, "DRY": "1", "ONLY": "formats", "PUBLISHED": published}
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "study_eval.sh"), "data", str(tmp_path / "out")],
                          env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    words = done.stdout.split()
    return [words[i + 1] for i, w in enumerate(words) if w == "--label"]

  every = ["base", "baseline_s0", "kure_s0", "kure_t2.4", "kure_t3", "kure_t4", "kure_t6"]
  assert labels(str(rows)) == [m for m in every if m not in ("base", "kure_s0")]
  assert labels("") == every
  assert labels(str(tmp_path / "nothing_here")) == every
