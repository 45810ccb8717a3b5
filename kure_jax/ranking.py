"""Leave-one-out ranking metrics (NCF's protocol): HR@k and NDCG@k of one positive among sampled negatives.

Each user's row of ``scores`` holds the positive (the held-out test item) in column 0 and its sampled
negatives in columns 1.. (NCF: 99, so 100 candidates). `ranks` gives the positive's 0-based rank in the
row; HR@k counts rank < k and NDCG@k scores ``log 2 / log(rank + 2)`` (= 1/log2(rank + 2)) below k, 0 from k on.
All functions are pure jnp, jit- and vmap-able; `k` is a Python int (static).

Ties. By default a negative whose score equals the positive's counts *against* it (pessimistic): a model
that collapses to a constant score, or whose logits a coarse quantizer maps onto a few levels, gets HR 0
rather than 1, so ties never flatter a quantized model. This is also what NCF's reference evaluation
(`hexiangnan/neural_collaborative_filtering`, evaluate.py) does under Python 3: it puts the candidates'
scores in a dict keyed by item with the positive inserted last, and ``heapq.nlargest`` keeps the earlier
of equal scores, so the positive loses every tie. (The original Python 2 ran on hash order, i.e. arbitrary
ties.) Two details of that reference are reproduced when `items` is given:

* a negative that *is* the positive item (156 of ML-1M's 6,040 lines list the test item among its own
  negatives) collapses into the positive in the reference's dict; here it is ignored, instead of tying;
* NaN scores (a diverged model) count against the positive, wherever they are.

``ties='optimistic'`` counts only strictly higher scores (ties and NaNs in the positive's favour); use it
only to bound the effect of ties, not to report.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TIES = ("pessimistic", "optimistic")


def ranks(scores: jax.Array, items: jax.Array | None = None, *, ties: str = "pessimistic") -> jax.Array:
  """The 0-based rank of column 0 (the positive) among each row of `scores` [U, C], as int32 [U].

  rank = the number of negatives (columns 1..) that beat the positive: score ≥ the positive's (or either is
  NaN) by default, score > it with ``ties='optimistic'``. `items` [U, C] (the candidates' item ids, e.g. from
  `kure_jax.data.movielens.eval_candidates`): negatives equal to the row's positive item are not counted.
  """
  if ties not in TIES:
    raise ValueError(f"ranks: ties must be one of {', '.join(TIES)}, got {ties!r}.")
  scores = jnp.asarray(scores)
  if scores.ndim != 2 or scores.shape[1] < 1:
    raise ValueError(f"ranks: scores must be [users, candidates] with the positive in column 0, got shape "
                     f"{scores.shape}.")
  pos, neg = scores[:, :1], scores[:, 1:]
  beats = ~(neg < pos) if ties == "pessimistic" else neg > pos
  if items is not None:
    items = jnp.asarray(items)
    if items.shape != scores.shape:
      raise ValueError(f"ranks: items has shape {items.shape}, scores {scores.shape}; they must match.")
    beats = beats & (items[:, 1:] != items[:, :1])
  return jnp.sum(beats, axis=-1, dtype=jnp.int32)


def _hits_and_gains(rank: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  if k < 1:
    raise ValueError(f"ranking metrics: k must be ≥ 1, got {k}.")
  rank = jnp.asarray(rank)
  hit = rank < k
  gain = jnp.where(hit, jnp.log(2.0) / jnp.log(rank.astype(jnp.float32) + 2.0), 0.0)
  return hit.astype(jnp.float32), gain


def hit_rate(rank: jax.Array, k: int = 10) -> jax.Array:
  """HR@k: the fraction of users whose positive ranks in the top k (rank < k)."""
  return jnp.mean(_hits_and_gains(rank, k)[0])


def ndcg(rank: jax.Array, k: int = 10) -> jax.Array:
  """NDCG@k with one relevant item: the mean of ``log 2 / log(rank + 2)`` for rank < k, 0 otherwise."""
  return jnp.mean(_hits_and_gains(rank, k)[1])


def ranking_sums(rank: jax.Array, mask: jax.Array | None = None, k: int = 10) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(hits, ndcg sum, count) over the users where `mask` is True (all if None), as float32 scalars.

  Sum them over batches (padded rows masked out) and divide by the count: HR@k and NDCG@k of the whole set.
  """
  hit, gain = _hits_and_gains(rank, k)
  w = jnp.ones_like(hit) if mask is None else jnp.asarray(mask).astype(jnp.float32)
  if w.shape != hit.shape:
    raise ValueError(f"ranking_sums: mask has shape {w.shape}, ranks {hit.shape}; they must match.")
  return jnp.sum(hit * w), jnp.sum(gain * w), jnp.sum(w)
