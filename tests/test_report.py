"""Report plots with seeds: one mean line per arm with a ±1 std band, the values checked against NumPy."""

import numpy as np
import pytest
from matplotlib.figure import Figure

from kure_jax import report


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
