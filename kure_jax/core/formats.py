"""Fake quantization to integer, FP8/FP6/FP4 and block-scaled (MX, NVFP4) number formats.

One pure function, ``fake_quantize(x, fmt, scale=None, ratio=1.0, *, axis=-1, block_size=None)``,
maps x onto a format's values and back (same shape and dtype as x), with a straight-through
gradient. ``fake_quantize_by_index`` does the same with the format chosen by a traced integer,
so a sweep can treat the format as data (like the bit-width) and score integer and
floating-point points in one compiled function; it rounds by arithmetic on the format's
constants instead of casts and branches, with the same results bit for bit (see `fake_quantize_by_index`).

Formats (`FORMATS`):

=================  ===============================  ==========================================
name               values                           scaling
=================  ===============================  ==========================================
int2 … int8        signed integer grid −2^(b−1) …    `scale` = the step Δ (kure_jax.core.quant's
                   2^(b−1)−1 (kure_jax.core.quant)        'signed' grid, reused)
fp8_e4m3           OCP FP8 E4M3 (no inf, max 448)   `scale` = the step: x ≈ scale · element
fp8_e5m2           OCP FP8 E5M2 (max 57344)
fp6_e3m2           OCP FP6 E3M2 (max 28)
fp6_e2m3           OCP FP6 E2M3 (max 7.5)
fp4_e2m1           OCP FP4 E2M1 (max 6)
mxfp8_e4m3 …       OCP MX v1.0: blocks of 32 along  one E8M0 (power-of-two) scale per block
mxfp4, mxint8      `axis`, elements in the named    from the block's amax, as the spec's
                   format (mxint8: 8-bit ints       conversion defines it (below)
                   × 2^−6, ±127/64)
nvfp4              blocks of 16, E2M1 elements      one E4M3 scale per block, relative to a
                                                    per-tensor float32 `scale`
=================  ===============================  ==========================================

Scalar formats: ``cast(clip(x / Δ, ±max), fmt) · Δ`` with Δ = ``scale · ratio`` (broadcastable:
per tensor or per channel), round-to-nearest-even and saturation (the integer grid clips to
[−2^(b−1), 2^(b−1)−1] like kure_jax.core.quant). ``scale=None`` is max scaling, Δ = amax · (1/max)
(amax over the whole tensor; `max_scale` gives per-channel ones). The float casts use the dtypes JAX ships (float8_e4m3fn,
float8_e5m2, float4_e2m1fn); XLA:CPU cannot convert to float6 (jax 0.10.2: "Invalid XLA
PrimitiveType"), so fp6 rounds through the float8 type with the same mantissa bits
(E3M2 → E5M2, E2M3 → E4M3) and rounds its subnormal range [0, min normal) on the fixed grid
of the smallest subnormal; the tests check every format against ml_dtypes' NumPy casts.
Inputs are clipped before the cast: float8_e4m3fn casts give NaN on overflow, float8_e5m2 inf.
Every division is a multiplication by a float32 reciprocal (x / Δ is x · (1/Δ)): XLA:CPU
compiles x / Δ to exactly that anyway (it differs from IEEE division in the last bit for about
a third of inputs), so writing it out keeps ties and results independent of how a backend
divides, and a NumPy reference reproduces them bit for bit.

Block formats (blocks along `axis`, zero-padded at the end when the block size does not divide
its length: zeros change no block's amax, and the padding is dropped again). With the
per-tensor scale S (`scale`; MX: 1 by default, NVFP4: amax / (6 · 448) by default) and
y = x / S, each block b gets a scale s_b from a_b = max |y| over the block:

* MX (OCP Microscaling v1.0, section 6.3): s_b = 2^(⌊log2 a_b⌋ − emax), emax the exponent of
  the element format's largest normal value (E4M3 8, E5M2 15, E3M2 4, E2M3 2, E2M1 2, INT8 0),
  clamped to E8M0's 2^−127 … 2^127 (an all-zero block gets 2^−127). Elements that exceed the
  element maximum (a_b / s_b can reach 2^(emax+1)) saturate, as the spec's conversion clamps.
  Elements round to nearest even (the microxcaling reference defaults to ties away from zero;
  that differs only at exact ties). MXINT8 elements are clamped symmetrically to ±127/64.
* NVFP4: s_b = E4M3(min(a_b · (1/6), 448)), round to nearest even; a block whose s_b rounds
  to zero quantizes to zero. The default S = amax · (1/2688) gives the block holding the
  tensor's amax the scale 448, as NVIDIA's recipe does.

The result is ``(cast(clip(y · (1/(ratio · s_b)), ±max)) · (ratio · s_b)) · S``. A block holding an
inf or NaN comes out NaN (the MX spec's NaN scale); NaN elements stay NaN in every format,
±inf saturates in scalar formats. XLA:CPU flushes float32 subnormals, so a block whose scale
is below 2^−126 (MX blocks with amax below ~2^(−126+emax)) comes out as zeros.

Step ratio. For scalar formats ``ratio`` multiplies the step: Δ = ratio · scale. For block
formats it multiplies every block's scale *after* the scales are derived: step_b = ratio · s_b.
So ratio r scales every step by exactly r in every format, and the MSE-vs-ratio curves of
scalar and block formats compare like for like. At r = 1 this is the format's own conversion;
for MX, r = 2^k is still exactly the spec's encoding with every shared exponent shifted by k;
any other r puts the block scales off the E8M0/E4M3 grid (it models a mis-set scale, as it does
for scalar formats, not a legal encoding). Scaling the per-tensor scale S instead would be
nearly a no-op: the block scales are re-derived from y, so NVFP4 absorbs it up to E4M3
rounding and MX up to a power of two (r and 2r give the same MX result).

Gradients: for x, straight-through: 1 where x/step is inside the clipping range, 0 where it
saturates (in block formats too: an MX block maximum above the element maximum gets 0).
Derived scales (max scaling, block scales) are constants (stop_gradient); a `scale` or `ratio`
you pass gets LSQ's gradient (``cast(v) − v`` inside, ±max outside), as in kure_jax.core.quant.
Arithmetic is float32 whatever x's dtype (bfloat16 is upcast, float64 rounded to float32).

Checks (when called eagerly): unknown formats, a `block_size` for a scalar format, an axis out
of range, a non-float or empty x, a `scale` that does not broadcast to x, a scale or ratio that
is not finite and > 0 give one ValueError line naming the valid choices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from kure_jax import _checks

from kure_jax.core import quant

_TINY = float(np.finfo(np.float32).tiny)

# Element float formats: the dtype JAX ships for each.
_FLOAT_DTYPES = {
    "fp8_e4m3": jnp.float8_e4m3fn,
    "fp8_e5m2": jnp.float8_e5m2,
    "fp6_e3m2": jnp.float6_e3m2fn,
    "fp6_e2m3": jnp.float6_e2m3fn,
    "fp4_e2m1": jnp.float4_e2m1fn,
}
# XLA:CPU cannot convert to float6; these float8 types have the same mantissa bits and a wider
# exponent range, so their cast rounds fp6's normal range identically.
_PROXY = {"fp6_e3m2": jnp.float8_e5m2, "fp6_e2m3": jnp.float8_e4m3fn}
_MXINT8_MAX = 127.0 / 64.0  # MXINT8: 8-bit two's complement × 2^-6, clamped symmetrically
_E4M3_MAX = 448.0


@dataclasses.dataclass(frozen=True)
class FormatSpec:
  """A format's constants.

  kind: 'int', 'float', 'mx' or 'nvfp4'. element: the element format ('int4', 'fp8_e4m3',
  'mxint8', …). largest: the largest element value (in units of the step). bits: bits per
  element. block_size: the default block (None for scalar formats). emax: MX only, the
  exponent of the largest normal element. scale_dtype: the block scales' storage dtype.
  dtype: the element's JAX dtype (float elements only).
  """

  name: str
  kind: str
  element: str
  largest: float
  bits: int
  block_size: int | None = None
  emax: int | None = None
  scale_dtype: object | None = None
  dtype: object | None = None


def _build_specs() -> dict[str, FormatSpec]:
  specs = {}
  for b in range(2, 9):
    specs[f"int{b}"] = FormatSpec(f"int{b}", "int", f"int{b}", float(2 ** (b - 1) - 1), b)
  for name, dt in _FLOAT_DTYPES.items():
    fi = ml_dtypes.finfo(dt)
    specs[name] = FormatSpec(name, "float", name, float(fi.max), int(fi.bits), dtype=dt)
  for name, element in (("mxfp8_e4m3", "fp8_e4m3"), ("mxfp8_e5m2", "fp8_e5m2"), ("mxfp6_e3m2", "fp6_e3m2"),
                        ("mxfp6_e2m3", "fp6_e2m3"), ("mxfp4", "fp4_e2m1"), ("mxint8", "mxint8")):
    largest = _MXINT8_MAX if element == "mxint8" else specs[element].largest
    bits = 8 if element == "mxint8" else specs[element].bits
    emax = math.frexp(largest)[1] - 1  # ⌊log2 largest⌋
    specs[name] = FormatSpec(name, "mx", element, largest, bits, 32, emax, jnp.float8_e8m0fnu,
                             _FLOAT_DTYPES.get(element))
  specs["nvfp4"] = FormatSpec("nvfp4", "nvfp4", "fp4_e2m1", specs["fp4_e2m1"].largest, 4, 16, None,
                              jnp.float8_e4m3fn, jnp.float4_e2m1fn)
  return specs


SPECS: dict[str, FormatSpec] = _build_specs()
FORMATS: tuple[str, ...] = tuple(SPECS)
SCALAR_FORMATS: tuple[str, ...] = tuple(n for n, s in SPECS.items() if s.block_size is None)
BLOCK_FORMATS: tuple[str, ...] = tuple(n for n, s in SPECS.items() if s.block_size is not None)


def spec(fmt: str) -> FormatSpec:
  """The `FormatSpec` of a format name."""
  _checks.check_choice("formats.spec", "format", fmt, FORMATS)
  return SPECS[fmt]


# ------------------------------------------------------------------------------ rounding


def _round_element(v: jax.Array, element: str) -> jax.Array:
  """Round float32 `v` (already within ±largest) to the element format, nearest even."""
  if element == "mxint8":
    r = jnp.round(v * 64.0) / 64.0
  elif element.startswith("int"):
    r = jnp.round(v)
  elif element in _PROXY:
    fi = ml_dtypes.finfo(_FLOAT_DTYPES[element])
    sub = float(fi.smallest_subnormal)
    r = jnp.where(jnp.abs(v) < float(fi.tiny), jnp.round(v / sub) * sub,
                  v.astype(_PROXY[element]).astype(jnp.float32))
  else:
    r = v.astype(_FLOAT_DTYPES[element]).astype(jnp.float32)
  return jnp.where(jnp.isnan(v), v, r)  # float4/float6 have no NaN: keep it


def _ste_round(v: jax.Array, largest: float, element: str) -> jax.Array:
  """round(clip(v, ±largest)) in value; gradient 1 inside the range, 0 outside."""
  r = jax.lax.stop_gradient(_round_element(jnp.clip(v, -largest, largest), element))
  return jnp.where(jnp.abs(v) <= largest, v + jax.lax.stop_gradient(r - v), r)


# ----------------------------------------------------------------------------- scaling


def _amax(x: jax.Array, channel_axis: int | None) -> jax.Array:
  if channel_axis is None:
    return jnp.max(jnp.abs(x))
  red = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
  return jnp.max(jnp.abs(x), axis=red, keepdims=True)


def _default_scale(x32: jax.Array, sp: FormatSpec, channel_axis: int | None = None) -> jax.Array:
  """Max scaling: amax / largest (scalar formats), 1 (MX), amax / (6·448) (NVFP4)."""
  if sp.kind == "mx":
    shape = () if channel_axis is None else tuple(
        x32.shape[a] if a == channel_axis % x32.ndim else 1 for a in range(x32.ndim))
    return jnp.ones(shape, jnp.float32)
  denom = sp.largest * _E4M3_MAX if sp.kind == "nvfp4" else sp.largest
  inv = np.float32(1.0) / np.float32(denom)
  return jax.lax.stop_gradient(jnp.maximum(_amax(x32, channel_axis) * inv, _TINY))


def _to_blocks(y: jax.Array, axis: int, block: int):
  """(…, n_blocks, block) view of `y` along `axis` (zero-padded) and the inverse map."""
  y = jnp.moveaxis(y, axis, -1)
  n = y.shape[-1]
  pad = (-n) % block
  if pad:
    y = jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, pad)])
  blocks = y.reshape(y.shape[:-1] + ((n + pad) // block, block))

  def restore(b: jax.Array) -> jax.Array:
    out = b.reshape(b.shape[:-2] + (n + pad,))[..., :n]
    return jnp.moveaxis(out, -1, axis)

  return blocks, restore


def _mx_exponent(amax: jax.Array, emax: int) -> jax.Array:
  """⌊log2 amax⌋ − emax, clamped to E8M0's −127…127 (int32); −127 for an all-zero block."""
  e = jnp.frexp(amax)[1] - 1 - emax  # frexp: amax = m·2^e, m ∈ [½, 1), exact
  return jnp.where(amax > 0, jnp.clip(e, -127, 127), -127)


def _block_scales(amax: jax.Array, sp: FormatSpec) -> jax.Array:
  """Each block's scale in its storage dtype (E8M0 for MX, E4M3 for NVFP4)."""
  if sp.kind == "mx":
    biased = jnp.where(jnp.isfinite(amax), _mx_exponent(amax, sp.emax) + 127, 255)  # E8M0 bits; 0xFF = NaN
    biased = biased.astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(biased, jnp.float8_e8m0fnu)
  inv = np.float32(1.0) / np.float32(sp.largest)
  return jnp.minimum(amax * inv, _E4M3_MAX).astype(jnp.float8_e4m3fn)


def _block_quantize(x32: jax.Array, sp: FormatSpec, scale: jax.Array, ratio: jax.Array, axis: int,
                    block: int) -> jax.Array:
  y = x32 * (1.0 / scale)
  yb, restore = _to_blocks(y, axis, block)
  rb, _ = _to_blocks(jnp.broadcast_to(ratio, y.shape), axis, block)
  amax = jax.lax.stop_gradient(jnp.max(jnp.abs(yb), axis=-1, keepdims=True))
  s_b = jax.lax.stop_gradient(_block_scales(amax, sp).astype(jnp.float32))
  s_b = jnp.where(jnp.isfinite(amax), s_b, jnp.nan)  # inf/NaN in a block: the MX spec's NaN scale
  step = rb * s_b
  ok = step > 0  # a zero (or flushed-subnormal) block scale: the block quantizes to zero
  v = jnp.where(ok, yb * (1.0 / jnp.where(ok, step, 1.0)), jnp.where(jnp.isnan(step), jnp.nan, 0.0))
  q = _ste_round(v, sp.largest, sp.element) * step
  return restore(q) * scale


@functools.partial(jax.jit, static_argnames=("sp", "axis", "block"))
def _fake_quantize(x32: jax.Array, scale, ratio, sp: FormatSpec, axis: int, block: int | None) -> jax.Array:
  """Unchecked fake quantization of float32 `x32` (scale None: max scaling); compiled once per shape."""
  if scale is None:
    scale = _default_scale(x32, sp)
  scale = quant.at_least_f32(scale)
  ratio = quant.at_least_f32(ratio)
  if sp.block_size is not None:
    return _block_quantize(x32, sp, scale, ratio, axis, block or sp.block_size)
  step = scale * ratio
  v = x32 * (1.0 / step)
  if sp.kind == "int":  # kure_jax.core.quant's signed grid at step 1: round half to even, clip, STE
    return quant.quantize_traced(v, jnp.float32(1.0), sp.bits, "signed") * step
  return _ste_round(v, sp.largest, sp.element) * step


# ------------------------------------------------------------------------------ checks


def _check_x(fn: str, x) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{fn}: `x` must be a float array, got dtype {x.dtype}.")
  _checks.check_nonempty(fn, "x", x)
  return x


def _check_axis(fn: str, axis: int, ndim: int) -> int:
  if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
    raise ValueError(f"{fn}: block `axis` {axis} is out of range for a {ndim}-d tensor "
                     f"(choose -{ndim}…{ndim - 1}).")
  return int(axis) % ndim


def _check_array_arg(fn: str, name: str, value, shape: tuple[int, ...]) -> None:
  if value is None:
    return
  _checks.check_positive(fn, name, value)
  try:
    ok = np.broadcast_shapes(shape, np.shape(value)) == tuple(shape)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"{fn}: `{name}` of shape {np.shape(value)} does not broadcast to x's shape {shape}.")


def _check_formats(fn: str, formats) -> tuple[str, ...]:
  if isinstance(formats, str) or not isinstance(formats, Sequence) or not formats:
    raise ValueError(f"{fn}: `formats` must be a non-empty tuple of names from {', '.join(FORMATS)}.")
  for f in formats:
    _checks.check_choice(fn, "format", f, FORMATS)
  return tuple(formats)


# --------------------------------------------------------------------------- public API


def fake_quantize(x: jax.Array, fmt: str, scale: jax.Array | float | None = None,
                  ratio: jax.Array | float = 1.0, *, axis: int = -1, block_size: int | None = None) -> jax.Array:
  """Quantize `x` to format `fmt` and back (same shape and dtype), straight-through gradient.

  Args:
    x: a float array.
    fmt: a name from `FORMATS` (see the module docstring).
    scale: scalar formats: the step (broadcastable to x: per tensor or per channel); block
      formats: the per-tensor float32 scale S the block scales are relative to. None: max
      scaling (amax / largest; MX: 1; NVFP4: amax / (6·448)).
    ratio: multiplies every step (scalar formats: Δ = ratio·scale; block formats: each derived
      block scale), broadcastable to x; may be traced.
    axis: block formats only: the axis the blocks run along (for a matmul operand, its
      contraction axis, e.g. -2 for an HWIO or (in, out) kernel). Ignored by scalar formats.
    block_size: block formats only: elements per block (default 32 for MX, 16 for NVFP4;
      other sizes are not standard).
  Returns: an array with x's shape and dtype holding the format's values times their steps.
  """
  fn = "fake_quantize"
  _checks.check_choice(fn, "format", fmt, FORMATS)
  sp = SPECS[fmt]
  x = _check_x(fn, x)
  if sp.block_size is None:
    if block_size is not None:
      raise ValueError(f"{fn}: `block_size` applies only to the block formats ({', '.join(BLOCK_FORMATS)}); "
                       f"{fmt!r} is scaled per tensor or channel by `scale`.")
  else:
    axis = _check_axis(fn, axis, x.ndim)
    if block_size is not None and (not isinstance(block_size, (int, np.integer)) or block_size < 1):
      raise ValueError(f"{fn}: `block_size` must be a positive integer, got {block_size!r}.")
  _check_array_arg(fn, "scale", scale, x.shape)
  _check_array_arg(fn, "ratio", ratio, x.shape)
  out = _fake_quantize(quant.at_least_f32(x).astype(jnp.float32), scale, ratio, sp, axis, block_size)
  return out.astype(x.dtype)


def fake_quantize_by_index(x: jax.Array, index: jax.Array | int, scale: jax.Array | float | None = None,
                           ratio: jax.Array | float = 1.0, *, formats: Sequence[str] = FORMATS,
                           axis: int = -1) -> jax.Array:
  """`fake_quantize` with the format ``formats[index]``; `index` may be a traced int32.

  For sweeps that treat the format as data. Branchless: the element rounding is arithmetic on
  the chosen format's constants, gathered from small tables by `index`, so one elementwise pass
  serves every scalar format and fuses with its neighbours like an integer grid does; the MX
  formats share one block path (their constants gathered too) and NVFP4 has its own. Only the
  kinds of format (`KINDS`: scalar, MX, NVFP4) that the static tuple `formats` holds are
  computed, the chosen kind selected by jnp.where, so pass only the formats a sweep can choose.
  The values and x-gradients are those of `fake_quantize` bit for bit (the LSQ gradients of
  `scale` and `ratio` to float32 rounding). `scale` means what it means for the chosen format
  (see `fake_quantize`; take it from `max_scales(x, formats)[index]` or pass None for each
  format's max scaling). Block formats use their default block size. A traced index outside
  0…len(formats)−1 is clamped; a concrete one raises.
  """
  fn = "fake_quantize_by_index"
  formats = _check_formats(fn, formats)
  x = _check_x(fn, x)
  if any(SPECS[f].block_size for f in formats):
    axis = _check_axis(fn, axis, x.ndim)
  idx = _checks.concrete(index)
  if idx is not None and (idx.shape != () or not 0 <= int(idx) < len(formats) or idx != int(idx)):
    raise ValueError(f"{fn}: `index` must be one integer in 0…{len(formats) - 1} (into `formats`), got {index!r}.")
  _check_array_arg(fn, "scale", scale, x.shape)
  _check_array_arg(fn, "ratio", ratio, x.shape)
  x32 = quant.at_least_f32(x).astype(jnp.float32)
  scale = None if scale is None else quant.at_least_f32(scale)
  out = _by_index(x32, jnp.asarray(index, jnp.int32), scale, quant.at_least_f32(ratio), formats=formats, axis=axis)
  return out.astype(x.dtype)


# ------------------------------------------------------------------ branchless by-index path
#
# The by-name path rounds through the float8/float4 dtypes and branches on the format in Python; a traced
# format index cannot do that without a conditional (lax.switch), and a conditional inside a network under
# lax.map keeps XLA from fusing the elementwise quantization into its neighbours (it made format points of
# the one-call sweep ~3× slower than integer points). So the by-index path rounds with arithmetic on
# per-format parameters gathered by the index: with c = clip(v, lo, hi) and e the exponent of c (read from
# its bits: exact, no log2) clamped to [e_lo, e_hi], ulp = 2^(e − mantissa bits) and the element is
# round_half_even(c · (1/ulp)) · ulp (powers of two: exact). That is RNE onto a float format's values
# (subnormals: e clamps at the smallest normal exponent), the integer grid (e_lo = e_hi = 0, no mantissa
# bits: ulp 1) and MXINT8's (ulp 2^−6), bit for bit what the casts give; block scales are built the same way
# (E8M0 from amax's exponent bits, E4M3 by the rounding above). The tests compare values and x-gradients of
# every format, on ties, subnormals, saturation, inf and NaN, with the by-name path bit for bit.
#
# Speed on XLA:CPU (benchmarks/formats_sweep.py): a block's max |y| is an integer max over |x|'s bit
# patterns times 1/S (a float max becomes a library call that needs its input materialized; the integer
# reduction fuses with x's producer), so a block format costs one extra read of x and a small per-block pass.

_EXP_MASK = 0x7F800000  # float32 exponent field


@dataclasses.dataclass(frozen=True)
class _Element:
  """Element rounding constants, per format (columns of the by-index tables)."""

  lo: float           # clip range in units of the step (the signed integer grid: −2^(b−1) … 2^(b−1)−1)
  hi: float
  ef_lo: int          # the exponent clamp as float32 exponent fields (biased, << 23)
  ef_hi: int
  mshift: int         # mantissa bits << 23
  nan_out: bool       # NaN takes the saturated branch (float formats: no gradient) or the inside one (ints)


def _element(element: str) -> _Element:
  if element == "mxint8":
    return _Element(-_MXINT8_MAX, _MXINT8_MAX, 127 << 23, 127 << 23, 6 << 23, True)
  if element.startswith("int"):
    half = 2.0 ** (int(element[3:]) - 1)
    return _Element(-half, half - 1.0, 127 << 23, 127 << 23, 0, False)
  fi = ml_dtypes.finfo(_FLOAT_DTYPES[element])
  emin = math.frexp(float(fi.tiny))[1] - 1
  emax = math.frexp(float(fi.max))[1] - 1
  return _Element(-float(fi.max), float(fi.max), (emin + 127) << 23, (emax + 127) << 23, int(fi.nmant) << 23, True)


def _round_arith(c: jax.Array, ef_lo, ef_hi, mshift) -> jax.Array:
  """Round float32 `c` (within the format's range) to nearest even on the grid of its clamped binade."""
  ef = jnp.clip(jax.lax.bitcast_convert_type(c, jnp.int32) & _EXP_MASK, ef_lo, ef_hi)
  ulp_bits = ef - mshift
  ulp = jax.lax.bitcast_convert_type(ulp_bits, jnp.float32)
  inv_ulp = jax.lax.bitcast_convert_type((254 << 23) - ulp_bits, jnp.float32)  # 1 / ulp, exact
  return jnp.round(c * inv_ulp) * ulp


def _ste_round_arith(v: jax.Array, el: dict) -> jax.Array:
  """`_ste_round` (floats) and kure_jax.quant's signed grid (ints) with gathered element constants `el`.

  round(clip(v, lo, hi)) in value; gradient 1 inside [lo, hi], 0 outside (the clip level is a constant).
  """
  lo, hi = el["lo"], el["hi"]
  r = jax.lax.stop_gradient(_round_arith(jnp.clip(v, lo, hi), el["ef_lo"], el["ef_hi"], el["mshift"]))
  outside = (v < lo) | (v > hi) | (jnp.isnan(v) & el["nan_out"])
  return jnp.where(outside, r, v + jax.lax.stop_gradient(r - v))


KINDS: tuple[str, ...] = ("scalar", "mx", "nvfp4")  # scalar: the int and float formats (no blocks)


def kind(fmt: str) -> str:
  """The kind of a format: 'scalar' (integer and float formats), 'mx' or 'nvfp4'."""
  sp = spec(fmt)
  return "scalar" if sp.block_size is None else sp.kind


def formats_of_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
  """The formats of the given kinds, in `FORMATS` order."""
  for k in kinds:
    _checks.check_choice("formats_of_kinds", "kind", k, KINDS)
  return tuple(f for f in FORMATS if kind(f) in kinds)


@functools.lru_cache(maxsize=None)
def _tables(formats: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Per-format constants of `formats` as NumPy columns (gathered by the traced index)."""
  sps = [SPECS[f] for f in formats]
  els = [_element(sp.element) for sp in sps]
  cols = {k: np.asarray([getattr(e, k) for e in els]) for k in ("lo", "hi", "ef_lo", "ef_hi", "mshift", "nan_out")}
  cols = {k: v.astype(np.float32 if k in ("lo", "hi") else (bool if k == "nan_out" else np.int32))
          for k, v in cols.items()}
  cols["kind"] = np.asarray([KINDS.index(kind(f)) for f in formats], np.int32)
  cols["emax"] = np.asarray([sp.emax or 0 for sp in sps], np.int32)
  denom = [sp.largest * _E4M3_MAX if sp.kind == "nvfp4" else sp.largest for sp in sps]
  cols["inv_denom"] = np.asarray([np.float32(1.0) / np.float32(d) for d in denom], np.float32)
  return cols


def _blocks_of(y: jax.Array, axis: int, block: int):
  """`_to_blocks`, without the zero padding when the axis is shorter than a block (one short block: the
  same amax, nothing to drop again)."""
  n = y.shape[axis]
  if n > block:
    return _to_blocks(y, axis, block)
  y = jnp.expand_dims(jnp.moveaxis(y, axis, -1), -2)
  return y, lambda b: jnp.moveaxis(b[..., 0, :], -1, axis)


def _abs_max(x: jax.Array) -> jax.Array:
  """max |x| over the last axis (keepdims), as an integer max of the bit patterns: the same value (|x|'s bits
  order like its values, NaN's above inf's), and XLA:CPU fuses an integer reduction with x's producer where it
  hands a float max to a separate library call that needs x materialized."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32) & 0x7FFFFFFF
  return jax.lax.bitcast_convert_type(jnp.max(bits, axis=-1, keepdims=True), jnp.float32)


def _block_candidate(x32: jax.Array, inv_s: jax.Array, ratio: jax.Array, block_kind: str, emax, axis: int,
                     block: int, xmax: jax.Array | None):
  """A block format's v = y / step (y = x / S) and step, in x's layout: `_block_quantize` up to the element
  rounding, with the block scales computed by arithmetic (MX: `emax` may be traced).

  `xmax`: each block's max |x| (see `_block_xmax`) when S is constant along the blocks, else None (max |y|
  is taken from y).
  """
  y = x32 * inv_s
  yb, restore = _blocks_of(y, axis, block)
  if xmax is not None:  # max |x · (1/S)| = max |x| · (1/S) exactly: rounding is monotonic
    amax = xmax * _in_blocks(inv_s, x32.ndim, axis)
  else:
    amax = jnp.max(jnp.abs(yb), axis=-1, keepdims=True)
  amax = jax.lax.stop_gradient(amax)
  if block_kind == "mx":  # E8M0 2^(⌊log2 amax⌋ − emax) clamped to 2^−127 … 2^127, built from amax's exponent bits
    ebits = jax.lax.bitcast_convert_type(amax, jnp.int32) >> 23  # amax ≥ 0; 0 for zero and subnormal amax
    biased = jnp.clip(ebits - emax, 0, 254)  # a subnormal amax is below 2^−126: clamps to 0 like frexp's exponent
    s_b = jax.lax.bitcast_convert_type(jnp.where(biased > 0, biased << 23, 0x00400000), jnp.float32)  # 0: 2^−127
  else:  # E4M3(min(amax / 6, 448)), rounded like the cast
    fp8 = _element("fp8_e4m3")
    s_b = _round_arith(jnp.minimum(amax * (np.float32(1.0) / np.float32(6.0)), _E4M3_MAX), fp8.ef_lo, fp8.ef_hi,
                       fp8.mshift)
  s_b = jnp.where(jnp.isfinite(amax), s_b, jnp.nan)  # inf/NaN in a block: the MX spec's NaN scale
  if np.ndim(ratio) == 0:
    step = ratio * s_b
  else:
    step = _blocks_of(jnp.broadcast_to(ratio, y.shape), axis, block)[0] * s_b
  ok = step > 0  # a zero (or flushed-subnormal) block scale: the block quantizes to zero
  v = jnp.where(ok, yb * (1.0 / jnp.where(ok, step, 1.0)), jnp.where(jnp.isnan(step), jnp.nan, 0.0))
  return restore(v), restore(jnp.broadcast_to(step, yb.shape))


def _in_blocks(a: jax.Array, ndim: int, axis: int) -> jax.Array:
  """An array broadcastable to x with size 1 along `axis`, in the (…, 1 block, 1) layout of `_blocks_of`."""
  a = jnp.reshape(a, (1,) * (ndim - np.ndim(a)) + np.shape(a))
  return jnp.moveaxis(a, axis, -1)[..., None]


def _block_xmax(x32: jax.Array, axis: int, blocks: Sequence[int]) -> dict[int, jax.Array]:
  """Each block's max |x| for each block size; a size that nests in a smaller one (32 in 16) reuses its maxima."""
  out: dict[int, jax.Array] = {}
  n = x32.shape[axis]
  for b in sorted(set(blocks)):
    small = next((a for a in out if (n <= a) or (n % b == 0 and b % a == 0)), None)
    if small is None:
      out[b] = _abs_max(_blocks_of(x32, axis, b)[0])
    elif n <= small:  # one (short) block either way
      out[b] = out[small]
    else:  # (…, n/a, 1) → (…, n/b, b/a) → max
      m = out[small]
      out[b] = _abs_max(m.reshape(m.shape[:-2] + (n // b, b // small)))
  return out


@functools.partial(jax.jit, static_argnames=("formats", "axis"))
def _by_index(x32: jax.Array, index: jax.Array, scale, ratio: jax.Array, *, formats: tuple[str, ...],
              axis: int) -> jax.Array:
  """Fake quantization to ``formats[index]`` without a per-format conditional.

  Each kind of format in `formats` (scalar, MX, NVFP4) yields its v = x / step and step per element (block
  kinds: after their block scales), the format's constants gathered by `index`; the chosen kind's v and
  step are selected (jnp.where, when more than one kind occurs) and go through one element rounding.
  """
  tab = _tables(formats)
  index = jnp.clip(index, 0, len(formats) - 1)  # a traced index out of range is clamped (as lax.switch did)
  get = lambda k: jnp.asarray(tab[k])[index]  # noqa: E731
  el = {k: get(k) for k in ("lo", "hi", "ef_lo", "ef_hi", "mshift", "nan_out")}
  kinds = tuple(k for k in KINDS if k in {KINDS[i] for i in tab["kind"]})
  kid = get("kind") if len(kinds) > 1 else KINDS.index(kinds[0])
  is_ = lambda k: kid == KINDS.index(k)  # noqa: E731
  if scale is None:  # max scaling: amax / largest (scalar), 1 (MX), amax / (6·448) (NVFP4)
    scale = jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.abs(x32)) * get("inv_denom"), _TINY))
    if "mx" in kinds:
      scale = jnp.where(is_("mx"), jnp.float32(1.0), scale)
  # A kind that is not chosen computes on scale and ratio 1: its result is dropped, and the jnp.where that
  # substitutes them also keeps that kind's gradients (NaN where its blocks hold a NaN) out of scale's and ratio's.
  own = lambda k, a: a if len(kinds) == 1 else jnp.where(is_(k), a, jnp.float32(1.0))  # noqa: E731
  cands = {}  # kind → (v, step, the per-tensor scale S a block kind multiplies in after rounding)
  if "scalar" in kinds:
    step = own("scalar", scale) * own("scalar", ratio)
    cands["scalar"] = (x32 * (1.0 / step), step, None)
  block_kinds = [k for k in kinds if k != "scalar"]
  if block_kinds:
    sizes = {"mx": 32, "nvfp4": SPECS["nvfp4"].block_size}
    constant = np.ndim(scale) < x32.ndim - axis or np.shape(scale)[axis - x32.ndim] == 1  # S constant along axis
    xmax = _block_xmax(x32, axis, [sizes[k] for k in block_kinds]) if constant else {}
    for k in block_kinds:
      s_k = own(k, scale)
      cands[k] = _block_candidate(x32, 1.0 / s_k, own(k, ratio), k, get("emax") if k == "mx" else None, axis,
                                  sizes[k], xmax.get(sizes[k])) + (s_k,)
  v, step, s_blk = cands[kinds[-1]]
  for k in kinds[-2::-1]:
    v, step = jnp.where(is_(k), cands[k][0], v), jnp.where(is_(k), cands[k][1], step)
    if k != "scalar":
      s_blk = jnp.where(is_(k), cands[k][2], s_blk)
  out = _ste_round_arith(v, el) * step
  if not block_kinds:
    return out
  if "scalar" not in kinds:
    return out * s_blk
  return jnp.where(is_("scalar"), out, out * s_blk)


def largest_values(formats: Sequence[str] = FORMATS) -> jax.Array:
  """Each format's largest element value (int_b: 2^(b−1)−1, fp8_e4m3: 448, mxint8: 127/64, …), shape (n,)."""
  formats = _check_formats("largest_values", formats)
  return jnp.asarray([SPECS[f].largest for f in formats], jnp.float32)


def max_scale(x: jax.Array, fmt: str, *, channel_axis: int | None = None) -> jax.Array:
  """The max-scaling `scale` of `fmt` for x: what ``scale=None`` uses.

  Scalar formats amax / largest, MX 1, NVFP4 amax / (6·448); per tensor (a scalar) or, with
  `channel_axis`, per channel with the other axes kept as 1 (broadcastable to x).
  """
  fn = "max_scale"
  _checks.check_choice(fn, "format", fmt, FORMATS)
  x = _check_x(fn, x)
  if channel_axis is not None:
    channel_axis = _check_axis(fn, channel_axis, x.ndim)
  return _default_scale(quant.at_least_f32(x).astype(jnp.float32), SPECS[fmt], channel_axis)


def max_scales(x: jax.Array, formats: Sequence[str] = FORMATS, *, channel_axis: int | None = None) -> jax.Array:
  """`max_scale` for every format, stacked on a leading axis: ``max_scales(x, fs)[i]`` scales ``fs[i]``."""
  formats = _check_formats("max_scales", formats)
  return jnp.stack([max_scale(x, f, channel_axis=channel_axis) for f in formats])


def block_scales(x: jax.Array, fmt: str, scale: jax.Array | float | None = None, *, axis: int = -1,
                 block_size: int | None = None) -> jax.Array:
  """The block scales a block format stores for x: E8M0 (MX) or E4M3 (NVFP4) values.

  Shape: x's with `axis` replaced by the number of blocks (⌈n / block⌉). `scale` is the
  per-tensor scale as in `fake_quantize`; the scales are those of ratio 1.
  """
  fn = "block_scales"
  _checks.check_choice(fn, "format", fmt, BLOCK_FORMATS)
  sp = SPECS[fmt]
  x = _check_x(fn, x)
  axis = _check_axis(fn, axis, x.ndim)
  _check_array_arg(fn, "scale", scale, x.shape)
  x32 = quant.at_least_f32(x).astype(jnp.float32)
  y = x32 * (1.0 / (_default_scale(x32, sp) if scale is None else quant.at_least_f32(scale)))
  yb, _ = _to_blocks(y, axis, block_size or sp.block_size)
  s = _block_scales(jnp.max(jnp.abs(yb), axis=-1), sp)
  return jnp.moveaxis(s, -1, axis)
