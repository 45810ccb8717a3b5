"""The gradient-ℓ1 regularizer: its value is ‖∇_W L‖₁, its gradient (double backprop) matches finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_resnet20
from kure_jax.errors import UserError
from kure_jax.metrics import read_metrics
from kure_jax.training.gradient_l1 import with_gradient_l1
from kure_jax.training.train import cross_entropy, train_and_evaluate, validate_config
from tests.test_train import tiny_config, write_class_folders


def test_value_is_the_l1_norm_of_the_gradient():
  # a linear softmax classifier: ∇_W mean CE = Xᵀ(P − Y)/N in closed form
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(32, 5)), rng.normal(0, 0.5, (5, 3))
  y = rng.integers(0, 3, 32)

  def loss_fn(params):
    logits = jnp.asarray(x, jnp.float32) @ params["fc"]["kernel"]
    return cross_entropy(logits, jnp.asarray(y), jnp.ones(32, bool)), None

  params = {"fc": {"kernel": jnp.asarray(w, jnp.float32)}, "other": {"kernel": jnp.ones((2, 2))}}
  loss, value, _ = with_gradient_l1(loss_fn, params, ["fc/kernel"])
  logits = x @ w
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  grad = x.T @ (p - np.eye(3)[y]) / 32
  np.testing.assert_allclose(float(value), np.abs(grad).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(loss), -np.mean(np.log(p[np.arange(32), y])), rtol=1e-5)


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, 3))
  y = rng.integers(0, 3, 16)
  with jax.enable_x64(True):
    def loss_fn(params):  # a two-layer tanh network
      h = jnp.tanh(jnp.asarray(x) @ params["l1"]["kernel"])
      logp = jax.nn.log_softmax(h @ params["l2"]["kernel"])   # float64 all the way (cross_entropy casts to f32)
      return -jnp.mean(logp[jnp.arange(16), jnp.asarray(y)]), None

    def penalty(params):
      return with_gradient_l1(loss_fn, params, ["l1/kernel", "l2/kernel"])[1]

    params = {"l1": {"kernel": jnp.asarray(rng.normal(0, 0.7, (3, 4)))},
              "l2": {"kernel": jnp.asarray(rng.normal(0, 0.7, (4, 3)))}}
    grads = jax.grad(penalty)(params)
    eps = 1e-6
    for layer in ("l1", "l2"):
      w = np.asarray(params[layer]["kernel"])
      fd = np.zeros_like(w)
      for idx in np.ndindex(w.shape):
        plus, minus = w.copy(), w.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd[idx] = (penalty({**params, layer: {"kernel": jnp.asarray(plus)}})
                   - penalty({**params, layer: {"kernel": jnp.asarray(minus)}})) / (2 * eps)
      np.testing.assert_allclose(grads[layer]["kernel"], fd, rtol=1e-5, atol=1e-8)
    assert np.abs(np.asarray(grads["l1"]["kernel"])).max() > 1e-3   # second-order terms are not vanishing


@pytest.mark.parametrize("overrides, message", [
    ({"reg.kind": "l2"}, "config.reg.kind is 'l2'; choose one of kure, grad_l1"),
    ({"reg.kind": "grad_l1", "kure.weight": 1.0}, "replaces KURE: set --config.kure.weight=0"),
    ({"reg.grad_l1_weight": -0.1}, "config.reg.grad_l1_weight must be ≥ 0"),
])
def test_bad_reg_config(overrides, message):
  c = cifar10_resnet20.get_config()
  for k, v in overrides.items():
    section, field = k.split(".")
    c[section][field] = v
  with pytest.raises(UserError, match=message):
    validate_config(c)


@pytest.mark.slow
def test_train_step_with_gradient_l1(tmp_path):
  folder = write_class_folders(tmp_path / "data")
  workdir = str(tmp_path / "g")
  c = tiny_config(folder, max_steps=4, log_every_steps=1, **{"reg.kind": "grad_l1", "reg.grad_l1_weight": 0.05})
  result = train_and_evaluate(c, workdir)
  rows = read_metrics(workdir, "train")
  assert len(rows) == 4 and all(r["grad_l1"] > 0 and np.isfinite(r["grad_l1"]) for r in rows)
  assert all(abs(r["loss"] - r["ce"] - 0.05 * r["grad_l1"]) < 1e-4 * r["loss"] for r in rows)
  assert result["step"] == 4
