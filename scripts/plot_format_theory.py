"""Write docs/formats_theory.png: exact MSE of integer and FP formats vs weight kurtosis, and sensitivity.

Usage (from the repository root): ``python scripts/plot_format_theory.py [out.png]``. Also prints
the numbers behind docs/formats.md as Markdown tables (about 30 s on a 2-core CPU).
"""

import math
import pathlib
import sys

from kure_jax.core import format_theory as T
from kure_jax.core.formats import SCALAR_FORMATS

if __name__ == "__main__":
  default = pathlib.Path(__file__).resolve().parent.parent / "docs" / "formats_theory.png"
  out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else default
  out.parent.mkdir(parents=True, exist_ok=True)
  data = T.plot(str(out))
  print(f"wrote {out}\n")
  shapes = ((math.inf, "1.8 (uniform)"), (2.0, "3 (Gaussian)"), (1.0, "6 (Laplace)"), (0.5, "25.2"))
  print("| format | best kurtosis | " + " | ".join(f"SQNR at κ = {n}" for _, n in shapes) + " |")
  print("| --- | ---: |" + " ---: |" * len(shapes))
  for f in SCALAR_FORMATS:
    k, _ = data["best"][f]
    sqnr = [-10 * math.log10(T.optimal_mse(f, b)) for b, _ in shapes]
    print(f"| `{f}` | {k:.2f} | " + " | ".join(f"{v:.2f} dB" for v in sqnr) + " |")
  print("\n| format | " + " | ".join(f"κ = {n}: MSE ratio at r = 0.8, 1.25; r within 1.25×" for _, n in shapes[:3])
        + " | uniform: MSE ratio at r = 0.5 |")
  print("| --- |" + " --- |" * 4)
  for f in SCALAR_FORMATS:
    cells = []
    for b, _ in shapes[:3]:
      lo_r, hi_r = T.sensitivity(f, b, [0.8, 1.25])
      band = T.tolerance_band(f, b)
      hi_txt = f"{band[1]:.2f}" if band[1] < 8 else "≥ 8"
      lo_txt = f"{band[0]:.2f}" if band[0] > 0.125 else "≤ 0.125"
      cells.append(f"{lo_r:.3g}, {hi_r:.3g}; {lo_txt}–{hi_txt}")
    half = T.sensitivity(f, math.inf, [0.5])[0]
    print(f"| `{f}` | " + " | ".join(cells) + f" | {half:.3g} |")
