"""Image preprocessing in NumPy and Pillow: CIFAR crop/flip, ImageNet crops, normalization.

Every random choice is a deterministic function of (seed, epoch, example index), never
of the batch an example lands in or of the host that loads it: a resumed run, a run on
more hosts and a run with another prefetch depth all see bit-identical images.

* CIFAR style (fixed small images, held decoded in memory): zero-pad 4 px, random crop
  back to the original size, horizontal flip with probability ½, done for a whole batch
  at once (`crop_flip_batch`).
* ImageNet style (any image size, decoded per example): train = random resized crop
  (area 8–100 %, aspect 3/4–4/3, torchvision's 10 tries then a center crop) to
  ``size`` with bilinear (antialiased) resampling plus a flip; eval = resize the shorter
  side to ``round(size·256/224)``, center crop ``size``.
* Normalization: ``(x/255 − mean)/std`` per channel, as one multiply-add in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR_PAD = 4
EVAL_RESIZE_RATIO = 256 / 224  # ImageNet eval: resize 256 → center crop 224

# Stream ids keep the random draws for shuffling, batch augmentation and per-example
# augmentation independent of each other.
_STREAM_SHUFFLE, _STREAM_CROP_FLIP, _STREAM_EXAMPLE = 0, 1, 2


def _seed_words(seed: int) -> int:
  return int(seed) % (1 << 64)  # SeedSequence wants non-negative entropy


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order in which a training epoch visits the `n` examples (int64)."""
  return np.random.default_rng([_seed_words(seed), int(epoch), _STREAM_SHUFFLE]).permutation(n)


def crop_flip_params(seed: int, epoch: int, n: int, pad: int = CIFAR_PAD) -> tuple[np.ndarray, np.ndarray]:
  """Per-example (offsets (n, 2) in [0, 2·pad], flips (n,) bool) for one epoch, by example index."""
  rng = np.random.default_rng([_seed_words(seed), int(epoch), _STREAM_CROP_FLIP])
  offsets = rng.integers(0, 2 * pad + 1, size=(n, 2), dtype=np.int64)
  flips = rng.random(n) < 0.5
  return offsets, flips


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator for one example's augmentation in one epoch."""
  return np.random.default_rng([_seed_words(seed), int(epoch), _STREAM_EXAMPLE, int(index)])


def crop_flip_batch(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                    pad: int = CIFAR_PAD) -> np.ndarray:
  """Zero-pad `images` (N, H, W, C) by `pad`, crop H×W at `offsets` (dy, dx), flip where `flips`.

  Output dtype = input dtype. Pixels read from the pad are 0 (before normalization), as
  in torchvision's ``RandomCrop(32, padding=4)``. One slice copy per example: for 32×32
  images this beats a single fancy-indexing gather (0.55 vs 1.9 ms per 128 on one core).
  """
  n, h, w, _ = images.shape
  padded = np.zeros((n, h + 2 * pad, w + 2 * pad) + images.shape[3:], images.dtype)
  padded[:, pad:pad + h, pad:pad + w] = images
  out = np.empty_like(images)
  for i in range(n):
    dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
    crop = padded[i, dy:dy + h, dx:dx + w]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


class Normalizer:
  """``(x/255 − mean)/std`` for uint8 images, as ``x·scale + bias`` in float32."""

  def __init__(self, mean: Sequence[float], std: Sequence[float]):
    mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0):
      raise ValueError(f"mean and std need 3 entries each and std > 0, got mean={mean.tolist()}, std={std.tolist()}.")
    self.mean = tuple(float(v) for v in mean)
    self.std = tuple(float(v) for v in std)
    self.scale = (1.0 / (255.0 * std)).astype(np.float32)
    self.bias = (-mean / std).astype(np.float32)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    out = images.astype(np.float32)
    out *= self.scale
    out += self.bias
    return out


def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
  """An RGB PIL image from a uint8 HWC array (1, 3 or 4 channels) or a PIL image."""
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else image.convert("RGB")
  a = np.asarray(image)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 3 and a.shape[-1] == 4:
    a = a[..., :3]
  return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


def to_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
  """A uint8 (H, W, 3) array from a PIL image or a uint8 array with 1, 3 or 4 channels."""
  if isinstance(image, Image.Image):
    return np.asarray(to_pil(image))
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise ValueError(f"expected uint8 images, got {a.dtype}.")
  if a.ndim == 2:
    a = a[..., None]
  if a.shape[-1] == 1:
    return np.repeat(a, 3, axis=-1)
  if a.shape[-1] == 4:
    return a[..., :3]
  return a


def resize_exact(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
  """`image` as uint8 (size, size, 3); bilinear (antialiased) only when the size differs."""
  a = to_rgb_array(image)
  if a.shape[:2] == (size, size):
    return a
  return np.asarray(to_pil(a).resize((size, size), Image.BILINEAR))


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, crop_h, crop_w) as in torchvision's RandomResizedCrop.get_params."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height  # fallback: the whole image, clipped to the ratio range
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def imagenet_train(image: np.ndarray | Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
  """Random resized crop to size×size (bilinear) and a random horizontal flip; uint8 out."""
  im = to_pil(image)
  top, left, h, w = random_resized_crop_box(rng, im.height, im.width)
  im = im.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
  out = np.asarray(im)
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def imagenet_eval(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
  """Resize the shorter side to round(size·256/224) (bilinear), center crop size×size; uint8 out."""
  im = to_pil(image)
  short = int(round(size * EVAL_RESIZE_RATIO))
  if im.width <= im.height:
    new_w, new_h = short, int(short * im.height / im.width)
  else:
    new_w, new_h = int(short * im.width / im.height), short
  if (new_w, new_h) != im.size:
    im = im.resize((new_w, new_h), Image.BILINEAR)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return np.asarray(im)[top:top + size, left:left + size]
