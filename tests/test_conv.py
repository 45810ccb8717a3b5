"""conv2d (the models' convolution) against lax.conv_general_dilated: values, gradients, double backprop."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from kure_jax.models.conv import DIMENSION_NUMBERS, conv2d, materialize

PADDINGS = {"same": "SAME", "valid": "VALID", "asym": ((1, 2), (0, 1))}
CASES = [dict(testcase_name=f"s{s}_k{k}_{p}_{'dw' if dw else 'g1'}_{d}", strides=s, k=k, padding=p, depthwise=dw, dtype=d)
         for s, k, p, dw, d in itertools.product((1, 2), (1, 3), PADDINGS, (False, True), ("float32", "bfloat16"))]
# The quick loop (`-m "not slow"`) checks the hardest case of each kind (stride 2, 3×3, asymmetric padding; grouped
# and depthwise; both dtypes); the rest of the product (44 cases × jit/no jit, ~4 min of compiles) and the double
# backprop run with the slow tests (Conv2dSlowTest).
QUICK = [c for c in CASES if c["strides"] == 2 and c["k"] == 3 and c["padding"] == "asym"]


def reference(x, w, strides, padding, groups):
  return jax.lax.conv_general_dilated(x, w, (strides,) * 2, padding, dimension_numbers=DIMENSION_NUMBERS,
                                      feature_group_count=groups)


def _operands(k, depthwise, dtype, cin=4):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, 7, 6, cin)).astype(dtype)
  w = jax.random.normal(keys[1], (k, k, 1 if depthwise else cin, 8)).astype(dtype)
  return x, w, keys[2], cin if depthwise else 1


def check_values_and_gradients(variant, strides, k, padding, depthwise, dtype):
  """conv2d's output and both gradients equal lax's bit for bit (under `variant`: jit or not)."""
  x, w, key, groups = _operands(k, depthwise, dtype)
  pad = PADDINGS[padding]

  def loss(conv):  # a fixed random cotangent, so every output element matters
    def f(x, w):
      y = conv(x, w)
      return jnp.sum(y.astype(jnp.float32) * jax.random.normal(key, y.shape)), y
    return f

  ours = variant(jax.value_and_grad(loss(lambda x, w: conv2d(x, w, strides, pad, groups)), (0, 1), has_aux=True))
  ref = variant(jax.value_and_grad(loss(lambda x, w: reference(x, w, strides, pad, groups)), (0, 1), has_aux=True))
  (_, y), (dx, dw) = ours(x, w)
  (_, y_ref), (dx_ref, dw_ref) = ref(x, w)
  assert (y.dtype, dx.dtype, dw.dtype) == (x.dtype, x.dtype, w.dtype)
  for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):  # bit for bit
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


class Conv2dTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*QUICK)
  def test_values_and_gradients_equal_lax(self, strides, k, padding, depthwise, dtype):
    check_values_and_gradients(self.variant, strides, k, padding, depthwise, dtype)

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_mode_and_vmap(self):
    x, w, key, _ = _operands(3, False, "float32")
    tx, tw = jax.random.normal(key, x.shape), jax.random.normal(jax.random.fold_in(key, 1), w.shape)
    got = self.variant(lambda *a: jax.jvp(lambda x, w: conv2d(x, w, 2, "SAME"), a[:2], a[2:]))(x, w, tx, tw)
    want = self.variant(lambda *a: jax.jvp(lambda x, w: reference(x, w, 2, "SAME", 1), a[:2], a[2:]))(x, w, tx, tw)
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-5)
    ws = jnp.stack([w, 2 * w])
    batched = self.variant(jax.vmap(jax.grad(lambda w: jnp.sum(jnp.tanh(conv2d(x, w))))))(ws)
    batched_ref = self.variant(jax.vmap(jax.grad(lambda w: jnp.sum(jnp.tanh(reference(x, w, 1, "SAME", 1))))))(ws)
    np.testing.assert_array_equal(batched, batched_ref)

  @parameterized.parameters("float32", "bfloat16")
  def test_materialize_is_exact(self, dtype):
    x = (jax.random.normal(jax.random.key(3), (3, 5, 5, 16)) * 1e3).astype(dtype)
    special = jnp.array([0.0, -0.0, 1e-30, -7.5, jnp.inf, -jnp.inf, jnp.nan], dtype)
    for first in (special, special[::-1]):  # the predicate's element, finite or NaN
      y = x.at[0, 0, 0, :7].set(first)
      for f in (materialize, jax.jit(materialize)):
        got = np.asarray(f(y)).view(np.uint16 if dtype == "bfloat16" else np.uint32)
        np.testing.assert_array_equal(got, np.asarray(y).view(got.dtype))  # bits, so −0 and NaN count

  def test_xla_keeps_the_materialization(self):
    # the speed-up rests on XLA keeping the conditional; if a future XLA drops it, this fails (values stay right)
    x, w, _, _ = _operands(3, False, "float32", cin=16)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(conv2d(jax.nn.relu(x * 1.5 + 0.1), w))), (0, 1)))
    hlo = grad.lower(x, w).compile().as_text()
    self.assertIn("conditional(", hlo)


@pytest.mark.slow
class Conv2dSlowTest(chex.TestCase):
  """The rest of the case product and the double backprop (compiles dominate: ~4 min on 2 CPU cores)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[c for c in CASES if c not in QUICK])
  def test_values_and_gradients_equal_lax(self, strides, k, padding, depthwise, dtype):
    check_values_and_gradients(self.variant, strides, k, padding, depthwise, dtype)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("SAME", 1), ("VALID", 2), (((1, 2), (0, 1)), 2))
  def test_double_backprop_equals_lax(self, padding, strides):
    x, w, key, _ = _operands(3, False, "float32")

    def penalty(conv):  # ‖∇_w L‖₁ (the gradient-ℓ1 regularizer), differentiated again in x and w
      def loss(x, w):
        y = conv(x, w)
        return jnp.sum(jnp.tanh(y) * jax.random.normal(key, y.shape))
      return lambda x, w: jnp.sum(jnp.abs(jax.grad(loss, 1)(x, w)))

    got = self.variant(jax.value_and_grad(penalty(lambda x, w: conv2d(x, w, strides, padding)), (0, 1)))(x, w)
    want = self.variant(jax.value_and_grad(penalty(lambda x, w: reference(x, w, strides, padding, 1)), (0, 1)))(x, w)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)
