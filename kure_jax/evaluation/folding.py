"""BatchNorm folding: merge each inference-mode BatchNorm into the conv (or dense) feeding it.

An accelerator quantizes the folded kernel W' = W·γ/√(σ²+ε), not W, so post-training
quantization that wants to match deployment quantizes W'. Folding here is a pure
function of the variables: the model class is unchanged. Each folded BatchNorm is left
in place as the identity plus the folded bias (scale 1, mean 0, variance 1 − ε, bias
β − γμ/√(σ²+ε)), so ``model.apply(folded, x)`` computes the same function (up to float
rounding) with the quantization hook now seeing W'.

Which BatchNorm follows which conv is read off the model itself (a conv whose output is
the BatchNorm's input, found by intercepting one abstract forward pass), so there is no
per-architecture name table.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kure_jax import tree_paths
from kure_jax.models.layers import QConv, QDense


def conv_bn_pairs(model: nn.Module, variables: dict, image_shape: tuple[int, ...]) -> list[tuple[tuple, tuple, float]]:
  """[(conv module path, BatchNorm module path, ε)] for every BatchNorm fed directly by a conv/dense."""
  calls: list[tuple[nn.Module, tuple, Any, Any]] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, (QConv, QDense, nn.BatchNorm)):
      calls.append((context.module, tuple(context.module.scope.path), args[0] if args else None, out))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, jnp.zeros((1, *image_shape)))
  producers = [(path, out) for mdl, path, _, out in calls if isinstance(mdl, (QConv, QDense))]
  pairs = []
  for mdl, path, x, _ in calls:
    if isinstance(mdl, nn.BatchNorm):
      src = [p for p, out in producers if out is x]  # identity of the traced value: fed directly
      if src:
        pairs.append((src[0], path, float(mdl.epsilon)))
  return pairs


def fold_batchnorm(model: nn.Module, variables: dict, image_shape: tuple[int, ...]) -> dict:
  """Variables of the same model with every conv→BatchNorm pair folded (inference mode)."""
  params = jax.tree.map(lambda x: x, variables["params"])          # fresh nested dicts
  stats = jax.tree.map(lambda x: x, variables["batch_stats"])
  for conv, bn, eps in conv_bn_pairs(model, variables, image_shape):
    c, b, s = (tree_paths.leaf(tree, "/".join(path)) for tree, path in ((params, conv), (params, bn), (stats, bn)))
    scale = b["scale"] / jnp.sqrt(s["var"] + eps)                    # γ/√(σ²+ε), per output channel
    bias = b["bias"] - s["mean"] * scale
    if "bias" in c:                                                  # a conv bias passes through BN too
      bias = bias + c["bias"] * scale
      c["bias"] = jnp.zeros_like(c["bias"])
    c["kernel"] = c["kernel"] * scale
    b["scale"], b["bias"] = jnp.ones_like(scale), bias
    s["mean"], s["var"] = jnp.zeros_like(s["mean"]), jnp.full_like(s["var"], 1.0 - eps)
  return {**variables, "params": params, "batch_stats": stats}
