"""The model zoo: shapes, parameter counts, kernel selection, the quant hook, torchvision layout.

Small inputs (32x32, batch 2) and `jax.eval_shape` for the 224x224 and 1000-class
checks keep the file fast on a CPU; each model is initialised and compiled once.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kure_jax import select_kernels
from kure_jax.core import quant as Q
from kure_jax.models import (MODELS, QConv, QDense, get_model, init_variables, param_count, quant_collection,
                             torch_module_path)

NAMES = ("resnet20", "resnet18", "resnet50", "mobilenet_v2")
# The big models' compiles (~10-30 s each on 2 CPU cores) run with the slow tests; the quick loop keeps the CIFAR
# ResNet-20 and ResNet-18.
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in ("resnet50", "mobilenet_v2") else n for n in NAMES]
NUM_CLASSES = 10
X = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

# torchvision's resnet18 / resnet50 / mobilenet_v2 (1000 classes); ResNet-20 with option A.
PARAM_COUNTS = {"resnet20": 269_722, "resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872}
# Conv and dense kernels, and those KURE regularizes (all but the stem and the classifier).
KERNELS = {"resnet20": 20, "resnet18": 21, "resnet50": 54, "mobilenet_v2": 53}
SELECTED = {"resnet20": 18, "resnet18": 19, "resnet50": 52, "mobilenet_v2": 51}
EXCLUDED = {"resnet20": {"conv1/kernel", "fc/kernel"}, "resnet18": {"conv1/kernel", "fc/kernel"},
            "resnet50": {"conv1/kernel", "fc/kernel"},
            "mobilenet_v2": {"features_0/0/kernel", "classifier_1/kernel"}}
# len(named_parameters()) and the number of BN layers of the torchvision models.
TORCH_PARAMS = {"resnet18": 62, "resnet50": 161, "mobilenet_v2": 158}
TORCH_BN = {"resnet18": 20, "resnet50": 53, "mobilenet_v2": 52}


@functools.lru_cache(maxsize=None)
def abstract_variables(name: str, num_classes: int = 1000, size: int = 224, **kwargs):
  """Shapes of the variables, without computing anything."""
  model = get_model(name, num_classes, **kwargs)
  return model, jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


@functools.lru_cache(maxsize=None)
def train_run(name: str):
  """One jitted training-mode pass (BN on batch statistics keeps activations well scaled)
  with weight_grid='narrow'. Returns the model, the initial variables, the jitted pass
  (variables, x, dropout key), its logits, its new batch_stats and intermediates (every
  module's output, every hooked layer's sown input), and each hooked layer's grids."""
  model = get_model(name, NUM_CLASSES, weight_grid="narrow")
  variables = init_variables(model, jax.random.key(0), (32, 32, 3))
  grids = {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, (QConv, QDense)) and context.method_name == "__call__":
      grids["/".join(m.scope.path)] = (m.act_grid, m.weight_grid)
    return next_fun(*args, **kwargs)

  @jax.jit
  def run(variables, x, key):
    with nn.intercept_methods(record):
      return model.apply(variables, x, train=True, capture_intermediates=True,
                         mutable=["batch_stats", "intermediates"], rngs={"dropout": key})

  logits, state = run(variables, X, jax.random.key(2))
  return model, variables, run, logits, state["batch_stats"], state["intermediates"], grids


def node(tree, path: str):
  for p in path.split("/"):
    tree = tree[p]
  return tree


# ----------------------------------------------------------------------------------
# Registry and counts.


def test_registry():
  assert set(MODELS) == set(NAMES)
  with pytest.raises(ValueError, match=r"unknown model 'vgg16'; choose one of resnet20, resnet18"):
    get_model("vgg16", 10)
  m = get_model("resnet18", 7, weight_grid="midrise", dtype=jnp.bfloat16)
  assert (m.num_classes, m.weight_grid, m.dtype) == (7, "midrise", jnp.bfloat16)


@pytest.mark.parametrize("name", NAMES)
def test_param_counts(name):
  _, v = abstract_variables(name, 10 if name == "resnet20" else 1000, 32 if name == "resnet20" else 224)
  assert param_count(v["params"]) == PARAM_COUNTS[name]
  if name in TORCH_PARAMS:  # same tensors as torchvision: weights + BN scale/bias + fc; 2 stats per BN
    assert len(jax.tree_util.tree_leaves(v["params"])) == TORCH_PARAMS[name]
    assert len(jax.tree_util.tree_leaves(v["batch_stats"])) == 2 * TORCH_BN[name]


def test_resnet20_parameters_in_detail():
  _, v = abstract_variables("resnet20", 10, 32)
  p = v["params"]
  convs = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(p) if x.ndim == 4)
  assert convs == 267_696 and param_count(p["fc"]) == 650
  assert "downsample_0" not in p["layer2_0"]  # option A: parameter-free shortcut
  _, vb = abstract_variables("resnet20", 10, 32, shortcut="projection")  # option B: + 1x1 conv + BN
  assert param_count(vb["params"]) == 269_722 + (16 * 32 + 64) + (32 * 64 + 128)
  assert vb["params"]["layer3_0"]["downsample_0"]["kernel"].shape == (1, 1, 32, 64)
  _, v56 = abstract_variables("resnet20", 10, 32, depth=56)
  assert sum(k.startswith("layer3_") for k in v56["params"]) == 9
  with pytest.raises(ValueError, match="6n"):
    abstract_variables("resnet20", 10, 32, depth=21)


@pytest.mark.parametrize("name", NAMES)
def test_select_kernels_skips_exactly_stem_and_classifier(name):
  _, v = abstract_variables(name, NUM_CLASSES, 32)
  params = v["params"]
  kernels = {"/".join(str(k.key) for k in path) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
             if path[-1].key == "kernel"}
  selected = select_kernels(params)
  assert len(kernels) == KERNELS[name]
  assert len(selected) == SELECTED[name]
  assert kernels - set(selected) == EXCLUDED[name]
  # the whole variables dict works as well (paths gain a 'params/' prefix)
  assert len(select_kernels(dict(v))) == SELECTED[name]


# ----------------------------------------------------------------------------------
# Forward passes.


@pytest.mark.parametrize("name", PARAMS)
def test_eval_forward(name):
  model, variables = train_run(name)[:2]
  assert set(variables) == {"params", "batch_stats"}
  logits = jax.jit(model.apply)(variables, X)
  assert logits.shape == (2, NUM_CLASSES) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # depends on the input (relative: MobileNet-V2's torchvision init shrinks signals before
  # BN statistics are learned, so its initial eval-mode logits are ~1e-10)
  assert np.max(np.abs(logits[0] - logits[1])) > 1e-3 * np.max(np.abs(logits))


@pytest.mark.parametrize("name", PARAMS)
def test_train_forward_updates_batch_stats(name):
  _, variables, run, logits, new_stats, inter, _ = train_run(name)
  assert logits.shape == (2, NUM_CLASSES) and np.all(np.isfinite(logits))
  old_stats = variables["batch_stats"]
  assert jax.tree_util.tree_structure(old_stats) == jax.tree_util.tree_structure(new_stats)
  for a, b in zip(jax.tree_util.tree_leaves(old_stats), jax.tree_util.tree_leaves(new_stats)):
    assert a.shape == b.shape and np.all(np.isfinite(b)) and not np.array_equal(a, b)
  # the first BN's running mean moves 10% of the way to the batch mean (torch momentum 0.1)
  conv, bn = ("features_0/0", "features_0/1") if name == "mobilenet_v2" else ("conv1", "bn1")
  batch_mean = np.asarray(node(inter, conv)["__call__"][0]).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(node(new_stats, bn)["mean"], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
  if name == "mobilenet_v2":  # dropout is active in training and keyed by the 'dropout' rng
    again = run(variables, X, jax.random.key(2))[0]
    other = run(variables, X, jax.random.key(3))[0]
    np.testing.assert_array_equal(logits, again)
    assert not np.allclose(logits, other)


@pytest.mark.parametrize("name", NAMES)
def test_activation_and_weight_grids(name):
  """'unsigned' layers only ever see inputs ≥ 0; 'signed' ones see negative inputs; the
  model's weight_grid reaches every hooked layer."""
  inter, grids = train_run(name)[-2:]
  assert len(grids) == KERNELS[name]
  signed = set()
  for path, (act_grid, weight_grid) in grids.items():
    assert weight_grid == "narrow", path
    lo = float(np.min(node(inter, path)["input"][0]))
    if act_grid == "unsigned":
      assert lo >= 0, path
    else:
      assert act_grid == "signed" and lo < 0, path
      signed.add(path)
  if name == "mobilenet_v2":  # stem, each expansion conv (it reads a linear bottleneck), features_18
    want = {"features_0/0"} | {f"features_{i}/conv_0/0" for i in range(2, 18)} | {"features_18/0"}
  else:
    want = {"conv1"}
  assert signed == want


def test_compute_dtype():
  model, v = abstract_variables("resnet20", NUM_CLASSES, 32, dtype=jnp.bfloat16)
  logits, state = jax.eval_shape(
      lambda v: model.apply(v, X, capture_intermediates=True, mutable=["intermediates"]), v)
  assert v["params"]["conv1"]["kernel"].dtype == jnp.float32  # parameters stay float32
  assert state["intermediates"]["layer2_0"]["conv1"]["__call__"][0].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32  # logits promoted for the loss


# ----------------------------------------------------------------------------------
# The quantization hook (ResNet-20).


@functools.lru_cache(maxsize=None)
def resnet20_quant_setup():
  variables = train_run("resnet20")[1]
  model = get_model("resnet20", NUM_CLASSES)
  kernels = select_kernels(variables["params"])
  bits = jnp.array([0, 2, 4, 8])
  # MSE-optimal steps for each bit-width (bits 0 keeps float and ignores its step)
  steps = {p: jax.vmap(lambda b: Q.mse_step(k, b))(jnp.maximum(bits, 2)) for p, k in kernels.items()}

  @jax.jit
  def logits(quant):
    return model.apply({**variables, "quant": quant}, X)

  def collection(i=None, w_bits=None):
    return quant_collection(variables["params"], {
        p: {"w_bits": bits if i is None else jnp.array(bits[i] if w_bits is None else w_bits),
            "w_step": s if i is None else s[i]}
        for p, s in steps.items()})

  return model, variables, kernels, bits, logits, collection


@pytest.mark.slow
def test_quant_hook_changes_logits():
  _, _, kernels, _, logits, collection = resnet20_quant_setup()
  ref = logits({})
  q = collection(2)  # 4 bits, mse_step(kernel, 4)
  assert set(q) == {p.split("/")[0] for p in kernels}
  np.testing.assert_allclose(q["layer1_0"]["conv1"]["w_step"], Q.mse_step(kernels["layer1_0/conv1/kernel"], 4))
  assert int(q["layer1_0"]["conv1"]["w_bits"]) == 4
  out = logits(q)
  assert np.all(np.isfinite(out))
  assert np.max(np.abs(out - ref)) > 1e-3
  # bits 0 everywhere is exactly float (compared op by op: two compiled programs may fuse,
  # hence round, differently)
  model, variables = resnet20_quant_setup()[:2]
  zero = model.apply({**variables, "quant": collection(2, w_bits=0)}, X)
  np.testing.assert_array_equal(zero, model.apply(variables, X))
  np.testing.assert_allclose(zero, ref, rtol=1e-5, atol=1e-5)


def test_quant_hook_vmap_over_bits():
  _, _, _, bits, logits, collection = resnet20_quant_setup()
  ref = logits({})
  swept = jax.jit(jax.vmap(logits))(collection())  # one compiled call for all bit-widths
  assert swept.shape == (4, 2, NUM_CLASSES)
  for i in range(len(bits)):
    np.testing.assert_allclose(swept[i], logits(collection(i)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(swept[0], ref, rtol=1e-5, atol=1e-5)  # bits 0: float
  err = {int(b): float(np.linalg.norm(swept[i] - ref)) for i, b in enumerate(bits)}
  assert err[8] < err[4] < err[2], err
  assert err[8] < 0.1 * err[2], err


# ----------------------------------------------------------------------------------
# torchvision layout: kernel shapes, state-dict names, spatial sizes, padding semantics.

# (state-dict key, torch shape) samples from torchvision's models (1000 classes).
TORCH_KEYS = {
    "resnet18": [
        ("conv1.weight", (64, 3, 7, 7)), ("bn1.running_mean", (64,)), ("bn1.weight", (64,)),
        ("layer1.0.conv1.weight", (64, 64, 3, 3)), ("layer1.1.bn2.bias", (64,)),
        ("layer2.0.conv1.weight", (128, 64, 3, 3)), ("layer2.0.downsample.0.weight", (128, 64, 1, 1)),
        ("layer2.0.downsample.1.running_var", (128,)), ("layer4.1.conv2.weight", (512, 512, 3, 3)),
        ("fc.weight", (1000, 512)), ("fc.bias", (1000,)),
    ],
    "resnet50": [
        ("conv1.weight", (64, 3, 7, 7)), ("layer1.0.conv1.weight", (64, 64, 1, 1)),
        ("layer1.0.conv3.weight", (256, 64, 1, 1)), ("layer1.0.downsample.0.weight", (256, 64, 1, 1)),
        ("layer2.0.conv1.weight", (128, 256, 1, 1)), ("layer2.0.conv2.weight", (128, 128, 3, 3)),
        ("layer3.5.bn3.weight", (1024,)), ("layer4.2.conv3.weight", (2048, 512, 1, 1)),
        ("fc.weight", (1000, 2048)),
    ],
    "mobilenet_v2": [
        ("features.0.0.weight", (32, 3, 3, 3)), ("features.0.1.running_mean", (32,)),
        ("features.1.conv.0.0.weight", (32, 1, 3, 3)), ("features.1.conv.0.1.weight", (32,)),
        ("features.1.conv.1.weight", (16, 32, 1, 1)), ("features.1.conv.2.running_var", (16,)),
        ("features.2.conv.0.0.weight", (96, 16, 1, 1)), ("features.2.conv.1.0.weight", (96, 1, 3, 3)),
        ("features.2.conv.2.weight", (24, 96, 1, 1)), ("features.2.conv.3.bias", (24,)),
        ("features.17.conv.2.weight", (320, 960, 1, 1)), ("features.18.0.weight", (1280, 320, 1, 1)),
        ("features.18.1.bias", (1280,)), ("classifier.1.weight", (1000, 1280)), ("classifier.1.bias", (1000,)),
    ],
}


def flax_leaf(variables, key: str):
  """The Flax leaf a torchvision state-dict key maps to (the rule documented in kure_jax.models)."""
  module, leaf = key.rsplit(".", 1)
  path = torch_module_path(module)
  if leaf in ("running_mean", "running_var"):
    return node(variables["batch_stats"], path)[leaf[len("running_"):]]
  mod = node(variables["params"], path)
  return mod["bias" if leaf == "bias" else "kernel" if "kernel" in mod else "scale"]


def test_torch_module_path():
  assert torch_module_path("layer2.0.downsample.0") == "layer2_0/downsample_0"
  assert torch_module_path("features.2.conv.1.0") == "features_2/conv_1/0"
  assert torch_module_path("features.18.1") == "features_18/1"
  assert torch_module_path("classifier.1") == "classifier_1"
  assert torch_module_path("conv1") == "conv1"


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_names_and_shapes(name):
  _, v = abstract_variables(name)
  for key, torch_shape in TORCH_KEYS[name]:
    want = {4: lambda s: (s[2], s[3], s[1], s[0]), 2: lambda s: (s[1], s[0]), 1: lambda s: s}[len(torch_shape)]
    assert flax_leaf(v, key).shape == want(torch_shape), key
  # the rule is a bijection on our module names: back to torch names and forth again
  for col in ("params", "batch_stats"):
    for path, _ in jax.tree_util.tree_flatten_with_path(v[col])[0]:
      module = "/".join(str(k.key) for k in path[:-1])
      torch_name = re.sub(r"_(\d+)(?=/|$)", r".\1", module).replace("/", ".")
      assert torch_module_path(torch_name) == module


SPATIAL_224 = {  # output (H, W, C) of modules at 224x224, as torchvision's
    "resnet18": {"conv1": (112, 112, 64), "layer1_0": (56, 56, 64), "layer2_0": (28, 28, 128),
                 "layer3_1": (14, 14, 256), "layer4_1": (7, 7, 512)},
    "resnet50": {"conv1": (112, 112, 64), "layer1_2": (56, 56, 256), "layer2_0/conv1": (56, 56, 128),
                 "layer2_0/conv2": (28, 28, 128), "layer4_2": (7, 7, 2048)},
    "mobilenet_v2": {"features_0": (112, 112, 32), "features_1": (112, 112, 16), "features_3": (56, 56, 24),
                     "features_6": (28, 28, 32), "features_13": (14, 14, 96), "features_17": (7, 7, 320),
                     "features_18": (7, 7, 1280)},
}


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_spatial_sizes_at_224(name):
  model, v = abstract_variables(name)
  logits, state = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros((1, 224, 224, 3)), capture_intermediates=True,
                            mutable=["intermediates"]), v)
  assert logits.shape == (1, 1000)
  for path, hwc in SPATIAL_224[name].items():
    assert node(state["intermediates"], path)["__call__"][0].shape == (1, *hwc), path


def torch_conv2d(x, kernel, stride: int, pad: int, groups: int = 1) -> np.ndarray:
  """torch.nn.functional.conv2d in NumPy: NCHW input, OIHW weight, symmetric zero padding."""
  x = np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))
  w = np.transpose(np.asarray(kernel, np.float64), (3, 2, 0, 1))  # HWIO -> OIHW, as a converter does
  n, c, h, wd = x.shape
  o, cg, kh, kw = w.shape
  ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  og = o // groups
  out = np.zeros((n, o, ho, wo))
  for g in range(groups):
    for i in range(kh):
      for j in range(kw):
        patch = x[:, g * cg:(g + 1) * cg, i:i + stride * ho:stride, j:j + stride * wo:stride]
        out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
  return np.transpose(out, (0, 2, 3, 1))


def torch_max_pool(x, k: int = 3, stride: int = 2, pad: int = 1) -> np.ndarray:
  """torch.nn.MaxPool2d in NumPy (NHWC): padding counts as -inf."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
  ho, wo = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
  return np.max([x[:, i:i + stride * ho:stride, j:j + stride * wo:stride] for i in range(k) for j in range(k)],
                axis=0)


@pytest.mark.parametrize("name,layers", [
    ("resnet18", {"conv1": (2, 3, 1), "layer2_0/conv1": (2, 1, 1), "layer2_0/downsample_0": (2, 0, 1),
                  "layer4_0/conv1": (2, 1, 1)}),
    ("resnet50", {"layer2_0/conv2": (2, 1, 1), "layer2_0/conv1": (1, 0, 1)}),
    ("mobilenet_v2", {"features_0/0": (2, 1, 1), "features_2/conv_1/0": (2, 1, 96),
                      "features_14/conv_1/0": (2, 1, 576), "features_18/0": (1, 0, 1)}),
])
def test_convs_match_torch_semantics(name, layers):
  """On even sizes (32x32), stride-2 convs match torch's symmetric padding ('SAME' would not)."""
  _, variables, _, _, _, inter, _ = train_run(name)
  for path, (stride, pad, groups) in layers.items():
    mod = node(inter, path)
    want = torch_conv2d(mod["input"][0], node(variables["params"], path)["kernel"], stride, pad, groups)
    np.testing.assert_allclose(mod["__call__"][0], want, rtol=1e-4, atol=1e-4, err_msg=path)
  if name != "mobilenet_v2":  # the stem's max pool: 3x3, stride 2, padding 1 with -inf
    stem = np.maximum(np.asarray(inter["bn1"]["__call__"][0]), 0)
    np.testing.assert_allclose(inter["layer1_0"]["conv1"]["input"][0], torch_max_pool(stem), rtol=1e-6)
