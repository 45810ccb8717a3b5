"""ResNet-50 on ImageNet with KURE (the paper's recipe, batch 128; see configs/imagenet.py).

  python train.py --config configs/resnet50.py --workdir runs/resnet50_kure \
      --config.dataset.data_dir=/path/to/tensorflow_datasets --config.init_from=runs/resnet50_float
"""

from configs import imagenet


def get_config():
  return imagenet.get_config("resnet50", batch_size=128)
