"""NCF through the shared training loop: config.task='ranking', NeuMF on MovieLens (synthetic and real).

A tiny synthetic MovieLens folder (30 users with a learnable taste structure, 40 items) trains end to end
through `train_and_evaluate`; a two-phase run (stop at max_steps, continue) ends bit-identical to an
uninterrupted one. The real ML-1M smoke test trains one epoch (19,417 steps, ~20 s on 2 CPU cores).
"""

import gzip
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import movielens_neumf
from kure_jax import data as data_lib
from kure_jax import tasks
from kure_jax.checkpoint import load_variables
from kure_jax.errors import UserError
from kure_jax.metrics import read_metrics
from kure_jax.training.train import train_and_evaluate, validate_config
from tests.helpers import override

SHARED_MOVIELENS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens"
USERS, ITEMS = 30, 40


def _gz(path: Path, lines: list[str]) -> None:
  with gzip.open(path, "wb") as f:
    f.write(("\n".join(lines) + "\n").encode())


def write_movielens(root: Path, seed: int = 0) -> Path:
  """Two user groups, each liking (mostly) its own half of the items: a model can learn to rank."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  train, test, neg = [], [], []
  for u in range(USERS):
    liked = np.arange(ITEMS // 2) + (ITEMS // 2) * (u % 2)
    chosen = rng.choice(liked, 12, replace=False)
    rated, test_item = np.sort(chosen[:11]), int(chosen[11])
    train += [f"{u}\t{i}\t{rng.integers(1, 6)}" for i in rated]
    test.append(f"{u}\t{test_item}\t5\t978300760")
    pool = np.setdiff1d(np.arange(ITEMS), np.append(rated, test_item))
    negs = rng.choice(pool, 99, replace=True)  # 40 items: fewer than 99 unrated, so repeats (the format allows)
    neg.append(f"({u},{test_item})\t" + "\t".join(map(str, negs)))
  _gz(root / "ml-1m.train.rating.gz", train)
  _gz(root / "ml-1m.test.rating.gz", test)
  _gz(root / "ml-1m.test.negative.gz", neg)
  return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_movielens(tmp_path_factory.mktemp("ml"))


def tiny_config(data_dir, **overrides):
  c = movielens_neumf.get_config()
  c.dataset.data_dir = str(data_dir)
  c.batch_size = 64
  c.eval_batch_size = 16
  c.num_epochs = 3
  c.schedule.name = "constant"  # the mechanics, on a tiny model and data: not the default recipe's decay
  c.schedule.learning_rate = 0.01
  c.model_kwargs.factors = 4
  c.model_kwargs.mlp_layers = (16, 8, 8, 4)
  c.progress = False
  c.log_every_steps = 2
  c.checkpoint_every_steps = 1000
  return override(c, overrides)


def test_config_validates():
  c = movielens_neumf.get_config()
  validate_config(c)
  assert (c.task, c.model, c.dataset.name, c.optimizer.name, c.batch_size) == ("ranking", "neumf", "movielens",
                                                                                "adam", 256)


@pytest.mark.parametrize("overrides, message", [
    ({"task": "regression"}, "config.task is 'regression'; choose one of classification, ranking"),
    ({"model": "resnet20"}, "config.model is 'resnet20', which the 'ranking' task"),
    ({"task": "classification"}, "config.model is 'neumf', which the 'classification' task"),
    ({"dataset.name": "cifar10"}, "config.dataset.name is 'cifar10', which is no data of the 'ranking' task"),
    ({"quant.method": "lsq"}, "QAT is not supported for the 'ranking' task"),
])
def test_mismatched_task_is_one_readable_error(tmp_path, overrides, message):
  with pytest.raises(UserError, match=message.replace("(", r"\(")):
    train_and_evaluate(tiny_config(tmp_path, **overrides), str(tmp_path / "w"))


def test_missing_folder_is_one_readable_error(tmp_path):
  with pytest.raises(UserError, match=r"MovieLens folder .*nowhere not found.*--config.dataset.data_dir=FOLDER") as e:
    train_and_evaluate(tiny_config(tmp_path / "nowhere"), str(tmp_path / "w"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_dataset_batches(folder):
  c = tiny_config(folder)
  train = data_lib.make_dataset(c.dataset, "train", batch_size=64, train=True, seed=0)
  assert (train.num_users, train.num_items) == (USERS, ITEMS)
  assert train.num_examples == USERS * 11 * 5 and train.steps_per_epoch == USERS * 11 * 5 // 64
  b = train.get_batch(train.steps_per_epoch + 1)  # epoch 1, batch 1
  assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
      "user": ((64,), "int32"), "item": ((64,), "int32"), "label": ((64,), "float32"), "mask": ((64,), "bool")}
  again = next(train.iterate(start_step=train.steps_per_epoch + 1))  # resumable: a pure function of the step
  for k in b:
    np.testing.assert_array_equal(b[k], again[k])
  ev = data_lib.make_dataset(c.dataset, "eval", batch_size=16, train=False, seed=0)
  batches = list(ev.iterate())
  assert len(batches) == len(ev) == 2
  assert batches[-1]["user"].shape == (16, 1) and batches[-1]["item"].shape == (16, 100)
  assert sum(int(x["mask"].sum()) for x in batches) == USERS  # padded + masked: every user once
  np.testing.assert_array_equal(np.concatenate([x["user"][x["mask"], 0] for x in batches]), np.arange(USERS))


@pytest.mark.slow
def test_end_to_end_kure_and_resume(folder, tmp_path):
  overrides = {"kure.weight": 0.1, "kure.activations": 0.01}
  # untrained: the random model's HR@10 (via one tiny step at a negligible learning rate)
  start = train_and_evaluate(tiny_config(folder, max_steps=1, **{"schedule.learning_rate": 1e-9}),
                             str(tmp_path / "start"))
  ref = str(tmp_path / "ref")
  result = train_and_evaluate(tiny_config(folder, **overrides), ref)
  steps = 3 * (USERS * 11 * 5 // 64)
  assert result["step"] == steps and not result["interrupted"]
  assert result["count"] == USERS
  for r in (start, result):
    assert 0.0 <= r["hr@10"] <= 1.0 and 0.0 <= r["ndcg@10"] <= r["hr@10"]
  assert result["hr@10"] > start["hr@10"] + 0.15, (start, result)  # two taste groups: learnable
  rows = read_metrics(ref, "train")
  assert all(np.isfinite(r["kure"]) and r["kure"] > 0 and np.isfinite(r["kure_act"]) and r["kure_act"] > 0
             for r in rows)
  assert all(abs(r["loss"] - r["ce"] - 0.1 * r["kure"] - 0.01 * r["kure_act"]) < 1e-4 for r in rows)
  evals = read_metrics(ref, "eval")
  assert [e["epoch"] for e in evals] == [1.0, 2.0, 3.0]
  assert set(evals[-1]["kurtosis"]) == {"layer1", "layer2", "layer3", "prediction"}  # every dense layer (config)

  # stop part-way (max_steps), then continue: bit-identical to the uninterrupted run
  two = str(tmp_path / "two")
  half = train_and_evaluate(tiny_config(folder, max_steps=steps // 2 + 1, **overrides), two)
  assert half["step"] == steps // 2 + 1
  train_and_evaluate(tiny_config(folder, **overrides), two)
  a, meta = load_variables(ref)
  b, _ = load_variables(two)
  assert meta["model"] == "neumf"
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert [(r["step"], r["loss"]) for r in read_metrics(two, "train")] == [(r["step"], r["loss"]) for r in rows]


def test_ranking_sums_ignore_padding():
  scores = np.zeros((3, 100), np.float32)
  scores[:, 0] = [1.0, -1.0, 1.0]  # ranks 0, 99 (pessimistic ties), 0
  items = np.tile(np.arange(100), (3, 1))
  sums = tasks.ranking_eval_sums(scores, {"item": items, "mask": np.array([True, True, False])})
  summary = tasks.RANKING.summarize(jax.device_get(sums))
  assert summary["count"] == 2 and summary["hr@10"] == 0.5 and summary["ndcg@10"] == 0.5


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MOVIELENS.is_dir(), reason=f"MovieLens-1M (NCF's files) not found at "
                    f"{SHARED_MOVIELENS}; see ../shared/data/movielens/README.md")
def test_real_one_epoch(tmp_path):
  c = movielens_neumf.get_config()
  c.num_epochs, c.progress = 1, False
  result = train_and_evaluate(c, str(tmp_path / "ncf"))
  assert result["count"] == 6040 and result["step"] == 19417
  assert result["hr@10"] > 0.4, result  # random: ~0.10; measured 0.59 (NDCG@10 0.34) after this epoch
