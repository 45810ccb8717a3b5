"""MobileNet-V2 on ImageNet with KURE (the paper's recipe, batch 256; see configs/imagenet.py).

  python train.py --config configs/mobilenet_v2.py --workdir runs/mobilenet_v2_kure \
      --config.dataset.data_dir=/path/to/tensorflow_datasets --config.init_from=runs/mobilenet_v2_float
"""

from configs import imagenet


def get_config():
  return imagenet.get_config("mobilenet_v2", batch_size=256)
