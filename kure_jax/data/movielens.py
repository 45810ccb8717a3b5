"""MovieLens-1M as implicit feedback in NCF's leave-one-out form (He et al., WWW 2017).

Reads the three gzip files of ``<folder>/<prefix>.*.gz`` (see ``../shared/data/movielens/README.md``):

* ``<prefix>.train.rating.gz``: ``user⇥item⇥rating[⇥timestamp]``, one line per interaction;
* ``<prefix>.test.rating.gz``: ``user⇥item⇥rating⇥timestamp``, one line per user, users 0.. in order;
* ``<prefix>.test.negative.gz``: ``(user,item)⇥neg_1⇥…⇥neg_99``, line i belonging to test line i.

Every training line with rating > 0 is a positive (NCF's ``Dataset.py``: the rating value is otherwise
ignored; a repeated (user, item) counts once). Training examples are drawn per epoch by `epoch_examples`,
a pure function of (seed, epoch), so a killed run resumes bit for bit; evaluation ranks each user's test
item among its 99 listed negatives (`eval_candidates`, scored with `kure_jax.ranking`).

Parsing is numpy's C parser on the whole text (ML-1M loads in well under a second); any file that is
missing or malformed raises `UserError` naming the file, the line, and the fix.
"""

from __future__ import annotations

import dataclasses
import gzip
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kure_jax.data.batching import check_batching
from kure_jax.data.batching import config_value as _get
from kure_jax.errors import UserError

# The repository's sibling ../shared/data/movielens (this file is <repo>/kure_jax/data/movielens.py).
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "movielens"
DEFAULT_PREFIX = "ml-1m"
NUM_TEST_NEGATIVES = 99


@dataclasses.dataclass(frozen=True, eq=False)
class MovieLens:
  """One leave-one-out implicit-feedback dataset, all ids 0-based.

  train_users, train_items: the positives, int32 [P], sorted by user then item (the CSR order).
  indptr, indices: each user's rated training items in CSR form; user u's are
    ``indices[indptr[u]:indptr[u + 1]]``, sorted ascending (indices is train_items).
  test_items: int32 [U], each user's held-out item. negatives: int32 [U, 99], its listed negatives.
  """

  num_users: int
  num_items: int
  train_users: np.ndarray
  train_items: np.ndarray
  indptr: np.ndarray
  indices: np.ndarray
  test_items: np.ndarray
  negatives: np.ndarray
  folder: str = ""

  @property
  def num_train(self) -> int:
    return int(self.train_items.size)


def _fix_hint(folder: Path) -> str:
  return (f"expected NCF's files <prefix>.train.rating.gz, .test.rating.gz, .test.negative.gz in {folder} "
          f"(the shared copy is {DEFAULT_DIR}); pass the folder that holds them, movielens.load(folder)")


def _read_text(path: Path, folder: Path) -> bytes:
  if not path.is_file():
    raise UserError(f"MovieLens file {path} not found: {_fix_hint(folder)}.")
  try:
    with gzip.open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise UserError(f"MovieLens file {path} is not a readable gzip file ({e}); "
                    "replace it with an intact copy.") from None


def _first_bad_line(text: bytes, columns: int) -> tuple[int, str]:
  """(1-based line number, what is wrong) of the first line that is not `columns` tab-separated integers."""
  for n, line in enumerate(text.split(b"\n"), 1):
    fields = line.rstrip(b"\r").split(b"\t")
    if len(fields) != columns:
      return n, f"has {len(fields)} fields, expected {columns}"
    for f in fields:
      try:
        int(f)
      except ValueError:
        return n, f"has a field {f.decode(errors='replace')!r} that is not an integer"
  return 0, "could not be parsed"


def _parse_ints(text: bytes, columns: int, path: Path, layout: str) -> np.ndarray:
  """`text` (tab-separated integers, `columns` a line) as an int64 array [lines, columns]; UserError if not."""
  text = text.rstrip(b"\r\n\t ") + b"\n"
  buf = np.frombuffer(text, np.uint8)
  newline = buf[np.flatnonzero((buf == 9) | (buf == 10))] == 10  # each separator: a newline (True) or a tab
  ok = newline.size % columns == 0
  if ok:
    grid = newline.reshape(-1, columns)
    ok = bool(grid[:, -1].all()) and not grid[:, :-1].any()
  values = None
  if ok:
    try:
      values = np.fromstring(text, dtype=np.int64, sep=" ")  # any whitespace separates; C speed
    except ValueError:
      values = None
  if values is None or values.size != newline.size:
    line, what = _first_bad_line(text, columns)
    raise UserError(f"MovieLens file {path}, line {line} {what} (layout: {layout}); "
                    f"replace the file with an intact copy of NCF's.")
  return values.reshape(-1, columns)


def _check_ids(ids: np.ndarray, path: Path) -> None:
  bad = np.flatnonzero((ids < 0).any(axis=1))
  if bad.size:
    raise UserError(f"MovieLens file {path}, line {bad[0] + 1} holds a negative id; user and item ids count from 0.")


def load(folder: str | Path | None = None, prefix: str = DEFAULT_PREFIX) -> MovieLens:
  """Read ``<folder>/<prefix>.{train.rating,test.rating,test.negative}.gz`` (default: the shared ML-1M).

  num_users and num_items are one more than the largest id in any of the three files.
  """
  folder = Path(DEFAULT_DIR if folder is None else folder).expanduser()
  if not folder.is_dir():
    raise UserError(f"MovieLens folder {folder} not found: {_fix_hint(folder)}.")
  paths = {k: folder / f"{prefix}.{k}.gz" for k in ("train.rating", "test.rating", "test.negative")}
  texts = {k: _read_text(p, folder) for k, p in paths.items()}

  p = paths["train.rating"]
  first = texts["train.rating"].split(b"\n", 1)[0]
  cols = 4 if first.count(b"\t") == 3 else 3  # upstream has a timestamp column, the shared reconstruction not
  train = _parse_ints(texts["train.rating"], cols, p, "user⇥item⇥rating" + "⇥timestamp" * (cols == 4))
  _check_ids(train[:, :2], p)
  train = train[train[:, 2] > 0]

  p = paths["test.rating"]
  test = _parse_ints(texts["test.rating"], 4, p, "user⇥item⇥rating⇥timestamp")
  _check_ids(test[:, :2], p)
  wrong = np.flatnonzero(test[:, 0] != np.arange(len(test)))
  if wrong.size:
    i = int(wrong[0])
    raise UserError(f"MovieLens file {p}, line {i + 1} is for user {test[i, 0]}, expected {i}: the test file must "
                    "hold one line per user, users 0, 1, ... in order; replace it with an intact copy of NCF's.")

  p = paths["test.negative"]
  text = texts["test.negative"].replace(b"(", b"").replace(b")", b"").replace(b",", b"\t")
  neg = _parse_ints(text, 2 + NUM_TEST_NEGATIVES, p, f"(user,item)⇥neg_1⇥…⇥neg_{NUM_TEST_NEGATIVES}, "
                    "user and item counted as two fields")
  _check_ids(neg, p)
  if len(neg) != len(test):
    raise UserError(f"MovieLens file {p} has {len(neg)} lines, {paths['test.rating']} {len(test)}; they must match "
                    "line for line; replace them with intact copies of NCF's.")
  wrong = np.flatnonzero((neg[:, :2] != test[:, :2]).any(axis=1))
  if wrong.size:
    i = int(wrong[0])
    raise UserError(f"MovieLens file {p}, line {i + 1} starts with ({neg[i, 0]},{neg[i, 1]}), but line {i + 1} of "
                    f"{paths['test.rating']} is user {test[i, 0]}, item {test[i, 1]}; the files must match line "
                    "for line.")

  num_users = int(max(train[:, 0].max(initial=-1), len(test) - 1)) + 1
  num_items = int(max(train[:, 1].max(initial=-1), test[:, 1].max(initial=-1), neg[:, 2:].max(initial=-1))) + 1
  if num_users != len(test):
    raise UserError(f"MovieLens file {paths['train.rating']} has users up to {num_users - 1}, but "
                    f"{paths['test.rating']} has lines for users 0..{len(test) - 1}; every user needs a test line.")
  if num_items >= 2**31 or num_users >= 2**31:
    raise UserError(f"MovieLens files in {folder}: ids beyond int32; renumber users and items from 0.")

  key = np.unique(train[:, 0] * num_items + train[:, 1])  # sorted by user, then item; repeats once
  users = (key // num_items).astype(np.int32)
  items = (key % num_items).astype(np.int32)
  indptr = np.zeros(num_users + 1, np.int64)
  np.cumsum(np.bincount(users, minlength=num_users), out=indptr[1:])
  return MovieLens(num_users=num_users, num_items=num_items, train_users=users, train_items=items, indptr=indptr,
                   indices=items, test_items=test[:, 1].astype(np.int32),
                   negatives=neg[:, 2:].astype(np.int32), folder=str(folder))


def sample_unrated(data: MovieLens, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One item per entry of `users`, uniform over the items that user has not rated in training (int32).

  Exact and loop-free: draw j uniform in [0, num_items − n_u) and return the j-th unrated item, j + (the
  number of rated items r_m with r_m − m ≤ j), found by one `searchsorted` over all users' CSR rows at once
  (no rejection, so the cost does not depend on how many items a user rated).
  """
  users = np.asarray(users, np.int64)
  degree = np.diff(data.indptr)
  free = data.num_items - degree[users]
  if users.size and free.min() <= 0:
    u = int(users[np.argmin(free)])
    raise ValueError(f"sample_unrated: user {u} rated every item; there is no negative to sample.")
  j = np.floor(rng.random(users.size) * free).astype(np.int64)
  j = np.minimum(j, free - 1)  # guards the (measure-zero) rounding of rng.random() * free up to free
  row = np.repeat(np.arange(data.num_users, dtype=np.int64), degree)
  stride = data.num_items + 1
  # rated item minus its position in its row: non-decreasing within a row, in [0, num_items]; offset per row
  shifted = row * stride + (data.indices - (np.arange(data.indices.size) - data.indptr[row]))
  k = np.searchsorted(shifted, users * stride + j, side="right") - data.indptr[users]
  return (j + k).astype(np.int32)


def epoch_examples(data: MovieLens, seed: int, epoch: int, num_negatives: int = 4) -> dict[str, np.ndarray]:
  """One epoch of NCF training examples: {'user', 'item' int32, 'label' float32}, shuffled.

  Every training positive once (label 1) plus `num_negatives` negatives for it (label 0), each uniform over
  the items its user has not rated in training (drawn independently: a negative may repeat). A pure
  function of (seed, epoch) via ``np.random.default_rng([seed, epoch])``: resuming at an epoch redraws it
  bit for bit.
  """
  if num_negatives < 0:
    raise ValueError(f"epoch_examples: num_negatives must be ≥ 0, got {num_negatives}.")
  if seed < 0 or epoch < 0:
    raise ValueError(f"epoch_examples: seed and epoch must be ≥ 0, got {seed}, {epoch}.")
  rng = np.random.default_rng([seed, epoch])
  neg_users = np.repeat(data.train_users, num_negatives)
  neg_items = sample_unrated(data, neg_users, rng)
  user = np.concatenate([data.train_users, neg_users])
  item = np.concatenate([data.train_items, neg_items])
  label = np.concatenate([np.ones(data.num_train, np.float32), np.zeros(neg_users.size, np.float32)])
  order = rng.permutation(user.size)
  return {"user": user[order], "item": item[order], "label": label[order]}


def eval_candidates(data: MovieLens) -> tuple[np.ndarray, np.ndarray]:
  """(users int32 [U], items int32 [U, 100]): column 0 each user's test item, columns 1.. its 99 negatives.

  Score ``model(users[:, None], items)`` and pass the scores (and `items`, to drop the upstream duplicates of
  the test item among its negatives) to `kure_jax.ranking.ranks`.
  """
  users = np.arange(data.num_users, dtype=np.int32)
  return users, np.concatenate([data.test_items[:, None], data.negatives], axis=1)


# ----------------------------------------------------------------------------------
# The training loop's view: `make_dataset(config.dataset, ...)` for dataset.name = 'movielens'.


class MovieLensDataset:
  """One split of MovieLens as per-host NumPy batches, with `kure_jax.data.Dataset`'s interface.

  Train (``train=True``): ``{"user" int32 [b], "item" int32 [b], "label" float32 [b] (1 positive, 0 negative),
  "mask" bool [b]}``. Epoch ``e = step // steps_per_epoch`` is ``epoch_examples(data, seed, e,
  num_negatives)`` (every positive plus its sampled negatives, shuffled; a pure function of (seed, e)) and
  batch ``step % steps_per_epoch`` its rows ``b·B … (b+1)·B − 1``; the last partial batch of an epoch is
  dropped (fewer than B of the ~(1 + num_negatives)·positives examples), as in the image pipeline. So batch
  ``step`` is a pure function of (seed, step) and a resumed run sees the batches of an uninterrupted one.
  `iterate` draws the next epoch in a background thread while the current one is consumed (ML-1M: ~0.7 s).

  Eval (``train=False``): the users in order, B = eval batch size users a batch, each with its 100
  candidates: ``{"user" int32 [b, 1], "item" int32 [b, 100] (column 0 the held-out positive), "mask" bool
  [b]}``; the last batch is padded with user 0's row and mask False.

  b = B / process_count rows for this host (host p keeps rows p·b … (p+1)·b − 1 of the global batch).
  Attributes: name, split, train, seed, data (the `MovieLens`), num_users, num_items, num_negatives,
  num_examples (examples per train epoch, or users), batch_size, local_batch_size, steps_per_epoch, start_step.
  """

  def __init__(self, data: MovieLens, *, split: str, batch_size: int, train: bool, seed: int, start_step: int,
               num_negatives: int, process_index: int, process_count: int):
    self.name, self.split, self.train, self.seed, self.data = "movielens", split, train, seed, data
    self.num_users, self.num_items, self.num_negatives = data.num_users, data.num_items, num_negatives
    self.batch_size, self.process_index, self.process_count = batch_size, process_index, process_count
    self.local_batch_size = batch_size // process_count
    self.num_examples = data.num_train * (1 + num_negatives) if train else data.num_users
    self.steps_per_epoch = (self.num_examples // batch_size if train else -(-self.num_examples // batch_size))
    self.start_step = start_step
    self._epochs: dict[int, Future] = {}
    self._lock = threading.Lock()
    self._pool: ThreadPoolExecutor | None = None
    if not train:
      self._users, self._items = eval_candidates(data)

  def __len__(self) -> int:
    return self.steps_per_epoch

  def __repr__(self) -> str:
    return (f"MovieLensDataset({self.split}, {self.num_users} users, {self.num_items} items, "
            f"{self.num_examples} {'examples an epoch' if self.train else 'users'}, batch {self.batch_size}, "
            f"{self.steps_per_epoch} steps/epoch)")

  def _epoch_future(self, epoch: int) -> Future:
    """Epoch `epoch`'s examples, drawn in a background thread (pure in (seed, epoch): order does not matter)."""
    with self._lock:
      if epoch not in self._epochs:
        if self._pool is None:
          self._pool = ThreadPoolExecutor(1, thread_name_prefix="kure_jax_movielens")
        self._epochs[epoch] = self._pool.submit(epoch_examples, self.data, self.seed, epoch, self.num_negatives)
        while len(self._epochs) > 3:
          self._epochs.pop(min(self._epochs))
      return self._epochs[epoch]

  def _epoch(self, epoch: int) -> dict[str, np.ndarray]:
    return self._epoch_future(epoch).result()

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    """Batch `step` for this host."""
    if step < 0:
      raise IndexError(f"step must be >= 0, got {step}.")
    lo = self.process_index * self.local_batch_size
    if self.train:
      epoch, b = divmod(step, self.steps_per_epoch)
      start = b * self.batch_size + lo
      ex = self._epoch(epoch)
      rows = slice(start, start + self.local_batch_size)
      return {"user": ex["user"][rows], "item": ex["item"][rows], "label": ex["label"][rows],
              "mask": np.ones(self.local_batch_size, bool)}
    if step >= self.steps_per_epoch:
      raise IndexError(f"step {step} is past the last batch ({self.steps_per_epoch - 1}) of this eval pass.")
    pos = np.arange(self.local_batch_size, dtype=np.int64) + step * self.batch_size + lo
    mask = pos < self.num_examples
    idx = np.where(mask, pos, 0)
    return {"user": self._users[idx][:, None], "item": self._items[idx], "mask": mask}

  def iterate(self, start_step: int | None = None, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches start_step, start_step+1, ...: endless for training, to the end of the pass for eval."""
    start = self.start_step if start_step is None else int(start_step)
    if start < 0 or (not self.train and start > self.steps_per_epoch):
      raise ValueError(f"start_step must be {'>= 0' if self.train else f'0..{self.steps_per_epoch}'}, got {start}.")
    stop = None if self.train else self.steps_per_epoch
    if num_steps is not None:
      stop = start + num_steps if stop is None else min(stop, start + num_steps)
    step = start
    while stop is None or step < stop:
      if self.train and (step % self.steps_per_epoch == 0 or step == start):
        self._epoch_future(step // self.steps_per_epoch + 1)  # draw the next epoch while this one trains
      yield self.get_batch(step)
      step += 1

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.iterate()


def make_dataset(config: Any, split: str, *, batch_size: int, train: bool, seed: int = 0, start_step: int = 0,
                 process_index: int | None = None, process_count: int | None = None) -> MovieLensDataset:
  """`kure_jax.data.make_dataset` for ``config.name == 'movielens'``: `MovieLensDataset` of one split.

  config: the dataset config; reads ``data_dir`` (the folder of NCF's three .gz files; unset: the shared
  ML-1M, `DEFAULT_DIR`) and ``num_negatives`` (sampled negatives per training positive). split: 'train'
  (NCF's training interactions) or 'eval' / 'test' (the leave-one-out test item with its 99 negatives).
  Raises UserError (a ValueError) for missing or malformed files, ValueError for a bad batch size or split.
  """
  if split not in ("train", "eval", "test"):
    raise ValueError(f"movielens has the splits 'train' and 'eval' (= 'test'), got {split!r}.")
  process_index, process_count = check_batching(batch_size, start_step, process_index, process_count)
  num_negatives = _get(config, "num_negatives", 4)
  if not isinstance(num_negatives, (int, np.integer)) or isinstance(num_negatives, bool) or num_negatives < 0:
    raise ValueError(f"dataset.num_negatives must be an int ≥ 0, got {num_negatives!r}.")
  folder = _get(config, "data_dir")
  try:
    data = load(folder)
  except UserError as e:
    raise UserError(f"{e} For training: --config.dataset.data_dir=FOLDER.") from None
  name = "train" if train else "test"
  if train and data.num_train * (1 + num_negatives) < batch_size:
    raise ValueError(f"movielens:{name} has {data.num_train * (1 + num_negatives)} examples an epoch, fewer than "
                     f"the global batch_size {batch_size}; a training epoch would have no full batch.")
  return MovieLensDataset(data, split=name, batch_size=int(batch_size), train=train, seed=int(seed),
                          start_step=int(start_step), num_negatives=int(num_negatives),
                          process_index=int(process_index), process_count=int(process_count))
