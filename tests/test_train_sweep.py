"""config.train_sweep: a robustness grid scored at every epoch evaluation, logged with the eval metrics."""

import pytest

from configs import cifar10_resnet20
from kure_jax import data, models, sharding
from kure_jax.calibration import calibration_sample
from kure_jax.checkpoint import load_variables
from kure_jax.errors import UserError
from kure_jax.evaluation.robustness import Grid, Sweep
from kure_jax.metrics import read_metrics
from kure_jax.training.train import train_and_evaluate, validate_config
from tests.helpers import override
from tests.test_train import tiny_config, write_class_folders


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_class_folders(tmp_path_factory.mktemp("folder"))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "lsq"])
def test_sweep_metrics_equal_a_standalone_sweep_of_the_final_checkpoint(folder, tmp_path, quant):
  # float: mse steps, weights and weights+activations; LSQ: its own learned steps rescaled to 3 and 4 bits
  method, targets = ("mse", ("weights", "both")) if quant == "none" else ("learned", ("weights",))
  sweep = {"bits": (2, 4) if quant == "none" else (3, 4), "ratios": (0.5, 1.0), "targets": targets,
           "method": method, "batches": 2}
  config = tiny_config(folder, max_steps=3, **{"schedule.learning_rate": 0.01, "quant.method": quant},
                       **{f"train_sweep.{k}": v for k, v in sweep.items()})
  workdir = str(tmp_path / "w")
  result = train_and_evaluate(config, workdir)
  (ev,) = read_metrics(workdir, "eval")
  logged = {k: v for k, v in ev.items() if k.startswith("sweep/")}
  assert logged == {k: v for k, v in result.items() if k.startswith("sweep/")}

  # the reference: eval.py's way of scoring the final checkpoint on the same grid, the first 2 eval batches
  variables, meta = load_variables(workdir)
  ds = data.make_dataset(config.dataset, "eval", batch_size=10, train=False, seed=0)
  train_ds = data.make_dataset(config.dataset, "train", batch_size=10, train=False, seed=0)
  calibration = [calibration_sample(train_ds, 10, config.seed + 1)["image"]] if "both" in targets else None
  grid = Grid(bits=sweep["bits"], ratios=sweep["ratios"], methods=(method,), targets=targets)
  mesh = sharding.make_mesh()
  rows = Sweep(models.get_model("resnet20", 2), variables, grid, calibration=calibration, qat=meta.get("quant")).score(
      sharding.shard_batch(b, mesh) for b in ds.iterate(num_steps=2))
  tag = {"weights": "w", "both": "wa"}
  expected = {}
  for r in rows:
    assert r["count"] == 20  # 2 batches of 10 of the 24 test images
    for k in ("top1", "top5", "loss"):
      expected[f"sweep/{tag[r['target']]}{r['bits']}_r{r['ratio']}/{k}"] = r[k]
    assert round(logged[f"sweep/{tag[r['target']]}{r['bits']}_r{r['ratio']}/top1"] * 20 / 100) == r["correct"]
  assert len(expected) == 2 * 2 * len(targets) * 3
  assert logged == expected
  assert len({v for k, v in logged.items() if k.endswith("/loss")}) > 1  # the points differ
  assert ev["count"] == 24  # the float evaluation still covers the whole split


@pytest.mark.slow
def test_ranking_sweep_logs_hr_at_10(tmp_path):
  """NCF: the task's metric names (hr@10, ndcg@10), activations calibrated on the first train batch."""
  from kure_jax import tasks
  from tests import test_ncf_train as ncf

  root = ncf.write_movielens(tmp_path / "ml")
  config = ncf.tiny_config(root, num_epochs=1, **{"train_sweep.bits": (3, 8), "train_sweep.targets": ("activations",)})
  workdir = str(tmp_path / "w")
  train_and_evaluate(config, workdir)
  logged = {k: v for k, v in read_metrics(workdir, "eval")[-1].items() if k.startswith("sweep/")}

  variables, _ = load_variables(workdir)
  train_ds = data.make_dataset(config.dataset, "train", batch_size=config.batch_size, train=True, seed=config.seed)
  eval_ds = data.make_dataset(config.dataset, "eval", batch_size=config.eval_batch_size, train=False, seed=0)
  model = models.get_model("neumf", config.dataset.num_classes, **models.model_kwargs(config),
                           **tasks.RANKING.model_kwargs(train_ds))
  rows = Sweep(model, variables, Grid(bits=(3, 8), targets=("activations",)), calibration=[train_ds.get_batch(0)],
               task=tasks.RANKING, skip_stem=False, skip_head=False).score(eval_ds.iterate())
  assert [r["count"] for r in rows] == [ncf.USERS] * 2
  assert logged == {f"sweep/a{r['bits']}_r1.0/{k}": r[k] for r in rows for k in ("hr@10", "ndcg@10", "loss")}


@pytest.mark.parametrize("field, value, message", [
    ("bits", (1,), r"config.train_sweep.bits is \(1,\); give whole bit-widths in 2…16"),
    ("bits", (4, 17), r"config.train_sweep.bits is \(4, 17\)"),
    ("bits", (4.5,), r"config.train_sweep.bits is \(4.5,\)"),
    ("ratios", (0.0, 1.0), r"config.train_sweep.ratios is \(0.0, 1.0\); give step ratios"),
    ("ratios", (), r"config.train_sweep.ratios is \(\)"),
    ("targets", ("weight",), r"config.train_sweep.targets is \('weight',\); choose from weights, activations, both"),
    ("method", "lapq", r"config.train_sweep.method is 'lapq'; choose one of mse, max"),
    ("method", "learned", r"config.train_sweep.method is 'learned'; .*\(and learned in a QAT run\)"),
    ("batches", -1, r"config.train_sweep.batches must be a whole number ≥ 0"),
])
def test_bad_sweep_values_are_one_line(field, value, message):
  config = override(cifar10_resnet20.get_config(), {"train_sweep.bits": (4,), f"train_sweep.{field}": value})
  with pytest.raises(UserError, match=f"^{message}") as e:
    validate_config(config)
  assert "\n" not in str(e.value)


def test_learned_activation_steps_need_lsq_activations():
  c = override(cifar10_resnet20.get_config(), {"quant.method": "lsq", "quant.a_bits": 0, "train_sweep.bits": (4,),
                                               "train_sweep.method": "learned", "train_sweep.targets": ("both",)})
  with pytest.raises(UserError, match=r"^config.train_sweep.targets quantizes activations with method 'learned'"):
    validate_config(c)
  validate_config(override(c, {"quant.a_bits": 4}))  # the control: with learned activation steps it is fine


def test_bad_sweep_value_stops_before_training(folder, tmp_path):
  with pytest.raises(UserError, match="config.train_sweep.bits"):
    train_and_evaluate(tiny_config(folder, **{"train_sweep.bits": (20,)}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
