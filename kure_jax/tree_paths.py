"""Kernel paths ('block/conv/kernel', as `kure_jax.core.kurtosis.select_kernels` names them) into the trees Flax keeps
per module: params, gradients, and the 'quant' and 'intermediates' collections. The one place that walks them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def parts(path: str) -> list[str]:
  """The components of a kernel path, without a leading 'params/'."""
  out = path.split("/")
  return out[1:] if out[0] == "params" else out


def leaf(tree: Mapping, path: str) -> Any:
  """The value at `path` in a params-shaped tree (params, gradients, ...)."""
  node = tree
  for part in parts(path):
    node = node[part]
  return node


def module_node(tree: Mapping, path: str) -> Any:
  """The node of the module that owns the kernel at `path` (e.g. its entries in an 'intermediates' collection)."""
  node = tree
  for part in parts(path)[:-1]:
    node = node[part]
  return node


def sown_input(intermediates: Mapping, path: str) -> Any:
  """The input the layer of kernel `path` sowed ('input', see `kure_jax.models.layers.quant_hook`)."""
  return module_node(intermediates, path)["input"][0]


def at_modules(entries: Mapping[str, Mapping[str, Any]]) -> dict:
  """{kernel path: {name: value}} as a nested dict that mirrors the module tree, each entry beside its kernel."""
  out: dict = {}
  for path, values in entries.items():
    node = out
    for part in parts(path)[:-1]:
      node = node.setdefault(part, {})
    node.update(values)
  return out
