"""Small shared test utilities: a generated image-folder dataset, the shared data location, the scripts as modules."""

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"


def write_class_folders(root: Path, classes: int = 2, per_class: dict | None = None, size: int = 32,
                        seed: int = 0) -> Path:
  """root/{train,test}/c<k>/<i>.png: noisy images whose mean colour depends on the class (learnable)."""
  per_class = per_class or {"train": 48, "test": 12}
  rng = np.random.default_rng(seed)
  for split, n in per_class.items():
    for k in range(classes):
      d = root / split / f"c{k}"
      d.mkdir(parents=True, exist_ok=True)
      base = np.array([40 + 170 * (k % 2), 40 + 170 * ((k // 2) % 2), 120], np.float32)
      for i in range(n):
        img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:03d}.png")
  return root


def override(config, overrides: dict):
  """Set dotted fields ('schedule.learning_rate': 0.01) of a ConfigDict; returns it."""
  for k, v in overrides.items():
    node = config
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


def load_script(name: str):
  """scripts/<name>.py imported as a module (the scripts are not a package)."""
  spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
