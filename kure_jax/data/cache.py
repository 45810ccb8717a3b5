"""Decode a small split once into a uint8 array, keep it in memory, optionally on disk.

The decoded array (N, S, S, 3) uint8 plus labels and class names is what the CIFAR-style
pipeline works from. Decoding 50,000 CIFAR JPEGs takes a few seconds on two cores; the
on-disk copy (an uncompressed ``.npz``, 150 MB for CIFAR-10 train) loads in a fraction
of a second. The file name carries a hash of the source's fingerprint (paths, sizes and
mtimes of its files), the image size and a format version, so changed data is never
served stale; it is written to a temporary file in the same directory and renamed into
place, so a crash or two concurrent runs never leave a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kure_jax.data.sources import Source
from kure_jax.data.transforms import resize_exact

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
PROGRESS_MIN_IMAGES = 2000  # show a progress bar when decoding at least this many images
_CHUNK = 500
_MEMO_SIZE = 4

_memo: dict[str, tuple[np.ndarray, np.ndarray, tuple[str, ...]]] = {}
_memo_lock = threading.Lock()


def default_cache_dir() -> Path:
  """$KURE_JAX_CACHE_DIR, else $XDG_CACHE_HOME/kure_jax, else ~/.cache/kure_jax."""
  if os.environ.get("KURE_JAX_CACHE_DIR"):
    return Path(os.environ["KURE_JAX_CACHE_DIR"]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "kure_jax"


def cache_file(cache_dir: Path, tag: str, fingerprint: str, image_size: int) -> Path:
  """The cache file for one source at one image size."""
  key = hashlib.sha256(f"{CACHE_FORMAT}|{fingerprint}|{image_size}".encode()).hexdigest()[:16]
  safe_tag = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in tag)
  return Path(cache_dir) / f"{safe_tag}-{image_size}px-{key}.npz"


def decode_all(source: Source, image_size: int, workers: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
  """Every image of `source` resized to image_size² (only if needed) in a uint8 array, and the labels."""
  n = len(source)
  images = np.empty((n, image_size, image_size, 3), np.uint8)
  labels = np.empty((n,), np.int32)

  def run(start: int) -> int:
    stop = min(start + _CHUNK, n)
    for i in range(start, stop):
      image, labels[i] = source.load(i)
      images[i] = resize_exact(image, image_size)
    return stop - start

  with tqdm(total=n, desc=desc, unit="img", disable=n < PROGRESS_MIN_IMAGES, leave=False) as bar:
    with ThreadPoolExecutor(max(1, workers)) as pool:
      for fut in as_completed([pool.submit(run, s) for s in range(0, n, _CHUNK)]):
        bar.update(fut.result())
  return images, labels


def _load_file(path: Path, image_size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]] | None:
  try:
    with np.load(path, allow_pickle=False) as z:
      images, labels, names = z["images"], z["labels"], tuple(str(c) for c in z["class_names"])
  except FileNotFoundError:
    return None
  except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
    log.warning("ignoring unreadable cache file %s (%s); decoding again.", path, e)
    return None
  if images.dtype != np.uint8 or images.shape[1:] != (image_size, image_size, 3) or len(labels) != len(images):
    log.warning("ignoring cache file %s with unexpected contents; decoding again.", path)
    return None
  return images, labels.astype(np.int32), names


def _save_file(path: Path, images: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> None:
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a cache may be shared like any other file
    with os.fdopen(fd, "wb") as f:
      np.savez(f, images=images, labels=labels, class_names=np.array(names, dtype=str))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file, no file, or the whole new one
    tmp = None
  except OSError as e:
    log.warning("could not write the data cache %s (%s); continuing without it.", path, e)
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)


def load_decoded(source: Source, image_size: int, *, cache_dir: Path | None,
                 workers: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """(images uint8 (N, S, S, 3), labels int32 (N,), class names) of `source`, decoded at most once.

  Looks in this process's memo, then in `cache_dir` (None: no disk cache), then decodes
  with `workers` threads and fills both.
  """
  fingerprint = source.fingerprint
  key = None if fingerprint is None else f"{fingerprint}|{image_size}"
  path = None
  if cache_dir is not None and fingerprint is not None:
    path = cache_file(cache_dir, source.tag, fingerprint, image_size)
  if key is not None:
    with _memo_lock:
      found = _memo.get(key)
    if found is not None:
      if path is not None and not path.exists():
        _save_file(path, *found)
      return found
  found = None if path is None else _load_file(path, image_size)
  if found is None:
    t0 = time.perf_counter()
    images, labels = decode_all(source, image_size, workers, desc=f"decoding {source.tag}")
    found = (images, labels, tuple(source.class_names))
    log.info("decoded %d images of %s in %.1f s", len(images), source.description, time.perf_counter() - t0)
    if path is not None:
      _save_file(path, *found)
  if key is not None:
    with _memo_lock:
      _memo[key] = found
      while len(_memo) > _MEMO_SIZE:
        _memo.pop(next(iter(_memo)))
  return found


def clear_memo() -> None:
  """Forget the decoded arrays this process holds (the disk cache stays)."""
  with _memo_lock:
    _memo.clear()
