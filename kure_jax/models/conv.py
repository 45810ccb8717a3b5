"""A 2-D convolution (NHWC input, HWIO kernel) with the same values and gradients as
``lax.conv_general_dilated``, whose backward pass runs fast on XLA:CPU.

Why: differentiating a plain convolution saves its input ``x`` for the filter gradient.
``x`` is usually an elementwise chain (BatchNorm, ReLU, a residual add) of earlier
buffers, and XLA:CPU fuses that chain into the transpose that lays ``x`` out for the
filter-gradient convolution, recomputing it there in a cache-hostile order: that
recomputation was ~40% of a ResNet-20 train step. Here the jvp rule first passes ``x``
through `materialize`, an exact identity that XLA cannot fuse into the ops reading it,
so the chain is computed once into one buffer, which the forward convolution and the
filter gradient both read: 1.25-1.4x faster train steps, gradients bit for bit those
of lax.

The derivative rule is a ``custom_jvp``, so forward mode (``jax.jvp``), reverse mode,
double backprop (the gradient-ℓ1 regularizer), ``vmap`` and ``jit`` all work; reverse
mode gets the transposes of exactly the ops plain autodiff uses. Grouped (depthwise)
convolutions are passed to ``lax.conv_general_dilated`` unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def materialize(x: jax.Array) -> jax.Array:
  """x, bit for bit, returned by a conditional that XLA keeps and cannot fuse through.

  A conditional is a fusion boundary: the chain producing ``x`` is written once, into
  the buffer the conditional passes through (no copy), instead of being recomputed by
  every op that reads the result. Both branches are exact identities (−(−x) and x),
  so the runtime predicate (is the first element NaN) never changes the value; the
  branches differ so that JAX lowers the conditional, and XLA keeps a conditional
  with an empty branch rather than turning it into a fusible select. Alternatives
  measured: an optimization barrier (XLA:CPU drops it), a dot with an identity matrix
  (exact for finite values, but an extra pass over the activation: 3-4% slower steps).
  """
  if x.size == 0:
    return x
  first = x.reshape(-1)[0]
  return lax.cond(first != first, lambda a: lax.neg(lax.neg(a)), lambda a: a, x)


def _explicit_padding(x_shape, kernel_shape, strides, padding) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSION_NUMBERS)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _saved_input_conv(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding)


def _saved_input_conv_jvp(strides, padding, primals, tangents):
  """Forward and filter-gradient terms both read the materialized input (see module doc).

  Symbolic-zero tangents skip their term: a conv on data (no input tangent) computes no
  conv of zeros, and one differentiated only in its input materializes nothing.
  """
  x, kernel = primals
  dx, dkernel = tangents
  needs_kernel_term = not isinstance(dkernel, SymbolicZero)
  saved = materialize(x) if needs_kernel_term else x
  y = _conv(saved, kernel, strides, padding)
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(_conv(dx, kernel, strides, padding))
  if needs_kernel_term:
    terms.append(_conv(saved, dkernel, strides, padding))
  if not terms:
    return y, jnp.zeros_like(y)
  return y, terms[0] if len(terms) == 1 else terms[0] + terms[1]


_saved_input_conv.defjvp(_saved_input_conv_jvp, symbolic_zeros=True)


def conv2d(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int] = 1,
           padding: str | Sequence[tuple[int, int]] = "SAME", feature_group_count: int = 1) -> jax.Array:
  """``lax.conv_general_dilated(x, kernel, strides, padding, NHWC/HWIO/NHWC, feature_group_count)``.

  Same values; for ungrouped convolutions, gradients computed from a materialized copy
  of ``x`` (module doc). ``x`` and ``kernel`` must share a dtype, as in lax.
  """
  strides = (strides,) * 2 if isinstance(strides, int) else tuple(int(s) for s in strides)
  if feature_group_count != 1:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSION_NUMBERS,
                                     feature_group_count=feature_group_count)
  return _saved_input_conv(x, kernel, strides, _explicit_padding(x.shape, kernel.shape, strides, padding))
