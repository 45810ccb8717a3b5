"""The one-call robustness sweep against plain sequential evaluation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kure_jax.core import quant
from kure_jax.errors import UserError
from kure_jax.evaluation.robustness import Grid, Sweep
from kure_jax.models.layers import QConv, QDense, quant_collection
from kure_jax.training.train import classification_sums


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(QConv(8, (3, 3), act_grid="signed", name="stem")(x))
    x = nn.relu(QConv(16, (3, 3), strides=2, name="body1")(x))
    x = nn.relu(QConv(16, (3, 3), name="body2")(x))
    x = nn.relu(QDense(16, name="fc1")(x.mean((1, 2))))
    return QDense(10, name="head")(x)


@pytest.fixture(scope="module")
def setup():
  model = Net()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(96, 8, 8, 3)).astype(np.float32)
  variables = model.init(jax.random.key(0), images[:1])
  # labels = the float model's own predictions on half the examples: accuracy is informative
  logits = model.apply(variables, images)
  labels = np.where(rng.random(96) < 0.7, np.argmax(logits, -1), rng.integers(0, 10, 96)).astype(np.int32)
  batches = [{"image": images[i:i + 32], "label": labels[i:i + 32], "mask": np.ones(32, bool)} for i in range(0, 96, 32)]
  return model, variables, batches


def sequential_correct(model, variables, batches, pt, grid, acts, act_grids, paths):
  """The plain way: build this one quantizer eagerly, evaluate, count correct predictions."""
  axis = -1 if grid.granularity == "channel" else None
  method = quant.STEP_METHODS[pt["method"]]

  def policy(s):
    return s if pt["policy"] == "exact" else quant.pow2_step(s, pt["policy"].split("_")[1])

  layers = {}
  for p in paths:
    k = variables["params"]
    for part in p.split("/"):
      k = k[part]
    entry = {"w_bits": jnp.asarray(pt["bits"] if pt["target"] in ("weights", "both") else 0),
             "w_step": policy(method(k, pt["bits"], grid.weight_grid, axis=axis) * pt["ratio"])}
    if pt["target"] != "weights":
      entry.update(a_bits=jnp.asarray(pt["bits"] if pt["target"] in ("activations", "both") else 0),
                   a_step=policy(method(acts[p], pt["bits"], act_grids[p]) * pt["ratio"]))
    layers[p] = entry
  q = quant_collection(variables["params"], layers)
  correct = 0
  for b in batches:
    logits = model.apply({**variables, "quant": q}, b["image"])
    correct += int(classification_sums(logits, b["label"], b["mask"])["top1"])
  return correct


def test_every_point_equals_sequential_and_compiles_once(setup):
  model, variables, batches = setup
  grid = Grid(bits=(2, 4, 8), ratios=(0.8, 1.0, 1.25), policies=("exact", "pow2_nearest"),
              methods=("mse", "max"), targets=("weights", "both"))
  sweep = Sweep(model, variables, grid, calibration=[b["image"] for b in batches[:1]])
  rows = sweep.score(batches)
  assert len(rows) == 3 * 3 * 2 * 2 * 2
  assert sweep._score_batch._cache_size() == 1  # one compilation for every point and batch
  assert sweep.paths == ["body1/kernel", "body2/kernel", "fc1/kernel"]  # stem and head stay float
  acts = {p: np.asarray(v) for p, v in sweep._acts.items()}
  for row in rows:
    want = sequential_correct(model, variables, batches, row, grid, acts, sweep.act_grids, sweep.paths)
    assert row["correct"] == want, row
  # the grid is informative: low bits hurt, and more at 2 bits than at 8
  by = {(r["bits"], r["ratio"], r["policy"], r["method"], r["target"]): r["top1"] for r in rows}
  assert by[(8, 1.0, "exact", "mse", "weights")] > by[(2, 1.0, "exact", "mse", "both")]


def test_16_bits_reproduces_float(setup):
  model, variables, batches = setup
  rows = Sweep(model, variables, Grid(bits=(16,), targets=("weights",), granularity="channel")).score(batches)
  float_correct = sum(int(classification_sums(model.apply(variables, b["image"]), b["label"], b["mask"])["top1"])
                      for b in batches)
  assert abs(rows[0]["top1"] - 100 * float_correct / 96) <= 0.1


@pytest.mark.parametrize("kw, message", [
    (dict(bits=(1, 4)), "outside 2…16"),
    (dict(bits=(17,)), "outside 2…16"),
    (dict(ratios=(0.0,)), "must be > 0"),
    (dict(policies=("pow3",)), "unknown 'pow3'"),
    (dict(methods=("lapq2",)), "unknown 'lapq2'"),
    (dict(targets=("bias",)), "unknown 'bias'"),
])
def test_bad_grid(kw, message):
  with pytest.raises(UserError, match=message):
    Grid(**kw).validate()


@pytest.mark.slow
def test_checkpoints_of_one_architecture_compile_once(setup):
  """A second checkpoint of the same model on the same grid reuses the compiled scorer (eval.py with N checkpoints
  compiles once): no backend compilation at all while it is prepared and scored, and its rows are its own."""
  model, variables, batches = setup
  grid = Grid(bits=(3, 4), ratios=(0.9, 1.1), methods=("mse", "aciq_gauss"), targets=("weights", "both"))
  calib = [b["image"] for b in batches[:1]]
  first = Sweep(model, variables, grid, calibration=calib)
  rows_first = first.score(batches)
  noise = np.random.default_rng(5)  # another checkpoint, same shapes (noise: a ReLU net ignores a common scale)
  other = jax.tree.map(lambda x: x + 0.5 * np.std(x) * noise.normal(size=x.shape).astype(np.float32), variables)
  compiles = []

  def listener(event, duration, **kwargs):  # lowering precedes the persistent cache (conftest): a hit counts too
    if event.endswith(("backend_compile_duration", "jaxpr_to_mlir_module_duration")):
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    second = Sweep(Net(), other, grid, calibration=calib)  # a fresh model object: equal, so the same plan
    rows_second = second.score(batches)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  assert second._score_batch is first._score_batch
  fresh = Sweep(model, other, grid, calibration=calib, chunk=2)  # a different plan compiles its own
  assert fresh._score_batch is not first._score_batch
  assert [r["correct"] for r in fresh.score(batches)] == [r["correct"] for r in rows_second]
  assert [r["correct"] for r in rows_second] != [r["correct"] for r in rows_first]
  # ACIQ base steps in the sweep (they once failed to trace): a point equals the sequential evaluation
  acts = {p: np.asarray(v) for p, v in first._acts.items()}
  for row in [r for r in rows_first if r["method"] == "aciq_gauss" and r["ratio"] == 1.1]:
    assert row["correct"] == sequential_correct(model, variables, batches, row, grid, acts, first.act_grids,
                                                first.paths), row
