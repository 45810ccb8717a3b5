"""Report plots with seeds: one mean line per arm with a ±1 std band, the values checked against NumPy."""

import os

import numpy as np
import pytest
from matplotlib.figure import Figure

from kure_jax.evaluation import report


@pytest.mark.parametrize("name,arm", [("kure_s1", "kure"), ("baseline_s0", "baseline"), ("ncf_act_s12", "ncf_act"),
                                      ("kure-seed2", "kure"), ("resnet20", "resnet20"), ("s1", "s1"),
                                      ("pilot_kure_s1", "pilot_kure"), ("class_sx", "class_sx")])
def test_arm_of(name, arm):
  assert report.arm_of(name) == arm


def test_mean_std_is_the_sample_std():
  m, s, n = report.mean_std([1.0, 2.0, 4.0])
  assert (m, n) == (pytest.approx(7 / 3), 3) and s == pytest.approx(np.std([1, 2, 4], ddof=1))
  assert report.mean_std([5.0]) == (5.0, 0.0, 1)


def rows_of(values: dict[str, dict[float, float]], bits=4, target="weights"):
  return [{"checkpoint": ck, "format": "", "bits": bits, "ratio": ratio, "policy": "exact", "method": "mse",
           "target": target, "top1": v, "top5": 100.0, "loss": 0.0, "count": 10}
          for ck, d in values.items() for ratio, v in d.items()]


@pytest.fixture
def figures(monkeypatch):
  """The figures the report saves, in order (still drawn to the file)."""
  saved = []
  real = Figure.savefig

  def savefig(self, *args, **kwargs):
    saved.append(self)
    return real(self, *args, **kwargs)

  monkeypatch.setattr(Figure, "savefig", savefig)
  return saved


def test_seeds_of_an_arm_are_one_mean_line_with_a_std_band(tmp_path, figures):
  values = {"base_s0": {0.8: 50.0, 1.0: 60.0}, "base_s1": {0.8: 54.0, 1.0: 62.0}, "base_s2": {0.8: 58.0, 1.0: 70.0},
            "kure_s0": {0.8: 70.0, 1.0: 75.0}}
  paths = report.plot_all(rows_of(values), str(tmp_path))
  assert set(paths) == {"ratio", "bits"} and all((tmp_path / p.split("/")[-1]).stat().st_size > 0
                                                 for p in paths.values())
  ratio_ax = figures[0].axes[0]
  lines = {ln.get_label(): ln for ln in ratio_ax.get_lines() if not ln.get_label().startswith("_")}
  assert set(lines) == {"base (3 seeds), 4 bits", "kure_s0, 4 bits"}  # one arm of three seeds, one lone run
  np.testing.assert_allclose(lines["base (3 seeds), 4 bits"].get_ydata(), [np.mean([50, 54, 58]),
                                                                           np.mean([60, 62, 70])])
  np.testing.assert_allclose(lines["kure_s0, 4 bits"].get_ydata(), [70, 75])
  (band,) = ratio_ax.collections  # only the arm with seeds has a band
  top = band.get_paths()[0].vertices[:, 1].max()
  assert top == pytest.approx(np.mean([60, 62, 70]) + np.std([60, 62, 70], ddof=1))
  bits_ax = figures[1].axes[0]
  (base,) = [ln for ln in bits_ax.get_lines() if ln.get_label() == "base (3 seeds), weights"]
  np.testing.assert_allclose(base.get_ydata(), [np.mean([60, 62, 70])])  # the base step: ratio 1


def test_without_seeds_every_checkpoint_is_its_own_line(tmp_path, figures):
  report.plot_all(rows_of({"a": {1.0: 60.0}, "b": {1.0: 70.0}}), str(tmp_path))
  labels = [ln.get_label() for ln in figures[1].axes[0].get_lines()]
  assert labels == ["a, weights", "b, weights"] and not figures[1].axes[0].collections


def test_summary_header_names_bits_not_weights():
  rows = rows_of({"a": {1.0: 60.0}}, target="activations")
  table = report.summary_table(rows)
  assert "| method | 4 bits Δ̃ / worst / pow2 |" in table.splitlines()[0] and "W4" not in table


def grid_rows(methods=("mse", "lapq"), policies=("exact",), bits=(2, 4), ratios=(0.8, 1.0, 1.2)):
  """One checkpoint on an integer grid; top-1 a distinct function of every coordinate."""
  return [{"checkpoint": "a", "format": "", "bits": b, "ratio": r, "policy": p, "method": m, "target": "weights",
           "top1": 10.0 * b + 30.0 * mi + 5.0 * pi - 20.0 * abs(r - 1.0), "top5": 0.0, "loss": 0.0, "count": 1}
          for mi, m in enumerate(methods) for pi, p in enumerate(policies) for b in bits for r in ratios]


def lines_of(ax) -> dict[str, np.ndarray]:
  return {ln.get_label(): ln.get_ydata() for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def expected(rows, **match):
  """NumPy reference: the top-1 values of the matching rows, in ascending order of the x the plot uses."""
  pts = sorted((r["ratio"] if "bits" in match else r["bits"], r["top1"]) for r in rows
               if all(r[k] == v for k, v in match.items()))
  return np.array([y for _, y in pts])


def test_every_base_step_method_is_drawn_and_every_returned_file_exists(tmp_path, figures):
  rows = grid_rows(policies=("exact", "pow2_nearest"))
  paths = report.plot_all(rows, str(tmp_path))
  assert set(paths) == {"ratio", "bits", "pow2"} and all(os.path.getsize(p) > 0 for p in paths.values())
  ratio, bits, pow2 = figures
  for method in ("mse", "lapq"):
    (ax,) = [ax for ax in ratio.axes if f"base step {method}" in ax.get_title()]
    got = lines_of(ax)
    assert set(got) == {"a, 2 bits", "a, 4 bits"}
    for b in (2, 4):
      np.testing.assert_allclose(got[f"a, {b} bits"], expected(rows, method=method, bits=b, policy="exact"))
    (ax,) = [ax for ax in bits.axes if f"base step {method}" in ax.get_title()]
    np.testing.assert_allclose(lines_of(ax)["a, weights"], expected(rows, method=method, ratio=1.0, policy="exact"))
    (ax,) = [ax for ax in pow2.axes if f"base step {method}" in ax.get_title()]
    heights = [bar.get_height() for c in ax.containers for bar in c]  # exact at 2, 4 bits, then pow2_nearest
    want = [expected(rows, method=method, ratio=1.0, policy=p) for p in ("exact", "pow2_nearest")]
    np.testing.assert_allclose(heights, np.concatenate(want))


def test_a_grid_without_exact_steps_draws_its_policy(tmp_path, figures):
  rows = grid_rows(methods=("mse",), policies=("pow2_ceil",))
  assert set(report.plot_all(rows, str(tmp_path))) == {"ratio", "bits"}
  ax = figures[0].axes[0]
  assert "pow2_ceil" in ax.get_title()
  np.testing.assert_allclose(lines_of(ax)["a, 4 bits"], expected(rows, bits=4))


def test_every_number_format_is_drawn(tmp_path, figures):
  fmts = ("int4", "mxfp4", "nvfp4")
  rows = [{"checkpoint": "a", "format": f, "bits": 0, "ratio": r, "policy": "exact", "method": "max",
           "target": "weights", "top1": 40.0 + 7.0 * i + 10.0 * r, "top5": 0.0, "loss": 0.0, "count": 1}
          for i, f in enumerate(fmts) for r in (0.5, 1.0)]
  assert set(report.plot_all(rows, str(tmp_path))) == {"formats"}
  bars, curves = figures[0].axes
  np.testing.assert_allclose([b.get_height() for b in bars.containers[0]], [40.0 + 7.0 * i + 10.0 for i in range(3)])
  assert [t.get_text() for t in bars.get_xticklabels()] == list(fmts)
  got = lines_of(curves)
  for i, f in enumerate(fmts):
    np.testing.assert_allclose(got[f"a, {f}"], [40.0 + 7.0 * i + 5.0, 40.0 + 7.0 * i + 10.0])


def test_summary_has_a_row_per_method_and_at_base_is_the_ratio_nearest_one():
  rows = grid_rows()
  assert report.at_base(rows, method="lapq", bits=4)["top1"] == 70.0 and report.at_base(rows, bits=3) is None
  assert len(report.select(rows, method="lapq", bits=2)) == 3
  table = report.summary_table(rows)
  assert "| a | weights | mse | 20.0 / 16.0 / – | 40.0 / 36.0 / – |" in table
  assert "| a | weights | lapq | 50.0 / 46.0 / – | 70.0 / 66.0 / – |" in table


def test_compare_pooled_std_rule():
  a, b = [70.1, 70.9, 69.5], [72.4, 73.0, 71.9]
  got = report.compare(a, b)
  sa, sb = np.std(a, ddof=1), np.std(b, ddof=1)
  pooled = np.sqrt((2 * sa**2 + 2 * sb**2) / 4)
  assert got["pooled_std"] == pytest.approx(pooled, rel=1e-12)
  assert got["diff"] == pytest.approx(np.mean(b) - np.mean(a), rel=1e-12)
  assert got["verdict"] == "better"  # 2.27 > 2 · 0.63
  assert report.compare(b, a)["verdict"] == "worse"
  close = report.compare(a, [70.6, 71.5, 70.0])  # +0.53 with pooled 0.73
  assert close["verdict"] == "within noise"
  assert report.compare([70.0], [75.0]) == {"diff": 5.0, "pooled_std": None, "verdict": "one seed"}
  # unequal seed counts: the n − 1 weights
  got = report.compare([1.0, 2.0], [3.0, 5.0, 7.0])
  assert got["pooled_std"] == pytest.approx(np.sqrt((1 * 0.5 + 2 * 4.0) / 3), rel=1e-12)


def test_relative_to_best():
  ratios = [0.8, 0.9, 1.0, 1.1, 1.2]
  acc = {"a": [50.0, 70.0, 80.0, 85.0, 84.0], "b": [60.0, 75.0, 75.0, 70.0, 65.0]}  # b ties: the first wins
  rows = [dict(checkpoint=c, format="", bits=4, ratio=r, policy="exact", method="mse", target="weights", top1=t)
          for c in acc for r, t in zip(ratios, acc[c])]
  got = report.relative_to_best(rows)
  for c, star in (("a", 1.1), ("b", 0.9)):
    mine = [r for r in got if r["checkpoint"] == c]
    np.testing.assert_allclose([r["ratio"] for r in mine], np.asarray(ratios) / star, rtol=1e-12)
    assert {r["best_ratio"] for r in mine} == {star}
    assert [r["top1"] for r in mine] == acc[c]
  assert rows[0]["ratio"] == 0.8  # the input rows are left as they were


def test_format_choice_table_bolds_the_best_and_sums_the_regret():
  def row(ck, fmt, bits, top1, ratio=1.0, target="weights"):
    return dict(checkpoint=ck, format=fmt, bits=bits, ratio=ratio, policy="exact", method="max" if fmt else "mse",
                target=target, top1=top1)

  rows = [row("k18", "fp4_e2m1", 0, 80.0), row("k3", "fp4_e2m1", 0, 84.0), row("k18", "fp4_e2m1", 0, 10.0, 0.8),
          row("k18", "mxfp4", 0, 70.0), row("k3", "mxfp4", 0, 66.0),
          row("k18", "", 4, 90.0), row("k3", "", 4, 88.5), row("k18", "", 3, 50.0)]
  lines = report.format_choice_table(rows, ["k18", "k3"]).splitlines()
  assert lines[0] == "| target | format | k18 | k3 |"
  assert lines[2] == "| weights | fp4_e2m1 | 80.0 | **84.0** |"   # the base step (ratio 1), not the 0.8 point
  assert lines[3] == "| weights | mxfp4 | **70.0** | 66.0 |"
  assert lines[4] == "| weights | int4 grid | **90.0** | 88.5 |"
  assert lines[5] == "| weights | int3 grid | **50.0** | – |"
  # regrets: k18 (4, 0, 0, 0) -> mean 1.0, worst 4.0; k3 (0, 4, 1.5) -> mean 1.833, worst 4.0
  assert lines[6] == "| weights | *mean regret* | 1.0 | 1.8 |"
  assert lines[7] == "| weights | *worst regret* | 4.0 | 4.0 |"

  # against each model's own float top-1: on fp4 k18 (float 91) loses 11.0, k3 (float 85) loses 1.0
  drops = report.format_choice_table(rows, ["k18", "k3"], floats={"k18": 91.0, "k3": 85.0}).splitlines()
  assert drops[2] == "| weights | fp4_e2m1 | -11.0 | **-1.0** |"
  assert drops[4] == "| weights | int4 grid | -1.0 | **+3.5** |"
  assert report.format_choice_table([row("k", "int8", 0, 90.96)], ["k"], floats={"k": 91.0}).splitlines()[2] == \
      "| weights | int8 | **0.0** |"  # a change that rounds to zero has no sign


def test_plot_format_choice_writes_its_png(tmp_path, figures):
  rows = [dict(checkpoint=ck, format=f, bits=0, ratio=1.0, policy="exact", method="max", target=t, top1=v)
          for ck, v in (("a", 80.0), ("b", 60.0)) for f in ("fp4_e2m1", "mxfp4") for t in ("weights", "both")]
  path = report.plot_format_choice(rows, str(tmp_path / "choice.png"), floats={"a": 90.0, "b": 90.0})
  assert path == str(tmp_path / "choice.png") and os.path.getsize(path) > 10_000


def test_mean_curve_plain_and_interpolated():
  """Seeds' curves: plain, over the checkpoints holding each x; interpolated, every seed read at the shared xs."""
  seeds = {"a": {0.5: 10.0, 1.0: 20.0}, "b": {0.6: 14.0, 1.2: 26.0}}
  xs, mean, std = report.mean_curve(seeds)
  assert xs == [0.5, 0.6, 1.0, 1.2] and mean == [10.0, 14.0, 20.0, 26.0] and std == [0.0] * 4
  xs, mean, std = report.mean_curve(seeds, interpolate=True)
  assert xs == [0.6, 1.0]  # 0.5 and 1.2: outside one seed's curve
  np.testing.assert_allclose(mean, [13.0, 21.0])  # a(0.6) = 12, b(1.0) = 14 + 12 · 0.4 / 0.6 = 22
  np.testing.assert_allclose(std, [np.sqrt(2.0)] * 2)  # sample std of two values 2 apart


def test_read_csv_returns_the_rows_write_csv_wrote(tmp_path):
  """The round trip the study report relies on when only its committed rows are left: every column typed back,
  floats as written (4 decimals), the extra keys robustness.json has (correct) dropped."""
  rows = [{"checkpoint": "kure_s0", "format": "", "bits": 4, "ratio": 0.550000011920929, "policy": "exact",
           "method": "mse", "target": "weights", "top1": 86.31999969482422, "top5": 99.5, "loss": 0.47123456,
           "correct": 8632, "count": 10000},
          {"checkpoint": "base", "format": "nvfp4", "bits": 0, "ratio": 1.0, "policy": "exact", "method": "max",
           "target": "both", "top1": 80.0, "top5": 98.0, "loss": 1.0, "correct": 8000, "count": 10000}]
  path = report.write_csv(rows, str(tmp_path / "rows.csv"))
  back = report.read_csv(path)
  assert back == [{"checkpoint": "kure_s0", "format": "", "bits": 4, "ratio": 0.55, "policy": "exact",
                   "method": "mse", "target": "weights", "top1": 86.32, "top5": 99.5, "loss": 0.4712, "count": 10000},
                  {**{k: v for k, v in rows[1].items() if k != "correct"}}]
  assert [type(back[0][k]) for k in ("bits", "ratio", "top1", "count", "format")] == [int, float, float, int, str]
  assert report.read_csv(report.write_csv([], str(tmp_path / "empty.csv"))) == []
