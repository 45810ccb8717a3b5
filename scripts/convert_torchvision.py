"""Convert a torchvision state dict (.pth of resnet18, resnet50, mobilenet_v2) into a kure-jax checkpoint.

Usage (from the repository root, with the `torchvision` extra installed):

  python scripts/convert_torchvision.py resnet18-f37072fd.pth runs/resnet18_torchvision [--model resnet18]

then fine-tune with ``--config.init_from=runs/resnet18_torchvision`` (no torch needed
there), or skip this step with ``--config.init_from=torchvision:PATH``. All logic is in
`kure_jax.models.torchvision_weights` (``python -m kure_jax.models.torchvision_weights`` is the same).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kure_jax importable without pip install -e

from kure_jax.models.torchvision_weights import main

if __name__ == "__main__":
  sys.exit(main())
