"""LAPQ: loss-aware post-training quantization (Nahshan et al. 2019), as published and as the authors' code runs it.

For one bit-width, on a small labelled calibration set (512 images by default):

1. Lp initialization: for every quantized layer, the step minimizing ``E|Q(x) − x|^p`` of its weights (and, when
   activations are quantized, of its recorded inputs) for each p in {2, 2.5, 3} (`kure_jax.core.quant.lp_step`).
2. p*: the calibration cross-entropy of the model quantized with each p's steps, a quadratic fitted to loss(p)
   (``np.polyfit``, as the authors do) and its minimizer, kept inside the sampled range (interpolation; the best
   sampled p when the fit is not convex). The Lp steps at p* initialize the search.
3. Joint search: SciPy's Powell method (``maxiter`` = 2 iterations by default) over the log-steps of every
   weight and activation quantizer together, minimizing the calibration cross-entropy. The result is the best
   point evaluated, so never worse than the initialization.

The loss is ONE jitted function of a flat step vector (traced bits too): Powell's hundreds of evaluations, the p
sweep and every bit-width reuse a single compilation. With per-channel weight steps the search moves one log
multiplier per layer on top of the per-channel Lp steps at p* (the channel profile stays Lp's); per tensor it
moves the step itself. The stem and the classifier stay in float (the caller's `paths`, by default the Sweep's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kure_jax import tree_paths
from kure_jax._checks import whole_bits
from kure_jax.calibration import act_grid, record_activations
from kure_jax.core import quant as Q
from kure_jax.errors import UserError
from kure_jax.models.layers import BIAS_CORRECTIONS, DEFAULT_WEIGHT_GRID, LayerQuant, quant_collection
from kure_jax.qat import dorefa_normalization
from kure_jax.tasks import classification_sums

DEFAULT_PS = (2.0, 2.5, 3.0)
_LOG_CLIP = 80.0  # log-steps are clipped here so a wild Powell bracket cannot overflow to inf


def fit_p(ps: Sequence[float], losses: Sequence[float]) -> float:
  """p* of LAPQ's quadratic interpolation of loss(p): the parabola's minimizer, clipped to the sampled range.

  A non-convex fit (or a non-finite loss) falls back to the best sampled p.
  """
  ps, losses = np.asarray(ps, np.float64), np.asarray(losses, np.float64)
  best = float(ps[int(np.argmin(np.where(np.isfinite(losses), losses, np.inf)))])
  if len(ps) < 3 or not np.all(np.isfinite(losses)):
    return best
  a, b, _ = np.polyfit(ps, losses, 2)
  if not a > 0:
    return best
  return float(np.clip(-b / (2 * a), ps.min(), ps.max()))


@dataclasses.dataclass
class LapqResult:
  """LAPQ's steps for one bit-width: {kernel path: {"w": step (scalar or per channel), "a": step or None}}."""

  bits: int
  steps: dict[str, dict[str, Any]]
  p_star: float
  p_losses: dict[float, float]  # calibration loss at each sampled p's Lp steps
  init_loss: float              # at the Lp steps for p* (Powell's starting point)
  loss: float                   # at the returned steps (≤ init_loss)
  evaluations: int              # Powell objective evaluations
  seconds: float


def _calibration_arrays(calibration, chunk_size: int) -> dict[str, np.ndarray]:
  """Stack labelled batches into (chunks, chunk_size, ...) arrays with a mask (padding rows masked out)."""
  batches = [calibration] if isinstance(calibration, Mapping) else list(calibration)
  if not batches or any("image" not in b or "label" not in b for b in batches):
    raise UserError("LAPQ needs labelled calibration data: batches with 'image' and 'label' (e.g. 512 train images).")
  images = np.concatenate([np.asarray(b["image"], np.float32) for b in batches])
  labels = np.concatenate([np.asarray(b["label"], np.int32) for b in batches])
  mask = np.concatenate([np.asarray(b["mask"], bool) if "mask" in b else np.ones(len(b["label"]), bool)
                         for b in batches])
  images, labels = images[mask], labels[mask]
  n = len(labels)
  if n == 0:
    raise UserError("LAPQ's calibration set is empty; give it some labelled images.")
  size = min(chunk_size, n)
  chunks = -(-n // size)
  pad = chunks * size - n
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.float32)])
  labels = np.concatenate([labels, np.zeros(pad, np.int32)])
  valid = np.arange(chunks * size) < n
  return {"image": images.reshape((chunks, size) + images.shape[1:]), "label": labels.reshape(chunks, size),
          "mask": valid.reshape(chunks, size)}


class Lapq:
  """LAPQ for one model, calibration set and layer selection; `run(bits)` returns a `LapqResult`.

  Args:
    model, variables: a Flax model with the quantization hook and its {'params', 'batch_stats'}.
    calibration: labelled batches ({'image', 'label'[, 'mask']}, one dict or several).
    paths: the kernels to quantize ('layer1_0/conv1/kernel', ...): the Sweep's `paths` (stem and head float).
    quantize_weights, quantize_acts: which quantizers exist and are searched (at least one).
    granularity: 'tensor' or 'channel' weight steps; weight_grid: the model's weight grid.
    act_grids: {path: grid} for the inputs (default: 'unsigned' where the recorded input is ≥ 0, as the Sweep).
    dorefa: the weights are DoReFa's tanh-normalized ones (a DoReFa QAT checkpoint).
    bias_correction: 'none', 'mean' or 'mean_std', applied in the hook while searching, as in the evaluation.
    chunk_size: calibration images per forward pass inside the compiled loss.
  """

  def __init__(self, model, variables: dict, calibration: Mapping | Iterable[Mapping], paths: Sequence[str], *,
               quantize_weights: bool = True, quantize_acts: bool = False, granularity: str = "tensor",
               weight_grid: str = DEFAULT_WEIGHT_GRID, act_grids: Mapping[str, str] | None = None, dorefa: bool = False,
               bias_correction: str = "none", chunk_size: int = 128, max_act_values: int = 1 << 16):
    if not (quantize_weights or quantize_acts):
      raise UserError("LAPQ: nothing to quantize; quantize the weights, the activations or both.")
    if granularity not in ("tensor", "channel"):
      raise UserError(f"LAPQ: granularity {granularity!r} is unknown; choose from tensor, channel.")
    if bias_correction not in BIAS_CORRECTIONS:
      raise UserError(f"LAPQ: bias_correction {bias_correction!r} is unknown; choose from {', '.join(BIAS_CORRECTIONS)}.")
    if not paths:
      raise UserError("LAPQ: no layer to quantize (paths is empty).")
    self.model = model
    self.variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    self.paths = list(paths)
    self.quantize_weights, self.quantize_acts = quantize_weights, quantize_acts
    self.axis = -1 if granularity == "channel" else None
    self.weight_grid, self.dorefa = weight_grid, dorefa
    self.bias_correction = BIAS_CORRECTIONS.index(bias_correction)
    self.data = _calibration_arrays(calibration, chunk_size)
    self.kernels = {}
    for p in self.paths:
      k = tree_paths.leaf(self.variables["params"], p)
      self.kernels[p] = Q.tanh_normalize(k) if dorefa else k
    self.acts: dict[str, np.ndarray] = {}
    self.act_grids: dict[str, str] = {}
    if quantize_acts:
      recording = self.variables
      if dorefa:
        recording = dict(self.variables, quant=dorefa_normalization(self.paths))
      self.acts = record_activations(model, recording, list(self.data["image"]), self.paths, max_act_values)
      self.act_grids = {p: (act_grids or {}).get(p) or act_grid(v)
                        for p, v in self.acts.items()}
    self.objective = jax.jit(self._loss)  # the one compiled function (count: self.objective._cache_size())

  # -- inside the compiled loss ------------------------------------------------------------

  def _loss(self, variables: dict, data: dict, x: jax.Array, profiles: dict, bits: jax.Array) -> jax.Array:
    """Mean calibration cross-entropy with weight steps profile·e^x[i] and activation steps e^x[n+i]."""
    steps = jnp.exp(jnp.clip(x, -_LOG_CLIP, _LOG_CLIP))
    n = len(self.paths)
    layers = {}
    for i, p in enumerate(self.paths):
      layers[p] = LayerQuant(
          w_bits=bits if self.quantize_weights else jnp.zeros_like(bits), w_step=profiles[p] * steps[i],
          w_tanh=True if self.dorefa else None, w_bias_corr=self.bias_correction or None,
          a_bits=bits if self.quantize_acts else None, a_step=steps[n + i] if self.quantize_acts else None)
    q = quant_collection(None, layers)

    def one(chunk):
      logits = self.model.apply({**variables, "quant": q}, chunk["image"])
      return classification_sums(logits.astype(jnp.float32), chunk["label"], chunk["mask"])

    sums = jax.lax.map(one, data)
    return jnp.sum(sums["loss"]) / jnp.maximum(jnp.sum(sums["count"]), 1.0)

  # -- host side ---------------------------------------------------------------------------

  def lp_point(self, bits: int, p: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(x, profiles): the flat log-step vector and per-layer weight profiles of the Lp-optimal steps at `p`."""
    w_logs, profiles, a_logs = [], {}, []
    for path, k in self.kernels.items():
      s = np.asarray(Q.lp_step(k, bits, p, self.weight_grid, axis=self.axis), np.float64)
      g = float(np.exp(np.mean(np.log(s))))  # the layer's (geometric-mean) step; per tensor, the step
      w_logs.append(np.log(g))
      profiles[path] = np.asarray(s / g, np.float32)
    for path in self.paths if self.quantize_acts else ():
      a_logs.append(np.log(float(Q.lp_step(self.acts[path], bits, p, self.act_grids[path]))))
    return np.asarray(w_logs + a_logs, np.float32), profiles

  def loss(self, x: np.ndarray, profiles: dict, bits: int) -> float:
    """The calibration loss at the flat log-step vector `x` (the compiled objective)."""
    v = self.objective(self.variables, self.data, jnp.asarray(x, jnp.float32), profiles, jnp.asarray(bits, jnp.int32))
    return float(v)

  def steps_of(self, x: np.ndarray, profiles: dict) -> dict[str, dict[str, Any]]:
    """{path: {'w': step, 'a': step or None}} from a flat log-step vector."""
    n, out = len(self.paths), {}
    steps = np.exp(np.clip(np.asarray(x, np.float64), -_LOG_CLIP, _LOG_CLIP))
    for i, p in enumerate(self.paths):
      w = profiles[p] * np.float32(steps[i])
      out[p] = {"w": np.float32(w) if w.ndim == 0 else np.asarray(w, np.float32),
                "a": np.float32(steps[n + i]) if self.quantize_acts else None}
    return out

  def run(self, bits: int, *, ps: Sequence[float] = DEFAULT_PS, iterations: int = 2, max_evals: int | None = None,
          progress: bool | Callable[[str], Any] = False, desc: str = "LAPQ") -> LapqResult:
    """LAPQ at `bits`: Lp steps for each p, p* by the quadratic fit, then Powell; the best point seen."""
    from scipy import optimize

    if not whole_bits(bits):
      raise UserError(f"LAPQ: bits {bits} is outside 2…16 (whole numbers).")
    if iterations < 1:
      raise UserError(f"LAPQ: iterations must be ≥ 1 (Powell iterations), got {iterations}.")
    if not ps or any(not float(p) > 0 for p in ps):
      raise UserError(f"LAPQ: the p values {tuple(ps)} must be > 0.")
    bits = int(bits)
    t0 = time.perf_counter()
    p_losses = {}
    for p in ps:
      x, prof = self.lp_point(bits, float(p))
      p_losses[float(p)] = self.loss(x, prof, bits)
    p_star = fit_p(list(p_losses), list(p_losses.values()))
    x0, profiles = self.lp_point(bits, p_star)
    init_loss = self.loss(x0, profiles, bits)
    best = {"f": init_loss, "x": x0.astype(np.float64)}
    searched = np.ones(len(x0), bool)
    if not self.quantize_weights:  # weight steps are not searched when weights stay float
      searched[:len(self.paths)] = False
    idx = np.flatnonzero(searched)
    count = [0]
    bar = None
    if progress is True:
      from tqdm.auto import tqdm
      bar = tqdm(desc=f"{desc}: Powell over {len(idx)} log-steps", unit="eval", leave=False, dynamic_ncols=True)

    def f(z):
      x = best["x"].copy()
      x[idx] = z
      v = self.loss(x, profiles, bits)
      count[0] += 1
      if not np.isfinite(v):
        v = 1e6
      if v < best["f"]:
        best["f"], best["x"] = v, x
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{best['f']:.4f}")
      return v

    options = {"maxiter": int(iterations)}
    if max_evals is not None:
      options["maxfev"] = int(max_evals)
    start = best["x"][idx].copy()
    optimize.minimize(f, start, method="Powell", options=options)
    if bar is not None:
      bar.close()
    seconds = time.perf_counter() - t0
    result = LapqResult(bits=bits, steps=self.steps_of(best["x"], profiles), p_star=p_star, p_losses=p_losses,
                        init_loss=init_loss, loss=best["f"], evaluations=count[0], seconds=seconds)
    if progress:
      line = (f"{desc}: p*={p_star:.2f}, calibration loss {init_loss:.4f} (Lp) → {best['f']:.4f} (Powell, "
              f"{count[0]} evaluations, {seconds:.0f} s)")
      (progress if callable(progress) else print)(line)
    return result


def lapq(model, variables: dict, calibration: Mapping | Iterable[Mapping], paths: Sequence[str], bits: int,
         **kwargs) -> LapqResult:
  """One-shot LAPQ: ``Lapq(model, variables, calibration, paths, ...).run(bits, ...)``.

  Keyword arguments go to `Lapq` (quantize_acts, granularity, ...) or to `Lapq.run` (ps, iterations, ...).
  """
  run_keys = {"ps", "iterations", "max_evals", "progress", "desc"}
  run_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in run_keys}
  return Lapq(model, variables, calibration, paths, **kwargs).run(bits, **run_kw)


GRID_OPTIONS = ("ps", "iterations", "max_evals", "progress", "chunk_size")


def iter_grid_steps(model, variables: dict, grid, paths: Sequence[str], calibration: Mapping | Iterable[Mapping],
                    *, options: Mapping[str, Any] | None = None, dorefa: bool = False
                    ) -> Iterator[tuple[int, LapqResult]]:
  """`grid_steps` one bit-width at a time: yields (bits, result) as each search finishes."""
  options = dict(options or {})
  unknown = set(options) - set(GRID_OPTIONS)
  if unknown:
    raise UserError(f"LAPQ options: unknown {', '.join(sorted(unknown))}; use {', '.join(GRID_OPTIONS)}.")
  quantize_w = any(t in ("weights", "both") for t in grid.targets)
  quantize_a = any(t in ("activations", "both") for t in grid.targets)
  chunk_size = options.pop("chunk_size", 128)
  runner = Lapq(model, variables, calibration, paths, quantize_weights=quantize_w, quantize_acts=quantize_a,
                granularity=grid.granularity,
                weight_grid=Q.picking_grid(grid.weight_grid), dorefa=dorefa,
                bias_correction=grid.bias_correction, chunk_size=chunk_size)
  target = "W{b}/A{b}" if quantize_w and quantize_a else ("A{b}" if quantize_a else "W{b}")
  for b in grid.bits:  # lazily: a caller may keep each search as it finishes (cached_grid_steps)
    yield int(b), runner.run(int(b), desc="LAPQ " + target.format(b=b), **options)


def grid_steps(model, variables: dict, grid, paths: Sequence[str], calibration: Mapping | Iterable[Mapping], *,
               options: Mapping[str, Any] | None = None, dorefa: bool = False) -> dict[int, LapqResult]:
  """LAPQ at every bit-width of a robustness grid (`kure_jax.evaluation.robustness.Grid`), run before the sweep:
  ``Sweep(..., lapq_steps={b: r.steps for b, r in results.items()})`` then sweeps them over ratios and policies.

  One run per bit-width serves every target of the grid: it searches the weight steps if any target quantizes
  weights and the activation steps if any quantizes activations (the widest target). The grid's granularity,
  weight grid (DoReFa's sliding grid picks on its midrise levels) and bias correction hold while searching; each
  activation's grid follows its recorded input (`calibration.act_grid`), as in the sweep. `options`: `Lapq.run`'s
  ps, iterations, max_evals, progress, and chunk_size (images per forward pass).
  """
  return dict(iter_grid_steps(model, variables, grid, paths, calibration, options=options, dorefa=dorefa))


# -- a cache of LAPQ's results: one search serves every evaluation of the same weights and settings ----------


def _result_json(r: LapqResult) -> dict[str, Any]:
  steps = {p: {"w": np.asarray(s["w"], np.float32).tolist(), "a": None if s["a"] is None else float(s["a"])}
           for p, s in r.steps.items()}
  return {"bits": r.bits, "steps": steps, "p_star": r.p_star, "p_losses": {str(k): v for k, v in r.p_losses.items()},
          "init_loss": r.init_loss, "loss": r.loss, "evaluations": r.evaluations, "seconds": r.seconds}


def _result_of(d: Mapping[str, Any]) -> LapqResult:
  steps = {p: {"w": np.asarray(s["w"], np.float32), "a": None if s["a"] is None else np.float32(s["a"])}
           for p, s in d["steps"].items()}
  return LapqResult(bits=int(d["bits"]), steps=steps, p_star=float(d["p_star"]),
                    p_losses={float(k): float(v) for k, v in d["p_losses"].items()}, init_loss=float(d["init_loss"]),
                    loss=float(d["loss"]), evaluations=int(d["evaluations"]), seconds=float(d["seconds"]))


def cache_key(variables: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
  """A SHA-256 of the weights (params and batch statistics, every leaf's path, dtype, shape and bytes) and of the
  settings that shape LAPQ's search (JSON): the same key means the same search."""
  h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
  for part in ("params", "batch_stats"):
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(variables.get(part, {})),
                             key=lambda t: jax.tree_util.keystr(t[0])):
      a = np.asarray(leaf)
      h.update(f"{part}{jax.tree_util.keystr(path)}{a.dtype}{a.shape}".encode())
      h.update(a.tobytes())
  return h.hexdigest()


def cached_grid_steps(cache_dir: str | None, key: str, grid,
                      run: Callable[[Any], Iterable[tuple[int, LapqResult]]]) -> dict[int, LapqResult]:
  """`run(grid)` (e.g. `iter_grid_steps` with its other arguments bound: (bits, result) pairs) for the bit-widths
  of `grid` that ``cache_dir/<key>.json`` does not hold yet, the others read from it. Each new result is added to
  the file (written atomically) as soon as its search finishes, so a killed evaluation keeps the searches it
  finished. No cache_dir: `run(grid)`."""
  if not cache_dir:
    return dict(run(grid))
  path = os.path.join(cache_dir, f"{key}.json")
  stored: dict[str, Any] = {}
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
  out = {int(b): _result_of(stored[str(b)]) for b in grid.bits if str(b) in stored}
  missing = tuple(b for b in grid.bits if int(b) not in out)
  if missing:
    os.makedirs(cache_dir, exist_ok=True)
    for b, r in run(dataclasses.replace(grid, bits=missing)):
      out[int(b)] = r
      stored[str(int(b))] = _result_json(r)
      tmp = f"{path}.tmp{os.getpid()}"
      with open(tmp, "w") as f:
        json.dump(stored, f)
      os.replace(tmp, path)
  return {int(b): out[int(b)] for b in grid.bits}
