"""The typed quantizer spec (LayerQuant), its one builder, the tree-path helpers and the step providers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kure_jax import tree_paths
from kure_jax.core import formats as F
from kure_jax.core import quant as Q
from kure_jax.errors import UserError
from kure_jax.evaluation import step_providers
from kure_jax.models.layers import LayerQuant, QDense, quant_collection
from kure_jax.qat import dorefa_normalization


def test_groups_must_be_complete():
  with pytest.raises(ValueError, match="w_bits, w_step go together; missing w_step"):
    LayerQuant(w_bits=4)
  with pytest.raises(ValueError, match="missing a_ratio"):
    LayerQuant(a_fmt=2, a_scale=0.1)
  with pytest.raises(ValueError, match="needs w_bits"):
    LayerQuant(w_bias_corr=1)
  assert LayerQuant(w_tanh=True).entries() == {"w_tanh": jnp.asarray(True)}
  with pytest.raises(ValueError, match="a_formats lists what a_fmt can name; it needs a_fmt"):
    LayerQuant(a_formats={"mxfp4": True})


def test_formats_field_narrows_the_computed_kinds_without_changing_values():
  # w_fmt indexes formats.FORMATS; w_formats (keys only, static) says which formats it may name, so the hook
  # computes only their kinds: the values equal the unnarrowed hook's and fake_quantize's, bit for bit
  k = jax.random.normal(jax.random.key(2), (64, 3))
  x = jax.random.normal(jax.random.key(3), (2, 64))
  layer = QDense(3, use_bias=False)
  named = ("int4", "fp4_e2m1", "mxfp4")

  def out(fmt, formats):
    spec = LayerQuant(w_fmt=F.FORMATS.index(fmt), w_scale=0.25 if fmt != "mxfp4" else 1.0, w_ratio=1.1,
                      w_formats=formats)
    return jax.jit(lambda q: layer.apply({"params": {"kernel": k}, "quant": q}, x))(
        quant_collection(None, {"kernel": spec}))

  for fmt in named:
    want = x @ F.fake_quantize(k, fmt, 0.25 if fmt != "mxfp4" else 1.0, 1.1, axis=-2)
    narrowed = out(fmt, dict.fromkeys(named, True))
    np.testing.assert_array_equal(narrowed, out(fmt, None))
    np.testing.assert_allclose(narrowed, want, rtol=1e-6, atol=1e-6)


def test_builder_places_entries_beside_kernels_and_rejects_typos():
  params = {"a": {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}}, "fc": {"kernel": jnp.ones((4, 2))}}
  q = quant_collection(params, {"a/conv/kernel": LayerQuant(w_bits=4, w_step=0.1),
                                "params/fc/kernel": {"a_bits": 8, "a_step": 0.5}})
  assert set(q) == {"a", "fc"} and set(q["a"]["conv"]) == {"w_bits", "w_step"}
  assert int(q["a"]["conv"]["w_bits"]) == 4 and float(q["fc"]["a_step"]) == 0.5
  with pytest.raises(ValueError, match="unknown entries w_bit"):
    quant_collection(params, {"fc/kernel": {"w_bit": 4, "w_step": 0.1}})
  with pytest.raises(ValueError, match="not a kernel of these params"):
    quant_collection(params, {"fc2/kernel": LayerQuant()})
  assert dorefa_normalization(["a/conv/kernel"]) == {"a": {"conv": {"w_tanh": jnp.asarray(True)}}}


def test_spec_is_a_pytree_and_vmaps():
  # one spec with batched arrays vmaps into the hook: the sweep's "settings are data"
  k = jax.random.normal(jax.random.key(0), (5, 3))
  x = jax.random.normal(jax.random.key(1), (2, 5))
  layer = QDense(3, use_bias=False)
  steps = jnp.asarray([0.1, 0.3])

  def out(spec):
    return layer.apply({"params": {"kernel": k}, "quant": quant_collection(None, {"kernel": spec})}, x)

  leaves = jax.tree.leaves(LayerQuant(w_bits=4, w_step=0.1))
  assert len(leaves) == 2  # None fields are absent, not leaves
  got = jax.vmap(lambda s: out(LayerQuant(w_bits=jnp.asarray(3), w_step=s)))(steps)
  for i, s in enumerate(np.asarray(steps)):
    want = x @ np.asarray(Q.quantize(k, float(s), 3, "signed"))
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out(LayerQuant(w_bits=0, w_step=0.1)), x @ k, rtol=1e-6)  # 0 bits: float


def test_tree_paths():
  tree = {"block": {"conv": {"kernel": 1, "input": (7,)}}}
  assert tree_paths.leaf(tree, "params/block/conv/kernel") == 1
  assert tree_paths.module_node(tree, "block/conv/kernel") is tree["block"]["conv"]
  assert tree_paths.sown_input(tree, "block/conv/kernel") == 7
  assert tree_paths.at_modules({"b/c/kernel": {"x": 1}, "b/d/kernel": {"y": 2}}) == {"b": {"c": {"x": 1},
                                                                                         "d": {"y": 2}}}


class StepProviderTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.kernels = {"l/kernel": jax.random.normal(jax.random.key(2), (3, 3, 4, 6))}
    self.acts = {"l/kernel": jnp.abs(jax.random.normal(jax.random.key(3), (500,)))}
    self.bits = jnp.asarray([2, 4, 8])

  @chex.variants(with_jit=True, without_jit=True)
  def test_statistic_table_equals_the_step_functions(self):
    for channel in (False, True):
      t = self.variant(lambda k, a, b, c=channel: step_providers.statistic_table(
          "mse", k, a, b, weight_grid="signed", act_grids={"l/kernel": "unsigned"}, channel=c))(
              self.kernels, self.acts, self.bits)
      for i, b in enumerate([2, 4, 8]):
        want_w = Q.mse_step(self.kernels["l/kernel"], b, "signed", axis=-1 if channel else None)
        np.testing.assert_allclose(t["w"]["l/kernel"][i], want_w, rtol=1e-6)
        np.testing.assert_allclose(t["a"]["l/kernel"][i], Q.mse_step(self.acts["l/kernel"], b, "unsigned"), rtol=1e-6)
      self.assertEqual(t["w"]["l/kernel"].shape, (3, 6) if channel else (3,))

  def test_learned_table_rescales_by_levels(self):
    learned = {"l/kernel": {"w": jnp.asarray(0.3), "a": jnp.asarray(0.05)}}
    t = step_providers.learned_table(learned, (4, 3), self.bits, self.kernels, ["l/kernel"], channel=True)
    want_w = 0.3 * 15 / (2.0 ** np.asarray([2, 4, 8]) - 1)
    np.testing.assert_allclose(t["w"]["l/kernel"], np.repeat(want_w[:, None], 6, 1), rtol=1e-6)
    np.testing.assert_allclose(t["a"]["l/kernel"], 0.05 * 7 / (2.0 ** np.asarray([2, 4, 8]) - 1), rtol=1e-6)

  def test_precomputed_table(self):
    given = {b: {"l/kernel": {"w": 0.1 * b, "a": 0.01 * b}} for b in (2, 4)}
    t = step_providers.precomputed_table(given, (2, 4), self.kernels, channel=True, with_acts=True)
    np.testing.assert_allclose(t["w"]["l/kernel"], np.repeat([[0.2], [0.4]], 6, 1), rtol=1e-6)
    np.testing.assert_allclose(t["a"]["l/kernel"], [0.02, 0.04], rtol=1e-6)
    with self.assertRaisesRegex(UserError, "no steps for bit-width"):
      step_providers.precomputed_table(given, (2, 3), self.kernels, channel=False, with_acts=False)
    with self.assertRaisesRegex(UserError, "has shape"):
      step_providers.precomputed_table({2: {"l/kernel": {"w": np.ones(5)}}}, (2,), self.kernels, channel=True,
                                       with_acts=False)
    with self.assertRaisesRegex(UserError, "no activation step"):
      step_providers.precomputed_table({2: {"l/kernel": {"w": 0.1, "a": None}}}, (2,), self.kernels,
                                       channel=False, with_acts=True)
    stacked = step_providers.stack([t, t])
    self.assertEqual(stacked["w"]["l/kernel"].shape, (2, 2, 6))
