"""ResNets built from the quantization-hooked layers: CIFAR ResNet-20 and torchvision's ResNet-18/50.

Every conv is a `QConv` and every linear a `QDense`, so one 'quant' collection can
quantize any of them at apply time. What the hook never sees: BatchNorm, the residual
additions, pooling, and ResNet-20's parameter-free (option A) shortcuts.

The ImageNet models copy torchvision's architecture layer for layer (explicit symmetric
padding, so outputs match for any input size) and name their modules like
torchvision's state dict with one rule (see `kure_jax.models.torch_module_path`):
a '.' joining a name to an index becomes '_', every other '.' becomes '/'
('layer2.0.downsample.0' -> 'layer2_0/downsample_0').
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kure_jax.models.layers import DEFAULT_WEIGHT_GRID, QConv, QDense, QReLU

BN_MOMENTUM = 0.9  # Flax's running-average decay; torch's momentum 0.1
BN_EPSILON = 1e-5
SHORTCUTS = ("identity", "projection", "pad")

# torch.nn.Linear's default kernel init, U(±1/sqrt(fan_in)) (its bias init needs the
# fan-in, which a Flax bias initializer does not see; biases start at zero instead).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  """BatchNorm with torch's defaults (momentum 0.1, eps 1e-5); batch stats only when training.

  The variance is two-pass, E[(x − E[x])²], as in torch: Flax's default E[x²] − E[x]²
  cancels catastrophically for channels whose mean dwarfs their spread, which made
  gradients depend on summation order (1 vs 4 devices differed by 0.5% after one step).
  """
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      use_fast_variance=False, dtype=dtype, name=name)


def torch_padding(kernel_size: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
  """torchvision's symmetric padding ``(k − 1) // 2 · d`` on both sides of H and W.

  Explicit rather than 'SAME': for even inputs and stride 2, 'SAME' pads only after,
  which shifts every output relative to torch.
  """
  p = (kernel_size - 1) // 2 * dilation
  return ((p, p), (p, p))


def relu(mdl: nn.Module, x: jax.Array, name: str) -> jax.Array:
  """A ReLU of `mdl`; with ``mdl.dorefa_relus`` DoReFa's clamp to [0, 1] + activation quantizer (`QReLU` named
  `name`, which the 'quant' collection addresses as an activation site)."""
  return QReLU(name=name)(x) if mdl.dorefa_relus else nn.relu(x)


def logits_dtype(x: jax.Array) -> jax.Array:
  """Logits in at least float32, so the loss is not computed in a low-precision dtype."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class BasicBlock(nn.Module):
  """Two 3x3 convs and a shortcut (torchvision's BasicBlock; ResNet-18/34, CIFAR ResNets).

  shortcut: 'identity'; 'projection' (1x1 conv + BN named downsample_0/_1, torchvision,
  He et al.'s option B); 'pad' (option A: stride-`stride` subsampling and zero channels,
  parameter-free, so the hook does not see it).
  """

  planes: int
  stride: int = 1
  shortcut: str = "identity"
  weight_grid: str = DEFAULT_WEIGHT_GRID
  dtype: Any = None
  dorefa_relus: bool = False  # every ReLU DoReFa's clamp + quantizer (`relu`)

  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(QConv, use_bias=False, weight_grid=self.weight_grid, act_grid="unsigned",
                             dtype=self.dtype)
    out = conv(self.planes, (3, 3), self.stride, torch_padding(3), name="conv1")(x)
    out = relu(self, batch_norm(train, self.dtype, "bn1")(out), "relu1")
    out = conv(self.planes, (3, 3), 1, torch_padding(3), name="conv2")(out)
    out = batch_norm(train, self.dtype, "bn2")(out)
    return relu(self, out + _shortcut(self, x, self.planes, train), "relu2")


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (carrying the stride: torchvision's v1.5), 1x1 expand by 4, and a shortcut."""

  planes: int
  stride: int = 1
  shortcut: str = "identity"
  weight_grid: str = DEFAULT_WEIGHT_GRID
  dtype: Any = None
  dorefa_relus: bool = False  # every ReLU DoReFa's clamp + quantizer (`relu`)

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(QConv, use_bias=False, weight_grid=self.weight_grid, act_grid="unsigned",
                             dtype=self.dtype)
    out = conv(self.planes, (1, 1), 1, torch_padding(1), name="conv1")(x)
    out = relu(self, batch_norm(train, self.dtype, "bn1")(out), "relu1")
    out = conv(self.planes, (3, 3), self.stride, torch_padding(3), name="conv2")(out)
    out = relu(self, batch_norm(train, self.dtype, "bn2")(out), "relu2")
    out = conv(self.planes * self.expansion, (1, 1), 1, torch_padding(1), name="conv3")(out)
    out = batch_norm(train, self.dtype, "bn3")(out)
    return relu(self, out + _shortcut(self, x, self.planes * self.expansion, train), "relu3")


def _shortcut(block: nn.Module, x: jax.Array, features: int, train: bool) -> jax.Array:
  """The residual branch of `block` (called inside its compact __call__)."""
  if block.shortcut == "identity":
    if block.stride != 1 or x.shape[-1] != features:
      raise ValueError(f"{block.name}: an identity shortcut needs stride 1 and {features} input "
                       f"channels, got stride {block.stride} and {x.shape[-1]}.")
    return x
  if block.shortcut == "projection":
    y = QConv(features, (1, 1), block.stride, torch_padding(1), use_bias=False, weight_grid=block.weight_grid,
              act_grid="unsigned", dtype=block.dtype, name="downsample_0")(x)
    return batch_norm(train, block.dtype, "downsample_1")(y)
  if block.shortcut == "pad":
    extra = features - x.shape[-1]
    if extra < 0:
      raise ValueError(f"{block.name}: a 'pad' shortcut cannot reduce {x.shape[-1]} channels to {features}.")
    y = x[:, ::block.stride, ::block.stride, :]
    return jnp.pad(y, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  raise ValueError(f"{block.name}: unknown shortcut {block.shortcut!r}; choose one of {SHORTCUTS}.")


class CifarResNet(nn.Module):
  """CIFAR ResNet (He et al. 2016, §4.2): 3x3 conv, 3 stages of n basic blocks, avg pool, fc.

  depth = 6n + 2 (20, 32, 44, 56, 110); stages have `width`, 2·width, 4·width channels
  and stages 2 and 3 start with stride 2. With the paper's option A shortcuts (zero
  padding, no parameters) ResNet-20 has 269,722 parameters for 10 classes (0.27M as in
  the paper: 267,696 in convs, 1,376 in BN scales/biases, 650 in fc); option B
  ('projection', 1x1 conv + BN) adds 2,752. Names: conv1, bn1, layer{s}_{b}/..., fc.
  """

  num_classes: int
  weight_grid: str = DEFAULT_WEIGHT_GRID
  dtype: Any = None
  depth: int = 20
  width: int = 16
  shortcut: str = "pad"  # for the two downsampling blocks: 'pad' (option A) or 'projection' (B)
  dorefa_relus: bool = False  # every ReLU (residual stream included) DoReFa's clamp + quantizer: `relu`

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f"CifarResNet: depth must be 6n + 2 with n ≥ 1, got {self.depth}.")
    if self.shortcut not in ("pad", "projection"):
      raise ValueError(f"CifarResNet: shortcut must be 'pad' or 'projection', got {self.shortcut!r}.")
    n = (self.depth - 2) // 6
    x = QConv(self.width, (3, 3), 1, torch_padding(3), weight_grid=self.weight_grid, act_grid="signed",
              dtype=self.dtype, name="conv1")(x)
    x = relu(self, batch_norm(train, self.dtype, "bn1")(x), "relu1")
    for s in range(3):
      for b in range(n):
        stride = 2 if s > 0 and b == 0 else 1
        shortcut = self.shortcut if stride != 1 else "identity"
        x = BasicBlock(self.width * 2**s, stride=stride, shortcut=shortcut, weight_grid=self.weight_grid,
                       dtype=self.dtype, dorefa_relus=self.dorefa_relus, name=f"layer{s + 1}_{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = QDense(self.num_classes, weight_grid=self.weight_grid, act_grid="unsigned", dtype=self.dtype,
               name="fc")(x)
    return logits_dtype(x)


class ResNet(nn.Module):
  """torchvision's ImageNet ResNet (defaults: resnet18).

  7x7/2 conv (pad 3) + BN + ReLU, 3x3/2 max pool (pad 1), four stages of `block`
  (64·2^i planes; stages 2-4 start with stride 2; the first block of a stage gets a
  1x1 conv + BN 'downsample' when its stride or channels change), global average
  pool, fc with bias. Parameter counts equal torchvision's (BN running statistics are
  in 'batch_stats', not 'params').
  """

  num_classes: int
  weight_grid: str = DEFAULT_WEIGHT_GRID
  dtype: Any = None
  block: Any = BasicBlock
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  dorefa_relus: bool = False  # every ReLU (residual stream included) DoReFa's clamp + quantizer: `relu`

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = QConv(64, (7, 7), 2, torch_padding(7), weight_grid=self.weight_grid, act_grid="signed",
              dtype=self.dtype, name="conv1")(x)
    x = relu(self, batch_norm(train, self.dtype, "bn1")(x), "relu1")
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=torch_padding(3))  # pads with -inf, like torch
    inplanes = 64
    for s, n in enumerate(self.stage_sizes):
      planes = 64 * 2**s
      for b in range(n):
        stride = 2 if s > 0 and b == 0 else 1
        downsample = b == 0 and (stride != 1 or inplanes != planes * self.block.expansion)
        x = self.block(planes, stride=stride, shortcut="projection" if downsample else "identity",
                       weight_grid=self.weight_grid, dtype=self.dtype, dorefa_relus=self.dorefa_relus,
                       name=f"layer{s + 1}_{b}")(x, train)
        inplanes = planes * self.block.expansion
    x = jnp.mean(x, axis=(1, 2))
    x = QDense(self.num_classes, weight_grid=self.weight_grid, act_grid="unsigned",
               kernel_init=torch_linear_init, dtype=self.dtype, name="fc")(x)
    return logits_dtype(x)


class ResNet18(ResNet):
  """torchvision's resnet18: BasicBlock x [2, 2, 2, 2]; 11,689,512 parameters for 1000 classes."""

  block: Any = BasicBlock
  stage_sizes: Sequence[int] = (2, 2, 2, 2)


class ResNet50(ResNet):
  """torchvision's resnet50 (v1.5): Bottleneck x [3, 4, 6, 3]; 25,557,032 parameters for 1000 classes."""

  block: Any = Bottleneck
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
