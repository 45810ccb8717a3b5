"""The model zoo: ResNet-20 (CIFAR), ResNet-18/50 and MobileNet-V2 (torchvision's), all quant-hooked.

`RECOMMENDERS` holds NeuMF (`kure_jax.models.neumf`), called on (user, item) ids instead of images, for
the 'ranking' task; `get_model` builds either kind. Every image model is a Flax linen module with
``num_classes``, ``weight_grid`` and ``dtype``
attributes, called as ``model.apply(variables, x, train=...)`` on NHWC float images;
in training mode pass ``mutable=['batch_stats']`` (and a 'dropout' rng for MobileNet-V2).
Every conv and dense layer is a `QConv` / `QDense`, so a 'quant' collection built with
`quant_collection` quantizes them at apply time without retracing per bit-width.

Names mirror torchvision's state dicts (see `torch_module_path`), so a converter maps a
key by that rule plus the leaf names: conv/linear 'weight' -> 'kernel' (transposed
OIHW -> HWIO, (out, in) -> (in, out)), BN 'weight' -> 'scale', 'bias' -> 'bias',
'running_mean' / 'running_var' -> 'batch_stats' 'mean' / 'var'; 'num_batches_tracked'
has no counterpart.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kure_jax.models.layers import DEFAULT_WEIGHT_GRID, QConv, QDense, quant_collection
from kure_jax.models.mobilenet import MobileNetV2
from kure_jax.models.neumf import NeuMF
from kure_jax.models.resnet import CifarResNet, ResNet, ResNet18, ResNet50

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": CifarResNet,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "mobilenet_v2": MobileNetV2,
}
# Models of (user, item) ids -> one logit, for the 'ranking' task (`kure_jax.tasks`); the table sizes
# num_users / num_items come from the data.
RECOMMENDERS: dict[str, Callable[..., nn.Module]] = {
    "neumf": NeuMF,
}
ALL_MODELS: dict[str, Callable[..., nn.Module]] = {**MODELS, **RECOMMENDERS}


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """The model registered as `name`, e.g. ``get_model('resnet18', 1000, dtype=jnp.bfloat16)``."""
  if name not in ALL_MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ALL_MODELS)}.")
  return ALL_MODELS[name](num_classes=num_classes, **kwargs)


def param_count(params: Any) -> int:
  """Number of scalars in a pytree of arrays (or of `jax.ShapeDtypeStruct`s from eval_shape)."""
  return sum(math.prod(getattr(x, "shape", jnp.shape(x))) for x in jax.tree_util.tree_leaves(params))


def init_variables(model: nn.Module, rng: jax.Array | int, image_shape: Sequence[int]) -> dict[str, Any]:
  """{'params', 'batch_stats'} of `model`, initialised by one jitted call on a batch of one image.

  image_shape: (height, width, channels). Jitting the init compiles the network once
  instead of dispatching (and compiling) every initializer and layer op by op. On CPU
  the compile (dominated by the random initializers) runs with XLA's backend
  optimizations off: 4x faster for a function that runs once; the values agree with
  ``model.init`` to float32 rounding (~1e-7 relative), not bit for bit.
  """
  if len(image_shape) != 3:
    raise ValueError(f"init_variables: image_shape must be (height, width, channels), got {tuple(image_shape)}.")
  return init_from_inputs(model, rng, jnp.zeros((1, *image_shape), jnp.float32))


def init_from_inputs(model: nn.Module, rng: jax.Array | int, *inputs: Any) -> dict[str, Any]:
  """{'params', 'batch_stats'} of `model` from example positional inputs (e.g. NeuMF's user and item ids),
  by the jitted init of `init_variables`; 'batch_stats' is {} for a model without any."""
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  variables = jax.jit(functools.partial(model.init, train=False), compiler_options=options)(rng, *inputs)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def kernel_call_order(model: nn.Module, variables: dict, image_shape: Sequence[int]) -> list[tuple[str, str]]:
  """[(kernel path 'a/b/kernel', 'conv' | 'dense')] in the order the forward pass calls the layers.

  Read off the model by intercepting one abstract forward pass (no computation), so "the
  first and the last conv" mean what they do in the network, whatever the module names.
  """
  calls: list[tuple[str, str]] = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, (QConv, QDense)):
      path = "/".join(context.module.scope.path) + "/kernel"
      if path not in [p for p, _ in calls]:
        calls.append((path, "conv" if isinstance(context.module, QConv) else "dense"))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, jnp.zeros((1, *image_shape)))
  return calls


def inner_convs(model: nn.Module, variables: dict, image_shape: Sequence[int]) -> list[str]:
  """Kernel paths of every conv but the first and the last called (dense layers excluded): the layers the
  KURE authors' code quantizes (``Conv2d`` modules ``[1:-1]``)."""
  convs = [p for p, kind in kernel_call_order(model, variables, image_shape) if kind == "conv"]
  return convs[1:-1]


_INDEXED = re.compile(r"(^|\.)([A-Za-z_]\w*)\.(\d+)(?=\.|$)")


def torch_module_path(name: str) -> str:
  """The Flax module path of a torchvision module name (a state-dict key minus its leaf).

  Rule: a '.' joining a name to an index becomes '_', every other '.' becomes '/':
  'layer2.0.downsample.0' -> 'layer2_0/downsample_0', 'features.2.conv.1.0' ->
  'features_2/conv_1/0', 'classifier.1' -> 'classifier_1', 'conv1' -> 'conv1'.
  """
  return _INDEXED.sub(r"\1\2_\3", name).replace(".", "/")


WEIGHT_GRIDS = ("signed", "narrow", "midrise", "unsigned")  # a model's weight grids (core.quant.GRIDS but eval's sliding)
QAT_WEIGHT_GRIDS = {"dorefa": "midrise"}  # QAT methods whose weights sit on one grid (DoReFa's 2^M levels)


def model_kwargs(config: Any) -> dict[str, Any]:
  """The model's keyword arguments of a config: ``config.model_kwargs``, with the weight grid its QAT method fixes
  (DoReFa: midrise) and, for DoReFa in the authors' form (``quant.dorefa_form='relus'``), DoReFa's ReLUs."""
  kw = {k: v for k, v in dict(config.get("model_kwargs", {})).items() if v is not None}  # unset: the model's default
  q = config.get("quant")
  if q is not None and q.method in QAT_WEIGHT_GRIDS:
    kw["weight_grid"] = QAT_WEIGHT_GRIDS[q.method]
  if q is not None and q.method == "dorefa" and q.get("dorefa_form", "inputs") == "relus":
    kw["dorefa_relus"] = True  # every ReLU DoReFa's clamp + quantizer (kure_jax.models.resnet.relu)
  return kw


def weight_grid(kwargs: Any) -> str:
  """The weight grid a model built with `kwargs` quantizes on."""
  return kwargs.get("weight_grid", DEFAULT_WEIGHT_GRID)


__all__ = [
    "DEFAULT_WEIGHT_GRID",
    "QAT_WEIGHT_GRIDS",
    "WEIGHT_GRIDS",
    "ALL_MODELS",
    "MODELS",
    "NeuMF",
    "RECOMMENDERS",
    "CifarResNet",
    "MobileNetV2",
    "QConv",
    "QDense",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "get_model",
    "init_from_inputs",
    "init_variables",
    "inner_convs",
    "kernel_call_order",
    "model_kwargs",
    "param_count",
    "quant_collection",
    "weight_grid",
    "torch_module_path",
]
