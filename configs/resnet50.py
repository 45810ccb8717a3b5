"""ResNet-50 on ImageNet with KURE, fine-tuned from torchvision's weights (the paper's recipe, batch 128,
90 epochs; see configs/imagenet.py).

  python train.py --config configs/resnet50.py --workdir runs/resnet50_kure \
      --config.dataset.data_dir=/path/to/tensorflow_datasets \
      --config.init_from=torchvision:/path/to/resnet50-0676ba61.pth

Both overrides are optional: data defaults to TFDS's data_dir (~/tensorflow_datasets), weights
to torchvision's download cache (~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth).
"""

from configs import imagenet


def get_config():
  return imagenet.get_config("resnet50", batch_size=128, num_epochs=90)
