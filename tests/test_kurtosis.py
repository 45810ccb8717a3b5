"""kurtosis / kure_penalty against SciPy and hand-built parameter trees."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from scipy import stats

import kure_jax
from kure_jax import kurtosis, kure_penalty, kurtosis_by_layer, select_kernels


class KurtosisTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((1000,), ((7, 11),), ((3, 3, 8, 16),))
  def test_matches_scipy(self, shape):
    x = np.random.default_rng(0).standard_t(df=5, size=shape).astype(np.float32)
    got = self.variant(kurtosis)(x)
    want = stats.kurtosis(x.ravel().astype(np.float64), fisher=False)
    np.testing.assert_allclose(got, want, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_axis_matches_scipy(self):
    x = np.random.default_rng(1).gamma(2.0, size=(64, 5)).astype(np.float32)
    got = self.variant(lambda v: kurtosis(v, axis=0))(x)
    np.testing.assert_allclose(got, stats.kurtosis(x.astype(np.float64), axis=0, fisher=False), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ddof1_is_the_authors_definition(self):
    x = np.random.default_rng(2).normal(size=50).astype(np.float64)
    authors = np.mean(((x - x.mean()) / x.std(ddof=1)) ** 4)  # torch.std is unbiased
    got = self.variant(lambda v: kurtosis(v, ddof=1))(x.astype(np.float32))
    np.testing.assert_allclose(got, authors, rtol=1e-5)
    # and differs from the population definition by exactly ((n-1)/n)^2
    np.testing.assert_allclose(got / kurtosis(x.astype(np.float32)), (49 / 50) ** 2, rtol=1e-5)

  @parameterized.parameters(("uniform", 1.8), ("normal", 3.0), ("laplace", 6.0))
  def test_large_samples_hit_their_kurtosis(self, dist, want):
    rng = np.random.default_rng(3)
    x = getattr(rng, dist)(size=2_000_000).astype(np.float32)
    self.assertAlmostEqual(float(kurtosis(x)) / want, 1.0, delta=0.02)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.0, 0.3, -7.25, 1e4)
  def test_constant_tensor_is_finite_with_finite_gradient(self, c):
    x = jnp.full((4, 5), c, jnp.float32)
    value, grad = self.variant(jax.value_and_grad(kurtosis))(x)
    self.assertEqual(float(value), 0.0)
    chex.assert_tree_all_finite(grad)
    np.testing.assert_array_equal(grad, 0.0)

  def test_gradient_matches_finite_differences(self):
    x = np.random.default_rng(4).normal(size=20)
    with jax.enable_x64(True):
      g = jax.grad(kurtosis)(jnp.asarray(x, jnp.float64))
      h = 1e-6
      fd = [(stats.kurtosis(x + h * e, fisher=False) - stats.kurtosis(x - h * e, fisher=False)) / (2 * h)
            for e in np.eye(20)]
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)

  def test_empty_raises(self):
    with pytest.raises(ValueError, match="`x` is empty"):
      kurtosis(jnp.zeros((0, 3)))

  def test_bfloat16_input_is_computed_in_float32(self):
    x = np.random.default_rng(5).normal(size=4096).astype(np.float32)
    got = kurtosis(jnp.asarray(x, jnp.bfloat16))
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_allclose(got, stats.kurtosis(x.astype(jnp.bfloat16).astype(np.float64), fisher=False),
                               rtol=1e-4)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Conv(8, (3, 3))(x))
    return x + nn.Conv(8, (3, 3))(y)


class SmallCNN(nn.Module):
  """Auto-named layers, written in forward order; the head is the last Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))  # Conv_0: the stem
    for _ in range(11):                  # _Block_0 .. _Block_10 (natural order matters)
      x = _Block()(x)
    x = nn.Conv(8, (1, 1))(x)            # Conv_1
    x = x.mean(axis=(1, 2))
    x = nn.relu(nn.Dense(16)(x))         # Dense_0
    return nn.Dense(10)(x)               # Dense_1: the head


class NamedCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    x = nn.Conv(4, (3, 3), name="body")(x)
    return nn.Dense(3, name="head")(x.mean((1, 2)))


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    for w in (32, 32, 32):
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(10)(x)


def _params(model, shape=(1, 8, 8, 3)):
  return model.init(jax.random.key(0), jnp.ones(shape))["params"]


class SelectionTest(chex.TestCase):

  def test_default_selection_on_small_cnn(self):
    params = _params(SmallCNN())
    want = {f"_Block_{i}/Conv_{j}/kernel" for i in range(11) for j in range(2)} | {"Conv_1/kernel", "Dense_0/kernel"}
    self.assertEqual(set(select_kernels(params)), want)
    # the whole variables dict (with a 'params' level) selects the same layers
    variables = SmallCNN().init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    self.assertEqual({p.removeprefix("params/") for p in select_kernels(variables)}, want)

  def test_named_and_mlp_models(self):
    self.assertEqual(list(select_kernels(_params(NamedCNN()))), ["body/kernel"])
    self.assertEqual(list(select_kernels(_params(MLP(), (1, 5)))), ["Dense_1/kernel", "Dense_2/kernel"])

  def test_include_exclude_and_switches(self):
    params = _params(SmallCNN())
    self.assertEqual(set(select_kernels(params, include=r"^_Block_1/")), {"_Block_1/Conv_0/kernel", "_Block_1/Conv_1/kernel"})
    self.assertEqual(set(select_kernels(params, include=[r"^Conv_", r"^Dense_"])), {"Conv_1/kernel", "Dense_0/kernel"})
    sel = select_kernels(params, exclude=r"_Block_\d+/Conv_1")
    self.assertNotIn("_Block_3/Conv_1/kernel", sel)
    self.assertIn("_Block_3/Conv_0/kernel", sel)
    self.assertIn("Conv_0/kernel", select_kernels(params, skip_stem=False))
    self.assertIn("Dense_1/kernel", select_kernels(params, skip_head=False))
    self.assertLen(select_kernels(params, skip_stem=False, skip_head=False), 26)

  def test_bad_selection_messages(self):
    params = _params(NamedCNN())
    with pytest.raises(ValueError, match="no kernel left.*stem=stem/kernel, head=head/kernel"):
      select_kernels(params, include="nothing-matches")
    with pytest.raises(ValueError, match="bad regex"):
      select_kernels(params, include="(")
    with pytest.raises(ValueError, match="no conv or dense kernel"):
      select_kernels({"bias": jnp.ones(3)})


class PenaltyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_reductions_match_scipy(self):
    params = _params(SmallCNN())
    sel = select_kernels(params)
    per_layer = np.array([stats.kurtosis(np.asarray(k, np.float64).ravel(), fisher=False) for k in sel.values()])
    for red, fn in [("mean", np.mean), ("sum", np.sum), ("max", np.max)]:
      for target in (1.8, 3.0):
        got = self.variant(lambda p: kure_penalty(p, target, reduction=red))(params)
        np.testing.assert_allclose(got, fn((per_layer - target) ** 2), rtol=1e-5)

  def test_kurtosis_by_layer(self):
    params = _params(NamedCNN())
    k = kurtosis_by_layer(params)
    self.assertEqual(list(k), ["body/kernel"])
    np.testing.assert_allclose(k["body/kernel"], stats.kurtosis(np.ravel(params["body"]["kernel"]), fisher=False), rtol=1e-5)

  def test_penalty_alone_drives_kernels_to_uniform(self):
    init = jax.nn.initializers.normal(1.0)
    keys = jax.random.split(jax.random.key(1), 3)
    params = {"stem": {"kernel": init(keys[0], (3, 3, 3, 16))},
              "Block_0": {"Conv_0": {"kernel": init(keys[1], (3, 3, 16, 16))},
                          "Conv_1": {"kernel": init(keys[2], (3, 3, 16, 16))}},
              "head": {"kernel": init(keys[0], (16, 10))}}
    before = kurtosis_by_layer(params)
    assert all(abs(float(v) - 3.0) < 0.4 for v in before.values()), before
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
      g = jax.grad(kure_penalty)(p)
      u, s = opt.update(g, s)
      return optax.apply_updates(p, u), s

    for _ in range(300):
      params, state = step(params, state)
    after = kurtosis_by_layer(params)
    self.assertEqual(set(after), {"Block_0/Conv_0/kernel", "Block_0/Conv_1/kernel"})
    for v in after.values():
      self.assertAlmostEqual(float(v), 1.8, delta=0.05)
    np.testing.assert_array_equal(params["head"]["kernel"], init(keys[0], (16, 10)))  # untouched

  def test_bad_arguments(self):
    params = _params(NamedCNN())
    with pytest.raises(ValueError, match="unknown reduction 'median'"):
      kure_penalty(params, reduction="median")
    with pytest.raises(ValueError, match="`target` must be a number ≥ 1"):
      kure_penalty(params, target=0.5)

  def test_public_names(self):
    self.assertIs(kure_jax.kurtosis, kurtosis)
    self.assertEqual(kure_jax.KURTOSIS_UNIFORM, 1.8)
