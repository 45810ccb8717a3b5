"""DoReFa in the KURE authors' model form: every ReLU clamped to [0, 1] and quantized, the residual stream included."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kure_jax import models, qat
from kure_jax.errors import UserError
from kure_jax.models.layers import LayerQuant, QReLU, quant_collection
from tests.helpers import override


class QReluTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_clamp_then_dorefa_levels(self):
    x = jnp.linspace(-1.0, 2.0, 301)
    q = {"a_bits": jnp.asarray(2), "a_step": jnp.asarray(1 / 3)}
    got = self.variant(lambda v: QReLU().apply({"quant": q}, v))(x)
    np.testing.assert_allclose(got, np.round(np.clip(np.asarray(x), 0, 1) * 3) / 3, atol=1e-6)
    np.testing.assert_array_equal(QReLU().apply({}, x), np.clip(np.asarray(x), 0, 1))  # no entries: the clamp
    # straight-through inside [0, 1], zero outside (DoReFa's); points off the clamp's ends
    x = jnp.linspace(-1.0, 2.0, 300)
    g = jax.grad(lambda v: jnp.sum(QReLU().apply({"quant": q}, v)))(x)
    np.testing.assert_array_equal(g, ((np.asarray(x) >= 0) & (np.asarray(x) <= 1)).astype(np.float32))


def test_sites_in_the_collection():
  q = quant_collection(None, {}, {"layer1_0/relu2": LayerQuant(a_bits=4, a_step=0.2)})
  assert set(q["layer1_0"]["relu2"]) == {"a_bits", "a_step"}
  with pytest.raises(ValueError, match="takes only a_\\* entries"):
    quant_collection(None, {}, {"relu1": {"w_bits": 4, "w_step": 0.1}})


@pytest.mark.slow
def test_resnet20_quantizes_its_residual_stream():
  plain = models.get_model("resnet20", 10)
  model = models.get_model("resnet20", 10, dorefa_relus=True, weight_grid="midrise")
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  v = plain.init(jax.random.key(1), x)
  assert jax.tree.structure(model.init(jax.random.key(1), x)) == jax.tree.structure(v)  # checkpoints fit both
  sites = qat.relu_sites(model, v, x)
  assert len(sites) == 19 and sites[0] == "relu1" and sites[-1] == "layer3_2/relu2"
  q = quant_collection(None, {}, {s: LayerQuant(a_bits=2, a_step=1 / 3) for s in sites})
  _, state = model.apply({**v, "quant": q}, x, capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  for block in ("layer1_0", "layer2_0", "layer3_2"):  # every block's output (the residual stream) on the grid
    out = np.asarray(inter[block]["__call__"][0])
    np.testing.assert_allclose(out * 3, np.round(out * 3), atol=1e-5)
    assert set(np.unique(np.round(out * 3))) <= {0, 1, 2, 3} and len(np.unique(np.round(out * 3))) > 1


def test_validation():
  from configs import cifar10_resnet20

  def config(**fields):
    return override(cifar10_resnet20.get_config(), {"quant.method": "dorefa", **fields})

  with pytest.raises(UserError, match="dorefa_form is 'all'"):
    qat.validate(config(**{"quant.dorefa_form": "all"}))
  with pytest.raises(UserError, match="needs quant.method=dorefa"):
    qat.validate(config(**{"quant.method": "lsq", "quant.dorefa_form": "relus"}))
  with pytest.raises(UserError, match="mobilenet_v2 has none"):
    qat.validate(config(model="mobilenet_v2", **{"quant.dorefa_form": "relus"}))
  qat.validate(config(**{"quant.dorefa_form": "relus"}))
  assert models.model_kwargs(config(**{"quant.dorefa_form": "relus"})) == {"weight_grid": "midrise",
                                                                           "dorefa_relus": True}
  assert models.model_kwargs(config()) == {"weight_grid": "midrise"}
