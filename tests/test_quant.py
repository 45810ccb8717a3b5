"""Fake quantizers, STE/LSQ gradients and step pickers against NumPy references."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from kure_jax.core import quant
from kure_jax.core.quant import quantize


def np_quantize(x, step, bits, grid):
  """Independent NumPy reference of the four grids."""
  L = 2.0 ** (bits - 1)
  v = np.asarray(x, np.float64) / step
  if grid == "midrise":
    return np.clip(np.floor(v) + 0.5, -L + 0.5, L - 0.5) * step
  lo, hi = {"signed": (-L, L - 1), "narrow": (-L + 1, L - 1), "unsigned": (0, 2 * L - 1)}[grid]
  return np.clip(np.round(v), lo, hi) * step


# The clipped grids; the unclipped DoReFa "sliding" grid has its own tests in test_presets.py.
CLIPPED_GRIDS = tuple(g for g in quant.GRIDS if g != "sliding")

GRID_LEVELS = {"signed": lambda m: 2**m, "narrow": lambda m: 2**m - 1, "midrise": lambda m: 2**m,
               "unsigned": lambda m: 2**m}


class QuantizeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*[(g, b) for g in CLIPPED_GRIDS for b in (1, 2, 3, 4, 8) if (g, b) != ("narrow", 1)])
  def test_levels_count_and_reference(self, grid, bits):
    step = 0.37
    x = jnp.linspace(-3 * 2**bits * step, 3 * 2**bits * step, 20001)
    q = self.variant(lambda v: quantize(v, step, bits, grid))(x)
    self.assertLen(np.unique(np.asarray(q)), GRID_LEVELS[grid](bits))
    np.testing.assert_allclose(q, np_quantize(x, step, bits, grid), rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*CLIPPED_GRIDS)
  def test_idempotent_and_error_bound(self, grid):
    bits, step = 4, 0.1
    x = jax.random.normal(jax.random.key(0), (10000,)) * (0.3 if grid != "unsigned" else 0.6)
    if grid == "unsigned":
      x = jnp.abs(x)
    f = self.variant(lambda v: quantize(v, step, bits, grid))
    q = f(x)
    np.testing.assert_allclose(f(q), q, atol=1e-6)
    qmin, qmax = quant.levels(bits, grid)
    inside = (x >= qmin * step) & (x <= qmax * step)
    self.assertGreater(int(inside.sum()), 9000)
    err = jnp.abs(q - x)[inside]
    self.assertLessEqual(float(err.max()), step / 2 + 1e-6)
    self.assertGreater(float(err.max()), 0.45 * step)  # the bound is attained, not vacuous

  def test_rounding_rule(self):
    x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, 1.0, -1.0])
    np.testing.assert_array_equal(quantize(x, 1.0, 4, "signed"), [0, 2, 2, -0, -2, 1, -1])  # half to even
    np.testing.assert_array_equal(quantize(x, 1.0, 4, "midrise"), [0.5, 1.5, 2.5, -0.5, -1.5, 1.5, -0.5])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*CLIPPED_GRIDS)
  def test_ste_gradient_wrt_x(self, grid):
    bits, step = 3, 0.5
    qmin, qmax = (float(v) for v in quant.levels(bits, grid))
    x = jnp.array([qmin - 1.0, qmin - 0.01, qmin, 0.3, 1.26, qmax, qmax + 0.01, qmax + 3.0]) * step
    g = self.variant(jax.grad(lambda v: quantize(v, step, bits, grid).sum()))(x)
    np.testing.assert_array_equal(g, [0, 0, 1, 1, 1, 1, 0, 0])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*CLIPPED_GRIDS)
  def test_lsq_step_gradient(self, grid):
    bits, step = 3, 0.5
    qmin, qmax = (float(v) for v in quant.levels(bits, grid))
    v = np.array([qmin - 2.0, qmin + 0.3, -0.7, 0.2, 1.4, qmax - 0.2, qmax + 5.0])
    v = v[(v >= qmin - 10)]
    x = jnp.asarray(v * step, jnp.float32)
    g = self.variant(jax.grad(lambda s: quantize(x, s, bits, grid).sum()))(jnp.float32(step))
    rounded = np.floor(v) + 0.5 if grid == "midrise" else np.round(v)
    want = np.where(v < qmin, qmin, np.where(v > qmax, qmax, rounded - v))  # Esser et al., eq. 3
    np.testing.assert_allclose(g, want.sum(), rtol=1e-5)

  def test_grad_scale_and_round_ste(self):
    f = lambda s: quant.grad_scale(s, 0.25) * 3.0
    self.assertEqual(float(f(2.0)), 6.0)
    self.assertEqual(float(jax.grad(f)(2.0)), 0.75)
    self.assertEqual(float(quant.round_ste(2.6)), 3.0)
    self.assertEqual(float(jax.grad(quant.round_ste)(2.6)), 1.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_channel_steps(self):
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
    steps = jnp.array([0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    got = self.variant(lambda a, s: quantize(a, s, 4, axis=-1))(w, steps)
    for c in range(6):
      np.testing.assert_allclose(got[..., c], np_quantize(w[..., c], float(steps[c]), 4, "signed"), atol=1e-6)
    got0 = quantize(jnp.moveaxis(w, -1, 0), steps, 4, axis=0)
    np.testing.assert_allclose(jnp.moveaxis(got0, 0, -1), got, atol=0)

  def test_vmap_over_bits_equals_loop(self):
    x = jax.random.normal(jax.random.key(2), (257,))
    bits = jnp.arange(2, 9)
    steps = jnp.stack([quant.mse_step(x, b) for b in range(2, 9)])
    np.testing.assert_allclose(jax.jit(jax.vmap(lambda b: quant.mse_step(x, b)))(bits), steps, rtol=1e-6)
    batched = jax.jit(jax.vmap(lambda b, s: quantize(x, s, b)))(bits, steps)
    for i, b in enumerate(range(2, 9)):
      np.testing.assert_array_equal(batched[i], quantize(x, steps[i], b))
    # and over (bits, step ratio) pairs in one call
    ratios = jnp.array([0.7, 1.0, 1.3])
    grid = jax.vmap(lambda b: jax.vmap(lambda r: quantize(x, r * quant.mse_step(x, b), b))(ratios))(bits)
    self.assertEqual(grid.shape, (7, 3, 257))
    np.testing.assert_allclose(grid[3, 2], quantize(x, 1.3 * quant.mse_step(x, 5), 5), atol=1e-6)

  def test_dtype_is_preserved(self):
    x = jnp.linspace(-1, 1, 11, dtype=jnp.bfloat16)
    self.assertEqual(quantize(x, 0.25, 3).dtype, jnp.bfloat16)


class BadInputTest(parameterized.TestCase):

  @parameterized.parameters(
      (dict(bits=0), "`bits` must be whole numbers in 1..16, got 0"),
      (dict(bits=17), "`bits` must be whole numbers in 1..16, got 17"),
      (dict(bits=2.5), "`bits` must be whole numbers in 1..16, got 2.5"),
      (dict(bits=np.array([4, 40])), "got 40"),
      (dict(bits=1, grid="narrow"), "`bits` must be whole numbers in 2..16, got 1"),
      (dict(step=0.0), "`step` must be finite and > 0, got 0.0"),
      (dict(step=-1.0), "`step` must be finite and > 0, got -1.0"),
      (dict(step=np.nan), "`step` must be finite and > 0, got nan"),
      (dict(grid="int4"), "unknown grid 'int4'"),
      (dict(x=np.zeros((0,))), "`x` is empty"),
      (dict(axis=3), "`axis` 3 is out of range"),
  )
  def test_quantize(self, override, message):
    args = dict(x=np.ones((4, 3)), step=np.full(3, 0.1), bits=4, grid="signed", axis=1)
    args.update(override)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
      quantize(args.pop("x"), args.pop("step"), args.pop("bits"), args.pop("grid"), **args)

  def test_pickers(self):
    with pytest.raises(ValueError, match="mse_step|lp_step"):
      quant.mse_step(np.ones(3), 0)
    with pytest.raises(ValueError, match="`x` is empty"):
      quant.max_step(np.ones((0, 2)), 4)
    with pytest.raises(ValueError, match="unknown dist 'cauchy'"):
      quant.aciq_step(np.ones(3), 4, dist="cauchy")
    with pytest.raises(ValueError, match="unknown mode 'round'"):
      quant.pow2_step(0.3, mode="round")
    with pytest.raises(ValueError, match="`step` must be finite and > 0"):
      quant.pow2_step(0.0)
    with pytest.raises(ValueError, match="`p` must be > 0"):
      quant.lp_step(np.ones(3), 4, p=0)

  def test_traced_values_are_not_checked(self):
    # documented: inside jit a bad step cannot be inspected, so no error is raised
    with pytest.raises(ValueError):
      quantize(jnp.ones(3), 0.0, 4)
    np.testing.assert_array_equal(jax.jit(lambda s: quantize(jnp.ones(3), s, 4))(0.0), 0.0)
    self.assertTrue(bool(jnp.isnan(jax.jit(lambda s: quantize(jnp.zeros(3), s, 4))(0.0)).all()))


def brute_force_step(x, bits, grid, p=2.0, n=4001, lo=0.02):
  """Dense NumPy scan of Δ/Δ_max: the reference argmin for the pickers."""
  x = np.asarray(x, np.float64)
  top = float(quant.max_step(x, bits, grid))
  cands = top * np.linspace(lo, 1.0, n)
  errs = [np.mean(np.abs(np_quantize(x, c, bits, grid) - x) ** p) for c in cands]
  i = int(np.argmin(errs))
  return cands[i], errs[i]


def np_err(x, step, bits, grid, p=2.0):
  return float(np.mean(np.abs(np_quantize(np.asarray(x, np.float64), step, bits, grid) - np.asarray(x, np.float64)) ** p))


class StepPickerTest(chex.TestCase):

  @parameterized.parameters(2, 3, 4, 8)
  def test_mse_step_on_uniform_is_lemma3(self, bits):
    a = 0.7
    x = jax.random.uniform(jax.random.key(3), (400_000,), minval=-a, maxval=a)
    step = float(quant.mse_step(x, bits, "midrise"))
    self.assertAlmostEqual(step / (2 * a / 2**bits), 1.0, delta=0.02)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(grid=("signed", "midrise", "narrow"), bits=(2, 4))
  def test_mse_step_reaches_the_brute_force_minimum(self, grid, bits):
    x = np.random.default_rng(4).laplace(size=20_000).astype(np.float32)
    step = float(self.variant(lambda v: quant.mse_step(v, bits, grid))(x))
    ref_step, ref_err = brute_force_step(x, bits, grid)
    self.assertLessEqual(np_err(x, step, bits, grid), ref_err * (1 + 1e-4))

  def test_mse_step_within_0p1_percent_of_argmin(self):
    # on a smooth, well-conditioned objective the argmin itself is pinned down
    x = np.random.default_rng(5).normal(size=50_000).astype(np.float32)
    step = float(quant.mse_step(x, 3, "midrise"))
    top = float(quant.max_step(x, 3, "midrise"))
    cands = step * np.linspace(0.99, 1.01, 2001)
    errs = [np_err(x, c, 3, "midrise") for c in cands]
    self.assertAlmostEqual(step / cands[int(np.argmin(errs))], 1.0, delta=1e-3)
    self.assertLess(step, top)

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_channel_equals_per_tensor_loop(self):
    w = np.random.default_rng(6).normal(size=(3, 3, 8, 5)).astype(np.float32) * np.array([0.1, 0.5, 1, 2, 8])
    steps = self.variant(lambda v: quant.mse_step(v, 4, axis=-1))(w)
    self.assertEqual(steps.shape, (5,))
    for c in range(5):
      np.testing.assert_allclose(steps[c], quant.mse_step(w[..., c], 4), rtol=1e-6)

  @parameterized.parameters(2.5, 3.0)
  def test_lp_step(self, p):
    x = np.random.default_rng(7).normal(size=20_000).astype(np.float32)
    step = float(quant.lp_step(x, 3, p, "midrise"))
    _, ref_err = brute_force_step(x, 3, "midrise", p=p)
    self.assertLessEqual(np_err(x, step, 3, "midrise", p), ref_err * (1 + 1e-4))
    self.assertGreater(step, float(quant.mse_step(x, 3, "midrise")))  # larger p clips less

  @parameterized.parameters(*CLIPPED_GRIDS)
  def test_max_step_is_the_smallest_unclipped_step(self, grid):
    x = np.random.default_rng(8).normal(size=1000).astype(np.float32)
    if grid == "unsigned":
      x = np.abs(x)
    s = float(quant.max_step(x, 4, grid))
    qmin, qmax = (float(v) for v in quant.levels(4, grid))
    v = x / s
    self.assertTrue(np.all((v >= qmin - 1e-6) & (v <= qmax + 1e-6)))
    self.assertAlmostEqual(max(v.max() / qmax, v.min() / qmin if qmin < 0 else 0), 1.0, places=5)

  def test_aciq_constants_match_banner_et_al(self):
    # Banner, Nahshan, Soudry 2019, table of optimal clipping values α/σ and α/b for 2..8 bits
    gauss = [1.71, 2.15, 2.55, 2.94, 3.29, 3.61, 3.92]
    laplace = [2.83, 3.89, 5.03, 6.20, 7.41, 8.64, 9.89]
    np.testing.assert_allclose(quant.aciq_constants("gauss")[1:8], gauss, rtol=0.01)
    np.testing.assert_allclose(quant.aciq_constants("laplace")[1:8], laplace, rtol=0.01)

  @parameterized.parameters(("gauss", "normal"), ("laplace", "laplace"))
  def test_aciq_step_on_samples(self, dist, sampler):
    x = getattr(np.random.default_rng(9), sampler)(size=200_000).astype(np.float32) * 0.3
    for bits in (2, 4, 8):
      alpha = float(quant.aciq_clip(x, bits, dist))
      np.testing.assert_allclose(alpha / 0.3, quant.aciq_constants(dist)[bits - 1], rtol=0.01)
      np.testing.assert_allclose(float(quant.aciq_step(x, bits, dist)), alpha / 2 ** (bits - 1), rtol=1e-6)
    # a ReLU output on an unsigned grid uses the folded scale and one more bit of range
    r = np.maximum(x, 0)
    np.testing.assert_allclose(float(quant.aciq_clip(r, 4, dist, "unsigned")),
                               quant.aciq_constants(dist)[4] * (np.sqrt(np.mean(r**2)) if dist == "gauss" else np.mean(r)),
                               rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_pow2_step(self):
    s = jnp.array([0.3, 0.7, 1.0, 1.41, 1.42, 5.0])
    f = self.variant(quant.pow2_step, static_argnums=1)
    np.testing.assert_array_equal(f(s, "nearest"), [0.25, 0.5, 1.0, 1.0, 2.0, 4.0])
    np.testing.assert_array_equal(f(s, "floor"), [0.25, 0.5, 1.0, 1.0, 1.0, 4.0])
    np.testing.assert_array_equal(f(s, "ceil"), [0.5, 1.0, 1.0, 2.0, 2.0, 8.0])

  def test_pickers_vmap_over_bits(self):
    x = jax.random.normal(jax.random.key(10), (3, 3, 4, 8))
    bits = jnp.arange(2, 9)
    for name, fn in quant.STEP_METHODS.items():
      batched = jax.vmap(lambda b: fn(x, b, axis=-1))(bits)
      self.assertEqual(batched.shape, (7, 8), name)
      np.testing.assert_allclose(batched[2], fn(x, 4, axis=-1), rtol=1e-6, err_msg=name)

  def test_pickers_share_one_signature(self):
    """(x, bits, grid, *, axis): the sweep passes the grid positionally (the ACIQ ones once took it as `dist`)."""
    x = jax.random.normal(jax.random.key(12), (64, 8))
    np.testing.assert_allclose(quant.STEP_METHODS["aciq_gauss"](x, 4, "midrise", axis=-1),
                               quant.aciq_step(x, 4, "gauss", "midrise", axis=-1), rtol=0)
    np.testing.assert_allclose(quant.STEP_METHODS["aciq_laplace"](x, 3, "unsigned"),
                               quant.aciq_step(x, 3, "laplace", "unsigned"), rtol=0)
    for name, fn in quant.STEP_METHODS.items():
      self.assertEqual(list(inspect.signature(fn).parameters), ["x", "bits", "grid", "axis"], name)


class MseStepVsTheoryTest(parameterized.TestCase):

  @parameterized.parameters(2, 3, 4, 6)
  def test_gaussian_clipping_value(self, bits):
    """mse_step on N(0,1) samples ↔ the closed-form optimum ↔ a Monte Carlo argmin."""
    from kure_jax.core import theory
    x = np.random.default_rng(11).normal(size=1_000_000).astype(np.float32)
    half = 2 ** (bits - 1)
    clip_picker = half * float(quant.mse_step(x, bits, "midrise"))
    clip_theory = half * float(theory.gaussian_optimal_step(1.0, bits))
    # Monte Carlo: a fresh sample, dense scan of the clipping value around the optimum
    y = np.random.default_rng(12).normal(size=400_000)
    cands = np.linspace(0.8, 1.2, 161) * clip_theory
    errs = [np.mean((np_quantize(y, c / half, bits, "midrise") - y) ** 2) for c in cands]
    clip_mc = cands[int(np.argmin(errs))]
    self.assertAlmostEqual(clip_picker / clip_theory, 1.0, delta=0.01)
    self.assertAlmostEqual(clip_mc / clip_theory, 1.0, delta=0.01)
    # the MSE the picker reaches is the closed-form optimum's
    mse_at_pick = np_err(x, clip_picker / half, bits, "midrise")
    self.assertAlmostEqual(mse_at_pick / float(theory.gaussian_mse(1.0, bits, clip_theory / half)), 1.0, delta=0.01)
