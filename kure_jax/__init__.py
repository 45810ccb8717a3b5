"""kure-jax: quantization-robust training with KURE, and one-call robustness sweeps."""

from kure_jax import quant, theory
from kure_jax.kurtosis import (
    KURTOSIS_GAUSSIAN,
    KURTOSIS_LAPLACE,
    KURTOSIS_UNIFORM,
    kernel_leaves,
    kure_penalty,
    kurtosis,
    kurtosis_by_layer,
    select_kernels,
)
from kure_jax.quant import quantize

__version__ = "0.1.0"

__all__ = [
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
