"""ResNet-18 on ImageNet with KURE (the paper's recipe, batch 256; see configs/imagenet.py).

  python train.py --config configs/resnet18.py --workdir runs/resnet18_kure \
      --config.dataset.data_dir=/path/to/tensorflow_datasets --config.init_from=runs/resnet18_float
"""

from configs import imagenet


def get_config():
  return imagenet.get_config("resnet18", batch_size=256)
