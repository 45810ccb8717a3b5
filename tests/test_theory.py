"""kure_jax.core.theory against Monte Carlo, SciPy, the classical optima and the paper."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from scipy import integrate, optimize, stats

from kure_jax.core.theory import (
    gaussian_mse,
    gaussian_optimal_step,
    sensitivity,
    sensitivity_taylor,
    uniform_mse,
    uniform_optimal_step,
)

A = math.sqrt(3.0)  # U[-a, a] with the variance of N(0, 1)
RATIOS = (0.6, 0.9, 1.0, 1.1, 1.5)
N_MC = 4_000_000
MAX_1960 = {2: 0.9957, 3: 0.5860, 4: 0.3352}  # optimal uniform steps for N(0, 1)


@functools.cache
def _samples():
  rng = np.random.default_rng(20201206)
  return {
      "uniform": rng.uniform(-A, A, N_MC).astype(np.float32),
      "gaussian": rng.standard_normal(N_MC).astype(np.float32),
      "noise": rng.uniform(-0.5, 0.5, N_MC).astype(np.float32),
  }


@functools.cache
def _monte_carlo(dist: str, bits: int, step: float, model: str) -> float:
  """MSE of the NumPy midrise quantizer (exact) or of the additive-noise model (paper)."""
  x = _samples()[dist]
  big_l = 2.0 ** (bits - 1)
  step32 = np.float32(step)
  if model == "exact":
    q = step32 * np.clip(np.floor(x / step32) + np.float32(0.5), -big_l + 0.5, big_l - 0.5)
    err = x - q
  else:
    c = np.float32(big_l * step)
    err = np.where(np.abs(x) <= c, step32 * _samples()["noise"], np.abs(x) - c)
  return float(np.mean(np.square(err, dtype=np.float32), dtype=np.float64))


@functools.cache
def _gauss_opt(bits: int, model: str = "exact") -> float:
  return float(gaussian_optimal_step(1.0, bits, model=model))


@functools.cache
def _scipy_gaussian_mse(bits: int, step: float) -> float:
  """Exact midrise MSE for N(0, 1) by adaptive quadrature, bin by bin (float64)."""
  big_l = 2 ** (bits - 1)
  total = 0.0
  for k in range(big_l):
    lo, hi, level = k * step, ((k + 1) * step if k < big_l - 1 else np.inf), (k + 0.5) * step
    total += integrate.quad(lambda x: (x - level) ** 2 * stats.norm.pdf(x), lo, hi,
                            epsabs=0.0, epsrel=1e-12)[0]
  return 2.0 * total


@functools.partial(jax.jit, static_argnums=0)
@functools.partial(jax.vmap, in_axes=(None, 0))
def _x64_slope(bits, steps):
  return jax.grad(lambda s: uniform_mse(A, bits, s))(steps)


class ClosedFormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(bits=(2, 3, 4, 8), model=("exact", "paper"))
  def test_uniform_matches_monte_carlo(self, bits, model):
    steps = np.asarray(RATIOS) * float(uniform_optimal_step(A, bits))
    got = self.variant(lambda s: uniform_mse(A, bits, s, model=model))(steps)
    want = [_monte_carlo("uniform", bits, float(s), model) for s in steps]
    np.testing.assert_allclose(got, want, rtol=0.01)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(bits=(2, 3, 4, 8), model=("exact", "paper"))
  def test_gaussian_matches_monte_carlo(self, bits, model):
    steps = np.asarray(RATIOS) * _gauss_opt(bits)
    got = self.variant(lambda s: gaussian_mse(1.0, bits, s, model=model))(steps)
    want = [_monte_carlo("gaussian", bits, float(s), model) for s in steps]
    np.testing.assert_allclose(got, want, rtol=0.01)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gaussian_exact_matches_scipy_quadrature_over_a_wide_step_range(self):
    # narrow bins (Gauss-Legendre branch) through wide bins (closed-form branch)
    for bits in (1, 2, 3, 5):
      steps = np.array([0.05, 0.3, 1.0, 1.9, 2.1, 4.0])
      got = self.variant(lambda s, b=bits: gaussian_mse(1.0, b, s))(steps)
      want = [_scipy_gaussian_mse(bits, s) for s in steps]
      np.testing.assert_allclose(got, want, rtol=2e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_scales_with_sigma_and_a(self):
    fn = self.variant(lambda s: jnp.stack([gaussian_mse(2.5, 3, 2.5 * s), uniform_mse(2.5 * A, 3, 2.5 * s)]))
    np.testing.assert_allclose(fn(0.4), 6.25 * np.array([gaussian_mse(1.0, 3, 0.4), uniform_mse(A, 3, 0.4)]),
                               rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(2, 3, 4, 8)
  def test_paper_uniform_takes_the_noise_branch_at_lemma3_step(self, bits):
    step = uniform_optimal_step(A, bits)
    fn = self.variant(lambda s: (uniform_mse(A, bits, s, model="paper"),
                                 jax.grad(jax.grad(lambda t: uniform_mse(A, bits, t, model="paper")))(s)))
    value, curvature = fn(step)
    np.testing.assert_allclose(value, float(step) ** 2 / 12, rtol=1e-6)
    np.testing.assert_allclose(curvature, 1 / 6, rtol=1e-5)


class OptimalStepTest(parameterized.TestCase):

  @parameterized.parameters(2, 3, 4, 8)
  def test_uniform_optimum_is_exact_minimiser_with_curvature_l_minus_half(self, bits):
    big_l = 2 ** (bits - 1)
    step = uniform_optimal_step(A, bits)
    np.testing.assert_allclose(step, 2 * A / 2**bits, rtol=1e-7)
    grid = jnp.linspace(0.5, 1.5, 4001) * step
    best = grid[jnp.argmin(jax.vmap(lambda s: uniform_mse(A, bits, s))(grid))]
    np.testing.assert_allclose(best, step, rtol=0.005)
    np.testing.assert_allclose(uniform_mse(A, bits, step), float(step) ** 2 / 12, rtol=1e-6)
    f = functools.partial(uniform_mse, A, bits)
    np.testing.assert_allclose(jax.grad(jax.grad(f))(step), big_l - 0.5, rtol=0.01)
    # C² from both sides: one-sided (second-order) differences of the slope agree
    with jax.enable_x64(True):
      x, h = A / big_l, 1e-4 * A / big_l
      slopes = _x64_slope(bits, jnp.asarray([x, x + h, x + 2 * h, x - h, x - 2 * h], jnp.float64))
      right = (-3 * slopes[0] + 4 * slopes[1] - slopes[2]) / (2 * h)
      left = (3 * slopes[0] - 4 * slopes[3] + slopes[4]) / (2 * h)
      np.testing.assert_allclose([left, right], big_l - 0.5, rtol=1e-6)
      np.testing.assert_allclose(slopes[0], 0.0, atol=1e-12)

  def test_uniform_curvature_at_16_bits_in_x64(self):
    with jax.enable_x64(True):
      step = jnp.float64(A / 2**15)
      curv = jax.jit(jax.grad(jax.grad(lambda s: uniform_mse(A, 16, s))))(step)
    np.testing.assert_allclose(curv, 2**15 - 0.5, rtol=1e-6)

  @parameterized.parameters(2, 3, 4, 8)
  def test_paper_uniform_model_is_minimised_at_2a_over_2m_plus_1(self, bits):
    # Lemma 3's a/L is not the minimiser of Lemma 2's own model.
    big_l = 2 ** (bits - 1)
    f = functools.partial(uniform_mse, A, bits, model="paper")
    grid = jnp.linspace(0.8, 1.2, 4001) * (A / big_l)
    best = float(grid[jnp.argmin(jax.vmap(f)(grid))])
    true_min = 2 * A / (2**bits + 1)
    np.testing.assert_allclose(best, true_min, rtol=5e-4)
    np.testing.assert_allclose(f(true_min), true_min**2 / 12, rtol=1e-5)
    self.assertLess(float(f(true_min)), float(f(A / big_l)))
    np.testing.assert_allclose(jax.grad(jax.grad(f))(jnp.float32(true_min)), big_l, rtol=1e-3)

  @parameterized.parameters(*MAX_1960.items())
  def test_gaussian_optimum_matches_max_1960(self, bits, want):
    np.testing.assert_allclose(_gauss_opt(bits), want, rtol=1e-3)

  @parameterized.parameters(2, 3, 4, 6)
  def test_gaussian_optimum_matches_scipy_minimize_scalar(self, bits):
    big_l = 2 ** (bits - 1)  # search clipping levels LΔ in [0.4σ, 6σ]
    res = optimize.minimize_scalar(lambda s: _scipy_gaussian_mse(bits, s), bounds=(0.4 / big_l, 6.0 / big_l),
                                   method="bounded", options={"xatol": 1e-9})
    np.testing.assert_allclose(_gauss_opt(bits), res.x, rtol=1e-4)
    np.testing.assert_allclose(gaussian_mse(1.0, bits, _gauss_opt(bits)), res.fun, rtol=1e-5)

  def test_gaussian_paper_optimum_is_a_minimum_of_the_paper_model(self):
    for bits in (2, 4, 8):
      step = _gauss_opt(bits, "paper")
      f = functools.partial(gaussian_mse, 1.0, bits, model="paper")
      self.assertLess(abs(float(jax.grad(f)(jnp.float32(step)))), 1e-5 * step)
      for r in (0.99, 1.01):
        self.assertGreater(float(f(r * step)), float(f(step)))


class SensitivityTest(parameterized.TestCase):

  @parameterized.parameters(2, 3, 4, 8)
  def test_lemma1_taylor_matches_direct_difference_for_small_eps(self, bits):
    # float32 is enough here (x64 gives the same ratios to ~1%: the cubic term dominates)
    step = _gauss_opt(bits)
    f = functools.partial(gaussian_mse, 1.0, bits)
    eps = 0.005 * step * jnp.array([1.0, -1.0])
    ratio = sensitivity(f, step, eps) / sensitivity_taylor(f, step, eps)
    np.testing.assert_allclose(ratio, 1.0, rtol=0.05)

  def test_paper_lemmas_reproduce_the_papers_claim(self):
    # Lemma 1 on Lemma 2 at Lemma 3's step: Γ_U = ε²/12 exactly, and Γ_G > Γ_U.
    for bits in range(2, 9):
      eps = jnp.array([0.01, 0.02, 0.1]) * float(uniform_optimal_step(A, bits))
      gamma_u = sensitivity_taylor(functools.partial(uniform_mse, A, bits, model="paper"),
                                   uniform_optimal_step(A, bits), eps)
      gamma_g = sensitivity_taylor(functools.partial(gaussian_mse, 1.0, bits, model="paper"),
                                   _gauss_opt(bits, "paper"), eps)
      np.testing.assert_allclose(gamma_u, eps**2 / 12, rtol=1e-5)
      self.assertTrue(np.all(gamma_g > 1.5 * gamma_u), (bits, gamma_g, gamma_u))

  def test_exact_uniform_is_more_sensitive_than_gaussian(self):
    for bits in range(2, 9):
      du = float(uniform_optimal_step(A, bits))
      eps = jnp.array([0.01, -0.01, 0.02, -0.02]) * du
      gamma_u = sensitivity(functools.partial(uniform_mse, A, bits), du, eps)
      gamma_g = sensitivity(functools.partial(gaussian_mse, 1.0, bits), _gauss_opt(bits), eps)
      self.assertTrue(np.all(gamma_u > 1.5 * gamma_g), (bits, gamma_u, gamma_g))

  def test_exact_sensitivities_at_4_bits(self):
    du = float(uniform_optimal_step(A, 4))
    eps = 0.02 * du
    np.testing.assert_allclose(eps, 0.00433, rtol=1e-3)
    gamma_u = sensitivity(functools.partial(uniform_mse, A, 4), du, eps)
    gamma_g = sensitivity(functools.partial(gaussian_mse, 1.0, 4), _gauss_opt(4), eps)
    np.testing.assert_allclose(gamma_u, 6.375e-5, rtol=0.01)
    np.testing.assert_allclose(gamma_g, 1.36e-5, rtol=0.02)
    # Lemma 1 on the exact uniform: curvature L − ½ = 7.5
    np.testing.assert_allclose(sensitivity_taylor(functools.partial(uniform_mse, A, 4), du, eps),
                               7.5 / 2 * eps**2, rtol=1e-3)

  def test_paper_model_at_its_true_minimiser_also_makes_uniform_more_sensitive(self):
    for bits in range(2, 9):
      big_l = 2 ** (bits - 1)
      eps = 0.02 * float(uniform_optimal_step(A, bits))
      step_u = jnp.float32(2 * A / (2**bits + 1))
      gamma_u = sensitivity_taylor(functools.partial(uniform_mse, A, bits, model="paper"), step_u, eps)
      gamma_g = sensitivity_taylor(functools.partial(gaussian_mse, 1.0, bits, model="paper"),
                                   _gauss_opt(bits, "paper"), eps)
      np.testing.assert_allclose(gamma_u, big_l * eps**2 / 2, rtol=1e-3)
      self.assertGreater(float(gamma_u), float(gamma_g))

  def test_uniform_mse_stays_below_gaussian_optimum_over_a_wide_band(self):
    # Checked numerically: for M = 2…8 the band where the exact uniform MSE is below
    # the Gaussian's best MSE spans at least [0.962, 1.363]·Δ̃_U (it widens to the
    # right and narrows from the left as M grows: the left side has curvature L − ½).
    ratios = jnp.linspace(0.97, 1.35, 39)
    for bits in range(2, 9):
      du = uniform_optimal_step(A, bits)
      u = jax.vmap(functools.partial(uniform_mse, A, bits))(ratios * du)
      g_best = gaussian_mse(1.0, bits, _gauss_opt(bits))
      self.assertTrue(bool(jnp.all(u < g_best)), bits)
      # 1.3× the optimal step is still better than the Gaussian at its optimum
      self.assertLess(float(uniform_mse(A, bits, 1.3 * du)), float(g_best))
    # ...but the band is one-sided at high bit-widths: 10% too small a step is worse at 8 bits
    self.assertGreater(float(uniform_mse(A, 8, 0.9 * uniform_optimal_step(A, 8))),
                       float(gaussian_mse(1.0, 8, _gauss_opt(8))))

  def test_vectorised_over_eps(self):
    f = functools.partial(uniform_mse, A, 3)
    eps = jnp.linspace(-0.02, 0.02, 6).reshape(2, 3)
    step = uniform_optimal_step(A, 3)
    direct, taylor = sensitivity(f, step, eps), sensitivity_taylor(f, step, eps)
    self.assertEqual(direct.shape, (2, 3))
    self.assertEqual(taylor.shape, (2, 3))
    np.testing.assert_allclose(direct[0, 0], abs(f(step - 0.02) - f(step)), rtol=1e-4)
    self.assertEqual(sensitivity(f, step, 0.01).shape, ())


class TransformTest(parameterized.TestCase):

  def test_gradients_are_finite(self):
    points = jnp.asarray([0.001, 0.05, float(uniform_optimal_step(A, 4)), 0.3352, 1.0, 2.0, 5.0])
    fns = [functools.partial(f, s, 4, model=m) for f, s in ((uniform_mse, A), (gaussian_mse, 1.0))
           for m in ("exact", "paper")]

    @jax.jit
    def first_derivatives(p):
      return ([jax.vmap(jax.grad(fn))(p) for fn in fns]
              + [jax.grad(f, argnums=(0, 2))(s, 4, 0.3) for f, s in ((uniform_mse, A), (gaussian_mse, 1.0))])

    chex.assert_tree_all_finite(first_derivatives(points))
    for fn in fns:  # second derivatives (the compiled-once path of sensitivity_taylor)
      chex.assert_tree_all_finite([sensitivity_taylor(fn, p, 1.0) for p in points])

  def test_jit_vmap_over_bits_equals_python_loop(self):
    bits = jnp.arange(2, 9)
    steps = 1.1 * A / 2.0 ** (bits - 1)

    @jax.jit
    def batched(bits, steps):
      return (
          jax.vmap(lambda b, s: uniform_mse(A, b, s))(bits, steps),
          jax.vmap(lambda b, s: gaussian_mse(1.0, b, s, max_bits=8))(bits, steps),
          jax.vmap(lambda b, s: gaussian_mse(1.0, b, s, model="paper"))(bits, steps),
          jax.vmap(lambda b: gaussian_optimal_step(1.0, b, max_bits=8))(bits),
      )

    got = batched(bits, steps)
    loop = [[uniform_mse(A, b, s), gaussian_mse(1.0, b, s), gaussian_mse(1.0, b, s, model="paper"),
             _gauss_opt(b)] for b, s in zip(range(2, 9), np.asarray(steps))]
    for i, values in enumerate(got):
      np.testing.assert_allclose(values, [row[i] for row in loop], rtol=1e-5)

  def test_traced_bits_use_enough_terms_for_16_bits(self):
    step = 3e-4
    concrete = gaussian_mse(1.0, 16, step)
    traced = jax.jit(lambda b: gaussian_mse(1.0, b, step))(16)
    np.testing.assert_allclose(traced, concrete, rtol=1e-5)
    # granular noise Δ²/12 dominates at 16 bits and this step (clipping at 9.8σ)
    np.testing.assert_allclose(concrete, step**2 / 12, rtol=1e-4)

  def test_bad_arguments_raise(self):
    with self.assertRaisesRegex(ValueError, "model"):
      uniform_mse(A, 4, 0.1, model="noise")
    with self.assertRaisesRegex(ValueError, "bits"):
      gaussian_mse(1.0, 0, 0.1)
    with self.assertRaisesRegex(ValueError, "step"):
      gaussian_mse(1.0, 4, -0.1)
