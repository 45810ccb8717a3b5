"""Fake quantization with a straight-through estimator, and step-size pickers.

Everything here is a pure function of arrays: `bits` and `step` may be traced
(``jax.vmap`` over a vector of bit-widths or step ratios works); only `grid` and
`axis` are static. Quantizing is ``Q(x) = Δ · clip(round(x / Δ), q_min, q_max)``
on one of four grids (M = bits, L = 2^(M−1)):

==========  ==================================  ==============================
grid        levels (times Δ)                    use
==========  ==================================  ==============================
signed      −L, …, L−1 (two's complement)       weights, integer accelerators
narrow      −(L−1), …, L−1 (symmetric, 2^M−1)   weights (symmetric int grids)
midrise     ±½, ±3/2, …, ±(L−½) (2^M, no zero)  weights in the KURE paper's code
unsigned    0, …, 2^M−1                         activations after ReLU
sliding     −1 + jΔ, every integer j, unclipped   DoReFa's perturbed grid (below)
==========  ==================================  ==============================

The sliding grid is for DoReFa's normalized weights in [−1, 1]: its zero point is pinned
at −1 and nothing is clipped, so at Δ = 2/(2^M − 1) it is DoReFa's 2^M-level grid
exactly, and at another Δ the grid slides and gains or loses levels (the authors scale
DoReFa's 2^M − 1 by a ratio r, i.e. Δ = Δ̃/r: 11 levels at r = 0.7, 21 at 1.3 for 4 bits).

Rounding rule: integer grids round half to even (``jnp.round``, like ``torch.round``
and IEEE ``roundeven``), so ties are unbiased; midrise uses ``floor(x/Δ) + ½``
(the nearest odd multiple of Δ/2, ties going up). Values beyond the outermost level
are clipped to it.

Gradients: for x, the straight-through estimator: 1 where ``q_min ≤ x/Δ ≤ q_max``
(inside the clipping range), 0 outside. For Δ, the LSQ gradient (Esser et al. 2019):
``round(x/Δ) − x/Δ`` inside, ``q_min`` or ``q_max`` outside. Scale it with
`grad_scale` for LSQ's g = 1/√(N·Q_P). No gradient flows to `bits`.

Checks: with concrete inputs, bad `bits` (not whole, < 1 or > 16; narrow needs ≥ 2),
a step that is not finite and > 0, an empty tensor, an unknown grid or a bad axis
raise ValueError naming the argument. Under ``jit``/``vmap`` the values of `bits`
and `step` are tracers and are not checked: a non-positive step then gives
meaningless output (zeros or NaN, no error) and out-of-range bits meaningless levels (shapes, the grid and the axis
are still checked).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kure_jax import _checks

GRIDS = ("signed", "narrow", "midrise", "unsigned", "sliding")
POW2_MODES = ("nearest", "floor", "ceil")
ACIQ_DISTS = ("gauss", "laplace")

_TINY = float(np.finfo(np.float32).tiny)


def at_least_f32(x) -> jax.Array:
  """x as an array of float32 or wider (bfloat16/float16 inputs are computed in float32)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


_f32 = at_least_f32


def levels(bits: jax.Array | int, grid: str = "signed") -> tuple[jax.Array, jax.Array]:
  """(q_min, q_max): the outermost levels of `grid` in units of Δ."""
  _checks.check_choice("levels", "grid", grid, GRIDS)
  half = 2.0 ** (_f32(jax.lax.stop_gradient(bits)) - 1.0)  # L = 2^(M-1)
  if grid == "signed":
    return -half, half - 1.0
  if grid == "narrow":
    return -(half - 1.0), half - 1.0
  if grid == "midrise":
    return -(half - 0.5), half - 0.5
  if grid == "sliding":  # unclipped
    return jnp.full_like(half, -jnp.inf), jnp.full_like(half, jnp.inf)
  return jnp.zeros_like(half), 2.0 * half - 1.0


def half_range(bits: jax.Array | int, grid: str = "signed") -> jax.Array:
  """The clipping value in units of Δ: L for symmetric grids, 2^M for unsigned.

  Clipping value α and step relate by ``α = half_range · Δ`` (for midrise it is exactly
  the edge of the outermost bin; for signed/narrow it is the nominal range 2^(M−1)Δ).
  """
  _checks.check_choice("half_range", "grid", grid, GRIDS)
  half = 2.0 ** (_f32(jax.lax.stop_gradient(bits)) - 1.0)
  return 2.0 * half if grid == "unsigned" else half


def _broadcast_step(step: jax.Array, ndim: int, axis: int | None, fn: str) -> jax.Array:
  step = _f32(step)
  if axis is None:
    return step
  if not -ndim <= axis < ndim:
    raise ValueError(f"{fn}: `axis` {axis} is out of range for a {ndim}-d tensor.")
  if step.ndim == 0:
    return step
  if step.ndim != 1:
    raise ValueError(f"{fn}: a per-channel `step` must be 1-d, got shape {step.shape}.")
  shape = [1] * ndim
  shape[axis] = step.shape[0]
  return step.reshape(shape)


def _round(v: jax.Array, grid: str) -> jax.Array:
  return jnp.floor(v) + 0.5 if grid == "midrise" else jnp.round(v)


def _quantize(x: jax.Array, step: jax.Array, bits: jax.Array, grid: str) -> jax.Array:
  """Unchecked fake quantization; `step` already broadcastable to x."""
  if grid == "sliding":  # −1 + Δ·round((x + 1)/Δ), no clipping
    v = (x + 1.0) / step
    return (v + jax.lax.stop_gradient(jnp.round(v) - v)) * step - 1.0
  qmin, qmax = levels(bits, grid)
  v = x / step
  ste = v + jax.lax.stop_gradient(_round(v, grid) - v)  # value round(v), gradient 1
  q = jnp.where(v < qmin, qmin, jnp.where(v > qmax, qmax, ste))
  return q * step


def picking_grid(weight_grid: str) -> str:
  """The grid a weight step is picked on: the sliding grid has DoReFa's midrise levels at ratio 1 and no range
  of its own; every other grid is its own."""
  return "midrise" if weight_grid == "sliding" else weight_grid


def quantize_traced(x: jax.Array, step: jax.Array, bits: jax.Array, grid: str) -> jax.Array:
  """`quantize` without its value checks, for callers whose bits and steps are traced (the models' hook):
  `step` already broadcastable to x, bits ≥ 1; computed in float32 (or wider), returned in x's dtype."""
  return _quantize(_f32(x), step, bits, grid).astype(jnp.asarray(x).dtype)


def quantize(x: jax.Array, step: jax.Array | float, bits: jax.Array | int, grid: str = "signed", *,
             axis: int | None = None) -> jax.Array:
  """Fake-quantize `x` (quantize then dequantize) with step Δ on an M-bit `grid`.

  Args:
    x: any float array.
    step: Δ > 0, a scalar, an array broadcastable to x, or with `axis` a 1-d array of
      per-channel steps along that axis (e.g. ``axis=-1`` for HWIO conv kernels).
    bits: M, an int or a (possibly traced) array; whole numbers in 1..16.
    grid: 'signed', 'narrow', 'midrise' or 'unsigned' (see the module docstring).
  Returns: an array like x (same dtype), on the grid.
  """
  _checks.check_choice("quantize", "grid", grid, GRIDS)
  _checks.check_nonempty("quantize", "x", x)
  _checks.check_bits("quantize", bits, lo=2 if grid == "narrow" else 1)
  _checks.check_positive("quantize", "step", step)
  x = jnp.asarray(x)
  step = _broadcast_step(step, x.ndim, axis, "quantize")
  return _quantize(_f32(x), step, bits, grid).astype(x.dtype)


def tanh_normalize(w: jax.Array) -> jax.Array:
  """tanh(w) / max|tanh(w)|: DoReFa's weight normalization to [−1, 1] (2w̃ − 1 in its notation)."""
  t = jnp.tanh(w)
  return t / jnp.maximum(jnp.max(jnp.abs(t)), 1e-12)


def round_ste(x: jax.Array) -> jax.Array:
  """round(x) in the forward pass, identity gradient in the backward pass."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def grad_scale(x: jax.Array, scale: jax.Array | float) -> jax.Array:
  """x in the forward pass, gradient multiplied by `scale` (LSQ's g = 1/√(N·Q_P))."""
  return x * scale + jax.lax.stop_gradient(x - x * scale)


# ----------------------------------------------------------------------------------
# Step pickers. All reduce over every axis except `axis` (per-channel steps when an
# axis is given, a scalar step otherwise) and accept traced bits.


def _reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...] | None:
  if axis is None:
    return None
  if not -ndim <= axis < ndim:
    raise ValueError(f"`axis` {axis} is out of range for a {ndim}-d tensor.")
  axis %= ndim
  return tuple(a for a in range(ndim) if a != axis)


def _prepare(fn: str, x, bits, grid: str, axis: int | None):
  _checks.check_choice(fn, "grid", grid, GRIDS)
  if grid == "sliding":
    raise ValueError(f"{fn}: the sliding grid has no clipping range to optimize a step for; pick the step on "
                     "'midrise' (the same levels at ratio 1) and use it here.")
  _checks.check_nonempty(fn, "x", x)
  _checks.check_bits(fn, bits, lo=2 if grid == "narrow" else 1)
  x = _f32(x)
  if axis is not None and not -x.ndim <= axis < x.ndim:
    raise ValueError(f"{fn}: `axis` {axis} is out of range for a {x.ndim}-d tensor.")
  return x, _reduce_axes(x.ndim, axis)


def max_step(x: jax.Array, bits: jax.Array | int, grid: str = "signed", *, axis: int | None = None) -> jax.Array:
  """The smallest Δ at which nothing is clipped: ``max(x_max / q_max, x_min / q_min)``."""
  x, red = _prepare("max_step", x, bits, grid, axis)
  qmin, qmax = levels(bits, grid)
  hi = jnp.max(x, axis=red)
  lo = jnp.min(x, axis=red)
  s_hi = jnp.where(qmax > 0, jnp.maximum(hi, 0.0) / jnp.where(qmax > 0, qmax, 1.0), 0.0)
  s_lo = jnp.where(qmin < 0, jnp.minimum(lo, 0.0) / jnp.where(qmin < 0, qmin, -1.0), 0.0)
  return jnp.maximum(jnp.maximum(s_hi, s_lo), _TINY)


# Coarse-to-fine search for the Lp-optimal step: a log-spaced scan of Δ/Δ_max over
# [2^-12, 1], then zooms into the bracket around the best candidate. Resolution after
# the last stage: (1.14²)^(1/15)^... ≈ 3e-4 relative, i.e. within 0.1% of the argmin.
_SCAN_LOG2_LO = -12.0
_SCAN_POINTS = 64
_ZOOM_POINTS = 16
_ZOOM_STAGES = 3
_MAP_ELEMENTS = 1 << 24  # elements evaluated at once, bounds memory for big kernels


def _lp_error(x: jax.Array, steps: jax.Array, bits, grid: str, p: float, red, axis) -> jax.Array:
  """Mean |Q(x) − x|^p for a batch of candidate steps, shape (K,) or (K, C)."""

  def one(step):
    s = step if axis is None else _broadcast_step(step, x.ndim, axis, "lp_step")
    d = jnp.abs(_quantize(x, s, bits, grid) - x)
    e = d * d if p == 2 else d**p
    return jnp.mean(e, axis=red)

  batch = max(1, min(steps.shape[0], _MAP_ELEMENTS // max(x.size, 1)))
  return jax.lax.map(one, steps, batch_size=batch)


def lp_step(x: jax.Array, bits: jax.Array | int, p: float = 2.0, grid: str = "signed", *,
            axis: int | None = None) -> jax.Array:
  """The Δ minimizing ``E|Q(x) − x|^p`` (p = 2: mean squared error), within 0.1%.

  A vectorized coarse-to-fine search (no Python loop over candidates; a fixed number
  of compiled stages), per tensor or per channel along `axis`.
  """
  if not float(p) > 0:
    raise ValueError(f"lp_step: `p` must be > 0, got {p}.")
  x, _ = _prepare("lp_step", x, bits, grid, axis)
  return _lp_step(x, bits, float(p), grid, axis)


@functools.partial(jax.jit, static_argnames=("p", "grid", "axis"))
def _lp_step(x: jax.Array, bits: jax.Array, p: float, grid: str, axis: int | None) -> jax.Array:
  """The compiled search behind `lp_step` (one compilation per shape, grid and axis)."""
  red = _reduce_axes(x.ndim, axis)
  top = max_step(x, bits, grid, axis=axis)  # (,) or (C,)
  log_top = jnp.log2(top)

  def search(lo, hi, n):
    """Evaluate n log-spaced ratios in [lo, hi] (log2 units, per channel); best and bracket."""
    t = jnp.linspace(0.0, 1.0, n).reshape((n,) + (1,) * jnp.ndim(lo))
    cand = lo + (hi - lo) * t  # (n,) or (n, C), log2 of Δ/Δ_max
    err = _lp_error(x, 2.0 ** (log_top + cand), bits, grid, p, red, axis)
    i = jnp.argmin(err, axis=0)
    take = lambda j: jnp.take_along_axis(cand, jnp.clip(j, 0, n - 1)[None], axis=0)[0]
    return take(i), take(i - 1), take(i + 1)

  shape = jnp.shape(top)
  best, lo, hi = search(jnp.full(shape, _SCAN_LOG2_LO), jnp.zeros(shape), _SCAN_POINTS)
  for _ in range(_ZOOM_STAGES):  # static, unrolled at trace time
    best, lo, hi = search(lo, hi, _ZOOM_POINTS)
  return jnp.maximum(2.0 ** (log_top + best), _TINY)


def mse_step(x: jax.Array, bits: jax.Array | int, grid: str = "signed", *, axis: int | None = None) -> jax.Array:
  """The MSE-optimal step Δ̃ (`lp_step` with p = 2)."""
  return lp_step(x, bits, 2.0, grid, axis=axis)


# ACIQ (Banner et al. 2019): clip at α = c_M · σ (Gaussian) or c_M · b (Laplace), where
# c_M minimizes the additive-noise model 2∫_α^∞ (x−α)² f(x) dx + α²/(3·4^M) for a unit
# distribution. The constants are computed once with SciPy for M = 1..17 (unsigned
# grids use M+1: 2^M levels on [0, α] have the step of 2^(M+1) levels on [−α, α]).


@functools.lru_cache(maxsize=None)
def aciq_constants(dist: str) -> np.ndarray:
  """c_M for M = 1..17: optimal clipping value / scale under ACIQ's noise model."""
  from scipy import optimize, stats  # local: only needed once

  def model(alpha, m):
    if dist == "gauss":
      clip = 2 * ((1 + alpha**2) * stats.norm.sf(alpha) - alpha * stats.norm.pdf(alpha))
    else:  # Laplace(0, b=1): 2∫_α^∞ (x−α)² ½e^{−x} dx = 2e^{−α}
      clip = 2 * np.exp(-alpha)
    return clip + alpha**2 / (3 * 4.0**m)

  out = []
  for m in range(1, 18):
    r = optimize.minimize_scalar(lambda a: model(a, m), bounds=(0.1, 60.0), method="bounded",
                                 options={"xatol": 1e-10})
    out.append(r.x)
  return np.asarray(out, dtype=np.float32)


def aciq_clip(x: jax.Array, bits: jax.Array | int, dist: str = "gauss", grid: str = "signed", *,
              axis: int | None = None) -> jax.Array:
  """ACIQ's analytic clipping value α for `x` (per tensor or per channel)."""
  _checks.check_choice("aciq_clip", "dist", dist, ACIQ_DISTS)
  x, red = _prepare("aciq_clip", x, bits, grid, axis)
  if grid == "unsigned":  # a ReLU output: fold around 0, one extra bit of range
    m = _f32(bits) + 1.0
    scale = jnp.sqrt(jnp.mean(x * x, axis=red)) if dist == "gauss" else jnp.mean(jnp.abs(x), axis=red)
  else:
    m = _f32(bits)
    mu = jnp.mean(x, axis=red, keepdims=True)
    d = x - mu
    scale = jnp.sqrt(jnp.mean(d * d, axis=red)) if dist == "gauss" else jnp.mean(jnp.abs(d), axis=red)
  table = jnp.asarray(aciq_constants(dist))
  idx = jnp.clip(jnp.round(m).astype(jnp.int32) - 1, 0, table.shape[0] - 1)
  return table[idx] * scale


def aciq_step(x: jax.Array, bits: jax.Array | int, dist: str = "gauss", grid: str = "signed", *,
              axis: int | None = None) -> jax.Array:
  """Δ = α_ACIQ / half_range(bits, grid)."""
  alpha = aciq_clip(x, bits, dist, grid, axis=axis)
  return jnp.maximum(alpha / half_range(bits, grid), _TINY)


def pow2_step(step: jax.Array, mode: str = "nearest") -> jax.Array:
  """Force Δ to a power of two, as shift-based accelerators do.

  'nearest' rounds log2 Δ (the nearest power in ratio, error ≤ √2×), 'floor' and
  'ceil' round it down or up. Ties in 'nearest' (Δ = √2·2^k) round to even exponents.
  """
  _checks.check_choice("pow2_step", "mode", mode, POW2_MODES)
  _checks.check_positive("pow2_step", "step", step)
  e = jnp.log2(_f32(step))
  r = {"nearest": jnp.round, "floor": jnp.floor, "ceil": jnp.ceil}[mode](e)
  return 2.0 ** jax.lax.stop_gradient(r)


def aciq_gauss_step(x: jax.Array, bits: jax.Array | int, grid: str = "signed", *,
                    axis: int | None = None) -> jax.Array:
  """`aciq_step` with ACIQ's Gaussian clipping."""
  return aciq_step(x, bits, "gauss", grid, axis=axis)


def aciq_laplace_step(x: jax.Array, bits: jax.Array | int, grid: str = "signed", *,
                      axis: int | None = None) -> jax.Array:
  """`aciq_step` with ACIQ's Laplace clipping."""
  return aciq_step(x, bits, "laplace", grid, axis=axis)


# Every base-step method by name, all with one signature: (x, bits, grid="signed", *, axis=None).
STEP_METHODS: dict[str, Callable[..., jax.Array]] = {
    "max": max_step,
    "mse": mse_step,
    "aciq_gauss": aciq_gauss_step,
    "aciq_laplace": aciq_laplace_step,
}
