"""NeuMF (He et al., "Neural Collaborative Filtering", WWW 2017) built from the quantization-hooked layers.

Two towers over (user, item) ids, fused by one dense layer into a logit (apply a sigmoid for the
probability; train with sigmoid binary cross-entropy):

* GMF: user and item embeddings of size `factors`, multiplied elementwise;
* MLP: user and item embeddings of size ``mlp_layers[0] // 2`` each, concatenated (width mlp_layers[0]),
  then dense + ReLU layers of widths ``mlp_layers[1:]``;
* prediction: a dense layer from [GMF, MLP] to one logit.

Defaults are the paper's (factors 8, MLP 64-32-16-8) and so are the initializers (its Keras code:
N(0, 0.01²) embeddings, Glorot-uniform MLP layers, LeCun-uniform prediction layer, zero biases). Module
names are those of the reference NeuMF.py ('mf_embedding_user', 'mlp_embedding_item', ..., 'layer1'..,
'prediction'), so its Keras weights map by name.

Quantization. Every dense layer is a `QDense`: its kernel and its input go through the hook, like the conv
nets'. Embedding tables are weights too, but their "input" is a one-hot id, which needs no quantizer; with
``quantize_embeddings=True`` each table is named 'kernel' (so `kernel_leaves`, `select_kernels` and
`quant_collection` see it as a dense kernel of shape (ids, features)) and passes through the hook's weight
quantizers only (`quant_weight`: w_tanh, w_bits/w_step/w_bias_corr, w_fmt/w_scale/w_ratio; per-channel
steps run along the features axis, block formats along the ids). It sows no "input" and ignores a_* entries.
With the default False the tables are named 'embedding' and stay in float, invisible to KURE and sweeps.

Kurtosis selection (`kure_jax.core.kurtosis.select_kernels`) with the default skip_stem/skip_head: the stem is
'layer1' (the first dense layer in name order), the head is 'prediction'.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kure_jax.models.layers import DEFAULT_WEIGHT_GRID, LayerQuant, QDense

embedding_init = nn.initializers.normal(stddev=0.01)
mlp_init = nn.initializers.glorot_uniform()
prediction_init = nn.initializers.lecun_uniform()


def quant_weight(mdl: nn.Module, kernel: jax.Array, *, weight_grid: str) -> jax.Array:
  """The weight half of `kure_jax.models.layers.quant_hook`, for tables, whose input is a one-hot id: the hook
  itself would sow and quantize an input there is none of."""
  return LayerQuant.read(mdl).quantize_weight(kernel, weight_grid)


class QEmbed(nn.Module):
  """An embedding table (ids, features); with `quantize`, named 'kernel' and weight-quantized by the hook."""

  num_embeddings: int
  features: int
  quantize: bool = False
  weight_grid: str = DEFAULT_WEIGHT_GRID
  embedding_init: Any = embedding_init
  dtype: Any = None

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
      raise ValueError(f"{self.name}: ids must be integers, got {jnp.asarray(ids).dtype}.")
    table = self.param("kernel" if self.quantize else "embedding", self.embedding_init,
                       (self.num_embeddings, self.features))
    if self.quantize:
      table = quant_weight(self, table, weight_grid=self.weight_grid)
    out = jnp.take(table, ids, axis=0)  # out-of-range ids give NaN (jnp.take's 'fill' mode), not a clamped row
    return out.astype(self.dtype) if self.dtype is not None else out


class NeuMF(nn.Module):
  """NeuMF: ``model.apply(variables, user, item)`` -> float32 logits of the broadcast shape of user and item.

  user, item: integer ids of any broadcastable shapes, e.g. users [U, 1] and candidate items [U, 100].
  `train` is accepted for the zoo's calling convention; NeuMF has no dropout or batch statistics.
  num_classes: 1 (one logit), for `kure_jax.models.get_model`'s calling convention.
  """

  num_users: int
  num_items: int
  factors: int = 8
  mlp_layers: Sequence[int] = (64, 32, 16, 8)
  quantize_embeddings: bool = False
  num_classes: int = 1
  weight_grid: str = DEFAULT_WEIGHT_GRID
  dtype: Any = None

  @nn.compact
  def __call__(self, user: jax.Array, item: jax.Array, train: bool = False) -> jax.Array:
    del train
    if self.num_classes != 1:
      raise ValueError(f"NeuMF outputs one logit per (user, item); num_classes must be 1, got {self.num_classes}.")
    if self.num_users < 1 or self.num_items < 1 or self.factors < 1:
      raise ValueError(f"NeuMF: num_users, num_items and factors must be ≥ 1, got {self.num_users}, "
                       f"{self.num_items}, {self.factors}.")
    widths = tuple(int(w) for w in self.mlp_layers)
    if not widths or widths[0] < 2 or widths[0] % 2 or min(widths) < 1:
      raise ValueError(f"NeuMF: mlp_layers must start with an even width ≥ 2 (the two concatenated embeddings) "
                       f"and hold positive widths, got {tuple(self.mlp_layers)}.")
    user, item = jnp.broadcast_arrays(jnp.asarray(user), jnp.asarray(item))
    embed = functools.partial(QEmbed, quantize=self.quantize_embeddings, weight_grid=self.weight_grid,
                              dtype=self.dtype)
    dense = functools.partial(QDense, weight_grid=self.weight_grid, dtype=self.dtype)

    mf = (embed(self.num_users, self.factors, name="mf_embedding_user")(user)
          * embed(self.num_items, self.factors, name="mf_embedding_item")(item))
    half = widths[0] // 2
    h = jnp.concatenate([embed(self.num_users, half, name="mlp_embedding_user")(user),
                         embed(self.num_items, half, name="mlp_embedding_item")(item)], axis=-1)
    for idx, width in enumerate(widths[1:], 1):  # the first layer's input is signed, the others follow a ReLU
      h = dense(width, act_grid="signed" if idx == 1 else "unsigned", kernel_init=mlp_init, name=f"layer{idx}")(h)
      h = nn.relu(h)
    z = jnp.concatenate([mf, h.astype(mf.dtype)], axis=-1)
    logit = dense(1, act_grid="signed", kernel_init=prediction_init, name="prediction")(z)[..., 0]
    return logit.astype(jnp.promote_types(logit.dtype, jnp.float32))
