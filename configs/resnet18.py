"""ResNet-18 on ImageNet with KURE, fine-tuned from torchvision's weights (the paper's recipe, batch 256,
90 epochs; see configs/imagenet.py).

  python train.py --config configs/resnet18.py --workdir runs/resnet18_kure \
      --config.dataset.data_dir=/path/to/tensorflow_datasets \
      --config.init_from=torchvision:/path/to/resnet18-f37072fd.pth

Both overrides are optional: data defaults to TFDS's data_dir (~/tensorflow_datasets), weights
to torchvision's download cache (~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth).
"""

from configs import imagenet


def get_config():
  return imagenet.get_config("resnet18", batch_size=256, num_epochs=90)
