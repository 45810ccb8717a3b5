"""Step providers: where a sweep's base steps Δ̃ come from, each as a step table.

A step table holds, for every quantized layer, one base step per bit-width of the grid:
``{'w': {kernel path: Δ̃[bits] or Δ̃[bits, C]}, 'a': {kernel path: Δ̃[bits]}}`` (per output channel C when
the grid's granularity is 'channel'; 'a' only for the layers whose inputs are quantized). The robustness sweep
stacks one table per base-step method and scales the steps by its ratios and policies; it does not care
where they came from:

- statistics of one layer's tensor (mse, max, aciq_gauss, aciq_laplace: `kure_jax.core.quant.STEP_METHODS`), computed
  inside the compiled scorer with traced bit-widths (`statistic_table`);
- a QAT checkpoint's learned steps, rescaled from the trained bit-width by the authors' rule
  (`learned_table`);
- steps found beforehand by a search over the whole model (LAPQ, `kure_jax.evaluation.lapq.grid_steps`), checked and
  shaped on the host (`precomputed_table`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kure_jax.core import quant as Q
from kure_jax.errors import UserError
from kure_jax.qat import rescale_step

StepTable = dict[str, dict[str, Any]]  # {'w': {path: Δ̃[bits, (C)]}, 'a': {path: Δ̃[bits]}}

STATISTICS = tuple(Q.STEP_METHODS)


def statistic_table(method: str, kernels: Mapping[str, jax.Array], acts: Mapping[str, jax.Array], bits: jax.Array,
                    *, weight_grid: str, act_grids: Mapping[str, str], channel: bool) -> StepTable:
  """Δ̃ of `method` for each kernel (picked on `weight_grid`, per output channel if `channel`) and each recorded
  activation sample (on its own grid), at every bit-width of `bits` (traced)."""
  fn = Q.STEP_METHODS[method]
  axis = -1 if channel else None
  return {"w": {p: jax.vmap(lambda b, k=k: fn(k, b, weight_grid, axis=axis))(bits) for p, k in kernels.items()},
          "a": {p: jax.vmap(lambda b, v=v, p=p: fn(v, b, act_grids[p]))(bits) for p, v in acts.items()}}


def learned_table(learned: Mapping[str, Mapping[str, jax.Array]], trained_bits: tuple[int, int], bits: jax.Array,
                  kernels: Mapping[str, jax.Array], act_paths: Sequence[str], *, channel: bool) -> StepTable:
  """A QAT checkpoint's steps ({path: {'w': Δ, 'a': Δ or None}}, `kure_jax.qat.learned_steps`) at every
  bit-width: Δ_k = Δ_b·(2^b − 1)/(2^k − 1) from the trained (weight, activation) bit-widths."""
  w = {}
  for p, k in kernels.items():
    s = rescale_step(learned[p]["w"], trained_bits[0], bits)
    w[p] = s[:, None] * jnp.ones(k.shape[-1]) if channel else s
  return {"w": w, "a": {p: rescale_step(learned[p]["a"], trained_bits[1], bits) for p in act_paths}}


def precomputed_table(given: Mapping[int, Mapping[str, Mapping[str, Any]]], bits: Sequence[int],
                      kernels: Mapping[str, Any], *, channel: bool, with_acts: bool,
                      name: str = "lapq_steps") -> StepTable:
  """Steps computed beforehand, {bits: {path: {'w': step, 'a': step or None}}} (LAPQ's), as a step table; one
  readable error for a missing bit-width, layer or activation step, or a weight step of the wrong shape."""
  given = {int(b): v for b, v in given.items()}
  missing = sorted(set(int(b) for b in bits) - set(given))
  if missing:
    raise UserError(f"{name} has no steps for bit-width(s) {', '.join(map(str, missing))}.")
  w, a = {}, {}
  for p, kernel in kernels.items():
    rows_w, rows_a = [], []
    channels = np.shape(kernel)[-1]
    for b in bits:
      entry = given[int(b)].get(p)
      if entry is None:
        raise UserError(f"{name}[{b}] has no steps for layer {p!r}; give every quantized layer.")
      step = np.asarray(entry["w"], np.float32)
      if channel and step.ndim == 0:
        step = np.full(channels, step, np.float32)
      expected = (channels,) if channel else ()
      if step.shape != expected:
        raise UserError(f"{name}[{b}][{p!r}]['w'] has shape {step.shape}, but granularity "
                        f"{'channel' if channel else 'tensor'!r} needs {expected or 'a scalar'}; compute the steps "
                        "with the grid's granularity.")
      rows_w.append(step)
      if with_acts:
        if entry.get("a") is None:
          raise UserError(f"{name}[{b}][{p!r}] has no activation step; the grid quantizes activations.")
        rows_a.append(np.float32(entry["a"]))
    w[p] = jnp.asarray(np.stack(rows_w))
    if with_acts:
      a[p] = jnp.asarray(np.stack(rows_a))
  return {"w": w, "a": a}


def stack(tables: Sequence[StepTable]) -> StepTable:
  """One table per method → {'w'|'a': {path: Δ̃[method, bits, (C)]}}, the layout the sweep indexes."""
  return {side: {p: jnp.stack([t[side][p] for t in tables]) for p in tables[0][side]} for side in ("w", "a")}
