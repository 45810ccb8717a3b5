"""Kurtosis and the KURE penalty (Shkolnik et al., NeurIPS 2020).

KURE adds ``λ · reduce_l (Kurt[W_l] − K_T)²`` to the task loss, where ``Kurt`` is
Pearson's kurtosis ``E[((W − μ)/σ)⁴]`` and ``K_T = 1.8`` is the kurtosis of a uniform
distribution. Which kernels are regularized is derived from the parameter tree
(paths and regexes): every conv and dense kernel except the first layer (the stem)
and the classifier head, as in the paper, with no per-architecture layer counts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kure_jax import _checks

KURTOSIS_UNIFORM = 1.8
KURTOSIS_GAUSSIAN = 3.0
KURTOSIS_LAPLACE = 6.0
REDUCTIONS = ("mean", "sum", "max")

# A tensor whose variance is below this fraction of its mean square is treated as
# constant: float32 rounding of the mean alone leaves relative deviations ~1e-7.
_DEGENERATE_REL_VAR = 1e-10

Pattern = str | Sequence[str] | None


def kurtosis(x: jax.Array, axis: int | Sequence[int] | None = None, *, ddof: int = 0,
             keepdims: bool = False) -> jax.Array:
  """Pearson kurtosis ``E[(x − μ)⁴] / σ⁴`` with population moments (not excess).

  Uniform gives 1.8, Gaussian 3, Laplace 6. ``ddof=1`` uses the n−1 variance as the
  authors' PyTorch code does (``torch.std`` is unbiased), which scales the result by
  ``((n−1)/n)²``: a relative difference of 2/n, negligible for real kernels.

  A (numerically) constant tensor has no defined kurtosis; it returns 0 with a zero
  gradient instead of NaN, so a regularizer over it is finite and inert.
  Computed in at least float32 whatever the input dtype.
  """
  _checks.check_nonempty("kurtosis", "x", x)
  x = jnp.asarray(x)
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(dtype)
  n = x.size if axis is None else _count(x.shape, axis)
  mu = jnp.mean(x, axis=axis, keepdims=True)
  d = x - mu
  d2 = d * d
  m2 = jnp.mean(d2, axis=axis, keepdims=keepdims)
  m4 = jnp.mean(d2 * d2, axis=axis, keepdims=keepdims)
  if ddof:
    if n <= ddof:
      raise ValueError(f"kurtosis: ddof={ddof} needs more than {ddof} elements, got {n}.")
    m2 = m2 * (n / (n - ddof))
  scale2 = jnp.mean(x * x, axis=axis, keepdims=keepdims)
  degenerate = m2 <= _DEGENERATE_REL_VAR * scale2
  safe_m2 = jnp.where(degenerate, 1.0, m2)
  return jnp.where(degenerate, 0.0, m4 / (safe_m2 * safe_m2))


def _count(shape: tuple[int, ...], axis: int | Sequence[int]) -> int:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  n = 1
  for a in axes:
    n *= shape[a]
  return n


# ----------------------------------------------------------------------------------
# Selecting kernels from a parameter tree.


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: Sequence[Any]) -> str:
  """'a/b/kernel' for a jax key path."""
  return "/".join(_key_name(k) for k in path)


def kernel_leaves(params: Any) -> dict[str, jax.Array]:
  """Every conv/dense weight in `params`: leaves named 'kernel' with ≥ 2 dimensions."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if path and _key_name(path[-1]) == "kernel" and jnp.ndim(leaf) >= 2:
      out[path_str(path)] = leaf
  return out


def _natural_key(path: str) -> tuple:
  """Order paths by depth, then component-wise with numbers compared as numbers.

  Flax names auto-created modules in definition order (Conv_0, Conv_1, ..., Conv_10),
  so this recovers the order layers were written in, whatever the dict order.
  """
  parts = path.split("/")
  return (len(parts), [[int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)] for p in parts])


# Conventional names of the first layer and of the classifier (ours, torchvision's,
# timm's, Flax examples'); they win over definition order among the shallowest layers.
STEM_NAMES = r"(^|/)(stem|conv1|conv_init|conv_stem|features_0|embed\w*)(/|$)"
HEAD_NAMES = r"(^|/)(head|fc|classifier\w*|logits|output|out)(/|$)"


def stem_and_head(paths: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> tuple[str | None, str | None]:
  """Find the stem (first layer) and the classifier head among kernel paths.

  Stem: among the conv kernels (≥ 3 dims; dense kernels if there is no conv) at the
  shallowest depth, the one named like a stem (`STEM_NAMES`), else the first in
  natural order of module names. Head: among the dense kernels (2 dims) at the
  shallowest depth, the one named like a head (`HEAD_NAMES`), else the last.
  Flax auto-names modules in definition order (Conv_0, ..., Conv_10), so "first" and
  "last" follow the order the layers were written in, whatever the dict order.
  """

  def shallowest(group):
    if not group:
      return []
    depth = min(p.count("/") for p in group)
    return sorted((p for p in group if p.count("/") == depth), key=_natural_key)

  convs = shallowest([p for p in paths if len(shapes[p]) >= 3])
  dense = shallowest([p for p in paths if len(shapes[p]) == 2])
  first = convs or dense
  stem = next((p for p in first if re.search(STEM_NAMES, p.lower())), first[0] if first else None)
  head = next((p for p in dense if re.search(HEAD_NAMES, p.lower())), dense[-1] if dense else None)
  return stem, head


def _patterns(value: Pattern) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  return tuple(value)


def kernel_selection(section: Any) -> dict[str, Any]:
  """`select_kernels`' keywords from a config section holding include, exclude, skip_stem and skip_head: the
  one reading of ``config.kure`` (KURE's layers, which the sweep quantizes) and ``config.quant`` (QAT's)."""
  get = section.get  # a ConfigDict or a dict
  return {"include": get("include") or None, "exclude": get("exclude") or None,
          "skip_stem": bool(get("skip_stem", True)), "skip_head": bool(get("skip_head", True))}


def select_kernels(params: Any, *, include: Pattern = None, exclude: Pattern = None,
                   skip_stem: bool = True, skip_head: bool = True) -> dict[str, jax.Array]:
  """The kernels KURE (and, by default, the quantizers) act on, as {path: kernel}.

  Args:
    params: a parameter pytree (Flax ``variables['params']`` or the whole variables).
    include: regex(es) searched in 'a/b/kernel' paths; None keeps every kernel.
    exclude: regex(es) removing kernels after `include`.
    skip_stem, skip_head: drop the first layer and the classifier (see `stem_and_head`).
  """
  kernels = kernel_leaves(params)
  if not kernels:
    raise ValueError("select_kernels: `params` holds no conv or dense kernel "
                     "(leaves named 'kernel' with ≥ 2 dimensions).")
  shapes = {p: tuple(jnp.shape(k)) for p, k in kernels.items()}
  stem, head = stem_and_head(list(kernels), shapes)
  inc, exc = _patterns(include), _patterns(exclude)
  for pat in inc + exc:
    try:
      re.compile(pat)
    except re.error as e:
      raise ValueError(f"select_kernels: bad regex {pat!r}: {e}") from None
  chosen = {}
  for p in sorted(kernels, key=_natural_key):
    if inc and not any(re.search(r, p) for r in inc):
      continue
    if any(re.search(r, p) for r in exc):
      continue
    if (skip_stem and p == stem) or (skip_head and p == head):
      continue
    chosen[p] = kernels[p]
  if not chosen:
    raise ValueError(
        "select_kernels: no kernel left to regularize. Kernels in the tree: "
        f"{', '.join(sorted(kernels, key=_natural_key))} (stem={stem}, head={head}); "
        f"include={inc or None}, exclude={exc or None}.")
  return chosen


def kurtosis_by_layer(params: Any, *, include: Pattern = None, exclude: Pattern = None,
                      skip_stem: bool = True, skip_head: bool = True, ddof: int = 0) -> dict[str, jax.Array]:
  """{path: kurtosis} of the selected kernels, for logging."""
  sel = select_kernels(params, include=include, exclude=exclude, skip_stem=skip_stem, skip_head=skip_head)
  return {p: kurtosis(k, ddof=ddof) for p, k in sel.items()}


def kure_penalty(params: Any, target: float | jax.Array = KURTOSIS_UNIFORM, *, include: Pattern = None,
                 exclude: Pattern = None, skip_stem: bool = True, skip_head: bool = True,
                 reduction: str = "mean", ddof: int = 0) -> jax.Array:
  """KURE: ``reduce_l (Kurt[W_l] − target)²`` over the selected kernels.

  ``reduction='mean'`` is the paper's regularizer (divide by the number of selected
  layers, derived from the tree); 'sum' and 'max' are offered for ablations. Multiply
  by λ in the loss. Differentiable and jit-able (selection happens at trace time).
  """
  _checks.check_choice("kure_penalty", "reduction", reduction, REDUCTIONS)
  t = _checks.concrete(target)
  if t is not None and (t.size != 1 or not float(t) >= 1.0):
    raise ValueError(f"kure_penalty: `target` must be a number ≥ 1 (kurtosis is never below 1), got {t}.")
  kurts = kurtosis_by_layer(params, include=include, exclude=exclude, skip_stem=skip_stem,
                            skip_head=skip_head, ddof=ddof)
  sq = jnp.stack([(k - target) ** 2 for k in kurts.values()])
  return {"mean": jnp.mean, "sum": jnp.sum, "max": jnp.max}[reduction](sq)
