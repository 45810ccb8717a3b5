"""NCF on MovieLens-1M: ranking metrics, the implicit-feedback source, NeuMF and its quantization hook.

Synthetic .gz files in tmp_path for the source's contract; the real files (../shared/data/movielens) for
counts and a chance-level HR@10, skipped where they are absent.
"""

import functools
import gzip
import math
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kure_jax import ranking
from kure_jax.core import quant as Q
from kure_jax.core.kurtosis import kernel_leaves, select_kernels
from kure_jax.data import movielens as ml
from kure_jax.errors import UserError
from kure_jax.models.layers import QUANT, quant_collection, quant_hook
from kure_jax.models.neumf import NeuMF, QEmbed

SHARED_MOVIELENS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens"

# ----------------------------------------------------------------------------------
# Ranking metrics


def _scores_with_ranks(rank_list, candidates=100):
  """Rows whose positive (0.5) is beaten by exactly `rank` negatives (1.0); the other negatives score 0."""
  s = np.zeros((len(rank_list), candidates), np.float32)
  s[:, 0] = 0.5
  for row, r in enumerate(rank_list):
    s[row, 1:1 + r] = 1.0
  return s


class RankingTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_computed(self):
    scores = _scores_with_ranks([0, 3, 9, 10])
    r = self.variant(ranking.ranks)(scores)
    np.testing.assert_array_equal(r, [0, 3, 9, 10])
    # by hand: ranks 0, 3, 9 are in the top 10, rank 10 is not; gains 1, 1/log2(5), 1/log2(11), 0
    hr = self.variant(functools.partial(ranking.hit_rate, k=10))(r)
    nd = self.variant(functools.partial(ranking.ndcg, k=10))(r)
    self.assertAlmostEqual(float(hr), 0.75, places=6)
    self.assertAlmostEqual(float(nd), (1 + 0.43067655807339306 + 0.28906482631788788 + 0) / 4, places=6)
    self.assertAlmostEqual(float(nd), (1 + math.log(2) / math.log(5) + math.log(2) / math.log(11)) / 4, places=6)
    # k = 4: only ranks 0 and 3 count
    self.assertAlmostEqual(float(ranking.hit_rate(r, k=4)), 0.5, places=6)
    self.assertAlmostEqual(float(ranking.ndcg(r, k=4)), (1 + 0.43067655807339306) / 4, places=6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_against_argsort(self):
    scores = np.random.default_rng(0).normal(size=(500, 100)).astype(np.float32)
    r = np.asarray(self.variant(ranking.ranks)(scores))
    want = np.argmax(np.argsort(-scores, axis=1, kind="stable") == 0, axis=1)  # where column 0 lands
    np.testing.assert_array_equal(r, want)
    np.testing.assert_array_equal(ranking.ranks(scores, ties="optimistic"), want)  # no ties: same
    ref_hr = np.mean(want < 10)
    ref_ndcg = np.mean(np.where(want < 10, 1 / np.log2(want + 2), 0.0))
    np.testing.assert_allclose(self.variant(functools.partial(ranking.hit_rate, k=10))(r), ref_hr, rtol=1e-6)
    np.testing.assert_allclose(self.variant(functools.partial(ranking.ndcg, k=10))(r), ref_ndcg, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties_duplicates_and_nan(self):
    s = np.array([[1.0] * 5,                      # all tied
                  [2.0, 2.0, 3.0, 1.0, 1.0],      # one tie, one higher
                  [2.0, 2.0, 1.0, 1.0, 1.0],      # the tie is the positive item itself (upstream duplicate)
                  [np.nan, 0.0, 0.0, 0.0, 0.0],   # diverged positive
                  [1.0, np.nan, 0.0, 0.0, 0.0]], np.float32)
    items = np.array([[7, 1, 2, 3, 4], [7, 1, 2, 3, 4], [7, 7, 2, 3, 4], [7, 1, 2, 3, 4], [7, 1, 2, 3, 4]])
    pess = self.variant(ranking.ranks)(s)
    np.testing.assert_array_equal(pess, [4, 2, 1, 4, 1])
    np.testing.assert_array_equal(self.variant(ranking.ranks)(s, items), [4, 2, 0, 4, 1])
    np.testing.assert_array_equal(self.variant(functools.partial(ranking.ranks, ties="optimistic"))(s), [0, 1, 0, 0, 0])

  def test_sums_over_padded_batches(self):
    r = jnp.asarray(np.random.default_rng(1).integers(0, 100, 37))
    hits = ndcg_sum = count = 0.0
    for start in range(0, 40, 8):  # batches of 8, the last padded with garbage ranks and masked out
      batch = jnp.zeros(8, jnp.int32).at[:min(8, 37 - start)].set(r[start:start + 8])
      mask = jnp.arange(8) < 37 - start
      h, n, c = jax.jit(ranking.ranking_sums, static_argnames="k")(batch, mask, k=10)
      hits, ndcg_sum, count = hits + h, ndcg_sum + n, count + c
    self.assertEqual(float(count), 37.0)
    np.testing.assert_allclose(hits / count, ranking.hit_rate(r), rtol=1e-6)
    np.testing.assert_allclose(ndcg_sum / count, ranking.ndcg(r), rtol=1e-6)

  def test_bad_arguments(self):
    with pytest.raises(ValueError, match="ties"):
      ranking.ranks(jnp.zeros((2, 3)), ties="random")
    with pytest.raises(ValueError, match="users, candidates"):
      ranking.ranks(jnp.zeros(3))
    with pytest.raises(ValueError, match="k must"):
      ranking.hit_rate(jnp.zeros(3, jnp.int32), k=0)


# ----------------------------------------------------------------------------------
# The source, on synthetic files

NUM_USERS, NUM_ITEMS = 6, 130
DEGREES = (3, 8, 20, 1, 127, 40)  # user 4 leaves 3 items unrated (incl. its test item): sampling near full


def _gz(path: Path, text: str) -> None:
  with gzip.open(path, "wb") as f:
    f.write(text.encode())


def _write_dataset(root: Path, *, timestamps: bool = False, seed: int = 0) -> dict:
  """Synthetic NCF files: each user rates DEGREES[u] items (one line repeated, one rating-0 line extra)."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  rated, lines, tests, negs = {}, [], [], []
  for u, d in enumerate(DEGREES):
    perm = rng.permutation(NUM_ITEMS)
    rated[u] = np.sort(perm[:d])
    test_item = int(perm[d])
    for i in rng.permutation(rated[u]):
      lines.append(f"{u}\t{i}\t{rng.integers(1, 6)}" + ("\t978300000" if timestamps else ""))
    tests.append(f"{u}\t{test_item}\t4\t978300760")
    pool = np.setdiff1d(np.arange(NUM_ITEMS), [test_item])
    negs.append(f"({u},{test_item})\t" + "\t".join(str(i) for i in rng.choice(pool, 99, replace=False)))
  lines.append(lines[0])  # a repeated interaction counts once
  unrated = int(np.setdiff1d(np.arange(NUM_ITEMS), rated[0])[0])
  lines.append(f"0\t{unrated}\t0" + ("\t978300000" if timestamps else ""))  # rating 0: not a positive
  _gz(root / "ml-1m.train.rating.gz", "\n".join(lines) + "\n")
  _gz(root / "ml-1m.test.rating.gz", "\n".join(tests) + "\n")
  _gz(root / "ml-1m.test.negative.gz", "\n".join(negs) + "\n")
  return rated


def test_load_synthetic(tmp_path):
  rated = _write_dataset(tmp_path)
  d = ml.load(tmp_path)
  assert (d.num_users, d.num_items) == (NUM_USERS, NUM_ITEMS)
  assert d.num_train == sum(DEGREES)  # the repeat and the rating-0 line do not count
  for u in range(NUM_USERS):
    np.testing.assert_array_equal(d.indices[d.indptr[u]:d.indptr[u + 1]], rated[u])
  assert d.train_users.dtype == d.train_items.dtype == np.int32
  users, items = ml.eval_candidates(d)
  assert users.shape == (NUM_USERS,) and items.shape == (NUM_USERS, 100) and items.dtype == np.int32
  np.testing.assert_array_equal(items[:, 0], d.test_items)
  np.testing.assert_array_equal(items[:, 1:], d.negatives)
  # the upstream layout with a 4th (timestamp) column reads the same
  _write_dataset(tmp_path / "ts", timestamps=True)
  d4 = ml.load(tmp_path / "ts")
  np.testing.assert_array_equal(d4.train_items, d.train_items)


def test_epoch_examples(tmp_path):
  rated = _write_dataset(tmp_path)
  d = ml.load(tmp_path)
  ex = ml.epoch_examples(d, seed=3, epoch=0)
  assert set(ex) == {"user", "item", "label"}
  assert ex["user"].dtype == ex["item"].dtype == np.int32 and ex["label"].dtype == np.float32
  pos = ex["label"] == 1
  assert ex["user"].size == 5 * d.num_train and pos.sum() == d.num_train
  # every positive exactly once
  got = np.sort(ex["user"][pos].astype(np.int64) * NUM_ITEMS + ex["item"][pos])
  np.testing.assert_array_equal(got, d.train_users.astype(np.int64) * NUM_ITEMS + d.train_items)
  # 4 negatives per positive, none of them rated by its user
  nu, ni = ex["user"][~pos], ex["item"][~pos]
  np.testing.assert_array_equal(np.bincount(nu, minlength=NUM_USERS), 4 * np.asarray(DEGREES))
  for u in range(NUM_USERS):
    assert not np.isin(ni[nu == u], rated[u]).any()
  assert set(ni[nu == 4]) == set(np.setdiff1d(np.arange(NUM_ITEMS), rated[4]))  # the 3 free items, all reached
  # shuffled: positives and negatives interleave
  assert pos[:d.num_train].mean() < 0.5
  # a pure function of (seed, epoch)
  again = ml.epoch_examples(d, seed=3, epoch=0)
  for k in ex:
    np.testing.assert_array_equal(ex[k], again[k])
  for other in (ml.epoch_examples(d, seed=3, epoch=1), ml.epoch_examples(d, seed=4, epoch=0)):
    assert not np.array_equal(ex["item"], other["item"])
  assert ml.epoch_examples(d, 0, 0, num_negatives=0)["label"].min() == 1.0


def test_negatives_are_uniform(tmp_path):
  rated = _write_dataset(tmp_path)
  d = ml.load(tmp_path)
  u = 5  # 40 rated, 90 free items
  free = np.setdiff1d(np.arange(NUM_ITEMS), rated[u])
  draws = ml.sample_unrated(d, np.full(90_000, u), np.random.default_rng(0))
  counts = np.bincount(draws, minlength=NUM_ITEMS)
  assert counts[rated[u]].sum() == 0
  chi2 = np.sum((counts[free] - 1000) ** 2 / 1000)  # 89 degrees of freedom: mean 89, sd 13.3
  assert chi2 < 89 + 6 * 13.3, chi2


def _rewrite(path: Path, fn) -> None:
  text = gzip.open(path, "rb").read().decode()
  _gz(path, fn(text))


def _replace_line(n: int, new: str):
  def fn(text):
    lines = text.split("\n")
    lines[n - 1] = new
    return "\n".join(lines)
  return fn


@pytest.mark.parametrize("name,edit,match", [
    ("ml-1m.train.rating.gz", _replace_line(3, "1\t2"), r"ml-1m\.train\.rating\.gz, line 3 has 2 fields"),
    ("ml-1m.train.rating.gz", _replace_line(5, "1\tx\t3"), r"ml-1m\.train\.rating\.gz, line 5 has a field 'x'"),
    ("ml-1m.train.rating.gz", _replace_line(2, "0\t-3\t4"), r"ml-1m\.train\.rating\.gz, line 2 holds a negative id"),
    ("ml-1m.test.rating.gz", _replace_line(2, "1\t2\t3"), r"ml-1m\.test\.rating\.gz, line 2 has 3 fields"),
    ("ml-1m.test.rating.gz", _replace_line(2, "4\t2\t3\t5"), r"ml-1m\.test\.rating\.gz, line 2 is for user 4"),
    ("ml-1m.test.negative.gz", _replace_line(4, "(3,1)\t5"),
     r"ml-1m\.test\.negative\.gz, line 4 has 3 fields, expected 101"),
    ("ml-1m.test.negative.gz", lambda t: t.replace("(2,", "(5,"), r"ml-1m\.test\.negative\.gz, line 3 starts with"),
])
def test_malformed_files(tmp_path, name, edit, match):
  _write_dataset(tmp_path)
  _rewrite(tmp_path / name, edit)
  with pytest.raises(UserError, match=match):
    ml.load(tmp_path)


def test_missing_and_broken_files(tmp_path):
  with pytest.raises(UserError, match=r"MovieLens folder .*nowhere not found: expected .*pass the folder"):
    ml.load(tmp_path / "nowhere")
  _write_dataset(tmp_path)
  (tmp_path / "ml-1m.test.negative.gz").unlink()
  with pytest.raises(UserError, match=r"ml-1m\.test\.negative\.gz not found"):
    ml.load(tmp_path)
  (tmp_path / "ml-1m.test.negative.gz").write_bytes(b"not gzip")
  with pytest.raises(UserError, match=r"ml-1m\.test\.negative\.gz is not a readable gzip file"):
    ml.load(tmp_path)
  assert str(ml.DEFAULT_DIR).endswith("shared/data/movielens")


# ----------------------------------------------------------------------------------
# NeuMF

USERS = jnp.asarray(np.random.default_rng(0).integers(0, 50, (64,)), jnp.int32)
ITEMS = jnp.asarray(np.random.default_rng(1).integers(0, 80, (64,)), jnp.int32)


@functools.lru_cache(maxsize=None)
def _neumf(quantize_embeddings: bool = False):
  model = NeuMF(num_users=50, num_items=80, quantize_embeddings=quantize_embeddings)
  return model, model.init(jax.random.key(0), USERS, ITEMS)


@pytest.mark.slow
def test_neumf_shapes_jit_grad_and_kernels():
  model, v = _neumf()
  p = v["params"]
  assert p["mf_embedding_user"]["embedding"].shape == (50, 8) and p["mlp_embedding_item"]["embedding"].shape == (80, 32)
  assert [p[f"layer{i}"]["kernel"].shape for i in (1, 2, 3)] == [(64, 32), (32, 16), (16, 8)]
  assert p["prediction"]["kernel"].shape == (16, 1)
  assert float(jnp.std(p["mf_embedding_item"]["embedding"])) == pytest.approx(0.01, rel=0.1)

  out = model.apply(v, USERS, ITEMS)
  assert out.shape == USERS.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(jax.jit(model.apply)(v, USERS, ITEMS), out, rtol=1e-5, atol=1e-7)
  grid = model.apply(v, USERS[:4, None], ITEMS[None, :10])  # users [4, 1] x candidates [1, 10] broadcast
  assert grid.shape == (4, 10)
  np.testing.assert_allclose(grid[2, 5], model.apply(v, USERS[2], ITEMS[5]), rtol=1e-5, atol=1e-7)

  def loss(params):
    logits = model.apply({"params": params}, USERS, ITEMS)
    return jnp.mean(nn.softplus(logits) - (USERS % 2) * logits)  # sigmoid cross-entropy
  grads = jax.grad(loss)(p)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["mf_embedding_user"]["embedding"]).sum()) > 0

  assert set(kernel_leaves(p)) == {"layer1/kernel", "layer2/kernel", "layer3/kernel", "prediction/kernel"}
  assert set(select_kernels(p)) == {"layer2/kernel", "layer3/kernel"}  # stem layer1, head prediction
  _, vq = _neumf(True)
  assert {"mf_embedding_user/kernel", "mlp_embedding_item/kernel"} <= set(kernel_leaves(vq["params"]))
  with pytest.raises(ValueError, match="even width"):
    NeuMF(5, 5, mlp_layers=(7, 4)).init(jax.random.key(0), USERS[:2] % 5, ITEMS[:2] % 5)


def _quant(params, inputs, bits):
  """A 'quant' collection: every kernel (incl. embedding tables) and dense input at `bits`, max steps."""
  layers = {}
  for path, k in kernel_leaves(params).items():
    entry = {"w_bits": jnp.asarray(bits), "w_step": Q.max_step(k, bits, axis=-1)}
    name = path.split("/")[0]
    if name in inputs:  # dense layers sow their input; tables have none
      grid = "unsigned" if name in ("layer2", "layer3") else "signed"
      entry.update(a_bits=jnp.asarray(bits), a_step=Q.max_step(inputs[name], bits, grid))
    layers[path] = entry
  return quant_collection(params, layers)


@pytest.mark.slow
def test_neumf_quantization_hook():
  model, v = _neumf(True)
  # scale the tiny init up so activations are not all rounding noise
  v = {"params": jax.tree.map(lambda x: x * 30 if x.ndim == 2 and x.shape[0] in (50, 80) else x, v["params"])}
  out, state = model.apply(v, USERS, ITEMS, mutable=["intermediates"])
  inputs = {name: node["input"][0] for name, node in state["intermediates"].items()}
  assert set(inputs) == {"layer1", "layer2", "layer3", "prediction"}
  scale = float(jnp.std(out))
  err = {b: float(jnp.abs(model.apply({**v, QUANT: _quant(v["params"], inputs, b)}, USERS, ITEMS) - out).mean()) / scale
         for b in (2, 4, 8)}
  assert err[8] < 0.05 and err[2] > 5 * err[8] and err[2] > err[4] > err[8] > 0, err

  # bits as traced arrays: one compiled function sweeps them, 0 bits = float
  q8 = _quant(v["params"], inputs, 8)

  def at(bits):
    q = {name: {k: bits if k in ("w_bits", "a_bits") else x for k, x in node.items()} for name, node in q8.items()}
    return model.apply({**v, QUANT: q}, USERS, ITEMS)
  sweep = jax.jit(jax.vmap(at))(jnp.array([0, 8]))
  np.testing.assert_allclose(sweep[0], out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sweep[1], model.apply({**v, QUANT: q8}, USERS, ITEMS), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(sweep[1] - sweep[0]).max()) > 0


class _Hooked(nn.Module):
  """A bare kernel through the full hook (input ignored), to compare the tables' weight path with."""

  @nn.compact
  def __call__(self, kernel):
    return quant_hook(self, jnp.zeros(3), kernel, weight_grid="signed", act_grid="signed")[1]


def test_table_quantizer_matches_hook():
  table = jax.random.normal(jax.random.key(5), (30, 6))
  entries = {"w_tanh": jnp.asarray(True), "w_bits": jnp.asarray(3), "w_step": jnp.full(6, 0.2),
             "w_bias_corr": jnp.asarray(2), "w_fmt": jnp.asarray(-1), "w_scale": jnp.asarray(1.0),
             "w_ratio": jnp.asarray(1.0)}
  want = _Hooked().apply({QUANT: entries}, table)
  ids = jnp.arange(30)
  got = QEmbed(30, 6, quantize=True).apply({"params": {"kernel": table}, QUANT: entries}, ids)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(got - table).max()) > 0.01
  np.testing.assert_array_equal(QEmbed(30, 6).apply({"params": {"embedding": table}}, ids), table)


# ----------------------------------------------------------------------------------
# The real files

_present = pytest.mark.skipif(not SHARED_MOVIELENS.is_dir(), reason=f"MovieLens-1M (NCF's files) not found at "
                              f"{SHARED_MOVIELENS}; see ../shared/data/movielens/README.md")


def real(test):
  """A test on the real ML-1M: slow (the full 1M-rating files), skipped where they are absent."""
  return pytest.mark.slow(_present(test))


@pytest.fixture(scope="module")
def movielens():
  return ml.load(SHARED_MOVIELENS)


@real
def test_real_counts(movielens):
  d = movielens
  assert (d.num_users, d.num_items, d.num_train) == (6040, 3706, 994169)
  users, items = ml.eval_candidates(d)
  assert items.shape == (6040, 100) and users.shape == (6040,)
  # the test item is never among its user's training items
  rated = d.train_users.astype(np.int64) * d.num_items + d.train_items
  assert not np.isin(np.arange(6040) * d.num_items + d.test_items, rated).any()
  assert int((items[:, 1:] == items[:, :1]).any(axis=1).sum()) == 156  # the upstream self-negatives
  ex = ml.epoch_examples(d, seed=0, epoch=0)
  neg = ex["label"] == 0
  assert neg.sum() == 4 * 994169
  assert not np.isin(ex["user"][neg].astype(np.int64) * d.num_items + ex["item"][neg], rated).any()


@real
def test_real_random_neumf_is_at_chance(movielens):
  d = movielens
  users, items = ml.eval_candidates(d)
  model = NeuMF(num_users=d.num_users, num_items=d.num_items)
  v = model.init(jax.random.key(0), users[:2], items[:2, 0])

  @jax.jit
  def sums(u, it, mask):
    r = ranking.ranks(model.apply(v, u[:, None], it), it)
    return ranking.ranking_sums(r, mask, k=10)

  total = np.zeros(3)
  batch = 1024
  for s in range(0, d.num_users, batch):
    u, it = users[s:s + batch], items[s:s + batch]
    n = len(u)
    pad = batch - n
    mask = np.arange(batch) < n
    total += np.asarray(sums(np.pad(u, (0, pad)), np.pad(it, ((0, pad), (0, 0))), mask))
  assert total[2] == 6040
  hr, nd = total[0] / total[2], total[1] / total[2]
  assert 0.05 < hr < 0.16, hr
  assert 0.02 < nd < 0.09, nd
