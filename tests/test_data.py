"""Input pipeline: sources, normalization, eval padding, determinism, resume, augmentation, hosts, errors."""

import io
import os
import tarfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from kure_jax import data
from kure_jax.data import make_dataset, transforms

SHARED_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
CLASSES = ("bee", "ant", "cat")  # written unsorted on purpose: labels follow the sorted names
COUNTS = {"train": (7, 5, 9), "test": (3, 4, 3)}


def colour(split, cls, k):
  """A unique constant colour per image, so an image identifies itself."""
  return (CLASSES.index(cls) * 60 + k * 5, 17 + k, 200 if split == "train" else 100)


def write_tree(root, size=32):
  """root/<split>/<class>/<k>.png with constant colours (lossless); one JPEG per class for coverage."""
  for split, counts in COUNTS.items():
    for cls, n in zip(CLASSES, counts):
      (root / split / cls).mkdir(parents=True)
      for k in range(n):
        Image.new("RGB", (size, size), colour(split, cls, k)).save(root / split / cls / f"{k:03d}.png")
      Image.new("RGB", (size, size), (9, 9, 9)).save(root / split / cls / "zzz.jpg", quality=95)
  (root / "train" / "README.txt").write_text("not an image")
  return root


def expected_examples(split):
  """Sorted classes → label; per class the PNGs then the JPEG (file names sorted)."""
  out = []
  for label, cls in enumerate(sorted(CLASSES)):
    n = COUNTS[split][CLASSES.index(cls)]
    out += [(label, colour(split, cls, k)) for k in range(n)] + [(label, (9, 9, 9))]
  return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  return write_tree(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def tarballs(tree, tmp_path_factory):
  out = tmp_path_factory.mktemp("tarballs")
  for split in COUNTS:
    with tarfile.open(out / f"tiny-{split}.tar.gz", "w:gz") as tar:
      tar.add(tree / split, arcname=split)
  return out


def cfg(data_dir, **kw):
  return {"name": "folder", "data_dir": str(data_dir), "image_size": 32, "num_classes": 3, "cache": False, **kw}


def raw_pixels(batch, mean=transforms.CIFAR10_MEAN, std=transforms.CIFAR10_STD):
  """Undo the normalization: uint8-valued float64 pixels."""
  return batch["image"].astype(np.float64) * np.asarray(std) * 255 + np.asarray(mean) * 255


def eval_pass(ds):
  seen = []
  for batch in ds:
    assert batch["image"].shape == (ds.local_batch_size, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool
    assert np.all(batch["image"][~batch["mask"]] == 0) and np.all(batch["label"][~batch["mask"]] == 0)
    px = raw_pixels(batch)
    for i in np.flatnonzero(batch["mask"]):
      seen.append((int(batch["label"][i]), tuple(int(v) for v in np.round(px[i, 0, 0]))))
  return seen


@pytest.mark.parametrize("kind", ["folder", "tarball"])
def test_folder_and_tarball_eval_every_example_once(kind, tree, tarballs):
  root = tree if kind == "folder" else tarballs
  ds = make_dataset(cfg(root), "train", batch_size=4, train=False)
  assert (ds.num_examples, ds.num_classes, ds.class_names) == (24, 3, ("ant", "bee", "cat"))
  assert ds.steps_per_epoch == len(ds) == 6  # 24 / 4
  ds = make_dataset(cfg(root), "eval", batch_size=5, train=False)  # 'eval' → the 'test' split here
  assert ds.split == "test" and ds.num_examples == 13 and ds.steps_per_epoch == 3  # 13 = 5 + 5 + 3 (+2 padding)
  seen = eval_pass(ds)
  want = expected_examples("test")
  jpeg = [s for s in seen if s[1][2] < 50]  # the JPEGs decode to about (9, 9, 9)
  assert len(jpeg) == 3 and all(max(abs(v - 9) for v in s[1]) <= 2 for s in jpeg)
  assert sorted(s for s in seen if s[1][2] >= 50) == sorted(s for s in want if s[1] != (9, 9, 9))
  assert sorted(s[0] for s in jpeg) == [0, 1, 2]


def test_normalization_of_constant_colours(tree):
  ds = make_dataset(cfg(tree, mean=(0.5, 0.25, 0.75), std=(0.5, 0.25, 0.125)), "test", batch_size=13, train=False)
  batch = ds.get_batch(0)
  label, rgb = expected_examples("test")[0]
  want = (np.array(rgb) / 255 - [0.5, 0.25, 0.75]) / [0.5, 0.25, 0.125]
  np.testing.assert_allclose(batch["image"][0], np.broadcast_to(want, (32, 32, 3)), atol=1e-5)
  assert batch["label"][0] == label
  default = make_dataset(cfg(tree), "test", batch_size=13, train=False).get_batch(0)["image"][0, 0, 0]
  np.testing.assert_allclose(default, (np.array(rgb) / 255 - transforms.CIFAR10_MEAN) / transforms.CIFAR10_STD,
                             atol=1e-5)


def test_eval_padding_over_two_hosts(tarballs):
  seen = []
  for host in range(2):
    ds = make_dataset(cfg(tarballs), "test", batch_size=6, train=False, process_index=host, process_count=2)
    assert ds.local_batch_size == 3 and ds.steps_per_epoch == 3  # 13 → 6 + 6 + 1 (+5 padding)
    masks = [b["mask"].sum() for b in ds]
    seen += [(host, m) for m in masks]
  assert sum(m for _, m in seen) == 13
  # host 0 holds positions 12..14 of the last batch (one real example), host 1 only padding
  assert [m for h, m in seen if h == 1][-1] == 0 and [m for h, m in seen if h == 0][-1] == 1


def random_tree(root, n=64, size=32, seed=0):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
  for i in range(n):
    d = root / "train" / f"c{i % 2}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[i]).save(d / f"{i:03d}.png")
  return root


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
  root = random_tree(tmp_path_factory.mktemp("noise"))
  ds = make_dataset(cfg(root, num_classes=2), "train", batch_size=64, train=False)
  originals = np.round(raw_pixels(ds.get_batch(0))).astype(np.uint8)  # ordered: index i → originals[i]
  return root, originals


def batches(ds, start, n):
  return [b for b in ds.iterate(start, n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in ("image", "label", "mask"):
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("preprocess", ["cifar", "imagenet"])
def test_determinism_and_resume_across_epochs(noise, preprocess):
  root, _ = noise
  make = lambda seed, **kw: make_dataset(cfg(root, num_classes=2, preprocess=preprocess), "train", batch_size=12,
                                         train=True, seed=seed, **kw)
  ds = make(3)
  assert ds.steps_per_epoch == 5 and ds.in_memory == (preprocess == "cifar")  # 64 // 12, 4 dropped per epoch
  full = batches(ds, 0, 13)  # epochs 0, 1 and part of 2
  assert_same(full, batches(make(3, num_workers=1, prefetch=0), 0, 13))
  assert_same(full[4:], batches(ds, 4, 9))  # resume just before an epoch boundary
  assert_same(full[7:], list(make(3, start_step=7).iterate(num_steps=6)))
  assert_same(full[11:12], [ds.get_batch(11)])
  epoch0 = np.concatenate([ds.batch_indices(s)[0] for s in range(5)])
  epoch1 = np.concatenate([ds.batch_indices(s)[0] for s in range(5, 10)])
  assert len(set(epoch0)) == 60 and not np.array_equal(epoch0, epoch1)  # no repeats; a new order each epoch
  other = batches(make(4), 0, 2)
  assert not np.array_equal(other[0]["image"], full[0]["image"])
  assert not np.array_equal(ds.batch_indices(0)[0], make(4).batch_indices(0)[0])


def test_random_crop_and_flip(noise):
  root, originals = noise
  ds = make_dataset(cfg(root, num_classes=2), "train", batch_size=64, train=True, seed=0)
  padded = np.pad(originals, ((0, 0), (4, 4), (4, 4), (0, 0)))
  flips, shifts = [], []
  for step in range(6):  # 6 epochs × 64 examples
    batch, (idx, _) = ds.get_batch(step), ds.batch_indices(step)
    out = np.round(raw_pixels(batch)).astype(np.uint8)
    for row, i in enumerate(idx):
      hits = [(dy - 4, dx - 4, f) for dy in range(9) for dx in range(9) for f in (0, 1)
              if np.array_equal(out[row], (padded[i, dy:dy + 32, dx:dx + 32])[:, ::-1 if f else 1])]
      assert len(hits) == 1, f"example {i}: not a ≤4 px shift (+ flip) of its original with zero padding"
      shifts.append(hits[0][:2])
      flips.append(hits[0][2])
  assert 0.4 < np.mean(flips) < 0.6  # 384 draws: ±4 σ
  assert len(set(shifts)) > 60 and max(max(abs(a), abs(b)) for a, b in shifts) == 4


def test_host_slices_partition_the_global_batch(noise, monkeypatch):
  root, _ = noise
  config = cfg(root, num_classes=2)
  whole = make_dataset(config, "train", batch_size=16, train=True, seed=1, process_index=0, process_count=1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  parts = []
  for host in range(2):
    monkeypatch.setattr(jax, "process_index", lambda host=host: host)
    parts.append(make_dataset(config, "train", batch_size=16, train=True, seed=1))
  assert [p.local_batch_size for p in parts] == [8, 8] and [p.process_index for p in parts] == [0, 1]
  for step in (0, 5):  # 5 = a later epoch
    i0, i1 = parts[0].batch_indices(step)[0], parts[1].batch_indices(step)[0]
    assert not set(i0) & set(i1)
    np.testing.assert_array_equal(np.concatenate([i0, i1]), whole.batch_indices(step)[0])
    b0, b1, b = parts[0].get_batch(step), parts[1].get_batch(step), whole.get_batch(step)
    np.testing.assert_array_equal(np.concatenate([b0["image"], b1["image"]]), b["image"])
    np.testing.assert_array_equal(np.concatenate([b0["label"], b1["label"]]), b["label"])


def test_disk_cache_roundtrip_and_invalidation(tarballs, tmp_path):
  config = cfg(tarballs, cache=True)
  first = make_dataset(config, "test", batch_size=13, train=False, cache_dir=tmp_path).get_batch(0)
  files = sorted(tmp_path.glob("*.npz"))
  assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
  data.clear_memo()
  again = make_dataset(config, "test", batch_size=13, train=False, cache_dir=tmp_path).get_batch(0)
  assert_same([first], [again])
  archive = tarballs / "tiny-test.tar.gz"
  st = archive.stat()
  os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a "changed" source gets a new cache file
  make_dataset(config, "test", batch_size=13, train=False, cache_dir=tmp_path)
  assert len(list(tmp_path.glob("*.npz"))) == 2
  data.clear_memo()
  make_dataset(cfg(tarballs, cache=False), "test", batch_size=13, train=False, cache_dir=tmp_path / "off")
  assert not (tmp_path / "off").exists()


def test_imagenet_transforms():
  img = np.full((50, 80, 3), 77, np.uint8)
  out = transforms.imagenet_eval(img, 24)  # resize shorter side to 27, center crop 24
  assert out.shape == (24, 24, 3) and np.all(out == 77)
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = transforms.random_resized_crop_box(rng, 50, 80)
    assert 0 <= top <= 50 - h and 0 <= left <= 80 - w and h > 0 and w > 0
    assert 0.08 * 4000 * 0.9 <= h * w <= 4000 and 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.2
  grad = np.broadcast_to(np.arange(80, dtype=np.uint8)[None, :, None] * 3, (50, 80, 3)).copy()
  a = transforms.imagenet_train(grad, transforms.example_rng(0, 0, 5), 16)
  b = transforms.imagenet_train(grad, transforms.example_rng(0, 0, 5), 16)
  assert a.shape == (16, 16, 3) and np.array_equal(a, b)


@pytest.mark.parametrize("name,image_size,num_classes,eval_split", [
    ("cifar10", 32, 10, "test"), ("imagenet2012", 24, 1000, "validation"), ("imagenette", 24, 10, "validation")])
def test_tfds_by_name_on_mock_data(name, image_size, num_classes, eval_split):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = ml_collections.ConfigDict({"name": name, "data_dir": None, "image_size": image_size,
                                      "num_classes": num_classes})  # what the trainer passes
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    train = make_dataset(config, "train", batch_size=8, train=True, seed=0)
    test = make_dataset(config, "eval", batch_size=8, train=False)
    assert (train.num_examples, train.steps_per_epoch, train.num_classes) == (20, 2, num_classes)
    assert train.preprocess == ("cifar" if name == "cifar10" else "imagenet") and test.split == eval_split
    b = train.get_batch(3)
    assert b["image"].shape == (8, image_size, image_size, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].all() and b["label"].max() < num_classes
    assert_same([b], batches(train, 3, 1))
    masks = [e["mask"] for e in test]
    assert len(masks) == 3 and sum(m.sum() for m in masks) == 20  # 8 + 8 + 4 (+4 padding)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason=f"real CIFAR-10 not found at {SHARED_CIFAR10} "
                    "(the shared JPEG tarballs beside the project)")
def test_real_cifar10_test_split_from_tarball():
  config = {"name": "cifar10", "data_dir": str(SHARED_CIFAR10), "image_size": 32, "num_classes": 10, "cache": False}
  ds = make_dataset(config, "eval", batch_size=1024, train=False)
  assert (ds.split, ds.num_examples, ds.steps_per_epoch) == ("test", 10_000, 10)
  assert ds.class_names[:3] == ("airplane", "automobile", "bird") and ds.class_names[-1] == "truck"
  total, counts = np.zeros(3), np.zeros(10, int)
  for batch in ds:
    m = batch["mask"]
    total += raw_pixels(batch)[m].sum(axis=(0, 1, 2)) / 255
    counts += np.bincount(batch["label"][m], minlength=10)
  np.testing.assert_array_equal(counts, 1000)
  np.testing.assert_allclose(total / (10_000 * 32 * 32), (0.4941, 0.4851, 0.4504), atol=0.002)


def test_bad_input_messages(tree, tmp_path):
  with pytest.raises(ValueError, match=r"unknown dataset.name 'cifar11'.*'cifar10', 'imagenet2012'"):
    make_dataset({"name": "cifar11", "image_size": 32}, "train", batch_size=8, train=True)
  with pytest.raises(ValueError, match="'folder' needs dataset.data_dir"):
    make_dataset({"name": "folder", "data_dir": None, "image_size": 32}, "train", batch_size=8, train=True)
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    make_dataset(cfg(tmp_path / "missing"), "train", batch_size=8, train=True)
  (tmp_path / "stuff.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"no split 'train'.*<data_dir>/train/<class>/<image>.*stuff.txt"):
    make_dataset(cfg(tmp_path), "train", batch_size=8, train=True)
  with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_img_train.tar.*--manual_dir.*dataset.name='folder'"):
    make_dataset({"name": "imagenet2012", "data_dir": str(tmp_path), "image_size": 224}, "train", batch_size=8,
                 train=True)
  with pytest.raises(FileNotFoundError, match=r"tfds build cifar10 .*--file_format array_record"):
    make_dataset({"name": "cifar10", "data_dir": str(tmp_path), "image_size": 32}, "eval", batch_size=8, train=False)
  with pytest.raises(ValueError, match=r"batch_size 10 is not divisible .*process_count\(\) = 4"):
    make_dataset(cfg(tree), "train", batch_size=10, train=True, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="num_classes is 10 but folder:train has 3 classes"):
    make_dataset(cfg(tree, num_classes=10), "train", batch_size=8, train=True)
  with pytest.raises(ValueError, match="fewer than the global batch_size"):
    make_dataset(cfg(tree), "train", batch_size=32, train=True)
  with pytest.raises(ValueError, match="image_size must be a positive int"):
    make_dataset(cfg(tree, image_size=0), "train", batch_size=8, train=True)


def test_jpeg_in_tar_members_and_plain_tar(tmp_path):
  """A plain (uncompressed) .tar is read by offset; members may sit at class level without a split folder."""
  buf = io.BytesIO()
  Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="JPEG", quality=95)
  with tarfile.open(tmp_path / "x_train.tar", "w") as tar:
    for cls in ("b", "a"):
      for k in range(3):
        info = tarfile.TarInfo(f"{cls}/{k}.jpg")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
  ds = make_dataset(cfg(tmp_path, num_classes=2, image_size=16, preprocess="imagenet", mean=(0, 0, 0),
                        std=(1, 1, 1)), "train", batch_size=6, train=False)
  batch = ds.get_batch(0)
  assert batch["image"].shape == (6, 16, 16, 3) and list(batch["label"]) == [0, 0, 0, 1, 1, 1]
  np.testing.assert_allclose(batch["image"].mean(axis=(0, 1, 2)) * 255, (10, 200, 30), atol=3)
