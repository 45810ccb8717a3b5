"""BatchNorm folding: the folded float model computes the same logits, and the kernels are W·γ/√(σ²+ε)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kure_jax import models
from kure_jax.evaluation.folding import conv_bn_pairs, fold_batchnorm


def with_random_bn(variables, seed=0):
  """Non-trivial BatchNorm scales, biases and running statistics (at init they are 1, 0, 0, 1)."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
    if name.endswith("['scale']"):
      return jnp.asarray(rng.uniform(0.7, 1.3, x.shape), x.dtype)
    if name.endswith("['mean']") or name.endswith("['bias']"):
      return jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.mark.parametrize("name, size, n_bn", [  # the ImageNet-sized models' compiles are slow tests
    ("resnet20", 32, 19), pytest.param("resnet18", 32, 20, marks=pytest.mark.slow),
    pytest.param("resnet50", 32, 53, marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", 32, 52, marks=pytest.mark.slow)])
def test_folded_model_gives_the_same_logits(name, size, n_bn):
  model = models.get_model(name, 10)
  variables = with_random_bn(models.init_variables(model, jax.random.key(0), (size, size, 3)))
  pairs = conv_bn_pairs(model, variables, (size, size, 3))
  assert len(pairs) == n_bn                 # every BatchNorm found its conv, from the model itself
  folded = fold_batchnorm(model, variables, (size, size, 3))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, size, size, 3)), jnp.float32)
  want, got = model.apply(variables, x), model.apply(folded, x)
  assert float(jnp.max(jnp.abs(want - got))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(want))))
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(folded["params"]), jax.tree.leaves(variables["params"]))]
  assert sum(changed) >= 2 * n_bn           # every folded kernel and BatchNorm changed


def test_folded_kernel_by_hand():
  model = models.get_model("resnet20", 10)
  v = with_random_bn(models.init_variables(model, jax.random.key(0), (32, 32, 3)))
  f = fold_batchnorm(model, v, (32, 32, 3))
  w = np.asarray(v["params"]["layer2_0"]["conv1"]["kernel"])
  bn, st = v["params"]["layer2_0"]["bn1"], v["batch_stats"]["layer2_0"]["bn1"]
  s = np.asarray(bn["scale"]) / np.sqrt(np.asarray(st["var"]) + 1e-5)
  np.testing.assert_allclose(f["params"]["layer2_0"]["conv1"]["kernel"], w * s, rtol=1e-6)
  np.testing.assert_allclose(f["params"]["layer2_0"]["bn1"]["bias"],
                             np.asarray(bn["bias"]) - np.asarray(st["mean"]) * s, rtol=1e-5, atol=1e-7)
  assert ("layer2_0", "conv1") in {p[0] for p in conv_bn_pairs(model, v, (32, 32, 3))}
