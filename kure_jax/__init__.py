"""kure-jax: quantization-robust training with KURE, and one-call robustness sweeps."""

from kure_jax.core import quant, theory
from kure_jax.core.kurtosis import (
    KURTOSIS_GAUSSIAN,
    KURTOSIS_LAPLACE,
    KURTOSIS_UNIFORM,
    kernel_leaves,
    kure_penalty,
    kurtosis,
    kurtosis_by_layer,
    select_kernels,
)
from kure_jax.core.quant import quantize

__version__ = "0.1.0"

# Entry points that pull in Flax, optax, orbax or the data pipeline load on first use (PEP 562), so
# `import kure_jax` stays light.
_LAZY = {
    "formats": ("kure_jax.core.formats", None),
    "fake_quantize": ("kure_jax.core.formats", "fake_quantize"),
    "Grid": ("kure_jax.evaluation.robustness", "Grid"),
    "Sweep": ("kure_jax.evaluation.robustness", "Sweep"),
    "run_eval": ("kure_jax.evaluation.evaluate", "run_eval"),
    "train_and_evaluate": ("kure_jax.training.train", "train_and_evaluate"),
    "load_variables": ("kure_jax.checkpoint", "load_variables"),
    "get_model": ("kure_jax.models", "get_model"),
}


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module 'kure_jax' has no attribute {name!r}")
  import importlib

  module, attr = _LAZY[name]
  value = importlib.import_module(module)
  return value if attr is None else getattr(value, attr)


__all__ = [
    "Grid",
    "Sweep",
    "fake_quantize",
    "formats",
    "get_model",
    "load_variables",
    "run_eval",
    "train_and_evaluate",
    "KURTOSIS_GAUSSIAN",
    "KURTOSIS_LAPLACE",
    "KURTOSIS_UNIFORM",
    "kernel_leaves",
    "kure_penalty",
    "kurtosis",
    "kurtosis_by_layer",
    "quant",
    "quantize",
    "select_kernels",
    "theory",
]
