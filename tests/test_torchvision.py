"""torchvision weights and ImageNet-scale runs: converter layouts and parity, init_from, messages, smoke test.

The parity tests build randomly initialized torchvision models (their BatchNorm running
statistics randomized too, so a converter that dropped or swapped them would fail),
convert a saved `.pth` and compare eval-mode logits. They need torch and torchvision
(the `torchvision` extra) and skip with that reason otherwise; nothing here downloads.
"""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import resnet18 as resnet18_config
from kure_jax import models
from kure_jax.checkpoint import load_variables
from kure_jax.errors import UserError
from kure_jax.metrics import read_metrics
from kure_jax.models import torchvision_weights
from kure_jax.training.train import train_and_evaluate
from tests.helpers import REPO, override

try:
  import torch
  import torchvision
  TORCH_SKIP = None
except Exception as e:  # noqa: BLE001 - ImportError, or torchvision built for another torch
  torch = torchvision = None
  TORCH_SKIP = (f"torch/torchvision not importable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                "install the extra: pip install -e \".[torchvision]\"")

needs_torch = pytest.mark.skipif(TORCH_SKIP is not None, reason=TORCH_SKIP or "")

ARCHS = ("resnet18", "resnet50", "mobilenet_v2")
TOLERANCE = 1e-4  # max |logits_torch − logits_jax|


# ----------------------------------------------------------------------------------
# The conversion rule, on plain arrays (no torch needed).


def test_convert_state_dict_layouts_and_names():
  rng = np.random.default_rng(0)
  conv = rng.normal(size=(8, 3, 7, 5)).astype(np.float32)    # OIHW
  dw = rng.normal(size=(6, 1, 3, 3)).astype(np.float32)      # depthwise (C, 1, kh, kw)
  fc = rng.normal(size=(10, 4)).astype(np.float32)           # (out, in)
  sd = {"conv1.weight": conv, "features.2.conv.1.0.weight": dw, "fc.weight": fc, "fc.bias": np.arange(10.0),
        "layer2.0.downsample.1.weight": np.full(4, 2.0), "layer2.0.downsample.1.bias": np.full(4, 3.0),
        "layer2.0.downsample.1.running_mean": np.full(4, 4.0), "layer2.0.downsample.1.running_var": np.full(4, 5.0),
        "layer2.0.downsample.1.num_batches_tracked": np.array(7)}
  v = torchvision_weights.convert_state_dict(sd)
  p, s = v["params"], v["batch_stats"]
  assert p["conv1"]["kernel"].shape == (7, 5, 3, 8)
  np.testing.assert_array_equal(p["conv1"]["kernel"][6, 4, 2, 1], conv[1, 2, 6, 4])  # [h, w, i, o] = [o, i, h, w]
  assert p["features_2"]["conv_1"]["0"]["kernel"].shape == (3, 3, 1, 6)
  np.testing.assert_array_equal(p["features_2"]["conv_1"]["0"]["kernel"][:, :, 0, 5], dw[5, 0])
  np.testing.assert_array_equal(p["fc"]["kernel"], fc.T)
  np.testing.assert_array_equal(p["fc"]["bias"], np.arange(10.0))
  bn = p["layer2_0"]["downsample_1"]
  assert (bn["scale"][0], bn["bias"][0]) == (2.0, 3.0)
  st = s["layer2_0"]["downsample_1"]
  assert set(st) == {"mean", "var"} and (st["mean"][0], st["var"][0]) == (4.0, 5.0)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(v))
  with pytest.raises(UserError, match="no Flax counterpart for 'alpha'"):
    torchvision_weights.convert_state_dict({"prelu.alpha": np.ones(3)})


@pytest.mark.parametrize("name", ARCHS)
def test_converted_names_cover_the_model_exactly(name):
  """A state dict built from the kure-jax model's own shapes, mapped back to torch names, converts to exactly the
  model's tree; a missing or misshapen tensor is one readable error naming it."""
  shapes = jax.eval_shape(lambda: models.get_model(name, 1000).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  sd = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
      parts = [k.key for k in path]
      module = ".".join(p.replace("_", ".") if p.rsplit("_", 1)[-1].isdigit() else p for p in parts[:-1])
      leaf_name = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                   "var": "running_var"}[parts[-1]]
      shape = leaf.shape
      if len(shape) == 4:
        shape = (shape[3], shape[2], shape[0], shape[1])
      elif len(shape) == 2:
        shape = shape[::-1]
      sd[f"{module}.{leaf_name}"] = np.zeros(shape, np.float32)
  assert torchvision_weights.infer_architecture(sd) == name
  assert torchvision_weights.num_classes_of(sd) == 1000
  v = torchvision_weights.convert_state_dict(sd)
  torchvision_weights.check_variables(v, name, 1000, "test")
  assert jax.tree.structure(v["params"]) == jax.tree.structure(shapes["params"])
  key = next(k for k in sd if k.endswith("running_var"))
  with pytest.raises(UserError, match=r"does not fit .*batch_stats .*/var is absent in the converted weights"):
    torchvision_weights.check_variables(torchvision_weights.convert_state_dict(
        {k: x for k, x in sd.items() if k != key}), name, 1000, "test")


# ----------------------------------------------------------------------------------
# Parity with torchvision (torch needed).


def randomized_torchvision(name: str, seed: int = 0, num_classes: int = 1000):
  """A torchvision model in eval mode with random weights, BN affine, classifier bias and BN running statistics.

  The running statistics are those of a forward pass on random images (so activations keep
  a sane scale), then perturbed per channel: mean shifted by 0.2 std, variance × U(0.5, 2).
  """
  torch.manual_seed(seed)
  m = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
  bns = [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in bns:
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.2)
      bn.momentum = None  # cumulative average: one batch sets the statistics
      bn.reset_running_stats()
    for x in m.modules():
      if isinstance(x, torch.nn.Linear):
        x.bias.normal_(0.0, 0.1)
    m.train()
    m(torch.randn(8, 3, 96, 96))
    for bn in bns:
      bn.running_mean += 0.2 * torch.randn_like(bn.running_mean) * bn.running_var.sqrt()
      bn.running_var *= torch.empty_like(bn.running_var).uniform_(0.5, 2.0)
  return m.eval()


@pytest.mark.slow
@needs_torch
@pytest.mark.parametrize("name", ARCHS)
def test_parity_with_torchvision(name, tmp_path):
  m = randomized_torchvision(name)
  path = tmp_path / f"{name}.pth"
  torch.save(m.state_dict(), path)
  variables, meta = torchvision_weights.load_torchvision(str(path))
  assert (meta["model"], meta["num_classes"]) == (name, 1000)
  model = models.get_model(name, 1000)
  apply = jax.jit(lambda v, img: model.apply(v, img, train=False))
  rng = np.random.default_rng(1)
  for shape in ((2, 3, 224, 224), (2, 3, 97, 130)):  # odd and non-square: padding and strides as torch's
    x = rng.normal(size=shape).astype(np.float32)
    with torch.no_grad():
      want = m(torch.from_numpy(x)).numpy()
    got = np.asarray(apply(variables, x.transpose(0, 2, 3, 1)))
    diff = float(np.max(np.abs(got - want)))
    print(f"{name} {shape[2]}x{shape[3]}: max |Δlogits| = {diff:.2e}, logits std {want.std():.3f}")
    assert diff <= TOLERANCE
  # the comparison is not vacuous: logits vary, and default BN statistics would be caught
  assert want.std() > 0.1 and np.max(np.abs(want[0] - want[1])) > 0.1
  plain = {**variables, "batch_stats": models.init_variables(model, 0, (64, 64, 3))["batch_stats"]}  # 0 / 1
  assert float(np.max(np.abs(np.asarray(apply(plain, x.transpose(0, 2, 3, 1))) - want))) > 100 * TOLERANCE


@needs_torch
def test_wrong_file_for_the_config_is_one_readable_error(tmp_path):
  path = tmp_path / "r18.pth"
  torch.save(randomized_torchvision("resnet18", num_classes=10).state_dict(), path)
  with pytest.raises(UserError, match=r"holds resnet18 weights, but config.model='resnet50'.*resnet50-0676ba61"):
    torchvision_weights.load_torchvision(str(path), "resnet50", 10)
  with pytest.raises(UserError, match=r"has a 10-class classifier, but config.dataset.num_classes=1000"):
    torchvision_weights.load_torchvision(str(path), "resnet18", 1000)
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a zip")
  with pytest.raises(UserError, match="cannot be read as a torch state dict"):
    torchvision_weights.load_torchvision(str(junk))
  torch.save({"a.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
  with pytest.raises(UserError, match="not a state dict of torchvision's resnet18, resnet50, mobilenet_v2"):
    torchvision_weights.load_torchvision(str(tmp_path / "other.pth"))


@needs_torch
def test_converter_cli_writes_a_checkpoint_init_from_reads(tmp_path, capsys):
  path = tmp_path / "mnv2.pth"
  torch.save(randomized_torchvision("mobilenet_v2").state_dict(), path)
  out = tmp_path / "converted"
  assert torchvision_weights.main([str(path), str(out)]) == 0
  assert f"--config.init_from={out}" in capsys.readouterr().out
  saved, meta = load_variables(str(out))
  direct, _ = torchvision_weights.load_torchvision(str(path))
  assert meta["model"] == "mobilenet_v2" and meta["num_classes"] == 1000
  for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(a, b)
  assert torchvision_weights.main([str(path), str(out)]) == 2  # not over an existing checkpoint
  assert capsys.readouterr().err.strip() == f"error: {out} already holds checkpoints; pick an empty output folder."
  assert torchvision_weights.main([str(path), str(tmp_path / "o2"), "--model", "resnet18"]) == 2
  assert "holds mobilenet_v2 weights, but --model='resnet18'" in capsys.readouterr().err
  assert torchvision_weights.main([str(tmp_path / "resnet50-0676ba61.pth"), str(tmp_path / "o3")]) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: no torchvision weights at {tmp_path}/resnet50-0676ba61.pth; download "
      f"https://download.pytorch.org/models/resnet50-0676ba61.pth to {tmp_path}/resnet50-0676ba61.pth (or run "
      "`python -c \"import torchvision; torchvision.models.resnet50(weights='IMAGENET1K_V1')\"`, which saves it as "
      "~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth).")


# ----------------------------------------------------------------------------------
# Missing ImageNet / weights: one line saying how to get both.


def test_missing_imagenet_and_weights_is_one_line_saying_how(tmp_path):
  c = resnet18_config.get_config()
  c.dataset.data_dir = str(tmp_path)
  c.init_from = f"torchvision:{tmp_path}/resnet18-f37072fd.pth"
  with pytest.raises(UserError) as err:
    train_and_evaluate(c, str(tmp_path / "w"))
  msg = str(err.value)
  assert "\n" not in msg
  for part in ("ILSVRC2012_img_train.tar", "tfds build imagenet2012", "--manual_dir", "dataset.name='folder'",
               "https://download.pytorch.org/models/resnet18-f37072fd.pth",
               "torchvision.models.resnet18(weights='IMAGENET1K_V1')", "scripts/convert_torchvision.py"):
    assert part in msg, part
  assert not (tmp_path / "w").exists()
  # the default config points at torchvision's own download location
  assert resnet18_config.get_config().init_from == "torchvision:~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth"


def test_weights_present_without_torch_and_resume(tmp_path, monkeypatch):
  from kure_jax.training.train import _init_weights_missing

  c = resnet18_config.get_config()
  pth = tmp_path / "resnet18-f37072fd.pth"
  pth.write_bytes(b"")
  c.init_from = f"torchvision:{pth}"
  monkeypatch.setattr(torchvision_weights, "_torch_available", lambda: False)
  msg = _init_weights_missing(c, str(tmp_path / "w"))
  assert "reading a .pth file needs torch (pip install -e \".[torchvision]\")" in msg
  assert f"scripts/convert_torchvision.py {pth} OUT_DIR" in msg
  c.init_from = f"torchvision:{tmp_path}/absent.pth"
  (tmp_path / "w" / "checkpoints" / "5").mkdir(parents=True)
  assert _init_weights_missing(c, str(tmp_path / "w")) is None  # a resume ignores init_from


def test_train_cli_without_imagenet_stops_at_once(tmp_path):
  """`python train.py --config configs/resnet18.py`, nothing else, on a machine without ImageNet or weights."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", HOME=str(tmp_path),
             TFDS_DATA_DIR=str(tmp_path / "tensorflow_datasets"))
  env.pop("TORCH_HOME", None)
  workdir = REPO / "runs" / "resnet18"
  existed = workdir.exists()
  start = time.perf_counter()
  r = subprocess.run([sys.executable, "train.py", "--config", "configs/resnet18.py"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300, check=False)
  elapsed = time.perf_counter() - start
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: dataset.name='imagenet2012', split 'train': no data in")
  assert "tfds build imagenet2012" in last and "dataset.name='folder'" in last
  if not (workdir / "checkpoints").exists():  # (a run there to resume would ignore init_from)
    assert "Also: init_from='torchvision:~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth'" in last
    assert "download.pytorch.org/models/resnet18-f37072fd.pth" in last
  assert workdir.exists() == existed
  print(f"train.py without ImageNet: exit 2 after {elapsed:.1f} s")
  assert elapsed < 60  # before any model is built or compiled (2 s here)


# ----------------------------------------------------------------------------------
# ImageNet smoke test on TFDS mock data: two train steps and one evaluation of ResNet-18.


def mock_imagenet_config(**overrides):
  c = resnet18_config.get_config()
  c.dataset.image_size = 64
  c.batch_size, c.eval_batch_size = 8, 8
  c.num_epochs, c.max_steps = 1, 2
  c.log_every_steps, c.progress = 1, False
  c.init_from = ""
  return override(c, overrides)


def run_on_mock_imagenet(config, workdir):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    return train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_resnet18_smoke_on_mock_imagenet(tmp_path):
  workdir = str(tmp_path / "r18")
  result = run_on_mock_imagenet(mock_imagenet_config(), workdir)
  assert result["step"] == 2 and not result["interrupted"]
  assert result["count"] == 16  # the whole mock validation split, once
  rows = read_metrics(workdir, "train")
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) and r["kure"] > 0 and r["learning_rate"] == pytest.approx(1e-3) for r in rows)
  (ev,) = read_metrics(workdir, "eval")
  assert np.isfinite(ev["loss"]) and len(ev["kurtosis"]) == 19  # every kernel but the stem and fc


@pytest.mark.slow
@needs_torch
def test_init_from_torchvision_on_mock_imagenet(tmp_path):
  m = randomized_torchvision("resnet18")
  path = tmp_path / "resnet18.pth"
  torch.save(m.state_dict(), path)
  workdir = str(tmp_path / "ft")
  config = mock_imagenet_config(init_from=f"torchvision:{path}", **{"schedule.learning_rate": 1e-12,
                                                                     "optimizer.weight_decay": 0.0})
  result = run_on_mock_imagenet(config, workdir)
  assert result["step"] == 2
  trained, meta = load_variables(workdir)
  converted, _ = torchvision_weights.load_torchvision(str(path))
  assert meta["model"] == "resnet18"
  for a, b in zip(jax.tree.leaves(converted["params"]), jax.tree.leaves(trained["params"])):
    np.testing.assert_allclose(b, a, atol=1e-6)  # lr 1e-12: the run started from the torchvision weights


# ----------------------------------------------------------------------------------
# The README's cost figures for the ImageNet configs.

# config: (steps per epoch of ImageNet's 1,281,167 training images, epochs, train-step GFLOP per image at 224)
COSTS = {"resnet18": (5004, 90, 9.92), "resnet50": (10009, 90, 23.73), "mobilenet_v2": (5004, 50, 1.94)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_imagenet_config_costs(name):
  import importlib

  from kure_jax.data import make_dataset
  from kure_jax.training.train import TrainState, make_optimizer, make_schedule, make_train_step

  tfds = pytest.importorskip("tensorflow_datasets")
  steps, epochs, gflop = COSTS[name]
  c = importlib.import_module(f"configs.{name}").get_config()
  with tfds.testing.mock_data(num_examples=1_281_167, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = make_dataset(c.dataset, "train", batch_size=c.batch_size, train=True)
  assert (ds.steps_per_epoch, c.num_epochs) == (steps, epochs)
  # XLA's count of one train step (forward, backward, KURE, SGD update), per image
  model = models.get_model(name, 1000)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  schedule = make_schedule(c, steps, steps * epochs)
  tx = make_optimizer(c, schedule)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=v["params"], batch_stats=v["batch_stats"],
                     opt_state=jax.eval_shape(tx.init, v["params"]))
  b = 8
  batch = {"image": jax.ShapeDtypeStruct((b, 224, 224, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32), "mask": jax.ShapeDtypeStruct((b,), bool)}
  flops = jax.jit(make_train_step(model, tx, c, schedule)).lower(state, batch).cost_analysis()["flops"]
  assert flops / b / 1e9 == pytest.approx(gflop, rel=0.02)
