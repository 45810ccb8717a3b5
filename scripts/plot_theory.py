"""Write docs/theory.png: MSE(Δ) and sensitivity Γ(ε) of uniform vs Gaussian weights.

Usage (from the repository root): ``python scripts/plot_theory.py [out.png]``.
"""

import pathlib
import sys

from kure_jax.core.theory import plot_sensitivity

if __name__ == "__main__":
  default = pathlib.Path(__file__).resolve().parent.parent / "docs" / "theory.png"
  out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else default
  out.parent.mkdir(parents=True, exist_ok=True)
  plot_sensitivity(str(out), bits=(2, 3, 4), sigma=1.0)
  print(f"wrote {out}")
