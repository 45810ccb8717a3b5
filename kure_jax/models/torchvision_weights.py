"""torchvision state dicts (resnet18, resnet50, mobilenet_v2 `.pth` files) as kure-jax Flax variables.

The paper fine-tunes torchvision's pretrained ImageNet models with KURE; this module
turns their weights into ``{'params', 'batch_stats'}`` for the kure-jax model of the
same name, so training starts from exactly the network torchvision evaluates:

    variables, meta = load_torchvision("resnet18-f37072fd.pth", model="resnet18")

From a config: ``init_from = "torchvision:PATH"``. From the shell (writes a checkpoint
that ``init_from=OUT`` and eval.py read, on machines without torch):

    python scripts/convert_torchvision.py resnet18-f37072fd.pth runs/resnet18_torchvision

The mapping is one rule for names and one for layouts. A state-dict key
``<module>.<leaf>`` goes to the Flax path ``torch_module_path(<module>)/<leaf'>``
(`kure_jax.models.torch_module_path`); conv weights OIHW -> kernel HWIO, linear weights
(out, in) -> kernel (in, out), BatchNorm weight/bias -> params scale/bias, running_mean /
running_var -> batch_stats mean/var; num_batches_tracked is dropped. The result must
match the model's variables key for key and shape for shape, or a `UserError` names the
first difference. Reading a `.pth` needs torch (the `torchvision` extra:
``pip install -e ".[torchvision]"``); converting arrays does not.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kure_jax import models
from kure_jax.checkpoint import Checkpointer, param_shapes
from kure_jax.core.kurtosis import path_str
from kure_jax.errors import UserError

PREFIX = "torchvision:"  # init_from = "torchvision:PATH"
CONVERTER = "python scripts/convert_torchvision.py"

# torchvision's IMAGENET1K_V1 weights (the ones the paper fine-tuned): weights enum, file name.
PRETRAINED = {
    "resnet18": ("ResNet18_Weights.IMAGENET1K_V1", "resnet18-f37072fd.pth"),
    "resnet50": ("ResNet50_Weights.IMAGENET1K_V1", "resnet50-0676ba61.pth"),
    "mobilenet_v2": ("MobileNet_V2_Weights.IMAGENET1K_V1", "mobilenet_v2-b0353104.pth"),
}
ARCHITECTURES = tuple(PRETRAINED)
DOWNLOAD_URL = "https://download.pytorch.org/models/"
# Where torchvision itself caches a download (torch.hub.get_dir() with default settings).
HUB_CACHE = "~/.cache/torch/hub/checkpoints"


def pretrained_url(model: str) -> str:
  """torchvision's download URL of `model`'s IMAGENET1K_V1 weights."""
  return DOWNLOAD_URL + PRETRAINED[model][1]


def default_path(model: str) -> str:
  """Where ``torchvision.models.<model>(weights=...)`` leaves the file: the configs' default."""
  return f"{HUB_CACHE}/{PRETRAINED[model][1]}"


def how_to_get(model: str | None, path: str, convert_hint: bool = True) -> str:
  """How to obtain the `.pth` file for `model` (guessed from the file name if None), as one clause.

  `convert_hint` adds the converter route (for a config's init_from, not for the converter).
  """
  model = model or next((m for m in ARCHITECTURES if os.path.basename(path).startswith(m + "-")), None)
  if model not in PRETRAINED:
    return (f"save a torchvision state dict of one of {', '.join(ARCHITECTURES)} there "
            f"(torch.save(model.state_dict(), {path!r}))")
  enum, name = PRETRAINED[model]
  how = (f"download {pretrained_url(model)} to {path} (or run `python -c \"import torchvision; "
         f"torchvision.models.{model}(weights='{enum.split('.')[-1]}')\"`, which saves it as {default_path(model)})")
  if convert_hint:
    how += (f", or convert it once on a machine with torch with `{CONVERTER} {name} OUT_DIR` and set "
            "--config.init_from=OUT_DIR")
  return how


def resolve(path: str) -> str:
  """`path` with the 'torchvision:' prefix removed and ~ / $VARS expanded."""
  path = path.removeprefix(PREFIX)
  return os.path.expandvars(os.path.expanduser(path))


def missing(init_from: str, model: str | None) -> str | None:
  """Why ``init_from='torchvision:PATH'`` cannot be loaded here (no file, no torch), or None.

  Cheap (a stat and an import check), so a run can say so before it opens any data.
  """
  if not init_from.startswith(PREFIX):
    return None
  path = resolve(init_from)
  if not os.path.isfile(path):
    return f"init_from={init_from!r}: no torchvision weights at {path}; {how_to_get(model, path)}."
  if not _torch_available():
    return (f"init_from={init_from!r}: reading a .pth file needs torch (pip install -e \".[torchvision]\"), "
            f"or convert it once elsewhere with `{CONVERTER} {path} OUT_DIR` and set --config.init_from=OUT_DIR.")
  return None


def _torch_available() -> bool:
  import importlib.util

  return importlib.util.find_spec("torch") is not None


# ----------------------------------------------------------------------------------
# Arrays: state dict -> variables.


def _numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    x = x.detach().cpu().numpy()
  return np.asarray(x)


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """{'params', 'batch_stats'} (nested dicts of float32 NumPy arrays) from a torchvision state dict.

  Accepts torch tensors or arrays. Raises UserError for a key the rule does not cover.
  """
  out: dict[str, Any] = {"params": {}, "batch_stats": {}}
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked":
      continue
    if not module:
      raise UserError(f"state dict key {key!r} is not '<module>.<parameter>'; is this a torchvision state dict?")
    x = _numpy(value).astype(np.float32)
    if leaf == "weight" and x.ndim == 4:  # conv: OIHW -> HWIO (depthwise: (C, 1, kh, kw) -> (kh, kw, 1, C))
      collection, name, x = "params", "kernel", x.transpose(2, 3, 1, 0)
    elif leaf == "weight" and x.ndim == 2:  # linear: (out, in) -> (in, out)
      collection, name, x = "params", "kernel", x.T
    elif leaf == "weight" and x.ndim == 1:  # BatchNorm affine
      collection, name = "params", "scale"
    elif leaf == "bias":
      collection, name = "params", "bias"
    elif leaf in ("running_mean", "running_var"):
      collection, name = "batch_stats", leaf.removeprefix("running_")
    else:
      raise UserError(f"state dict key {key!r}: no Flax counterpart for {leaf!r} with shape {x.shape}.")
    node = out[collection]
    for part in models.torch_module_path(module).split("/"):
      node = node.setdefault(part, {})
    node[name] = np.ascontiguousarray(x)
  return out


def infer_architecture(state_dict: Mapping[str, Any]) -> str | None:
  """'resnet18', 'resnet50' or 'mobilenet_v2' from the keys, or None when it is none of them."""
  keys = set(state_dict)
  if "features.0.0.weight" in keys and "classifier.1.weight" in keys:
    return "mobilenet_v2"
  if "conv1.weight" in keys and "fc.weight" in keys:
    if "layer1.0.conv3.weight" in keys:
      return "resnet50"
    return "resnet18"
  return None


def num_classes_of(state_dict: Mapping[str, Any]) -> int | None:
  """Rows of the classifier's weight (fc / classifier.1)."""
  for key in ("fc.weight", "classifier.1.weight"):
    if key in state_dict:
      return int(_numpy(state_dict[key]).shape[0])
  return None


@functools.cache
def _abstract(model: str, num_classes: int) -> dict[str, Any]:
  """Shapes of the kure-jax model's variables (no computation)."""
  m = models.get_model(model, num_classes)
  v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  return {"params": v["params"], "batch_stats": v["batch_stats"]}


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_variables(variables: Mapping[str, Any], model: str, num_classes: int, where: str) -> None:
  """Raise UserError unless `variables` has exactly the model's params and batch_stats, shape for shape."""
  expected = _abstract(model, num_classes)
  for collection in ("params", "batch_stats"):
    got, want = _shapes(variables.get(collection, {})), _shapes(expected[collection])
    for k in sorted(set(got) | set(want)):
      if got.get(k) != want.get(k):
        have = "absent" if k not in got else list(got[k])
        need = "absent" if k not in want else list(want[k])
        raise UserError(f"{where} does not fit {model} with {num_classes} classes: {collection} {k} is {have} "
                        f"in the converted weights but {need} in the model.")


# ----------------------------------------------------------------------------------
# Files.


def read_state_dict(path: str, model: str | None = None, from_cli: bool = False) -> dict[str, np.ndarray]:
  """The state dict in a `.pth` file as NumPy arrays (torch.load with weights_only=True).

  Also accepts a training checkpoint holding it under 'state_dict' or 'model', and strips
  DataParallel's 'module.' prefix. `model` only shapes the message for a missing file.
  """
  path = resolve(path)
  if not os.path.isfile(path):
    raise UserError(f"no torchvision weights at {path}; {how_to_get(model, path, convert_hint=not from_cli)}.")
  try:
    import torch
  except ImportError as e:
    raise UserError(f"reading {path} needs torch: pip install -e \".[torchvision]\"" + (
        "." if from_cli else f" (or convert it on a machine with torch: `{CONVERTER} {path} OUT_DIR`, then set "
        "--config.init_from=OUT_DIR).")) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # any failure means the file is not a readable state dict
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f"{path} cannot be read as a torch state dict ({type(e).__name__}: {first}).") from e
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping) or not obj:
    raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors).")
  return {k.removeprefix("module."): _numpy(v) for k, v in obj.items() if hasattr(v, "shape")}


def load_torchvision(path: str, model: str | None = None, num_classes: int | None = None, from_cli: bool = False,
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, meta) from a torchvision `.pth` file, checked against the kure-jax `model`.

  `model` and `num_classes` default to what the file holds; when given and different, a
  UserError says so (naming the config fields, or the converter's options if `from_cli`).
  `meta` is a checkpoint's metadata (model, num_classes, param_shapes).
  """
  where = path if from_cli else f"init_from={PREFIX}{path}"
  model_field, classes_field = ("--model", "--num-classes") if from_cli else ("config.model",
                                                                            "config.dataset.num_classes")
  state_dict = read_state_dict(path, model, from_cli)
  found = infer_architecture(state_dict)
  if found is None:
    raise UserError(f"{where}: not a state dict of torchvision's {', '.join(ARCHITECTURES)} "
                    f"(first keys: {', '.join(list(state_dict)[:3])}).")
  if model is not None and model != found:
    raise UserError(f"{where} holds {found} weights, but {model_field}={model!r}: use a {model} file "
                    f"({pretrained_url(model) if model in PRETRAINED else 'a torchvision state dict'}) "
                    f"or set {model_field}={found}.")
  classes = num_classes_of(state_dict)
  if num_classes is not None and classes != num_classes:
    raise UserError(f"{where} has a {classes}-class classifier, but {classes_field}={num_classes}: "
                    f"fine-tune on a {classes}-class dataset or convert weights with {num_classes} classes.")
  variables = convert_state_dict(state_dict)
  check_variables(variables, found, classes, where)
  meta = {"model": found, "num_classes": classes, "param_shapes": param_shapes(variables["params"]),
          "source": f"{PREFIX}{path}"}
  return variables, meta


def save_checkpoint(variables: Mapping[str, Any], meta: dict[str, Any], workdir: str) -> str:
  """Write `variables` as a kure-jax checkpoint (step 0) under ``workdir/checkpoints``; returns that folder.

  `load_variables(workdir)` reads it, so ``init_from=workdir`` and eval.py work without torch.
  """
  if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"{workdir} already holds checkpoints; pick an empty output folder.")
  ckpt = Checkpointer(workdir, keep=1, async_save=False)
  ckpt.save(0, {"params": variables["params"], "batch_stats": variables["batch_stats"]}, meta)
  ckpt.close()
  return ckpt.directory


# ----------------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None) -> int:
  """Convert a `.pth` file into a kure-jax checkpoint; errors are one line on stderr and exit status 2."""
  import argparse
  import sys

  p = argparse.ArgumentParser(
      prog=CONVERTER.removeprefix("python "),
      description="Convert a torchvision state dict (resnet18, resnet50, mobilenet_v2 .pth) into a kure-jax "
                  "checkpoint that --config.init_from=OUT_DIR and eval.py --checkpoint OUT_DIR read.")
  p.add_argument("weights", help="the .pth file, e.g. resnet18-f37072fd.pth from " + DOWNLOAD_URL)
  p.add_argument("out_dir", help="an empty or new folder; the checkpoint goes to OUT_DIR/checkpoints/0")
  p.add_argument("--model", choices=ARCHITECTURES, help="expected architecture (default: inferred from the keys)")
  p.add_argument("--num-classes", type=int, help="expected classifier size (default: what the file holds)")
  args = p.parse_args(argv)
  try:
    variables, meta = load_torchvision(args.weights, args.model, args.num_classes, from_cli=True)
    directory = save_checkpoint(variables, meta, args.out_dir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = models.param_count(variables["params"])
  print(f"{meta['model']}, {meta['num_classes']} classes, {n:,} parameters from {resolve(args.weights)}\n"
        f"wrote {directory}/0; fine-tune from it with --config.init_from={args.out_dir}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
