"""Input pipelines: one `make_dataset` for CIFAR-10, ImageNet, Imagenette, image folders and MovieLens.

``name='movielens'`` (NCF's implicit feedback, the 'ranking' task) returns a
`kure_jax.data.movielens.MovieLensDataset` with the same interface and (user, item) batches.

    from kure_jax.data import make_dataset
    train = make_dataset(config.dataset, "train", batch_size=128, train=True, seed=0, start_step=step)
    for batch in train:      # {"image": float32 NHWC normalized, "label": int32, "mask": bool}
      ...
    test = make_dataset(config.dataset, "eval", batch_size=1000, train=False)

Sources: TFDS by name through ``tfds.data_source`` (ArrayRecord builds; no TensorFlow
needed to read), ImageNet-style folders ``<split>/<class>/<image>``, and tar archives of
that layout (``*train*.tar.gz`` / ``*test*.tar.gz``, read without unpacking). Batches
are deterministic in (seed, step), sliced per host, and resumable at any step; see
`kure_jax.data.pipeline` for the exact contract.
"""

from kure_jax.data.cache import clear_memo, default_cache_dir
from kure_jax.data.pipeline import DATASET_NAMES, PREPROCESS_STYLES, Dataset, make_dataset
from kure_jax.data.sources import decode_image, locate
from kure_jax.data.transforms import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASET_NAMES",
    "Dataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PREPROCESS_STYLES",
    "clear_memo",
    "decode_image",
    "default_cache_dir",
    "locate",
    "make_dataset",
]
