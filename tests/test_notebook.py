"""notebooks/kure_cifar10.ipynb, executed top to bottom (nbclient, CPU) with tiny settings on the real CIFAR-10.

The notebook reads its settings from KURE_NB_* environment variables: here two runs of 10 steps, a sweep of
2 bit-widths × 3 step ratios × exact/power-of-two steps, on the real training archive and a class-balanced slice of the real test split
(100 images per class, so the evaluations and the sweep stay within the test's time budget).
"""

import json
import tarfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from kure_jax.metrics import read_metrics
from tests.helpers import REPO, SHARED_CIFAR10

NOTEBOOK = REPO / "notebooks" / "kure_cifar10.ipynb"
TEST_PER_CLASS = 100
STEPS = 10


def real_cifar10_slice(dest: Path, per_class: int) -> Path:
  """`dest` with the real train archive (a link) and the first `per_class` real test images of each class."""
  dest.mkdir(parents=True)
  (train,) = SHARED_CIFAR10.glob("*train*.tar.gz")
  (test,) = SHARED_CIFAR10.glob("*test*.tar.gz")
  (dest / train.name).symlink_to(train)
  taken: dict[str, int] = {}
  with tarfile.open(test) as tar:
    for member in tar:
      parts = member.name.split("/")
      if not member.isfile() or len(parts) != 3 or taken.get(parts[1], 0) >= per_class:
        continue
      taken[parts[1]] = taken.get(parts[1], 0) + 1
      out = dest.joinpath(*parts)
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_bytes(tar.extractfile(member).read())
  assert len(taken) == 10 and set(taken.values()) == {per_class}, taken
  return dest


def outputs(cell) -> list[dict]:
  return cell.get("outputs", [])


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert not [c.id for c in nb.cells if c.cell_type == "code" and (outputs(c) or c.execution_count)]
  assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR10.exists(), reason=f"the real CIFAR-10 is not on this machine (expected the "
                    f"shared JPEG tarballs at {SHARED_CIFAR10}, i.e. ../shared/data/cifar10 beside the repository)")
def test_notebook_runs_on_real_cifar10(tmp_path, monkeypatch):
  workdir = tmp_path / "work"
  settings = {"DATA_DIR": real_cifar10_slice(tmp_path / "cifar10", TEST_PER_CLASS), "WORKDIR": workdir,
              "EPOCHS": 1, "MAX_STEPS": STEPS, "BATCH_SIZE": 64, "EVAL_BATCH_SIZE": 500, "BITS": "4,8",
              "RATIO_MIN": 0.8, "RATIO_MAX": 1.2, "RATIO_STEPS": 3, "POLICIES": "exact,pow2_nearest"}
  for name, value in settings.items():
    monkeypatch.setenv(f"KURE_NB_{name}", str(value))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("KURE_JAX_CACHE_DIR", str(tmp_path / "cache"))  # no decoded copies left in ~/.cache
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # raises CellExecutionError, with the cell and its traceback, if any cell fails
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()

  n_test = 10 * TEST_PER_CLASS
  final = {}
  for run in ("baseline", "kure"):
    evals = read_metrics(str(workdir / run), "eval")
    assert evals, f"{run}: no eval rows in metrics.jsonl"
    final[run] = evals[-1]
    assert final[run]["step"] == STEPS and final[run]["count"] == n_test, final[run]
    assert 0 <= final[run]["top1"] <= 100 and len(final[run]["kurtosis"]) == 18, final[run]
    assert (workdir / run / "checkpoints").is_dir()
  penalty = {run: [r["kure"] for r in read_metrics(str(workdir / run), "train")] for run in final}
  assert all(p == 0 for p in penalty["baseline"]) and all(p > 0 for p in penalty["kure"]), penalty

  sweep = workdir / "robustness"
  rows = json.loads((sweep / "robustness.json").read_text())["rows"]
  assert len(rows) == 2 * 2 * 3 * 2, rows  # checkpoints × bits × ratios × policies
  assert {(r["checkpoint"], r["bits"], r["ratio"], r["policy"]) for r in rows} == {
      (c, b, q, p) for c in ("baseline", "kure") for b in (4, 8) for q in (0.8, 1.0, 1.2)
      for p in ("exact", "pow2_nearest")}
  assert all(r["count"] == n_test for r in rows)
  for run in final:  # 8 bits at the base step scores as the float model does
    w8 = next(r for r in rows if r["checkpoint"] == run and r["bits"] == 8 and r["ratio"] == 1.0
              and r["policy"] == "exact")
    assert abs(w8["top1"] - final[run]["top1"]) <= 2.0, (w8, final[run])
  for png in ("accuracy_vs_ratio.png", "accuracy_vs_bits.png", "pow2.png"):
    assert (sweep / png).stat().st_size > 10_000, png

  # what the reader sees: the devices, the tables, the kurtosis plot and the sweep's plots inline
  shown = [o for c in nb.cells for o in outputs(c)]
  assert not [o for o in shown if o.output_type == "error"]
  text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in shown)
  assert "CpuDevice" in text, text[:2000]
  markdown = [o["data"]["text/markdown"] for o in shown if "text/markdown" in o.get("data", {})]
  assert any("| kure |" in m and "mean kurtosis" in m for m in markdown), markdown
  assert any("| kure | exact | 8 |" in m for m in markdown), markdown
  assert sum("image/png" in o.get("data", {}) for o in shown) == 4  # kurtosis bars + the sweep's three plots
