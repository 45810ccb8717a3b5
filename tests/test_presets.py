"""The evaluation presets (ours / the KURE authors' conventions) and DoReFa's sliding-grid step perturbation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kure_jax import data, models, qat
from kure_jax.checkpoint import load_variables
from kure_jax.core import quant as Q
from kure_jax.errors import UserError
from kure_jax.evaluation.evaluate import eval_settings, run_eval
from kure_jax.evaluation.robustness import Grid, Sweep
from kure_jax.models.layers import bias_correct
from kure_jax.training.train import train_and_evaluate
from tests.test_train import tiny_config, write_class_folders


# ----------------------------------------------------------------------------------
# The sliding grid


class SlidingGridTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_reference_and_dorefa_at_ratio_one(self):
    x = np.tanh(np.random.default_rng(0).normal(size=4096)).astype(np.float32)
    x /= np.abs(x).max()                                        # DoReFa's normalized weights, in [−1, 1]
    quantize = self.variant(lambda v, s: Q.quantize(v, s, 4, "sliding"))
    for ratio in (0.7, 1.0, 1.3):
      step = (2 / 15) / ratio
      ref = -1 + step * np.round((x + 1) / step)               # NumPy: anchored at −1, no clipping
      np.testing.assert_allclose(np.asarray(quantize(x, np.float32(step))), ref, atol=1e-6)
    # at DoReFa's own step the sliding grid is DoReFa's midrise grid, value for value, except at exact ties, which
    # the sliding grid rounds half to even as the authors' torch.round does and midrise rounds up
    v = (x + 1) * 7.5
    off_tie = np.abs(v - np.floor(v) - 0.5) > 1e-4
    assert off_tie.mean() > 0.99
    np.testing.assert_allclose(np.asarray(quantize(x, np.float32(2 / 15)))[off_tie],
                               np.asarray(Q.quantize(x, 2 / 15, 4, "midrise"))[off_tie], atol=1e-6)

  def test_levels_gained_and_lost(self):
    """The authors' perturbation of 4-bit DoReFa: 11 levels at scale × 0.7, 21 at × 1.3 (16 at 1)."""
    x = jnp.linspace(-1.0, 1.0, 20001)
    for ratio, count in ((0.7, 11), (1.0, 16), (1.3, 21)):
      q = Q.quantize(x, (2 / 15) / ratio, 4, "sliding")
      assert len(np.unique(np.round(np.asarray(q), 5))) == count, ratio

  def test_straight_through_everywhere(self):
    g = jax.grad(lambda v: jnp.sum(Q.quantize(v, 0.3, 4, "sliding")))(jnp.linspace(-3.0, 3.0, 13))
    np.testing.assert_array_equal(np.asarray(g), 1.0)          # no clipping range, so no zero gradient

  def test_step_pickers_refuse_it(self):
    with pytest.raises(ValueError, match="sliding grid has no clipping range"):
      Q.mse_step(jnp.ones(8), 4, "sliding")


# ----------------------------------------------------------------------------------
# Presets


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_class_folders(tmp_path_factory.mktemp("data"))


def test_preset_fills_only_unset_fields(folder):
  c = tiny_config(folder, **{"eval.preset": "authors"})
  assert eval_settings(c) == {"weight_grid": "midrise", "bias_correction": "mean", "layers": "inner_convs",
                              "methods": ("lapq",)}
  c = tiny_config(folder, **{"eval.preset": "authors", "eval.bias_correction": "none", "eval.methods": ("mse",)})
  assert eval_settings(c) == {"weight_grid": "midrise", "bias_correction": "none", "layers": "inner_convs",
                              "methods": ("mse",)}
  assert eval_settings(tiny_config(folder)) == {"weight_grid": "signed", "bias_correction": "none", "layers": "kure",
                                                "methods": ("mse",)}
  assert eval_settings(tiny_config(folder, **{"eval.weight_grid": "midrise"}))["weight_grid"] == "midrise"


@pytest.mark.parametrize("overrides, message", [
    ({"eval.preset": "paper"}, "eval.preset is 'paper'; choose one of ours, authors"),
    ({"eval.layers": "all"}, "eval.layers is 'all'; choose one of kure, inner_convs"),
    ({"eval.dorefa_mode": "sliding"}, "needs a DoReFa checkpoint"),
    ({"quant.method": "dorefa", "eval.weight_grid": "signed"}, "does not fit a DoReFa checkpoint"),
])
def test_bad_preset_settings_are_one_line(folder, overrides, message):
  with pytest.raises(UserError, match=message):
    eval_settings(tiny_config(folder, **overrides))


def test_inner_convs_are_the_authors_layers():
  model = models.get_model("resnet20", 10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  paths = models.inner_convs(model, variables, (32, 32, 3))
  assert len(paths) == 17                                      # 19 convs: all but conv1 and the very last
  assert paths[0] == "layer1_0/conv1/kernel" and paths[-1] == "layer3_2/conv1/kernel"
  assert "layer3_2/conv2/kernel" not in paths and "fc/kernel" not in paths


@pytest.mark.slow
def test_authors_preset_scores_what_a_hand_quantized_model_scores(folder, tmp_path):
  """W3 under the authors' preset (MSE steps here, to stay quick) = the model with its 17 inner conv kernels
  quantized by hand on the midrise grid and bias-corrected per channel, evaluated plainly."""
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_config(folder, max_steps=4), workdir)
  c = tiny_config(folder, **{"eval.preset": "authors", "eval.methods": ("mse",), "eval.bits": (3,),
                             "eval.ratio_min": 1.0, "eval.ratio_max": 1.0, "eval.ratio_steps": 1,
                             "eval.policies": ("exact",), "eval.targets": ("weights",)})
  rows = run_eval(c, [workdir], None, str(tmp_path / "out"), progress=False)
  assert len(rows) == 1
  variables, _ = load_variables(workdir)
  model = models.get_model("resnet20", 2, weight_grid="midrise")
  params = jax.tree.map(np.asarray, variables["params"])
  for path in models.inner_convs(model, variables, (32, 32, 3)):
    node = params
    for part in path.split("/")[:-1]:
      node = node[part]
    w = node["kernel"]
    step = float(Q.mse_step(w, 3, "midrise"))
    half = 4                                                   # 2^(3−1)
    q = step * np.clip(np.floor(w / step) + 0.5, -(half - 0.5), half - 0.5)
    node["kernel"] = np.asarray(bias_correct(jnp.asarray(q), jnp.asarray(w), 1))
  plain = models.get_model("resnet20", 2)
  ds = data.make_dataset(c.dataset, "eval", batch_size=10, train=False, seed=0)
  correct = count = 0
  for batch in ds.iterate():
    logits = plain.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch["image"])
    correct += int(np.sum((np.argmax(logits, -1) == batch["label"]) & batch["mask"]))
    count += int(np.sum(batch["mask"]))
  assert rows[0]["correct"] == correct and rows[0]["count"] == count


@pytest.mark.slow
def test_dorefa_sliding_mode(folder, tmp_path):
  """The authors' DoReFa perturbation: ratio 1 is the trained model; other ratios slide the weight grid only."""
  base = str(tmp_path / "float")
  train_and_evaluate(tiny_config(folder, max_steps=3), base)
  workdir = str(tmp_path / "dorefa")
  qc = tiny_config(folder, **{"quant.method": "dorefa", "quant.w_bits": 4, "quant.a_bits": 4, "init_from": base,
                              "max_steps": 3})
  result = train_and_evaluate(qc, workdir)
  variables, meta = load_variables(workdir)
  ds = data.make_dataset(qc.dataset, "eval", batch_size=10, train=False, seed=0)
  calib = [data.make_dataset(qc.dataset, "train", batch_size=10, train=False, seed=0).get_batch(0)["image"]]
  model = models.get_model("resnet20", 2, **{**models.model_kwargs(qc), "weight_grid": "sliding"})
  grid = Grid(bits=(4,), ratios=(0.7, 1.0, 1.3), methods=("learned",), targets=("both",), weight_grid="sliding",
              dorefa_mode="sliding")
  sweep = Sweep(model, variables, grid, calibration=calib, qat=meta["quant"])
  rows = {r["ratio"]: r for r in sweep.score(list(ds.iterate()))}
  assert rows[1.0]["top1"] == pytest.approx(result["top1"], abs=1e-6)   # ratio 1: DoReFa as trained
  # what the hook does to one kernel at ratio 0.7: the tanh-normalized weights on 11 levels from −1
  pt = {k: v[0] for k, v in sweep._arrays.items()}                       # the first point: ratio 0.7
  quant = sweep._quant_for_point(sweep.base_steps(), pt)
  entry = quant["layer2_0"]["conv1"]
  assert float(entry["w_step"]) == pytest.approx((2 / 15) / 0.7, rel=1e-6)
  assert float(entry["a_step"]) == pytest.approx(float(sweep.base_steps()["a"]["layer2_0/conv1/kernel"][0, 0]),
                                                 rel=1e-6)              # activations are not perturbed
  with pytest.raises(UserError, match="goes with weight_grid 'sliding'"):
    Grid(bits=(4,), weight_grid="midrise", dorefa_mode="sliding").validate()
