"""Where images come from: class folders, tar archives of class folders, TFDS by name.

A `Source` gives random access to one split's ``(uint8 HWC RGB image, int label)``
pairs and a `fingerprint` of the files behind it (paths, sizes, mtimes; it keys the
on-disk cache). Three kinds:

* `FolderSource`: ``<data_dir>/<split>/<class>/<image>`` (ImageNet style). Labels are
  the indices of the sorted class folder names; files are read in sorted order.
* `ArchiveSource`: a ``*<split>*.tar.gz`` / ``.tgz`` / ``.tar`` file in ``data_dir``
  whose members are ``[<split>/]<class>/<image>``, read straight from the archive. A
  gzip archive cannot be seeked, so one pass reads every member's bytes into memory;
  a plain ``.tar`` is indexed once and read with ``pread``.
* `TfdsSource`: ``tfds.data_source`` (ArrayRecord files, random access, no TensorFlow).

`locate` turns (dataset name, split, data_dir) into a source, and fails with one
message that says how to provide the data.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
TFDS_NAMES = ("cifar10", "imagenet2012", "imagenette")
SPLIT_ALIASES = {"val": ("val", "validation"), "validation": ("validation", "val")}

_TFDS_HELP = {
    "cifar10": (
        "set dataset.data_dir to a directory holding `*train*.tar.gz` / `*test*.tar.gz` archives of "
        "`<split>/<class>/<image>.jpg` files (e.g. the shared JPEG copy of CIFAR-10, ../shared/data/cifar10) or "
        "`train/` and `test/` class folders; or build the TFDS ArrayRecord files once with "
        "`tfds build cifar10 --data_dir <data_dir> --file_format array_record` (the build needs TensorFlow, "
        "reading does not)."),
    "imagenet2012": (
        "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into <manual_dir> and run "
        "`tfds build imagenet2012 --data_dir <data_dir> --manual_dir <manual_dir> --file_format array_record` "
        "(the build needs TensorFlow, reading does not), or set dataset.name='folder' and dataset.data_dir to "
        "an ImageNet folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG."),
    "imagenette": (
        "run `tfds build imagenette --data_dir <data_dir> --file_format array_record` (the build needs "
        "TensorFlow, reading does not), or set dataset.data_dir (or dataset.name='folder') to the unpacked "
        "imagenette2 folder with train/ and val/."),
}


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes (JPEG, PNG, ...) as a uint8 (H, W, 3) RGB array."""
  with Image.open(io.BytesIO(data)) as im:
    if im.mode != "RGB":
      im = im.convert("RGB")
    return np.asarray(im)


def _is_image(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _digest(parts: list[str]) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(p.encode())
    h.update(b"\0")
  return h.hexdigest()[:20]


class Source:
  """Random access to one split's (uint8 HWC RGB image, int label) pairs."""

  description: str = ""
  tag: str = "data"  # a readable name for cache files
  fingerprint: str | None = None  # identifies the files' contents (size + mtime); None: not cacheable

  def __len__(self) -> int:
    raise NotImplementedError

  @property
  def class_names(self) -> tuple[str, ...]:
    raise NotImplementedError

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def load(self, index: int) -> tuple[np.ndarray, int]:
    raise NotImplementedError


class _LabeledItems(Source):
  """A source over a sorted list of (key, class name) items, labels by sorted class names."""

  def __init__(self):
    self._items: list[Any] | None = None
    self._labels: np.ndarray | None = None
    self._classes: tuple[str, ...] | None = None
    self._lock = threading.Lock()

  def _scan(self) -> tuple[list[Any], list[str]]:
    raise NotImplementedError

  def _ensure(self) -> None:
    with self._lock:
      if self._items is not None:
        return
      items, classes = self._scan()
      if not items:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise FileNotFoundError(f"{self.description}: no image files ({exts}) in the layout <split>/<class>/<image>.")
      names = tuple(sorted(set(classes)))
      lookup = {c: i for i, c in enumerate(names)}
      self._labels = np.array([lookup[c] for c in classes], np.int32)
      self._items, self._classes = items, names

  def __len__(self) -> int:
    self._ensure()
    return len(self._items)

  @property
  def class_names(self) -> tuple[str, ...]:
    self._ensure()
    return self._classes

  @property
  def labels(self) -> np.ndarray:
    self._ensure()
    return self._labels


class FolderSource(_LabeledItems):
  """Images in ``root/<class>/**/<image>``; classes are the sorted sub-folder names."""

  def __init__(self, root: Path):
    super().__init__()
    self.root = Path(root)
    self.description = f"image folder {self.root}"
    self.tag = f"{self.root.resolve().parent.name}-{self.root.name}"
    self._fingerprint: str | None = None

  @property
  def fingerprint(self) -> str:
    """Names, sizes and mtimes of all files (one stat each, so computed only when asked)."""
    if self._fingerprint is None:
      self._ensure()
      stats = []
      for path in self._items:
        st = os.stat(path)
        stats.append(f"{os.path.relpath(path, self.root)}:{st.st_size}:{st.st_mtime_ns}")
      self._fingerprint = f"folder:{self.root.resolve()}:{len(stats)}:{_digest(stats)}"
    return self._fingerprint

  def _scan(self) -> tuple[list[Any], list[str]]:
    items, classes = [], []
    for cls in sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")):
      for dirpath, _, filenames in sorted(os.walk(self.root / cls, followlinks=True)):
        for f in sorted(filenames):
          if _is_image(f) and not f.startswith("."):
            items.append(os.path.join(dirpath, f))
            classes.append(cls)
    return items, classes

  def load(self, index: int) -> tuple[np.ndarray, int]:
    self._ensure()
    with open(self._items[index], "rb") as f:
      return decode_image(f.read()), int(self._labels[index])


class ArchiveSource(_LabeledItems):
  """Images in a tar archive with members ``[<split>/]<class>/<image>``, read without unpacking."""

  def __init__(self, path: Path):
    super().__init__()
    self.path = Path(path)
    self.description = f"archive {self.path}"
    self.tag = re.sub(r"(\.tar\.gz|\.tgz|\.tar)$", "", self.path.name)
    st = os.stat(self.path)
    self.fingerprint = f"archive:{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    self._compressed = not self.path.name.endswith(".tar")
    self._fd: int | None = None

  def _scan(self) -> tuple[list[Any], list[str]]:
    found = []
    mode = "r:*" if self._compressed else "r:"
    with tarfile.open(self.path, mode) as tar:
      for m in tar:
        if not m.isfile():
          continue
        parts = [p for p in m.name.split("/") if p not in ("", ".")]
        if len(parts) < 2 or not _is_image(parts[-1]) or parts[-1].startswith("."):
          continue
        key = tar.extractfile(m).read() if self._compressed else (m.offset_data, m.size)
        found.append(("/".join(parts), parts[-2], key))
    found.sort(key=lambda t: t[0])
    if not self._compressed:
      self._fd = os.open(self.path, os.O_RDONLY)
    return [k for _, _, k in found], [c for _, c, _ in found]

  def load(self, index: int) -> tuple[np.ndarray, int]:
    self._ensure()
    item = self._items[index]
    data = item if self._compressed else os.pread(self._fd, item[1], item[0])
    return decode_image(data), int(self._labels[index])

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)
      self._fd = None


class TfdsSource(Source):
  """A TFDS dataset read through ``tfds.data_source`` (ArrayRecord, random access, no TensorFlow)."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self.description = f"TFDS {name}:{split}" + (f" in {data_dir}" if data_dir else "")
    self.tag = f"{name}-{split}"
    # download=False: a missing dataset must fail here, not start a download.
    self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    features = self._ds.dataset_info.features
    if "image" not in features or "label" not in features:
      raise ValueError(f"{self.description}: expected features 'image' and 'label', found {list(features.keys())}.")
    self._names = tuple(features["label"].names)
    self.fingerprint = self._file_fingerprint(name, split)

  def _file_fingerprint(self, name: str, split: str) -> str | None:
    try:
      root = Path(str(self._ds.dataset_info.data_dir))
      files = sorted(root.glob(f"{name}-{split.split('[')[0]}.array_record*"))
    except Exception:  # pragma: no cover - exotic file systems
      return None
    if not files:
      return None  # e.g. under tfds.testing.mock_data: nothing on disk to key a cache by
    stats = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return f"tfds:{root.resolve()}:{split}:{_digest(stats)}"

  def __len__(self) -> int:
    return len(self._ds)

  @property
  def class_names(self) -> tuple[str, ...]:
    return self._names

  def load(self, index: int) -> tuple[np.ndarray, int]:
    ex = self._ds[int(index)]
    return np.asarray(ex["image"]), int(ex["label"])


def _tokens(filename: str) -> set[str]:
  return set(t for t in re.split(r"[^0-9a-zA-Z]+", filename.lower()) if t)


def find_local_split(data_dir: Path, split: str) -> Source | None:
  """A folder ``data_dir/<split>/`` or the one archive in data_dir whose name contains the split."""
  aliases = SPLIT_ALIASES.get(split, (split,))
  for alias in aliases:
    if (data_dir / alias).is_dir():
      return FolderSource(data_dir / alias)
  archives = sorted(p for p in data_dir.iterdir() if p.is_file() and p.name.lower().endswith(ARCHIVE_SUFFIXES))
  for alias in aliases:
    hits = [p for p in archives if alias.lower() in _tokens(p.name)]
    if len(hits) > 1:
      raise ValueError(f"split {split!r}: more than one archive in {data_dir} matches: "
                       f"{', '.join(p.name for p in hits)}; keep one per split.")
    if hits:
      return ArchiveSource(hits[0])
  return None


def _listing(data_dir: Path) -> str:
  try:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in data_dir.iterdir())
  except OSError:
    return "(unreadable)"
  if not names:
    return "(empty)"
  return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")


def locate(name: str, split: str, data_dir: str | os.PathLike | None) -> Source:
  """The source of `split` for dataset `name`; raises one readable error when there is none.

  'folder' needs data_dir with a split folder or archive. A TFDS name first looks for the
  same local layout in data_dir (so the shared CIFAR-10 tarballs work as 'cifar10'), then
  for a prepared ArrayRecord build of the TFDS dataset there (or in TFDS's default dir).
  """
  local_layout = (f"a folder <data_dir>/{split}/<class>/<image> or an archive <data_dir>/*{split}*.tar.gz "
                  f"(or .tgz, .tar) with members {split}/<class>/<image>")
  base = split.split("[")[0]
  if data_dir is not None and str(data_dir) != "":
    root = Path(os.path.expanduser(str(data_dir)))
    if root.is_dir():
      found = find_local_split(root, base)
      if found is not None:
        if base != split:
          raise ValueError(f"split {split!r}: slicing ('train[:90%]') works only for TFDS builds, not for "
                           f"{found.description}; use one folder or archive per split.")
        return found
      if name == "folder":
        raise FileNotFoundError(f"dataset.name='folder': no split {split!r} in data_dir {str(root)!r}: expected "
                                f"{local_layout}. The directory holds: {_listing(root)}.")
    elif name == "folder":
      raise FileNotFoundError(f"dataset.name='folder': data_dir {str(data_dir)!r} is not a directory; it must "
                              f"hold {local_layout}.")
  elif name == "folder":
    raise ValueError(f"dataset.name='folder' needs dataset.data_dir: a directory with {local_layout}.")
  try:
    return TfdsSource(name, split, None if data_dir in (None, "") else str(data_dir))
  except Exception as e:  # noqa: BLE001 - tfds raises many kinds; one message replaces them
    where = (f"data_dir {str(data_dir)!r}" if data_dir not in (None, "")
             else "TFDS's default data_dir (dataset.data_dir is not set)")
    raise FileNotFoundError(
        f"dataset.name={name!r}, split {split!r}: no data in {where}: no folder <data_dir>/{base}/<class>/<image>, "
        f"no archive <data_dir>/*{base}*.tar.gz (or .tgz, .tar) with members {base}/<class>/<image>, and "
        f"{_tfds_state(name, data_dir, e)}. To provide it: {_TFDS_HELP[name]}") from e


def _tfds_state(name: str, data_dir: Any, error: Exception) -> str:
  """Why tfds.data_source failed, in words: nothing prepared, a TFRecord build, or TFDS's own reason."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    prepared = Path(str(tfds.builder(name, data_dir=None if data_dir in (None, "") else str(data_dir)).data_dir))
  except Exception:  # noqa: BLE001
    prepared = None
  if prepared is not None:
    files = [p.name for p in prepared.glob(f"{name}-*")] if prepared.is_dir() else []
    if any(".tfrecord" in f for f in files):
      return (f"the TFDS build at {prepared} is in TFRecord format, which needs TensorFlow to read (rebuild it "
              "with --file_format array_record)")
    if not files:
      return f"no TFDS ArrayRecord build (nothing prepared at {prepared})"
  reason = " ".join(str(error).split())
  reason = reason if len(reason) <= 200 else reason[:200] + "..."
  return f"no readable TFDS ArrayRecord build ({type(error).__name__}: {reason})"
