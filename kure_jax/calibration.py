"""Calibration: the data post-training quantization picks its steps on, and what it records from it.

Shared by the sweep (`kure_jax.evaluation.robustness`), LAPQ (`kure_jax.evaluation.lapq`) and QAT's setup (`kure_jax.qat`),
which import it and not each other:

* `calibration_sample` draws labelled examples at random from a split (a prefix of a class-sorted folder
  would be one class);
* `record_activations` records a sample of each quantized layer's input, subsampled per batch on the device
  so that only the sample, never a whole layer input, reaches the host;
* `act_grid` is the one rule for an activation's grid: unsigned where every recorded value is ≥ 0 (after a
  ReLU), signed otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kure_jax import tree_paths
from kure_jax.models.layers import INTERMEDIATES


def act_grid(values: np.ndarray | jax.Array) -> str:
  """'unsigned' where every recorded input value is ≥ 0 (e.g. after a ReLU), else 'signed'."""
  return "unsigned" if float(jnp.min(values)) >= 0 else "signed"


def calibration_sample(ds, n: int, seed: int) -> dict[str, np.ndarray]:
  """`n` examples of `ds` (a `kure_jax.data.Dataset`) drawn at random by `seed`, evaluation preprocessing, as one
  labelled batch {'image', 'label', 'mask'}. Not the first `n`: folder datasets are sorted by class."""
  from kure_jax.data import transforms

  idx = np.sort(transforms.epoch_permutation(seed, 0, ds.num_examples)[:n]).astype(np.int64)
  parts = [ds.examples(idx[i:i + 256]) for i in range(0, len(idx), 256)]
  return {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label", "mask")}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _layer_samples(model, paths: tuple[str, ...], per_layer: int, variables: dict, key: jax.Array, *inputs):
  """Up to `per_layer` values of each layer's input, drawn without replacement on the device (compiled once per
  model, layer selection and input shape: every checkpoint of an architecture shares it)."""
  inter = model.apply(variables, *inputs, mutable=[INTERMEDIATES])[1][INTERMEDIATES]
  out = {}
  for i, p in enumerate(paths):
    v = tree_paths.sown_input(inter, p).reshape(-1)
    if v.size > per_layer:
      v = jax.random.choice(jax.random.fold_in(key, i), v, (per_layer,), replace=False)
    out[p] = v
  return out


def record_activations(model, variables: dict, images: Iterable[np.ndarray | tuple], paths: Sequence[str],
                       max_values: int = 1 << 16, seed: int = 0) -> dict[str, np.ndarray]:
  """A sample of at most `max_values` values of each selected layer's input over the calibration batches.

  Each element of `images` is one batch of the model's input (an image array), or a tuple of its positional
  inputs (e.g. NeuMF's (user, item) ids). `variables` may hold a 'quant' collection (e.g. DoReFa's weight
  normalization). Each batch contributes up to `max_values` values per layer, drawn on the device; the union is
  subsampled to `max_values` on the host.
  """
  batches = [x if isinstance(x, tuple) else (x,) for x in images]
  paths = tuple(paths)
  key = jax.random.key(seed)
  chunks: dict[str, list[np.ndarray]] = {p: [] for p in paths}
  for b, inputs in enumerate(batches):
    sample = jax.device_get(_layer_samples(model, paths, int(max_values), variables, jax.random.fold_in(key, b),
                                           *inputs))
    for p in paths:
      chunks[p].append(np.asarray(sample[p]))
  rng = np.random.default_rng(seed)
  out = {}
  for p, parts in chunks.items():
    v = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    out[p] = v if v.size <= max_values else rng.choice(v, max_values, replace=False)
  return out
