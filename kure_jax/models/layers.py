"""Conv and dense layers whose kernel and input pass through a quantization hook.

The hook is the identity unless the ``"quant"`` variable collection is given at
``apply`` time. That collection mirrors the module tree and holds, per layer, arrays
(never Python values, so one compiled function serves every setting and ``jax.vmap``
can sweep them):

  w_bits, w_step   weight bit-width and step (scalar, or per output channel)
  a_bits, a_step   input-activation bit-width and step (scalar)
  w_tanh           optional: normalize the kernel to tanh(w)/max|tanh w| first (DoReFa)
  w_bias_corr      optional: bias correction of the quantized kernel per output channel
                   (0 none, 1 restore the float mean, 2 restore the float mean and std;
                   see `bias_correct`)
  w_fmt, w_scale, w_ratio   optional: a number format of `kure_jax.formats` (an index into
                   `formats.FORMATS`; −1 keeps the integer grid above), its scale (per tensor or
                   per channel) and a step ratio; block formats run along the kernel's input axis
  a_fmt, a_scale, a_ratio   the same for the input activation (blocks along its channels)

A bit-width of 0 means "leave in float", so a vmapped sweep can switch weight or
activation quantization on and off without recompiling. What is static (the grid,
which side of ReLU a layer's input is on) is a module attribute.

When the ``"intermediates"`` collection is mutable, each layer also sows the input it
received (``"input"``), which calibration (activation steps) and activation-kurtosis
regularization read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kure_jax import formats as F
from kure_jax import quant as Q
from kure_jax.kurtosis import kernel_leaves
from kure_jax.models.conv import conv2d

QUANT = "quant"
INTERMEDIATES = "intermediates"

default_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # untruncated, as torchvision kaiming_normal_


def _maybe_quantize(x: jax.Array, step: jax.Array, bits: jax.Array, grid: str) -> jax.Array:
  """Fake-quantize x where bits > 0; the identity where bits == 0 (float)."""
  bits = jnp.asarray(bits)
  q = Q.quantize_traced(x, step, jnp.maximum(bits, 1), grid)
  return jnp.where(bits > 0, q, x)


BIAS_CORRECTIONS = ("none", "mean", "mean_std")  # index = the value of 'w_bias_corr'


def bias_correct(q: jax.Array, w: jax.Array, mode: jax.Array | int) -> jax.Array:
  """Per output channel (the last axis), give the quantized kernel `q` the float kernel's mean (mode 1), or
  its mean and std (mode 2): ``(q − μ_q)·σ_w/σ_q + μ_w`` (Banner et al. 2019's bias correction; σ_q = 0 keeps
  the scale). `mode` may be traced (0 returns q), so a sweep can switch it without recompiling.
  """
  red = tuple(range(q.ndim - 1))
  qf, wf = Q.at_least_f32(q), Q.at_least_f32(w)
  mu_q, mu_w = jnp.mean(qf, axis=red), jnp.mean(wf, axis=red)
  sd_q, sd_w = jnp.std(qf, axis=red), jnp.std(wf, axis=red)
  mode = jnp.asarray(mode)
  scale = jnp.where((mode >= 2) & (sd_q > 0), sd_w / jnp.where(sd_q > 0, sd_q, 1.0), 1.0)
  corrected = (qf - mu_q) * scale + mu_w
  return jnp.where(mode > 0, corrected, qf).astype(q.dtype)


def quant_hook(mdl: nn.Module, x: jax.Array, kernel: jax.Array, *, weight_grid: str, act_grid: str) -> tuple[jax.Array, jax.Array]:
  """Route a layer's input and kernel through the quantizers named in the 'quant' collection."""
  if mdl.is_mutable_collection(INTERMEDIATES):
    mdl.sow(INTERMEDIATES, "input", x)
  if mdl.has_variable(QUANT, "w_tanh"):
    kernel = jnp.where(mdl.get_variable(QUANT, "w_tanh"), Q.tanh_normalize(kernel), kernel)
  if mdl.has_variable(QUANT, "w_bits"):
    w_step = mdl.get_variable(QUANT, "w_step")  # () or (C_out,), broadcasts along the last axis
    w_bits = mdl.get_variable(QUANT, "w_bits")
    quantized = _maybe_quantize(kernel, w_step, w_bits, weight_grid)
    if mdl.has_variable(QUANT, "w_bias_corr"):  # only where the kernel is quantized (bits > 0)
      mode = jnp.where(jnp.asarray(w_bits) > 0, mdl.get_variable(QUANT, "w_bias_corr"), 0)
      quantized = bias_correct(quantized, kernel, mode)
    kernel = quantized
  if mdl.has_variable(QUANT, "w_fmt"):
    kernel = _maybe_format(kernel, *(mdl.get_variable(QUANT, k) for k in ("w_fmt", "w_scale", "w_ratio")), axis=-2)
  if mdl.has_variable(QUANT, "a_bits"):
    x = _maybe_quantize(x, mdl.get_variable(QUANT, "a_step"), mdl.get_variable(QUANT, "a_bits"), act_grid)
  if mdl.has_variable(QUANT, "a_fmt"):
    x = _maybe_format(x, *(mdl.get_variable(QUANT, k) for k in ("a_fmt", "a_scale", "a_ratio")), axis=-1)
  return x, kernel


def _maybe_format(x: jax.Array, fmt: jax.Array, scale: jax.Array, ratio: jax.Array, *, axis: int) -> jax.Array:
  """x in the number format ``formats.FORMATS[fmt]`` where fmt ≥ 0 (traced: one compiled function serves
  every format); x itself where fmt < 0."""
  fmt = jnp.asarray(fmt)
  q = F.fake_quantize_by_index(x, jnp.maximum(fmt, 0), scale, ratio, axis=axis)
  return jnp.where(fmt >= 0, q, x)


class QConv(nn.Module):
  """A 2-D convolution (NHWC, HWIO kernel named 'kernel' like ``nn.Conv``) with the hook.

  The convolution is `kure_jax.models.conv.conv2d`: lax's values and gradients bit for bit, with a backward
  pass that reads a materialized copy of the input (1.25-1.4x faster train steps on XLA:CPU).
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: str | Sequence[tuple[int, int]] = "SAME"
  feature_group_count: int = 1
  use_bias: bool = False
  weight_grid: str = "signed"
  act_grid: str = "unsigned"  # the grid for this layer's input: unsigned after a ReLU
  kernel_init: Callable[..., Any] = default_kernel_init
  bias_init: Callable[..., Any] = nn.initializers.zeros
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    if cin % self.feature_group_count:
      raise ValueError(f"{self.name}: {cin} input channels are not divisible by {self.feature_group_count} groups.")
    kernel = self.param("kernel", self.kernel_init, (kh, kw, cin // self.feature_group_count, self.features))
    x, kernel = quant_hook(self, x, kernel, weight_grid=self.weight_grid, act_grid=self.act_grid)
    dtype = self.dtype or jnp.result_type(x, kernel)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    y = conv2d(x.astype(dtype), kernel.astype(dtype), strides, self.padding, self.feature_group_count)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(dtype)
    return y


class QDense(nn.Module):
  """A dense layer ('kernel' of shape (in, out) like ``nn.Dense``) with the hook."""

  features: int
  use_bias: bool = True
  weight_grid: str = "signed"
  act_grid: str = "unsigned"
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Any] = nn.initializers.zeros
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    x, kernel = quant_hook(self, x, kernel, weight_grid=self.weight_grid, act_grid=self.act_grid)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = x.astype(dtype) @ kernel.astype(dtype)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(dtype)
    return y


def quant_collection(params: Any, layers: dict[str, dict[str, jax.Array]]) -> dict:
  """Build the 'quant' collection from {kernel path: {'w_bits': .., 'w_step': .., ...}}.

  Paths are those of `kure_jax.select_kernels` ('block/conv/kernel'); the entries land
  beside each kernel's module, mirroring the params tree. With `params` given, every
  path must name one of its kernels (a typo would otherwise silently quantize nothing).
  """
  known = None
  if params is not None:
    known = {p.removeprefix("params/") for p in kernel_leaves(params)}
  out: dict = {}
  for path, entries in layers.items():
    parts = path.split("/")
    if parts[0] == "params":
      parts = parts[1:]
    if parts[-1] != "kernel":
      raise ValueError(f"quant_collection: {path!r} is not a kernel path.")
    if known is not None and "/".join(parts) not in known:
      raise ValueError(f"quant_collection: {path!r} is not a kernel of these params "
                       f"(kernels: {', '.join(sorted(known))}).")
    node = out
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node.update(entries)
  return out
