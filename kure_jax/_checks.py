"""Argument checks that run on concrete values and stay silent under tracing.

Inside `jit`/`vmap`/`grad` the values are tracers and cannot be inspected without a
host round trip, so these checks only fire when a function is called eagerly with
concrete inputs (NumPy arrays, Python numbers, committed jax Arrays). Entry points
(configs, the evaluator) validate their settings eagerly before anything compiles.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def concrete(value: Any) -> np.ndarray | None:
  """`value` as a NumPy array, or None when it is a tracer (no check possible)."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(value)
  except Exception:  # pragma: no cover - exotic array types
    return None


def check_nonempty(fn: str, name: str, x: Any) -> None:
  """Raise if `x` has no elements (shapes are static, so this works under jit)."""
  if np.size(x) == 0:
    raise ValueError(f"{fn}: `{name}` is empty (shape {np.shape(x)}); it needs at least one element.")


SETTING_BITS = (2, 16)  # the bit-widths a quantizer setting (a sweep, QAT, LAPQ) accepts


def whole_bits(value: Any, lo: int = SETTING_BITS[0], hi: int = SETTING_BITS[1]) -> bool:
  """Whether a setting's `value` is a whole number of bits in lo…hi: the one rule the config checks share."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    return False
  return v.is_integer() and lo <= v <= hi


def check_bits(fn: str, bits: Any, lo: int = 1, hi: int = 16) -> None:
  """Raise if concrete `bits` are not integers in [lo, hi]."""
  b = concrete(bits)
  if b is None:
    return
  if b.size == 0:
    raise ValueError(f"{fn}: `bits` is empty.")
  if not np.all(np.isfinite(b)) or np.any(b != np.round(b)) or np.any(b < lo) or np.any(b > hi):
    bad = b[(~np.isfinite(b)) | (b != np.round(b)) | (b < lo) | (b > hi)].ravel()[0]
    raise ValueError(f"{fn}: `bits` must be whole numbers in {lo}..{hi}, got {bad}.")


def check_positive(fn: str, name: str, value: Any) -> None:
  """Raise if a concrete `value` has an entry that is not finite and > 0."""
  v = concrete(value)
  if v is None:
    return
  if v.size == 0:
    raise ValueError(f"{fn}: `{name}` is empty.")
  ok = np.isfinite(v) & (v > 0)
  if not np.all(ok):
    raise ValueError(f"{fn}: `{name}` must be finite and > 0, got {v[~ok].ravel()[0]}.")


def check_choice(fn: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
  """Raise if `value` is not one of `choices`."""
  if value not in choices:
    raise ValueError(f"{fn}: unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")
