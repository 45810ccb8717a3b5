"""Score one set of weights on a whole grid of quantizers in one compiled call.

A grid is bit-widths × step ratios (Δ = ratio · Δ̃) × step rounding policies × base step
methods × what is quantized (weights, activations, both). Every point becomes a
``"quant"`` collection for the models' quantization hook (see `kure_jax.models.layers`),
built *inside* the compiled function from arrays: the base steps Δ̃ of every layer are
computed there for every bit-width (bits are traced), and one `jit` compilation scores
every grid point on every batch, each batch read once; every checkpoint of the same architecture
on the same grid shares that compilation (`_Plan`). Which layers are quantized
follows KURE's default (stem and classifier stay in float) and is configurable.

Inside the compiled function the points run one after another (`lax.map`), `chunk`
at a time under `vmap`. One at a time is the default because it is measured fastest
on CPU (benchmarks/sweep.py): each point runs at 1.15× the speed of a float forward
pass, while `vmap` over points turns every conv into a grouped conv with a batch of
kernels, which XLA:CPU runs 8× slower. On GPU/TPU a larger chunk may pay; measure.

Base-step method "lapq" (loss-aware PTQ, `kure_jax.evaluation.lapq`) is not a function of one layer's
tensor: its steps come from a Powell search over the whole model's calibration loss, run
before the sweep (`kure_jax.evaluation.lapq.grid_steps`), once per bit-width of the grid, and enter the
compiled function as a precomputed table (``Sweep(..., lapq_steps=...)``), so LAPQ steps are
swept over ratios and policies like any other Δ̃. One LAPQ run serves every target of the
grid: it quantizes the weights if any target quantizes weights and the activations if any target quantizes activations (the widest target),
so in a grid with 'weights' and 'both' the weight-only points use the weight steps LAPQ found
together with the activation steps.

The metric is the task's (`kure_jax.tasks.Task`, ``task=``): every model call takes
``task.inputs(batch)``, every point sums ``task.eval_sums`` and each row reports ``task.summarize``
(classification: top-1/top-5 in % and the loss; ranking, NCF on MovieLens: HR@10, NDCG@10 and the loss),
plus the task's exact counts (``task.exact``: 'correct' top-1 hits, or ranking 'hits'). The grid, the
step tables and the single compilation are the same for every task.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kure_jax import qat as qat_lib
from kure_jax import tree_paths
from kure_jax._checks import whole_bits
from kure_jax.calibration import act_grid, record_activations
from kure_jax.core import formats as formats_lib
from kure_jax.core import quant as Q
from kure_jax.core.kurtosis import select_kernels
from kure_jax.errors import UserError
from kure_jax.evaluation import step_providers
from kure_jax.models.layers import BIAS_CORRECTIONS, DEFAULT_WEIGHT_GRID, LayerQuant, quant_collection
from kure_jax.tasks import CLASSIFICATION, Task

POLICIES = ("exact", "pow2_nearest", "pow2_floor", "pow2_ceil")
METHODS = ("mse", "max", "aciq_gauss", "aciq_laplace", "learned", "lapq")  # learned: a QAT checkpoint's own steps
TARGETS = ("weights", "activations", "both")
GRANULARITIES = ("tensor", "channel")
DOREFA_MODES = ("symmetric", "sliding")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grid:
  """The quantizer settings to score; the sweep covers their full cartesian product."""

  bits: tuple[int, ...] = (2, 3, 4, 8)
  ratios: tuple[float, ...] = (1.0,)
  policies: tuple[str, ...] = ("exact",)
  methods: tuple[str, ...] = ("mse",)
  targets: tuple[str, ...] = ("weights",)
  granularity: str = "tensor"       # weight steps per tensor or per output channel
  weight_grid: str = DEFAULT_WEIGHT_GRID  # must match the model's weight_grid
  bias_correction: str = "none"     # none | mean | mean_std: per output channel, restore the float mean (and std)
  dorefa_mode: str = "symmetric"    # DoReFa checkpoints: symmetric (Δ = ratio·Δ̃, weights and activations) |
                                    # sliding (the KURE authors': weights only, Δ = Δ̃/ratio on the 'sliding' grid)
  formats: tuple[str, ...] = ()     # number formats of kure_jax.core.formats (fp8_e4m3, mxfp4, nvfp4, int4, …): more points,
                                    # each format at its max scaling × ratio, beside the integer-grid points of `bits`

  def validate(self) -> "Grid":
    """Raise UserError (one line) for a setting that cannot work; return self."""
    def choose(name, values, allowed):
      if not values:
        raise UserError(f"grid.{name} is empty.")
      for v in values:
        if v not in allowed:
          raise UserError(f"grid.{name}: unknown {v!r}; choose from {', '.join(allowed)}.")
    for b in self.bits:
      if not whole_bits(b):
        raise UserError(f"grid.bits: {b} is outside 2…16 (whole numbers).")
    if not self.bits and not self.formats:
      raise UserError("grid.bits is empty (and there are no grid.formats).")
    for r in self.ratios:
      if not float(r) > 0:
        raise UserError(f"grid.ratios: {r} must be > 0 (Δ = ratio · Δ̃).")
    if not self.ratios:
      raise UserError("grid.ratios is empty.")
    choose("policies", self.policies, POLICIES)
    choose("methods", self.methods, METHODS)
    choose("targets", self.targets, TARGETS)
    choose("granularity", (self.granularity,), GRANULARITIES)
    choose("weight_grid", (self.weight_grid,), Q.GRIDS)
    choose("bias_correction", (self.bias_correction,), BIAS_CORRECTIONS)
    choose("dorefa_mode", (self.dorefa_mode,), DOREFA_MODES)
    for f in self.formats:
      if f not in formats_lib.FORMATS:
        raise UserError(f"grid.formats: unknown {f!r}; choose from {', '.join(formats_lib.FORMATS)}.")
    if self.formats and self.dorefa_mode == "sliding":
      raise UserError("grid.formats cannot be combined with dorefa_mode 'sliding' (a DoReFa grid of its own).")
    if (self.dorefa_mode == "sliding") != (self.weight_grid == "sliding"):
      raise UserError("grid.dorefa_mode 'sliding' goes with weight_grid 'sliding' (and only it): the authors' DoReFa "
                      "perturbation slides the grid.")
    return self

  def points(self) -> list[dict[str, Any]]:
    """One dict per grid point, in the order the sweep returns them: the integer-grid points (format ''), then
    the number-format points (method 'max': each format's max scaling, bits 0)."""
    ints = [dict(format="", bits=b, ratio=r, policy=p, method=m, target=t)
            for m, t, p, b, r in itertools.product(self.methods, self.targets, self.policies, self.bits, self.ratios)]
    fmts = [dict(format=f, bits=0, ratio=r, policy=p, method="max", target=t)
            for t, p, f, r in itertools.product(self.targets, self.policies, self.formats, self.ratios)]
    return ints + fmts


_POW2 = {"pow2_nearest": jnp.round, "pow2_floor": jnp.floor, "pow2_ceil": jnp.ceil}


def _apply_policy(step: jax.Array, policy_id: jax.Array) -> jax.Array:
  """Δ, or Δ forced to a power of two (nearest in log2, floor, ceil), by a traced index into `POLICIES`."""
  e = jnp.log2(step)
  return jnp.select([policy_id == POLICIES.index(p) for p in _POW2], [2.0 ** f(e) for f in _POW2.values()], step)


def quantized_paths(params: dict, *, qat: dict[str, Any] | None = None, paths: Sequence[str] | None = None,
                    include=None, exclude=None, skip_stem: bool = True, skip_head: bool = True) -> list[str]:
  """The kernels a sweep quantizes: a QAT checkpoint's own, else `paths`, else `select_kernels`' choice."""
  if qat:
    return list(qat["paths"])
  if paths is not None:
    return list(paths)
  return list(select_kernels(params, include=include, exclude=exclude, skip_stem=skip_stem, skip_head=skip_head))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What the compiled scorer is specialized on: hashable and compared by value, so every `Sweep` of one
  architecture, grid, layer selection and task shares one plan and its compiled functions (`_compiled`);
  weights, activation samples, step tables and the grid's arrays are data."""

  model: Any
  task: Task
  grid: Grid
  paths: tuple[str, ...]
  act_grids: tuple[tuple[str, str], ...]  # (path, 'signed' | 'unsigned') of each recorded activation
  dorefa: bool
  qat_bits: tuple[int, int] | None        # a QAT checkpoint's trained (weight, activation) bits
  chunk: int
  sites: tuple[str, ...] = ()             # DoReFa in the authors' form: its ReLUs quantize the activations

  @property
  def pick_grid(self) -> str:
    """The grid weight steps are picked on (`quant.picking_grid`)."""
    return Q.picking_grid(self.grid.weight_grid)


@functools.lru_cache(maxsize=32)
def _compiled(plan: _Plan):
  """(base steps, batch sums) of `plan`, jit-compiled: one compilation per plan and input shapes, however many
  checkpoints are scored."""
  return jax.jit(functools.partial(_compute_base_steps, plan)), jax.jit(functools.partial(_batch_sums, plan))


def _compute_base_steps(plan: _Plan, params: dict, acts: dict, bits: jax.Array, lapq: dict, learned: dict) -> dict:
  """{'w'|'a': {path: steps[method, bits, (C)]}}: Δ̃ for every layer, method and bit-width."""
  grid = plan.grid
  act_grids = dict(plan.act_grids)
  kernels = {p: tree_paths.leaf(params, p) for p in plan.paths}
  if plan.dorefa:  # the weights DoReFa quantizes are the normalized ones
    kernels = {p: Q.tanh_normalize(k) for p, k in kernels.items()}
  channel = grid.granularity == "channel"
  tables = []
  for m in grid.methods:  # one step table per method, from its provider
    if m == "learned":
      tables.append(step_providers.learned_table(learned, plan.qat_bits, bits, kernels, list(acts), channel=channel))
    elif m == "lapq":  # precomputed on the host (`Sweep.__init__`)
      tables.append(lapq)
    else:
      tables.append(step_providers.statistic_table(m, kernels, acts, bits, weight_grid=plan.pick_grid,
                                                   act_grids=act_grids, channel=channel))
  out = step_providers.stack(tables)
  if grid.formats:  # each format's max scaling: (n_formats,) per tensor or (n_formats, 1, …, C) per channel
    fs = grid.formats
    out["wf"] = {p: formats_lib.max_scales(k, fs, channel_axis=-1 if channel else None)
                 for p, k in kernels.items()}
    out["af"] = {p: formats_lib.max_scales(v, fs) for p, v in acts.items()}
  return out


def _quant_for_point(plan: _Plan, base: dict, pt: dict) -> dict:
  """One grid point's "quant" collection, from the base-step tables and the point's (traced) settings."""
  grid = plan.grid
  layers = {}
  sliding = grid.dorefa_mode == "sliding"  # the authors' DoReFa perturbation: DoReFa's scale × ratio
  for p in plan.paths:
    w_base = base["w"][p][pt["method"], pt["bit_idx"]]
    w_step = _apply_policy(w_base / pt["ratio"] if sliding else w_base * pt["ratio"], pt["policy"])
    fmt = grid.formats != ()  # the number-format path of the hook (fmt −1: the integer grid above)
    named = dict.fromkeys(grid.formats, True) if fmt else None  # the hook computes only these formats' kinds
    spec = LayerQuant(
        w_bits=jnp.where(pt["w_on"], pt["bits"], 0), w_step=w_step,
        w_tanh=True if plan.dorefa else None,
        w_bias_corr=BIAS_CORRECTIONS.index(grid.bias_correction) if grid.bias_correction != "none" else None,
        w_fmt=jnp.where(pt["w_on"], pt["fmt"], -1) if fmt else None,
        w_scale=_apply_policy(base["wf"][p][pt["fmt_idx"]], pt["policy"]) if fmt else None,
        w_ratio=pt["ratio"] if fmt else None, w_formats=named)
    if p in base["a"]:
      a_ratio = 1.0 if sliding else pt["ratio"]  # sliding perturbs the weights only
      a_step = _apply_policy(base["a"][p][pt["method"], pt["bit_idx"]] * a_ratio, pt["policy"])
      spec = spec.replace(a_bits=jnp.where(pt["a_on"], pt["bits"], 0), a_step=a_step)
      if fmt:
        spec = spec.replace(a_fmt=jnp.where(pt["a_on"], pt["fmt"], -1),
                            a_scale=_apply_policy(base["af"][p][pt["fmt_idx"]], pt["policy"]), a_ratio=pt["ratio"],
                            a_formats=named)
    layers[p] = spec
  sites = {}
  if plan.sites:  # DoReFa's ReLUs: clamp [0, 1] and its fixed step 1/(2^M − 1) (× the ratio, symmetric mode)
    a_step = _apply_policy(qat_lib.dorefa_steps(pt["bits"])[1] * (1.0 if sliding else pt["ratio"]), pt["policy"])
    sites = {s: LayerQuant(a_bits=jnp.where(pt["a_on"], pt["bits"], 0), a_step=a_step) for s in plan.sites}
  return quant_collection(None, layers, sites)


def _batch_sums(plan: _Plan, variables: dict, base: dict, arrays: dict, batch: dict) -> dict:
  """The task's sums of one batch at every grid point (lax.map over points, `chunk` at a time)."""
  inputs = plan.task.inputs(batch)

  def one(pt):
    logits = plan.model.apply({**variables, "quant": _quant_for_point(plan, base, pt)}, *inputs)
    return plan.task.eval_sums(logits.astype(jnp.float32), batch)

  return jax.lax.map(one, arrays, batch_size=plan.chunk)


class Sweep:
  """Compiled scorer of one model on one grid.

  ``Sweep(model, variables, grid, calibration=...)`` prepares the grid arrays and the
  activation samples; ``score(batches)`` runs the single compiled function over the data
  and returns one row per grid point with the task's metrics: classification (the default
  `task`) top-1, top-5 (%), mean loss, 'correct' and 'count'; ranking (``task=tasks.RANKING``)
  hr@10, ndcg@10, mean loss, 'hits' and 'count' (users).

  `calibration` (needed when activations are quantized): batches of model input, each an image
  array or a batch dict, whose ``task.inputs`` feed the model (ranking: a few train batches).

  A QAT checkpoint passes ``qat=meta["quant"]`` (and its variables hold LSQ's 'qsteps'):
  its quantized layers are scored, DoReFa's weight normalization stays on at every point,
  and the base-step method "learned" rescales its trained steps to each bit-width
  (Δ_k = Δ_b·(2^b − 1)/(2^k − 1)), beside re-optimized ones ("mse", ...). A DoReFa checkpoint of the
  authors' form (``quant.dorefa_form='relus'``: its meta lists the ReLU 'sites', and `model` is built with
  ``dorefa_relus=True``) quantizes activations at those ReLUs, with DoReFa's fixed step 1/(2^M − 1) whatever
  the method, and needs no calibration; weight-only points keep them clamped to [0, 1], as the authors score.

  Method "lapq" takes LAPQ's steps, computed beforehand (`kure_jax.evaluation.lapq.grid_steps`, a minutes-long
  search that has no place in a constructor), as `lapq_steps`: {bits: {kernel path: {"w": step,
  "a": step or None}}} for every bit-width of the grid.
  """

  def __init__(self, model, variables: dict, grid: Grid, *, calibration: Iterable[np.ndarray] | None = None,
               include=None, exclude=None, skip_stem: bool = True, skip_head: bool = True,
               paths: Sequence[str] | None = None, chunk: int = 1, qat: dict[str, Any] | None = None,
               lapq_steps: Mapping[int, Mapping[str, Mapping[str, Any]]] | None = None,
               task: Task = CLASSIFICATION):
    self.grid = grid.validate()
    self.task = task
    self.model = model
    self.variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    self.qat = qat
    self.dorefa = bool(qat) and qat["method"] == "dorefa"
    if "learned" in grid.methods and not qat:
      raise UserError("grid.methods 'learned' needs a QAT checkpoint (trained with quant.method=dorefa or lsq).")
    if "lapq" in grid.methods:  # checked before anything compiles
      if not task.supports_lapq:
        raise UserError(f"grid.methods 'lapq' is not available for the {task.name!r} task: LAPQ's calibration loss "
                        "is the classification cross-entropy; use another method (mse, max, aciq_gauss, ...).")
      missing = sorted(set(grid.bits) - {int(b) for b in (lapq_steps or {})})
      if missing:
        raise UserError(f"grid.methods 'lapq' needs lapq_steps for every bit-width (missing: "
                        f"{', '.join(map(str, missing))}): run kure_jax.evaluation.lapq.grid_steps on labelled calibration data "
                        "(e.g. 512 train images) first.")
    if grid.dorefa_mode == "sliding" and not self.dorefa:
      raise UserError("grid.dorefa_mode 'sliding' is the authors' DoReFa perturbation: it needs a DoReFa checkpoint.")
    self.paths = quantized_paths(self.variables["params"], qat=qat, paths=paths, include=include, exclude=exclude,
                                 skip_stem=skip_stem, skip_head=skip_head)
    self._learned = qat_lib.learned_steps(qat, variables.get("qsteps", {})) if qat else {}
    self.points = grid.points()
    self.sites = tuple(qat.get("sites", ())) if qat else ()
    if self.sites and grid.formats:
      raise UserError("grid.formats: a DoReFa checkpoint of the authors' form (quantized ReLUs) is scored on its "
                      "own grids only; drop the formats.")
    needs_acts = any(t != "weights" for t in grid.targets) and not self.sites  # the sites need no calibration
    if needs_acts and calibration is None:
      raise UserError("grid.targets quantizes activations: pass calibration data (a few batches of model input).")
    if needs_acts and "learned" in grid.methods and any(v["a"] is None for v in self._learned.values()):
      raise UserError("grid.methods 'learned' with activations: this checkpoint learned no activation steps "
                      "(trained with quant.a_bits=0); use targets=('weights',) or another method.")
    recording = dict(self.variables, quant=qat_lib.dorefa_normalization(self.paths)) if self.dorefa else self.variables
    inputs = ([task.inputs(b) if isinstance(b, Mapping) else b for b in calibration] if needs_acts else [])
    acts = record_activations(model, recording, inputs, self.paths) if needs_acts else {}
    self.act_grids = {p: act_grid(v) for p, v in acts.items()}
    self._acts = {p: jnp.asarray(v) for p, v in acts.items()}
    bits = list(grid.bits) or [8]  # formats only: a placeholder bit-width for the (unused) integer step tables
    self._arrays = {
        "bits": jnp.asarray([pt["bits"] for pt in self.points], jnp.int32),
        "bit_idx": jnp.asarray([bits.index(pt["bits"]) if pt["bits"] else 0 for pt in self.points], jnp.int32),
        "ratio": jnp.asarray([pt["ratio"] for pt in self.points], jnp.float32),
        "policy": jnp.asarray([POLICIES.index(pt["policy"]) for pt in self.points], jnp.int32),
        "method": jnp.asarray([grid.methods.index(pt["method"]) if not pt["format"] else 0 for pt in self.points],
                              jnp.int32),
        # number formats: the index into formats.FORMATS the hook switches on (−1: the integer grid), and into
        # grid.formats for the scale tables
        "fmt": jnp.asarray([formats_lib.FORMATS.index(pt["format"]) if pt["format"] else -1 for pt in self.points],
                           jnp.int32),
        "fmt_idx": jnp.asarray([grid.formats.index(pt["format"]) if pt["format"] else 0 for pt in self.points],
                               jnp.int32),
        "w_on": jnp.asarray([pt["target"] in ("weights", "both") for pt in self.points]),
        "a_on": jnp.asarray([pt["target"] in ("activations", "both") for pt in self.points]),
    }
    self._bits = jnp.asarray(bits, jnp.int32)
    if chunk < 1:
      raise UserError(f"chunk must be ≥ 1 (grid points evaluated at once), got {chunk}.")
    self.chunk = min(chunk, len(self.points))
    self._plan = _Plan(model=model, task=task, grid=self.grid, paths=tuple(self.paths),
                       act_grids=tuple(sorted(self.act_grids.items())), dorefa=self.dorefa,
                       qat_bits=(int(qat["w_bits"]), int(qat["a_bits"] or qat["w_bits"])) if qat else None,
                       sites=self.sites,
                       chunk=self.chunk)
    self._base_steps, self._score_batch = _compiled(self._plan)  # shared by every sweep of this plan
    self._lapq = {}
    if "lapq" in grid.methods:
      kernels = {p: tree_paths.leaf(self.variables["params"], p) for p in self.paths}
      self._lapq = step_providers.precomputed_table(lapq_steps, self.grid.bits, kernels,
                                                    channel=self.grid.granularity == "channel",
                                                    with_acts=bool(self._acts))

  def _quant_for_point(self, base: dict, pt: dict) -> dict:
    """The "quant" collection of one grid point (traced inside the scorer; here for inspection)."""
    return _quant_for_point(self._plan, base, pt)

  # -- host side -------------------------------------------------------------------------

  def _placed_like(self, batch: dict) -> tuple[dict, dict, dict]:
    sharding = getattr(self.task.inputs(batch)[0], "sharding", None)
    variables, acts, arrays, lapq, learned = self.variables, self._acts, self._arrays, self._lapq, self._learned
    if isinstance(sharding, jax.sharding.NamedSharding):
      rep = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
      variables, acts, arrays, lapq, learned = jax.device_put((variables, acts, arrays, lapq, learned), rep)
    return variables, self._base_steps(variables["params"], acts, self._bits, lapq, learned), arrays

  def base_steps(self) -> dict:
    """{'w'|'a': {path: Δ̃[method, bits, (C)]}}: the base steps of every layer, method and bit-width."""
    return self._base_steps(self.variables["params"], self._acts, self._bits, self._lapq, self._learned)

  def score(self, batches: Iterable[dict], progress: Callable | None = None) -> list[dict[str, Any]]:
    """Run every batch once through the compiled scorer; rows of the grid with metrics."""
    totals, placed = None, None
    it = batches if progress is None else progress(batches)
    for batch in it:
      if placed is None:  # weights, steps and grid go wherever the batches are (replicated over their mesh)
        placed = self._placed_like(batch)
      variables, base, arrays = placed
      sums = self._score_batch(variables, base, arrays, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    t = jax.device_get(totals)
    rows = []
    for i, pt in enumerate(self.points):
      point = {k: v[i] for k, v in t.items()}
      metrics = self.task.summarize(point)
      count = metrics.pop("count")
      rows.append({**pt, **metrics, **self.task.exact(point), "count": count})
    return rows
