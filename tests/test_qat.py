"""Quantization-aware training: LSQ's gradient, DoReFa's values, QAT runs, and scoring QAT checkpoints."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_resnet20
from kure_jax import data, models, qat
from kure_jax.checkpoint import load_variables
from kure_jax.core import quant as Q
from kure_jax.errors import UserError
from kure_jax.evaluation.robustness import Grid, Sweep
from kure_jax.metrics import read_metrics
from kure_jax.models.layers import QDense
from kure_jax.training.train import train_and_evaluate, validate_config
from tests.helpers import REPO, SHARED_CIFAR10, override
from tests.test_train import tiny_config, write_class_folders


# -- LSQ ------------------------------------------------------------------------------------


def lsq_out(x, s, g, bits):
  return Q._quantize(x, Q.grad_scale(s, g), bits, "signed")


class LsqGradientTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_step_gradient_is_the_papers(self):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0, 1, 400), jnp.float32)
    c = jnp.asarray(rng.normal(0, 1, 400), jnp.float32)   # a random upstream gradient
    s, bits, g = 0.3, 3, 0.05
    grad = self.variant(jax.grad(lambda s_: jnp.sum(c * lsq_out(x, s_, g, bits))))(jnp.float32(s))
    # LSQ (Esser et al. 2019, eq. 3): ∂x̂/∂s = −v + round(v) inside, Q_N or Q_P where clipped; times g
    v = np.asarray(x) / s
    qn, qp = -4, 3
    per = np.where(v <= qn, qn, np.where(v >= qp, qp, -v + np.round(v)))
    np.testing.assert_allclose(float(grad), g * float(np.sum(np.asarray(c) * per)), rtol=1e-4)
    assert np.sum(v > qp) > 5 and np.sum(v < qn) > 5  # both clipped regions are exercised

  def test_finite_differences(self):
    # The forward is piecewise: d/ds [s·round(x/s)] = round(v) inside, the clip level outside (almost
    # everywhere). LSQ's gradient is that plus −v inside (the straight-through estimate of round), times g.
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 300).astype(np.float64)
    s, bits, eps = 0.41, 2, 1e-6
    with jax.enable_x64(True):
      f = lambda s_: jnp.sum(lsq_out(jnp.asarray(x), s_, 1.0, bits))
      fd = (f(s + eps) - f(s - eps)) / (2 * eps)
      grad1 = jax.grad(f)(jnp.float64(s))
      grad_g = jax.grad(lambda s_: jnp.sum(lsq_out(jnp.asarray(x), s_, 0.1, bits)))(jnp.float64(s))
    v = x / s
    inside = (v > -2) & (v < 1)
    np.testing.assert_allclose(float(grad1) - float(fd), -np.sum(v[inside]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(grad_g), 0.1 * float(grad1), rtol=1e-6)

  def test_init_and_scale(self):
    w = jnp.asarray(np.random.default_rng(2).normal(0, 0.1, (3, 3, 16, 32)), jnp.float32)
    np.testing.assert_allclose(qat.lsq_init(w, 4, "signed"), 2 * np.mean(np.abs(np.asarray(w))) / np.sqrt(7), rtol=1e-5)
    np.testing.assert_allclose(qat.lsq_init(w, 4, "unsigned"), 2 * np.mean(np.abs(np.asarray(w))) / np.sqrt(15),
                               rtol=1e-5)
    assert qat.lsq_scale(w.size, 4, "signed") == pytest.approx(1 / np.sqrt(4608 * 7))
    assert qat.lsq_scale(1024, 2, "unsigned") == pytest.approx(1 / np.sqrt(1024 * 3))


# -- DoReFa ---------------------------------------------------------------------------------


def dorefa_kernel(w, bits):
  layer = QDense(len(w), use_bias=False, weight_grid="midrise")
  params = {"params": {"kernel": jnp.asarray([w], jnp.float32)}}
  w_step, _ = qat.dorefa_steps(bits)
  q = {"w_bits": jnp.asarray(bits), "w_step": w_step, "w_tanh": jnp.asarray(True)}
  return layer.apply({**params, "quant": q}, jnp.ones((1, 1)))[0]


def test_dorefa_weights_by_hand():
  # w̃ = tanh(w)/(2·max|tanh w|) + ½ = (0, .26032, .52591, .65109, .89501); round(3w̃)/3 = (0, 1, 2, 2, 3)/3;
  # mapped by 2q − 1: (−1, −1/3, 1/3, 1/3, 1)
  w = [-2.0, -0.5, 0.05, 0.3, 1.0]
  np.testing.assert_allclose(dorefa_kernel(w, 2), [-1, -1 / 3, 1 / 3, 1 / 3, 1], atol=1e-6)
  # 3 bits, 8 levels: 7w̃ = (0, 1.822, 3.681, 4.558, 6.265) → (0, 2, 4, 5, 6)/7 → 2q − 1
  np.testing.assert_allclose(dorefa_kernel(w, 3), [-1, -3 / 7, 1 / 7, 3 / 7, 5 / 7], atol=1e-6)


def test_dorefa_activations_by_hand():
  x = jnp.asarray([-0.2, 0.1, 0.4, 0.9, 1.7])
  _, step = qat.dorefa_steps(2)                     # clip to [0, 1], round(3x)/3
  np.testing.assert_allclose(Q.quantize(x, step, 2, "unsigned"), [0, 0, 1 / 3, 1, 1], atol=1e-6)


def test_straight_through_gradients():
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(0, 0.5, (1, 6)), jnp.float32)
  c = jnp.asarray(rng.normal(0, 1, 6), jnp.float32)
  layer = QDense(6, use_bias=False, weight_grid="midrise")
  q = {"w_bits": jnp.asarray(2), "w_step": qat.dorefa_steps(2)[0], "w_tanh": jnp.asarray(True)}
  got = jax.grad(lambda k: jnp.sum(c * layer.apply({"params": {"kernel": k}, "quant": q}, jnp.ones((1, 1)))[0]))(w)
  want = jax.grad(lambda k: jnp.sum(c * Q.tanh_normalize(k)[0]))(w)   # rounding passes gradients straight through
  np.testing.assert_allclose(got, want, rtol=1e-5)
  x = jnp.asarray([-0.2, 0.1, 0.4, 0.9, 1.7])
  gx = jax.grad(lambda x_: jnp.sum(Q.quantize(x_, 1 / 3, 2, "unsigned")))(x)
  np.testing.assert_allclose(gx, [0, 1, 1, 1, 0])   # zero where clipped to [0, 1]


# -- config errors --------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("method", "pact", "config.quant.method is 'pact'; choose one of none, dorefa, lsq"),
    ("w_bits", 1, "config.quant.w_bits is 1; QAT needs whole bits in 2…16"),
    ("w_bits", 17, "config.quant.w_bits is 17"),
    ("a_bits", 1, "config.quant.a_bits is 1; QAT needs whole bits in 2…16 (0 keeps activations in float)"),
])
def test_bad_quant_config(field, value, message):
  c = cifar10_resnet20.get_config()
  c.quant.method = "lsq"
  c.quant[field] = value
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate_config(c)


def test_negative_activation_penalty():
  c = cifar10_resnet20.get_config()
  c.kure.activations = -1.0
  with pytest.raises(UserError, match="config.kure.activations must be ≥ 0"):
    validate_config(c)


# -- runs on tiny data ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_class_folders(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def float_run(folder, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("float") / "r20")
  train_and_evaluate(tiny_config(folder, max_steps=3), workdir)
  return workdir


def qat_config(folder, float_run, **overrides):
  return tiny_config(folder, **{"quant.method": "lsq", "quant.w_bits": 4, "quant.a_bits": 4, "init_from": float_run,
                                "schedule.learning_rate": 0.05, **overrides})


@pytest.mark.slow
@pytest.mark.parametrize("method,form", [("lsq", "inputs"), ("dorefa", "inputs"), ("dorefa", "relus")])
def test_qat_checkpoint_scores_itself(folder, float_run, tmp_path, method, form):
  """The evaluator's 'learned' point at the trained bits and ratio 1 is the model the run evaluated (DoReFa in
  both forms: activations at the quantized convs' inputs, or at every ReLU as the authors' model)."""
  workdir = str(tmp_path / method)
  settings = {"quant.method": method, "quant.dorefa_form": form}
  result = train_and_evaluate(qat_config(folder, float_run, **settings, max_steps=4), workdir)
  variables, meta = load_variables(workdir)
  assert meta["quant"]["method"] == method and meta["quant"]["w_bits"] == 4
  assert len(meta["quant"]["paths"]) == 18          # ResNet-20: every conv but the stem; no fc
  assert len(meta["quant"].get("sites", ())) == (19 if form == "relus" else 0)  # the stem's ReLU + 2 per block
  if method == "lsq":
    assert set(variables["qsteps"]) == set(meta["quant"]["paths"])
    init = qat.lsq_init(variables["params"]["layer2_1"]["conv1"]["kernel"], 4, "signed")
    assert abs(float(variables["qsteps"]["layer2_1/conv1/kernel"]["w_step"]) / float(init) - 1) < 0.5
  c = qat_config(folder, float_run, **settings)
  model = models.get_model("resnet20", 2, **models.model_kwargs(c))
  assert model.dorefa_relus == (form == "relus")
  ds = data.make_dataset(c.dataset, "eval", batch_size=10, train=False, seed=0)
  calib = [data.make_dataset(c.dataset, "train", batch_size=10, train=False, seed=0).get_batch(0)["image"]]
  grid = Grid(bits=(2, 4, 8), ratios=(0.9, 1.0), methods=("learned", "mse"), targets=("both",),
              weight_grid=models.weight_grid(models.model_kwargs(c)))
  sweep = Sweep(model, variables, grid, calibration=calib, qat=meta["quant"])
  rows = sweep.score(list(ds.iterate()))
  at_trained = [r for r in rows if r["method"] == "learned" and r["bits"] == 4 and r["ratio"] == 1.0][0]
  assert at_trained["top1"] == pytest.approx(result["top1"], abs=1e-6)
  assert at_trained["loss"] == pytest.approx(result["loss"], rel=1e-4)
  # the authors' rule for another bit-width: Δ_k = Δ_4 · 15 / (2^k − 1)
  base = sweep.base_steps()
  w = np.asarray(base["w"]["layer1_0/conv1/kernel"][0])            # method 'learned', bits 2, 4, 8
  np.testing.assert_allclose(w[0] / w[1], 15 / 3, rtol=1e-5)
  np.testing.assert_allclose(w[2] / w[1], 15 / 255, rtol=1e-5)
  if method == "dorefa":
    np.testing.assert_allclose(w, [2 / 3, 2 / 15, 2 / 255], rtol=1e-5)


@pytest.mark.slow
def test_learned_needs_a_qat_checkpoint(float_run):
  variables, _ = load_variables(float_run)
  with pytest.raises(UserError, match="'learned' needs a QAT checkpoint"):
    Sweep(models.get_model("resnet20", 2), variables, Grid(methods=("learned",)))


@pytest.mark.slow
def test_resume_with_another_quant_setting_is_refused(folder, float_run, tmp_path):
  workdir = str(tmp_path / "q")
  train_and_evaluate(qat_config(folder, float_run, max_steps=2), workdir)
  with pytest.raises(UserError, match="trained with quant=.*'lsq'.* but the config asks for quant=.*'dorefa'"):
    train_and_evaluate(qat_config(folder, float_run, **{"quant.method": "dorefa"}, max_steps=4), workdir)


@pytest.mark.slow
def test_lsq_resume_is_bit_identical(folder, float_run, tmp_path):
  const = {"schedule.name": "constant"}  # the same learning rate whatever max_steps says
  straight = str(tmp_path / "straight")
  train_and_evaluate(qat_config(folder, float_run, max_steps=5, **const), straight)
  resumed = str(tmp_path / "resumed")
  train_and_evaluate(qat_config(folder, float_run, max_steps=2, **const), resumed)   # stopped after 2 steps
  train_and_evaluate(qat_config(folder, float_run, max_steps=5, **const), resumed)
  a, _ = load_variables(straight)
  b, _ = load_variables(resumed)
  chex.assert_trees_all_equal(a, b)


@pytest.mark.slow
def test_kure_moves_latent_kurtosis_during_qat(folder, float_run, tmp_path):
  workdir = str(tmp_path / "k")
  c = qat_config(folder, float_run, **{"quant.method": "dorefa", "kure.weight": 1.0, "kure.activations": 0.1},
                 max_steps=30, num_epochs=5, log_every_steps=1, **{"schedule.learning_rate": 0.1, "schedule.name": "constant"})
  train_and_evaluate(c, workdir)
  rows = read_metrics(workdir, "train")
  assert rows[-1]["kure"] < 0.6 * rows[0]["kure"], [r["kure"] for r in rows]     # latent kernels → 1.8
  assert "kure_act" in rows[0] and np.isfinite(rows[-1]["kure_act"])


# -- real data ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR10.exists(), reason="the real CIFAR-10 (../shared/data/cifar10) is not on this machine")
def test_real_cifar10_qat_w2_beats_ptq_w2(tmp_path):
  """LSQ at W2 from the shipped converged base (weights/study_base) beats the base's W2 PTQ by > 10 points."""
  base = str(REPO / "weights" / "study_base")
  c = cifar10_resnet20.get_config()
  c.dataset.data_dir = str(SHARED_CIFAR10)
  c.batch_size, c.eval_batch_size, c.num_epochs, c.max_steps = 64, 1000, 1, 100
  c.schedule.warmup_epochs, c.schedule.name = 0.0, "constant"
  c.log_every_steps, c.checkpoint_every_steps, c.progress = 50, 10_000, False
  qat_result = train_and_evaluate(override(c, {"init_from": base, "schedule.learning_rate": 0.01, "quant.method": "lsq",
                                               "quant.w_bits": 2, "quant.a_bits": 0}), str(tmp_path / "qat"))
  # post-training quantization of the base at W2 (MSE-optimal steps), the same layers
  variables, _ = load_variables(base)
  ds = data.make_dataset(c.dataset, "eval", batch_size=1000, train=False, seed=0)
  ptq = Sweep(models.get_model("resnet20", 10), variables, Grid(bits=(2,))).score(ds.iterate())[0]
  print(json.dumps({"ptq_w2": ptq["top1"], "qat_w2": qat_result["top1"]}))
  assert qat_result["top1"] > ptq["top1"] + 10, (qat_result, ptq)
