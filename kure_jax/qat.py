"""Quantization-aware training: DoReFa and LSQ, both through the models' quantization hook.

Nothing here forks a model: a QAT method is a rule that turns the latent float weights'
companions (LSQ's learned steps, DoReFa's fixed ones) into the ``"quant"`` collection
that every `QConv`/`QDense` reads at apply time (see `kure_jax.models.layers`).

- DoReFa (Zhou et al. 2016): weights w̃ = tanh(w) / max|tanh w| ∈ [−1, 1] quantized on
  2^M levels (the midrise grid with Δ = 2/(2^M − 1), which is exactly DoReFa's
  2·round((w̃+1)/2 · (2^M−1))/(2^M−1) − 1); activations clipped to [0, 1] on 2^M levels
  (the unsigned grid with Δ = 1/(2^M − 1)); straight-through gradients.
- LSQ (Esser et al. 2019): a learned step per layer for weights (signed grid) and for
  activations (unsigned after ReLU); the step's gradient is LSQ's (−v + round(v) inside
  the range, the clip level outside) times g = 1/√(N·Q_P), N the number of weights of the
  layer or of input features per example; initial step 2·mean|x|/√Q_P.

KURE during QAT regularizes the latent float weights (the params), as the authors do.
The learned steps live in the train state (``state.qsteps``) and so in checkpoints,
with the method and bit-widths in the checkpoint metadata; the robustness evaluator's
``"learned"`` base-step method rescales them to other bit-widths by the authors' rule
Δ_k = Δ_b · (2^b − 1)/(2^k − 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kure_jax import models as models_lib
from kure_jax import tree_paths
from kure_jax._checks import whole_bits
from kure_jax.calibration import act_grid
from kure_jax.core import quant as Q
from kure_jax.core.kurtosis import kernel_selection, select_kernels
from kure_jax.errors import UserError
from kure_jax.models.layers import INTERMEDIATES, LayerQuant, QReLU, quant_collection

METHODS = ("none", "dorefa", "lsq")
DOREFA_FORMS = ("inputs", "relus")  # where DoReFa quantizes activations: the quantized layers' inputs | every ReLU
MIN_STEP = 1e-8  # learned steps are kept above this (an SGD step could push one through zero)


@dataclasses.dataclass(frozen=True)
class QatSpec:
  """What a QAT run quantizes and how: static, so it can shape a jitted step."""

  method: str
  w_bits: int
  a_bits: int                       # 0: activations stay in float
  paths: tuple[str, ...]            # kernel paths of the quantized layers
  act_grids: dict[str, str]         # each layer's input grid: 'unsigned' after a ReLU
  w_counts: dict[str, int]          # N for LSQ's weight gradient scale
  a_counts: dict[str, int]          # input features per example, N for the activation scale
  weight_grid: str                  # the model's weight grid (DoReFa: midrise)
  sites: tuple[str, ...] = ()       # DoReFa in the authors' form: the ReLUs (`QReLU`) that quantize activations

  def meta(self) -> dict[str, Any]:
    """The JSON-able record a checkpoint keeps (what the evaluator needs to score it)."""
    out = {"method": self.method, "w_bits": self.w_bits, "a_bits": self.a_bits, "paths": list(self.paths),
           "act_grids": dict(self.act_grids)}
    if self.sites:
      out["sites"] = list(self.sites)
    return out


def validate(config: ml_collections.ConfigDict) -> None:
  """One readable line for a bad ``config.quant``."""
  q = config.get("quant")
  if q is None:
    return
  if q.method not in METHODS:
    raise UserError(f"config.quant.method is {q.method!r}; choose one of {', '.join(METHODS)}.")
  if q.method == "none":
    return
  for field, lo in (("w_bits", 2), ("a_bits", 0)):
    b = q[field]
    if not (b == 0 and lo == 0 or whole_bits(b)):
      also = " (0 keeps activations in float)" if lo == 0 else ""
      raise UserError(f"config.quant.{field} is {b}; QAT needs whole bits in 2…16{also}.")
  grid = dict(config.get("model_kwargs", {})).get("weight_grid")
  if q.method == "dorefa" and grid not in (None, "midrise"):
    raise UserError(f"config.model_kwargs.weight_grid={grid!r} does not fit DoReFa, whose weights sit on the "
                    "midrise grid; leave it unset.")
  form = q.get("dorefa_form", "inputs")
  if form not in DOREFA_FORMS:
    raise UserError(f"config.quant.dorefa_form is {form!r}; choose one of {', '.join(DOREFA_FORMS)}.")
  if form == "relus" and q.method != "dorefa":
    raise UserError("config.quant.dorefa_form='relus' is DoReFa's model form; it needs quant.method=dorefa.")
  model_class = models_lib.ALL_MODELS.get(config.get("model"))
  if form == "relus" and model_class is not None and not hasattr(model_class, "dorefa_relus"):
    raise UserError(f"config.quant.dorefa_form='relus' needs a model whose ReLUs can be DoReFa's (the ResNets); "
                    f"{config.model} has none: use dorefa_form=inputs.")


def method(config: ml_collections.ConfigDict) -> str:
  q = config.get("quant")
  return "none" if q is None else q.method


def selection(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The layers QAT quantizes: `select_kernels` keywords from ``config.quant`` (`kurtosis.kernel_selection`)."""
  return kernel_selection(config.quant)


def make_spec(config: ml_collections.ConfigDict, model, variables: dict, images: np.ndarray) -> QatSpec:
  """The QatSpec of `config` for `model`: selected layers, their input grids and sizes (one batch)."""
  params = variables["params"]
  paths = tuple(select_kernels(params, **selection(config)))
  inputs = layer_inputs(model, variables, images, paths)
  act_grids = {p: act_grid(x) for p, x in inputs.items()}
  kernels = select_kernels(params, include=None, exclude=None, skip_stem=False, skip_head=False)
  return QatSpec(method=config.quant.method, w_bits=int(config.quant.w_bits), a_bits=int(config.quant.a_bits),
                 paths=paths, act_grids=act_grids, w_counts={p: int(kernels[p].size) for p in paths},
                 a_counts={p: int(np.prod(x.shape[1:])) for p, x in inputs.items()},
                 weight_grid=models_lib.weight_grid(models_lib.model_kwargs(config)),
                 sites=relu_sites(model, variables, images) if getattr(model, "dorefa_relus", False) else ())


def relu_sites(model, variables: dict, images: np.ndarray) -> tuple[str, ...]:
  """The module paths of a model's DoReFa ReLUs (`QReLU`: 'relu1', 'layer1_0/relu2', ...), in call order."""
  _, state = model.apply({"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}, images,
                         capture_intermediates=lambda mdl, _: isinstance(mdl, QReLU), mutable=[INTERMEDIATES])
  out: list[str] = []

  def walk(node, prefix):
    for k, v in node.items():
      if k == "__call__":
        out.append("/".join(prefix))
      elif isinstance(v, Mapping):
        walk(v, prefix + [k])

  walk(state[INTERMEDIATES], [])
  return tuple(out)


def layer_inputs(model, variables: dict, images: np.ndarray, paths: Sequence[str]) -> dict[str, jax.Array]:
  """The input each selected layer receives for `images` (eval mode, float)."""
  _, inter = model.apply({"params": variables["params"], "batch_stats": variables.get("batch_stats", {})},
                         images, mutable=[INTERMEDIATES])
  return {p: tree_paths.sown_input(inter[INTERMEDIATES], p) for p in paths}


def dorefa_steps(bits: jax.Array | int) -> tuple[jax.Array, jax.Array]:
  """DoReFa's fixed (weight, activation) steps: 2/(2^M − 1) on [−1, 1], 1/(2^M − 1) on [0, 1]."""
  n = 2.0 ** jnp.asarray(bits, jnp.float32) - 1.0
  return 2.0 / n, 1.0 / n


def lsq_qp(bits: jax.Array | int, grid: str) -> jax.Array:
  """Q_P, LSQ's number of positive levels: 2^(M−1) − 1 signed, 2^M − 1 unsigned."""
  return Q.levels(bits, grid)[1]


def lsq_scale(n: int, bits: int, grid: str) -> float:
  """LSQ's gradient scale g = 1/√(N·Q_P) (a static number: N and the bits are known when tracing)."""
  with jax.ensure_compile_time_eval():  # a Python number even while a train step is being traced
    qp = float(lsq_qp(bits, grid))
  return float(1.0 / np.sqrt(n * qp))


def lsq_init(x: jax.Array, bits: int, grid: str) -> jax.Array:
  """LSQ's initial step 2·mean|x|/√Q_P."""
  return 2.0 * jnp.mean(jnp.abs(x)) / jnp.sqrt(lsq_qp(bits, grid))


def init_steps(spec: QatSpec, model, variables: dict, images: np.ndarray) -> dict:
  """The learned parameters a QAT method starts from: LSQ's steps (from one batch), else {}."""
  if spec.method != "lsq":
    return {}
  kernels = select_kernels(variables["params"], include=None, exclude=None, skip_stem=False, skip_head=False)
  inputs = layer_inputs(model, variables, images, spec.paths) if spec.a_bits else {}
  out = {}
  for p in spec.paths:
    entry = {"w_step": lsq_init(kernels[p], spec.w_bits, spec.weight_grid)}
    if spec.a_bits:
      entry["a_step"] = lsq_init(inputs[p], spec.a_bits, spec.act_grids[p])
    out[p] = entry
  return out


def quant_for_training(spec: QatSpec, qsteps: dict) -> dict:
  """The 'quant' collection of a QAT forward pass (LSQ's gradient scale applied to its steps)."""
  if spec.method == "none":
    return {}
  layers = {}
  for p in spec.paths:
    if spec.method == "dorefa":
      w_step, a_step = dorefa_steps(spec.w_bits)[0], dorefa_steps(spec.a_bits)[1] if spec.a_bits else None
      a_step = None if spec.sites else a_step  # the authors' form quantizes at the ReLUs instead
      tanh = jnp.asarray(True)
    else:
      s = qsteps[p]
      w_step = Q.grad_scale(jnp.maximum(s["w_step"], MIN_STEP), lsq_scale(spec.w_counts[p], spec.w_bits, spec.weight_grid))
      a_step = None
      if spec.a_bits:
        g = lsq_scale(spec.a_counts[p], spec.a_bits, spec.act_grids[p])
        a_step = Q.grad_scale(jnp.maximum(s["a_step"], MIN_STEP), g)
      tanh = None
    layers[p] = LayerQuant(w_bits=spec.w_bits, w_step=w_step, w_tanh=tanh,
                           a_bits=spec.a_bits if a_step is not None else None, a_step=a_step)
  sites = {}
  if spec.sites and spec.a_bits:  # DoReFa's activations at every ReLU: clamp [0, 1], 2^M levels
    sites = {s: LayerQuant(a_bits=spec.a_bits, a_step=dorefa_steps(spec.a_bits)[1]) for s in spec.sites}
  return quant_collection(None, layers, sites)


def dorefa_normalization(paths: Sequence[str]) -> dict:
  """The 'quant' collection that only normalizes the weights at `paths` as DoReFa does (tanh(w)/max|tanh w|):
  what a DoReFa model's layers see, quantized or not (e.g. while recording calibration activations)."""
  return quant_collection(None, {p: LayerQuant(w_tanh=True) for p in paths})


def learned_steps(meta: dict[str, Any], qsteps: dict) -> dict[str, dict[str, jax.Array]]:
  """{path: {'w': Δ_w, 'a': Δ_a}} at the trained bit-widths of a QAT checkpoint (DoReFa's are fixed)."""
  out = {}
  for p in meta["paths"]:
    if meta["method"] == "dorefa":
      w, a = dorefa_steps(meta["w_bits"])[0], dorefa_steps(meta["a_bits"] or meta["w_bits"])[1]
    else:
      w = jnp.maximum(jnp.asarray(qsteps[p]["w_step"]), MIN_STEP)
      a = jnp.maximum(jnp.asarray(qsteps[p]["a_step"]), MIN_STEP) if "a_step" in qsteps[p] else None
    out[p] = {"w": w, "a": a}
  return out


def rescale_step(step: jax.Array, trained_bits: int, bits: jax.Array) -> jax.Array:
  """The authors' rule for another bit-width: keep the clipping range, Δ_k = Δ_b·(2^b − 1)/(2^k − 1)."""
  return step * (2.0 ** trained_bits - 1.0) / (2.0 ** jnp.asarray(bits, jnp.float32) - 1.0)
