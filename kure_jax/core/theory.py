"""Quantization MSE and step sensitivity of uniform vs Gaussian weights (KURE §3).

The KURE paper ("Robust Quantization: One Model to Rule Them All", NeurIPS 2020)
argues that a uniform weight distribution is more robust to a change of the
quantization step than a Gaussian one, so that a model trained towards uniform
weights (kurtosis 1.8) keeps its accuracy when deployed at another bit-width or step.
This module computes both sides of that argument for the paper's weight grid.

Quantizer ("midrise"): M bits, step Δ, L = 2^(M−1), levels (k+½)Δ for k = −L … L−1
(2^M levels, no zero), ``Q(x) = Δ·clip(floor(x/Δ) + ½, −L+½, L−½)``; inputs beyond
±LΔ map to the outermost level ±(L−½)Δ.

Two MSE models, selected by ``model=``:

* ``"exact"``: the true E[(X − Q(X))²] of that quantizer, in closed form (uniform: a
  piecewise cubic; Gaussian: a sum of per-bin Gaussian integrals). Use this one to
  make statements about real quantizers.
* ``"paper"``: the supplementary material's additive-noise model (Lemma 2 for
  U[−a, a], and its ACIQ-style analogue for N(0, σ²)): inside ±LΔ the error is
  U[−Δ/2, Δ/2] noise (variance Δ²/12), outside it is the clipping error.

Sensitivity is the paper's Γ(X, ε) = |MSE(Δ̃ + ε) − MSE(Δ̃)|, computed either
directly (`sensitivity`) or by Lemma 1's Taylor term ½·|MSE''(Δ̃)|·ε²
(`sensitivity_taylor`).

What the numbers say (equal variance σ², a = √3·σ, equal absolute ε; the tests
check all of this for M = 2 … 8):

* Taken literally (``model="paper"``, Lemma 1 at Lemma 3's step Δ̃ = 2a/2^M for
  the uniform, at the model optimum for the Gaussian), Γ_U = ε²/12 exactly and
  Γ_G > Γ_U: the paper's claim. It rests on Lemma 2 using the Δ²/12 branch at
  Δ̃ = a/L exactly: that is the model's branch point, where its curvature jumps from
  ½ (clipping side) to 1/6, and not even the model's minimiser.
* Exactly (``model="exact"``, each distribution at its own optimum), the bounded
  uniform is *more* sensitive: its curvature at Δ̃ = a/L is L − ½ (grows with the
  bit-width) while the Gaussian's is O(1); e.g. M = 4, σ = 1, ε = 0.00433:
  Γ_U ≈ 6.4e-5 vs Γ_G ≈ 1.4e-5. The same holds for the paper's noise model at its
  true minimiser 2a/(2^M + 1) (curvature L there).
* What does hold exactly is the robustness KURE needs: the uniform's MSE stays below
  the Gaussian's *optimal* MSE over a wide band of steps around its own optimum
  (at least 0.97 … 1.35 × Δ̃ for every M = 2 … 8; e.g. 0.84 … 1.74 at M = 4). The
  band is lopsided at high bit-widths: steps that are too small cost more.

All functions are pure JAX: `bits` and the step may be traced (``jit``/``vmap``/
``grad``); L = 2^(bits−1) is computed in floating point and there is no Python
control flow on values. Precision: float32 (the JAX default) gives MSEs to ~1e-6
relative; small differences of MSEs (Γ at ε ≲ 1e-3·Δ̃) and second derivatives at
high bit-widths want ``jax.enable_x64(True)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erfc

from kure_jax import _checks

MODELS = ("exact", "paper")

# Gauss–Legendre rule for narrow Gaussian bins: the closed form G(m+h) − G(m−h)
# cancels catastrophically for h ≪ 1 (its terms are O(h), the result O(h³)), while
# the integrand t²·φ(m+t) on [−h, h] is positive and entire, so 12 nodes are exact to
# float64 round-off for h < 1. Wide bins (h ≥ 1) use the closed form, which is
# accurate there.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(12)
_H_SWITCH = 1.0
_SQRT2 = math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _float(x) -> jax.Array:
  """`x` as an array of the default float type (float32, or float64 under x64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.result_type(float)))


def _num_levels_half(bits) -> jax.Array:
  """L = 2^(bits−1) in floating point (bits may be traced)."""
  return 2.0 ** (_float(bits) - 1.0)


def _phi(z: jax.Array) -> jax.Array:
  return _INV_SQRT2PI * jnp.exp(-0.5 * z * z)


def _upper_tail(z: jax.Array) -> jax.Array:
  """Q(z) = P(N(0,1) > z) = ½·erfc(z/√2); accurate far in the upper tail."""
  return 0.5 * erfc(z / _SQRT2)


def _check(fn: str, bits, model: str, **positive) -> None:
  _checks.check_choice(fn, "model", model, MODELS)
  _checks.check_bits(fn, bits)
  for name, value in positive.items():
    _checks.check_positive(fn, name, value)


# ----------------------------------------------------------------------------- uniform


def uniform_mse(a: jax.Array | float, bits: jax.Array | int, step: jax.Array | float,
                model: str = "exact") -> jax.Array:
  """MSE of the midrise quantizer for X ~ U[−a, a].

  ``model="exact"``: by symmetry on [0, a] the positive side has inner bins
  k = 0 … L−2 ([kΔ, (k+1)Δ), level (k+½)Δ, error Δ³/12 each when fully covered) and
  the outermost bin [(L−1)Δ, ∞) with level (L−½)Δ. With n = min(floor(a/Δ), L−1)
  fully covered inner bins and r = a − nΔ the rest,
  ``MSE = [n·Δ³/12 + ((r − Δ/2)³ + (Δ/2)³)/3] / a``. This equals the
  full-bins + partial-bin + clipping split (c = LΔ) algebraically, but never branches
  at a = LΔ: for Δ ≤ a/(L−1) it is one cubic in Δ, so it is smooth around the
  optimum Δ̃ = a/L, where it equals Δ̃²/12 with curvature ∂²MSE/∂Δ² = L − ½.

  ``model="paper"`` (supplementary Lemma 2, additive noise + clipping):
  Δ²/12 if Δ ≥ a/L, else (a − LΔ)³/(3a) + 2^M·Δ³/(24a). At exactly Δ = a/L the
  Δ²/12 branch is taken (also for autodiff), as the paper does.

  Broadcasts over `a`, `bits`, `step`.
  """
  _check("uniform_mse", bits, model, a=a, step=step)
  a, step = _float(a), _float(step)
  big_l = _num_levels_half(bits)
  half = 0.5 * step
  if model == "exact":
    n = jnp.minimum(jnp.floor(a / step), big_l - 1.0)
    r = a - n * step
    total = n * step**3 / 12.0 + ((r - half) ** 3 + half**3) / 3.0
    return total / a
  clip = (a - big_l * step) ** 3 / (3.0 * a) + 2.0 * big_l * step**3 / (24.0 * a)
  return jnp.where(step >= a / big_l, step**2 / 12.0, clip)


def uniform_optimal_step(a: jax.Array | float, bits: jax.Array | int) -> jax.Array:
  """Lemma 3's step Δ̃ = 2a/2^M = a/L for X ~ U[−a, a].

  It is the exact minimiser of ``uniform_mse(model="exact")`` (MSE = Δ̃²/12 there).
  It is *not* the minimiser of the paper's own Lemma 2 model, which is
  2a/(2^M + 1) (the model then also gives Δ²/12, at the smaller step).
  """
  _checks.check_bits("uniform_optimal_step", bits)
  _checks.check_positive("uniform_optimal_step", "a", a)
  return _float(a) / _num_levels_half(bits)


# ---------------------------------------------------------------------------- gaussian


def _bin_integral(m: jax.Array, h: jax.Array) -> jax.Array:
  """∫_{m−h}^{m+h} (z − m)² φ(z) dz for standardised z (h broadcasts against m)."""
  h = jnp.broadcast_to(h, jnp.broadcast_shapes(jnp.shape(m), jnp.shape(h)))
  x = jnp.asarray(_GL_X, m.dtype)
  w = jnp.asarray(_GL_W * _GL_X**2, m.dtype)
  gl = h**3 * jnp.sum(w * _phi(m[..., None] + h[..., None] * x), axis=-1)
  closed = ((1.0 + m * m) * (_upper_tail(m - h) - _upper_tail(m + h))
            + (m - h) * _phi(m + h) - (m + h) * _phi(m - h))
  return jnp.where(h < _H_SWITCH, gl, closed)


def _tail_integral(c: jax.Array, h: jax.Array) -> jax.Array:
  """∫_c^∞ (z − (c − h))² φ(z) dz: the clipped tail with the outermost level c − h."""
  q, p = _upper_tail(c), _phi(c)
  return (1.0 + c * c) * q - c * p + 2.0 * h * (p - c * q) + h * h * q


def _sum_last(x: jax.Array, block: int = 256) -> jax.Array:
  """Two-level (blocked) sum over the last axis: keeps float32 round-off ~1e-6."""
  k = x.shape[-1]
  if k <= block:
    return jnp.sum(x, axis=-1)
  pad = (-k) % block
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return jnp.sum(jnp.sum(x.reshape(x.shape[:-1] + (-1, block)), axis=-1), axis=-1)


def _num_inner_terms(bits, max_bits: int, model: str = "exact") -> int:
  """Static number of inner-bin terms (a compile-time constant).

  L − 1 for concrete bits (at least 127, so bits ≤ 8 share one compilation), else
  2^(max_bits−1) − 1; the paper model needs none.
  """
  if model != "exact":
    return 1
  b = _checks.concrete(bits)
  top = int(np.max(b)) if b is not None and b.size else max_bits
  return max(2 ** (top - 1) - 1, 127)


@functools.partial(jax.jit, static_argnames=("model", "num_terms"))
def _gaussian_mse_std(bits, d: jax.Array, model: str, num_terms: int) -> jax.Array:
  """MSE for N(0, 1) at standardised step d."""
  big_l = _num_levels_half(bits)
  big_l, d = jnp.broadcast_arrays(big_l.astype(d.dtype), d)
  h = 0.5 * d
  c = big_l * d
  if model == "paper":
    q = _upper_tail(c)
    return d * d / 12.0 * (1.0 - 2.0 * q) + 2.0 * ((1.0 + c * c) * q - c * _phi(c))
  # Inner bins k = 0 … L−2, masked beyond L−2 (bits may be traced, the count is static).
  k = jnp.arange(num_terms, dtype=d.dtype)
  valid = k <= (big_l - 2.0)[..., None]
  m = (jnp.where(valid, k, 0.0) + 0.5) * d[..., None]
  inner = _sum_last(jnp.where(valid, _bin_integral(m, h[..., None]), 0.0))
  # Outermost bin [(L−1)Δ, ∞) with level (L−½)Δ: its half-bin pair plus the tail.
  m_out = c - h
  outer = _bin_integral(m_out, h) + _tail_integral(c, h)
  return 2.0 * (inner + outer)


def gaussian_mse(sigma: jax.Array | float, bits: jax.Array | int, step: jax.Array | float,
                 model: str = "exact", *, max_bits: int = 16) -> jax.Array:
  """MSE of the midrise quantizer for X ~ N(0, σ²).

  ``model="exact"``: 2 × the positive side, a sum over bins of the closed-form
  ∫(z − m)²φ(z)dz = G(β) − G(α), G(z) = −(1 + m²)·Q(z) − (z − 2m)·φ(z),
  Q(z) = ½·erfc(z/√2), in standardised units z = x/σ, times σ². Narrow bins
  (Δ < 2σ) use a 12-node Gauss–Legendre rule of the same integral instead, because
  the G difference cancels catastrophically there (in float32 it is off by 0.6% at
  8 bits and meaningless by 12 bits). The outermost bin [(L−1)Δ, ∞) is one bin plus
  the closed-form tail. The inner-bin count is static: L − 1 when `bits` is concrete,
  else 2^(max_bits−1) − 1 terms masked to k ≤ L − 2 (so traced bits up to `max_bits`
  are exact; a smaller `max_bits` makes traced calls cheaper).

  ``model="paper"``: additive-noise / clipping model (ACIQ style), c = LΔ:
  (Δ²/12)·(1 − 2Q(c/σ)) + 2σ²[(1 + c²/σ²)·Q(c/σ) − (c/σ)·φ(c/σ)].

  Broadcasts over `sigma`, `bits`, `step`. Float32 relative accuracy ~1e-6.
  """
  _check("gaussian_mse", bits, model, sigma=sigma, step=step)
  sigma, step = _float(sigma), _float(step)
  sigma, step = jnp.broadcast_arrays(sigma, step)
  terms = _num_inner_terms(bits, max_bits, model)
  return sigma**2 * _gaussian_mse_std(bits, step / sigma, model, terms)


def gaussian_optimal_step(sigma: jax.Array | float, bits: jax.Array | int, model: str = "exact",
                          *, max_bits: int = 16, num_grid: int = 48,
                          num_bisect: int = 40) -> jax.Array:
  """argmin_Δ gaussian_mse(σ, bits, Δ, model), for scalar σ and bits.

  A log-spaced grid of `num_grid` clipping levels c = LΔ/σ in [0.2, 12] is evaluated
  (vmapped) to bracket the minimum between the best point's neighbours, then the root
  of ∂MSE/∂Δ (autodiff) is bisected `num_bisect` times in log Δ with
  ``lax.fori_loop``. Bisecting the derivative rather than the MSE reaches float
  round-off (relative ~1e-6 in float32) where the MSE itself is flat. Known values
  (σ = 1, exact; Max 1960): M=2 → 0.9957, M=3 → 0.5860, M=4 → 0.3352.
  Jit/vmap friendly (vmap over a vector of bits works).
  """
  _check("gaussian_optimal_step", bits, model, sigma=sigma)
  sigma = _float(sigma)
  terms = _num_inner_terms(bits, max_bits, model)
  return sigma * _gaussian_optimal_std(bits, sigma.dtype, model, terms, num_grid, num_bisect)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _gaussian_optimal_std(bits, dtype, model: str, num_terms: int, num_grid: int,
                          num_bisect: int) -> jax.Array:
  """Optimal standardised step (σ = 1) in `dtype`."""
  big_l = _num_levels_half(bits).astype(dtype)

  def mse(d):
    return _gaussian_mse_std(bits, d, model, num_terms)

  clips = jnp.exp(jnp.linspace(math.log(0.2), math.log(12.0), num_grid, dtype=dtype))
  grid = clips / big_l
  i = jnp.argmin(jax.vmap(mse)(grid))
  lo = jnp.log(grid[jnp.maximum(i - 1, 0)])
  hi = jnp.log(grid[jnp.minimum(i + 1, num_grid - 1)])
  slope = jax.grad(mse)

  def bisect(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    rising = slope(jnp.exp(mid)) > 0
    return jnp.where(rising, lo, mid), jnp.where(rising, mid, hi)

  lo, hi = jax.lax.fori_loop(0, num_bisect, bisect, (lo, hi))
  return jnp.exp(0.5 * (lo + hi))


# ------------------------------------------------------------------------- sensitivity


def _split_partial(mse_fn) -> tuple | None:
  """Split ``partial(uniform_mse | gaussian_mse, scale, bits, **kw)`` into (func, kw, args).

  Such partials are evaluated by one jitted function per (func, keywords) with scale
  and bits as traced arguments, so a sweep over bit-widths compiles once instead of
  once per partial. Anything else returns None and runs eagerly as given.
  """
  if not (isinstance(mse_fn, functools.partial) and mse_fn.func in (uniform_mse, gaussian_mse)
          and len(mse_fn.args) == 2):
    return None
  keywords = tuple(sorted({"model": "exact", **mse_fn.keywords}.items()))
  try:
    hash(keywords)
  except TypeError:
    return None
  scale, bits = mse_fn.args
  name = mse_fn.func.__name__
  scale_name = "a" if name == "uniform_mse" else "sigma"
  _check(name, bits, dict(keywords)["model"], **{scale_name: scale})
  return mse_fn.func, keywords, (_float(scale), _float(bits))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _gamma_jit(func, keywords, args, step, flat_eps):
  f = lambda s: func(*args, s, **dict(keywords))  # noqa: E731
  return jnp.abs(jax.vmap(f)(step + flat_eps) - f(step))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _curvature_jit(func, keywords, args, step):
  return jax.grad(jax.grad(lambda s: func(*args, s, **dict(keywords))))(step)


def sensitivity(mse_fn: Callable[[jax.Array], jax.Array], step_opt: jax.Array | float,
                eps: jax.Array | float) -> jax.Array:
  """Γ(ε) = |MSE(Δ̃ + ε) − MSE(Δ̃)| (the paper's Definition), directly.

  `mse_fn` maps a scalar step to the MSE (e.g. ``functools.partial(uniform_mse, a,
  bits)``; partials of this module's MSEs take a compiled-once fast path); `eps` may be
  any shape (vmapped). Float32: fine while Γ ≳ 1e-4·MSE.
  """
  step_opt = _float(step_opt)
  eps = _float(eps)
  split = _split_partial(mse_fn)
  if split is not None:  # pad to a power-of-two length: fewer distinct compilations
    flat = eps.reshape(-1)
    padded = jnp.pad(flat, (0, max(8, 1 << (flat.size - 1).bit_length()) - flat.size))
    return _gamma_jit(*split, step_opt, padded)[: flat.size].reshape(eps.shape)
  shifted = jax.vmap(mse_fn)(step_opt + eps.reshape(-1)).reshape(eps.shape)
  return jnp.abs(shifted - mse_fn(step_opt))


def sensitivity_taylor(mse_fn: Callable[[jax.Array], jax.Array], step_opt: jax.Array | float,
                       eps: jax.Array | float) -> jax.Array:
  """Lemma 1: Γ(ε) ≈ ½·|∂²MSE/∂Δ²(Δ̃)|·ε², second derivative by autodiff.

  Valid at a stationary point Δ̃ for small ε. `eps` may be any shape. Same fast path
  for partials of this module's MSEs as `sensitivity`.
  """
  step_opt = _float(step_opt)
  split = _split_partial(mse_fn)
  if split is not None:
    curvature = _curvature_jit(*split, step_opt)
  else:
    curvature = jax.grad(jax.grad(mse_fn))(step_opt)
  return 0.5 * jnp.abs(curvature) * _float(eps) ** 2


# ---------------------------------------------------------------------------- plotting


def plot_sensitivity(path: str, bits: tuple[int, ...] = (2, 3, 4), sigma: float = 1.0) -> None:
  """Write one PNG comparing U[−√3σ, √3σ] and N(0, σ²) (equal variance).

  Top row, one panel per bit-width: MSE(Δ) for both distributions, exact (solid) and
  the paper's model (dashed), optima marked, and Monte Carlo dots: the MSE of the
  library's own quantizer (`kure_jax.core.quant.quantize`, midrise grid) on 2·10⁵ samples. Bottom row: Γ(ε) for the same absolute
  ε ∈ [0, 0.3·Δ̃_U]: exact direct difference at each exact optimum (solid) and the
  paper's Lemma 1 on the paper's model (dashed; Lemma 3's step for the uniform, the
  model optimum for the Gaussian).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from kure_jax.core import quant

  a = math.sqrt(3.0) * sigma
  key_u, key_g = jax.random.split(jax.random.key(0))
  samples = {"U": jax.random.uniform(key_u, (200_000,), minval=-a, maxval=a),
             "G": sigma * jax.random.normal(key_g, (200_000,))}
  colors = {"U": "tab:blue", "G": "tab:orange"}
  names = {"U": "uniform", "G": "Gaussian"}
  fig, axes = plt.subplots(2, len(bits), figsize=(13, 7), squeeze=False, layout="constrained")
  for col, m_bits in enumerate(bits):
    u_opt = float(uniform_optimal_step(a, m_bits))
    g_opt = float(gaussian_optimal_step(sigma, m_bits))
    g_opt_paper = float(gaussian_optimal_step(sigma, m_bits, model="paper"))
    fns = {
        ("U", "exact"): functools.partial(uniform_mse, a, m_bits),
        ("U", "paper"): functools.partial(uniform_mse, a, m_bits, model="paper"),
        ("G", "exact"): functools.partial(gaussian_mse, sigma, m_bits),
        ("G", "paper"): functools.partial(gaussian_mse, sigma, m_bits, model="paper"),
    }

    ax = axes[0, col]
    steps = jnp.linspace(0.4 * u_opt, 1.6 * max(u_opt, g_opt), 400)
    for (dist, model), fn in fns.items():
      exact = model == "exact"
      ax.plot(steps, jax.vmap(fn)(steps), color=colors[dist], ls="-" if exact else "--",
              lw=1.8 if exact else 1.4,
              label=f"{names[dist]}, {'exact MSE' if exact else 'paper model'}")
    mc_steps = steps[::25]
    for dist, x in samples.items():
      mc = jax.vmap(lambda d, x=x: jnp.mean(jnp.square(quant.quantize(x, d, m_bits, "midrise") - x)))(mc_steps)
      ax.plot(mc_steps, mc, "s", mfc="none", color=colors[dist], ms=4,
              label=f"{names[dist]}, Monte Carlo (2·10⁵ samples)")
    ax.plot([u_opt], [fns["U", "exact"](u_opt)], "o", color=colors["U"], ms=7,
            label="uniform optimum (= Lemma 3 step)")
    ax.plot([g_opt], [fns["G", "exact"](g_opt)], "o", color=colors["G"], ms=7,
            label="Gaussian optimum (exact)")
    ax.plot([g_opt_paper], [fns["G", "paper"](g_opt_paper)], "x", color=colors["G"], ms=8, mew=2,
            label="Gaussian optimum (paper model)")
    ax.set_yscale("log")
    ax.set_title(f"M = {m_bits} bits: MSE vs step\noptimal steps: uniform {u_opt:.3f}, "
                 f"Gaussian {g_opt:.3f}", fontsize=10)
    ax.set_xlabel("step Δ")
    ax.set_ylabel("MSE (log scale)")
    ax.grid(alpha=0.3, which="both")
    if col == len(bits) - 1:  # the empty corner: above the curves, right of the optima
      ax.legend(fontsize=7, loc="upper right", framealpha=0.9)

    ax = axes[1, col]
    eps = jnp.linspace(0.0, 0.3 * u_opt, 200)
    curves = {
        "uniform, exact Γ": (sensitivity(fns["U", "exact"], u_opt, eps), colors["U"], "-"),
        "Gaussian, exact Γ": (sensitivity(fns["G", "exact"], g_opt, eps), colors["G"], "-"),
        "uniform, paper Lemma 1 (= ε²/12)": (sensitivity_taylor(fns["U", "paper"], u_opt, eps),
                                             colors["U"], "--"),
        "Gaussian, paper Lemma 1": (sensitivity_taylor(fns["G", "paper"], g_opt_paper, eps),
                                    colors["G"], "--"),
    }
    for label, (values, color, ls) in curves.items():
      ax.plot(eps, values, color=color, ls=ls, lw=1.8 if ls == "-" else 1.4, label=label)
    # small-ε ratio Γ_U/Γ_G = ratio of curvatures at the respective optima
    curv = {key: float(sensitivity_taylor(fns[key], step, 1.0))
            for key, step in ((("U", "exact"), u_opt), (("G", "exact"), g_opt),
                              (("U", "paper"), u_opt), (("G", "paper"), g_opt_paper))}
    ax.set_title(f"M = {m_bits} bits: sensitivity Γ(ε) = |MSE(Δ̃+ε) − MSE(Δ̃)|\n"
                 f"small-ε ratio Γ_U/Γ_G: exact {curv['U', 'exact'] / curv['G', 'exact']:.1f}, "
                 f"paper {curv['U', 'paper'] / curv['G', 'paper']:.2f}", fontsize=10)
    ax.set_xlabel("step perturbation ε (same absolute ε for both)")
    ax.set_ylabel("Γ(ε)")
    ax.grid(alpha=0.3)
    if col == 0:
      ax.legend(fontsize=7, loc="upper left")

  fig.suptitle(
      f"Uniform U[−√3σ, √3σ] vs Gaussian N(0, σ²), equal variance σ² = {sigma**2:g}; "
      "midrise quantizer with 2^M levels.\nSolid: exact. Dashed: the paper's additive-noise model "
      "(Lemmas 1–3), which makes the uniform less sensitive; exactly, the uniform is more "
      "sensitive,\nbut its MSE stays below the Gaussian's best MSE over a wide band of steps.",
      fontsize=10)
  fig.savefig(path, dpi=110)
  plt.close(fig)
