"""The gradient-ℓ1 regularizer of Alizadeh et al. (ICLR 2020): λ·‖∇_W L‖₁ by double backprop.

Its case for quantization robustness: weight noise δ (quantization error, |δ| ≤ Δ/2)
changes the loss by about δ·∇_W L, and |δ·∇_W L| ≤ ‖δ‖_∞·‖∇_W L‖₁, so a small ℓ1 norm of
the gradient bounds the first-order damage of any quantizer. Training differentiates
through the gradient itself (double backprop), about three backward passes per step.
kure-jax offers it beside KURE (``config.reg.kind``) on the same kernels, so the two can be
compared on the same model and data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kure_jax import tree_paths


def gradient_l1(grads: Any, paths: Sequence[str]) -> jax.Array:
  """‖g‖₁ summed over the kernels at `paths` ('block/conv/kernel') of a gradient tree."""
  return sum(jnp.sum(jnp.abs(tree_paths.leaf(grads, p))) for p in paths)


def with_gradient_l1(loss_fn: Callable[..., tuple[jax.Array, Any]], params: Any, paths: Sequence[str],
                     ) -> tuple[jax.Array, jax.Array, Any]:
  """(L, ‖∇_W L‖₁ over `paths`, aux) for ``loss_fn(params) -> (L, aux)``; differentiable in params."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, gradient_l1(grads, paths), aux
