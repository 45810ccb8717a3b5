"""Conv and dense layers whose kernel and input pass through a quantization hook.

The hook is the identity unless the ``"quant"`` variable collection is given at
``apply`` time. That collection mirrors the module tree and holds, per layer, the fields
of a `LayerQuant` (its schema; `quant_collection` is the one builder, and every user
builds `LayerQuant`s: QAT, the robustness sweep, LAPQ). Its values are arrays, never
Python values, so one compiled function serves every setting and ``jax.vmap`` can sweep
them. A bit-width of 0 means "leave in float", so a vmapped sweep can switch weight or
activation quantization on and off without recompiling. What is static (the grid,
which side of ReLU a layer's input is on) is a module attribute.

When the ``"intermediates"`` collection is mutable, each layer also sows the input it
received (``"input"``), which calibration (activation steps) and activation-kurtosis
regularization read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from kure_jax import tree_paths
from kure_jax.core import formats as F
from kure_jax.core import quant as Q
from kure_jax.core.kurtosis import kernel_leaves
from kure_jax.models.conv import conv2d

QUANT = "quant"
INTERMEDIATES = "intermediates"

default_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # untruncated, as torchvision kaiming_normal_


def _maybe_quantize(x: jax.Array, step: jax.Array, bits: jax.Array, grid: str) -> jax.Array:
  """Fake-quantize x where bits > 0; the identity where bits == 0 (float)."""
  bits = jnp.asarray(bits)
  q = Q.quantize_traced(x, step, jnp.maximum(bits, 1), grid)
  return jnp.where(bits > 0, q, x)


DEFAULT_WEIGHT_GRID = "signed"  # QConv/QDense's weight grid unless a model is given another
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


@struct.dataclass
class LayerQuant:
  """How one layer is quantized at apply time: the schema of its entries in the 'quant' collection.

  Every field is an array (traced in sweeps) or None (absent: that quantizer is off). Fields come in
  groups that must be given together:

    w_bits, w_step     weight bit-width (0: float) and step (scalar, or per output channel)
    w_tanh             DoReFa: normalize the kernel to tanh(w)/max|tanh w| first
    w_bias_corr        bias correction of the quantized kernel per output channel, an index into
                       `BIAS_CORRECTIONS` (see `bias_correct`); needs w_bits
    w_fmt, w_scale, w_ratio   a number format of `kure_jax.core.formats` (an index into `formats.FORMATS`;
                       −1 keeps the integer grid above), its scale (per tensor or per channel) and a step
                       ratio; block formats run along the kernel's input axis
    w_formats          optional, with w_fmt: the formats w_fmt can name, as the keys of a dict (static
                       under jit; the values are unused): only their kinds of format are computed (see
                       `formats.fake_quantize_by_index`). None: every format can be named
    a_bits, a_step     input-activation bit-width (0: float) and step (scalar)
    a_fmt, a_scale, a_ratio   the number format of the input activation (blocks along its channels)
    a_formats          the formats a_fmt can name (like w_formats)
  """

  w_bits: Any = None
  w_step: Any = None
  w_tanh: Any = None
  w_bias_corr: Any = None
  w_fmt: Any = None
  w_scale: Any = None
  w_ratio: Any = None
  w_formats: Any = None
  a_bits: Any = None
  a_step: Any = None
  a_fmt: Any = None
  a_scale: Any = None
  a_ratio: Any = None
  a_formats: Any = None

  GROUPS = (("w_bits", "w_step"), ("w_fmt", "w_scale", "w_ratio"), ("a_bits", "a_step"),
            ("a_fmt", "a_scale", "a_ratio"))

  def __post_init__(self):
    for group in self.GROUPS:
      given = [getattr(self, f) is not None for f in group]
      if any(given) and not all(given):
        missing = [f for f, g in zip(group, given) if not g]
        raise ValueError(f"LayerQuant: {', '.join(group)} go together; missing {', '.join(missing)}.")
    for side in "wa":
      if getattr(self, f"{side}_formats") is not None and getattr(self, f"{side}_fmt") is None:
        raise ValueError(f"LayerQuant: {side}_formats lists what {side}_fmt can name; it needs {side}_fmt.")
    if self.w_bias_corr is not None and self.w_bits is None:
      raise ValueError("LayerQuant: w_bias_corr corrects the integer-grid weights; it needs w_bits and w_step.")

  def entries(self) -> dict[str, jax.Array]:
    """The collection entries: the fields that are set, as arrays."""
    return {f.name: jax.tree.map(jnp.asarray, v) for f in dataclasses.fields(self)
            if (v := getattr(self, f.name)) is not None}

  @classmethod
  def read(cls, mdl: nn.Module) -> "LayerQuant":
    """The spec a module finds in the 'quant' collection (all None when there is none)."""
    return cls(**{f.name: mdl.get_variable(QUANT, f.name) for f in dataclasses.fields(cls)
                  if mdl.has_variable(QUANT, f.name)})

  def quantize_weight(self, kernel: jax.Array, weight_grid: str) -> jax.Array:
    """The kernel through the weight quantizers that are set: DoReFa's normalization, the integer grid (+ bias
    correction), then a number format."""
    if self.w_tanh is not None:
      kernel = jnp.where(self.w_tanh, Q.tanh_normalize(kernel), kernel)
    if self.w_bits is not None:
      quantized = _maybe_quantize(kernel, self.w_step, self.w_bits, weight_grid)
      if self.w_bias_corr is not None:  # only where the kernel is quantized (bits > 0)
        quantized = bias_correct(quantized, kernel, jnp.where(jnp.asarray(self.w_bits) > 0, self.w_bias_corr, 0))
      kernel = quantized
    if self.w_fmt is not None:
      kernel = _maybe_format(kernel, self.w_fmt, self.w_scale, self.w_ratio, self.w_formats, axis=-2)
    return kernel

  def quantize_input(self, x: jax.Array, act_grid: str) -> jax.Array:
    """The layer's input through the activation quantizers that are set."""
    if self.a_bits is not None:
      x = _maybe_quantize(x, self.a_step, self.a_bits, act_grid)
    if self.a_fmt is not None:
      x = _maybe_format(x, self.a_fmt, self.a_scale, self.a_ratio, self.a_formats, axis=-1)
    return x


def quant_hook(mdl: nn.Module, x: jax.Array, kernel: jax.Array, *, weight_grid: str,
               act_grid: str) -> tuple[jax.Array, jax.Array]:
  """Route a layer's input and kernel through the quantizers its `LayerQuant` in the 'quant' collection sets."""
  if mdl.is_mutable_collection(INTERMEDIATES):
    mdl.sow(INTERMEDIATES, "input", x)
  spec = LayerQuant.read(mdl)
  return spec.quantize_input(x, act_grid), spec.quantize_weight(kernel, weight_grid)


def _maybe_format(x: jax.Array, fmt: jax.Array, scale: jax.Array, ratio: jax.Array,
                  formats: Mapping[str, Any] | None, *, axis: int) -> jax.Array:
  """x in the number format ``formats.FORMATS[fmt]`` where fmt ≥ 0 (traced: one compiled function serves
  every format); x itself where fmt < 0. `formats` (keys only) narrows what is computed to the formats fmt
  can name."""
  fmt = jnp.asarray(fmt)
  index = jnp.maximum(fmt, 0)
  names = F.FORMATS if formats is None else tuple(f for f in F.FORMATS if f in formats)
  if names != F.FORMATS:  # an index into FORMATS → into `names` (a format not listed maps to the first)
    index = jnp.asarray([names.index(f) if f in names else 0 for f in F.FORMATS], jnp.int32)[index]
  q = F.fake_quantize_by_index(x, index, scale, ratio, formats=names, axis=axis)
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
  weight_grid: str = DEFAULT_WEIGHT_GRID
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
  weight_grid: str = DEFAULT_WEIGHT_GRID
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


def _spec(path: str, spec: LayerQuant | Mapping[str, Any]) -> LayerQuant:
  if isinstance(spec, LayerQuant):
    return spec
  unknown = sorted(set(spec) - {f.name for f in dataclasses.fields(LayerQuant)})
  if unknown:
    raise ValueError(f"quant_collection: {path!r} has unknown entries {', '.join(unknown)} "
                     "(see kure_jax.models.layers.LayerQuant).")
  return LayerQuant(**spec)


def quant_collection(params: Any, layers: Mapping[str, LayerQuant | Mapping[str, Any]],
                     sites: Mapping[str, LayerQuant | Mapping[str, Any]] | None = None) -> dict:
  """The 'quant' collection of {kernel path: LayerQuant}: the one builder of what the hook reads.

  Paths are those of `kure_jax.select_kernels` ('block/conv/kernel'); each spec's entries land
  beside its kernel's module, mirroring the params tree. A plain mapping is read as
  ``LayerQuant(**mapping)`` (so a misspelled field is an error). With `params` given, every
  path must name one of its kernels (a typo would otherwise silently quantize nothing).
  `sites`: {module path: LayerQuant} of activation sites (`QReLU`, e.g. 'layer1_0/relu2'), which take
  only the input-activation fields.
  """
  known = None
  if params is not None:
    known = {p.removeprefix("params/") for p in kernel_leaves(params)}
  entries = {}
  for path, spec in layers.items():
    if tree_paths.parts(path)[-1] != "kernel":
      raise ValueError(f"quant_collection: {path!r} is not a kernel path.")
    if known is not None and "/".join(tree_paths.parts(path)) not in known:
      raise ValueError(f"quant_collection: {path!r} is not a kernel of these params "
                       f"(kernels: {', '.join(sorted(known))}).")
    entries[path] = _spec(path, spec).entries()
  for path, spec in (sites or {}).items():
    e = _spec(path, spec).entries()
    if any(k.startswith("w_") for k in e):
      raise ValueError(f"quant_collection: the activation site {path!r} takes only a_* entries, got "
                       f"{', '.join(sorted(e))}.")
    entries[path + "/output"] = e  # the site's module is the whole path
  return tree_paths.at_modules(entries)


class QReLU(nn.Module):
  """A ReLU as DoReFa's model runs it (Zhou et al. 2016, and the KURE authors' code): clamped to [0, 1], then
  through the activation quantizer its 'quant' entries set (a_bits, a_step; unsigned grid; a_fmt...). Without
  entries it is the clamp alone. Used by the ResNets built with ``dorefa_relus=True``, so the residual stream
  is quantized too."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return LayerQuant.read(self).quantize_input(jnp.clip(x, 0.0, 1.0), "unsigned")
