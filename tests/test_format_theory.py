"""kure_jax.core.format_theory against SciPy quadrature, kure_jax.core.theory and Monte Carlo of fake_quantize."""

import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from kure_jax.core import format_theory as T
from kure_jax.core import theory
from kure_jax.core.formats import SCALAR_FORMATS, SPECS, fake_quantize

MC_BETAS = (math.inf, 2.0, 1.0, 0.5)  # kurtosis 1.8, 3, 6, 25.2
N_MC = 1 << 19
SURVIVAL_SPAN = 36.0  # survival probabilities down to e^-36


@functools.cache
def _stratified(beta: float) -> tuple[np.ndarray, np.ndarray]:
  """A stratified, importance-weighted Monte Carlo sample of unit-variance GG(β): (x, weights).

  Plain i.i.d. sampling cannot check heavy tails to 1% (at kurtosis 6 the rare clipped samples
  give int8 a standard error of ~3% with 2·10⁶ samples, ~18% at kurtosis 25). Here |x| is drawn
  at survival probabilities q = e^(−L·t), t stratified on (0, 1) with one uniform draw per
  stratum, weighted by dq/dt; every x is used with both signs (the integer grids are asymmetric).
  """
  rng = np.random.default_rng(20240601)
  t = (np.arange(N_MC) + rng.uniform(size=N_MC)) / N_MC
  q = np.exp(-SURVIVAL_SPAN * t)
  w = SURVIVAL_SPAN * q / N_MC / 2
  if math.isinf(beta):
    ax = T.SQRT3 * (1 - q)
  else:
    ax = T._alpha(beta) * special.gammainccinv(1 / beta, q) ** (1 / beta)
  return np.concatenate([ax, -ax]).astype(np.float32), np.concatenate([w, w])


def test_kurtosis_family():
  assert T.kurtosis(math.inf) == 1.8
  np.testing.assert_allclose([T.kurtosis(2.0), T.kurtosis(1.0), T.kurtosis(0.5)], [3.0, 6.0, 25.2], rtol=1e-12)
  for k in (1.9, 3.0, 6.0, 25.2):
    np.testing.assert_allclose(T.kurtosis(T.beta_for_kurtosis(k)), k, rtol=1e-9)
  assert T.beta_for_kurtosis(1.8) == math.inf
  with pytest.raises(ValueError, match="kurtosis must be ≥ 1.8"):
    T.beta_for_kurtosis(1.5)
  for beta in MC_BETAS:  # the weighted samples have unit mass, unit variance and the family's kurtosis
    x, w = _stratified(beta)
    x = x.astype(np.float64)
    np.testing.assert_allclose([np.sum(w), np.sum(w * x * x), np.sum(w * x**4)], [1, 1, T.kurtosis(beta)], rtol=1e-4)
  x = T.sample(1.0, 400_000, np.random.default_rng(0))  # the i.i.d. sampler too
  np.testing.assert_allclose([np.var(x), np.mean(x**4) / np.var(x) ** 2], [1.0, 6.0], rtol=0.05)


@pytest.mark.parametrize("fmt,count", [("int4", 16), ("int8", 256), ("fp8_e4m3", 253), ("fp8_e5m2", 247),
                                       ("fp6_e3m2", 63), ("fp6_e2m3", 63), ("fp4_e2m1", 15)])
def test_grid_is_the_formats_value_set(fmt, count):
  g = T.grid(fmt)
  assert len(g) == count and np.all(np.diff(g) > 0)
  scale = np.float32(0.5)
  np.testing.assert_array_equal(fake_quantize(jnp.asarray(g * scale, jnp.float32), fmt, scale), g * scale)


@pytest.mark.parametrize("fmt,beta,ratio", [("int4", 1.0, 1.0), ("int8", 0.5, 0.8), ("fp4_e2m1", 0.5, 1.3),
                                            ("fp6_e3m2", 1.3, 1.0), ("fp6_e2m3", math.inf, 0.9)])
def test_exact_mse_equals_quadrature(fmt, beta, ratio):
  s = T.optimal_scale(fmt, beta)[0] * ratio
  g = T.grid(fmt) * s
  edges = np.concatenate([[-np.inf], (g[1:] + g[:-1]) / 2, [np.inf]])
  if math.isinf(beta):
    edges = np.clip(edges, -T.SQRT3, T.SQRT3)
    pdf = lambda x: 1 / (2 * T.SQRT3)  # noqa: E731
  else:
    pdf = functools.partial(stats.gennorm.pdf, beta=beta, scale=T._alpha(beta))
  total = 0.0
  for k in range(len(g)):
    lo, hi = edges[k], edges[k + 1]
    if hi > lo:
      pts = [0.0] if lo < 0 < hi and np.isfinite(lo) and np.isfinite(hi) else None
      total += integrate.quad(lambda x, q=g[k]: (x - q) ** 2 * pdf(x), lo, hi, epsabs=1e-15, epsrel=1e-11,
                              points=pts, limit=200)[0]
  np.testing.assert_allclose(T.mse(fmt, beta, s), total, rtol=1e-8)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_grid_mse_equals_kure_theory_on_the_midrise_grid(bits):
  # kure_jax.core.theory's exact MSEs (closed forms of its own) on the same grid, Gaussian and uniform
  half = 2 ** (bits - 1)
  midrise = np.arange(-half, half) + 0.5
  for step in (0.5 * 2.0 ** -bits, 3.0 / half, 1.0 / half):
    np.testing.assert_allclose(T.grid_mse(midrise, 2.0, step), theory.gaussian_mse(1.0, bits, step), rtol=2e-5)
    np.testing.assert_allclose(T.grid_mse(midrise, math.inf, step), theory.uniform_mse(T.SQRT3, bits, step),
                               rtol=2e-5)


@pytest.mark.parametrize("beta", MC_BETAS)
def test_monte_carlo_of_fake_quantize_within_one_percent(beta):
  x, w = _stratified(beta)
  x64 = x.astype(np.float64)
  errors = []
  for fmt in SCALAR_FORMATS:
    s = T.optimal_scale(fmt, beta)[0]
    for ratio in (0.6, 1.0, 1.4):
      q = np.asarray(fake_quantize(x, fmt, np.float32(s * ratio)), np.float64)
      mc = np.sum(w * (q - x64) ** 2)
      exact = float(T.mse(fmt, beta, np.float32(s * ratio)))
      assert abs(mc / exact - 1) < 0.01, (fmt, ratio, mc, exact)
      errors.append(abs(mc / exact - 1))
  assert 0 < max(errors) < 1e-3  # independent computations, and in fact far closer than 1%


def test_iid_monte_carlo_light_tails():
  # plain i.i.d. samples (NumPy's generators, no SciPy) where their standard error is small
  rng = np.random.default_rng(7)
  samples = {math.inf: rng.uniform(-T.SQRT3, T.SQRT3, 2_000_000), 2.0: rng.standard_normal(2_000_000)}
  for beta, x64 in samples.items():
    x = x64.astype(np.float32)
    x64 = x.astype(np.float64)
    for fmt in SCALAR_FORMATS if math.isinf(beta) else ("int2", "int3", "int4", "fp8_e4m3", "fp4_e2m1"):
      s = T.optimal_scale(fmt, beta)[0]
      e2 = (np.asarray(fake_quantize(x, fmt, np.float32(s)), np.float64) - x64) ** 2
      exact = T.optimal_mse(fmt, beta)
      assert np.std(e2) / math.sqrt(e2.size) < 0.003 * exact, fmt  # the check below is meaningful
      assert abs(np.mean(e2) / exact - 1) < 0.01, (fmt, beta, np.mean(e2), exact)


@pytest.mark.parametrize("fmt", ["int4", "fp8_e4m3", "fp6_e2m3", "fp4_e2m1"])
def test_optimal_scale_is_the_global_minimum(fmt):
  for beta in (math.inf, 1.0):
    s, m = T.optimal_scale(fmt, beta)
    scan = T.mse(fmt, beta, np.geomspace(0.25, 512, 3000) / SPECS[fmt].largest)
    assert m <= scan.min() * (1 + 1e-9)
    assert m <= float(T.mse(fmt, beta, s * 0.999)) and m <= float(T.mse(fmt, beta, s * 1.001))


def test_uniform_minimizes_every_formats_mse():
  # Within the generalized-Gaussian family at equal variance, every format's optimal-scale MSE is
  # lowest at kurtosis 1.8 and grows with kurtosis up to the Laplace (6)
  for fmt in SCALAR_FORMATS:
    mses = [T.optimal_mse(fmt, b) for b in MC_BETAS[:3]]
    assert mses[0] < mses[1] < mses[2] * (1 + 1e-6), fmt
  for fmt in ("int4", "fp8_e4m3", "fp4_e2m1"):
    k, m = T.best_kurtosis(fmt)
    assert k == 1.8 and m == T.optimal_mse(fmt, math.inf)


def test_documented_numbers():
  sqnr = lambda f, b: -10 * math.log10(T.optimal_mse(f, b))  # noqa: E731
  np.testing.assert_allclose([sqnr("int8", math.inf), sqnr("int8", 2.0), sqnr("int4", math.inf), sqnr("int4", 2.0)],
                             [48.13, 40.57, 23.52, 19.26], atol=0.006)
  np.testing.assert_allclose([sqnr("fp8_e4m3", math.inf), sqnr("fp8_e4m3", 2.0), sqnr("fp4_e2m1", 2.0)],
                             [32.74, 31.56, 18.97], atol=0.006)
  np.testing.assert_allclose(T.optimal_mse("int2", math.inf), 13 / 121, rtol=1e-9)  # uniform at step 2√3·(2/11)
  # FP8 hardly cares about the weights' shape, integer grids a lot
  fp8 = [sqnr("fp8_e4m3", b) for b in MC_BETAS]
  int8 = [sqnr("int8", b) for b in MC_BETAS]
  assert max(fp8) - min(fp8) < 1.3 and max(int8) - min(int8) > 20
  assert int8[2] > fp8[2] and int8[3] < fp8[3]  # int8 beats FP8 E4M3 up to the Laplace, not at 25.2
  np.testing.assert_allclose(T.crossover_kurtosis("int4", "fp4_e2m1"), 3.237, atol=0.01)
  # sensitivity: the uniform is the most sensitive to an undersized scale; FP8 at a Gaussian hardly at all
  np.testing.assert_allclose(T.sensitivity("int8", math.inf, [0.5, 1.5]), [8129.4, 2.25], rtol=1e-3)
  np.testing.assert_allclose(T.sensitivity("int8", 2.0, [0.5, 1.5]), [147.6, 2.023], rtol=1e-3)
  assert np.all(T.sensitivity("fp8_e4m3", 2.0, np.linspace(0.5, 1.5, 101)) < 1.011)
  np.testing.assert_allclose(T.tolerance_band("fp8_e4m3", math.inf), [0.964, 1.179], atol=2e-3)
  np.testing.assert_allclose(T.tolerance_band("int4", 2.0), [0.842, 1.233], atol=2e-3)
  assert T.tolerance_band("fp8_e4m3", 2.0)[1] == 8.0  # reached the end of the searched range
  np.testing.assert_allclose(T.sensitivity("fp4_e2m1", 2.0, [1.0]), [1.0], rtol=1e-12)
