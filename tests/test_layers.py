"""The quantization hook in QConv/QDense against plain Flax layers and `quantize`."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kure_jax import quantize
from kure_jax.models.layers import QConv, QDense, quant_collection


class Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(QConv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), act_grid="signed", name="stem")(x))
    x = nn.relu(QConv(6, (3, 3), feature_group_count=3, name="dw")(x))
    return QDense(4, name="head")(x.mean((1, 2)))


def _setup():
  net = Net()
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
  return net, net.init(jax.random.key(0), x), x


class HookTest(chex.TestCase):

  def test_layers_match_flax(self):
    x = jax.random.normal(jax.random.key(2), (2, 9, 9, 4))
    k = jax.random.normal(jax.random.key(3), (3, 3, 2, 6))
    got = QConv(6, (3, 3), strides=2, feature_group_count=2, use_bias=True).apply(
        {"params": {"kernel": k, "bias": jnp.arange(6.0)}}, x)
    want = nn.Conv(6, (3, 3), strides=2, feature_group_count=2).apply({"params": {"kernel": k, "bias": jnp.arange(6.0)}}, x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    kd = jax.random.normal(jax.random.key(4), (4, 5))
    np.testing.assert_allclose(QDense(5).apply({"params": {"kernel": kd, "bias": jnp.ones(5)}}, x[:, 0, 0]),
                               nn.Dense(5).apply({"params": {"kernel": kd, "bias": jnp.ones(5)}}, x[:, 0, 0]), atol=1e-5)

  def test_weight_and_activation_quantization(self):
    net, v, x = _setup()
    k = v["params"]["dw"]["kernel"]
    steps = jnp.abs(k).max((0, 1, 2)) / 7
    q = quant_collection(v["params"], {"dw/kernel": {"w_bits": jnp.array(4), "w_step": steps,
                                                      "a_bits": jnp.array(3), "a_step": jnp.array(0.1)}})
    got = net.apply({**v, "quant": q}, x)
    manual = jax.tree.map(lambda a: a, v)
    manual["params"]["dw"]["kernel"] = quantize(k, steps, 4, axis=-1)

    # the same network with the kernel pre-quantized and the dw input quantized by hand
    h = nn.relu(QConv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), act_grid="signed").apply(
        {"params": v["params"]["stem"]}, x))
    h = quantize(h, 0.1, 3, "unsigned")
    h = nn.relu(QConv(6, (3, 3), feature_group_count=3).apply({"params": manual["params"]["dw"]}, h))
    want = QDense(4).apply({"params": v["params"]["head"]}, h.mean((1, 2)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    self.assertGreater(float(jnp.abs(got - net.apply(v, x)).max()), 1e-3)

  def test_zero_bits_is_float_and_vmap_over_bits(self):
    net, v, x = _setup()
    k = v["params"]["dw"]["kernel"]

    def logits(bits):
      q = quant_collection(v["params"], {"dw/kernel": {"w_bits": bits, "w_step": jnp.abs(k).max() / 2 ** (jnp.maximum(bits, 1) - 1)}})
      return net.apply({**v, "quant": q}, x)

    np.testing.assert_array_equal(logits(jnp.array(0)), net.apply(v, x))
    bits = jnp.array([0, 2, 4, 8])
    batched = jax.jit(jax.vmap(logits))(bits)
    for i in range(4):
      np.testing.assert_allclose(batched[i], logits(bits[i]), atol=1e-6)
    err = [float(jnp.abs(batched[i] - batched[0]).max()) for i in range(1, 4)]
    self.assertTrue(err[0] > err[1] > err[2] > 0, err)

  def test_intermediates_sow_inputs(self):
    net, v, x = _setup()
    _, state = net.apply(v, x, mutable=["intermediates"])
    inputs = state["intermediates"]
    np.testing.assert_array_equal(inputs["stem"]["input"][0], x)
    self.assertEqual(inputs["head"]["input"][0].shape, (2, 6))
    self.assertGreaterEqual(float(inputs["dw"]["input"][0].min()), 0.0)  # post-ReLU

  def test_quant_collection_rejects_non_kernel_paths(self):
    with self.assertRaisesRegex(ValueError, "not a kernel path"):
      quant_collection(None, {"dw/bias": {}})
    _, v, _ = _setup()
    with self.assertRaisesRegex(ValueError, "not a kernel of these params"):
      quant_collection(v["params"], {"dww/kernel": {}})
