"""ResNet-20 (He et al. 2016, option A shortcuts) in PyTorch, the reference the benchmarks compare with.

The same architecture as `kure_jax.models.CifarResNet` (269,722 parameters), with
torchvision-style names (conv1, bn1, layer1.0.conv1, ..., fc), so `load_flax` copies
kure-jax variables into it by `kure_jax.models.torch_module_path`.
"""

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F


class Block(tnn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(cout)
    self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(cout)
    self.pad = cout - cin
    self.stride = stride

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    sc = x
    if self.stride != 1 or self.pad:  # option A: subsample + zero-pad channels
      sc = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
    return F.relu(y + sc)


class ResNet20(tnn.Module):
  def __init__(self, num_classes: int = 10):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(16)
    cin = 16
    for s, (cout, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
      blocks = []
      for i in range(3):
        blocks.append(Block(cin, cout, stride if i == 0 else 1))
        cin = cout
      setattr(self, f"layer{s + 1}", tnn.Sequential(*blocks))
    self.fc = tnn.Linear(64, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.fc(x.mean((2, 3)))


def load_flax(model: tnn.Module, variables: dict) -> tnn.Module:
  """Copy kure-jax ResNet-20 variables (params + batch_stats) into `model`, every tensor checked."""
  from kure_jax.models import torch_module_path

  leaf = {"weight": ("params", ("kernel", "scale")), "bias": ("params", ("bias",)),
          "running_mean": ("batch_stats", ("mean",)), "running_var": ("batch_stats", ("var",))}
  state = model.state_dict()
  for key in state:
    if key.endswith("num_batches_tracked"):
      continue
    module, name = key.rsplit(".", 1)
    collection, candidates = leaf[name]
    node = variables[collection]
    for part in torch_module_path(module).split("/"):
      node = node[part]
    value = np.asarray(next(node[c] for c in candidates if c in node))
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)  # HWIO → OIHW
    elif value.ndim == 2:
      value = value.T                      # (in, out) → (out, in)
    assert value.shape == tuple(state[key].shape), (key, value.shape, state[key].shape)
    state[key] = torch.from_numpy(np.ascontiguousarray(value))
  model.load_state_dict(state)
  return model
