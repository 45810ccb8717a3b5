"""torchvision's MobileNet-V2 built from the quantization-hooked layers.

Layer for layer as ``torchvision.models.mobilenet_v2`` (Sandler et al. 2018): ReLU6,
depthwise 3x3 convs (``feature_group_count`` = channels), linear bottlenecks, dropout
0.2 before the classifier; 3,504,872 parameters at width 1.0 and 1000 classes.

Module names follow the state dict with the rule of `kure_jax.models.torch_module_path`
(a '.' joining a name to an index becomes '_', every other '.' becomes '/'):

  features.0.0 / features.0.1          -> features_0/0 (conv), features_0/1 (BN)
  features.2.conv.0.0 / .conv.0.1      -> features_2/conv_0/0, features_2/conv_0/1 (expand)
  features.2.conv.1.0 / .conv.1.1      -> features_2/conv_1/0, features_2/conv_1/1 (depthwise)
  features.2.conv.2 / .conv.3          -> features_2/conv_2, features_2/conv_3 (project, BN)
  features.1.conv.{0.0, 0.1, 1, 2}     -> features_1/conv_0/0, .../conv_0/1, conv_1, conv_2 (t = 1)
  features.18.0 / features.18.1        -> features_18/0, features_18/1
  classifier.1                         -> classifier_1

Activation grids: a block's first conv (and features_18's) reads the previous block's
linear-bottleneck output, which can be negative ('signed'), as does the stem (normalized
images); every other layer reads a ReLU6 output ('unsigned').
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kure_jax.models.layers import DEFAULT_WEIGHT_GRID, QConv, QDense
from kure_jax.models.resnet import batch_norm, logits_dtype, torch_padding

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
  """torchvision's `_make_divisible`: round channels to a multiple of `divisor`, losing < 10%."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class ConvBNReLU6(nn.Module):
  """torchvision's Conv2dNormActivation: conv '0' (no bias, symmetric padding), BN '1', ReLU6."""

  features: int
  kernel_size: int = 3
  stride: int = 1
  groups: int = 1
  act_grid: str = "unsigned"
  weight_grid: str = DEFAULT_WEIGHT_GRID
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    k = self.kernel_size
    x = QConv(self.features, (k, k), self.stride, torch_padding(k), feature_group_count=self.groups,
              weight_grid=self.weight_grid, act_grid=self.act_grid, dtype=self.dtype, name="0")(x)
    return nn.relu6(batch_norm(train, self.dtype, "1")(x))


class InvertedResidual(nn.Module):
  """Expand 1x1 (skipped when t = 1), depthwise 3x3 with the stride, linear 1x1 projection + BN.

  The residual is added when the stride is 1 and the channels are unchanged.
  `input_grid` is the grid of the block's input, read by its first conv: 'signed' after
  a linear bottleneck, 'unsigned' for features_1, which reads the stem's ReLU6.
  """

  features: int
  stride: int = 1
  expand_ratio: int = 6
  input_grid: str = "signed"
  weight_grid: str = DEFAULT_WEIGHT_GRID
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    inp = x.shape[-1]
    hidden = int(round(inp * self.expand_ratio))
    kw = dict(weight_grid=self.weight_grid, dtype=self.dtype)
    h, i, grid = x, 0, self.input_grid
    if self.expand_ratio != 1:
      h = ConvBNReLU6(hidden, 1, act_grid=grid, name="conv_0", **kw)(h, train)
      i, grid = 1, "unsigned"
    h = ConvBNReLU6(hidden, 3, self.stride, groups=hidden, act_grid=grid, name=f"conv_{i}", **kw)(h, train)
    h = QConv(self.features, (1, 1), 1, torch_padding(1), act_grid="unsigned", name=f"conv_{i + 1}", **kw)(h)
    h = batch_norm(train, self.dtype, f"conv_{i + 2}")(h)
    return x + h if self.stride == 1 and inp == self.features else h


class MobileNetV2(nn.Module):
  """torchvision's mobilenet_v2: features_0 ... features_18, avg pool, dropout, classifier_1.

  In training mode the dropout needs a 'dropout' rng: ``apply(..., rngs={'dropout': key})``.
  `width_mult` scales channels as torchvision does. At 1.0 and 1000 classes: 3,504,872
  parameters (1,281,000 of them in the classifier), as torchvision's.
  """

  num_classes: int
  weight_grid: str = DEFAULT_WEIGHT_GRID
  dtype: Any = None
  width_mult: float = 1.0
  dropout: float = 0.2
  inverted_residual_setting: Sequence[Sequence[int]] = INVERTED_RESIDUAL_SETTING

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(weight_grid=self.weight_grid, dtype=self.dtype)
    channels = make_divisible(32 * self.width_mult)
    last_channel = make_divisible(1280 * max(1.0, self.width_mult))
    x = ConvBNReLU6(channels, 3, 2, act_grid="signed", name="features_0", **kw)(x, train)
    idx, grid = 1, "unsigned"  # features_1 reads the stem's ReLU6; later blocks a linear bottleneck
    for t, c, n, s in self.inverted_residual_setting:
      out = make_divisible(c * self.width_mult)
      for b in range(n):
        x = InvertedResidual(out, s if b == 0 else 1, t, input_grid=grid, name=f"features_{idx}", **kw)(x, train)
        idx, grid = idx + 1, "signed"
    x = ConvBNReLU6(last_channel, 1, act_grid="signed", name=f"features_{idx}", **kw)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train, name="classifier_0")(x)
    x = QDense(self.num_classes, act_grid="unsigned", kernel_init=nn.initializers.normal(0.01),
               name="classifier_1", **kw)(x)
    return logits_dtype(x)
